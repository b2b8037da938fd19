"""Merged exports: an ordinary transformers checkpoint of the fine-tuned weights.

* `export_merged(model, ...)`: from the live (possibly FSDP2-sharded) model at the end of a
  run; every rank takes part, rank 0 writes.
* `export_checkpoint(ckpt_dir, out)`: from any complete DCP checkpoint of a run, offline, in
  one CPU process, whatever the number of ranks that wrote it: the model is built on the
  meta device and filled one group (decoder block) at a time from the checkpoint (DCP
  reshards on read) and, for a 4-bit base, from model.path (the codes are not in
  checkpoints: they are quantised again, as training did), so it never holds more than one
  block beyond what it is writing.

Each LoRA layer becomes `<name>.weight = W0 + s * lora_B @ lora_A` (plus the dequantised
codes and the accumulator on a 4-bit base) under the checkpoint's own names (transformers'
conversion table, reversed); for LoRA runs the PEFT adapter is written too by the caller.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from scalora_dist.config import config_from_dict
from scalora_dist.model.build import meta_model
from scalora_dist.model.hub import resolve_model_dir
from scalora_dist.model.loading import (
    DTYPES,
    checkpoint_files,
    load_tokenizer,
    model_names_of_checkpoint,
    record_weight_conversions,
)
from scalora_dist.model.lora import LoRALinear, find_target_linears, inject_adapters
from scalora_dist.model.quant import (
    dequantize,
    is_quantized_linear,
    quant_state,
    quantize_linears_,
    quantize_weight,
    require_bitsandbytes,
)
from scalora_dist.run.checkpoint import (
    CheckpointError,
    attempt,
    dcp_keys,
    dcp_load,
    raise_if_any_rank_failed,
    rank_world,
    read_app_state,
    verify_checkpoint,
)

log = logging.getLogger("scalora_dist")


@dataclass
class _Item:
    """One tensor of the exported checkpoint: its name, size, and how to build it. On sharded
    models `build` is a collective: every rank calls it, in the same order; it returns the
    full CPU tensor where `keep` is true (rank 0) and None elsewhere."""

    name: str
    nbytes: int
    build: Callable[[bool], torch.Tensor | None]
    module: nn.Module
    """The module whose own tensors `build` reads (at call time, so they may be filled in late)."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather on DTensors: every rank must call it)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _out_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.dtype.is_floating_point else t.dtype


def _param_item(name: str, module: nn.Module, attr: str, dtype: torch.dtype) -> _Item:
    t = getattr(module, attr)
    out = _out_dtype(t, dtype)

    def build(keep: bool) -> torch.Tensor | None:
        full = _full(getattr(module, attr))
        return full.to(device="cpu", dtype=out, copy=True).contiguous() if keep else None

    return _Item(name, t.numel() * out.itemsize, build, module)


def _lora_item(name: str, layer: LoRALinear, dtype: torch.dtype) -> _Item:
    if layer.quantized:
        # 4-bit base: dequantised codes + the low-rank accumulator of merged updates + adapter.
        def build_quantized(keep: bool) -> torch.Tensor | None:
            codes, a, b = _full(layer.weight), _full(layer.lora_A), _full(layer.lora_B)
            acc = (_full(layer.acc_U), _full(layer.acc_V)) if layer.acc_U is not None else None
            if not keep:
                return None
            merged = dequantize(codes, layer.quant_state) + (b.float() @ a.float()) * layer.scale
            if acc is not None:
                merged += acc[0].float() @ acc[1].float().T
            return merged.to(device="cpu", dtype=dtype).contiguous()

        numel = layer.out_features * layer.in_features
        return _Item(f"{name}.weight", numel * dtype.itemsize, build_quantized, layer)

    def build(keep: bool) -> torch.Tensor | None:
        w, a, b = _full(layer.weight), _full(layer.lora_A), _full(layer.lora_B)
        if not keep:
            return None
        merged = w.float() + (b.float() @ a.float()) * layer.scale
        return merged.to(device="cpu", dtype=dtype).contiguous()

    return _Item(f"{name}.weight", layer.weight.numel() * dtype.itemsize, build, layer)


def _dequantized_item(name: str, module: nn.Module, dtype: torch.dtype) -> _Item:
    """A bitsandbytes 4-bit layer that was not adapted, written in full precision."""

    def build(keep: bool) -> torch.Tensor | None:
        codes = _full(module.weight)  # whole on every rank, or gathered from FSDP2 shards
        if not keep:
            return None
        return dequantize(codes, quant_state(module)).to(device="cpu", dtype=dtype).contiguous()

    return _Item(name, module.out_features * module.in_features * dtype.itemsize, build, module)


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
        if is_quantized_linear(module) and not isinstance(module, LoRALinear):
            emit(_dequantized_item(prefix + "weight", module, dtype))
            if getattr(module, "bias", None) is not None:
                emit(_param_item(prefix + "bias", module, "bias", dtype))
        elif isinstance(module, LoRALinear):
            emit(_lora_item(prefix.rstrip("."), module, dtype))
            if module.bias is not None:
                emit(_param_item(prefix + "bias", module, "bias", dtype))
        else:
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                name = prefix + pname
                if id(p) in seen:
                    if tied:
                        continue  # tied to seen[id(p)] (lm_head -> embed_tokens): the loader re-ties
                    log.warning("export_merged: %s shares its tensor with %s; writing a copy", name, seen[id(p)])
                seen.setdefault(id(p), name)
                emit(_param_item(name, module, pname, dtype))
            for bname, b in module._buffers.items():
                if b is None or bname in module._non_persistent_buffers_set:
                    continue
                emit(_param_item(prefix + bname, module, bname, dtype))
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
    layer's own weight name); other parameters and persistent buffers keep
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
    rank, _ = rank_world()
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
        error = attempt(lambda: _write_metadata(model, out_dir, tokenizer, dtype, writer))
    raise_if_any_rank_failed(error, f"export_merged to {out_dir}")
    return out_dir if rank == 0 else None


