"""torchrun's elastic agent, run the way `scalora-dist train --nproc-per-node N` wants it.

    python -m scalora_dist.agent [torchrun arguments] -m scalora_dist.cli train CONFIG ...

takes exactly torchrun's arguments and runs `torch.distributed.run.run` with them, but
reports a failed job the way a user can read: instead of torchrun's ChildFailedError
traceback (~45 lines) it prints the first failing rank's error once, with its rank, and
exits with that worker's exit code (2: a bad config or data, 1: a failed run, 130: Ctrl-C).
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
    data = {"message": {"message": message, "extraInfo": {
        "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time())),
        "timestamp_ms": int(time.time() * 1000), "exit_code": exit_code,
    }}}
    with open(path, "w") as f:
        json.dump(data, f)
    return True


def _when(failure) -> tuple[int, float]:
    """Sort key of a failure: first the workers that recorded an error of their own (the
    others were stopped because of it, by the agent), then by time (ours to the ms)."""
    info = failure.error_file_data.get("message", {})
    info = info.get("extraInfo", {}) if isinstance(info, dict) else {}
    if "timestamp_ms" in info:
        return 0, float(info["timestamp_ms"])
    return (1 if failure.exitcode < 0 else 0), float(failure.timestamp * 1000)


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
        rank, failure = min(e.failures.items(), key=lambda item: (_when(item[1]), item[0]))
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        if not message or message.startswith("To enable traceback"):
            message = (f"exited with code {failure.exitcode}" if failure.exitcode >= 0
                       else f"killed by signal {failure.signal_name()}")
        print(f"[rank{rank}] error: {message}", file=sys.stderr, flush=True)
        code = failure.exitcode
        return code if code > 0 else 128 - code
    except SignalException as e:
        return 128 + int(e.sigval)
    except Exception as e:  # noqa: BLE001 - the agent's own failures (a rendezvous timeout, ...)
        print(f"error: torchrun: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
