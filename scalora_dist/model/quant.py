"""4-bit frozen bases with bitsandbytes: layers built on the meta device, weights quantised
as they are read, codes that shard like any tensor.

On the meta device every targeted nn.Linear becomes a bitsandbytes `Linear4bit` whose
weight already has the packed shape (out*in/2 bytes, viewed in the model dtype, as a column):
FSDP2 can then shard the codes on dim 0 before any weight is read. The loader reads each
full-precision weight once, quantises it with bitsandbytes' own `quantize_4bit` (what
transformers' BitsAndBytesConfig loading calls underneath) and keeps this rank's rows of the
codes; the QuantState (block scales, small) stays whole on the module, where the layer
finds it after FSDP2 has swapped the parameter.

The codes are stored in a tensor of the model dtype, the dtype FSDP2's mixed-precision
policy casts parameters to: that cast is then a no-op, where any real cast would turn the
codes into random weights.
"""

from __future__ import annotations

import torch
from torch import nn

from scalora_dist.config import ConfigError, ModelConfig

BLOCKSIZE = 64  # bitsandbytes' default block of the 4-bit scales


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model.load_in_4bit: needs the bitsandbytes package (pip install 'scalora-dist[quant]')"
        ) from None


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer, adapted or not (checked by class name along the MRO, so
    bitsandbytes stays optional and our LoRA subclass counts too)."""
    return any(c.__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") for c in type(module).__mro__)


def packed_shape(out_features: int, in_features: int, storage: torch.dtype) -> tuple[int, int]:
    """Shape of bitsandbytes' packed codes: two 4-bit codes per byte, viewed in `storage`."""
    nbytes = (out_features * in_features + 1) // 2
    itemsize = torch.empty((), dtype=storage).element_size()
    return ((nbytes + itemsize - 1) // itemsize, 1)


def quantize_linears_(model: nn.Module, names: list[str], cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Replace the named nn.Linear modules of a meta-device model by 4-bit layers whose
    weights are meta tensors of the packed shape (filled later by `quantize_weight`)."""
    import bitsandbytes as bnb

    compute = dtype if cfg.quant_compute_dtype == "auto" else _DTYPES[cfg.quant_compute_dtype]
    for name in names:
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            quant_storage=dtype,
            device="meta",
        )
        q.weight = nn.Parameter(
            torch.empty(packed_shape(linear.out_features, linear.in_features, dtype), dtype=dtype, device="meta"),
            requires_grad=False,
        )
        if linear.bias is not None:
            q.bias = nn.Parameter(torch.empty_like(linear.bias, dtype=dtype), requires_grad=False)
        q.quant_state = None
        q.quant_settings = (cfg.quant_type, cfg.double_quant, dtype)
        # bitsandbytes (0.50) repacks 4-bit codes into an AVX512-bf16 kernel layout at the
        # first CPU forward in eval mode; the repacked codes then give wrong outputs in
        # training mode. Training alternates eval and train, so keep the portable layout.
        q.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)


@torch.no_grad()
def quantize_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Quantise a full-precision weight (out, in) for `module` (made by quantize_linears_):
    store its QuantState on the module and return the whole packed codes."""
    import bitsandbytes.functional as bnbf

    quant_type, double_quant, storage = module.quant_settings
    codes, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=storage,
    )
    module.quant_state = state
    return codes


def quant_state(linear: nn.Module):
    """The bitsandbytes QuantState of a 4-bit layer (kept on the module: FSDP2 replaces the
    weight by a plain sharded parameter, which has none)."""
    state = getattr(linear, "quant_state", None)
    return state if state is not None else getattr(linear.weight, "quant_state", None)


@torch.no_grad()
def dequantize(codes: torch.Tensor, state) -> torch.Tensor:
    """Float32 weight from packed 4-bit codes (whole, not a shard) and their QuantState."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(codes, state).float()


@torch.no_grad()
def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The float32 weight of a (not sharded) bitsandbytes 4-bit layer."""
    return dequantize(linear.weight.data, quant_state(linear))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nf4_weight_bytes(m: int, n: int, double_quant: bool = True, blocksize: int = 64) -> float:
    """Bytes of an (m, n) weight stored as NF4: 4 bits per weight plus the block scales
    (float32, or 8-bit with a second-level float32 scale per 256 blocks)."""
    blocks = m * n / blocksize
    scales = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
    return m * n / 2 + scales
