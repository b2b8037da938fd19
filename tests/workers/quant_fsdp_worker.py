"""torchrun worker: does every 4-bit layer compute the same function after FSDP2 wraps it?

    python -m torch.distributed.run --standalone --nproc-per-node N tests/workers/quant_fsdp_worker.py MODEL_DIR OUT.json

For each case (model dtype, placement of the codes, the param dtype FSDP2 casts to), the
worker builds the tiny model with a 4-bit base and q_proj, v_proj adapted (so both our
LoRALinear over a 4-bit base and bare bitsandbytes Linear4bit layers are present) twice
through the production path (model/build.py): in one process, where it notes every 4-bit
layer's dequantised weight and the logits, and sharded over all ranks with the training
mixed-precision policy. It compares each sharded 4-bit layer's output with `input @ W.T`
from the unsharded weight, and the logits with the unsharded model's. Rank 0 writes {case: {"layers": {name: rel_err},
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
from scalora_dist.model import build
from scalora_dist.model.lora import LoRALinear
from scalora_dist.model.quant import dequantized_weight, is_quantized_linear

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
        elif is_quantized_linear(m):
            out[name] = m
    return out


def run_case(model_dir: str, dtype: str, placement: str, cast: str, ids: torch.Tensor) -> dict:
    cfg = ModelConfig(path=model_dir, dtype=dtype, load_in_4bit=True, base_placement=placement)
    adapter = AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "v_proj"])
    cpu = torch.device("cpu")
    model = build.build_model(model_dir, cfg, adapter, cpu)
    weights = {name: dequantized_weight(m) for name, m in quantized_layers(model).items()}
    model.train()
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits.float()

    production_policy = build.compute_dtype
    if cast != "model":  # the control: a policy that casts the packed codes
        build.compute_dtype = lambda _: getattr(torch, cast)
    try:
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        model = build.build_model(model_dir, cfg, adapter, cpu, mesh=mesh)
    finally:
        build.compute_dtype = production_policy
    model.train()

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
