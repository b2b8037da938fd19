"""Start a torchrun job from the `scalora-dist train` command line.

The launcher builds the `python -m torch.distributed.run ...` command (the user never writes
it), runs it, and relays Ctrl-C / SIGTERM to it. Inside the job each worker runs
`python -m scalora_dist.cli train CONFIG ...` without any launch option, so a worker can never
start another job (and the CLI also refuses to launch when `launched_by_torchrun()`).

Command shapes (see `torchrun_command`):

* one node, no rendezvous endpoint:
  `python -m torch.distributed.run --nnodes 1 --nproc-per-node N --standalone --max-restarts R
  -m scalora_dist.cli train CONFIG [overrides] [train args]`
* several nodes (or one node with --rdzv-endpoint):
  `python -m torch.distributed.run --nnodes NNODES --nproc-per-node N --rdzv-backend c10d
  --rdzv-endpoint HOST:PORT --rdzv-id ID [--node-rank K] --max-restarts R -m scalora_dist.cli ...`
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

WORKER_MODULE = "scalora_dist.cli"

#: Signals relayed to the torchrun process; torchrun relays them to the workers.
FORWARDED_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")) if s is not None
)
#: Signals that ask the run to checkpoint and stop (scalora_dist/run/stopping.py): they go to the
#: workers themselves, past torchrun's agent, which would stop them at once (SIGTERM, SIGINT)
#: or die of them (SIGUSR1). A second SIGTERM or Ctrl-C stops everything at once.
GRACEFUL_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT) if s is not None)
STOP_SIGNAL = getattr(signal, "SIGUSR1", signal.SIGTERM)

#: After relaying a signal, how long torchrun gets to stop its workers (it waits up to its own
#: shutdown timeout, 30 s by default, before it SIGKILLs them) before the launcher kills all.
ESCALATE_AFTER_S = 45.0


class LaunchError(ValueError):
    """The launch options are inconsistent; the message names the option."""


@dataclass
class LaunchOptions:
    """How many processes to start, and where, for one training job.

    nnodes is a count ("2") or an elastic range ("1:4"), as torchrun takes it.
    """

    nproc_per_node: int = 1
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_backend: str = "c10d"
    max_restarts: int = 0
    master_port: int | None = None

    def node_range(self) -> tuple[int, int]:
        """(min_nodes, max_nodes) of `nnodes`; LaunchError when it is malformed."""
        text = str(self.nnodes).strip()
        m = re.fullmatch(r"(\d+)(?::(\d+))?", text)
        if not m:
            raise LaunchError(f"--nnodes: expected a count like 2 or a range like 1:4, got {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 1 or hi < lo:
            raise LaunchError(f"--nnodes: expected 1 <= min <= max, got {text!r}")
        return lo, hi

    def multi_node(self) -> bool:
        return self.node_range()[1] > 1

    def needs_torchrun(self) -> bool:
        """True when the job needs more than this one process (nproc > 1 or several nodes);
        otherwise the training runs in-process."""
        return self.nproc_per_node > 1 or self.multi_node()

    def validate(self) -> None:
        """LaunchError (naming the option) when the options cannot make a job."""
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node: must be >= 1, got {self.nproc_per_node}")
        _, max_nodes = self.node_range()
        if self.max_restarts < 0:
            raise LaunchError(f"--max-restarts: must be >= 0, got {self.max_restarts}")
        if self.node_rank is not None and not 0 <= self.node_rank < max_nodes:
            raise LaunchError(
                f"--node-rank: must be in [0, {max_nodes - 1}] for --nnodes {self.nnodes}, got {self.node_rank}"
            )
        if not self.rdzv_backend:
            raise LaunchError("--rdzv-backend: must not be empty (default c10d)")
        if self.multi_node():
            if not self.rdzv_endpoint:
                raise LaunchError(
                    f"--rdzv-endpoint: required with --nnodes {self.nnodes} (HOST:PORT of the "
                    "rendezvous, the same on every node, e.g. the first node's address:29500)"
                )
            if self.rdzv_backend == "static" and self.node_rank is None:
                raise LaunchError("--node-rank: required with --rdzv-backend static on several nodes")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"\S+?(:\d+)?", self.rdzv_endpoint):
            raise LaunchError(f"--rdzv-endpoint: expected HOST[:PORT], got {self.rdzv_endpoint!r}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise LaunchError(f"master_port: must be in 1..65535, got {self.master_port}")


#: Scheduler variables whose value names the job on every node (first one set wins).
JOB_ID_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


def default_rdzv_id(job_key: str | None = None) -> str:
    """The rendezvous id when --rdzv-id is not given. Every node of a job must use the same
    one, and each node runs its own launcher, so a random id would never let them meet:
    the scheduler's job id when there is one (SLURM_JOB_ID, ...), else one derived from
    `job_key` (the command being launched, identical on all nodes), else a fresh uuid."""
    for name in JOB_ID_VARIABLES:
        if os.environ.get(name):
            return f"{name.lower()}-{os.environ[name]}"
    if job_key is not None:
        return "scalora-" + hashlib.sha1(job_key.encode()).hexdigest()[:16]
    return uuid.uuid4().hex


def torchrun_args(options: LaunchOptions, job_key: str | None = None) -> list[str]:
    """The `python -m torch.distributed.run ...` part of the command, up to (not including)
    the program to run; LaunchError when the options are inconsistent. Without `rdzv_id`
    a multi-node job gets `default_rdzv_id(job_key)`."""
    options.validate()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(options.nnodes).strip(),
        "--nproc-per-node",
        str(options.nproc_per_node),
    ]
    if options.rdzv_endpoint or options.multi_node():
        if job_key is not None:
            job_key = f"{options.rdzv_endpoint} {options.nnodes} {job_key}"
        cmd += [
            "--rdzv-backend",
            options.rdzv_backend,
            "--rdzv-endpoint",
            options.rdzv_endpoint,
            "--rdzv-id",
            options.rdzv_id or default_rdzv_id(job_key),
        ]
        if options.node_rank is not None:
            cmd += ["--node-rank", str(options.node_rank)]
    elif options.master_port is not None:
        # One node on a fixed port (static rendezvous on this host) instead of a free one.
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(options.master_port)]
    else:
        cmd += ["--standalone"]  # local c10d rendezvous on a free port chosen by torchrun
    cmd += ["--max-restarts", str(options.max_restarts)]
    return cmd


def torchrun_command(
    config: Path, overrides: list[str], options: LaunchOptions, extra_train_args: list[str]
) -> list[str]:
    """The full torchrun command whose workers run `scalora_dist.cli train CONFIG ...`.

    `extra_train_args` are `train` options for the workers (e.g. --quiet, --resume X); the
    launch options themselves are never passed on, so a worker cannot launch again. The
    default rendezvous id is the same for the same command on every node (see
    `default_rdzv_id`)."""
    worker = [WORKER_MODULE, "train", str(config), *overrides, *extra_train_args]
    return [*torchrun_args(options, job_key=shlex.join(worker)), "-m", *worker]


def format_command(cmd: list[str]) -> str:
    return shlex.join(cmd)


def torchrun_env() -> dict[str, str]:
    """torch 2.13 shares the rendezvous TCP store with the workers; workers restarted by
    --max-restarts then read the previous attempt's addresses and fail to connect
    (gloo connectFullMesh refused). A store per attempt avoids it."""
    return {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def through_agent(cmd: list[str]) -> list[str]:
    """The same torchrun command, run by scalora_dist.launch.agent: torchrun's own agent with its
    arguments unchanged, which reports a failed worker in one line instead of a traceback."""
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        return [cmd[0], "-m", "scalora_dist.launch.agent", *cmd[3:]]
    return cmd


GATE_ENV = "SCALORA_DIST_GATE"
"""A file the workers of a job wait for after their imports, before anything else: the
launcher starts torchrun while it checks the config, model and data (so the two import
torch side by side), then writes `go` into it, or `stop` (and ends the job) on a problem."""


class Gate:
    """The launcher's side of GATE_ENV."""

    def __init__(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="scalora-dist-gate-"))
        self.path = self.dir / "gate"

    def env(self) -> dict[str, str]:
        return {GATE_ENV: str(self.path)}

    def open(self, word: str = "go") -> None:
        tmp = self.dir / "gate.tmp"
        tmp.write_text(word)
        os.replace(tmp, self.path)


