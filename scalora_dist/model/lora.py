"""Our LoRA layer, its injection into a transformers model, and the PEFT export.

We adapt `nn.Linear` ourselves (not with PEFT) because ScaLoRA needs direct control of the
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
from scalora_dist.model.quant import is_quantized_linear


class LoRALinear(nn.Module):
    """y = W x + b + s * lora_B(lora_A(dropout(x))), s = alpha/r (or alpha/sqrt(r) for rsLoRA).

    Not wrapped: `add_lora` turns an existing nn.Linear (or bitsandbytes Linear4bit) into a
    subclass of its own class and of this one, the way FSDP2 swaps classes, and adds the
    factors beside its weight. The layer keeps its parameter names (`q_proj.weight`,
    `q_proj.bias`), so checkpoints, transformers' key conversions and FSDP2 see the model's
    own names; the adapter adds `q_proj.lora_A` (r, in) and `q_proj.lora_B` (out, r), plain
    parameters that FSDP2 shards like any other. Computation happens in the input's dtype;
    the stored weights keep their own (float32 masters under bf16 compute).
    """

    rank: int
    alpha: float
    use_rslora: bool
    scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture_full_A:
            # ScaLoRA's merge needs the whole lora_A; under FSDP2 this is the copy it
            # all-gathered for this forward. Kept only when it is the float32 master itself:
            # a bf16 gather would put rounded factors into the merge (refactor.py then
            # sends the float32 columns in its one all-reduce instead).
            A = self.lora_A.detach()
            self.full_A = A.clone() if A.dtype == torch.float32 else None
        if self.quantized:
            y = self._quantized_base(x)
        else:
            y = frozen_linear(x, self.weight, self.bias)
        if self.acc_U is not None:
            y = y + frozen_linear(frozen_linear(x, self.acc_V.T), self.acc_U)
        h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))
        return y + F.linear(h, self.lora_B.to(x.dtype)) * self.scale

    def _quantized_base(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' 4-bit matmul with the QuantState we hold: under FSDP2 the weight
        seen here is the all-gathered plain tensor of packed codes, which carries none."""
        import bitsandbytes as bnb

        compute = self.compute_dtype or x.dtype
        y = bnb.matmul_4bit(x.to(compute), self.weight, quant_state=self.quant_state)
        if self.bias is not None:
            y = y + self.bias.to(compute)
        return y.to(x.dtype)

    def base_whole_beside_sharded_B(self) -> bool:
        """The base weight whole on every rank (model.base_placement: replicated, FSDP2
        ignored_params) while lora_B is sharded: a merge into it takes the whole lora_B."""
        return isinstance(self.lora_B, DTensor) and not isinstance(self.weight, DTensor)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * lora_B @ lora_A, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def base_class(self) -> type:
        """The layer's class before add_lora."""
        mro = type(self).__mro__
        return mro[mro.index(LoRALinear) + 1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:.4g}"


_LORA_CLASSES: dict[type, type] = {}


def add_lora(
    linear: nn.Linear,
    rank: int,
    alpha: float,
    use_rslora: bool,
    dropout: float,
    accumulator_rank: int = 0,
) -> LoRALinear:
    """Make `linear` (in place) a LoRALinear of rank `rank`; returns it. lora_A is left
    uninitialised (see initial_lora_A), lora_B is zero."""
    cls = type(linear)
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinear, cls), {})
    linear.__class__ = _LORA_CLASSES[cls]
    linear.rank, linear.alpha, linear.use_rslora = rank, alpha, use_rslora
    linear.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    device = linear.weight.device
    linear.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=device))
    linear.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    linear.capture_full_A = False  # set by ScaLoRA before the forward of a refactor step
    linear.full_A = None
    # A 4-bit base cannot absorb ScaLoRA's small merges (requantising leaves the codes as
    # they were), so the merged update lives in a float32 low-rank accumulator
    # acc_U @ acc_V.T instead (scalora/scaling.py: accumulate_low_rank). Frozen parameters, not
    # buffers, so that FSDP2 shards them: acc_U's rows with the base's rows, acc_V's rows
    # with lora_A's columns.
    linear.quantized = is_quantized_linear(linear)
    if not linear.quantized:
        linear.quant_state = None
    if accumulator_rank:
        linear.acc_U = nn.Parameter(
            torch.zeros(linear.out_features, accumulator_rank, device=device), requires_grad=False
        )
        linear.acc_V = nn.Parameter(
            torch.zeros(linear.in_features, accumulator_rank, device=device), requires_grad=False
        )
    else:
        linear.acc_U = linear.acc_V = None
    return linear


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


