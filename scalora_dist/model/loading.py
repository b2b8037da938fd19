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


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    model_dir = check_model_dir(cfg.path)
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package "
            "(pip install 'scalora-dist[flash]'); use sdpa otherwise"
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=model_dtype(cfg, device),
        attn_implementation=cfg.attn_implementation,
        device_map={"": torch.device(device)},
    )
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