def _write_metadata(model: nn.Module, out_dir: Path, tokenizer, dtype: torch.dtype, writer: _ShardWriter) -> None:
    files = writer.finish()
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the export is full precision
    config.use_cache = True
    config.get_text_config().use_cache = True
    if not getattr(config, "architectures", None):
        config.architectures = [_unwrapped_class(model).__name__]
    config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    log.info("exported merged weights to %s (%s)", out_dir, ", ".join(files))


# -- export of a checkpoint ------------------------------------------------------------------


@torch.no_grad()
def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    model_path: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write the merged transformers checkpoint of a run's DCP checkpoint to out_dir, in this
    process (no process group), as the run's own export would have. `model_path` replaces
    the recorded model.path (e.g. where the base checkpoint lives on this machine); `dtype`
    the recorded export dtype. Returns out_dir. CheckpointError / ConfigError on bad input."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    verify_checkpoint(ckpt_dir)
    app = read_app_state(ckpt_dir)
    cfg = config_from_dict(app["config"])
    if model_path:
        cfg.model.path = model_path
    run_dtype = DTYPES.get(app.get("export_dtype", ""), torch.float32)  # what the run stored
    dtype = dtype or run_dtype
    model_dir = resolve_model_dir(cfg.model)

    # The run's model, on the meta device: its names, its 4-bit layers and adapters.
    model = meta_model(model_dir, cfg.model, run_dtype)
    conversions = get_model_conversion_mapping(model)
    files = checkpoint_files(model_dir)
    to_model = model_names_of_checkpoint(model, sorted(files), conversions)
    record_weight_conversions(model, conversions)
    from_model = {name: key for key, name in to_model.items()}
    if cfg.model.load_in_4bit:
        require_bitsandbytes()
        quantize_linears_(model, find_target_linears(model, "all-linear"), cfg.model, run_dtype)
    inject_adapters(model, cfg.adapter, seed=cfg.train.seed)
    names = {module: name for name, module in model.named_modules()}
    stored = dcp_keys(ckpt_dir)

    def fill(module: nn.Module) -> None:
        """Give `module` its own tensors, from the checkpoint or (4-bit codes) from model.path."""
        module.to_empty(device="cpu", recurse=False)
        prefix = names[module] + "." if names[module] else ""
        wanted = {}
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or attr in module._non_persistent_buffers_set:
                continue
            if f"model.{prefix}{attr}" in stored:
                wanted[prefix + attr] = t
            elif attr == "weight" and is_quantized_linear(module):
                key = from_model[prefix + attr]
                with safe_open(files[key], "pt", device="cpu") as f:
                    full = f.get_tensor(key).to(module.quant_settings[2])
                t.copy_(quantize_weight(module, full))
            else:
                raise CheckpointError(f"checkpoint {ckpt_dir} has no tensor {prefix + attr}")
        if wanted:
            dcp_load({"model": wanted}, ckpt_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_old_weights(out_dir)
    writer = _ShardWriter(out_dir, max_shard_bytes)
    for group in _export_groups(model, dtype):
        modules = list(dict.fromkeys(item.module for item in group))
        for module in modules:
            fill(module)
        writer.before_group(sum(item.nbytes for item in group))
        tensors = {item.name: item.build(True) for item in group}
        for name, tensor in _to_checkpoint_names(model, tensors).items():
            writer.add(name, tensor)
        del tensors
        for module in modules:  # back to nothing: one group at a time in memory
            module.to_empty(device="meta", recurse=False)
    _write_metadata(model, out_dir, load_tokenizer(model_dir), dtype, writer)
    return out_dir


@torch.no_grad()
def export_checkpoint_adapter(
    ckpt_dir: str | Path, out_dir: str | Path, *, model_path: str | None = None
) -> Path | None:
    """For a LoRA run's checkpoint, its PEFT adapter (only the factors are read); None for
    other methods, whose result is not an adapter."""

    from scalora_dist.model.hub import model_reference
    from scalora_dist.model.lora import lora_layers, save_peft_adapter

    ckpt_dir = Path(ckpt_dir)
    cfg = config_from_dict(read_app_state(ckpt_dir)["config"])
    if cfg.adapter.method != "lora":
        return None
    if model_path:
        cfg.model.path = model_path
    model = meta_model(resolve_model_dir(cfg.model), cfg.model, torch.float32)
    inject_adapters(model, cfg.adapter, seed=cfg.train.seed)
    wanted = {}
    for name, layer in lora_layers(model).items():
        for attr in ("lora_A", "lora_B"):
            setattr(layer, attr, nn.Parameter(torch.empty(getattr(layer, attr).shape), requires_grad=False))
            wanted[f"{name}.{attr}"] = getattr(layer, attr)
    dcp_load({"model": wanted}, ckpt_dir)
    return save_peft_adapter(model, out_dir, cfg.adapter, model_reference(cfg.model))
