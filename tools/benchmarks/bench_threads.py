"""CPU threads of an in-process run, on an idle machine and on a busy one.

    python tools/benchmarks/bench_threads.py [--steps 20] [--rounds 2] [--busy 1]

Runs the quickstart recipe (a tiny model made here, 20 steps, no evaluation) as the CLI runs
it, in one process, with OMP_NUM_THREADS=1, with OMP_NUM_THREADS set to every CPU, and with
it unset (the CLI's own choice: idle CPUs, from the load average), first with the machine
otherwise idle, then with `--busy` other processes spinning on the CPUs (the CLI measures
how many CPUs are idle when it starts). Variants are
interleaved round by round, so a drift in the machine's load hits them alike. Prints
tokens/s (median over rounds) per variant and condition, and the thread count the CLI chose.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run(model: Path, out: Path, steps: int, threads: str | None) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalora_dist.cli",
            "train",
            "configs/quickstart.yaml",
            f"model.path={model}",
            f"output.dir={out}",
            f"train.max_steps={steps}",
            "train.eval_every=0",
            "data.eval_files=[]",
            "train.log_every=1",
            "--overwrite",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:]  # the first steps include warm-up
    tokens = sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed)
    chosen = next((l for l in proc.stdout.splitlines() if "CPU thread(s)" in l), "")
    return tokens, chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="spinning processes for the busy condition")
    args = p.parse_args()
    from scalora_dist.model.tiny import make_tiny_model

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    variants = {"OMP_NUM_THREADS=1": "1", f"OMP_NUM_THREADS={cpus}": str(cpus), "unset (auto)": None}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", hidden_size=256, num_layers=4, intermediate_size=512)
        rows = []
        for condition in ("idle", f"busy ({args.busy} spinning)"):
            spinners = []
            if condition != "idle":
                stop_at = time.time() + 3600
                spinners = [mp.Process(target=spin, args=(stop_at,), daemon=True) for _ in range(args.busy)]
                for s in spinners:
                    s.start()
                time.sleep(2)
            speeds = {name: [] for name in variants}
            chosen = {}
            for _ in range(args.rounds):
                for name, threads in variants.items():
                    tok_s, line = run(model, Path(tmp) / "run", args.steps, threads)
                    speeds[name].append(tok_s)
                    if threads is None:
                        chosen[name] = line
            for s in spinners:
                s.terminate()
            for name in variants:
                rows.append((condition, name, statistics.median(speeds[name]), chosen.get(name, "")))
    print(f"| machine ({cpus} CPUs) | threads | tokens/s (median of {args.rounds}) | the CLI's choice |")
    print("|---|---|---|---|")
    for condition, name, tok_s, line in rows:
        print(f"| {condition} | {name} | {tok_s:,.0f} | {line} |")


if __name__ == "__main__":
    main()
