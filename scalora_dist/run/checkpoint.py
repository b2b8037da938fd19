"""Resumable distributed checkpoints (torch.distributed.checkpoint) and the merged export.

Checkpoint layout (one directory per saved step, under the run's checkpoint root):

    ckpt_root/
      step-00000200/            complete checkpoints only (renamed into place by rank 0)
        .metadata, __*_*.distcp DCP files: model (base weights, merged part, LoRA factors,
                                 everything) + optimizer state, resharded on load
        app_state.pt            the small rank-independent dict (step, scheduler, data, kappa, ...)
        rng-rank{R}.pt          each rank's RNG streams (torch CPU/CUDA, python, numpy)
        COMPLETE                JSON marker: step, world size; written last
      .tmp-step-00000300/       a save in progress (or one that crashed): never loaded

A ScaLoRA run cannot be resumed from its adapters (the merged part of every weight is high
rank), so the model state is the whole model, except frozen 4-bit codes: they never change
and are quantised again from model.path at setup, so they are not written. `get_state_dict`/`set_state_dict` give the same
FQN-keyed state for FSDP2-sharded (DTensor) and plain modules, and DCP reshards on load, so a
checkpoint written by N ranks loads on M ranks, or into a plain single-process model.

The merged export (of a live model or of any checkpoint) is scalora_dist/run/export.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from scalora_dist.model.quant import is_quantized_linear

log = logging.getLogger(__name__)

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
COMPLETE = "COMPLETE"
APP_STATE = "app_state.pt"
DCP_METADATA = ".metadata"
FORMAT = "scalora-dist-dcp-1"
_STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")


SLOW_SAVE_ENV = "SCALORA_DIST_SLOW_SAVE"
"""Seconds every save waits between writing its files and committing them (fault injection)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unusable; the message names what and where."""


# -- small helpers ---------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def attempt(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # reported to every rank by raise_if_any_rank_failed
        return e
    return None


def raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """A collective (and so a barrier): every rank learns whether any rank failed, and all
    raise CheckpointError together instead of the others waiting at the next collective
    until the process group times out."""
    if _distributed():
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    else:
        errors = [None if error is None else f"{type(error).__name__}: {error}"]
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed ({'; '.join(failed)})") from error


@contextmanager
def quiet_single_process():
    """DCP warns that it assumes a single process whenever no process group exists, even
    when told so (no_dist=True); that is exactly our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    """`step-00000042`: fixed width, so names sort like steps."""
    return f"{STEP_PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    """This process's RNG streams, as plain tensors and Python values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one device per rank
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        m = _STEP_DIR_RE.match(child.name)
        if m and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _remove_stale(ckpt_root: Path) -> None:
    """Clean up after interrupted saves: remove tmp dirs; put back a complete checkpoint
    that was set aside to be replaced (same step saved again) if its replacement is missing."""
    for child in sorted(ckpt_root.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith(OLD_PREFIX):
            original = ckpt_root / (STEP_PREFIX + child.name[len(OLD_PREFIX):])
            if (child / COMPLETE).is_file() and not original.exists():
                log.warning("restoring %s, set aside by an interrupted save", original)
                os.rename(child, original)
                continue
        if child.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            log.warning("removing %s, left by an interrupted checkpoint save", child)
            shutil.rmtree(child, ignore_errors=True)


def _check_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Raise CheckpointError naming what is missing; return the COMPLETE marker's content."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
        raise CheckpointError(
            f"checkpoint {path} is the leftover of an interrupted save; use a step-XXXXXXXX "
            "directory (or 'latest')"
        )
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {COMPLETE} marker (the save was "
            "interrupted, or this is not a scalora-dist checkpoint)"
        )
    if not (path / DCP_METADATA).is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {DCP_METADATA} file: the model/optimizer state "
            "(torch.distributed.checkpoint) is missing"
        )
    if not (path / APP_STATE).is_file():
        raise CheckpointError(f"checkpoint {path} has no {APP_STATE} (step, scheduler and data state)")
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMPLETE} marker ({e})") from e
    return marker if isinstance(marker, dict) else {}


