"""torchrun worker: does every 4-bit layer compute the same function after FSDP2 wraps it?

    python -m torch.distributed.run --standalone --nproc-per-node N tests/quant_fsdp_worker.py MODEL_DIR OUT.json

For each case (model dtype, placement of the codes, the param dtype FSDP2 casts to), the
worker loads the tiny model with a 4-bit base, adapts q_proj and v_proj (so both our
LoRALinear over a 4-bit base and bare bitsandbytes Linear4bit layers are present), notes
every 4-bit layer's dequantised weight, wraps the model exactly as training does
(sharding.apply_fsdp with its mixed-precision policy), runs a forward, and compares each
4-bit layer's output with `input @ W.T` from the weight noted before wrapping, and the
logits with those of the unwrapped model. Rank 0 writes {case: {"layers": {name: rel_err},
"logits": rel_err}}.

The case with `cast: float16` on a bfloat16 model is the control: a policy that casts the
packed codes must be caught by this comparison.
"""

import json
import sys

import torch
from torch.distributed.device_mesh import init_device_mesh

from scalora_dist.config import AdapterConfig, ModelConfig
from scalora_dist.distributed import init_distributed
from scalora_dist.model.loading import dequantized_weight, is_quantized_linear, load_model
from scalora_dist.model.lora import LoRALinear, inject_adapters
from scalora_dist.model.sharding import apply_fsdp, compute_dtype

CASES = {
    "float32/sharded": ("float32", "sharded", "model"),
    "float32/replicated": ("float32", "replicated", "model"),
    "bfloat16/sharded": ("bfloat16", "sharded", "model"),
    "bfloat16/replicated": ("bfloat16", "replicated", "model"),
    "control: bfloat16 codes cast to float16": ("bfloat16", "sharded", "float16"),
}


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every 4-bit computation: our adapted layers (whose lora_B is still zero, so their
    output is the 4-bit base's) and the bare Linear4bit layers left unadapted."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.quantized:
            out[name] = m
        elif is_quantized_linear(m) and not name.endswith(".base"):
            out[name] = m
    return out


def run_case(model_dir: str, dtype: str, placement: str, cast: str, ids: torch.Tensor) -> dict:
    cfg = ModelConfig(path=model_dir, dtype=dtype, load_in_4bit=True, quant_placement=placement)
    model = load_model(cfg, "cpu")
    inject_adapters(model, AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "v_proj"]))
    layers = quantized_layers(model)
    weights = {
        name: dequantized_weight(m.base if isinstance(m, LoRALinear) else m) for name, m in layers.items()
    }
    model.train()
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits.float()

    torch_dtype = getattr(torch, dtype)
    param_dtype = compute_dtype(torch_dtype) if cast == "model" else getattr(torch, cast)
    codes = {m.weight for m in model.modules() if is_quantized_linear(m)}
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    apply_fsdp(model, mesh, param_dtype=param_dtype, ignored_params=codes if placement == "replicated" else None)

    errors: dict[str, float] = {}

    def check(name: str):
        def hook(module, inputs, output):
            x = inputs[0].float()
            expected = x @ weights[name].T
            errors[name] = ((output.float() - expected).norm() / expected.norm()).item()
        return hook

    handles = [m.register_forward_hook(check(name)) for name, m in quantized_layers(model).items()]
    with torch.no_grad():
        logits_after = model(input_ids=ids).logits.float()
    for h in handles:
        h.remove()
    logits_err = ((logits_after - logits_before).norm() / logits_before.norm()).item()
    assert errors.keys() == weights.keys(), "every 4-bit layer must have run"
    return {"layers": errors, "logits": logits_err}


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    info = init_distributed()
    ids = torch.arange(24).view(2, 12) + 10
    results = {case: run_case(model_dir, *spec, ids) for case, spec in CASES.items()}
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": info.world_size, "cases": results}, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
