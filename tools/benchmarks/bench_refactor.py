"""What ScaLoRA's refactor costs as the number of adapted layers grows: the per-layer overhead.

    python tools/benchmarks/bench_refactor.py                          # 28, 224 and 336 adapted layers, hidden 64
    python tools/benchmarks/bench_refactor.py --layers 28,224 --hidden-size 128 --repeats 5

A tiny Llama with all-linear targets has 7 adapted projections per decoder block, so 28, 224
and 336 adapted layers are 4, 32 and 48 blocks (Llama-3-8B has 224, Gemma-3-12B 336). For
each size: one training step's forward and backward (the gradients the refactor reads),
then the refactor alone, timed --repeats times (each call rewrites the layers again from
the same gradients; the work is the same), and the whole training step, timed the same
way, for the refactor's share of it. At small width the math per layer is tiny, so what
the table shows is the fixed cost per layer: Python, kernel launches, and on a GPU any
host syncs (refactor.py issues one statistics copy to the host and one copy of the
scales back per step, however many layers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def measure(adapted: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    from scalora_dist.config import load_config
    from scalora_dist.model.tiny import make_tiny_model
    from scalora_dist.train import forward_backward, setup, train_step

    if adapted % 7:
        raise SystemExit(f"--layers: {adapted} is not a multiple of 7 (adapted projections per block)")
    model_dir = make_tiny_model(
        work / f"model-{adapted}",
        hidden_size=args.hidden_size,
        num_layers=adapted // 7,
        num_heads=max(1, args.hidden_size // 32),
        num_kv_heads=max(1, args.hidden_size // 64),
        intermediate_size=2 * args.hidden_size,
    )
    run = setup(
        load_config(
            None,
            [
                f"model.path={model_dir}",
                f"data.train_files=[{REPO / 'configs/data/quickstart_train.jsonl'}]",
                "data.max_length=64",
                "data.packing=true",
                "adapter.method=scalora",
                f"adapter.rank={args.rank}",
                f"adapter.alpha={2 * args.rank}",
                "adapter.scalora.warmup_steps=0",
                "train.micro_batch_size=2",
                "train.max_steps=1000",
                "train.lr=1e-3",
                f"output.dir={work / 'out'}",
            ],
        )
    )
    for step in range(2):  # kappa resolved, every layer has moments
        train_step(run, step)
    refactor_s, step_s = [], []
    for i in range(args.repeats):
        run.scalora.prepare(2)
        forward_backward(run.model, run.train_loader, 1, run.device)
        started = time.perf_counter()
        report = run.scalora.refactor(2)
        refactor_s.append(time.perf_counter() - started)
        run.optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        train_step(run, 2 + i)
        step_s.append(time.perf_counter() - started)
    assert report.column + report.scalar + report.skipped == adapted, report
    refactor, step = statistics.median(refactor_s), statistics.median(step_s)
    return {
        "adapted": adapted,
        "refactor_ms": 1e3 * refactor,
        "per_layer_us": 1e6 * refactor / adapted,
        "step_ms": 1e3 * step,
        "share": refactor / step,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="28,224,336", help="adapted layers (multiples of 7)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(int(n), args, Path(tmp)) for n in args.layers.split(",")]
    print(
        f"ScaLoRA refactor vs adapted layers (hidden {args.hidden_size}, r {args.rank}, "
        f"median of {args.repeats}; `python tools/benchmarks/bench_refactor.py {' '.join(sys.argv[1:])}`)\n"
    )
    print("| adapted layers | refactor (ms) | per layer (µs) | whole step (ms) | refactor's share of the step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['adapted']} | {r['refactor_ms']:.1f} | {r['per_layer_us']:.0f} | {r['step_ms']:.1f} | "
            f"{100 * r['share']:.0f}% |"
        )


if __name__ == "__main__":
    main()
