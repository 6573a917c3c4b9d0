"""``make compare``: the baselines federation has to beat, in one command, with plots.

Five settings, one recipe (the committed jobs': ``TrainingRecipe`` as their client config sets it), one
seed, one base model:

* ``local_only``: each hospital alone on its own train split, rounds x local_steps optimizer steps;
* ``centralized``: the three train splits pooled, rounds x local_steps x hospitals steps (the same total
  optimizer steps, so the same compute, as the federation);
* ``federated``: ``jobs/fedlora_plain`` in FLARE's simulator;
* ``federated_he_int16`` / ``federated_he_int8``: ``jobs/fedlora_he`` on provisioned kits on 127.0.0.1,
  16- and 8-bit packing.

Every final adapter (and the base model alone, ``base``) is scored by one function
(``compare_eval.score_split``) on every hospital's test split and on their union. Writes
``<out>/benchmarks/quality.json``, ``<out>/results.md`` and ``<out>/results/*.png``.

Usage: ``python -m hospital_fedlora_tools.compare [--budget quick|default] [--out docs] [--workspace W]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hospital_fedlora.config import parse_recipe
from hospital_fedlora.protocol import Meta

from .compare_eval import Bench, site_seed
from .compare_report import write_markdown, write_plots
from .compare_runs import bytes_per_round, run_encrypted, run_plaintext, validation_curve
from .demo import SITES

REPO = Path(__file__).resolve().parents[2]
FEDERATED = ("federated", "federated_he_int16", "federated_he_int8")
SETTINGS = ("base", "local_only", "centralized", *FEDERATED)
METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "rouge_l")
# quick: for the test (tests/test_compare.py); default: the committed jobs' rounds, steps and eval size.
BUDGETS = {"quick": {"rounds": 1, "local_steps": 2, "eval_examples": 6, "test_examples": 6}}


def job_recipe(jobs: Path) -> tuple[dict, int]:
    """The plaintext job's recipe (as its client config sets it) and its number of rounds."""
    client = json.loads((jobs / "fedlora_plain/app/config/config_fed_client.json").read_text())
    server = json.loads((jobs / "fedlora_plain/app/config/config_fed_server.json").read_text())
    rounds = next(w["args"]["num_rounds"] for w in server["workflows"] if "num_rounds" in w["args"])
    return client["executors"][0]["executor"]["args"]["recipe"], rounds


def budget_for(name: str, recipe, rounds: int) -> dict:
    if name == "quick":
        return dict(BUDGETS["quick"], name=name)
    return {"name": name, "rounds": rounds, "local_steps": recipe.local_steps,
            "eval_examples": recipe.max_eval_examples, "test_examples": None}  # fmt: skip


def flatten(results: dict[str, dict], metric: str) -> dict:
    """``quality.json``'s ``<setting>_test_<metric>`` fields: ``{pooled, per_hospital}`` (local-only: per model)."""
    out = {}
    for setting, r in results.items():
        pick = lambda s: {"pooled": s["pooled"][metric], "per_hospital": {h: m[metric] for h, m in s["per_hospital"].items()}}  # noqa: E731
        out[f"{setting}_test_{metric}"] = {h: pick(s) for h, s in r.items()} if setting == "local_only" else pick(r)
    return out


