"""The optimizer (torch AdamW or a bitsandbytes low-memory AdamW) and access to its moments.

ScaLoRA rescales AdamW's moments at every refactor (docs/method.md §2), so it needs them as
float32 tensors whatever the optimizer stores: torch keeps `exp_avg` / `exp_avg_sq`,
bitsandbytes keeps `state1` / `state2`, either float32 or 8-bit codes with one absmax per
256-element block. 8-bit moments are dequantised, rescaled and quantised again, the same
round trip bitsandbytes makes at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from scalora_dist.config import ConfigError, TrainConfig

BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise 8-bit optimizer state


def check_optimizer(cfg: TrainConfig, distributed: bool) -> None:
    """bitsandbytes' optimizers update plain tensors, not FSDP2's sharded DTensors."""
    if distributed and cfg.optimizer != "adamw":
        raise ConfigError(
            f"train.optimizer: {cfg.optimizer} (bitsandbytes) runs in one process only; under "
            "FSDP2 the AdamW state is already sharded across ranks, use adamw"
        )


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig, distributed: bool) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    check_optimizer(cfg, distributed)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"train.optimizer: {cfg.optimizer} needs the bitsandbytes package (pip install 'scalora-dist[quant]')"
        ) from None
    return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])(params, **kwargs)


@contextmanager
def adam_moments(
    optimizer: torch.optim.Optimizer, param: nn.Parameter
) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
    """(first, second) moment of `param` as float32 tensors to modify in place, or None
    before the first step. Changes to 8-bit moments are written back on exit."""
    state = optimizer.state.get(param, {})
    if "exp_avg" in state:
        yield state["exp_avg"], state["exp_avg_sq"]
    elif "state1" in state and state["state1"].dtype != torch.uint8:
        yield state["state1"], state["state2"]
    elif "state1" in state:
        import bitsandbytes.functional as bnbf

        moments = [
            bnbf.dequantize_blockwise(
                state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=BNB_BLOCKSIZE
            )
            for i in (1, 2)
        ]
        yield moments[0], moments[1]
        for i, moment in zip((1, 2), moments):
            _, quant = bnbf.quantize_blockwise(
                moment, code=state[f"qmap{i}"], blocksize=BNB_BLOCKSIZE, out=state[f"state{i}"]
            )
            state[f"absmax{i}"].copy_(quant.absmax)
    else:
        yield None


def reset_adam_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """Put `param`'s optimizer state back to what it was before its first step: torch
    AdamW's moments and step count zeroed in place (the state a first step creates, kept so
    that a checkpoint written now holds it), bitsandbytes' state dropped (its 8-bit zero is
    not a zero code; it is re-created at the next step)."""
    state = optimizer.state.get(param)
    if not state:
        return
    if "exp_avg" in state:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
    else:
        optimizer.state.pop(param)


def lr_multiplier(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """train.lr_scheduler as a fraction of the peak lr by step: a linear warm-up, then cosine
    or linear decay to 0, or constant. The formulas of transformers' get_scheduler ("cosine",
    "linear", "constant_with_warmup"; tests/test_optim.py compares them step by step), not
    imported from there: transformers.optimization imports its Trainer utilities, which
    import peft and bitsandbytes, ~3 s at the start of every process of every job."""
    decay_span = max(1, total_steps - warmup_steps)
    after_warmup: dict[str, Callable[[int], float]] = {  # kind is validated by the config
        "constant": lambda step: 1.0,
        "linear": lambda step: max(0.0, (total_steps - step) / decay_span),
        "cosine": lambda step: max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_span))),
    }[kind]

    def multiplier(step: int) -> float:
        return step / max(1, warmup_steps) if step < warmup_steps else after_warmup(step)

    return multiplier
