"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates"): the
published alternative to ScaLoRA for a high-rank accumulated update, kept as a baseline.

Every `restart_every` optimizer steps the whole adapter s * lora_B @ lora_A is merged into
the (float32) base, the factors restart as at the beginning of training (lora_A freshly
drawn, lora_B zero, so the function is unchanged), their AdamW state is dropped, and the
learning rate ramps up again over `rewarmup_steps`. The difference from ScaLoRA is what
ScaLoRA exists to avoid: the reset throws away the optimizer's moments and the adapter's
direction, so each cycle starts learning from scratch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

from scalora_dist.config import ReLoRAConfig
from scalora_dist.distributed import local_tensor
from scalora_dist.model.loading import local_block, local_offsets
from scalora_dist.model.lora import LoRALinear, initial_lora_A
from scalora_dist.optim import reset_adam_state


def restarts_before(step: int, cfg: ReLoRAConfig) -> int:
    """How many restarts happened in the first `step` optimizer steps."""
    return step // cfg.restart_every


def rewarmup_factor(step: int, cfg: ReLoRAConfig) -> float:
    """The multiplier on the schedule's learning rate for optimizer step `step` (0-based):
    a linear ramp over the `rewarmup_steps` steps after each restart, 1 otherwise and
    before the first restart. Restarts fall after steps K, 2K, ... (K = restart_every)."""
    since = step % cfg.restart_every
    if step < cfg.restart_every or cfg.rewarmup_steps == 0 or since >= cfg.rewarmup_steps:
        return 1.0
    return (since + 1) / (cfg.rewarmup_steps + 1)


def with_rewarmup(schedule: Callable[[int], float], cfg: ReLoRAConfig) -> Callable[[int], float]:
    """`schedule` (an LR multiplier of the step) with ReLoRA's re-warm-up after each restart."""
    return lambda step: schedule(step) * rewarmup_factor(step, cfg)


class ReLoRA:
    """Restarts the adapters of `layers` ({module name: layer}) every `restart_every` steps."""

    def __init__(self, cfg: ReLoRAConfig, layers: dict[str, LoRALinear], optimizer: torch.optim.Optimizer, seed: int):
        self.cfg = cfg
        self.layers = layers
        self.optimizer = optimizer
        self.seed = seed

    def is_due(self, steps_done: int, total_steps: int) -> bool:
        """After `steps_done` optimizer steps: restart now? (Never after the last step: the
        result is merged at export anyway.)"""
        return steps_done % self.cfg.restart_every == 0 and 0 < steps_done < total_steps

    @torch.no_grad()
    def restart(self, steps_done: int) -> None:
        """Merge, re-initialise and reset. lora_A is drawn from a generator keyed by the layer
        name, the run seed and the restart's number, so every rank and every world size draws
        the same factors, and a resumed run draws what the uninterrupted one did."""
        restart_seed = self.seed + 7919 * restarts_before(steps_done, self.cfg)
        for name, layer in self.layers.items():
            full_A = layer.lora_A.full_tensor() if isinstance(layer.lora_A, DTensor) else layer.lora_A
            weight, B = local_tensor(layer.weight), local_tensor(layer.lora_B)
            # this rank's rows of the base take its rows of lora_B times the whole lora_A; a
            # base whole on every rank (base_placement: replicated) takes the whole lora_B
            merged_B = layer.lora_B.full_tensor() if layer.base_whole_beside_sharded_B() else B
            weight.add_((merged_B.double() @ full_A.double()).mul_(layer.scale).to(weight.dtype))
            B.zero_()
            A = local_tensor(layer.lora_A)
            fresh = initial_lora_A(name, layer.rank, layer.in_features, restart_seed)
            A.copy_(local_block(fresh, local_offsets(layer.lora_A), A.shape))
            for param in (layer.lora_A, layer.lora_B):
                reset_adam_state(self.optimizer, param)
