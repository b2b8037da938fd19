"""The shipped 7-12B recipes in configs/, rendered from one template and the memory plan.

    python tools/generators/recipes.py --write configs/     # (re)write configs/<model>/<setup>.yaml
    python tools/generators/recipes.py --check configs/     # exit 1 if a shipped recipe differs (a test runs it)

Four models (Llama-3.1-8B, Gemma-3-12B, Qwen3-8B, Mistral-7B) x three setups: one GPU with a
4-bit (NF4) base, one node of 8 GPUs with a bf16 base under FSDP2, and 8 SLURM nodes of 8
GPUs. Every file starts with the command that runs it and the memory per GPU that
`scalora-dist plan` computes for that model's shape and that setup (scalora_dist/plan.py, with
the placement model.base_placement auto takes on 80 GiB GPUs), so the header cannot drift
from the plan; tests/test_recipes.py runs every recipe for two steps on a tiny model of the
same architecture class.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scalora_dist import plan as memory_plan
from scalora_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEVICE_MEMORY_GIB = {1: 24, 8: 80, 64: 80}
"""The GPUs each setup is planned for: a 24 GiB card alone, 80 GiB cards in a node."""


@dataclass(frozen=True)
class Model:
    slug: str
    hub_id: str
    shape: str
    tiny_arch: str
    """make_tiny_model --arch of the same architecture class (tests)."""
    note: str


MODELS = [
    Model(
        "llama3.1-8b",
        "meta-llama/Llama-3.1-8B",
        "llama3.1-8b",
        "llama",
        "gated on the hub: accept the licence there and set HF_TOKEN",
    ),
    Model(
        "gemma3-12b",
        "google/gemma-3-12b-pt",
        "gemma3-12b",
        "gemma3-multimodal",
        "Gemma3ForConditionalGeneration: the language model trains, the vision tower stays frozen; "
        "gated: accept the licence and set HF_TOKEN",
    ),
    Model("qwen3-8b", "Qwen/Qwen3-8B", "qwen3-8b", "qwen3", "open weights"),
    Model("mistral-7b", "mistralai/Mistral-7B-v0.3", "mistral-7b", "mistral", "open weights"),
]


@dataclass(frozen=True)
class Setup:
    slug: str
    title: str
    gpus: int
    base: str  # memory_plan base: bf16 | nf4
    micro_batch: int
    grad_accum: int
    optimizer: str  # our train.optimizer
    command: str


RANK, ACC_RANK, SEQ_LEN = 16, 64, 2048
SETUPS = [
    Setup(
        "1gpu-4bit",
        "one GPU, 4-bit (NF4) frozen base",
        1,
        "nf4",
        1,
        16,
        "paged_adamw_8bit",
        "scalora-dist train {path}",
    ),
    Setup(
        "8gpu-bf16",
        "one node of 8 GPUs, bf16 base under FSDP2",
        8,
        "bf16",
        2,
        4,
        "adamw",
        "scalora-dist train {path} --nproc-per-node 8",
    ),
    Setup(
        "slurm-8x8",
        "8 SLURM nodes x 8 GPUs, bf16 base under FSDP2",
        64,
        "bf16",
        2,
        1,
        "adamw",
        "scalora-dist slurm {path} --nodes 8 --gpus-per-node 8 --partition gpu --time 12:00:00",
    ),
]


def planned(model: Model, setup: Setup, body: str) -> tuple[float, str]:
    """(GiB per GPU, the placement) that scalora-dist plan gives the recipe `body` on its GPUs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(body)
        cfg = load_config(path, ["data.train_files=[x.jsonl]"])
    shape = memory_plan.SHAPES[model.shape]
    memory = DEVICE_MEMORY_GIB[setup.gpus] * memory_plan.GiB
    if setup.gpus == 1:
        return memory_plan.run_plan(cfg, shape, 1, "-", memory, "cuda").total / memory_plan.GiB, "-"
    choice = memory_plan.choose_placement(cfg, shape, setup.gpus, "cuda", memory, "")
    chosen = choice.replicated if choice.placement == "replicated" else choice.sharded
    return chosen.total / memory_plan.GiB, choice.placement


