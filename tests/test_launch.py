"""The torchrun launcher: command lines, `train --nproc-per-node` end to end on real
processes, Ctrl-C, and a failing rank ending the whole job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scalora_dist.cli import app
from scalora_dist.launch.torchrun import (
    JOB_ID_VARIABLES,
    LaunchError,
    LaunchOptions,
    _descendants,
    torchrun_args,
    torchrun_command,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TORCHRUN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _env() -> dict[str, str]:
    """A launcher's environment: one thread per worker (2 shared cores), and no torchrun
    variables, in case the tests themselves run under torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at 80 columns


def _train_overrides(model_dir: Path, out_dir: Path, steps: int) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"output.dir={out_dir}",
        f"train.max_steps={steps}",
        "data.max_length=64",
        "train.micro_batch_size=2",
        "data.eval_files=[]",
        "train.eval_every=0",
        "train.log_every=1",
        "output.save_merged=false",
    ]


# -- command lines -------------------------------------------------------------------------


def test_torchrun_command_single_node():
    cmd = torchrun_command(Path("c.yaml"), ["train.lr=1e-3"], LaunchOptions(nproc_per_node=4), ["--quiet"])
    assert cmd == [
        *TORCHRUN,
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "--standalone",
        "--max-restarts",
        "0",
        "-m",
        "scalora_dist.cli",
        "train",
        "c.yaml",
        "train.lr=1e-3",
        "--quiet",
    ]
    assert LaunchOptions(nproc_per_node=4).needs_torchrun()
    assert not LaunchOptions().needs_torchrun()
    # A fixed port instead of --standalone's free one.
    assert torchrun_args(LaunchOptions(nproc_per_node=2, master_port=29511))[-6:] == [
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "29511",
        "--max-restarts",
        "0",
    ]


def test_torchrun_command_multi_node(monkeypatch):
    opts = LaunchOptions(
        nproc_per_node=8, nnodes="2", node_rank=1, rdzv_endpoint="host:29500", rdzv_id="job7", max_restarts=3
    )
    assert opts.needs_torchrun()
    assert torchrun_command(Path("c.yaml"), [], opts, []) == [
        *TORCHRUN,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "host:29500",
        "--rdzv-id",
        "job7",
        "--node-rank",
        "1",
        "--max-restarts",
        "3",
        "-m",
        "scalora_dist.cli",
        "train",
        "c.yaml",
    ]
    # Elastic range, no node rank, no job id: every node running the same command gets the
    # same id (from the scheduler's job id when there is one).
    elastic = LaunchOptions(nnodes="1:4", rdzv_endpoint="host:29500")
    assert elastic.needs_torchrun()

    def rdzv_id(overrides):
        cmd = torchrun_command(Path("c.yaml"), overrides, elastic, [])
        assert "--node-rank" not in cmd and "--standalone" not in cmd
        return cmd[cmd.index("--rdzv-id") + 1]

    for name in JOB_ID_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert rdzv_id(["train.lr=1e-3"]) == rdzv_id(["train.lr=1e-3"]) != rdzv_id(["train.lr=2e-3"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert rdzv_id(["train.lr=1e-3"]) == rdzv_id(["train.lr=2e-3"]) == "slurm_job_id-4242"


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (LaunchOptions(nnodes="2"), "--rdzv-endpoint"),
        (LaunchOptions(nnodes="1:4", nproc_per_node=2), "--rdzv-endpoint"),
        (LaunchOptions(nnodes="two", rdzv_endpoint="h:1"), "--nnodes"),
        (LaunchOptions(nnodes="4:2", rdzv_endpoint="h:1"), "--nnodes"),
        (LaunchOptions(nnodes="2", node_rank=2, rdzv_endpoint="h:1"), "--node-rank"),
        (LaunchOptions(nproc_per_node=0), "--nproc-per-node"),
        (LaunchOptions(nnodes="2", rdzv_endpoint="h:1", rdzv_backend="static"), "--node-rank"),
    ],
)
def test_invalid_launch_options_name_the_option(options, names):
    with pytest.raises(LaunchError, match=names):
        torchrun_args(options)


