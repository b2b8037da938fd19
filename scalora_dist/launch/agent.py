"""torchrun's elastic agent, run the way `scalora-dist train --nproc-per-node N` wants it.

    python -m scalora_dist.launch.agent [torchrun arguments] -m scalora_dist.cli train CONFIG ...

takes exactly torchrun's arguments and runs `torch.distributed.run.run` with them, but
reports a failed job the way a user can read: instead of torchrun's ChildFailedError
traceback (~45 lines) it prints the failing rank's error once, with its rank, and exits with
that worker's exit code (2: a bad config or data, 1: a failed run, 130: Ctrl-C; 128 + N for a
rank killed by signal N). Of several failed ranks it reports the cause, not the ranks that
only lost their connection to it.
Workers record their error for it in the error file torchrun gives each of them
(`record_worker_error`), and print nothing themselves when there is one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def record_worker_error(message: str, exit_code: int) -> bool:
    """Write a worker's error where torchrun's agent reads it (the error file format of
    torch.distributed.elastic, plus a millisecond timestamp so the first failure is known).
    Returns False when not under an agent that collects them."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    data = {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
                "timestamp_ms": int(time.time() * 1000),
                "exit_code": exit_code,
            },
        }
    }
    with open(path, "w") as f:
        json.dump(data, f)
    return True


PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",  # gloo
    "remote process exited",
    "NCCL communicator was aborted",  # NCCL
)
"""What a rank's collective raises when another rank's process is gone: never the cause."""

SIGNAL_HINTS = {
    "SIGKILL": "sent from outside the process, most often by the kernel's out-of-memory killer: see dmesg",
    "SIGSEGV": "the process crashed in native code",
    "SIGABRT": "the process aborted in native code",
    "SIGBUS": "the process crashed in native code",
}


def _recorded(failure) -> dict:
    """The extraInfo of the error a worker recorded itself, {} when it recorded none."""
    info = failure.error_file_data.get("message", {})
    return info.get("extraInfo", {}) if isinstance(info, dict) else {}


def _message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return message or ""


def _cause_order(failure) -> tuple[int, float]:
    """Sort key of a failure, the likely cause first: errors the workers recorded themselves,
    then deaths by a signal (a rank killed by the out-of-memory killer records nothing), then
    errors that only say a peer went away (the consequence of the others), each by time."""
    info = _recorded(failure)
    if "timestamp_ms" in info:
        lost_peer = any(marker in _message(failure) for marker in PEER_LOST)
        return (2 if lost_peer else 0), float(info["timestamp_ms"])
    return (1 if failure.exitcode < 0 else 0), float(failure.timestamp * 1000)


def first_failure(failures: dict) -> tuple[int, str, int]:
    """(rank, one-line message, exit code) of the failure to report from torchrun's
    ChildFailedError.failures ({global rank: ProcessFailure})."""
    rank, failure = min(failures.items(), key=lambda item: (_cause_order(item[1]), item[0]))
    code = failure.exitcode
    if code < 0:
        name = failure.signal_name()
        hint = SIGNAL_HINTS.get(name)
        message = f"killed by signal {name}" + (f" ({hint})" if hint else "")
        return rank, message, 128 - code
    message = _message(failure)
    if not message or message.startswith("To enable traceback") or not _recorded(failure):
        message = f"exited with code {code}"
    return rank, message, code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the agent's own progress and failure logs would repeat what the workers say (each of
    # torch's elastic loggers sets its own level, so the parent's is not enough)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, message, code = first_failure(e.failures)
        print(f"[rank{rank}] error: {message}", file=sys.stderr, flush=True)
        return code
    except SignalException as e:
        return 128 + int(e.sigval)
    except Exception as e:  # noqa: BLE001 - the agent's own failures (a rendezvous timeout, ...)
        print(f"error: torchrun: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # The workers are gone and the report is printed: skip the interpreter's teardown of torch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