def plan_command(path: str, setup: Setup) -> str:
    ranks = "" if setup.gpus == 1 else f" --nproc-per-node 8{' --nnodes 8' if setup.gpus == 64 else ''}"
    return f"scalora-dist plan {path}{ranks} --device-memory {DEVICE_MEMORY_GIB[setup.gpus]}GiB"


def render(model: Model, setup: Setup) -> str:
    path = f"configs/{model.slug}/{setup.slug}.yaml"
    global_batch = setup.micro_batch * setup.grad_accum * setup.gpus
    quant = (
        (
            "  load_in_4bit: true               # bitsandbytes NF4 codes; ScaLoRA's merges go to float32 accumulators\n"
            "  quant_type: nf4\n"
            "  double_quant: true\n"
            "  quant_compute_dtype: bfloat16\n"
        )
        if setup.base == "nf4"
        else ""
    )
    accumulator = (
        f"    accumulator_rank: {ACC_RANK}            # rank of the float32 store of the merged update\n"
        if setup.base == "nf4"
        else ""
    )
    save = (
        "  save_every: 100                  # the job resumes from the newest checkpoint when requeued\n"
        if setup.slug.startswith("slurm")
        else "  save_every: 200\n"
    )
    body = f"""\
model:
  path: {model.hub_id}
  dtype: bfloat16
  attn_implementation: sdpa        # flash_attention_2 when flash-attn is installed
{quant}  gradient_checkpointing: true
adapter:
  method: scalora
  rank: {RANK}
  alpha: {2 * RANK}
  use_rslora: true
  target_modules: all-linear
  scalora:
    interval: 1
    kappa: auto
{accumulator}    warmup_steps: 10
data:
  train_files:
  - {{path: tatsu-lab/alpaca, split: "train[:98%]"}}
  eval_files:
  - {{path: tatsu-lab/alpaca, split: "train[98%:]"}}
  format: alpaca
  max_length: {SEQ_LEN}
  packing: true
train:
  epochs: 1
  micro_batch_size: {setup.micro_batch}
  grad_accum_steps: {setup.grad_accum}
  optimizer: {setup.optimizer}
  lr: 2.0e-4
  lr_scheduler: cosine
  warmup_steps: 20
  max_grad_norm: 1.0
  log_every: 10
  eval_every: 100
  eval_batches: 20
{save}  keep_last: 2
output:
  dir: runs/{model.slug}-{setup.slug}
"""
    gib, placement = planned(model, setup, body)
    where = f"{DEVICE_MEMORY_GIB[setup.gpus]} GiB GPU" + (
        "" if setup.gpus == 1 else f"s, base placement auto: {placement}"
    )
    return (
        f"""\
# ScaLoRA fine-tuning of {model.hub_id}: {setup.title}.
#   {setup.command.format(path=path)}
# Memory per GPU: {gib:.1f} GiB planned on {where}; {setup.micro_batch} x {SEQ_LEN} tokens per GPU
#   ({plan_command(path, setup)}: computed from the model's shape, not measured on a GPU).
# Global batch: {global_batch} sequences of up to {SEQ_LEN} tokens per optimizer step.
# Model: {model.note}. Data: Stanford Alpaca from the hub, 98% to train, 2% held out.
# Generated by tools/generators/recipes.py; edit the template there.
"""
        + body
    )


def recipes() -> dict[str, str]:
    return {f"{m.slug}/{s.slug}.yaml": render(m, s) for m in MODELS for s in SETUPS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="DIR", type=Path)
    group.add_argument("--check", metavar="DIR", type=Path)
    args = p.parse_args(argv)
    root = args.write or args.check
    stale = []
    for name, text in recipes().items():
        target = root / name
        if args.write:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}")
        elif not target.is_file() or target.read_text() != text:
            stale.append(str(target))
    if stale:
        print(
            "differs from tools/generators/recipes.py: "
            + ", ".join(stale)
            + " (python tools/generators/recipes.py --write configs/)"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
