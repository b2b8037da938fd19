"""Step time and memory of LoRA vs ScaLoRA (I = 1, I = 10) vs full fine-tuning, and of
bf16 vs 4-bit (NF4) frozen bases, side by side in one run.

    python tools/benchmarks/bench_step.py                        # tiny Llama built on the fly, CPU
    python tools/benchmarks/bench_step.py --hidden-size 512 --num-layers 8 --steps 30
    python tools/benchmarks/bench_step.py --variants lora-bf16,lora-nf4,scalora-bf16,scalora-nf4 --hidden-size 1024

Timing: the variants live in one process and their steps are interleaved (lora, scalora,
scalora-I10, lora, ...), so machine noise hits them alike; the table reports the median
step time and its ratio to LoRA. Throughput: tokens/s (packed sequences: no padding) and
achieved TFLOP/s, from the FLOPs of one step's forward and backward as executed (torch's
FlopCounterMode: adapter matmuls included, the weight gradients a frozen base skips not);
MFU = achieved / peak where the peak is known (a CUDA GPU in PEAK_TFLOPS, or --peak-tflops). Peak RSS: each variant runs again alone in a fresh
process (ru_maxrss only grows), for the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

VARIANTS = {
    "lora": ["adapter.method=lora"],
    "scalora": ["adapter.method=scalora", "adapter.scalora.interval=1"],
    "scalora-I10": ["adapter.method=scalora", "adapter.scalora.interval=10"],
    "full": ["adapter.method=full"],
    # frozen-base precision (bf16 compute on CPU too, so the two bases differ only in storage)
    "lora-bf16": ["adapter.method=lora", "model.dtype=bfloat16"],
    "lora-nf4": ["adapter.method=lora", "model.dtype=bfloat16", "model.load_in_4bit=true"],
    "scalora-bf16": ["adapter.method=scalora", "model.dtype=bfloat16"],
    "scalora-nf4": ["adapter.method=scalora", "model.dtype=bfloat16", "model.load_in_4bit=true"],
    # torch.compile of the decoder blocks (train.compile); --warmup covers the compile
    "lora-compiled": ["adapter.method=lora", "train.compile=true"],
    "scalora-compiled": ["adapter.method=scalora", "adapter.scalora.interval=1", "train.compile=true"],
}


def write_data(path: Path, n: int = 512) -> None:
    words = "the a cat dog bird sees finds likes near under over blue red green big small".split()
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60))
            f.write(json.dumps({"text": text}) + "\n")


def overrides_for(args: argparse.Namespace, variant: str, model_dir: Path, data: Path) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"data.train_files=[{data}]",
        f"data.max_length={args.seq_len}",
        "data.packing=true",
        f"adapter.rank={args.rank}",
        f"adapter.alpha={2 * args.rank}",
        f"adapter.scalora.warmup_steps={args.warmup}",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.micro_batch_size={args.batch_size}",
        "train.lr=1e-3",
        f"output.dir={model_dir.parent / 'out'}",
        *VARIANTS[variant],
    ]


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(given: float | None) -> float | None:
    import torch

    if given:
        return given
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)
    return None  # a CPU's peak depends on its vector units and clocks: not guessed


def step_flops(run) -> float:
    """FLOPs of one training step's forward and backward passes, counted as they run."""
    from torch.utils.flop_counter import FlopCounterMode

    from scalora_dist.train import forward_backward

    with FlopCounterMode(display=False) as counter:
        forward_backward(run.model, run.train_loader, run.cfg.train.grad_accum_steps, run.device)
    run.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def build_run(args: argparse.Namespace, variant: str, model_dir: Path, data: Path):
    from scalora_dist.config import load_config
    from scalora_dist.train import setup

    return setup(load_config(None, overrides_for(args, variant, model_dir, data)))


def interleave(runs: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """Step every run in turn (v1, v2, v3, v1, ...) so machine noise hits them alike;
    returns each run's step times after `warmup` untimed steps."""
    from scalora_dist.train import train_step

    times: dict[str, list[float]] = {v: [] for v in runs}
    for step in range(warmup + steps):
        for v, run in runs.items():
            started = time.perf_counter()
            train_step(run, step)
            if step >= warmup:
                times[v].append(time.perf_counter() - started)
    return times


def time_interleaved(args, variants, model_dir, data) -> tuple[dict[str, list[float]], dict[str, float]]:
    runs = {v: build_run(args, v, model_dir, data) for v in variants}
    flops = {v: step_flops(run) for v, run in runs.items()}
    return interleave(runs, args.warmup, args.steps), flops


def training_state_mib(run) -> float:
    """Bytes held by the model's parameters and buffers and the optimizer state (each
    storage counted once): what the base precision and the method change, without the
    interpreter's baseline that dominates RSS at small sizes."""
    import torch

    tensors = [*run.model.parameters(), *run.model.buffers()]
    tensors += [v for state in run.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) / 2**20


def measure_alone(variant: str, argv: list[str]) -> dict[str, float]:
    """Peak RSS and training-state size of `variant` run alone in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--only", variant],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="existing checkpoint (default: build a tiny Llama)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (also ScaLoRA warm-up)")
    p.add_argument("--variants", default="lora,scalora,scalora-I10")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: known GPUs only)")
    p.add_argument("--only", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    from scalora_dist.metrics import peak_rss_mib, quiet_libraries

    quiet_libraries()
    from scalora_dist.model.tiny import make_tiny_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "bench.jsonl"
        write_data(data)
        model_dir = args.model_dir or make_tiny_model(
            tmp_path / "model",
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=max(1, args.hidden_size // 64),
            num_kv_heads=max(1, args.hidden_size // 128),
            intermediate_size=args.hidden_size * 2,
            corpus_files=[str(data)],
        )
        if args.only:
            from scalora_dist.train import train_step

            run = build_run(args, args.only, Path(model_dir), data)
            for step in range(args.warmup + args.steps):
                train_step(run, step)
            print(json.dumps({"peak_rss_mib": peak_rss_mib(), "state_mib": training_state_mib(run)}))
            return

        variants = args.variants.split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        times, flops = time_interleaved(args, variants, Path(model_dir), data)
        passthrough = [a for a in sys.argv[1:] if a != "--only"]
        if not args.model_dir:
            passthrough += ["--model-dir", str(model_dir)]
        alone = {v: measure_alone(v, passthrough) for v in variants}

    base = statistics.median(times[variants[0]])
    table = Table(
        title=f"step time, {args.steps} interleaved steps per variant, "
        + (f"{args.model_dir.name}, " if args.model_dir else f"hidden {args.hidden_size} x {args.num_layers} layers, ")
        + f"r={args.rank}, "
        f"batch {args.batch_size}x{args.seq_len}, {torch.get_num_threads()} threads"
    )
    peak = peak_tflops(args.peak_tflops)
    columns = (
        "variant",
        "median step (ms)",
        f"ratio to {variants[0]}",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "weights + optimizer (MiB)",
        "peak RSS alone (MiB)",
    )
    for col in columns:
        table.add_column(col, justify="right")
    tokens = args.batch_size * args.seq_len  # packed sequences: no padding
    for v in variants:
        med = statistics.median(times[v])
        achieved = flops[v] / med / 1e12
        mfu = f"{100 * achieved / peak:.3g}%" if peak else "–"
        table.add_row(
            v,
            f"{med * 1e3:.1f}",
            f"{med / base:.3f}",
            f"{tokens / med:.0f}",
            f"{achieved:.4g}",
            mfu,
            f"{alone[v]['state_mib']:.1f}",
            f"{alone[v]['peak_rss_mib']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
