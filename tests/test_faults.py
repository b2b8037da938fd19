"""Faults a user meets, through the real CLI: a damaged checkpoint, a full disk, Ctrl-C, a
rank that stops answering, and the bad inputs that are easy to make. Each gets one line
that names what is wrong (no traceback), and nothing that was complete is lost.

docs/faults.md tables every fault with what the user sees, what is kept, and its test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_weights, logged_losses, merged_weights
from test_rundir import REPO, SHORT, cli, train

TRAIN = ["train.save_every=2", "train.keep_last=3"]


def _one_error_line(proc, *words: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def six_steps(tiny_llama, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at 2, 4 and 6: the reference."""
    out = tmp_path_factory.mktemp("faults") / "ref"
    proc = train(tiny_llama, out, *TRAIN, steps=6)
    assert proc.returncode == 0, proc.stderr
    return out


# -- a damaged checkpoint ------------------------------------------------------------------


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_in_one_line_and_auto_falls_back(six_steps, tiny_llama, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(six_steps, run)
    newest = run / "checkpoints/step-00000006"
    shard = next(newest.glob("__0_*.distcp"))
    shard.write_bytes(os.urandom(1000))  # what the issue did: 1,000 random bytes over a shard

    latest = train(tiny_llama, run, *TRAIN, "--resume", "latest", "--extend", steps=8)
    assert latest.returncode == 2
    _one_error_line(latest, str(newest), shard.name, "1,000 bytes", "--resume auto")
    exported = cli("export", newest, "--out", tmp_path / "export")
    assert exported.returncode == 2
    _one_error_line(exported, shard.name)

    # same size, other bytes: the sizes agree, the checksum does not
    step4 = run / "checkpoints/step-00000004"
    app = step4 / "app_state.json"
    app.write_text(app.read_text().replace('"step": 4', '"step": 5'))
    assert len(app.read_bytes()) == json.loads((step4 / "COMPLETE").read_text())["files"]["app_state.json"]["size"]
    by_path = train(tiny_llama, run, *TRAIN, "--resume", str(step4), steps=6)
    assert by_path.returncode == 2
    _one_error_line(by_path, "app_state.json does not match its checksum")

    auto = train(tiny_llama, run, *TRAIN, "--resume", "auto", steps=6)
    assert auto.returncode == 0, auto.stderr[-3000:]
    skipped = [line for line in auto.stderr.splitlines() if "skipping" in line]
    assert len(skipped) == 2 and "step-00000006" in skipped[0] and "step-00000004" in skipped[1], auto.stderr
    # it continued from step 2, which verifies, and ends with the uninterrupted run's model
    assert_same_weights(merged_weights(run), merged_weights(six_steps), tol=1e-6)


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, six_steps):
    """An 8 MiB tmpfs with room left for one and a half of the reference run's checkpoints:
    a ballast file, which a test can remove, takes the rest."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    checkpoint = sum(f.stat().st_size for f in (six_steps / "checkpoints/step-00000002").iterdir())
    (mount / "ballast").write_bytes(b"\0" * (shutil.disk_usage(mount).free - int(1.5 * checkpoint)))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_a_resume_continues_exactly(six_steps, tiny_llama, small_disk):
    run = small_disk / "run"
    full = train(tiny_llama, run, *TRAIN, "train.keep_last=2", steps=6)
    assert full.returncode == 2, full.stderr[-3000:]
    line = _one_error_line(
        full,
        "out of disk space",
        str(run / "checkpoints"),
        "needs about",
        str(run / "checkpoints/step-00000002"),
        "--resume latest",
    )
    assert "warning" in full.stderr.lower() and "free" in full.stderr and "room for two" in full.stderr, full.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"], line  # no partial save left
    assert max(logged_losses(run)) >= 4  # the logs up to the failed save are kept

    (small_disk / "ballast").unlink()  # the user frees space
    resumed = train(tiny_llama, run, *TRAIN, "train.keep_last=2", "--resume", "latest", steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(run) == logged_losses(six_steps)
    assert_same_weights(merged_weights(run), merged_weights(six_steps), tol=1e-6)


# -- stop requests outside a training step -------------------------------------------------


def _popen(model, out, *extra, nproc=1):
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [
        sys.executable,
        "-m",
        "scalora_dist.cli",
        "train",
        "configs/quickstart.yaml",
        "--quiet",
        f"model.path={model}",
        f"output.dir={out}",
        f"train.micro_batch_size={4 // nproc}",
        *SHORT,
        *extra,
        *launch,
    ]
    log = (out.parent / f"{out.name}.log").open("w")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=log,
        stderr=log,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    proc.log = out.parent / f"{out.name}.log"
    return proc


def _wait(proc, ready, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, proc.log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stop_asked_for_during_setup_or_an_evaluation_is_not_lost(tiny_llama, tmp_path):
    from scalora_dist.run.stopping import EXIT_REQUEUE

    # during setup: the request is kept until setup ends, and nothing has been trained
    early = _popen(tiny_llama, tmp_path / "early", "train.max_steps=50")
    time.sleep(0.5)  # the process is importing
    early.send_signal(signal.SIGUSR1)
    assert early.wait(timeout=120) == EXIT_REQUEUE, early.log.read_text()[-3000:]
    assert json.loads((tmp_path / "early/STOPPED").read_text())["step"] == 0
    metrics = tmp_path / "early/metrics.jsonl"
    assert not metrics.is_file() or not metrics.read_text().strip()

    # during an evaluation long enough to matter (3,000 held-out examples one at a time): it
    # stops between two of its batches, saves the step it follows, and records no half evaluation
    run = tmp_path / "eval"
    slow_eval = [
        "train.eval_every=2",
        "data.eval_files=[configs/data/quickstart_train.jsonl]",
        "train.eval_batches=0",
        "train.max_steps=50",
    ]
    proc = _popen(tiny_llama, run, *slow_eval)
    _wait(proc, lambda: (run / "metrics.jsonl").is_file() and '"step": 2' in (run / "metrics.jsonl").read_text())
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_REQUEUE, proc.log.read_text()[-3000:]
    took = time.monotonic() - asked
    assert json.loads((run / "STOPPED").read_text())["step"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (run / "eval.jsonl").is_file() or not (run / "eval.jsonl").read_text().strip()
    print(f"stopped {took:.1f} s into an evaluation")


# -- a rank that stops answering -----------------------------------------------------------


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_within_the_collective_timeout(tiny_llama, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "scalora_dist.cli",
        "train",
        "configs/quickstart.yaml",
        "--quiet",
        f"model.path={tiny_llama}",
        f"output.dir={run}",
        "train.micro_batch_size=2",
        *SHORT,
        "train.max_steps=100000",
        "train.save_every=2",
        "train.collective_timeout_s=5",
        "--nproc-per-node",
        "2",
    ]
    log = (tmp_path / "job.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints/step-00000002/COMPLETE").is_file():
            assert launcher.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        frozen = _rank_pids(launcher.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = launcher.wait(timeout=120)
        took = time.monotonic() - stopped_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    text = (tmp_path / "job.log").read_text()
    assert code == 1, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and "rank 1 stopped answering" in errors[0] and "step" in errors[0], text[-3000:]
    assert "train.collective_timeout_s" in errors[0] and "last complete checkpoint is" in errors[0]
    assert took < 60, f"the job took {took:.0f} s to end"
    complete = sorted(p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    from scalora_dist.run.checkpoint import verify_checkpoint

    verify_checkpoint(complete[-1])  # the last complete checkpoint is whole
    print(f"a frozen rank ended the job in {took:.0f} s: {errors[0]}")


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the workers below a launcher (the processes whose environment has RANK)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    ranks, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            env = dict(
                v.split("=", 1)
                for v in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in v
            )
        except OSError:
            continue
        if "RANK" in env and "LOCAL_RANK" in env and pid != launcher_pid:
            ranks.setdefault(int(env["RANK"]), pid)
    return ranks


# -- bad inputs ----------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_inputs_are_one_line_with_exit_code_2(tiny_llama, tmp_path, write_jsonl):
    # a sharded model whose index names a shard that is missing: found before any worker starts
    sharded = tmp_path / "sharded"
    made = cli("make-tiny-model", sharded, "--max-shard-size", "200KB")
    assert made.returncode == 0, made.stderr
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (sharded / gone).unlink()
    proc = train(sharded, tmp_path / "a", nproc=2)
    assert proc.returncode == 2 and "launching" not in proc.stderr
    _one_error_line(proc, "model.safetensors.index.json", gone)

    # data.format chat with a tokenizer that has no chat template
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    for name in ("tokenizer_config.json",):
        config = json.loads((plain / name).read_text())
        config.pop("chat_template", None)
        (plain / name).write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    chats = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 8,
    )
    proc = train(plain, tmp_path / "b", "data.format=chat", f"data.train_files=[{chats}]", "data.packing=false")
    assert proc.returncode == 2
    _one_error_line(proc, "chat template")

    # an output.dir on a read-only filesystem
    if os.geteuid() == 0:
        readonly = tmp_path / "ro"
        readonly.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode == 0:
            try:
                proc = train(tiny_llama, readonly / "run")
                assert proc.returncode == 2
                _one_error_line(proc, "output.dir", str(readonly / "run"))
            finally:
                subprocess.run(["umount", "-l", str(readonly)])

    # examples longer than data.max_length without packing: counted in the log (and in the run's
    # first line, which --quiet leaves out) and in the first metrics record
    run = tmp_path / "long"
    proc = train(tiny_llama, run, "data.packing=false")
    assert proc.returncode == 0, proc.stderr
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["truncated_examples"] > 0
    assert (
        f"{first['truncated_examples']} of 3000 examples are longer than data.max_length=32 and were truncated"
        in proc.stderr
    )
