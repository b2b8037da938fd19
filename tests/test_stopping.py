"""Stopping on a signal without losing work, on one node: torchrun jobs started by the CLI
get SIGUSR1 or SIGTERM (what SLURM sends before a time limit or on preemption), every rank
finishes its step, one checkpoint is written, the launcher exits with EXIT_REQUEUE, and
`--resume auto` ends with the uninterrupted run's model. Also: a signal in the middle of a
save, wall-clock saves, and the requeue rules of the sbatch script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_weights, merged_weights

from scalora_dist.run.stopping import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "data.eval_files=[]",
    "train.eval_every=0",
    "data.max_length=32",
    "adapter.rank=2",
    "adapter.alpha=4",
    "adapter.scalora.warmup_steps=2",
    "train.max_steps=30",
    "train.micro_batch_size=2",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.keep_last=0",
]


def _env(extra=None):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(extra or {})}


def _cmd(model, out, *extra, nproc=2):
    cmd = [
        sys.executable,
        "-m",
        "scalora_dist.cli",
        "train",
        "configs/quickstart.yaml",
        "--quiet",
        f"model.path={model}",
        f"output.dir={out}",
        *RUN,
        *extra,
    ]
    return cmd + (["--nproc-per-node", str(nproc)] if nproc > 1 else [])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("stop") / "ref"
    proc = subprocess.run(_cmd(tiny_llama, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return merged_weights(out)


def _interrupt(tiny_llama, out, sig, *extra, after="step-00000004", env=None):
    """Start a 2-process job, send `sig` to the launcher once `after` exists, return it."""
    err = (out.parent / f"{out.name}.err").open("w")
    proc = subprocess.Popen(_cmd(tiny_llama, out, *extra), cwd=REPO, env=_env(env), stdout=err, stderr=err)
    try:
        _wait_for(out / "checkpoints" / after if "/" not in after else out / after, proc)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    return code, (out.parent / f"{out.name}.err").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_a_signal_stops_every_rank_after_one_checkpoint_and_resume_finishes_the_run(
    sig, tiny_llama, uninterrupted, tmp_path
):
    """SIGUSR1 (a time-limit warning) or a first Ctrl-C to the launcher (SIGTERM, preemption,
    takes the same path: one-process runs test it below); the resumed run is checked once,
    for SIGUSR1 (the stop is the same)."""
    out = tmp_path / "run"
    code, log = _interrupt(tiny_llama, out, sig, "train.save_every=4")
    assert code == EXIT_REQUEUE, log[-3000:]
    marker = json.loads((out / "STOPPED").read_text())
    assert marker["signal"] == "SIGUSR1" and 4 <= marker["step"] < 30  # the launcher passes either on as SIGUSR1
    stop = f"step-{marker['step']:08d}"
    assert stop in _checkpoints(out) and (out / "checkpoints" / stop / "COMPLETE").is_file()
    assert json.loads((out / "checkpoints" / stop / "COMPLETE").read_text())["world_size"] == 2
    assert not (out / "merged").exists()  # a stopped run exports nothing
    assert "Traceback" not in log
    if sig != signal.SIGUSR1:
        return
    resumed = subprocess.run(
        _cmd(tiny_llama, out, "train.save_every=4", "--resume", "auto"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "STOPPED").exists()
    assert_same_weights(uninterrupted, merged_weights(out))


@pytest.mark.slow
def test_a_signal_during_a_save_leaves_every_checkpoint_whole(tiny_llama, tmp_path):
    """The signal comes while step 8's checkpoint is being written (each save made slow):
    that save completes, the run stops at the next step boundary with one more checkpoint,
    and the earlier ones are intact (each loads; resuming from one is the test above)."""
    out = tmp_path / "run"
    saving = out / "checkpoints" / ".tmp-step-00000008"
    code, log = _interrupt(
        tiny_llama,
        out,
        signal.SIGUSR1,
        "train.save_every=4",
        after="checkpoints/.tmp-step-00000008",
        env={"SCALORA_DIST_SLOW_SAVE": "2"},
    )
    assert code == EXIT_REQUEUE, log[-3000:]
    assert not saving.exists()
    names = _checkpoints(out)
    assert names == ["step-00000004", "step-00000008", "step-00000009"], names
    assert all((out / "checkpoints" / n / "COMPLETE").is_file() for n in names)
    from scalora_dist.run.checkpoint import read_app_state

    assert [read_app_state(out / "checkpoints" / n)["step"] for n in names] == [4, 8, 9]


@pytest.mark.slow
def test_one_process_runs_stop_the_same_way(tiny_llama, tmp_path):
    out = tmp_path / "one"
    err = (tmp_path / "one.err").open("w")
    proc = subprocess.Popen(
        _cmd(tiny_llama, out, "train.micro_batch_size=4", "train.max_steps=1000", nproc=1),
        cwd=REPO,
        env=_env(),
        stdout=err,
        stderr=err,
    )
    _wait_for(out / "metrics.jsonl", proc)
    while len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_REQUEUE
    err.close()
    step = json.loads((out / "STOPPED").read_text())["step"]
    assert _checkpoints(out) == [f"step-{step:08d}"]


@pytest.mark.slow
def test_save_every_minutes_writes_checkpoints_on_the_clock_on_every_rank(tiny_llama, tmp_path):
    out = tmp_path / "clock"
    proc = subprocess.run(
        _cmd(tiny_llama, out, "train.save_every_minutes=0.01", "train.max_steps=40", "train.keep_last=3"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saves = proc.stderr.count("INFO scalora_dist.run.checkpoint: saving checkpoint")
    assert saves >= 3, proc.stderr[-3000:]  # the clock's, besides the final one
    names = _checkpoints(out)
    assert len(names) == 3 and names[-1] == "step-00000040", names
    saved = [json.loads((out / "checkpoints" / n / "COMPLETE").read_text()) for n in names]
    assert all(m["world_size"] == 2 for m in saved)  # every rank took part in each save
    times = [m["saved_at"] for m in saved]
    assert all(b - a >= 0.6 for a, b in zip(times, times[1:-1]))  # 0.01 minutes apart at least


def test_requeue_rules(tmp_path):
    """The sbatch script's rules: a requeued job that keeps starting without a newer
    checkpoint stops after --max-attempts starts; progress resets the count."""
    from scalora_dist.launch.requeue import check_start

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)

    def checkpoint(step):
        d = run / "checkpoints" / f"step-{step:08d}"
        d.mkdir()
        (d / "app_state.json").write_text(json.dumps({"step": step, "config": {}}))
        (d / ".metadata").write_text("")
        (d / "COMPLETE").write_text(json.dumps({"step": step}))

    assert check_start(run, 0, 2)[0]  # a fresh submission
    checkpoint(10)
    assert check_start(run, 1, 2)[0]  # requeued with progress
    assert check_start(run, 2, 2)[0]  # one start without progress
    ok, why = check_start(run, 3, 2)  # two in a row: killed before it can save
    assert not ok and "requeued 2 times in a row without a new checkpoint (newest: step 10)" in why
    checkpoint(12)
    assert check_start(run, 4, 2)[0]
    assert json.loads((run / "requeue.json").read_text()) == {"step": 12, "starts_without_progress": 0}