def targets(q: dict) -> list[dict]:
    """The issue's targets on the pooled test split, measured, met or not."""
    fed, cen, he16 = (q[f"{s}_test_loss"]["pooled"] for s in ("federated", "centralized", "federated_he_int16"))
    local = {h: v["pooled"] for h, v in q["local_only_test_loss"].items()}
    em = q["federated_test_exact_match"]["pooled"]
    return [
        {"target": "diagnosis-group exact match of the federated adapter >= 80% (pooled test)", "met": em >= 0.8,
         "measured": f"federated {em:.0%} of {q['federated_test_exact_match_examples']} diagnosis records; base model "
                     f"{q['base_test_exact_match']['pooled']:.0%}; local-only " + ", ".join(
                         f"{h} {v['pooled']:.0%}" for h, v in q["local_only_test_exact_match"].items())},
        {"target": "federated within 5% of centralized (pooled test loss)", "met": fed <= cen * 1.05,
         "measured": f"federated {fed:.4f} vs centralized {cen:.4f}: {(fed - cen) / cen:+.2%}"},
        {"target": "federated below every local-only model (pooled test loss)", "met": all(fed < v for v in local.values()),
         "measured": f"federated {fed:.4f}; local-only " + ", ".join(f"{h} {v:.4f}" for h, v in local.items())},
        {"target": "HE int16 within 1% of plaintext federated (pooled test loss)", "met": abs(he16 - fed) <= 0.01 * fed,
         "measured": f"HE int16 {he16:.4f} vs plaintext {fed:.4f}: {(he16 - fed) / fed:+.3%}"},
    ]  # fmt: skip


