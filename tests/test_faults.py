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
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
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
    line = _one_error_line(full, "out of disk space", str(run / "checkpoints"), "needs about",
                           str(run / "checkpoints/step-00000002"), "--resume latest")
    assert "warning" in full.stderr.lower() and "free" in full.stderr and "room for two" in full.stderr, full.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"], line  # no partial save left
    assert max(logged_losses(run)) >= 4  # the logs up to the failed save are kept

    (small_disk / "ballast").unlink()  # the user frees space
    resumed = train(tiny_llama, run, *TRAIN, "train.keep_last=2", "--resume", "latest", steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(run) == logged_losses(six_steps)
    assert_same_weights(merged_weights(run), merged_weights(six_steps), tol=1e-6)
