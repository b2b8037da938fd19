"""Our LoRA layer, its injection into a transformers model, and the exports.

We wrap `nn.Linear` ourselves (not with PEFT) because ScaLoRA needs direct control of the
factors, the merge into the base and the optimizer state. PEFT stays the reference
*reader* of the adapters we export.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from scalora_dist.config import AdapterConfig, ConfigError
from scalora_dist.model.loading import is_quantized_linear, quant_state


class LoRALinear(nn.Module):
    """y = base(x) + s * lora_B(lora_A(dropout(x))), s = alpha/r (or alpha/sqrt(r) for rsLoRA).

    Factors are plain parameters (`lora_A` (r, in), `lora_B` (out, r)) so FSDP2 can shard
    them like any other parameter. Computation happens in the input's dtype; the stored
    weights keep their own (float32 masters under bf16 compute).
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, use_rslora: bool, dropout: float,
        accumulator_rank: int = 0,
    ):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Set by ScaLoRA before a refactor step: keep a copy of the full lora_A that FSDP2
        # all-gathers for the forward anyway, so the merge needs no extra collective.
        self.capture_full_A = False
        self.full_A: torch.Tensor | None = None
        # A 4-bit base cannot absorb ScaLoRA's small merges (requantising leaves the codes
        # as they were), so the merged update lives in a float32 low-rank accumulator
        # acc_U @ acc_V.T instead (scalora/math.py: accumulate_low_rank). Frozen parameters,
        # not buffers, so that FSDP2 shards them: acc_U's rows with the base's rows, acc_V's
        # rows with lora_A's columns.
        self.quantized = is_quantized_linear(base)
        self.quant_state = quant_state(base) if self.quantized else None
        if accumulator_rank:
            self.acc_U = nn.Parameter(
                torch.zeros(base.out_features, accumulator_rank, device=device), requires_grad=False
            )
            self.acc_V = nn.Parameter(
                torch.zeros(base.in_features, accumulator_rank, device=device), requires_grad=False
            )
        else:
            self.acc_U = self.acc_V = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture_full_A:
            self.full_A = self.lora_A.detach().float().clone()
        if self.quantized:
            y = self._quantized_base(x)
        else:
            y = frozen_linear(x, self.base.weight, self.base.bias)
        if self.acc_U is not None:
            y = y + frozen_linear(frozen_linear(x, self.acc_V.T), self.acc_U)
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return y + F.linear(h, self.lora_B.to(x.dtype)) * self.scale

    def _quantized_base(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' 4-bit matmul with the QuantState we hold: under FSDP2 the weight
        seen here is the all-gathered plain tensor of packed codes, which carries none."""
        import bitsandbytes as bnb

        compute = self.base.compute_dtype or x.dtype
        y = bnb.matmul_4bit(x.to(compute), self.base.weight, quant_state=self.quant_state)
        if self.base.bias is not None:
            y = y + self.base.bias.to(compute)
        return y.to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * lora_B @ lora_A, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:.4g}"


class _FrozenLinear(torch.autograd.Function):
    """x @ W.T + b for a frozen W stored in another dtype than x (float32 masters under
    bf16 compute): saves W itself for the backward, not the cast copy F.linear would save,
    so a bf16 step does not hold a bf16 copy of every float32 master weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dtype == x.dtype or weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)  # nothing to save: F.linear keeps W as it is
    return _FrozenLinear.apply(x, weight, bias)


def initial_lora_A(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """PEFT's Kaiming-uniform init, U(-1/sqrt(n), 1/sqrt(n)), drawn from a generator keyed by
    the layer's name and the run seed: every rank and every world size gets the same values
    whatever the order of construction or the sharding."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_target_linears(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the nn.Linear modules to adapt; a name that matches nothing is an error."""
    heads = output_head_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]
    if target_modules == "all-linear":
        if not linears:
            raise ConfigError("adapter.target_modules: all-linear, but the model has no nn.Linear")
        return linears
    all_names = [n for n, _ in model.named_modules()]
    chosen: list[str] = []
    for target in target_modules:
        hits = [n for n in all_names if n == target or n.endswith("." + target)]
        if not hits:
            available = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(
                f"adapter.target_modules: {target!r} matches no module of this model; "
                f"its linear layers are named: {', '.join(available)}"
            )
        not_linear = [n for n in hits if n not in linears]
        if not_linear:
            kind = type(model.get_submodule(not_linear[0])).__name__
            raise ConfigError(
                f"adapter.target_modules: {target!r} matches {not_linear[0]} ({kind}), which is "
                "not an nn.Linear (or is the output head); only linear layers can be adapted"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapters(model: nn.Module, cfg: AdapterConfig, seed: int = 0) -> list[str]:
    """Freeze the model and make the targeted layers trainable as `cfg.method` says.

    lora / scalora: wrap each target in LoRALinear (only the factors train). For scalora the
    base weights become float32, since per-step merges are too small for bf16.
    full: the targeted weights themselves train (in float32).
    On the meta device the factors stay uninitialised (the sharded loader fills them).
    Returns the targeted module names.
    """
    names = find_target_linears(model, cfg.target_modules)
    quantized = any(is_quantized_linear(m) for m in model.modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        linear = model.get_submodule(name)
        if quantized and not is_quantized_linear(linear):
            raise ConfigError(
                f"adapter.target_modules: {name} ({type(linear).__name__}) was not quantised "
                "to 4 bits, so it cannot be adapted in a model.load_in_4bit run; only the "
                "model's nn.Linear layers (not the output head) are supported"
            )
        if cfg.method == "full":
            linear.float()
            linear.weight.requires_grad_(True)
            continue
        accumulator_rank = 0
        if cfg.method == "scalora":
            if is_quantized_linear(linear):
                accumulator_rank = cfg.scalora.accumulator_rank
            else:
                linear.float()
        layer = LoRALinear(
            linear, cfg.rank, cfg.alpha, cfg.use_rslora, cfg.dropout, accumulator_rank=accumulator_rank
        )
        if not layer.lora_A.is_meta:
            with torch.no_grad():
                layer.lora_A.copy_(initial_lora_A(name, cfg.rank, linear.in_features, seed))
        _set_submodule(model, name, layer)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_and_unwrap(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain nn.Linear back, so the
    model is an ordinary transformers model again (for save_pretrained)."""
    for name, layer in lora_layers(model).items():
        base = layer.base
        base.weight.copy_((base.weight.float() + layer.delta_weight()).to(base.weight.dtype))
        _set_submodule(model, name, base)


def save_peft_adapter(
    model: nn.Module, out_dir: str | Path, cfg: AdapterConfig, base_model_path: str
) -> Path | None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's LoRA format.
    Every rank calls it (sharded factors are gathered); rank 0 writes."""
    layers = lora_layers(model)
    tensors = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = _full_cpu(layer.lora_A)
        tensors[f"{prefix}.lora_B.weight"] = _full_cpu(layer.lora_B)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.use_rslora,
        "lora_dropout": cfg.dropout,
        # Exact module names, so PEFT adapts precisely the layers we trained.
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.float().cpu().contiguous()
