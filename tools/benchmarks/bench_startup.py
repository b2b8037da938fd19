"""Time to the first logged step: how long a user waits from pressing enter to the first
line of metrics.jsonl, for the quickstart on 1 and 2 processes, this checkout against
another (e.g. a worktree of an older commit), run in turn A B A B ... so the machine's drift
hits both alike.

    python tools/benchmarks/bench_startup.py --nprocs 1,2 --rounds 5
    python tools/benchmarks/bench_startup.py --baseline /path/to/older/checkout --rounds 5
    python tools/benchmarks/bench_startup.py --quick          # one round, for CI

Each run starts `python -m scalora_dist.cli train configs/quickstart.yaml` (with the run's own
output.dir, train.log_every=1) with PYTHONPATH set to the checkout, waits for the first
record in metrics.jsonl, then ends the whole job. The tiny model is made once
(models/tiny-llama). Prints a Markdown table of medians (and min-max), and the ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def first_step_seconds(code: Path, nproc: int, work: Path, timeout: float = 300) -> float:
    out = work / f"run-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "scalora_dist.cli",
        "train",
        "configs/quickstart.yaml",
        "-q",
        f"output.dir={out}",
        "train.log_every=1",
        "train.max_steps=50",
    ]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    metrics = out / "metrics.jsonl"
    try:
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} ended with {proc.returncode} before its first step")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no step after {timeout} s")
            time.sleep(0.02)
        return time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to time beside this one")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1
    codes = {"this checkout": REPO}
    if args.baseline:
        codes["baseline"] = args.baseline.resolve()
    for code in codes.values():
        if not (code / "models/tiny-llama/config.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "scalora_dist.cli", "make-tiny-model", "models/tiny-llama"],
                cwd=code,
                env={**os.environ, "PYTHONPATH": str(code)},
                check=True,
                capture_output=True,
            )
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in map(int, args.nprocs.split(",")):
            for _ in range(args.rounds):
                for name, code in codes.items():
                    times.setdefault((name, nproc), []).append(first_step_seconds(code, nproc, Path(tmp)))
    lines = [
        f"Time to the first logged step of the quickstart, s (median, min-max of {args.rounds}; "
        f"`python tools/benchmarks/bench_startup.py {' '.join(sys.argv[1:] if argv is None else argv)}`)",
        "",
        "| processes | " + " | ".join(codes) + (" | ratio |" if len(codes) > 1 else " |"),
        "|---|" + "---|" * (len(codes) + (len(codes) > 1)),
    ]
    for nproc in map(int, args.nprocs.split(",")):
        cells = [
            f"{statistics.median(times[(n, nproc)]):.1f} ({min(times[(n, nproc)]):.1f}-{max(times[(n, nproc)]):.1f})"
            for n in codes
        ]
        if len(codes) > 1:
            pairs = [a / b for a, b in zip(times[("this checkout", nproc)], times[("baseline", nproc)])]
            cells.append(f"{statistics.median(pairs):.2f}")
        lines.append(f"| {nproc} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
