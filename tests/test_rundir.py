"""A run never damages a run directory, errors are found once before launch, and the output
reads well in a pipe: each finding of the first-hour review, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "train.eval_every=0",
    "data.eval_files=[]",
    "data.max_length=32",
    "adapter.rank=2",
    "adapter.alpha=4",
    "adapter.scalora.warmup_steps=1",
    "train.warmup_steps=0",
    "train.log_every=1",
]


def cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "scalora_dist.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def train(model, out, *extra, steps=2, nproc=1, env=None):
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    return cli(
        "train",
        "configs/quickstart.yaml",
        "--quiet",
        f"model.path={model}",
        f"output.dir={out}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={4 // nproc}",
        *SHORT,
        *extra,
        *launch,
        env=env,
    )


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file below run_dir."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """A finished 2-step run to start over, resume and damage."""
    out = tmp_path_factory.mktemp("hygiene") / "run"
    proc = train(tiny_llama, out)
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def test_a_fresh_start_into_a_run_is_refused_and_changes_nothing(finished, tiny_llama, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = snapshot(run)
    proc = train(tiny_llama, run)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert snapshot(run) == before
    # a start that fails later (a misspelt model) leaves the old run as it was, too
    proc = train(tmp_path / "tiny-lama", run, "--overwrite")
    assert proc.returncode == 2 and str(tmp_path / "tiny-lama") in proc.stderr
    assert snapshot(run) == before


def test_overwrite_starts_over_and_no_stale_checkpoint_survives(finished, tiny_llama, tmp_path):
    run = _copy(finished, tmp_path / "run")
    stale = run / "checkpoints/step-00000300"
    _copy(run / "checkpoints/step-00000002", stale)  # as if an old, longer run had left it
    assert train(tiny_llama, run, "--overwrite", steps=1).returncode == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_checks_the_checkpoint_and_what_is_left_to_do(finished, tiny_llama, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = snapshot(run)
    nothing = train(tiny_llama, run, "--resume", "latest")
    assert nothing.returncode == 0 and "nothing to do" in nothing.stdout and "nothing was changed" in nothing.stdout
    assert snapshot(run) == before
    foreign = train(tiny_llama, run, "--resume", "latest", "adapter.rank=8", "train.lr=1e-3")
    assert foreign.returncode == 2
    assert "adapter.rank: 2 -> 8" in foreign.stderr and "train.lr: 0.003 -> 0.001" in foreign.stderr
    assert snapshot(run) == before
    longer = train(tiny_llama, run, "--resume", "latest", steps=4)
    assert longer.returncode == 2 and "--extend" in longer.stderr and "2-step schedule" in longer.stderr
    extended = train(tiny_llama, run, "--resume", "latest", "--extend", steps=4)
    assert extended.returncode == 0, extended.stderr
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # the schedule is the 4-step one from step 2 on: cosine with no warm-up, peak 3e-3
    import math

    assert records[2]["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-6)
    forced = train(tiny_llama, run, "--resume", "latest", "--force-resume", "train.lr=1e-3", "--extend", steps=5)
    assert forced.returncode == 0, forced.stderr


@pytest.mark.slow
def test_errors_before_launch_are_one_message_with_exit_code_2(tiny_llama, tmp_path, write_jsonl):
    cases = {
        "world size": (train(tiny_llama, tmp_path / "a", nproc=3), "do not divide by 3"),
        "model path": (train(tmp_path / "nowhere", tmp_path / "b", nproc=2), str(tmp_path / "nowhere")),
        "data": (
            train(
                tiny_llama,
                tmp_path / "c",
                f"data.train_files=[{write_jsonl(tmp_path / 'bad.jsonl', [{'text': 'ok'}, {'txt': 'x'}])}]",
                nproc=2,
            ),
            "bad.jsonl:2: missing field 'text'",
        ),
        "output.dir is a file": (train(tiny_llama, "/etc/hostname"), "/etc/hostname is a file"),
        "output.dir cannot be made": (train(tiny_llama, "/proc/scalora/x"), "cannot create /proc/scalora/x"),
    }
    for name, (proc, expected) in cases.items():
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert proc.stderr.count("error:") == 1 and expected in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, name
        assert "launching" not in proc.stderr, f"{name}: nothing may start"


def test_piped_output_is_one_plain_flushed_line_per_logged_step(tiny_llama, tmp_path):
    proc = cli(
        "train",
        "configs/quickstart.yaml",
        f"model.path={tiny_llama}",
        f"output.dir={tmp_path / 'p'}",
        "train.max_steps=4",
        *SHORT[:-1],
        "train.log_every=2",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["2/4", "4/4"]
    assert all("loss" in l and "tok/s" in l and "labelled" in l for l in steps)
    assert "eta" in steps[0] and "\x1b[" not in proc.stdout  # no terminal control codes in a log
    assert "CPU thread(s)" in lines[0]


def test_threads_honour_omp_num_threads_and_leave_busy_cores_alone(monkeypatch):
    import torch

    from scalora_dist.distributed import choose_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert choose_threads()[0] == 3 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        import multiprocessing as mp

        from scalora_dist import distributed

        cpus = len(os.sched_getaffinity(0))
        idle = choose_threads()[0]
        spinners = [mp.Process(target=_spin, args=(time.time() + 5,), daemon=True) for _ in range(cpus)]
        for p in spinners:
            p.start()
        time.sleep(0.5)
        try:
            busy, why = choose_threads(sample_s=0.5)
        finally:
            for p in spinners:
                p.terminate()
        assert busy == 1 and f"{cpus} CPUs" in why  # every CPU spinning: one thread
        assert 1 <= idle <= cpus
        # without /proc/stat, the load average decides
        monkeypatch.setattr(distributed, "_busy_cpus", lambda sample_s: None)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
        assert choose_threads()[0] == cpus
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert choose_threads()[0] == 1
    finally:
        torch.set_num_threads(before)


def _spin(until: float) -> None:
    while time.time() < until:
        pass


def test_help_version_and_config_keys():
    help_text = cli("train", "--help", env={"COLUMNS": "200"}).stdout
    assert "Relative paths are taken from the working directory. Writes to" not in help_text
    assert "lists every key with its type, meaning and default;" in help_text  # one line: reflowed
    from scalora_dist import __version__

    assert cli("--version").stdout.strip() == f"scalora-dist {__version__}"
    keys = cli("config", "keys", env={"COLUMNS": "300"}).stdout
    row = next(l for l in keys.splitlines() if "data.format" in l)
    assert "one of text | instruction | alpaca | chat | sharegpt" in row
    assert "list of str or {path, split, name, revision}" in next(
        l for l in keys.splitlines() if "data.train_files" in l
    )
    assert "docs/method.md" in keys
