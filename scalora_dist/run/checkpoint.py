"""Resumable distributed checkpoints (torch.distributed.checkpoint) and the merged export.

Checkpoint layout (one directory per saved step, under the run's checkpoint root):

    ckpt_root/
      step-00000200/            complete checkpoints only (renamed into place by rank 0)
        .metadata, __*_*.distcp DCP files: model (base weights, merged part, LoRA factors,
                                 everything) + optimizer state, resharded on load
        app_state.json          the small rank-independent state (step, scheduler, data, kappa, ...)
        rng-rank{R}.safetensors each rank's RNG streams (torch CPU/CUDA, numpy as tensors; python's
                                 in the file's metadata)
        COMPLETE                JSON marker: step, world size and the manifest (every file's size
                                 and checksum, run/manifest.py); written last
      .tmp-step-00000300/       a save in progress (or one that crashed): never loaded

Nothing in a checkpoint can run code when it is read: the run's own state is JSON and
safetensors, and DCP's pickled .metadata is read by an unpickler that builds only DCP's own
metadata classes (checkpoints of earlier versions, with app_state.pt and rng-rank{R}.pt, load
with torch.load(weights_only=True)). A checkpoint is verified against its manifest before it
is loaded.

A ScaLoRA run cannot be resumed from its adapters (the merged part of every weight is high
rank), so the model state is the whole model, except frozen 4-bit codes: they never change
and are quantised again from model.path at setup, so they are not written.
`get_state_dict`/`set_state_dict` give the same FQN-keyed state for FSDP2-sharded (DTensor)
and plain modules, and DCP reshards on load, so a checkpoint written by N ranks loads on M
ranks, or into a plain single-process model.

The merged export (of a live model or of any checkpoint) is scalora_dist/run/export.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from scalora_dist.model.quant import is_quantized_linear
from scalora_dist.run import manifest

log = logging.getLogger(__name__)

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
COMPLETE = "COMPLETE"
APP_STATE = "app_state.json"
LEGACY_APP_STATE = "app_state.pt"
"""What checkpoints of versions before the manifest hold instead of app_state.json."""
DCP_METADATA = ".metadata"
FORMAT = "scalora-dist-dcp-2"
"""-2: JSON app state, safetensors RNG states, the manifest in COMPLETE (-1: pickled .pt files)."""
_STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")


SLOW_SAVE_ENV = "SCALORA_DIST_SLOW_SAVE"
"""Seconds every save waits between writing its files and committing them (fault injection)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unusable; the message names what and where."""


class OutOfSpaceError(CheckpointError):
    """A save ran out of disk space; the message names the directory, the space the
    checkpoint needs and the last complete checkpoint."""


# -- reading what a checkpoint holds, never running code ----------------------------------


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and sizes, and nothing else: a .metadata
    file that names any other callable is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by _MetadataUnpickler instead of pickle.load
    (the tensors and the optimizer's small objects are torch.load(weights_only=True)'d by DCP)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = Path(self.path) / DCP_METADATA
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.path}: {DCP_METADATA} is not a checkpoint's metadata ({e}); refusing to load it"
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(
                f"checkpoint {self.path}: {DCP_METADATA} holds a {type(metadata).__name__}, not a checkpoint's metadata"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def dcp_load(state: dict, path: Path, *, distributed: bool = False) -> None:
    """dcp.load through SafeFileSystemReader; its failures as one CheckpointError line."""
    try:
        with quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), no_dist=not distributed)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"cannot load checkpoint {path}: {_root_cause(e)}") from None


def dcp_keys(path: Path) -> set[str]:
    """The state-dict keys a checkpoint's DCP files hold."""
    return set(SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _weights_only_load(path: Path) -> Any:
    """A .pt file of an earlier version's checkpoint: tensors and plain data only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path.parent}: refusing to load {path.name}: it holds objects other than tensors "
            f"and plain data, which could run code when unpickled ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is unreadable ({_first_line(e)})") from None


def _wrapped(failure: Any) -> BaseException | None:
    """The exception of one entry of DCP's CheckpointException.failures: an (exception,
    traceback) pair."""
    inner = failure[0] if isinstance(failure, tuple) and failure else failure
    return inner if isinstance(inner, BaseException) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


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


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _rng_bytes() -> bytes:
    """This process's RNG streams as a safetensors file: torch's (CPU, and the current CUDA
    device's) and numpy's key as tensors; python's state and numpy's position in the metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()  # the current device: one device per rank
    version, internal, gauss = random.getstate()
    plain: dict[str, Any] = {"python": [version, list(internal), gauss]}
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
    plain["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    return save_safetensors(tensors, metadata={"rng": json.dumps(plain)})


def _restore_rng(path: Path) -> None:
    """Set this process's RNG streams from a file of _rng_bytes (or an earlier version's .pt)."""
    if path.suffix == ".pt":
        state = _weights_only_load(path)
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if "numpy" in state:
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        return
    tensors = load_safetensors(path.read_bytes())
    with safe_open(path, "pt") as f:
        plain = json.loads(f.metadata()["rng"])
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    import numpy as np

    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))


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
            original = ckpt_root / (STEP_PREFIX + child.name[len(OLD_PREFIX) :])
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
            f"checkpoint {path} is the leftover of an interrupted save; use a step-XXXXXXXX directory (or 'latest')"
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
    if not (path / APP_STATE).is_file() and not (path / LEGACY_APP_STATE).is_file():
        raise CheckpointError(f"checkpoint {path} has no {APP_STATE} (step, scheduler and data state)")
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMPLETE} marker ({e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
        raise CheckpointError(f"checkpoint {path}: its {COMPLETE} marker is not a scalora-dist marker")
    return marker


def verify_checkpoint(path: Path, *, checksums: bool = True) -> None:
    """Check a complete checkpoint's files against its manifest (sizes, then checksums);
    CheckpointError naming the checkpoint and the file otherwise. Every rank calls it when
    distributed: each checks a share of the files, and all learn every finding. A checkpoint
    of an earlier version has no manifest: it is only checked for its files' presence."""
    path = Path(path)
    marker = _check_checkpoint_dir(path)
    files = marker.get("files")
    if files is None:
        if rank_world()[0] == 0:
            log.warning(
                "checkpoint %s was written before checkpoints had a manifest: its files cannot be verified", path
            )
        return
    rank, world = rank_world()
    names = sorted(files)
    found = manifest.problems(path, files, names[rank::world], checksums=checksums)
    if _distributed():
        everyone: list[list[str] | None] = [None] * world
        dist.all_gather_object(everyone, found)
        found = [p for share in everyone for p in share or []]
    if found:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(sorted(found))}")


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
    app_json = _app_state_json(app_state) if rank == 0 else ""

    def prepare() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(ckpt_root)
        tmp.mkdir()

    model_sd, optim_sd = _training_state(model, optimizer)
    needed = _total_bytes(model_sd, optim_sd)
    try:
        raise_if_any_rank_failed(attempt(prepare) if rank == 0 else None, f"checkpoint save: creating {tmp}")
        failure = None
        try:
            with quiet_single_process():  # collective; raises on every rank if one fails
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not _distributed())
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            failure = e
        del model_sd, optim_sd
        if failure is not None:
            raise failure

        def write_own_files() -> dict[str, dict]:
            if not tmp.is_dir():
                raise CheckpointError(
                    f"{tmp} is not visible here: the checkpoint directory must be on a filesystem shared by all ranks"
                )
            _write_durable(tmp / _rng_file(rank), _rng_bytes())
            if rank == 0:
                _write_durable(tmp / APP_STATE, app_json.encode())
            mine = sorted(p.name for p in tmp.iterdir() if p.is_file() and manifest.writer_rank(p.name) == rank)
            return manifest.describe(tmp, mine)

        files: dict[str, dict] = {}
        error = attempt(lambda: files.update(write_own_files()))
        raise_if_any_rank_failed(error, f"checkpoint save: writing {tmp}")  # all files on disk
        files = _gather_manifest(files)
        slow = float(os.environ.get(SLOW_SAVE_ENV) or 0)
        if slow:  # fault injection: a save that takes long enough to be interrupted (tests)
            time.sleep(slow)

        def commit() -> None:
            marker = {
                "format": FORMAT,
                "step": step,
                "world_size": world,
                "saved_at": time.time(),
                "save_seconds": round(time.perf_counter() - started, 3),
                "files": files,
            }
            _write_durable(tmp / COMPLETE, (json.dumps(marker) + "\n").encode())
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
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        full = out_of_space(e, ckpt_root)  # before the partial save is removed: the disk is still full
        _abandon(tmp, rank)
        if full:
            raise OutOfSpaceError(_out_of_space_message(ckpt_root, step, needed)) from None
        raise
    return final


