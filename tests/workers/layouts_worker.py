"""Worker for tests/test_model_layouts.py: trains every (layout, method, base) case through the
production recipe (train.setup / train_step / export), in one process or under torchrun.

    python tests/workers/layouts_worker.py CASES.json OUT_DIR                        # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/workers/layouts_worker.py CASES.json OUT_DIR

CASES.json: {case: {"model": DIR, "overrides": [key=value, ...]}}. For each case, writes
OUT_DIR/<case>/ (merged/, adapter/ for lora) and, on rank 0, OUT_DIR/<case>/probe.pt: the
trained model's own logits on a fixed batch (computed by every rank, under FSDP2 too).
A case with a "config" (a YAML recipe) instead runs the whole recipe, train.train, with its
overrides (tests/test_recipes.py).
"""

import json
import sys
from pathlib import Path

import torch

from scalora_dist.config import load_config
from scalora_dist.distributed import destroy_distributed, init_distributed
from scalora_dist.train import export, setup, train, train_step

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def probe_ids(vocab_size: int) -> torch.Tensor:
    return (torch.arange(24).view(2, 12) * 7 + 11) % (vocab_size - 10) + 10


def run_case(model_dir: str, overrides: list[str], out: Path, world: int) -> None:
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
            f"train.max_steps={STEPS}",
            f"train.micro_batch_size={4 // world}",
            "train.lr=1e-2",
            f"output.dir={out}",
            "model.base_placement=sharded",  # each rank reads its own slices of every tensor
            *overrides,
        ],
    )
    run = setup(cfg)
    for step in range(STEPS):
        train_step(run, step)
    run.model.eval()
    with torch.no_grad():
        logits = run.model(input_ids=probe_ids(run.tokenizer.vocab_size).to(run.device)).logits.float().cpu()
    export(run, out)
    if run.dist.is_main:
        torch.save({"logits": logits}, out / "probe.pt")


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out_root = Path(sys.argv[2])
    info = init_distributed()
    for name, case in cases.items():
        if "config" in case:
            train(
                load_config(case["config"], [*case["overrides"], f"output.dir={out_root / name}"]), show_progress=False
            )
        else:
            run_case(case["model"], case["overrides"], out_root / name, info.world_size)
    destroy_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main()
