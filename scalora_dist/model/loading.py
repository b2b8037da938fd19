"""Reading a transformers checkpoint into a model built on the meta device.

Names: a checkpoint stores tensors under its own names (Gemma-3's multimodal checkpoints
say `language_model.model.layers.0...` where the model has `model.language_model.layers.0...`).
transformers' own conversion table (`get_model_conversion_mapping`, what `from_pretrained`
applies) renames every checkpoint key to the model's name; nothing here knows any
architecture. The same table, reversed, names the tensors of the merged export.

Slices: a parameter that FSDP2 has sharded is a DTensor; this rank reads only its block of
each tensor (safetensors slices are memory-mapped reads), so no rank ever holds a full copy
of the model. 4-bit layers are the exception the format forces: bitsandbytes quantises a
whole weight, so each rank reads one full weight at a time, quantises it and keeps its rows
of the codes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from scalora_dist.config import ConfigError, ModelConfig
from scalora_dist.distributed import local_tensor
from scalora_dist.model.quant import is_quantized_linear, quantize_weight

log = logging.getLogger("scalora_dist")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`: bf16 on a CUDA device that supports it, float32 elsewhere (CPU)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so EOS is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when the checkpoint is sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model.path: {index} is not a safetensors index (no weight_map: {e})") from None
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise ConfigError(
                f"model.path: {index} names {len(missing)} shard(s) that are not in {model_dir}: "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (an interrupted download or copy?)"
            )
        return {k: model_dir / f for k, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ConfigError(
            f"model.path: {model_dir} has no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are read)"
        )
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def model_names_of_checkpoint(model: nn.Module, ckpt_keys: list[str], conversions: list) -> dict[str, str]:
    """checkpoint key -> model key, through transformers' renamings (from_pretrained's own
    rules, base-model prefix included). Keys that name nothing in the model map to
    themselves and are reported by the caller. Conversions that reshape tensors (fused
    experts, split qkv) are refused: the shard reader copies tensors, it does not rebuild them."""
    from transformers.core_model_loading import WeightConverter, rename_source_key

    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_state = dict.fromkeys(model.state_dict())
    names = {}
    for key in ckpt_keys:
        renamed, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, converter = key, None
        if converter is not None:
            raise ConfigError(
                f"model.path: the checkpoint stores {key!r} in a layout that transformers "
                f"converts while loading ({converter!r}); scalora-dist reads tensors that only "
                "need renaming (dense decoder models: Llama, Mistral, Qwen, Gemma, ...)"
            )
        names[key] = renamed
    return names


def local_offsets(param: torch.Tensor) -> tuple[int, ...]:
    """Global offset of this rank's block of a (possibly FSDP2-sharded) tensor."""
    if not isinstance(param, DTensor):
        return (0,) * param.dim()
    _, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offsets)


def local_block(full: torch.Tensor, offsets: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]


def record_weight_conversions(model: nn.Module, conversions: list) -> None:
    """Keep on the model the key conversions its weights were read through, where
    transformers' own `from_pretrained` keeps them (`model._weight_conversions`): that
    attribute is transformers' interface, read back by its `revert_weight_conversion` (and
    `save_pretrained`), which the merged export calls to write the checkpoint's own names.
    Only the conversions that matched a checkpoint key are kept, as transformers does."""
    model._weight_conversions = [c for c in conversions if c.was_used()]


@torch.no_grad()
def load_checkpoint_weights(model: nn.Module, model_dir: Path, conversions: list) -> set[str]:
    """Fill the model's parameters and persistent buffers from the checkpoint, each rank
    its own block; returns the model keys that were filled. Unknown checkpoint tensors are
    reported; model tensors the checkpoint lacks are left for the caller to judge."""
    files = checkpoint_files(model_dir)
    names = model_names_of_checkpoint(model, sorted(files), conversions)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    unknown = [k for k, name in names.items() if name not in targets]
    if unknown:
        log.warning(
            "model.path: %d checkpoint tensor(s) match nothing in %s and are not loaded: %s",
            len(unknown),
            type(model).__name__,
            ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""),
        )
    filled: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for key, name in names.items():
        if name in targets:
            by_file.setdefault(files[key], []).append(key)
    for path, keys in by_file.items():
        for key in keys:
            name = names[key]
            # One short-lived mapping per tensor: pages read for it are released with it, so
            # a rank's resident memory holds its shards, not the parts of the file it touched.
            with safe_open(path, "pt", device="cpu") as f:
                _fill(model, name, targets[name], f.get_slice(key))
            filled.add(name)
    return filled


def _fill(model: nn.Module, name: str, target: torch.Tensor, source) -> None:
    local = local_tensor(target)
    offsets = local_offsets(target)
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr == "weight" and is_quantized_linear(owner):
        full = source[:].to(device=local.device, dtype=getattr(owner, "quant_settings")[2])
        codes = quantize_weight(owner, full)
        local.copy_(local_block(codes, offsets, local.shape))
        return
    index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
    local.copy_(source[index] if local.dim() else source[:])
