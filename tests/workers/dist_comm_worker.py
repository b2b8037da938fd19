"""torchrun worker: measures what ScaLoRA's refactor and a whole FSDP2 step communicate.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/workers/dist_comm_worker.py MODEL_DIR OUT.json [KEY=VALUE ...]

Rank 0 writes {"refactor": [[op, bytes], ...], "step": [[op, bytes], ...], "layers": L, "rank": r}
where "refactor" holds the collectives issued inside one ScaLoRA refactor and "step" those of a
whole training step (FSDP2's all-gathers and reduce-scatters included), as recorded at the
dispatcher by CollectiveRecorder.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from scalora_dist.config import load_config
from scalora_dist.distributed import CollectiveRecorder, init_distributed
from scalora_dist.train import forward_backward, setup, train_step

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    info = init_distributed()
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train_files=[{REPO / 'configs/data/quickstart_train.jsonl'}]",
            "data.max_length=32",
            "data.packing=true",
            "adapter.rank=2",
            "adapter.alpha=4",
            "adapter.scalora.warmup_steps=1",
            "train.max_steps=2",
            "train.micro_batch_size=1",
            "train.lr=1e-2",
            "output.dir=/tmp/unused",
            *sys.argv[3:],
        ],
    )
    run = setup(cfg, info)
    # One plain step so lora_B is non-zero and AdamW has state, then a measured refactor step.
    train_step(run, 0)
    run.scalora.prepare(1)
    with CollectiveRecorder() as step_rec:
        forward_backward(run.model, run.train_loader, 1, run.device)
        with CollectiveRecorder() as refactor_rec:
            report = run.scalora.refactor()
    if info.is_main:
        Path(out).write_text(
            json.dumps(
                {
                    "refactor": refactor_rec.calls,
                    "step": step_rec.calls,
                    "layers": len(run.scalora.layers),
                    "rank": cfg.adapter.rank,
                    "reported_bytes": report.reduced_bytes,
                    "gathered_bytes": report.gathered_bytes,
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