# -- public API: checkpoints ----------------------------------------------------------------


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    app_state: dict,
    *,
    keep_last: int = 2,
) -> Path:
    """Save model + optimizer (DCP), app_state (rank 0) and every rank's RNG as
    `ckpt_root/step-XXXXXXXX`; every rank calls it. Returns the checkpoint directory.

    Atomic: everything is written to `.tmp-step-XXXXXXXX`; after a barrier rank 0 writes the
    COMPLETE marker and renames the directory into place, so a crash at any point leaves the
    previous checkpoints intact and `latest_checkpoint` never sees a partial one. Stale tmp
    dirs of earlier crashed saves are removed first. Afterwards rank 0 keeps the checkpoint
    just written plus the newest `keep_last - 1` others (keep_last <= 0: keep all).
    """
    ckpt_root = Path(ckpt_root)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    rank, world = rank_world()
    final = ckpt_root / step_dir_name(step)
    log.info("saving checkpoint %s", final)
    tmp = ckpt_root / f"{TMP_PREFIX}{step:08d}"
    started = time.perf_counter()

    def prepare() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(ckpt_root)
        tmp.mkdir()

    raise_if_any_rank_failed(attempt(prepare) if rank == 0 else None, f"checkpoint save: creating {tmp}")

    model_sd, optim_sd = _training_state(model, optimizer)
    with quiet_single_process():  # collective; raises on every rank if one fails
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not _distributed())
    del model_sd, optim_sd

    def write_own_files() -> None:
        if not tmp.is_dir():
            raise CheckpointError(
                f"{tmp} is not visible here: the checkpoint directory must be on a "
                "filesystem shared by all ranks"
            )
        rng = _rng_state()
        _write_durable(tmp / f"rng-rank{rank}.pt", lambda f: torch.save(rng, f))
        if rank == 0:
            _write_durable(tmp / APP_STATE, lambda f: torch.save(app_state, f))

    raise_if_any_rank_failed(attempt(write_own_files), f"checkpoint save: writing {tmp}")  # all files on disk
    slow = float(os.environ.get(SLOW_SAVE_ENV) or 0)
    if slow:  # fault injection: a save that takes long enough to be interrupted (tests)
        time.sleep(slow)

    def commit() -> None:
        marker = {"format": FORMAT, "step": step, "world_size": world, "saved_at": time.time(),
                  "save_seconds": round(time.perf_counter() - started, 3)}
        _write_durable(tmp / COMPLETE, lambda f: f.write(json.dumps(marker) + "\n"), mode="w")
        _fsync_dir(tmp)
        old = None
        if final.exists():  # saving the same step again (e.g. right after a resume)
            old = ckpt_root / f"{OLD_PREFIX}{step:08d}"
            os.rename(final, old)
        os.rename(tmp, final)  # the atomic step: before it the save does not exist
        _fsync_dir(ckpt_root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _prune(ckpt_root, final, keep_last)
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)

    raise_if_any_rank_failed(attempt(commit) if rank == 0 else None, f"checkpoint save: committing {final}")
    return final


def _prune(ckpt_root: Path, just_saved: Path, keep_last: int) -> None:
    complete = _complete_checkpoints(ckpt_root)
    saved_step = int(_STEP_DIR_RE.match(just_saved.name).group(1))
    newer = [p.name for s, p in complete if s > saved_step]
    if newer:
        log.warning(
            "checkpoints newer than the one just saved (%s) exist: %s; they are from an "
            "earlier run and 'latest' still picks them",
            just_saved.name, ", ".join(newer),
        )
    if keep_last <= 0:
        return
    others = [p for _, p in complete if p != just_saved]
    for path in others[: max(len(others) - (keep_last - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ckpt_root (partial and tmp dirs are ignored)."""
    complete = _complete_checkpoints(Path(ckpt_root))
    return complete[-1][1] if complete else None


def resolve_checkpoint(spec: str, ckpt_root: Path) -> Path:
    """`latest` -> the newest complete checkpoint under ckpt_root; anything else is a path
    (absolute, relative to the working directory, or a directory name under ckpt_root).
    Raises CheckpointError saying what is missing."""
    ckpt_root = Path(ckpt_root)
    spec = str(spec).strip()
    if not spec:
        raise CheckpointError("resume: empty checkpoint; give 'latest' or a checkpoint directory")
    if spec == "latest":
        path = latest_checkpoint(ckpt_root)
        if path is None:
            partial = (
                sorted(c.name for c in ckpt_root.iterdir() if c.is_dir()) if ckpt_root.is_dir() else []
            )
            detail = f" (only incomplete ones: {', '.join(partial)})" if partial else ""
            where = "does not exist" if not ckpt_root.exists() else "has no complete checkpoint"
            raise CheckpointError(
                f"resume 'latest': {ckpt_root} {where}{detail}; a complete checkpoint is a "
                f"{STEP_PREFIX}XXXXXXXX directory holding a {COMPLETE} marker"
            )
        return path
    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and (ckpt_root / spec).exists():
        path = ckpt_root / spec
    _check_checkpoint_dir(path)
    return path


def _frozen_codes(model: nn.Module) -> list[str]:
    """State-dict key prefixes of the 4-bit layers' packed codes (and their QuantState)."""
    return [f"{name}.weight" for name, m in model.named_modules() if is_quantized_linear(m)]


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state to checkpoint: everything but the frozen 4-bit codes,
    whose QuantState keys also differ between sharded and plain layers."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    frozen = tuple(_frozen_codes(model))
    if frozen:
        model_sd = {
            k: v for k, v in model_sd.items()
            if not any(k == f or k.startswith(f + ".") for f in frozen)
        }
    return model_sd, optim_sd


def read_app_state(path: Path) -> dict:
    """A complete checkpoint's small rank-independent state (step, config, scheduler, data
    position, ...) without touching the model; CheckpointError if it is not one."""
    path = Path(path)
    _check_checkpoint_dir(path)
    return torch.load(path / APP_STATE, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer state in place (every rank calls it, any world size and
    sharding) and return the saved app_state. Each rank's RNG streams are restored when the
    world size matches the saving job's; otherwise they restart (a warning says so)."""
    path = Path(path)
    marker = _check_checkpoint_dir(path)
    rank, world = rank_world()
    model_sd, optim_sd = _training_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path} into this model/optimizer: {e}") from e
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(strict=not _frozen_codes(model)),  # the codes stay as loaded
    )
    del state, model_sd, optim_sd
    # Our own file; app_state may hold any picklable object (config, loader state, ...).
    app_state = torch.load(path / APP_STATE, map_location="cpu", weights_only=False)

    saved_world = marker.get("world_size")
    rng_file = path / f"rng-rank{rank}.pt"
    if saved_world == world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    elif rank == 0:
        log.warning(
            "checkpoint %s was saved by %s process(es), this job has %d: random number "
            "streams restart (this only affects dropout)", path, saved_world, world,
        )
    log.info("resumed from %s (step %s)", path, marker.get("step"))
    return app_state
