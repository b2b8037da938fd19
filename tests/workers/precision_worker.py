"""Worker for tests/test_precision.py: does every ScaLoRA refactor keep the function, on the
float32 masters, in this configuration?

    python tests/workers/precision_worker.py MODEL_DIR OUT.json [key=value ...]                 # one process
    python -m torch.distributed.run --standalone --nproc-per-node N tests/workers/precision_worker.py ...

Trains through the production recipe (train.setup and the steps of train.train_step) and,
around every refactor, gathers each adapted layer's float32 masters: the effective weight
W0 + s * lora_B @ lora_A (+ acc_U @ acc_V^T on a 4-bit base, where W0 is the dequantised,
unchanging base). Rank 0 writes, per refactor step and layer, the change of the effective
weight, the size of the merged increment (the change of W0, or of the accumulator) and the
norms that bound float32 round-off, as float64 Frobenius norms.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from scalora_dist.config import load_config
from scalora_dist.distributed import destroy_distributed, init_distributed
from scalora_dist.model.lora import lora_layers
from scalora_dist.train import forward_backward, setup

REPO = Path(__file__).resolve().parents[2]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double().cpu()


def masters(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(merged part, adapter part, effective weight) of one layer, float64."""
    adapter = layer.scale * full(layer.lora_B) @ full(layer.lora_A)
    if layer.acc_U is not None:
        merged = full(layer.acc_U) @ full(layer.acc_V).T  # the 4-bit codes never change
    else:
        merged = full(layer.weight)
    return merged, adapter, merged + adapter


def main() -> None:
    model_dir, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    info = init_distributed()
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train_files=[{REPO / 'configs/data/quickstart_train.jsonl'}]",
            "data.max_length=32",
            "data.packing=true",
            "adapter.rank=4",
            "adapter.alpha=8",
            "adapter.use_rslora=true",
            "adapter.scalora.warmup_steps=2",
            "train.max_steps=8",
            f"train.micro_batch_size={4 // info.world_size}",
            "train.lr=1e-2",
            f"output.dir={out.parent / 'run'}",
            *overrides,
        ],
    )
    run = setup(cfg)
    layers = lora_layers(run.model)
    records = []
    for step in range(cfg.train.max_steps):
        run.model.train()
        run.scalora.prepare(step)
        forward_backward(run.model, run.train_loader, cfg.train.grad_accum_steps, run.device)
        if run.scalora.is_due(step):
            before = {n: masters(l) for n, l in layers.items()}
            report = run.scalora.refactor()
            for name, layer in layers.items():
                merged, adapter, effective = masters(layer)
                records.append(
                    {
                        "step": step + 1,
                        "layer": name,
                        "change": (effective - before[name][2]).norm().item(),
                        "increment": (merged - before[name][0]).norm().item(),
                        "merged": before[name][0].norm().item(),
                        "adapter": before[name][1].norm().item(),
                        "rank": layer.rank,
                    }
                )
            records[-1]["report"] = report.as_metrics()
        torch.nn.utils.clip_grad_norm_([p for p in run.params], 1.0)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    if info.is_main:
        out.write_text(json.dumps({"world_size": info.world_size, "distributed": info.distributed, "records": records}))
    destroy_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main()
