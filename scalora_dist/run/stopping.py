"""Stopping early without losing work: on SIGUSR1, SIGTERM or a first Ctrl-C (SIGINT) a
run finishes what it is doing, writes a checkpoint (atomic, as every save), and exits with
EXIT_REQUEUE so that a scheduler (SLURM's time-limit warning, preemption, `scancel
--signal=USR1`, `scontrol requeue`) or the user can start it again, where `--resume auto`
continues from that checkpoint. A second Ctrl-C stops at once (the steps since the last
checkpoint are lost).

Every rank must stop at the same step and only one checkpoint may be written, so the flag
a signal sets is combined across ranks wherever they can all agree: at each step boundary
(one all-reduce of two numbers, with the wall-clock save flag of `train.save_every_minutes`,
which rank 0's clock decides), after setup, between evaluation batches and between sample
prompts, so a signal that comes during a long setup or evaluation is acted on when that
part ends or at the next batch, not lost. A handler only sets a flag, so a signal that
arrives during a save never interrupts it. SIGTERM is a best effort: the scheduler
(KillWait) and torchrun's agent (30 s) SIGKILL what has not stopped by then, so a time limit
should come with SIGUSR1's warning.

In a torchrun job the launcher takes the terminal's Ctrl-C (scalora_dist/launch/torchrun.py):
the first is passed to the workers as SIGUSR1, a second as SIGINT, which stops them at once.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

EXIT_REQUEUE = 75
"""Exit code of a run stopped on request after a checkpoint (EX_TEMPFAIL: run it again)."""
STOPPED_MARKER = "STOPPED"
"""Written into output.dir by rank 0 when a run stops on a signal: {step, signal, checkpoint}."""
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


_received: list[int] = []


def _handle(signum: int, frame: object) -> None:
    # Repeats change nothing: under SLURM a worker gets SIGTERM from the scheduler and again
    # from torchrun's agent; the hard stop is the SIGKILL that follows after KillWait.
    _received.append(signum)


def _handle_ctrl_c(signum: int, frame: object) -> None:
    """The first Ctrl-C asks for a checkpoint and a stop; the second stops at once."""
    if signum in _received:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    _received.append(signum)
    import sys

    print(
        "\nCtrl-C: stopping after a checkpoint at the next point every rank reaches; press Ctrl-C again "
        "to stop at once (the steps since the last checkpoint are lost)",
        file=sys.stderr,
        flush=True,
    )


def install_early() -> None:
    """Record a SIGUSR1 from the very start of the process (a scheduler's warning may come
    while the interpreter is still importing); cheap, imports nothing."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, _handle)


def install_handlers(ctrl_c: bool = True) -> None:
    """From now on SIGUSR1 / SIGTERM ask for a stop instead of ending the process, and with
    `ctrl_c` so does a first SIGINT (a second raises KeyboardInterrupt). Called as early as
    possible in a run's process (a launcher starts its workers with SIGUSR1 ignored until
    then, and repeats the signal). A torchrun worker keeps SIGINT as a stop at once: its
    launcher turns the first Ctrl-C into SIGUSR1."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handle)
        if ctrl_c:
            signal.signal(signal.SIGINT, _handle_ctrl_c)


def requested() -> str | None:
    """The name of the first stop signal received, if any."""
    return signal.Signals(_received[0]).name if _received else None


class StopSignals:
    """The stop requests of this process. Entering it makes sure SIGUSR1 / SIGTERM are
    requests (train() called from Python); the CLI has installed the handlers already, with
    Ctrl-C's where a terminal's Ctrl-C is this process's own."""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, _handle)
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @property
    def received(self) -> int | None:
        return _received[0] if _received else None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None


class SaveClock:
    """train.save_every_minutes, measured on rank 0 from the start or the last save."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return bool(self.minutes) and time.monotonic() - self.last >= 60 * self.minutes

    def saved(self) -> None:
        self.last = time.monotonic()


def any_rank_asks(stop: bool, save: bool, device) -> tuple[bool, bool]:
    """(stop, save) as any rank sees them: every rank acts on the same step."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return stop, save
    flags = torch.tensor([float(stop), float(save)], dtype=torch.float64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item())


def write_marker(run_dir: Path, step: int, signal_name: str, checkpoint: Path | None) -> None:
    (Path(run_dir) / STOPPED_MARKER).write_text(
        json.dumps(
            {
                "step": step,
                "signal": signal_name,
                "checkpoint": str(checkpoint) if checkpoint else None,
                "time": time.time(),
            }
        )
        + "\n"
    )


def read_marker(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STOPPED_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / STOPPED_MARKER).unlink(missing_ok=True)