def test_cli_dry_run():
    runner = CliRunner(env={k: None for k in TORCHRUN_ENV})
    res = runner.invoke(app, ["train", QUICKSTART, "--nproc-per-node", "4", "--dry-run", "train.lr=1e-3"])
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [
        *TORCHRUN,
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "--standalone",
        "--max-restarts",
        "0",
        "-m",
        "scalora_dist.cli",
        "train",
        QUICKSTART,
        "train.lr=1e-3",
    ]

    res = runner.invoke(
        app,
        [
            "train",
            QUICKSTART,
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rdzv-endpoint",
            "host:29500",
            "--rdzv-id",
            "job7",
            "--dry-run",
            "--quiet",
            "--resume",
            "latest",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.split()[3:] == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "host:29500",
        "--rdzv-id",
        "job7",
        "--node-rank",
        "1",
        "--max-restarts",
        "0",
        "-m",
        "scalora_dist.cli",
        "train",
        QUICKSTART,
        "--quiet",
        "--resume",
        "latest",  # train options go on to the workers, launch ones not
    ]

    for args in ([], ["--nproc-per-node", "1", "--nnodes", "1"]):
        res = runner.invoke(app, ["train", QUICKSTART, *args, "--dry-run"])
        assert (res.exit_code, res.stdout) == (0, "in-process\n")


def test_cli_errors_before_launch():
    runner = CliRunner(env={k: None for k in TORCHRUN_ENV})
    res = runner.invoke(app, ["train", QUICKSTART, "--nnodes", "2", "--nproc-per-node", "2"])
    assert res.exit_code == 2
    assert "error: --rdzv-endpoint: required with --nnodes 2" in _flat(res.stderr)
    # A config error shows once, from the launcher; no worker is started.
    res = runner.invoke(app, ["train", QUICKSTART, "--nproc-per-node", "2", "train.nope=1"])
    assert res.exit_code == 2
    assert res.stderr.count("error:") == 1 and "train.nope" in res.stderr
    assert "launching" not in res.stderr


def test_cli_inside_torchrun_never_relaunches():
    """A worker (torchrun's variables set) trains in-process whatever launch options it gets."""
    runner = CliRunner(env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    res = runner.invoke(app, ["train", QUICKSTART, "--nproc-per-node", "2", "--nnodes", "2", "--dry-run"])
    assert (res.exit_code, res.stdout) == (0, "in-process\n")
    res = runner.invoke(app, ["train", QUICKSTART, "--nproc-per-node", "2", "train.nope=1"])
    assert res.exit_code == 2
    assert _flat(res.stderr).startswith("[rank1] error: unknown key 'train.nope'")


def test_console_script_dry_run():
    res = subprocess.run(
        ["scalora-dist", "train", QUICKSTART, "--nproc-per-node", "2", "--dry-run"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert " -m torch.distributed.run --nnodes 1 --nproc-per-node 2 --standalone " in res.stdout


# -- real jobs -----------------------------------------------------------------------------


def test_two_process_train(tiny_llama, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalora_dist.cli",
            "train",
            QUICKSTART,
            "--nproc-per-node",
            "2",
            *_train_overrides(tiny_llama, out, steps=3),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "launching 2 processes on this node" in res.stderr
    # Rank 0 saw a 2-process torchrun job; only rank 0 reports.
    assert res.stdout.count("torchrun job of 2 processes") == 1, res.stdout
    assert res.stdout.count("done: 3 steps") == 1, res.stdout
    assert (out / "metrics.jsonl").is_file()
    print(f"2-process run: {time.monotonic() - started:.1f} s")


def _alive(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        return bool(_descendants_alive([pid]))
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants_alive(pids):
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _children(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        return list(_descendants(pid))
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_a_second_ctrl_c_stops_all_ranks_at_once(tiny_llama, tmp_path):
    """The first Ctrl-C asks for a checkpoint (tests/test_stopping.py); a second one, before
    it comes, stops every rank at once (exit 130, no process left)."""
    out = tmp_path / "run"
    log = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scalora_dist.cli",
            "train",
            QUICKSTART,
            "--nproc-per-node",
            "2",
            *_train_overrides(tiny_llama, out, steps=100_000),
        ],
        cwd=REPO,
        env=_env(),
        stdout=log[0],
        stderr=log[1],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            assert launcher.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        workers = _children(launcher.pid)  # torchrun and its 2 workers
        assert len(workers) >= 3, workers

        launcher.send_signal(signal.SIGINT)  # to the launcher only: it must relay it
        time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = launcher.wait(timeout=30)
        stopped_in = time.monotonic() - sent
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for f in log:
            f.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err
    assert "interrupted" in err
    time.sleep(0.5)
    assert [p for p in workers if _alive(p)] == [], "orphaned processes"
    print(f"stopped {len(workers)} processes {stopped_in:.1f} s after SIGINT")


def test_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises while rank 0 waits in a barrier: the job ends non-zero, with the error."""
    cmd = [*torchrun_args(LaunchOptions(nproc_per_node=2)), str(REPO / "tests/workers/launch_worker_fail.py")]
    started = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from scalora_dist.launch.torchrun import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))",
            *cmd,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    took = time.monotonic() - started
    output = res.stdout + res.stderr
    assert res.returncode != 0, output
    assert "rank 1 fails on purpose" in output
    assert "rank 0 waiting in barrier" in output
    assert "passed the barrier" not in output
    assert took < 60
    print(f"failing job ended in {took:.1f} s")


def test_a_killed_rank_is_reported_not_the_rank_that_lost_it(tmp_path):
    """Rank 1 is SIGKILLed (as by the out-of-memory killer) and records nothing; rank 0 then
    fails in its collective and records gloo's lost-peer error. The job's one error line names
    rank 1 and its signal, and the exit code is 128 + 9."""
    cmd = [*torchrun_args(LaunchOptions(nproc_per_node=2)), str(REPO / "tests/workers/launch_worker_killed.py")]
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from scalora_dist.launch.torchrun import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))",
            *cmd,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    errors = [line for line in res.stderr.splitlines() if " error: " in line]
    assert errors == [
        "[rank1] error: killed by signal SIGKILL (sent from outside the process, most "
        "often by the kernel's out-of-memory killer: see dmesg)"
    ], res.stderr
    assert res.returncode == 128 + signal.SIGKILL


def test_the_reported_failure_is_the_cause(tmp_path, monkeypatch):
    """Of several failed ranks (each a torchrun ProcessFailure read from its error file), the
    report names a rank's own error first, then a rank killed by a signal, and an error that
    only says a peer went away last; among equals the earliest."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from scalora_dist.launch.agent import ERROR_FILE_ENV, first_failure, record_worker_error

    def failed(rank: int, exitcode: int, message: str | None = None) -> ProcessFailure:
        path = tmp_path / f"error-{len(list(tmp_path.iterdir()))}.json"  # a fresh file each time
        if message is not None:
            monkeypatch.setenv(ERROR_FILE_ENV, str(path))
            assert record_worker_error(message, exitcode)
            time.sleep(0.01)  # the errors' order in time is the order they are written
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))

    lost = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:24767: Connection reset by peer"
    assert first_failure({0: failed(0, 1, lost), 1: failed(1, -9)}) == (
        1,
        "killed by signal SIGKILL (sent from outside the process, most often by the "
        "kernel's out-of-memory killer: see dmesg)",
        137,
    )
    assert first_failure({0: failed(0, 1, lost), 1: failed(1, -11), 2: failed(2, 2, "unknown key 'train.nope'")}) == (
        2,
        "unknown key 'train.nope'",
        2,
    )
    assert first_failure({3: failed(3, 1, "RuntimeError: first"), 2: failed(2, 1, "RuntimeError: second")}) == (
        3,
        "RuntimeError: first",
        1,
    )
    assert first_failure({1: failed(1, 1, lost)}) == (1, lost, 1)
    assert first_failure({0: failed(0, 3)}) == (0, "exited with code 3", 3)


def test_workers_ignoring_signals_are_killed(tmp_path):
    """Ranks that ignore every signal but SIGKILL (stuck in native code, say): the first
    Ctrl-C's stop request goes unanswered, and after a second one they are SIGKILLed once the
    launcher's grace period is over: the launcher never leaves them behind."""
    cmd = [*torchrun_args(LaunchOptions(nproc_per_node=2)), str(REPO / "tests/workers/launch_worker_stubborn.py")]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from scalora_dist.launch.torchrun import run_torchrun; "
                "sys.exit(run_torchrun(sys.argv[1:], escalate_after_s=2))",
                *cmd,
            ],
            cwd=REPO,
            env=_env(),
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while err_path.read_text().count("stubborn worker ready") < 2:
                assert launcher.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, "workers did not start"
                time.sleep(0.2)
            workers = _children(launcher.pid)
            assert len(workers) >= 3, workers
            launcher.send_signal(signal.SIGINT)
            time.sleep(1)
            assert launcher.poll() is None  # the first asks for a checkpoint: it waits for the workers
            launcher.send_signal(signal.SIGINT)
            code = launcher.wait(timeout=30)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    assert code == 130
    time.sleep(0.5)
    assert [p for p in workers if _alive(p)] == [], "orphaned processes"