def wait_at_gate(poll_s: float = 0.02) -> bool:
    """A worker: wait for the launcher's word (no gate: go at once). False on `stop`."""
    path = os.environ.get(GATE_ENV)
    if not path:
        return True
    while True:
        try:
            word = Path(path).read_text()
        except OSError:
            word = ""
        if word in ("go", "stop"):
            return word == "go"
        time.sleep(poll_s)


def start_torchrun(cmd: list[str], gate: Gate | None = None) -> subprocess.Popen:
    """torchrun (through scalora_dist.launch.agent) in its own session, its workers waiting
    at `gate` when one is given."""
    return subprocess.Popen(
        through_agent(cmd),
        start_new_session=True,
        preexec_fn=_death_signal_setter(),
        env={**torchrun_env(), **(gate.env() if gate else {})},
    )


def abort_torchrun(proc: subprocess.Popen, gate: Gate | None = None) -> None:
    """End a job that never trained: its workers told `stop`, every process below it killed."""
    if gate is not None:
        gate.open("stop")
    known = _descendants(proc.pid)
    _signal_group(proc.pid, signal.SIGKILL)
    _kill_known(known)
    proc.wait()


def run_torchrun(
    cmd: list[str], escalate_after_s: float = ESCALATE_AFTER_S, started: subprocess.Popen | None = None
) -> int:
    """Run `cmd` (a torchrun command, through scalora_dist.launch.agent) and return its exit code.

    torchrun runs in its own session, so a terminal's Ctrl-C reaches only this process; the
    first SIGINT / SIGHUP is relayed to torchrun's process group, and torchrun stops its
    workers (it sends them the signal, then SIGKILL after its shutdown timeout). A second
    signal, or torchrun still running `escalate_after_s` after the first, SIGKILLs torchrun and
    every process below it. SIGUSR1, a first SIGTERM and a first Ctrl-C ask for a checkpoint
    and a stop: they go to the workers, as SIGUSR1, and the job ends when they have saved (a
    second SIGTERM or Ctrl-C to the launcher is relayed as itself: a stop at once). After an
    interrupted run any worker still alive is killed too.
    On Linux torchrun also gets SIGTERM if this process dies without a chance to relay.

    Returns torchrun's exit code, or 128 + signal number when the run was interrupted
    (130 for Ctrl-C) or torchrun itself was killed by a signal. `started`: the job
    start_torchrun already started (its workers past their gate), to wait for.
    """
    received: list[int] = []
    known: dict[int, int] = {}  # pid -> start time of torchrun's descendants, for the sweep
    procs: list[subprocess.Popen] = []

    def kill_all() -> None:
        if procs:
            known.update(_descendants(procs[0].pid))
            _signal_group(procs[0].pid, signal.SIGKILL)
        _kill_known(known)

    graceful: list[int] = []

    def relay(signum: int, frame: object) -> None:
        if signum in GRACEFUL_SIGNALS and not received and signum not in graceful:
            graceful.append(signum)  # passed on to the workers as SIGUSR1, in the wait loop
            if signum == signal.SIGINT:
                print(
                    "\nCtrl-C: every rank stops after a checkpoint at the next point they all reach; press "
                    "Ctrl-C again to stop at once (the steps since the last checkpoint are lost)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        received.append(signum)
        if not procs:
            return  # not started yet: relayed right after the start
        known.update(_descendants(procs[0].pid))
        if len(received) == 1:
            _signal_group(procs[0].pid, signum)
        else:
            kill_all()

    previous = {}
    try:
        for sig in FORWARDED_SIGNALS:
            try:
                previous[sig] = signal.signal(sig, relay)
            except ValueError:  # not the main thread: signals stay as they are
                break
        from scalora_dist.run import stopping

        graceful += [s for s in stopping._received if s in GRACEFUL_SIGNALS][:1]  # asked before this
        procs.append(started if started is not None else start_torchrun(cmd))
        proc = procs[0]
        if received:
            _signal_group(proc.pid, received[0])
        deadline = None
        resend: list[float] = []  # when the stop request was last passed on
        while True:
            if graceful and (not resend or (time.monotonic() - resend[-1] > 2 and len(resend) < 30)):
                # Repeated for a minute: workers ignore SIGUSR1 until their handler is in
                # place (after that, once is enough).
                _signal_workers(proc.pid, STOP_SIGNAL)
                resend.append(time.monotonic())
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + escalate_after_s
            if deadline is not None and time.monotonic() > deadline:
                kill_all()
                deadline = float("inf")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if procs and procs[0].poll() is None:  # an exception here (not a relayed signal)
            kill_all()
            procs[0].wait()
    if received:
        _kill_known(known)  # workers torchrun failed to stop
        return 128 + received[0]
    return 128 - rc if rc < 0 else rc


def _signal_workers(agent_pid: int, sig: int) -> None:
    """Send `sig` to the worker processes (the agent's children); the agent is left alone."""
    for pid in [pid for pid, (ppid, _) in _process_table().items() if ppid == agent_pid]:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process (empty without /proc)."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    table = {}
    for pid in pids:
        st = _proc_stat(pid)
        if st is not None:
            table[pid] = st
    return table


def _death_signal_setter():
    """A preexec_fn asking Linux to SIGTERM the child when the launcher dies (prctl
    PR_SET_PDEATHSIG), or None elsewhere. ctypes is loaded here, in the parent: the child
    between fork and exec must not import anything."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None

    def set_death_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
        # torchrun's agent and the workers start deaf to SIGUSR1 (inherited across exec):
        # a scheduler's warning reaching the agent, or a worker before its handler exists,
        # must not kill it (the launcher repeats the signal to the workers).
        signal.signal(STOP_SIGNAL, signal.SIG_IGN)

    return set_death_signal


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below `root` (empty without /proc)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid, (ppid, start) in _process_table().items():
        children.setdefault(ppid, []).append((pid, start))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def _kill_known(known: dict[int, int]) -> None:
    """SIGKILL each recorded process that is still the same process (same start time)."""
    for pid, start in known.items():
        st = _proc_stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