def language_model_prefix(model: nn.Module) -> str:
    """Module-name prefix of the text decoder ("" when the whole model is the text model).
    For a `*ForConditionalGeneration` (Gemma-3 4B-27B, ...) it is the language model, so the
    vision tower and projector are left alone unless a target names them."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model or decoder is getattr(model, "base_model", None):
        return ""
    name = next((n for n, m in model.named_modules() if m is decoder), "")
    return f"{name}." if name else ""


def find_target_linears(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the nn.Linear modules to adapt; a name that matches nothing is an error.

    `all-linear` and plain names (`q_proj`) match inside the language model only; a dotted
    name (`vision_tower.encoder.layers.0.self_attn.q_proj`, `self_attn.q_proj`) matches the
    modules whose names end with it, anywhere in the model."""
    heads = output_head_names(model)
    text = language_model_prefix(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]
    text_linears = [n for n in linears if n.startswith(text)]
    if target_modules == "all-linear":
        if not text_linears:
            raise ConfigError("adapter.target_modules: all-linear, but the model has no nn.Linear")
        return text_linears
    all_names = [n for n, _ in model.named_modules()]
    chosen: list[str] = []
    for target in target_modules:
        scope = all_names if "." in target else [n for n in all_names if n.startswith(text)]
        hits = [n for n in scope if n == target or n.endswith("." + target)]
        if not hits:
            available = sorted({n.rsplit(".", 1)[-1] for n in text_linears})
            raise ConfigError(
                f"adapter.target_modules: {target!r} matches no module of this model"
                + (" (plain names match inside the language model; use a dotted path for the rest)" if text else "")
                + f"; its linear layers are named: {', '.join(available)}"
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


def inject_adapters(model: nn.Module, cfg: AdapterConfig, seed: int = 0) -> list[str]:
    """Freeze the model and make the targeted layers trainable as `cfg.method` says.

    lora / scalora / relora: add LoRA factors to each target (only the factors train). For
    scalora and relora the base weights become float32, since merges are rounded in bf16.
    full: the targeted weights themselves train (in float32).
    On the meta device the factors stay uninitialised (the loader fills them).
    Returns the targeted module names.
    """
    names = find_target_linears(model, cfg.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        linear = model.get_submodule(name)
        if cfg.method == "full":
            linear.float()
            linear.weight.requires_grad_(True)
            continue
        accumulator_rank = 0
        if cfg.method == "relora":
            linear.float()  # its merges, like ScaLoRA's, would round away in bf16
        if cfg.method == "scalora":
            if is_quantized_linear(linear):
                accumulator_rank = cfg.scalora.accumulator_rank
            else:
                linear.float()
        layer = add_lora(linear, cfg.rank, cfg.alpha, cfg.use_rslora, cfg.dropout, accumulator_rank)
        if not layer.lora_A.is_meta:
            with torch.no_grad():
                layer.lora_A.copy_(initial_lora_A(name, cfg.rank, linear.in_features, seed))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_and_unwrap(model: nn.Module) -> None:
    """Fold every adapter into its weight and turn the layer back into its own class, so the
    model is an ordinary transformers model again (for save_pretrained). Not for 4-bit layers."""
    for layer in lora_layers(model).values():
        layer.weight.copy_((layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype))
        for name in ("lora_A", "lora_B", "lora_dropout", "acc_U", "acc_V"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.__class__ = layer.base_class()


def save_peft_adapter(model: nn.Module, out_dir: str | Path, cfg: AdapterConfig, base_model_path: str) -> Path | None:
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
