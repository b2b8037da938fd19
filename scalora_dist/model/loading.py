"""Loading a local transformers checkpoint (never a hub download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from scalora_dist.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`: bf16 on a CUDA device that supports it, float32 elsewhere (CPU)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_model_dir(path: str) -> Path:
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise ConfigError(
            f"model.path: {path!r} is not a directory; give a local transformers checkpoint "
            "(for a demo model run `scalora-dist make-tiny-model`)"
        )
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path: {path!r} has no config.json (not a transformers checkpoint)")
    return model_dir


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(cfg.path))
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so EOS is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the 4-bit frozen base. The packed codes are
    stored in a tensor of the model dtype, the dtype FSDP2's mixed-precision policy casts
    parameters to: that cast is then a no-op, where any real cast would turn the codes into
    random weights (method.md §6)."""
    try:
        import accelerate  # noqa: F401
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"model.load_in_4bit: needs the {e.name} package (pip install 'scalora-dist[quant]')"
        ) from None
    from transformers import BitsAndBytesConfig

    compute = dtype if cfg.quant_compute_dtype == "auto" else DTYPES[cfg.quant_compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=dtype,
    )


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (checked by name so bitsandbytes stays optional)."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def quant_state(linear: nn.Module):
    """The bitsandbytes QuantState of a 4-bit layer. Kept on the module as well as on the
    weight: FSDP2 replaces the weight by a plain sharded parameter, which has none."""
    state = getattr(linear.weight, "quant_state", None)
    return state if state is not None else linear.quant_state


def prepare_quantized_layers(model: nn.Module) -> None:
    """Make every 4-bit layer safe to shard and to switch between eval and train.

    * The QuantState goes on the module (bitsandbytes' Linear4bit looks there when its
      weight has lost it, as after FSDP2 swaps the parameter).
    * bitsandbytes (0.50) repacks 4-bit codes into an AVX512-bf16 kernel layout at the first
      CPU forward in eval mode; the repacked codes then give wrong outputs in training mode
      and only approximately convert back. Training alternates eval and train, so keep the
      portable layout."""
    for module in model.modules():
        if is_quantized_linear(module):
            module.quant_state = quant_state(module)
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def dequantize(codes: torch.Tensor, state) -> torch.Tensor:
    """Float32 weight from packed 4-bit codes (whole, not a shard) and their QuantState."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(codes, state).float()


@torch.no_grad()
def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The float32 weight of a (not sharded) bitsandbytes 4-bit layer."""
    return dequantize(linear.weight.data, quant_state(linear))


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    model_dir = check_model_dir(cfg.path)
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package "
            "(pip install 'scalora-dist[flash]'); use sdpa otherwise"
        )
    dtype = model_dtype(cfg, device)
    extra = {}
    if cfg.load_in_4bit:
        # bitsandbytes quantises while loading onto the target device (needs accelerate)
        extra = {"quantization_config": quantization_config(cfg, dtype), "device_map": {"": torch.device(device)}}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=cfg.attn_implementation, **extra
    )
    if not cfg.load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    if cfg.load_in_4bit:
        prepare_quantized_layers(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
