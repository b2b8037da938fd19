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
from torch.distributed.tensor import DTensor

from scalora_dist.config import ScaLoRAConfig
from scalora_dist.model.lora import LoRALinear
from scalora_dist.optim import adam_moments
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
    """Bytes of statistics all-reduced across ranks this step (0 on one process)."""
    collectives: int = 0
    """Collectives ScaLoRA issued this step (1 per refactor when distributed)."""
    gathered_bytes: int = 0
    """Bytes of lora_A all-gathered for the merge; 0 when the copy FSDP2 gathered for the
    forward was captured (the normal case)."""

    def as_metrics(self) -> dict[str, float | int | None]:
        return {
            "scalora_column": self.column,
            "scalora_scalar": self.scalar,
            "scalora_skipped": self.skipped,
            "scalora_mean_alpha": self.mean_alpha,
            "scalora_mean_beta": self.mean_beta,
            "scalora_kappa": self.kappa,
            "scalora_reduced_bytes": self.reduced_bytes,
            "scalora_gathered_bytes": self.gathered_bytes,
            "scalora_collectives": self.collectives,
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

    def prepare(self, step: int) -> None:
        """Call before the step's forward passes: on a refactor step, sharded layers keep a
        copy of the full lora_A that FSDP2 gathers for the forward (the merge needs it)."""
        due = self.is_due(step)
        for layer in self.layers:
            # a 4-bit layer's accumulator works on its own shards of lora_A: no capture needed
            layer.capture_full_A = due and isinstance(layer.lora_A, DTensor) and layer.acc_U is None
            layer.full_A = None

    def state_dict(self) -> dict:
        return {"kappa": self.kappa}

    def load_state_dict(self, state: dict) -> None:
        self.kappa = state["kappa"]

    @torch.no_grad()
    def refactor(self) -> RefactorReport:
        layers = [l for l in self.layers if l.lora_A.grad is not None and l.lora_B.grad is not None]
        # Partial statistics over this rank's rows of lora_B and columns of lora_A (and, for
        # 4-bit layers, the Grams that re-compress the accumulator).
        stats = [self._layer_statistics(l) for l in layers]
        report = RefactorReport()
        if stats and self.all_reduce is not None:
            # All layers' small matrices travel in one flat buffer: one collective per step.
            flat = torch.cat([t.flatten() for layer_stats in stats for t in layer_stats])
            self.all_reduce(flat)
            report.reduced_bytes = flat.numel() * flat.element_size()
            report.collectives = 1
            stats = _unflatten(flat, stats)
        grams = [(P, Q) for P, Q, *_ in stats]
        if self.kappa is None:
            self.kappa = auto_kappa(grams)
            if self.kappa is None:  # adapters still all zero: nothing to scale yet
                report.skipped = len(self.layers)
                return report
        kappa = self.kappa * self.cfg.kappa_multiplier
        report.kappa = kappa
        report.skipped = len(self.layers) - len(layers)
        alphas, betas = [], []
        for layer, (P, Q, *acc_grams) in zip(layers, stats):
            scales = sm.solve_scales(P, Q, kappa)
            if scales.kind == sm.SKIPPED:
                report.skipped += 1
                continue
            if scales.kind == sm.COLUMN:
                report.column += 1
            else:
                report.scalar += 1
            report.gathered_bytes += self._rewrite(layer, scales, acc_grams)
            alphas.append(scales.alpha)
            betas.append(scales.beta)
        if alphas:
            report.mean_alpha = torch.cat(alphas).mean().item()
            report.mean_beta = torch.cat(betas).mean().item()
        return report

    @staticmethod
    def _layer_statistics(layer: LoRALinear) -> list[torch.Tensor]:
        A, B = _local(layer.lora_A), _local(layer.lora_B)
        stats = list(sm.lora_grams(A, _local(layer.lora_A.grad), B, _local(layer.lora_B.grad), layer.scale))
        if layer.acc_U is not None:
            stats += sm.accumulator_grams(_local(layer.acc_U), _local(layer.acc_V), A, B)
        return stats

    @torch.no_grad()
    def _rewrite(self, layer: LoRALinear, scales: sm.Scales, acc_grams: list[torch.Tensor] = ()) -> int:
        """Merge into this rank's rows of the base (or its accumulator), rescale the local
        shards of factors, gradients and AdamW moments. Returns the bytes gathered (0 normally).
        `acc_grams`: the accumulator's reduced Grams (default: this process's own)."""
        gathered = 0
        if layer.acc_U is not None:
            acc_grams = acc_grams or self._layer_statistics(layer)[2:]
            # 4-bit base: the increment s * lora_B diag(1 - alpha*beta) lora_A goes into the
            # accumulator, whose rows (of acc_U, of acc_V) are sharded like lora_B's rows and
            # lora_A's columns; the Grams of the whole factors came with the statistics.
            coef = layer.scale * (1.0 - scales.alpha * scales.beta)
            U, V, A, B = (_local(t) for t in (layer.acc_U, layer.acc_V, layer.lora_A, layer.lora_B))
            new_U, new_V, _ = sm.accumulate_low_rank(
                U, V, B.double() * coef.to(B.device), A.double().T,
                left_gram=sm.left_gram_for(acc_grams[0], coef), right_gram=acc_grams[1],
            )
            U.copy_(new_U)
            V.copy_(new_V)
        else:
            full_A, gathered = _full_lora_A(layer)
            sm.merge_increment_(_local(layer.base.weight), full_A, _local(layer.lora_B), layer.scale, scales)
        sm.rescale_factors_(_local(layer.lora_A), _local(layer.lora_B), scales)
        sm.rescale_gradients_(_local(layer.lora_A.grad), _local(layer.lora_B.grad), scales)
        with (
            adam_moments(self.optimizer, layer.lora_A) as moments_A,
            adam_moments(self.optimizer, layer.lora_B) as moments_B,
        ):
            if moments_A is not None and moments_B is not None:
                (m_A, v_A), (m_B, v_B) = moments_A, moments_B
                sm.rescale_adam_moments_(_local(m_A), _local(v_A), _local(m_B), _local(v_B), scales)
        layer.full_A = None
        return gathered


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full_lora_A(layer: LoRALinear) -> tuple[torch.Tensor, int]:
    """The whole (r, n) lora_A as it was in this step's forward, and the bytes gathered."""
    if not isinstance(layer.lora_A, DTensor):
        return layer.lora_A, 0
    if layer.full_A is not None:
        return layer.full_A, 0
    full = layer.lora_A.full_tensor()  # only when no forward captured it (e.g. offloaded)
    return full, full.numel() * full.element_size()


def auto_kappa(grams: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Mean of ||a_i|| ||b_i|| over layers and columns, so the first refactors start near
    alpha*beta = 1; None while the adapters are still zero."""
    if not grams:
        return None
    products = torch.cat([sm.column_norm_products(P, Q) for P, Q in grams])
    kappa = products.mean().item()
    return kappa if math.isfinite(kappa) and kappa > 0 else None


def _unflatten(flat: torch.Tensor, like: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Views of `flat` with the shapes of `like` (the per-layer statistics it was built from)."""
    out, offset = [], 0
    for layer_stats in like:
        views = []
        for t in layer_stats:
            views.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        out.append(views)
    return out
