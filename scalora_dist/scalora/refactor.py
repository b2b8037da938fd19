"""Applies the ScaLoRA rewrite (scalora/math.py) to a model's LoRA layers and optimizer.

Order per refactor step (method.md §4): statistics of every layer -> one reduction of one
flat buffer -> per-layer solve -> merge into the base -> rescale factors, gradients and
AdamW moments. Runs after gradient accumulation and before clipping / optimizer.step().
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalora_dist.config import ScaLoRAConfig
from scalora_dist.model.lora import LoRALinear
from scalora_dist.scalora import math as sm


@dataclass
class RefactorReport:
    column: int = 0
    scalar: int = 0
    skipped: int = 0
    mean_alpha: float | None = None
    mean_beta: float | None = None
    kappa: float | None = None
    reduced_bytes: int = 0
    """Bytes of statistics reduced across ranks this step (0 on one process)."""

    def as_metrics(self) -> dict[str, float | int | None]:
        return {
            "scalora_column": self.column,
            "scalora_scalar": self.scalar,
            "scalora_skipped": self.skipped,
            "scalora_mean_alpha": self.mean_alpha,
            "scalora_mean_beta": self.mean_beta,
            "scalora_kappa": self.kappa,
            "scalora_reduced_bytes": self.reduced_bytes,
        }


AllReduce = Callable[[torch.Tensor], None]


class ScaLoRA:
    """Decides when to refactor and carries kappa (resolved once, then constant)."""

    def __init__(
        self,
        cfg: ScaLoRAConfig,
        layers: list[LoRALinear],
        optimizer: torch.optim.Optimizer,
        all_reduce: AllReduce | None = None,
    ):
        self.cfg = cfg
        self.layers = layers
        self.optimizer = optimizer
        self.all_reduce = all_reduce
        self.kappa: float | None = None if cfg.kappa == "auto" else float(cfg.kappa)

    def is_due(self, step: int) -> bool:
        """`step` counts optimizer steps already taken (0-based)."""
        since = step - self.cfg.warmup_steps
        return since >= 0 and since % self.cfg.interval == 0

    def state_dict(self) -> dict:
        return {"kappa": self.kappa}

    def load_state_dict(self, state: dict) -> None:
        self.kappa = state["kappa"]

    @torch.no_grad()
    def refactor(self) -> RefactorReport:
        layers = [l for l in self.layers if l.lora_A.grad is not None and l.lora_B.grad is not None]
        grams = [
            sm.lora_grams(l.lora_A, l.lora_A.grad, l.lora_B, l.lora_B.grad, l.scale) for l in layers
        ]
        report = RefactorReport()
        if grams and self.all_reduce is not None:
            # All layers' (2r x 2r) statistics travel in one flat buffer: one collective per step.
            flat = torch.cat([torch.cat([p.flatten(), q.flatten()]) for p, q in grams])
            self.all_reduce(flat)
            report.reduced_bytes = flat.numel() * flat.element_size()
            grams = _unflatten(flat, [l.rank for l in layers])
        if self.kappa is None:
            self.kappa = auto_kappa(grams)
            if self.kappa is None:  # adapters still all zero: nothing to scale yet
                report.skipped = len(self.layers)
                return report
        kappa = self.kappa * self.cfg.kappa_multiplier
        report.kappa = kappa
        report.skipped = len(self.layers) - len(layers)
        alphas, betas = [], []
        for layer, (P, Q) in zip(layers, grams):
            scales = sm.solve_scales(P, Q, kappa)
            if scales.kind == sm.SKIPPED:
                report.skipped += 1
                continue
            if scales.kind == sm.COLUMN:
                report.column += 1
            else:
                report.scalar += 1
            self._rewrite(layer, scales)
            alphas.append(scales.alpha)
            betas.append(scales.beta)
        if alphas:
            report.mean_alpha = torch.cat(alphas).mean().item()
            report.mean_beta = torch.cat(betas).mean().item()
        return report

    @torch.no_grad()
    def _rewrite(self, layer: LoRALinear, scales: sm.Scales) -> None:
        sm.merge_increment_(layer.base.weight, layer.lora_A, layer.lora_B, layer.scale, scales)
        sm.rescale_factors_(layer.lora_A, layer.lora_B, scales)
        sm.rescale_gradients_(layer.lora_A.grad, layer.lora_B.grad, scales)
        state_A = self.optimizer.state.get(layer.lora_A, {})
        state_B = self.optimizer.state.get(layer.lora_B, {})
        if "exp_avg" in state_A and "exp_avg" in state_B:
            sm.rescale_adam_moments_(
                state_A["exp_avg"], state_A["exp_avg_sq"],
                state_B["exp_avg"], state_B["exp_avg_sq"],
                scales,
            )


def auto_kappa(grams: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Mean of ||a_i|| ||b_i|| over layers and columns, so the first refactors start near
    alpha*beta = 1; None while the adapters are still zero."""
    if not grams:
        return None
    products = torch.cat([sm.column_norm_products(P, Q) for P, Q in grams])
    kappa = products.mean().item()
    return kappa if math.isfinite(kappa) and kappa > 0 else None


def _unflatten(flat: torch.Tensor, ranks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, offset = [], 0
    for r in ranks:
        n = (2 * r) ** 2
        P = flat[offset : offset + n].view(2 * r, 2 * r)
        Q = flat[offset + n : offset + 2 * n].view(2 * r, 2 * r)
        out.append((P, Q))
        offset += 2 * n
    return out
