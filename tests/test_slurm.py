"""SLURM launching: the job-script template, the `slurm` command, and real jobs on a
throwaway SLURM cluster (tests/workers/slurm_cluster.py: one controller and two slurmd nodes, each
node in its own network namespace) running 2 nodes x 2 CPU processes (gloo).

The cluster tests need root and Debian's slurm-wlm/munge (.ci/run installs them as root);
they skip with the reason otherwise. Tolerance as in test_distributed.py (2e-5 per tensor).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scalora_dist.launch.slurm import SbatchOptions, SlurmError, example_files, parse_job_id, render_sbatch

REPO = Path(__file__).resolve().parents[1]
TOL = 2e-5
#: The tiny run: 8 steps, global batch 4 (micro-batch 1 x 4 ranks), a checkpoint every 2 steps.
TINY = [
    "data.eval_files=[]",
    "train.eval_every=0",
    "data.max_length=32",
    "adapter.rank=2",
    "adapter.alpha=4",
    "adapter.scalora.warmup_steps=2",
    "train.max_steps=8",
    "train.micro_batch_size=1",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.save_every=2",
    "train.keep_last=4",
]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------
# Template and command (no cluster needed)


def test_launch_folder_equals_the_rendered_template():
    for name, text in example_files().items():
        path = REPO / "launch" / name
        assert path.is_file(), f"launch/{name} missing: python -m scalora_dist.launch.slurm --write-examples launch/"
        assert path.read_text() == text, (
            f"launch/{name} differs from the template: python -m scalora_dist.launch.slurm --write-examples launch/"
        )
        assert os.access(path, os.X_OK)


def test_rendered_script_has_what_a_slurm_user_expects():
    script = render_sbatch(
        SbatchOptions(
            nodes=4,
            gpus_per_node=8,
            partition="gpu",
            time="02:00:00",
            account="proj",
            mem="200G",
            cpus_per_task=32,
            max_restarts=2,
            config="/abs/c.yaml",
            overrides=["train.lr=1e-4", "a.b=[x, y]"],
            output="/runs/x/slurm-%j.out",
            chdir="/proj",
        )
    )
    sbatch = [l for l in script.splitlines() if l.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=scalora",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --mem=200G",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --chdir=/proj",
        "#SBATCH --output=/runs/x/slurm-%j.out",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@300",
    ]
    assert not any("$" in l for l in sbatch)  # sbatch does not expand variables there
    first_command = next(i for i, l in enumerate(script.splitlines()) if l and not l.startswith("#"))
    assert all(i < first_command for i, l in enumerate(script.splitlines()) if l.startswith("#SBATCH"))
    assert "set -euo pipefail" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
    assert "--ntasks-per-node=1" in script.split("\nsrun ", 1)[1]
    for part in (
        '--nnodes "$SLURM_NNODES"',
        '--rdzv-id "$SLURM_JOB_ID"',
        "--resume auto",
        '--rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT"',
        '--max-restarts "$MAX_RESTARTS"',
        "MAX_RESTARTS=2",
        "join_timeout=1800",
        "load_split",
    ):
        assert part in script, part
    assert "OVERRIDES=(train.lr=1e-4 'a.b=[x, y]' \"$@\")" in script
    assert script.index("load_split") < script.index("\nsrun ")  # pre-tokenise before srun
    for knob in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG"):
        assert f"# export {knob}=" in script
    proc = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nodes": 0}, "--nodes"),
        ({"gpus_per_node": 0}, "--gpus-per-node"),
        ({"time": "1 hour"}, "--time"),
        ({"mem": "lots"}, "--mem"),
        ({"partition": "a b"}, "--partition"),
        ({"account": "$ACC"}, "--account"),
        ({"max_restarts": -1}, "--max-restarts"),
        ({"time": "00:03:00", "signal_margin_s": 180}, "--signal-margin"),
        ({"time": "00:03:00", "signal_margin_s": 150}, "before the training has started"),
    ],
)
def test_invalid_options_are_errors_naming_the_option(kwargs, message):
    with pytest.raises(SlurmError, match=re.escape(message)):
        render_sbatch(SbatchOptions(**kwargs))


def _cli(*args, env=None, timeout=120, prefix=()):
    return subprocess.run(
        [*prefix, sys.executable, "-m", "scalora_dist.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV, **(env or {})},
    )


def test_slurm_command_dry_run_validates_the_config_first(tmp_path):
    bad = _cli("slurm", "configs/quickstart.yaml", "train.nope=1", "--dry-run")
    assert bad.returncode == 2 and "train.nope" in bad.stderr
    bad = _cli("slurm", "configs/quickstart.yaml", "--nodes", "0", "--dry-run")
    assert bad.returncode == 2 and "--nodes" in bad.stderr
    out = tmp_path / "run"
    proc = _cli(
        "slurm",
        "configs/quickstart.yaml",
        f"output.dir={out}",
        "--nodes",
        "3",
        "--gpus-per-node",
        "4",
        "--time",
        "01:00:00",
        "--partition",
        "p1",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=3" in proc.stdout and "#SBATCH --gpus-per-node=4" in proc.stdout
    assert f"#SBATCH --output={out}/slurm-%j.out" in proc.stdout
    assert f"#SBATCH --chdir={REPO}" in proc.stdout
    assert not out.exists()  # --dry-run writes nothing
    proc = _cli("slurm", "configs/quickstart.yaml", f"output.dir={out}", "--no-submit")
    assert proc.returncode == 0, proc.stderr
    assert (out / "slurm-job.sbatch").is_file()


def test_parse_job_id():
    assert parse_job_id("Submitted batch job 42\n") == "42"
    assert parse_job_id("42;cluster\n") == "42"
    assert parse_job_id("nonsense") is None


# ---------------------------------------------------------------------------------------
# A real SLURM cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import SlurmCluster, SlurmUnavailable, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"SLURM cluster tests: {reason}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            c.start()
        except SlurmUnavailable as e:
            pytest.skip(f"SLURM cluster tests: {e}")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    """The same tiny run in one process, without SLURM: the global batch of 4 in one
    micro-batch (N ranks train the model one process trains: tests/test_distributed.py)."""
    out = tmp_path_factory.mktemp("ref1")
    proc = _cli(
        "train",
        "configs/quickstart.yaml",
        "--quiet",
        f"model.path={tiny_llama}",
        f"output.dir={out}",
        *TINY,
        "train.micro_batch_size=4",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return load_file(str(out / "merged/model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        err = ((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp(min=1e-12)).item()
        assert err < TOL, f"{k}: relative error {err:.2e}"
        worst = max(worst, err)
    print(f"same weights: worst relative error {worst:.1e}")


def _submit(cluster, out: Path, tiny_llama, *slurm_args, env=None, overrides=(), time_limit="00:05:00") -> str:
    """Generate the job script with `scalora-dist slurm` and submit it with the command
    itself (sbatch inside the controller's namespace); returns the job id."""
    prefix = cluster.client_cmd([])
    proc = _cli(
        "slurm",
        "configs/quickstart.yaml",
        f"model.path={tiny_llama}",
        f"output.dir={out}",
        *TINY,
        *overrides,
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--no-request-gpus",
        "--time",
        time_limit,
        *slurm_args,
        env={"SLURM_CONF": str(cluster.conf), **(env or {})},
        prefix=prefix,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"submitted batch job (\d+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1)


def _log(out: Path, job: str) -> str:
    path = out / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else "(no job output)"


def _needs_netns(cluster):
    if cluster.variant != "netns":
        pytest.skip("network namespaces unavailable: both nodes share one loopback (variant A)")


def _worker_pids(job: str, out: Path) -> dict[tuple[int, int], int]:
    """(group rank, local rank) -> pid of the job's training workers (found by their
    environment: TORCHELASTIC_RUN_ID is the job id, and the run's output dir is on the command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if f"output.dir={out}".encode() not in cmdline:
                continue
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"TORCHELASTIC_RUN_ID") == job.encode() and b"LOCAL_RANK" in env:
            found[(int(env[b"GROUP_RANK"]), int(env[b"LOCAL_RANK"]))] = int(entry.name)
    return found


@pytest.mark.slow
def test_two_node_job_survives_a_killed_worker_and_ends_with_the_one_process_result(
    cluster, tiny_llama, reference, tmp_path
):
    """A 2-node x 2-process job (rendezvous on the first node, the data tokenised once
    before the workers start); a worker on the second node is killed after the first
    checkpoint: torchrun restarts the whole job, which resumes and ends with the model the
    same run gives in one process."""
    out = tmp_path / "run"
    started = time.monotonic()
    # A time limit far beyond the run's length: on a loaded machine the default 5 minutes can
    # bring the time-limit warning (a requeue: a third start) before the job ends.
    job = _submit(cluster, out, tiny_llama, "--max-restarts", "1", "--job-name", "kill-one", time_limit="00:30:00")
    first = out / "checkpoints/step-00000002"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not first.is_dir():
        if cluster.state(job) not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job ended before its first checkpoint: {cluster.state(job)}\n{_log(out, job)[-4000:]}")
        time.sleep(0.2)
    assert first.is_dir(), _log(out, job)[-4000:]
    workers = _worker_pids(job, out)
    assert len(workers) == 4, workers
    victim = workers.get((1, 1)) or max(workers.values())  # a worker on the second node
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic() - started
    state = cluster.wait(job, timeout=240)
    log = _log(out, job)
    assert state == "COMPLETED", f"{state}\n{log[-6000:]}\n{cluster.logs()}"
    assert log.count("torchrun job of 4 processes") == 2, log[-6000:]  # the first start and one restart
    assert "nodes n[1-2], 2 x 2 processes, rendezvous n1:" in log or cluster.variant != "netns", log[:2000]
    assert "pre-tokenised train:" in log
    m = re.search(r"resumed from \S*/checkpoints/step-(\d+)", log)
    assert m and int(m.group(1)) >= 2, log[-6000:]
    assert "done: 8 steps" in log
    _assert_same_weights(reference, load_file(str(out / "merged/model.safetensors")))
    print(
        f"killed pid {victim} at {killed_at:.0f} s, resumed from step {int(m.group(1))}, "
        f"job done after {time.monotonic() - started:.0f} s"
    )


@pytest.mark.slow
def test_localhost_rendezvous_on_two_nodes_fails_fast_with_a_clear_error(cluster, tiny_llama, tmp_path):
    """Every node rendezvousing on its own loopback is the classic multi-node hang. The
    script refuses a loopback MASTER_ADDR at once; a loopback endpoint hidden from that
    check ends at the rendezvous join timeout with torchrun's RendezvousTimeoutError, long
    before the job's time limit."""
    _needs_netns(cluster)
    out = tmp_path / "run"
    common = [
        "configs/quickstart.yaml",
        f"model.path={tiny_llama}",
        f"output.dir={out}",
        *TINY,
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--no-request-gpus",
        "--time",
        "00:03:00",
        "--max-restarts",
        "0",
        "--dry-run",
    ]
    script = _cli("slurm", *common).stdout
    master_line = 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
    assert master_line in script
    out.mkdir(parents=True)

    # 1. MASTER_ADDR=127.0.0.1: refused by the script before anything starts.
    guarded = out / "guarded.sbatch"
    guarded.write_text(script.replace(master_line, "MASTER_ADDR=127.0.0.1"))
    started = time.monotonic()
    job = cluster.sbatch(guarded, env=ENV)
    state = cluster.wait(job, timeout=60)
    log = _log(out, job)
    assert state == "FAILED", log
    assert "error: rendezvous host '127.0.0.1' is a loopback address, but the job spans 2 nodes" in log
    guard_s = time.monotonic() - started

    # 2. The endpoint itself on localhost: each node hosts its own rendezvous and waits for a
    #    second node that never comes; the join timeout (15 s here) ends it.
    hidden = out / "hidden.sbatch"
    hidden.write_text(
        script.replace('--rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT"', '--rdzv-endpoint "localhost:$RDZV_PORT"')
    )
    started = time.monotonic()
    job = cluster.sbatch(hidden, env={**ENV, "PET_RDZV_CONF": "join_timeout=15"})
    state = cluster.wait(job, timeout=150)
    elapsed = time.monotonic() - started
    log = _log(out, job)
    assert state == "FAILED", f"{state} after {elapsed:.0f} s\n{log[-4000:]}"
    assert "RendezvousTimeoutError" in log, log[-4000:]
    assert elapsed < 120, f"took {elapsed:.0f} s"  # well before the 3-minute time limit
    assert not (out / "merged").exists()
    print(f"loopback MASTER_ADDR refused in {guard_s:.0f} s; localhost endpoint failed in {elapsed:.0f} s")


# ---------------------------------------------------------------------------------------
# Time limits and preemption: checkpoint on the signal, requeue, resume

#: A longer run for the stop-and-requeue job: 32 steps, a checkpoint every 8.
LONG = ["train.max_steps=32", "train.save_every=8", "train.keep_last=0"]


@pytest.fixture(scope="module")
def reference_long(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref1long")
    proc = _cli(
        "train",
        "configs/quickstart.yaml",
        "--quiet",
        f"model.path={tiny_llama}",
        f"output.dir={out}",
        *TINY,
        *LONG,
        "train.micro_batch_size=4",
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return load_file(str(out / "merged/model.safetensors"))


def _records(out: Path) -> list[dict]:
    import json

    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def _wait_until(condition, cluster, job, out, timeout=300, what="") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        cluster.hurry_requeued(job)
        state = cluster.state(job)
        # SIGNALING: SLURM is delivering a signal (the time-limit warning) to a running job
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING", "REQUEUE_FED", "SIGNALING"):
            pytest.fail(f"job ended ({state}) before {what}\n{_log(out, job)[-4000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{_log(out, job)[-4000:]}"
        time.sleep(0.3)


def _stops(log: str) -> list[int]:
    """The steps the job stopped at, in order (each rank logs its stop)."""
    return list(dict.fromkeys(int(m) for m in re.findall(r"stopped at step (\d+) on ", log)))


@pytest.mark.slow
def test_time_limit_warning_usr1_and_scontrol_requeue_each_checkpoint_requeue_and_resume(
    cluster, tiny_llama, reference_long, tmp_path
):
    """One 2 x 2 job stopped three ways, each time checkpointing on every rank, requeueing
    and resuming: (1) its real time limit: SLURM itself sends the `--signal-margin 150`
    warning (SIGUSR1); (2) `scancel --signal=USR1`; (3) `scontrol requeue`, SIGTERM to every
    process as in a preemption. The fourth start ends with the uninterrupted run's model.

    The job is submitted with 10 minutes and its limit cut to 3 once it trains: slurmctld
    looks at limits every 30 s and may send the warning up to a minute early, and a warning
    sent while the batch script is still starting reaches no process (one CI run lost it so
    with `--time 00:03:00` from the start). Cut to 3 minutes, the warning is due at once and
    comes within 30 s; the first start's steps are slowed (SCALORA_DIST_SLOW_STEP, 3 s) so
    that it cannot finish first."""
    out = tmp_path / "run"
    job = _submit(
        cluster,
        out,
        tiny_llama,
        "--max-restarts",
        "0",
        "--job-name",
        "signals",
        "--signal-margin",
        "150",
        overrides=LONG,
        time_limit="00:10:00",
        env={"SCALORA_DIST_SLOW_STEP": "3"},
    )
    _wait_until(lambda: bool(_records(out)), cluster, job, out, what="the first step")
    cluster.client(["scontrol", "update", f"JobId={job}", "TimeLimit=3"])
    _wait_until(
        lambda: "stopped at step" in _log(out, job),
        cluster,
        job,
        out,
        timeout=120,
        what="a stop after the time limit's warning",
    )
    cluster.client(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])  # the requeued start: no warning
    _wait_until(lambda: "restart count 1" in _log(out, job), cluster, job, out, what="a requeue after the warning")
    log = _log(out, job)
    assert re.search(r"stopped at step \d+ on SIGUSR1", log), log[-4000:]  # the warning, not the limit's SIGTERM
    first = _stops(log)[0]
    _wait_until(
        lambda: any(r["step"] > first + 2 for r in _records(out)),
        cluster,
        job,
        out,
        what="progress after the first requeue",
    )
    cluster.client(["scancel", "--signal=USR1", job])
    _wait_until(lambda: "restart count 2" in _log(out, job), cluster, job, out, what="a requeue after SIGUSR1")
    second = _stops(_log(out, job))[1]
    _wait_until(
        lambda: any(r["step"] > second + 2 for r in _records(out)),
        cluster,
        job,
        out,
        what="progress after the second requeue",
    )
    cluster.client(["scontrol", "requeue", job])
    state = cluster.wait(job, timeout=400)
    log = _log(out, job)
    assert state == "COMPLETED", f"{state}\n{log[-6000:]}\n{cluster.logs()}"
    assert "restart count 3" in log and len(_stops(log)) == 3, log[-6000:]
    for step in _stops(log):
        assert re.search(rf"resumed from \S*/checkpoints/step-{step:08d}", log), (step, log[-6000:])
    assert "done: 32 steps" in log
    _assert_same_weights(reference_long, load_file(str(out / "merged/model.safetensors")))


@pytest.mark.slow
def test_a_job_killed_before_it_can_save_stops_requeueing(cluster, tiny_llama, tmp_path):
    """Every save takes longer than KillWait (SCALORA_DIST_SLOW_SAVE): `scontrol requeue`
    kills the job mid-save, SLURM requeues it, and the next start, finding no newer
    checkpoint than at its previous start, refuses to train again (--max-requeues 1)."""
    out = tmp_path / "run"
    job = _submit(
        cluster,
        out,
        tiny_llama,
        "--max-restarts",
        "0",
        "--job-name",
        "no-progress",
        "--max-requeues",
        "1",
        env={"SCALORA_DIST_SLOW_SAVE": "120"},
    )
    _wait_until(lambda: (out / "checkpoints" / ".tmp-step-00000002").is_dir(), cluster, job, out, what="the first save")
    cluster.client(["scontrol", "requeue", job])
    state = cluster.wait(job, timeout=300)
    log = _log(out, job)
    assert state == "FAILED", f"{state}\n{log[-6000:]}"
    assert "restart count 1" in log, log[-4000:]
    assert "not training again: this job has been requeued 1 times in a row without a new checkpoint" in log
    assert not (out / "checkpoints" / "step-00000002").exists()
