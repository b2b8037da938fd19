"""FSDP2 plan: build on the meta device, shard per decoder block, give each rank only its
rows of every weight straight from the safetensors files.

No rank ever materialises the full model: parameters are created on `meta`, sharded by
`fully_shard`, allocated shard-sized with `to_empty`, and filled by reading just the local
slice of each tensor from the checkpoint (safetensors slices are memory-mapped reads).

4-bit bases are the exception: bitsandbytes quantises while transformers loads, so each
rank loads the whole 4-bit model (a quarter of the bf16 bytes) and then shards it, or keeps
the codes whole (`model.quant_placement: replicated`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM

from scalora_dist.config import AdapterConfig, ConfigError, ModelConfig
from scalora_dist.model.loading import check_model_dir, is_quantized_linear, load_model, model_dtype
from scalora_dist.model.lora import LoRALinear, initial_lora_A, inject_adapters


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, found from the model's own `_no_split_modules` (every
    transformers architecture declares them), so no per-architecture table is needed."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"cannot shard {type(model).__name__}: it declares no decoder block classes "
            "(_no_split_modules)"
        )
    return blocks


def lora_A_on_dim1(model: nn.Module, world_size: int):
    """shard_placement_fn: lora_A (r, n) is split on its n columns, never on r (world may
    exceed r); everything else on dim 0, so W0 rows and lora_B rows line up. FSDP2 (torch
    2.13) cannot shard dim 1 unevenly, so n must divide by the world size."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, layer in layers.items():
        if layer.base.in_features % world_size:
            raise ConfigError(
                f"{world_size} processes cannot shard the adapter of {name}: its "
                f"{layer.base.in_features} input features do not divide by {world_size} "
                "(FSDP2 shards lora_A on its columns and does not support uneven column "
                "shards); use a world size that divides every adapted layer's in_features"
            )
    lora_A_ids = {id(m.lora_A) for m in layers.values()}
    return lambda param: Shard(1) if id(param) in lora_A_ids else None


def mixed_precision_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (None: the parameters' own dtype), reduce gradients in float32.
    4-bit codes are stored in the model dtype (loading.quantization_config), so this cast
    leaves them bit-for-bit intact."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    cpu_offload: bool = False,
    ignored_params: set[nn.Parameter] | None = None,
) -> None:
    kwargs = dict(
        mesh=mesh, mp_policy=mixed_precision_policy(param_dtype),
        shard_placement_fn=lora_A_on_dim1(model, mesh.size()),
    )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if ignored_params:
        kwargs["ignored_params"] = ignored_params
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


def build_sharded_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    device: torch.device,
    *,
    seed: int,
    cpu_offload: bool = False,
) -> nn.Module:
    model_dir = check_model_dir(model_cfg.path)
    if cpu_offload and device.type == "cpu":
        raise ConfigError(
            "model.cpu_offload: moves sharded state from the GPU to host memory, but this run "
            "has no GPU (its state is in host memory already)"
        )
    if model_cfg.load_in_4bit:
        return build_sharded_quantized_model(model_cfg, adapter_cfg, device, seed=seed, cpu_offload=cpu_offload)
    dtype = model_dtype(model_cfg, device)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )
    model.config.use_cache = False
    inject_adapters(model, adapter_cfg, seed=seed)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    apply_fsdp(model, mesh, param_dtype=compute_dtype(dtype), cpu_offload=cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)
    _init_non_persistent_buffers(model, device)
    load_local_shards(model, model_dir, seed=seed)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_sharded_quantized_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    device: torch.device,
    *,
    seed: int,
    cpu_offload: bool = False,
) -> nn.Module:
    """A 4-bit base under FSDP2. Placement `sharded`: the packed codes are sharded on dim 0
    like any parameter and all-gathered per block (their QuantState stays on the module,
    whole on every rank). `replicated`: the codes are FSDP2 ignored_params, kept whole on
    every rank, and only adapters, accumulators and unquantised parameters are sharded."""
    model = load_model(model_cfg, device)  # quantised while loading, whole on every rank
    inject_adapters(model, adapter_cfg, seed=seed)
    codes = {m.weight for m in model.modules() if is_quantized_linear(m)}
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    apply_fsdp(
        model, mesh, param_dtype=compute_dtype(model_dtype(model_cfg, device)), cpu_offload=cpu_offload,
        ignored_params=codes if model_cfg.quant_placement == "replicated" else None,
    )
    return model


def _init_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Rotary frequencies and similar buffers are computed, not stored in checkpoints; let
    transformers recompute them for the modules that own such buffers."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)
    for name, buf in model.named_buffers():
        if buf.device != device and buf.device.type != "meta":
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._buffers[attr] = buf.to(device)


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when the checkpoint is sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / f for k, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"model.path: {model_dir} has no model.safetensors(.index.json)")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def checkpoint_key(param_name: str) -> str:
    """Our parameter name -> the checkpoint's (LoRALinear wraps the original Linear as .base)."""
    return param_name.replace(".base.", ".")


@torch.no_grad()
def load_local_shards(model: nn.Module, model_dir: Path, *, seed: int) -> None:
    files = checkpoint_files(Path(model_dir))
    layers = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        offsets = _global_offsets(param)
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            layer_name = name.rsplit(".", 1)[0]
            layer = layers[f"{layer_name}."]
            if name.endswith(".lora_B"):
                local.zero_()
            else:
                full = initial_lora_A(layer_name, layer.rank, layer.base.in_features, seed)
                local.copy_(_slice(full, offsets, local.shape))
            continue
        key = checkpoint_key(name)
        if key not in files:
            raise ConfigError(
                f"model.path: the checkpoint has no tensor {key!r} (needed for {name}); "
                "is it a checkpoint of this architecture?"
            )
        # One short-lived mapping per tensor: pages read for it are released with it, so
        # a rank's resident memory holds its shards, not the parts of the file it touched.
        with safe_open(files[key], "pt", device="cpu") as f:
            tensor_slice = f.get_slice(key)
            index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
            local.copy_(tensor_slice[index] if local.dim() else tensor_slice[:])


def _global_offsets(param: torch.Tensor) -> tuple[int, ...]:
    if not isinstance(param, DTensor):
        return (0,) * param.dim()
    _, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offsets)


def _slice(full: torch.Tensor, offsets: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]