def run(args) -> dict:
    show = lambda m: print(m, flush=True)  # noqa: E731
    raw_recipe, job_rounds = job_recipe(args.jobs)
    recipe = parse_recipe(raw_recipe)
    budget = budget_for(args.budget, recipe, job_rounds)
    rounds, steps = budget["rounds"], budget["local_steps"]
    job_recipe_overrides = {"max_eval_examples": budget["eval_examples"]}
    work = args.workspace / f"compare_{args.budget}"
    work.mkdir(parents=True, exist_ok=True)
    seconds, curves = {}, {}

    bench = Bench.load(args.site_configs, SITES, recipe)
    val = bench.tokenized("validation", budget["eval_examples"])
    test = bench.tokenized("test", budget["test_examples"])
    test_records = {site: bench.records(site, "test")[: budget["test_examples"]] for site in SITES}
    results: dict = {}

    def timed(name, fn):
        t = time.monotonic()
        out = fn()
        seconds[name] = time.monotonic() - t
        return out

    def in_process() -> dict:
        """Base, local-only, centralized and the byte measurement: one model, in this process."""
        results["base"] = bench.score(None, test, test_records)
        results["local_only"], curves["local_only"] = {}, {}
        for site in SITES:
            show(f"local_only: {site} alone, {rounds} x {steps} steps ...")
            state, curve = bench.train_baseline(bench.records(site, "train"), site_seed(recipe, site), rounds, steps, {site: val[site]})
            results["local_only"][site] = bench.score(state, test, test_records)
            curves["local_only"][site] = curve[site]
        show(f"centralized: pooled train splits, {rounds} x {steps * len(SITES)} steps ...")
        pooled = [r for site in SITES for r in bench.records(site, "train")]
        state, curves["centralized"] = bench.train_baseline(pooled, recipe.seed, rounds, steps * len(SITES), val)
        results["centralized"] = bench.score(state, test, test_records)
        show("bytes per round through the jobs' filters ...")
        return bytes_per_round(bench.initial)

    # The federations spend much of their time starting and waiting: the simulator (its own processes) and
    # the in-process settings run in threads beside the kits' federation, which keeps the main thread for
    # its signal handling. Every result is seeded, so running side by side changes only the seconds.
    with ThreadPoolExecutor(max_workers=2) as pool:
        local = pool.submit(timed, "base_local_only_centralized_bytes", in_process)
        show("federated: jobs/fedlora_plain in the FLARE simulator ...")
        plain = pool.submit(timed, "federated", lambda: run_plaintext(args.jobs, work, args.site_configs, rounds, steps, job_recipe_overrides, show=show))
        show("federated_he_int16, federated_he_int8: jobs/fedlora_he on provisioned kits on 127.0.0.1 ...")
        runs = timed("federated_he_both", lambda: run_encrypted(args.jobs, work, args.project, args.site_configs, rounds, steps, job_recipe_overrides, show=show))
        runs = {"federated": plain.result(), **runs}
        measured_bytes = local.result()
    identical, every_round, run_dirs = {}, {}, {}
    for name, fr in runs.items():
        if not fr.adapters:
            raise SystemExit(f"{name}: no final adapter was written")
        files = {(a / "adapter_model.safetensors").read_bytes() for a in fr.adapters}
        identical[name] = len(files) == 1  # every hospital holds the same global adapter (HE)
        results[name] = bench.score_folder(fr.adapters[0], test, test_records)
        # min_clients lets a round close without a hospital; then the settings would not be comparable
        every_round[name] = all(set(SITES) <= set(r[Meta.SITE_METRICS]) for r in fr.rounds) and len(fr.rounds) == rounds
        run_dirs[name] = str(fr.run_dir.relative_to(REPO) if fr.run_dir.is_relative_to(REPO) else fr.run_dir)
        curve = validation_curve(fr.rounds)
        final = bench.score_folder(fr.adapters[0], val)["per_hospital"]
        curves[name] = {s: curve.get(s, []) + [final[s]["loss"]] for s in SITES}

    quality = {
        "settings": list(SETTINGS),
        "sites": list(SITES),
        **{k: v for m in METRICS for k, v in flatten(results, m).items()},
        "test_metrics": {s: results[s] for s in SETTINGS},
        "validation_loss_per_round": curves,
        "bytes_per_round": measured_bytes,
        "final_adapter_identical_at_every_holder": identical,
        "every_hospital_in_every_round": every_round,
        "server_run_folders": run_dirs,  # tb_events/<site>/ (TensorBoard) and metrics.csv of each federated run
        "budget": budget,
        "recipe": recipe.model_dump(mode="json"),
        "seeds": {"lora_init": recipe.seed, "local_only_batches": {s: site_seed(recipe, s) for s in SITES},
                  "centralized_batches": recipe.seed, "federated_batches": "each site's, as local_only"},  # fmt: skip
        "optimizer_steps": {"local_only": f"{rounds * steps} per hospital", "centralized": rounds * steps * len(SITES),
                            "federated": f"{rounds * steps} per hospital per job, {rounds * steps * len(SITES)} in all"},  # fmt: skip
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    quality["federated_test_exact_match_examples"] = results["federated"]["pooled"]["exact_match_examples"]
    # the names for the diagnosis-group exact match, beside the <setting>_test_<metric> fields
    quality["federated_exact_match"] = quality["federated_test_exact_match"]
    quality["base_exact_match"] = quality["base_test_exact_match"]
    quality["targets"] = targets(quality)
    out = args.out
    (out / "benchmarks").mkdir(parents=True, exist_ok=True)
    (out / "benchmarks" / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    plots = write_plots(quality, out / "results")
    write_markdown(quality, plots, out / "results.md")
    show(f"wrote {out / 'benchmarks' / 'quality.json'}, {out / 'results.md'} and {len(plots)} plots in {out / 'results'}")
    return quality


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=("default", "quick"), default="default",
                   help="default: the committed jobs' rounds and steps; quick: 1 round of 2 steps, 6 eval examples (tests)")  # fmt: skip
    p.add_argument("--out", type=Path, default=REPO / "docs", help="writes benchmarks/quality.json, results.md, results/*.png")
    p.add_argument("--workspace", type=Path, default=REPO / "workspace", help="runtime state (git-ignored)")
    p.add_argument("--jobs", type=Path, default=REPO / "jobs")
    p.add_argument("--site-configs", type=Path, default=REPO / "site_configs")
    p.add_argument("--project", type=Path, default=REPO / "provisioning/project.yml")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rewrite results.md and the plots from <out>/benchmarks/quality.json")  # fmt: skip
    args = p.parse_args(argv)
    if args.report_only:
        quality = json.loads((args.out / "benchmarks" / "quality.json").read_text())
        write_markdown(quality, write_plots(quality, args.out / "results"), args.out / "results.md")
        return 0
    # The in-process byte measurement builds kit-less components that warn about missing kit files.
    logging.getLogger().setLevel(logging.ERROR)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
