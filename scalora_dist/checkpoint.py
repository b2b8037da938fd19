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

`export_merged` writes an ordinary transformers checkpoint of the merged weights
(`W0 + s * lora_B @ lora_A` under the original weight names) from a possibly sharded model,
gathering one parameter at a time.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from scalora_dist.model.loading import dequantize, is_quantized_linear, quant_state
from scalora_dist.model.lora import LoRALinear

log = logging.getLogger(__name__)

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
COMPLETE = "COMPLETE"
APP_STATE = "app_state.pt"
DCP_METADATA = ".metadata"
FORMAT = "scalora-dist-dcp-1"
_STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unusable; the message names what and where."""


# -- small helpers ---------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _attempt(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # reported to every rank by _agree
        return e
    return None


def _agree(error: BaseException | None, what: str) -> None:
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
def _quiet_single_process():
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
    rank, world = _rank_world()
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{step:08d}"
    started = time.perf_counter()

    def prepare() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(ckpt_root)
        tmp.mkdir()

    _agree(_attempt(prepare) if rank == 0 else None, f"checkpoint save: creating {tmp}")

    model_sd, optim_sd = _training_state(model, optimizer)
    with _quiet_single_process():  # collective; raises on every rank if one fails
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

    _agree(_attempt(write_own_files), f"checkpoint save: writing {tmp}")  # all files on disk

    def commit() -> None:
        marker = {"format": FORMAT, "step": step, "world_size": world, "saved_at": time.time()}
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

    _agree(_attempt(commit) if rank == 0 else None, f"checkpoint save: committing {final}")
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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer state in place (every rank calls it, any world size and
    sharding) and return the saved app_state. Each rank's RNG streams are restored when the
    world size matches the saving job's; otherwise they restart (a warning says so)."""
    path = Path(path)
    marker = _check_checkpoint_dir(path)
    rank, world = _rank_world()
    model_sd, optim_sd = _training_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _quiet_single_process():
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


# -- public API: merged export ---------------------------------------------------------------


@dataclass
class _Item:
    """One tensor of the exported checkpoint: its name, size, and how to build it. On sharded
    models `build` is a collective: every rank calls it, in the same order; it returns the
    full CPU tensor where `keep` is true (rank 0) and None elsewhere."""

    name: str
    nbytes: int
    build: Callable[[bool], torch.Tensor | None]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather on DTensors: every rank must call it)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _out_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.dtype.is_floating_point else t.dtype


def _param_item(name: str, t: torch.Tensor, dtype: torch.dtype) -> _Item:
    out = _out_dtype(t, dtype)

    def build(keep: bool) -> torch.Tensor | None:
        full = _full(t)
        return full.to(device="cpu", dtype=out, copy=True).contiguous() if keep else None

    return _Item(name, t.numel() * out.itemsize, build)


def _lora_item(name: str, layer: LoRALinear, dtype: torch.dtype) -> _Item:
    weight = layer.base.weight
    if layer.quantized:
        # 4-bit base: dequantised codes + the low-rank accumulator of merged updates + adapter.
        def build_quantized(keep: bool) -> torch.Tensor | None:
            codes, a, b = _full(weight), _full(layer.lora_A), _full(layer.lora_B)
            acc = (_full(layer.acc_U), _full(layer.acc_V)) if layer.acc_U is not None else None
            if not keep:
                return None
            merged = dequantize(codes, layer.quant_state) + (b.float() @ a.float()) * layer.scale
            if acc is not None:
                merged += acc[0].float() @ acc[1].float().T
            return merged.to(device="cpu", dtype=dtype).contiguous()

        numel = layer.base.out_features * layer.base.in_features
        return _Item(f"{name}.weight", numel * dtype.itemsize, build_quantized)

    def build(keep: bool) -> torch.Tensor | None:
        w, a, b = _full(weight), _full(layer.lora_A), _full(layer.lora_B)
        if not keep:
            return None
        merged = w.float() + (b.float() @ a.float()) * layer.scale
        return merged.to(device="cpu", dtype=dtype).contiguous()

    return _Item(f"{name}.weight", weight.numel() * dtype.itemsize, build)


def _dequantized_item(name: str, module: nn.Module, dtype: torch.dtype) -> _Item:
    """A bitsandbytes 4-bit layer that was not adapted, written in full precision."""

    def build(keep: bool) -> torch.Tensor | None:
        codes = _full(module.weight)  # whole on every rank, or gathered from FSDP2 shards
        if not keep:
            return None
        return dequantize(codes, quant_state(module)).to(device="cpu", dtype=dtype).contiguous()

    return _Item(name, module.out_features * module.in_features * dtype.itemsize, build)


def _is_quantized(module: nn.Module) -> bool:
    if getattr(module, "quant_state", None) is not None:
        return True
    return any(
        type(p).__name__ in ("Params4bit", "Int8Params") for p in module.parameters(recurse=False)
    )