def _app_state_json(app_state: dict) -> str:
    try:
        return json.dumps(app_state, indent=1) + "\n"
    except TypeError as e:  # a bug of ours, never a user's: say what could not be stored
        raise TypeError(f"checkpoint app state must be plain data (JSON): {e}") from None


DCP_BYTES_PER_TENSOR = 1800
"""What DCP's files hold per tensor besides its data (measured: 1.7 KB on torch 2.13): it
matters only for tiny models, whose checkpoints it dominates."""


def _total_bytes(*state_dicts: dict) -> int:
    """About the bytes a DCP checkpoint of these state dicts takes, all ranks' shards together."""

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            t = x.to_local() if hasattr(x, "to_local") else x
            return t.numel() * t.element_size() + DCP_BYTES_PER_TENSOR
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return int(_sum_over_ranks(sum(walk(sd) for sd in state_dicts)))


def _sum_over_ranks(x: float) -> float:
    if not _distributed():
        return x
    total = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return total.item()


def _gather_manifest(files: dict[str, dict]) -> dict[str, dict]:
    """Every rank's manifest entries, on every rank."""
    if not _distributed():
        return files
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, files)
    return {name: entry for share in everyone for name, entry in (share or {}).items()}


def _abandon(tmp: Path, rank: int) -> None:
    """A failed save leaves nothing behind: its temporary directory goes (rank 0, once every
    rank has stopped writing into it: the failure was agreed on, or raised by DCP on all)."""
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def out_of_space(error: BaseException, where: Path) -> bool:
    """Whether `error` comes from a full disk: ENOSPC (or EDQUOT) anywhere in its chain or
    among the failures DCP collected from the ranks, or a write error of torch's zip writer
    ("unexpected pos", which carries no errno) while the filesystem has next to nothing free."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    zip_write_error = False
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        zip_write_error |= "unexpected pos" in str(e)
        stack += [x for x in (e.__cause__, e.__context__) if x is not None]
        stack += [inner for inner in map(_wrapped, getattr(e, "failures", {}).values()) if inner is not None]
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)
    if zip_write_error:
        try:
            return shutil.disk_usage(_existing(where)).free < 1 << 20
        except OSError:
            return False
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _out_of_space_message(ckpt_root: Path, step: int, needed: int) -> str:
    try:
        free = f", {format_bytes(shutil.disk_usage(_existing(ckpt_root)).free)} free now"
    except OSError:
        free = ""
    last = latest_checkpoint(ckpt_root)
    if last is not None:  # what the last one took on disk: the best estimate there is
        needed = sum(f.stat().st_size for f in last.iterdir() if f.is_file())
    resume = (
        f"the last complete checkpoint is {last}: free some space, then run again with --resume latest"
        if last is not None
        else "no complete checkpoint was written yet: free some space and start again"
    )
    return (
        f"checkpoint save at step {step}: out of disk space in {ckpt_root} (the checkpoint needs about "
        f"{format_bytes(needed)}{free}); the partial save was removed; {resume}"
    )


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def estimated_checkpoint_bytes(model: nn.Module, moment_bytes: float = 8) -> int:
    """About what a checkpoint of this model takes on disk, before the optimizer has state:
    the checkpointed model state (everything but frozen 4-bit codes) plus `moment_bytes` of
    optimizer state per trainable parameter (AdamW's two float32 moments: 8; 8-bit AdamW's:
    about 2), all ranks together. Every rank calls it when distributed (one all-reduce)."""
    frozen = tuple(_frozen_codes(model))
    model_sd = {k: v for k, v in model.state_dict().items() if not any(k == f or k.startswith(f + ".") for f in frozen)}
    trainable = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    moments = moment_bytes * sum(p.numel() for p in trainable) + 2 * DCP_BYTES_PER_TENSOR * len(trainable)
    return _total_bytes(model_sd) + int(_sum_over_ranks(moments))


def warn_if_short_of_space(run_dir: Path, checkpoint_bytes: int) -> None:
    """Warn when run_dir's filesystem has room for fewer than two checkpoints: a save writes
    the new checkpoint before an old one is removed (train.keep_last)."""
    try:
        free = shutil.disk_usage(_existing(Path(run_dir))).free
    except OSError:
        return
    if free < 2 * checkpoint_bytes:
        log.warning(
            "output.dir %s has %s free, and a checkpoint of this run takes about %s: a save needs room "
            "for two (the new one is written before an old one is removed); free some space or move "
            "output.dir",
            run_dir,
            format_bytes(free),
            format_bytes(checkpoint_bytes),
        )


def _prune(ckpt_root: Path, just_saved: Path, keep_last: int) -> None:
    complete = _complete_checkpoints(ckpt_root)
    saved_step = int(_STEP_DIR_RE.match(just_saved.name).group(1))
    newer = [p.name for s, p in complete if s > saved_step]
    if newer:
        log.warning(
            "checkpoints newer than the one just saved (%s) exist: %s; they are from an "
            "earlier run and 'latest' still picks them",
            just_saved.name,
            ", ".join(newer),
        )
    if keep_last <= 0:
        return
    others = [p for _, p in complete if p != just_saved]
    for path in others[: max(len(others) - (keep_last - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


def newest_verified_checkpoint(ckpt_root: Path, *, checksums: bool = True) -> Path | None:
    """The newest complete checkpoint under ckpt_root that verifies against its manifest
    (what --resume auto continues from): each newer one that does not is skipped with a
    warning saying why. None when there is no complete checkpoint; CheckpointError when
    there are some and none verifies (starting afresh would silently drop the run)."""
    complete = _complete_checkpoints(Path(ckpt_root))
    skipped = []
    for _, path in reversed(complete):
        try:
            verify_checkpoint(path, checksums=checksums)
        except CheckpointError as e:
            skipped.append(str(e))
            if rank_world()[0] == 0:
                log.warning("resume auto: skipping %s; falling back to an older checkpoint", e)
            continue
        return path
    if skipped:
        raise CheckpointError(f"resume auto: no checkpoint under {ckpt_root} verifies ({'; '.join(skipped)})")
    return None


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
            partial = sorted(c.name for c in ckpt_root.iterdir() if c.is_dir()) if ckpt_root.is_dir() else []
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
        model_sd = {k: v for k, v in model_sd.items() if not any(k == f or k.startswith(f + ".") for f in frozen)}
    return model_sd, optim_sd


def read_app_state(path: Path) -> dict:
    """A complete checkpoint's small rank-independent state (step, config, scheduler, data
    position, ...) without touching the model; CheckpointError if it is not one."""
    path = Path(path)
    _check_checkpoint_dir(path)
    if not (path / APP_STATE).is_file():
        state = _weights_only_load(path / LEGACY_APP_STATE)
    else:
        try:
            state = json.loads((path / APP_STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: {APP_STATE} is unreadable ({_first_line(e)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: {APP_STATE} is not a scalora-dist app state (it has no step)")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, verify: bool = True) -> dict:
    """Load model and optimizer state in place (every rank calls it, any world size and
    sharding) and return the saved app_state. Each rank's RNG streams are restored when the
    world size matches the saving job's; otherwise they restart (a warning says so). The
    checkpoint is verified first (verify_checkpoint) unless the caller just did."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    marker = _check_checkpoint_dir(path)
    app_state = read_app_state(path)
    rank, world = rank_world()
    model_sd, optim_sd = _training_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, path, distributed=_distributed())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=not _frozen_codes(model)),  # the codes stay as loaded
    )
    del state, model_sd, optim_sd

    saved_world = marker.get("world_size")
    rng_file = next((f for f in (path / _rng_file(rank), path / f"rng-rank{rank}.pt") if f.is_file()), None)
    if saved_world == world and rng_file is not None:
        _restore_rng(rng_file)
    elif rank == 0:
        log.warning(
            "checkpoint %s was saved by %s process(es), this job has %d: random number "
            "streams restart (this only affects dropout)",
            path,
            saved_world,
            world,
        )
    log.info("resumed from %s (step %s)", path, marker.get("step"))
    return app_state


def _root_cause(error: BaseException) -> str:
    """One line for a failed DCP load: the innermost error of the first failing rank (DCP's
    CheckpointException message holds every rank's whole traceback)."""
    e = error
    failures = getattr(e, "failures", None)
    if failures:
        rank, failure = sorted(failures.items())[0]
        inner = _wrapped(failure)
        if inner is not None:
            return f"rank {rank}: {_root_cause(inner)}"
    while e.__cause__ is not None:
        e = e.__cause__
    return _first_line(e)
