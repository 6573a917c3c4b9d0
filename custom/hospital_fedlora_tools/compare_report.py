"""``make compare``'s pictures (matplotlib, Agg: no display) and its markdown table, from ``quality.json``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = {"validation_loss": "validation_loss_per_round.png", "test_metrics": "test_metrics.png",
         "bytes": "bytes_per_round.png"}  # fmt: skip
MEANING = {
    "base": "the base model alone, no adapter",
    "local_only": "each hospital trains alone on its own train split (rounds x local_steps steps); "
                  "row = that hospital's model, scored on every test split",
    "centralized": "one model on the three train splits pooled, rounds x local_steps x 3 steps "
                   "(the federation's total optimizer steps): the upper bound",
    "federated": "jobs/fedlora_plain in FLARE's simulator (plaintext FedAvg of adapter differences)",
    "federated_he_int16": "jobs/fedlora_he on provisioned kits on 127.0.0.1, packed BFV, 16-bit integers",
    "federated_he_int8": "jobs/fedlora_he on provisioned kits on 127.0.0.1, packed BFV, 8-bit integers",
}  # fmt: skip


def _rows(q: dict) -> list[tuple[str, dict]]:
    """(row label, {pooled, per_hospital}) for every model scored: local-only has one row per hospital."""
    rows = []
    for setting in q["settings"]:
        r = q["test_metrics"][setting]
        rows += [(f"local_only ({h})", m) for h, m in r.items()] if setting == "local_only" else [(setting, r)]
    return rows


def write_plots(q: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / v for k, v in PLOTS.items()}
    curves, sites = q["validation_loss_per_round"], q["sites"]

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), sharey=True, squeeze=False)
    for ax, (setting, per_site) in zip(axes[0], curves.items()):
        for site, losses in per_site.items():
            ax.plot(range(len(losses)), losses, marker="o", label=site)
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("rounds completed")
        ax.set_xticks(range(q["budget"]["rounds"] + 1))
    axes[0][0].set_ylabel("validation loss (response tokens)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["validation_loss"], dpi=90)
    plt.close(fig)

    rows = _rows(q)
    labels = [label for label, _ in rows]
    groups = ["pooled", *sites]
    fig, axes = plt.subplots(1, 5, figsize=(24, 4))
    width = 0.8 / len(groups)
    for ax, metric in zip(axes, ("loss", "perplexity", "token_accuracy", "exact_match", "rouge_l")):
        for i, g in enumerate(groups):
            vals = [m["pooled"][metric] if g == "pooled" else m["per_hospital"][g][metric] for _, m in rows]
            ax.bar([x + i * width for x in range(len(rows))], vals, width, label=g)
        ax.set_title(f"test {metric}" + (" (log scale)" if metric == "perplexity" else ""), fontsize=10)
        if metric == "perplexity":  # one hospital's can be ten times the others'
            ax.set_yscale("log")
        ax.set_xticks([x + width * (len(groups) - 1) / 2 for x in range(len(rows))], labels, rotation=40, ha="right", fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["test_metrics"], dpi=90)
    plt.close(fig)

    b = q["bytes_per_round"]
    names = [s for s in q["settings"] if s in b]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([x - 0.2 for x in range(len(names))], [b[n]["up_bytes_per_site"] / 1e3 for n in names], 0.4, label="upload")
    ax.bar([x + 0.2 for x in range(len(names))], [b[n]["down_bytes_per_site"] / 1e3 for n in names], 0.4, label="download")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("kB per site per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["bytes"], dpi=90)
    plt.close(fig)
    return paths


def write_markdown(q: dict, plots: dict[str, Path], path: Path) -> None:
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    bud, sites = q["budget"], q["sites"]
    tested = "all" if bud["test_examples"] is None else f"the first {bud['test_examples']}"
    lines = [
        "# Results: federation against its baselines",
        "",
        f"Written by `make compare` (`python -m hospital_fedlora_tools.compare --budget {bud['name']}`) on "
        f"{q['generated']}. Budget: {bud['rounds']} rounds x {bud['local_steps']} local steps, batch "
        f"{q['recipe']['batch_size']}, learning rate {q['recipe']['learning_rate']}, LoRA r={q['recipe']['lora']['r']} "
        f"on {', '.join(q['recipe']['lora']['target_modules'])}, loss weighted per "
        f"{q['recipe'].get('loss_weighting', 'token')}, seed {q['recipe']['seed']}; validation on the first "
        f"{bud['eval_examples']} examples per hospital, test on {tested} "
        "test examples per hospital. Numbers in `benchmarks/quality.json`.",
        "",
        "Every row is scored by the same function on each hospital's **test** split and on their union (pooled, "
        "token-weighted): mean loss over answer tokens, its perplexity, and token accuracy (the argmax of the "
        "next-token logits equals the answer token); and on greedy answers, scored as the hospitals score them "
        "(`site/test_metrics.py`), the diagnosis-group exact match over the records asking for it and ROUGE-L F1 "
        "over the others (pooled over all hospitals' records). The centralized setting runs as many optimizer steps as the "
        "federation does in all (hospitals x rounds x local steps): the same compute, on pooled data.",
        "",
        "| setting | " + " | ".join(f"loss {g}" for g in ["pooled", *sites])
        + " | perplexity pooled | token acc. pooled | diagnosis exact match pooled | ROUGE-L pooled |",
        "|---|" + "---:|" * (len(sites) + 5),
    ]
    for label, m in _rows(q):
        cells = [m["pooled"]["loss"], *(m["per_hospital"][s]["loss"] for s in sites)]
        lines.append(f"| {label} | " + " | ".join(f"{c:.4f}" for c in cells)
                     + f" | {m['pooled']['perplexity']:.3f} | {m['pooled']['token_accuracy']:.3f}"
                     + f" | {m['pooled']['exact_match']:.0%} | {m['pooled']['rouge_l']:.3f} |")  # fmt: skip
    lines += ["", "What each row is:", ""] + [f"- `{k}`: {v}" for k, v in MEANING.items()]
    lines += ["", "## Targets (issue 13), on the pooled test split", "", "| target | measured | met |", "|---|---|---|"]
    for t in q["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'n/a' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    lines += ["", "Reading the targets. Equal compute is not equal progress: a round of FedAvg moves the global adapter by "
              "the example-weighted average of the hospitals' local-step differences, about as far as one hospital's "
              "local steps, so rounds x local_steps steps of progress in all, where centralized training takes "
              "hospitals x rounds x local_steps sequential steps on pooled data (three times as many here). With a "
              "short budget the federated adapter is therefore about as far along as each local-only one (which also "
              "takes rounds x local_steps steps): it gains breadth (every hospital's data) but not depth. Loss falling "
              "is not the task learnt: the exact-match column says whether the answers are right. Whether a target is met is computed from the numbers above, never tuned.",
              "", "## Bytes per site per round", "",
              "Through the jobs' own filters on this model's adapter shapes (one round, as `tests/benchmarks/bench_he_aggregation.py` measures it).",
              "", "| setting | upload | download | ciphertext in upload |", "|---|---:|---:|---:|"]  # fmt: skip
    for name, b in q["bytes_per_round"].items():
        ct = b.get("up_ciphertext_bytes_per_site")
        lines.append(f"| {name} | {b['up_bytes_per_site']:,} B | {b['down_bytes_per_site']:,} B | {f'{ct:,} B' if ct else '-'} |")
    lines += ["", "## Plots", "",
              "Validation loss per round per hospital (federated: each hospital's loss on the global adapter it received, "
              "the last point the final adapter; local-only and centralized: after each round's worth of steps):", "",
              f"![validation loss per round]({rel(plots['validation_loss'])})", "",
              f"![test metrics per setting]({rel(plots['test_metrics'])})", "",
              f"![bytes per round per setting]({rel(plots['bytes'])})", ""]  # fmt: skip
    path.write_text("\n".join(lines))
