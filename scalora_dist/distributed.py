"""Process group, device and rank-aware logging. Plain functions; no model code here."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("scalora_dist")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def choose_threads(sample_s: float = 0.3) -> tuple[int, str]:
    """Set this process's intra-op thread count and say why. OMP_NUM_THREADS wins when set;
    otherwise the CPUs this process may use that are idle right now (measured over
    `sample_s` from /proc/stat; the load average where there is none), at least 1: a busy
    machine gets fewer threads, since a thread that waits for a core stalls the others at
    every parallel operation (2x slower measured on 2 cores with one of them busy).
    torchrun workers get OMP_NUM_THREADS=1 from torchrun itself."""
    import math

    if os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
        why = "OMP_NUM_THREADS"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = _busy_cpus(sample_s)
        if busy is None:
            busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cpus, math.floor(cpus - busy + 0.5)))
        why = f"{cpus} CPUs, {busy:.1f} busy; set OMP_NUM_THREADS to choose"
    torch.set_num_threads(threads)
    return threads, why


def _busy_cpus(sample_s: float) -> float | None:
    """How many of the machine's CPUs were busy over the last `sample_s` seconds."""
    import time

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = read()
    time.sleep(sample_s)
    second = read()
    if first is None or second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (1 - idle / total)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    )


SETUP_TIMEOUT_MINUTES = 30.0
"""How long a collective may wait during setup: a node's first rank downloads the model
while the others wait in a barrier. Training then uses train.collective_timeout_s."""


def init_distributed(
    timeout_minutes: float = SETUP_TIMEOUT_MINUTES, flight_recorder_dir: Path | None = None
) -> DistInfo:
    """Initialise the process group when started by torchrun (NCCL on CUDA, gloo on CPU);
    otherwise a one-process DistInfo on the best local device. On CUDA, NCCL's flight
    recorder keeps each rank's last collectives and dumps them on a timeout into
    `flight_recorder_dir`/nccl_trace_rank_<R> (when given)."""
    if not launched_by_torchrun():
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        setup_logging(0, prefix=False)
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    setup_logging(rank)
    if backend == "nccl" and flight_recorder_dir is not None:
        enable_flight_recorder(Path(flight_recorder_dir))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if backend == "nccl" else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def enable_flight_recorder(directory: Path) -> None:
    """NCCL's flight recorder (before the process group exists): a ring buffer of each rank's
    collectives, dumped on a collective timeout, so a hang leaves a record of which
    collective each rank was in (read it with `python -m torch.distributed.flight_recorder.fr_trace`).
    Settings a user has made in the environment are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in (
        ("TORCH_NCCL_TRACE_BUFFER_SIZE", "20000"),
        ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
        ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(directory / "nccl_trace_rank_")),
        ("TORCH_FR_DUMP_TEMP_FILE", str(directory / "nccl_trace_rank_")),
    ):
        os.environ.setdefault(key, value)


def set_collective_timeout(seconds: float) -> None:
    """From now on a collective that waits longer than this for a peer fails (the default
    process group; setup ran under SETUP_TIMEOUT_MINUTES)."""
    if dist.is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=seconds))


def is_collective_timeout(error: BaseException) -> bool:
    """A collective gave up waiting for a peer (gloo: "Timed out waiting ..."; NCCL's watchdog
    messages say "timeout" / "timed out" too)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def silent_ranks(wait_s: float = 10.0) -> list[int]:
    """After a collective timed out on this rank: the ranks that stopped answering. Every rank
    whose collective timed out says so in the job's store (torchrun's, which lives in the
    agent and still answers); the ranks that have not said so within `wait_s` are the ones
    the others were waiting for. Empty when it cannot tell."""
    if not dist.is_initialized():
        return []
    import time

    from torch.distributed.distributed_c10d import _get_default_store

    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = _get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        store.set(f"scalora/timed_out/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([f"scalora/timed_out/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store is gone too: nothing to tell
        return []


def destroy_distributed(wait_for_peers: bool = False) -> None:
    """Tear the process group down. After a good run, first wait until every rank is done
    (a rank closing its gloo connections while a peer still finishes its last writes has
    aborted processes at exit); never after a failure, where peers may never arrive."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def setup_logging(rank: int, prefix: bool = True) -> None:
    """Every rank logs warnings and errors, prefixed with its rank (in a job of several);
    rank 0 also logs info."""
    handler = logging.StreamHandler()
    tag = f"[rank{rank}] " if prefix else ""
    handler.setFormatter(logging.Formatter(f"{tag}%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters, gradients, optimizer state); any
    other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class CollectiveRecorder(TorchDispatchMode):
    """Records every c10d collective issued inside it, at the dispatcher (the level
    CommDebugMode counts at): an outside measurement of what a piece of code communicates,
    for tests and benchmarks. Bytes per call are those of its full buffer (the largest
    tensor: the all-reduced tensor, an all-gather's output, a reduce-scatter's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d" and func.__name__.split(".")[0] not in ("wait", "barrier", "monitored_barrier"):
            nbytes = max((t.numel() * t.element_size() for t in _tensors((args, kwargs))), default=0)
            self.calls.append((func.__name__.split(".")[0], nbytes))
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.calls)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.calls)


def _tensors(tree) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            out.extend(_tensors(item))
    elif isinstance(tree, dict):
        for item in tree.values():
            out.extend(_tensors(item))
    return out
