"""Applies the ScaLoRA rewrite (scalora/scaling.py) to a model's LoRA layers and optimizer.

Order per refactor step (docs/method.md §2): statistics of every layer -> one reduction of one
flat buffer -> per-layer solve -> merge into the base -> rescale factors, gradients and
AdamW moments. Runs after gradient accumulation and before clipping / optimizer.step().
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from scalora_dist.config import ScaLoRAConfig
from scalora_dist.distributed import local_tensor
from scalora_dist.model.loading import local_offsets
from scalora_dist.model.lora import LoRALinear
from scalora_dist.optim import adam_moments
from scalora_dist.scalora import scaling as sm


@dataclass
class RefactorReport:
    column: int = 0
    scalar: int = 0
    skipped: int = 0
    mean_alpha: float | None = None
    mean_beta: float | None = None
    kappa: float | None = None
    reduced_bytes: int = 0
    """Bytes all-reduced across ranks this step (statistics, plus any lora_A columns; 0 on one process)."""
    collectives: int = 0
    """Collectives ScaLoRA issued this step (1 per refactor when distributed)."""
    gathered_bytes: int = 0
    """Of reduced_bytes, the float32 lora_A columns the merges needed: 0 when the copy FSDP2
    gathered for the forward was the float32 master itself (float32 compute); under bf16
    compute that copy is rounded, so the exact columns travel in the same all-reduce."""
    increment_norm_sq: float = 0.0
    """4-bit bases: squared Frobenius norm of this step's merged increments (all layers)."""
    dropped_norm_sq: float = 0.0
    """4-bit bases: squared Frobenius norm of what re-compressing the accumulators dropped."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Why column systems were rejected this step (scaling.REJECTIONS), layer counts."""

    @property
    def dropped_fraction(self) -> float | None:
        """‖dropped‖ / ‖increment‖: the share of the step's merges the rank-R accumulators lost."""
        if self.increment_norm_sq <= 0:
            return None
        return math.sqrt(self.dropped_norm_sq / self.increment_norm_sq)

    @classmethod
    def combine(cls, reports: list[RefactorReport]) -> RefactorReport:
        """Several steps' reports as one: counts, bytes and norms summed, alpha and beta
        averaged over the reports that have them, the last kappa."""
        alphas = [r.mean_alpha for r in reports if r.mean_alpha is not None]
        betas = [r.mean_beta for r in reports if r.mean_beta is not None]
        summed = {
            f: sum(getattr(r, f) for r in reports)
            for f in (
                "column",
                "scalar",
                "skipped",
                "reduced_bytes",
                "collectives",
                "gathered_bytes",
                "increment_norm_sq",
                "dropped_norm_sq",
            )
        }
        rejected: dict[str, int] = {}
        for r in reports:
            for why, n in r.rejected.items():
                rejected[why] = rejected.get(why, 0) + n
        return cls(
            **summed,
            mean_alpha=sum(alphas) / len(alphas) if alphas else None,
            mean_beta=sum(betas) / len(betas) if betas else None,
            kappa=reports[-1].kappa if reports else None,
            rejected=rejected,
        )

    def as_metrics(self) -> dict[str, float | int | None]:
        """The metrics.jsonl fields (scalora_acc_dropped_fraction only on a 4-bit base)."""
        metrics: dict[str, float | int | None] = {
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
        for why in sm.REJECTIONS:
            if self.rejected.get(why):
                metrics[f"scalora_rejected_{why}"] = self.rejected[why]
        if self.dropped_fraction is not None:
            metrics["scalora_acc_dropped_fraction"] = self.dropped_fraction
        return metrics


AllReduce = Callable[[torch.Tensor], None]

KAPPA_SCHEDULE_CAP = 10.0
"""kappa_schedule inverse_lr grows kappa at most this much (the end of a decay to 0)."""


class ScaLoRA:
    """Decides when to refactor and carries kappa (resolved once, then constant): one
    number, or with `kappa_scope: layer` one per layer of `layers`."""

    def __init__(
        self,
        cfg: ScaLoRAConfig,
        layers: list[LoRALinear],
        optimizer: torch.optim.Optimizer,
        all_reduce: AllReduce | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
    ):
        self.cfg = cfg
        self.layers = layers
        self._position = {id(layer): i for i, layer in enumerate(layers)}  # a layer's index in self.kappa
        self.optimizer = optimizer
        self.all_reduce = all_reduce
        self.lr_multiplier = lr_multiplier
        """The LR schedule as a fraction of the peak lr, by step: what kappa='auto' corrects for."""
        self.kappa: float | list[float] | None = None if cfg.kappa == "auto" else float(cfg.kappa)

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
        kappa = state["kappa"]
        if isinstance(kappa, list) and len(kappa) != len(self.layers):
            raise ValueError(
                f"the checkpoint holds a kappa for each of {len(kappa)} layers, this model has "
                f"{len(self.layers)} adapted layers (adapter.target_modules changed?)"
            )
        self.kappa = kappa

    @torch.no_grad()
    def refactor(self, step: int | None = None) -> RefactorReport:
        """Rewrite every layer with gradients; `step`: optimizer steps taken so far (what
        kappa='auto' needs to know about the learning rate that built the adapters)."""
        layers = [l for l in self.layers if l.lora_A.grad is not None and l.lora_B.grad is not None]
        # Partial statistics over this rank's rows of lora_B and columns of lora_A (and, for
        # 4-bit layers, the Grams that re-compress the accumulator).
        stats = [self._layer_statistics(l) for l in layers]
        report = RefactorReport()
        n_stats = sum(t.numel() for layer_stats in stats for t in layer_stats)
        if not layers:
            report.skipped = len(self.layers)
            return report
        # All layers' small matrices travel in one flat float64 buffer: one collective per
        # step, then one copy of the statistics to the host. Behind them, the merges' float32
        # lora_A where the forward left no exact copy, and lora_B where the base is whole on
        # every rank (base_placement: replicated): each rank writes its columns of lora_A
        # (rows of lora_B) into a zero block, so the sum is the whole matrix (float32 in
        # float64: exact).
        needs_A = [_needs_full_A(l) for l in layers]
        needs_B = [_needs_full_B(l) for l in layers]
        n_gathered = sum(l.lora_A.numel() for l, needed in zip(layers, needs_A) if needed)
        n_gathered += sum(l.lora_B.numel() for l, needed in zip(layers, needs_B) if needed)
        device = stats[0][0].device
        flat = torch.zeros(n_stats + n_gathered, dtype=torch.float64, device=device)
        torch.cat([t.flatten() for layer_stats in stats for t in layer_stats], out=flat[:n_stats])
        offset = n_stats
        full_As, full_Bs = [], []
        for layer, need_A, need_B in zip(layers, needs_A, needs_B):
            for factor, needed, dim, out in ((layer.lora_A, need_A, 1, full_As), (layer.lora_B, need_B, 0, full_Bs)):
                if not needed:
                    out.append(None)
                    continue
                block = flat[offset : offset + factor.numel()].view(factor.shape)
                local = local_tensor(factor)
                start = local_offsets(factor)[dim]
                block.narrow(dim, start, local.shape[dim]).copy_(local)
                out.append(block)
                offset += factor.numel()
        if self.all_reduce is not None:
            self.all_reduce(flat)
            report.reduced_bytes = flat.numel() * flat.element_size()
            report.gathered_bytes = n_gathered * flat.element_size()
            report.collectives = 1
        # Every rank solves the same float64 systems on the CPU from the same reduced
        # numbers, so every rank takes the same decisions by construction.
        stats = _unflatten(flat[:n_stats].cpu(), stats)
        grams = [(P, Q) for P, Q, *_ in stats]
        if self.kappa is None or (self.cfg.kappa_schedule == "reestimate" and self.cfg.kappa == "auto"):
            resolved = self._resolve_auto_kappa(layers, grams, step if self.kappa is None else None)
            self.kappa = resolved if resolved is not None else self.kappa
            if self.kappa is None:  # adapters still all zero: nothing to scale yet
                report.skipped = len(self.layers)
                return report
        factor = self.cfg.kappa_multiplier * self.schedule_factor(step)
        if isinstance(self.kappa, list):
            kappa = [self.kappa[self._position[id(l)]] * factor for l in layers]
            report.kappa = sum(kappa) / len(kappa)
        else:
            kappa = self.kappa * factor
            report.kappa = kappa
        report.skipped = len(self.layers) - len(layers)
        solved = solve_all(
            grams, kappa, column_fallback=self.cfg.column_fallback, scalar_fallback=self.cfg.scalar_fallback
        )
        for scales in solved:
            if scales.rejected is not None:
                report.rejected[scales.rejected] = report.rejected.get(scales.rejected, 0) + 1
        kept = [(i, scales) for i, scales in enumerate(solved) if scales.kind != sm.SKIPPED]
        report.skipped += len(solved) - len(kept)
        report.column = sum(scales.kind == sm.COLUMN for _, scales in kept)
        report.scalar = len(kept) - report.column
        if kept:
            alphas, betas = torch.cat([s.alpha for _, s in kept]), torch.cat([s.beta for _, s in kept])
            report.mean_alpha, report.mean_beta = alphas.mean().item(), betas.mean().item()
            # One copy of every alpha and beta to the device, then merges and rescales that
            # the device runs in order, without waiting for the host.
            on_device = _to_device(kept, layers[0].lora_A.device)
            at = [i for i, _ in kept]
            self._rewrite_all(
                [layers[i] for i in at],
                on_device,
                [stats[i][2:] for i in at],
                full_As=[full_As[i] for i in at],
                full_Bs=[full_Bs[i] for i in at],
                report=report,
            )
        for layer in self.layers:
            layer.full_A = None
        return report

    def _resolve_auto_kappa(
        self, layers: list[LoRALinear], grams: list[tuple[torch.Tensor, torch.Tensor]], step: int | None
    ) -> float | list[float] | None:
        """kappa='auto' at the first refactor: one value (kappa_scope global), or each layer's
        own (kappa_scope layer), where a layer still zero, or without gradients now, takes
        the global value. None while every adapter is zero."""
        fraction = self.lr_fraction(step)
        common = auto_kappa(grams, fraction)
        if common is None or self.cfg.kappa_scope == "global":
            return common
        own = {id(layer): auto_kappa([g], fraction) for layer, g in zip(layers, grams)}
        return [own.get(id(layer)) or common for layer in self.layers]

    def schedule_factor(self, step: int | None) -> float:
        """kappa_schedule inverse_lr: lr_peak / lr of this step, at most KAPPA_SCHEDULE_CAP; 1 otherwise."""
        if self.cfg.kappa_schedule != "inverse_lr" or self.lr_multiplier is None or step is None:
            return 1.0
        return min(KAPPA_SCHEDULE_CAP, 1.0 / max(self.lr_multiplier(step), 1.0 / KAPPA_SCHEDULE_CAP))

    def lr_fraction(self, step: int | None) -> float:
        """Mean learning rate of the steps taken so far, as a fraction of the peak."""
        if self.lr_multiplier is None or not step:
            return 1.0
        return sum(self.lr_multiplier(t) for t in range(step)) / step

    @staticmethod
    def _layer_statistics(layer: LoRALinear) -> list[torch.Tensor]:
        A, B = local_tensor(layer.lora_A), local_tensor(layer.lora_B)
        stats = list(sm.lora_grams(A, local_tensor(layer.lora_A.grad), B, local_tensor(layer.lora_B.grad), layer.scale))
        if layer.acc_U is not None:
            stats += sm.accumulator_grams(local_tensor(layer.acc_U), local_tensor(layer.acc_V), A, B)
        return stats

    def _rewrite(
        self,
        layer: LoRALinear,
        scales: sm.Scales,
        acc_grams: list[torch.Tensor] = (),
        *,
        full_A: torch.Tensor | None = None,
        full_B: torch.Tensor | None = None,
        report: RefactorReport | None = None,
    ) -> None:
        """_rewrite_all for one layer."""
        self._rewrite_all([layer], [scales], [acc_grams], full_As=[full_A], full_Bs=[full_B], report=report)

    @torch.no_grad()
    def _rewrite_all(
        self,
        layers: list[LoRALinear],
        scales: list[sm.Scales],
        acc_grams: list[list[torch.Tensor]],
        *,
        full_As: list[torch.Tensor | None],
        full_Bs: list[torch.Tensor | None],
        report: RefactorReport | None = None,
    ) -> None:
        """Merge each layer's increment (from the old factors), then rescale the local shards
        of every layer's factors, gradients and AdamW moments in one foreach multiply."""
        with ExitStack() as open_moments:
            plans = []
            for layer, layer_scales, grams, full_A, full_B in zip(layers, scales, acc_grams, full_As, full_Bs):
                self._merge(layer, layer_scales, grams, full_A=full_A, full_B=full_B, report=report)
                A, B = layer.lora_A, layer.lora_B
                plan = sm.factor_plan(local_tensor(A), local_tensor(B)) + sm.gradient_plan(
                    local_tensor(A.grad), local_tensor(B.grad)
                )
                moments_A = open_moments.enter_context(adam_moments(self.optimizer, A))
                moments_B = open_moments.enter_context(adam_moments(self.optimizer, B))
                if moments_A is not None and moments_B is not None:
                    plan += sm.adam_moment_plan(*(local_tensor(m) for m in (*moments_A, *moments_B)))
                plans.append(plan)
            sm.rescale_many_(plans, scales)

    def _merge(
        self,
        layer: LoRALinear,
        scales: sm.Scales,
        acc_grams: list[torch.Tensor] = (),
        *,
        full_A: torch.Tensor | None,
        full_B: torch.Tensor | None,
        report: RefactorReport | None,
    ) -> None:
        """Merge into this rank's rows of the base (or its accumulator). `acc_grams`: the
        accumulator's reduced Grams (default: this process's own); `full_A`: the whole
        float32 lora_A (default: the layer's own, or the copy its forward captured);
        `full_B`: the whole lora_B, for a base whole on every rank (default: this rank's rows)."""
        if layer.acc_U is not None:
            acc_grams = acc_grams or self._layer_statistics(layer)[2:]
            # 4-bit base: the increment s * lora_B diag(1 - alpha*beta) lora_A goes into the
            # accumulator, whose rows (of acc_U, of acc_V) are sharded like lora_B's rows and
            # lora_A's columns; the Grams of the whole factors came with the statistics.
            coef = layer.scale * (1.0 - scales.alpha * scales.beta)
            U, V, A, B = (local_tensor(t) for t in (layer.acc_U, layer.acc_V, layer.lora_A, layer.lora_B))
            left_gram = sm.left_gram_for(acc_grams[0], coef.to(acc_grams[0].device))
            new_U, new_V, dropped = sm.accumulate_low_rank(
                U,
                V,
                B.double() * coef.to(B.device),
                A.double().T,
                left_gram=left_gram,
                right_gram=acc_grams[1],
            )
            U.copy_(new_U)
            V.copy_(new_V)
            if report is not None:
                report.increment_norm_sq += sm.increment_norm_sq(left_gram, acc_grams[1], layer.rank)
                report.dropped_norm_sq += dropped**2
        else:
            if full_A is None:
                full_A = layer.full_A if isinstance(layer.lora_A, DTensor) else layer.lora_A
            if full_B is None:
                full_B = local_tensor(layer.lora_B)
            sm.merge_increment_(local_tensor(layer.weight), full_A, full_B, layer.scale, scales)


def solve_all(
    grams: list[tuple[torch.Tensor, torch.Tensor]], kappa: float | list[float], **fallbacks: str
) -> list[sm.Scales]:
    """Every layer's scales, the systems of each rank solved together (sm.solve_scales_batch);
    `kappa`: one for all, or one per layer; `fallbacks`: solve_scales_batch's column_fallback
    and scalar_fallback."""
    solved: list[sm.Scales | None] = [None] * len(grams)
    by_rank: dict[int, list[int]] = {}
    for i, (P, _) in enumerate(grams):
        by_rank.setdefault(P.shape[0], []).append(i)
    for indices in by_rank.values():
        P = torch.stack([grams[i][0] for i in indices])
        Q = torch.stack([grams[i][1] for i in indices])
        kappas = kappa if isinstance(kappa, (int, float)) else [kappa[i] for i in indices]
        for i, scales in zip(
            indices, sm.solve_scales_batch(P, Q, kappas, **fallbacks)
        ):  # (looked up here: tools may replace it)
            solved[i] = scales
    return solved


def _to_device(kept: list[tuple[int, sm.Scales]], device: torch.device) -> list[sm.Scales]:
    flat = torch.cat([torch.cat([s.alpha, s.beta]) for _, s in kept]).to(device)
    out, offset = [], 0
    for _, s in kept:
        r = s.alpha.numel()
        out.append(sm.Scales(flat[offset : offset + r], flat[offset + r : offset + 2 * r], s.kind))
        offset += 2 * r
    return out


def _needs_full_A(layer: LoRALinear) -> bool:
    """A sharded layer whose merge has no exact copy of the whole lora_A (4-bit layers
    merge into their accumulator shard by shard and need none)."""
    return isinstance(layer.lora_A, DTensor) and layer.acc_U is None and layer.full_A is None


def _needs_full_B(layer: LoRALinear) -> bool:
    """Every rank merges the whole increment into its own whole copy of the base (4-bit
    layers merge into their accumulator shard by shard and need none)."""
    return layer.acc_U is None and layer.base_whole_beside_sharded_B()


def auto_kappa(grams: list[tuple[torch.Tensor, torch.Tensor]], lr_fraction: float = 1.0) -> float | None:
    """kappa='auto': the mean of ||a_i|| ||b_i|| over layers and columns, divided by the mean
    learning rate the adapters have seen so far as a fraction of the peak (`lr_fraction`).

    From a zero lora_B, Adam grows ||b_i|| about in proportion to the summed learning rate,
    so the raw product measures the warm-up as much as the task: after 10 steps of a linear
    LR warm-up it is ~0.45x what 10 steps at the peak lr give. Dividing by the lr fraction
    makes kappa the product the adapters reach after the same number of steps at the peak
    lr, whatever the schedule (docs/method.md, "kappa"). None while the adapters are zero."""
    if not grams or not (lr_fraction > 0):
        return None
    products = torch.cat([sm.column_norm_products(P, Q) for P, Q in grams])
    kappa = products.mean().item() / lr_fraction
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
