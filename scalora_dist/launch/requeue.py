"""A SLURM job's requeue rules, run by the sbatch script (scalora_dist/launch/slurm.py):

    python -m scalora_dist.launch.requeue start   CONFIG [key=value ...] --max-attempts N
    python -m scalora_dist.launch.requeue stopped CONFIG [key=value ...]

* `start`, when the job (re)starts: a requeued job (SLURM_RESTART_COUNT > 0) that has now
  started N times in a row without a newer checkpoint than at its previous start is killed
  before it can save every time (a time limit shorter than a step and a save, a preemption
  loop): it refuses to train again, with a message saying why, and the job ends (exit 1).
* `stopped`, when the training step ended with an error: if the run left its STOPPED marker
  (it stopped on SIGUSR1 / SIGTERM after writing a checkpoint, exit code EXIT_REQUEUE),
  `scontrol requeue $SLURM_JOB_ID`, so the job comes back and continues from that
  checkpoint (exit 0); otherwise it was a real failure, and nothing is requeued (exit 1).

The count lives in output.dir/requeue.json: {"step": newest checkpoint step at the last start,
"starts_without_progress": k}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from scalora_dist.config import ConfigError, load_config

STATE = "requeue.json"


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (a step-XXXXXXXX directory with its COMPLETE
    marker), from the directory names alone: no checkpoint file is read."""
    root = run_dir / "checkpoints"
    steps = (
        [
            int(d.name[len("step-") :])
            for d in root.glob("step-*")
            if d.name[len("step-") :].isdigit() and (d / "COMPLETE").is_file()
        ]
        if root.is_dir()
        else []
    )
    return max(steps, default=0)


def check_start(run_dir: Path, restart_count: int, max_attempts: int) -> tuple[bool, str]:
    """(may train?, why); updates run_dir/requeue.json."""
    step = newest_step(run_dir)
    path = run_dir / STATE
    if restart_count == 0 or not path.is_file():
        state = {"step": step, "starts_without_progress": 0}
    else:
        state = json.loads(path.read_text())
        state["starts_without_progress"] = 0 if step > state["step"] else state["starts_without_progress"] + 1
        state["step"] = step
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state) + "\n")
    if state["starts_without_progress"] >= max_attempts:
        return False, (
            f"not training again: this job has been requeued {state['starts_without_progress']} times in a "
            f"row without a new checkpoint (newest: step {step}), so it is killed before it can save; give it "
            "more time (--time), an earlier warning (--signal-margin), or save more often "
            "(train.save_every, train.save_every_minutes)"
        )
    return True, f"start {restart_count} of this job; newest checkpoint: step {step}"


def requeue(job: str | None) -> tuple[bool, str]:
    if not job:
        return False, "not under SLURM (no SLURM_JOB_ID): nothing to requeue"
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode:
        return False, f"scontrol requeue {job} failed: {proc.stderr.strip()}"
    return True, f"requeued job {job}: it continues from its newest checkpoint"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stopped"])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--max-attempts", type=int, default=3)
    args = p.parse_args(argv)
    try:
        run_dir = Path(load_config(args.config, args.overrides).output.dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.action == "start":
        ok, why = check_start(run_dir, int(os.environ.get("SLURM_RESTART_COUNT") or 0), args.max_attempts)
    elif not (run_dir / "STOPPED").is_file():
        return 1  # the run failed: its error is in the log already
    else:
        print(
            f"job {os.environ.get('SLURM_JOB_ID')} stopped after a checkpoint: "
            f"{(run_dir / 'STOPPED').read_text().strip()}",
            flush=True,
        )
        ok, why = requeue(os.environ.get("SLURM_JOB_ID"))
    print(why if ok else f"error: {why}", file=sys.stdout if ok else sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
