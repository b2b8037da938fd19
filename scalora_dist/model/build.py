"""The one model-building path, for every world size (a world of one included):

    meta-device build -> 4-bit layers (optional) -> adapters -> FSDP2 (several processes)
    -> allocate this rank's part -> computed buffers -> checkpoint weights -> adapter init

as torchtitan builds its models. No rank ever materialises more than its shards (and, for a
4-bit base, one full weight at a time while quantising it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from scalora_dist.config import AdapterConfig, ConfigError, ModelConfig
from scalora_dist.distributed import local_tensor
from scalora_dist.model.chunked_loss import enable_chunked_loss, resolve_loss_kernel
from scalora_dist.model.compile import compile_decoder_blocks
from scalora_dist.model.loading import (
    load_checkpoint_weights,
    local_block,
    local_offsets,
    model_dtype,
    record_weight_conversions,
)
from scalora_dist.model.lora import find_target_linears, initial_lora_A, inject_adapters, lora_layers
from scalora_dist.model.quant import quantize_linears_, require_bitsandbytes
from scalora_dist.model.sharding import apply_fsdp, compute_dtype

_ADAPTER_TENSORS = ("lora_A", "lora_B", "acc_U", "acc_V")


def model_class(config: PretrainedConfig) -> type:
    """The checkpoint's own architecture class (config.architectures), so a multimodal
    checkpoint trains and exports as itself; else what AutoModelForCausalLM maps to."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and isinstance(config, cls.config_class):
            return cls
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(
            f"model.path: {type(config).__name__} ({config.model_type}) is not a causal language "
            "model transformers knows"
        ) from None


def build_model(
    model_dir: str | Path,
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig | None,
    device: torch.device,
    *,
    seed: int = 0,
    mesh: DeviceMesh | None = None,
    compile: bool = False,
) -> nn.Module:
    """The model of `model_dir` (a resolved local checkpoint directory), adapted as
    `adapter_cfg` says (None: frozen, no adapters), FSDP2-sharded over `mesh` when given,
    its decoder blocks compiled when `compile` (train.compile)."""
    check_attention(model_cfg)
    model_dir = Path(model_dir)
    dtype = model_dtype(model_cfg, device)
    model = meta_model(model_dir, model_cfg, dtype)
    from transformers.conversion_mapping import get_model_conversion_mapping

    conversions = get_model_conversion_mapping(model)  # before any class is swapped
    checkpoint_keys = set(model.state_dict())
    if model_cfg.load_in_4bit:
        require_bitsandbytes()
        # every linear of the language model but the head (the layers all-linear adapts)
        quantize_linears_(model, find_target_linears(model, "all-linear"), model_cfg, dtype)
    if adapter_cfg is not None:
        inject_adapters(model, adapter_cfg, seed=seed)
    else:
        model.requires_grad_(False)
    if model_cfg.chunked_loss:
        kernel = resolve_loss_kernel(model_cfg.loss_kernel, device, model_cfg.loss_chunk_tokens)
        enable_chunked_loss(model, model_cfg.loss_chunk_tokens, kernel)
    if compile:
        compile_decoder_blocks(model)
    if mesh is not None:
        apply_fsdp(
            model,
            mesh,
            param_dtype=compute_dtype(dtype),
            cpu_offload=model_cfg.cpu_offload,
            replicated_weights=frozen_linear_weights(model) if model_cfg.base_placement == "replicated" else None,
        )
    model.to_empty(device="cpu" if model_cfg.cpu_offload else device)
    _tie_weights(model)
    _init_computed_buffers(model, device)
    filled = load_checkpoint_weights(model, model_dir, conversions)
    record_weight_conversions(model, conversions)  # the merged export writes the checkpoint's names
    _check_complete(model, checkpoint_keys, filled, model_dir)
    _init_adapters(model, seed)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def frozen_linear_weights(model: nn.Module) -> set[nn.Parameter]:
    """The frozen weights (float, or 4-bit codes) of the language model's linear layers but
    the head: what `model.base_placement: replicated` keeps whole on every rank."""
    modules = dict(model.named_modules())
    weights = {modules[name].weight for name in find_target_linears(model, "all-linear")}
    return {w for w in weights if not w.requires_grad}


def check_attention(model_cfg: ModelConfig) -> None:
    if model_cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package "
            "(pip install 'scalora-dist[flash]'); use sdpa otherwise"
        )


def meta_model(model_dir: Path, model_cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model on the meta device: its architecture, no memory."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=dtype, attn_implementation=model_cfg.attn_implementation)
    _disable_cache(model)
    return model


def _disable_cache(model: nn.Module) -> None:
    model.config.use_cache = False
    text = model.config.get_text_config()
    if text is not model.config:
        text.use_cache = False


def _tie_weights(model: nn.Module) -> None:
    """`to_empty` gives each module a new tensor, which unties tied embeddings in one process
    (FSDP2 keeps its shared parameters shared); tie them again as transformers does."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if any(model.get_parameter(t) is not model.get_parameter(s) for t, s in tied.items()):
        model.tie_weights()


def _init_computed_buffers(model: nn.Module, device: torch.device) -> None:
    """Rotary frequencies, embedding scales and similar buffers are computed, not stored in
    checkpoints; transformers' own initialisers recompute them (parameters they touch are
    overwritten by the checkpoint next)."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)
    for name, buf in model.named_buffers():
        if buf.device != device and buf.device.type != "meta":
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._buffers[attr] = buf.to(device)


def _check_complete(model: nn.Module, expected: set[str], filled: set[str], model_dir: Path) -> None:
    """Every tensor of the plain model must have come from the checkpoint (tied ones count
    once: their tensor was filled under the other name)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    filled_ids = {id(tensors[n]) for n in filled}
    missing = sorted(
        n
        for n in expected
        if n in tensors and id(tensors[n]) not in filled_ids and n.rpartition(".")[2] not in _ADAPTER_TENSORS
    )
    if missing:
        raise ConfigError(
            f"model.path: the checkpoint in {model_dir} has no tensor for {', '.join(missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            + f"; is it a checkpoint of {type(model).__name__}?"
        )


@torch.no_grad()
def _init_adapters(model: nn.Module, seed: int) -> None:
    """lora_B and the 4-bit accumulators start at zero; lora_A from a generator keyed by the
    layer's name, so every rank and world size draws the same values (each keeps its block)."""
    for name, layer in lora_layers(model).items():
        for tensor in (layer.lora_B, layer.acc_U, layer.acc_V):
            if tensor is not None:
                local_tensor(tensor).zero_()
        full = initial_lora_A(name, layer.rank, layer.in_features, seed)
        local = local_tensor(layer.lora_A)
        local.copy_(local_block(full, local_offsets(layer.lora_A), local.shape))
