"""FSDP2 plan: which modules become FSDP2 units, how each parameter is placed, and the
mixed-precision policy. Applied by model/build.py to a model still on the meta device.

Every decoder block (the model's own `_no_split_modules`) and the root are `fully_shard`ed:
blocks are gathered one at a time, so no rank ever holds the whole base. With the base's
linear weights replicated (FSDP2 ignored_params), what FSDP2 still manages is small
(adapters, norms, embeddings), so it is one group at the root: one all-gather and one
reduce-scatter a step, as DDP's one bucketed all-reduce, in place of two gathers and a
reduce-scatter per block.
W0 and lora_B split their rows (dim 0), so a rank's rows of W0 match its rows of lora_B;
lora_A (r, n) splits its columns (dim 1), never r. 4-bit codes shard on dim 0 like any
tensor (placement `sharded`) or stay whole on every rank as FSDP2 ignored_params
(`replicated`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

# torch.distributed.fsdp and .tensor load in ~1 s: imported where a model is sharded, so the
# launcher's checks (lora_A_on_dim1, decoder_blocks) do without them.
from scalora_dist.config import ConfigError
from scalora_dist.model.lora import LoRALinear


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, found from the model's own `_no_split_modules` (every
    transformers architecture declares them), so no per-architecture table is needed."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"cannot shard {type(model).__name__}: it declares no decoder block classes (_no_split_modules)"
        )
    return blocks


def lora_A_on_dim1(model: nn.Module, world_size: int):
    """shard_placement_fn: lora_A (r, n) is split on its n columns, never on r (world may
    exceed r); everything else on dim 0, so W0 rows and lora_B rows line up. FSDP2 (torch
    2.13) cannot shard dim 1 unevenly, so n must divide by the world size."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, layer in layers.items():
        if layer.in_features % world_size:
            raise ConfigError(
                f"{world_size} processes cannot shard the adapter of {name}: its "
                f"{layer.in_features} input features do not divide by {world_size} "
                "(FSDP2 shards lora_A on its columns and does not support uneven column "
                "shards); use a world size that divides every adapted layer's in_features"
            )
    from torch.distributed.tensor import Shard

    lora_A_ids = {id(m.lora_A) for m in layers.values()}
    return lambda param: Shard(1) if id(param) in lora_A_ids else None


def mixed_precision_policy(param_dtype: torch.dtype | None):
    """Compute in `param_dtype` (None: the parameters' own dtype), reduce gradients in float32.
    4-bit codes are stored in the model dtype (model/quant.py), so this cast
    leaves them bit-for-bit intact."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    cpu_offload: bool = False,
    replicated_weights: set[nn.Parameter] | None = None,
) -> None:
    """Shard `model` over `mesh`; `replicated_weights` (base_placement: replicated) stay whole
    on every rank as FSDP2 ignored_params, and the rest is then one group at the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    kwargs = dict(
        mesh=mesh,
        mp_policy=mixed_precision_policy(param_dtype),
        shard_placement_fn=lora_A_on_dim1(model, mesh.size()),
    )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if replicated_weights:
        kwargs["ignored_params"] = replicated_weights
    else:
        for block in decoder_blocks(model):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # Losses are divided by the global token count already, so gradients must be summed
    # across ranks, not averaged. Plain SUM (gloo has no PREMUL_SUM).
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """FSDP2's param_dtype for a model of `dtype`: float32 masters (targeted weights,
    factors) stay sharded in float32 and are cast to the model dtype for compute."""
    return None if dtype == torch.float32 else dtype
