"""Memory soak: does any FLARE process of the real deployment grow over many rounds of the encrypted job?

In one run on one machine:

1. ``python -m hospital_fedlora.deploy.kits`` (what ``make kits`` runs) into a temporary workspace under
   ``workspace/``, on a free port;
2. the server and three hospitals started from their kits (``LocalFederation``), on 127.0.0.1;
3. a copy of ``jobs/fedlora_he`` submitted through the FLARE API with ``num_rounds`` = ``--rounds`` and the
   recipe cut to the least that still trains (1 local step of batch 2, 4 validation examples); the final
   evaluation workflow stays;
4. every second, the RSS of each FLARE process (server parent, the server's job process, each hospital's
   parent and job process), tagged with the round the server last logged as started. A round's figure is
   the largest sample taken while it ran.

Per process: RSS after warm-up (round ``--warmup``), at the last round, and the least-squares slope over
rounds ``--warmup``..N in MB per 100 rounds, against the target of 20 MB per 100 rounds. The server's
persistor logs the bytes of every encrypted round it records; their sum per 100 rounds is reported next to
the slopes, since the encrypted log is what a server holding it in memory would grow by.

Writes ``<out>/memory_soak.json`` and ``<out>/memory_soak.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

from hospital_fedlora.deploy.kits import latest_prod_dir
from hospital_fedlora_tools.demo import derive_job
from hospital_fedlora_tools.local_federation import LocalFederation
from hospital_fedlora_tools.process_table import belongs_to, cmdline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_round_overhead import round_walls  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deployment_helpers import free_port, project_with_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TARGET_MB_PER_100_ROUNDS = 20.0
# The least a round can do and still train: one optimizer step of two examples, four validation examples.
SOAK_RECIPE = {"local_steps": 1, "batch_size": 2, "max_eval_examples": 4}
MB = 1024 * 1024
# Unsampled rounds after the measured ones, with --probe: the job processes live on while gdb pauses each in
# turn (a round waits for a paused site, so the job moves on by about a round between two probes).
PROBE_ROUNDS = 10

_MODULES = {
    "nvflare.private.fed.app.server.server_train": "server",
    "nvflare.private.fed.app.server.runner_process": "server job",
    "nvflare.private.fed.app.client.client_train": "",  # a hospital: named by its kit
    "nvflare.private.fed.app.client.worker_process": " job",
}
_SAVED = re.compile(r"round (\d+): encrypted aggregate saved to \S+ \(([\d,]+) bytes\)")




def soak_job(dst: Path, rounds: int) -> Path:
    """A copy of jobs/fedlora_he with ``rounds`` rounds and the soak recipe (the repository's job unchanged)."""
    job = derive_job(REPO / "jobs" / "fedlora_he", dst, num_rounds=rounds)
    client = job / "app/config/config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["recipe"].update(SOAK_RECIPE)
    client.write_text(json.dumps(cfg, indent=2))
    return job


def process_name(pid: int, fed: LocalFederation) -> str | None:
    """'server', 'server job', '<hospital>' or '<hospital> job' for a FLARE process of ``fed``; else None."""
    args = cmdline(pid).split()
    for module, suffix in _MODULES.items():
        if module in args:
            if suffix.startswith("server"):
                return suffix
            site = next((name for name, kit in fed.clients.items() if belongs_to(pid, kit)), None)
            return f"{site}{suffix}" if site else None
    return None


class Sampler(threading.Thread):
    """Samples the RSS of every FLARE process of ``fed`` every ``interval`` s, tagged with ``self.round``."""

    def __init__(self, fed: LocalFederation, interval: float = 1.0):
        super().__init__(daemon=True)
        self.fed, self.interval = fed, interval
        self.round: int | None = None  # the round the server last logged as started; None before and after
        self.samples: dict[str, dict[int, list[float]]] = {}  # name -> round -> RSS samples (MB)
        self.pids: dict[str, set[int]] = {}
        self.latest: dict[str, int] = {}  # name -> pid in the latest sample
        self._names: dict[int, str | None] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        rnd = self.round
        for pid in self.fed.processes():
            if pid not in self._names:
                self._names[pid] = process_name(pid, self.fed)
            name = self._names[pid]
            if name is None:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss / MB
            except psutil.Error:
                continue
            self.pids.setdefault(name, set()).add(pid)
            self.latest[name] = pid
            if rnd is not None:
                self.samples.setdefault(name, {}).setdefault(rnd, []).append(rss)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def probe(pids: dict[str, int]) -> dict[str, dict]:
    """How much of each process's RSS is memory its allocator or Python's collector would give back.

    One gdb session per process (attached, then detached): RSS; RSS after glibc's ``malloc_trim(0)`` (freed
    heap the allocator kept); RSS after a full ``gc.collect()`` and another trim (unreachable Python objects
    the cyclic collector had not reached yet). What is left is memory the process still uses.
    """
    rss = "shell grep VmRSS /proc/{pid}/status"
    out = {}
    for name, pid in pids.items():
        commands = [
            "set confirm off", rss, "call (int) malloc_trim(0)", rss,
            "call (int) PyGILState_Ensure()", 'call (int) PyRun_SimpleString("import gc; gc.collect()")',
            "call (void) PyGILState_Release($2)", "call (int) malloc_trim(0)", rss, "detach",
        ]  # fmt: skip
        args = ["gdb", "-p", str(pid), "-batch", "-nx"]
        for c in commands:
            args += ["-ex", c.format(pid=pid)]
        t0 = time.monotonic()
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            out[name] = {"error": str(err)}
            continue
        readings = [int(kb) / 1024 for kb in re.findall(r"VmRSS:\s+(\d+) kB", done.stdout)]
        ok = len(readings) == 3 and "No symbol" not in done.stderr and "\n$3 = 0" in done.stdout
        out[name] = {
            "pid": pid,
            "rss_mb": round(readings[0], 1) if readings else None,
            "after_malloc_trim_mb": round(readings[1], 1) if len(readings) > 1 else None,
            "after_gc_collect_and_trim_mb": round(readings[2], 1) if ok else None,
            "paused_s": round(time.monotonic() - t0, 1),
        }
    return out


def slope_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (round, MB) in MB per 100 rounds."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / sxx


def summarize(samples: dict[str, dict[int, list[float]]], pids: dict[str, set[int]], warmup: int, rounds: int):
    """Per process: its per-round figures, the slope after warm-up and the slope over the second half."""
    order = ["server", "server job"] + sorted(n for n in samples if not n.startswith("server"))
    out = []
    for name in order:
        if name not in samples:
            continue
        per_round = sorted((r, round(max(v), 1)) for r, v in samples[name].items())
        fit = [(r, mb) for r, mb in per_round if r >= warmup]
        slope = slope_per_100(fit) if len(fit) >= 2 else float("nan")
        late = [(r, mb) for r, mb in per_round if r >= rounds // 2]
        late_slope = slope_per_100(late) if len(late) >= 2 else float("nan")
        out.append({
            "name": name,
            "role": ("server" if name.startswith("server") else "hospital")
            + (" job process" if name.endswith("job") else ""),
            "pids": sorted(pids.get(name, ())),
            "samples": [{"round": r + 1, "rss_mb": mb} for r, mb in per_round],  # 1-based, as the pages count
            "rss_after_warmup_mb": fit[0][1] if fit else None,
            "rss_end_mb": per_round[-1][1] if per_round else None,
            "fit_rounds": [fit[0][0] + 1, fit[-1][0] + 1] if fit else None,
            "slope_mb_per_100_rounds": round(slope, 2),
            "second_half_rounds": [late[0][0] + 1, late[-1][0] + 1] if late else None,
            "second_half_slope_mb_per_100_rounds": round(late_slope, 2),
            "passes": bool(slope < TARGET_MB_PER_100_ROUNDS),
        })  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5, help="rounds left out of the slope (fewer in short runs)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument(
        "--probe", action="store_true",
        help="after the last round, attach gdb to every process and measure RSS after malloc_trim and gc.collect "
        f"({PROBE_ROUNDS} more, unsampled rounds keep the job processes alive for it)",
    )  # fmt: skip
    args = p.parse_args(argv)
    warmup = min(args.warmup, max(0, args.rounds - 3))  # a short run still fits at least 3 rounds

    code = code_state()  # before the run: what the processes import
    (REPO / "workspace").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "workspace", prefix="bench-soak-") as tmp:
        tmp = Path(tmp)
        project = project_with_port(free_port())
        (tmp / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
        job = soak_job(tmp / "job", args.rounds + (PROBE_ROUNDS if args.probe else 0))
        subprocess.run(
            [sys.executable, "-m", "hospital_fedlora.deploy.kits", "--project", str(tmp / "project.yml"),
             "--workspace", str(tmp / "kits"), "--site-configs", str(REPO / "site_configs")],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip

        fed = LocalFederation(latest_prod_dir(tmp / "kits"), echo=print)
        sampler = Sampler(fed, args.interval)
        finished: set[int] = set()
        probed: dict[str, dict] = {}

        def on_progress(ev):
            if ev.event == "round_started" and ev.round == args.rounds:  # the first of the probe's rounds
                sampler.round = None
                jobs_first = sorted(sampler.latest.items(), key=lambda item: not item[0].endswith("job"))
                probed.update(probe(dict(jobs_first)))
            elif ev.event == "round_started" and ev.round > args.rounds:
                pass
            elif ev.event == "round_started":
                sampler.round = ev.round
            elif ev.event == "round_finished" and ev.round < args.rounds:
                finished.add(ev.round)
                if ev.round + 1 >= args.rounds:
                    sampler.round = None  # the final evaluation is not a round
                if (ev.round + 1) % 10 == 0 or ev.round + 1 == args.rounds:
                    print(f"[{ev.elapsed_s:7.1f} s] round {ev.round + 1}/{args.rounds} finished", flush=True)

        with fed:
            sampler.start()
            started = time.monotonic()
            try:
                job_id = fed.submit(job)
                fed.wait(job_id, on_progress=on_progress, poll_interval=0.5)
            finally:
                sampler.stop()
            wall_s = time.monotonic() - started
            result = fed.download(job_id, tmp / "results")
            job_log = (result / "workspace" / "log.txt").read_text()  # the server's job log

    walls = sorted(s for r, s in round_walls(job_log).items() if r < args.rounds)  # not the probe's rounds
    saved = {int(r): int(b.replace(",", "")) for r, b in _SAVED.findall(job_log)}
    log_mb_per_100 = 100 * sum(saved.values()) / len(saved) / MB if saved else None
    processes = summarize(sampler.samples, sampler.pids, warmup, args.rounds)
    for proc in processes:
        if proc["name"] in probed:
            proc["probe"] = probed[proc["name"]]
    report = {
        "job": f"jobs/fedlora_he, {args.rounds} rounds, 3 hospitals, recipe {json.dumps(SOAK_RECIPE)}",
        "rounds": args.rounds,
        "recipe": SOAK_RECIPE,
        "rounds_completed": len(finished),
        "warmup_rounds": warmup,
        "sample_interval_s": args.interval,
        "per_round_figure": "largest RSS sample taken while the round ran (server's 'Round N started' to the next)",
        "target_mb_per_100_rounds": TARGET_MB_PER_100_ROUNDS,
        "all_pass": all(p["passes"] for p in processes),
        "wall_s": round(wall_s, 1),
        "median_round_s": round(walls[len(walls) // 2], 2) if walls else None,
        "encrypted_log_bytes_per_round": round(sum(saved.values()) / len(saved)) if saved else None,
        "encrypted_log_mb_per_100_rounds": round(log_mb_per_100, 2) if log_mb_per_100 else None,
        "processes": processes,
        "code": code,
        "machine": {
            "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nvflare": _version("nvflare"),
            "tenseal": _version("tenseal"),
            "torch": _version("torch"),
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(["python tests/benchmarks/bench_memory_soak.py", *(sys.argv[1:] if argv is None else argv)])
        .replace(f" --out {args.out}", ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_soak.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "memory_soak.md", report)
    for proc in processes:
        verdict = "ok" if proc["passes"] else "OVER TARGET"
        print(f"{proc['name']:>16}: {proc['rss_after_warmup_mb']:7.1f} -> {proc['rss_end_mb']:7.1f} MB, "
              f"{proc['slope_mb_per_100_rounds']:+7.2f} MB/100 rounds {verdict}")  # fmt: skip
    return 0


def code_state() -> dict:
    """The commit measured, and any uncommitted change to the code or jobs the run used."""

    def git(*a: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    # porcelain lines are "XY path": the status columns may be blank, so the output is not stripped
    changed = git("status", "--porcelain", "--", "custom", "jobs", "provisioning", "site_configs")
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted_changes": [line[3:] for line in changed.splitlines() if line.strip()]}  # fmt: skip


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def write_markdown(path: Path, r: dict) -> None:
    procs = r["processes"]
    w = r["warmup_rounds"] + 1
    half = procs[0]["second_half_rounds"][0] if procs and procs[0]["second_half_rounds"] else None
    rows = "\n".join(
        f"| {p['name']} (`{_MODULE_OF[p['role']]}`) | {p['rss_after_warmup_mb']:.0f} | {p['rss_end_mb']:.0f} | "
        f"**{p['slope_mb_per_100_rounds']:+.1f}** | {'pass' if p['passes'] else '**fail**'} | "
        f"{p['second_half_slope_mb_per_100_rounds']:+.1f} |"
        for p in procs
    )
    m, code = r["machine"], r["code"]
    measured = f"commit `{code['commit']}`" + (
        f" with uncommitted changes to {', '.join(f'`{c}`' for c in code['uncommitted_changes'])}"
        if code["uncommitted_changes"] else ""
    )  # fmt: skip
    log = (
        f"{r['encrypted_log_bytes_per_round']:,} bytes per round, {r['encrypted_log_mb_per_100_rounds']:.1f} MB per "
        "100 rounds: what a server job process that kept the whole encrypted log in memory would grow by"
        if r["encrypted_log_bytes_per_round"]
        else "not found in the server's job log"
    )
    failing = [p for p in procs if not p["passes"]]
    levelling = [p["name"] for p in failing if p["second_half_slope_mb_per_100_rounds"] < r["target_mb_per_100_rounds"]]
    verdict = (
        f"Every process stays under {r['target_mb_per_100_rounds']:.0f} MB per 100 rounds."
        if not failing
        else f"Over the target: {', '.join(p['name'] for p in failing)}."
        + (f" Under it over rounds {half}..{r['rounds']} alone: {', '.join(levelling)}." if levelling else "")
    )  # fmt: skip
    probe_section = ""
    probed = [p for p in procs if p.get("probe", {}).get("rss_mb") is not None]
    if probed:
        prow = "\n".join(
            f"| {p['name']} | {p['rss_after_warmup_mb']:.0f} | {p['probe']['rss_mb']:.0f} | "
            f"{_mb(p['probe']['after_malloc_trim_mb'])} | {_mb(p['probe']['after_gc_collect_and_trim_mb'])} |"
            for p in probed
        )
        reading = []
        for q in probed:
            pr, base = q["probe"], q["rss_after_warmup_mb"]
            if q["passes"] or pr["after_gc_collect_and_trim_mb"] is None:
                continue
            trimmed = pr["rss_mb"] - pr["after_malloc_trim_mb"]
            collected = pr["after_malloc_trim_mb"] - pr["after_gc_collect_and_trim_mb"]
            kept = pr["after_gc_collect_and_trim_mb"] - base
            reading.append(
                f"- {q['name']}: `malloc_trim` gives back {trimmed:.0f} MB and `gc.collect` {collected:.0f} MB more; "
                + (f"what is left is {-kept:.0f} MB below its round-{w} RSS: the growth is memory the process "
                   "would give back, not memory it holds." if kept <= 0
                   else f"what is left is still {kept:.0f} MB above its round-{w} RSS.")
            )  # fmt: skip
        probe_section = f"""
## What the growth is made of (`--probe`)

After the last measured round, `gdb` attached to each process in turn ({PROBE_ROUNDS} more, unmeasured rounds
keep the job processes alive) and called glibc's `malloc_trim(0)`, which hands freed heap pages the allocator
kept back to the system, then Python's `gc.collect()` (objects in reference cycles that the collector had
not reached yet) and `malloc_trim(0)` again. What is left is memory the process still uses.

| process | RSS, MB, round {w} | RSS, MB, at the probe | after `malloc_trim` | after `gc.collect` + `malloc_trim` |
|---|---|---|---|---|
{prow}

{chr(10).join(reading)}
"""
    text = f"""# Memory soak: RSS over {r['rounds']} rounds of the encrypted job

Written by `tests/benchmarks/bench_memory_soak.py` with [`memory_soak.json`](memory_soak.json), which holds
every process's RSS for every round. One run on one machine ({m['cpu_count']} cores, {m['memory_gib']:.0f} GiB,
no GPU, shared with other work; nvflare {m['nvflare']}, tenseal {m['tenseal']}, torch {m['torch']}),
measuring {measured}, in this order:

1. `python -m hospital_fedlora.deploy.kits` (what `make kits` runs) into a temporary folder under `workspace/`,
   on a free port;
2. the server and three hospitals started from their kits (`LocalFederation`), separate processes on
   127.0.0.1 with mutual TLS;
3. a copy of `jobs/fedlora_he` with only `num_rounds` ({r['rounds']}) and the recipe
   (`{json.dumps(r['recipe'])}`) changed, submitted through the FLARE API and followed to
   `FINISHED:COMPLETED`: {r['rounds_completed']} rounds, median round {r['median_round_s']:.1f} s,
   {r['wall_s'] / 60:.1f} min from submission to the end; the final evaluation runs as shipped;
4. every {r['sample_interval_s']:g} s the RSS of each FLARE process, tagged with the round the server last
   logged as started; a round's figure is the largest sample taken while it ran.

Command: `{r['command']}` (in `make bench`; `--rounds 5` for a quick look; `--probe` adds the section on what
the growth is made of).

## RSS per process, target: under {r['target_mb_per_100_rounds']:.0f} MB per 100 rounds

Slope: least squares over rounds {w}..{r['rounds']} (the first {r['warmup_rounds']} are warm-up), in MB per 100
rounds; the last column fits rounds {half}..{r['rounds']} alone.

| process | RSS, MB, round {w} | RSS, MB, round {r['rounds']} | slope | target | slope, second half |
|---|---|---|---|---|---|
{rows}

{verdict}

The server's persistor records each round's encrypted sum: {log}.
{probe_section}"""
    path.write_text(text)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


_MODULE_OF = {
    "server": "server_train",
    "server job process": "runner_process",
    "hospital": "client_train",
    "hospital job process": "worker_process",
}


if __name__ == "__main__":
    raise SystemExit(main())