def _export_groups(model: nn.Module, dtype: torch.dtype) -> list[list[_Item]]:
    """The exported tensors in state_dict order, grouped by decoder block (a block is a module
    whose class is in the model's `_no_split_modules`, else a child of an nn.ModuleList);
    tensors outside blocks form one group each."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    seen: dict[int, str] = {}
    groups: list[list[_Item]] = []
    current: list[_Item] | None = None  # the open block group, if any

    def emit(item: _Item) -> None:
        if current is not None:
            current.append(item)
        else:
            groups.append([item])

    def walk(module: nn.Module, prefix: str, parent: nn.Module | None) -> None:
        nonlocal current
        is_block = current is None and (
            # the MRO, since FSDP2 swaps in an `FSDP<Class>` subclass
            any(c.__name__ in block_classes for c in type(module).__mro__)
            if block_classes
            else isinstance(parent, nn.ModuleList)
        )
        if is_block:
            current = []
        quantized = _is_quantized(module) or (isinstance(module, LoRALinear) and _is_quantized(module.base))
        if quantized and not isinstance(module, LoRALinear):
            emit(_dequantized_item(prefix + "weight", module, dtype))
            if getattr(module, "bias", None) is not None:
                emit(_param_item(prefix + "bias", module.bias, dtype))
        elif isinstance(module, LoRALinear):
            emit(_lora_item(prefix.rstrip("."), module, dtype))
            if module.base.bias is not None:
                emit(_param_item(prefix + "bias", module.base.bias, dtype))
        else:
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                name = prefix + pname
                if id(p) in seen:
                    if tied:
                        continue  # tied to seen[id(p)] (lm_head -> embed_tokens): the loader re-ties
                    log.warning("export_merged: %s shares its tensor with %s; writing a copy",
                                name, seen[id(p)])
                seen.setdefault(id(p), name)
                emit(_param_item(name, p, dtype))
            for bname, b in module._buffers.items():
                if b is None or bname in module._non_persistent_buffers_set:
                    continue
                emit(_param_item(prefix + bname, b, dtype))
            for cname, child in module._modules.items():
                if child is not None:
                    walk(child, f"{prefix}{cname}.", module)
        if is_block:
            if current:
                groups.append(current)
            current = None

    walk(model, "", None)
    return groups


class _ShardWriter:
    """Rank 0's buffer of full tensors, written as safetensors files at group boundaries."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def before_group(self, group_bytes: int) -> None:
        """Flush first if the group would push the buffer past max_shard_bytes."""
        if self.buffer and self.buffer_bytes + group_bytes > self.max_shard_bytes:
            self.flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.buffer[name] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out_dir / f".tmp-model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the files to their final names (the count is known now); write the index
        when there is more than one. Returns the file names."""
        self.flush()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map: dict[str, str] = {}
        names = []
        for k, (path, keys) in enumerate(self.files, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            names.append(final)
            weight_map.update({key: final for key in keys})
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _to_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo transformers' load-time weight conversions, if the architecture has any (none of
    llama/mistral/qwen2/qwen3/gemma3 does), as its save_pretrained does shard by shard."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: module names are the checkpoint names
        return tensors
    return dict(revert_weight_conversion(model, tensors))


def _unwrapped_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a dynamic `FSDP<Class>` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _clear_old_weights(out_dir: Path) -> None:
    for pattern in ("model*.safetensors", "model.safetensors.index.json", ".tmp-model-*.safetensors"):
        for f in out_dir.glob(pattern):
            f.unlink()


@torch.no_grad()
def export_merged(
    model: nn.Module,
    out_dir: Path,
    tokenizer,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path | None:
    """Write a transformers checkpoint of the merged weights to out_dir; every rank calls it.

    Each LoRALinear becomes `<name>.weight = base.weight + scale * lora_B @ lora_A` (the
    original weight name, without `.base`); other parameters and persistent buffers keep
    their names; floating tensors are cast to `dtype`. A tied output head is skipped when
    the config ties word embeddings. Tensors are gathered one at a time (all ranks take
    part, only rank 0 keeps them); rank 0 writes a safetensors file whenever adding the next
    decoder block would pass max_shard_bytes, so it holds at most one file's worth of full
    tensors (or one block, if larger). One file -> model.safetensors; several ->
    model-0000K-of-0000N.safetensors + model.safetensors.index.json. Rank 0 also writes the
    config (dtype set, use_cache on), the generation config and the tokenizer.
    Returns out_dir on rank 0, None on the other ranks.
    """
    out_dir = Path(out_dir)
    rank, _ = _rank_world()
    groups = _export_groups(model, dtype)  # identical on every rank: no collective yet

    # Rank 0 keeps taking part in every gather even after a write error (the others would
    # otherwise block in the next one); the error is raised on all ranks at the end.
    error: BaseException | None = None
    writer: _ShardWriter | None = None
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _clear_old_weights(out_dir)
            writer = _ShardWriter(out_dir, max_shard_bytes)
        except Exception as e:
            error = e
    for group in groups:
        keep = writer is not None and error is None
        if keep:
            try:  # flush before gathering the group: at most one file's worth is held
                writer.before_group(sum(item.nbytes for item in group))
            except Exception as e:
                error = e
        tensors = {item.name: item.build(keep and error is None) for item in group}
        if keep and error is None:
            try:
                for name, tensor in _to_checkpoint_names(model, tensors).items():
                    writer.add(name, tensor)
            except Exception as e:
                error = e
        del tensors

    if writer is not None and error is None:
        error = _attempt(lambda: _write_metadata(model, out_dir, tokenizer, dtype, writer))
    _agree(error, f"export_merged to {out_dir}")
    return out_dir if rank == 0 else None


def _write_metadata(model: nn.Module, out_dir: Path, tokenizer, dtype: torch.dtype,
                    writer: _ShardWriter) -> None:
    files = writer.finish()
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the export is full precision
    config.use_cache = True
    if not getattr(config, "architectures", None):
        config.architectures = [_unwrapped_class(model).__name__]
    config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    log.info("exported merged weights to %s (%s)", out_dir, ", ".join(files))

