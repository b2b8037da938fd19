"""ScaLoRA over a 4-bit base: how much of the accumulated update survives, and what it costs.

    python tools/benchmarks/bench_quant.py                      # fidelity + memory tables (CPU, ~1 min)
    python tools/benchmarks/bench_quant.py --steps 200 --size 2048

Fidelity: a 4-bit (NF4) weight receives T ScaLoRA-like increments (rank r, each a small
fraction of the weight's norm, in changing directions). "kept" is
1 - ||intended - kept_update|| / ||intended||, where intended is the exact float64 sum of the
increments and kept_update what the effective weight actually holds:
- naive requantisation: W <- Q(deq(W) + increment) every step (4-bit codes absorb nothing
  smaller than half a quantisation step);
- our accumulator: the increments go into a float32 rank-R factorisation U V^T,
  re-compressed to its best rank-R approximation whenever it grows (scalora/scaling.py).
Random increment directions are the worst case for a low-rank accumulator (the exact sum
has a flat spectrum of rank T*r); a real run's update has a decaying spectrum.

Memory: bytes per layer computed from the shapes, next to the measured size of the real
tensors (bitsandbytes NF4 codes + quant state; accumulator factors), and totals for a
Gemma-3-12B-shaped model.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
from rich.console import Console
from rich.table import Table

from scalora_dist.model.quant import nf4_weight_bytes
from scalora_dist.scalora.scaling import accumulate_low_rank

# Gemma-3-12B text stack: hidden 3840, 48 layers, 16 query heads x 256, 8 KV heads x 256.
GEMMA3_12B = {
    "layers": 48,
    "shapes": {
        "q_proj": (4096, 3840),
        "k_proj": (2048, 3840),
        "v_proj": (2048, 3840),
        "o_proj": (3840, 4096),
        "gate_proj": (15360, 3840),
        "up_proj": (15360, 3840),
        "down_proj": (3840, 15360),
    },
}


def quantize(w: torch.Tensor, quant_type: str = "nf4"):
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(w.float().contiguous(), quant_type=quant_type, quant_storage=torch.uint8)


def dequantize(codes, state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(codes, state).double()


def increments(m: int, n: int, r: int, steps: int, rel_size: float, norm: float, seed: int):
    """T rank-r increments a_t b_t^T, each of Frobenius norm rel_size * norm."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        a = torch.randn(m, r, generator=g, dtype=torch.float64)
        b = torch.randn(n, r, generator=g, dtype=torch.float64)
        scale = rel_size * norm / (a @ b.T).norm()
        yield (a * scale.sqrt()), (b * scale.sqrt())


def fidelity(w0: torch.Tensor, steps, ranks: list[int]) -> dict[str, float]:
    """Fraction of the intended accumulated update (the exact sum of `steps`, an iterable of
    rank-r factor pairs (a, b)) that each design keeps on top of the 4-bit weight w0."""
    m, n = w0.shape
    codes, state = quantize(w0)
    base = dequantize(codes, state)
    intended = torch.zeros(m, n, dtype=torch.float64)
    naive_codes, naive_state = codes, state
    acc = {R: (torch.zeros(m, R), torch.zeros(n, R)) for R in ranks}
    for a, b in steps:
        intended += a.double() @ b.double().T
        naive_codes, naive_state = quantize(dequantize(naive_codes, naive_state) + a.double() @ b.double().T)
        for R in ranks:
            U, V, _ = accumulate_low_rank(*acc[R], a.float(), b.float())
            acc[R] = (U, V)

    def kept(update: torch.Tensor) -> float:
        return 1.0 - ((intended - update).norm() / intended.norm()).item()

    out = {"naive requantisation": kept(dequantize(naive_codes, naive_state) - base)}
    for R in ranks:
        U, V = acc[R]
        out[f"accumulator R={R}"] = kept(U.double() @ V.double().T)
    return out


def random_fidelity(
    m: int, n: int, r: int, steps: int, ranks: list[int], rel_size: float, seed: int = 0
) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed + 1)
    w0 = torch.randn(m, n, generator=g) * 0.02
    norm = w0.norm().item()
    return fidelity(w0, increments(m, n, r, steps, rel_size, norm, seed), ranks)


def real_increments(steps: int, rank: int, layer: str, hidden: int = 256, seed: int = 0):
    """Train the quickstart-sized tiny Llama with ScaLoRA on a float32 base and return the
    initial weight of `layer` and the rank-r increment merged into it at every step."""
    import tempfile
    from pathlib import Path

    from scalora_dist.config import load_config
    from scalora_dist.metrics import quiet_libraries
    from scalora_dist.model.lora import lora_layers
    from scalora_dist.model.tiny import make_tiny_model
    from scalora_dist.train import setup, train_step

    quiet_libraries()
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(
            Path(tmp) / "m", hidden_size=hidden, num_layers=4, intermediate_size=2 * hidden, seed=seed
        )
        cfg = load_config(
            repo / "configs/quickstart.yaml",
            [
                f"model.path={model_dir}",
                f"adapter.rank={rank}",
                f"adapter.alpha={2 * rank}",
                f"train.max_steps={steps + 10}",
                "data.eval_files=[]",
                "train.eval_every=0",
                f"output.dir={tmp}/out",
            ],
        )
        run = setup(cfg)
        target = lora_layers(run.model)[layer]
        out, previous = [], None
        for step in range(steps + 10):
            train_step(run, step)
            w = target.weight.detach().double().clone()
            if previous is not None and step >= cfg.adapter.scalora.warmup_steps:
                inc = w - previous
                u, s_, vh = torch.linalg.svd(inc)
                out.append((u[:, :rank] * s_[:rank], vh[:rank].T))  # exact: the merge has rank r
            previous = w
        w0 = out and (previous - sum(a @ b.T for a, b in out))
        return w0.float(), out[:steps]


def measured_nf4_bytes(m: int, n: int) -> int:
    codes, state = quantize(torch.randn(m, n) * 0.02)
    tensors = [codes, state.absmax, state.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="layer is size x size")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    p.add_argument("--acc-ranks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--rel-size", type=float, default=1e-3, help="||increment|| / ||W|| per step")
    p.add_argument("--layer", default="model.layers.1.mlp.down_proj", help="layer of the real run")
    p.add_argument("--skip-real", action="store_true", help="only the synthetic increments")
    args = p.parse_args()
    console = Console()
    console.print(
        f"{datetime.date.today()}  {platform.machine()} {platform.processor() or ''} "
        f"torch {torch.__version__}  command: python tools/benchmarks/bench_quant.py "
        f"--size {args.size} --rank {args.rank} --steps {' '.join(map(str, args.steps))} "
        f"--acc-ranks {' '.join(map(str, args.acc_ranks))} --rel-size {args.rel_size}"
        + (" --skip-real" if args.skip_real else "")
    )

    table = Table(title="merge fidelity: fraction of the accumulated update kept by a 4-bit (NF4) base")
    table.add_column("increments")
    table.add_column("T", justify="right")
    designs = ["naive requantisation", *[f"accumulator R={R}" for R in args.acc_ranks]]
    for d in designs:
        table.add_column(d, justify="right")
    for T in args.steps:
        res = random_fidelity(args.size, args.size, args.rank, T, args.acc_ranks, args.rel_size)
        table.add_row(
            f"random directions, {args.size}x{args.size}, r={args.rank}, {args.rel_size:g}·‖W‖ each (worst case)",
            str(T),
            *[f"{res[d]:.3f}" for d in designs],
        )
    if not args.skip_real:
        w0, incs = real_increments(max(args.steps), args.rank, args.layer)
        for T in args.steps:
            res = fidelity(w0, incs[:T], args.acc_ranks)
            table.add_row(
                f"a real ScaLoRA run (quickstart model, {args.layer}, {w0.shape[0]}x{w0.shape[1]}, r={args.rank})",
                str(T),
                *[f"{res[d]:.3f}" for d in designs],
            )
    console.print(table)

    mem = Table(title="memory per layer (MiB): computed from shapes; measured on real tensors in ()")
    for col in (
        "layer (out x in)",
        "fp32 base",
        "bf16 base",
        "NF4 base (double quant)",
        *[f"accumulator R={R} (fp32)" for R in args.acc_ranks],
    ):
        mem.add_column(col, justify="right")
    mib = 1024**2
    for m, n in [(args.size, args.size), (4096, 3840), (15360, 3840)]:
        acc = [f"{(m + n) * R * 4 / mib:.2f}" for R in args.acc_ranks]
        measured = f" ({measured_nf4_bytes(m, n) / mib:.2f})" if m * n <= 4096 * 4096 else ""
        mem.add_row(
            f"{m} x {n}",
            f"{m * n * 4 / mib:.1f}",
            f"{m * n * 2 / mib:.1f}",
            f"{nf4_weight_bytes(m, n) / mib:.2f}{measured}",
            *acc,
        )
    console.print(mem)

    total = Table(title="Gemma-3-12B-shaped decoder linears (48 layers x 7 projections), GiB")
    for col in ("bf16 base", "NF4 base", *[f"+ accumulator R={R}" for R in args.acc_ranks]):
        total.add_column(col, justify="right")
    gib = 1024**3
    shapes = list(GEMMA3_12B["shapes"].values())
    L = GEMMA3_12B["layers"]
    bf16 = L * sum(m * n * 2 for m, n in shapes) / gib
    nf4 = L * sum(nf4_weight_bytes(m, n) for m, n in shapes) / gib
    accs = [f"{L * sum((m + n) * R * 4 for m, n in shapes) / gib:.2f}" for R in args.acc_ranks]
    total.add_row(f"{bf16:.2f}", f"{nf4:.2f}", *accs)
    console.print(total)


if __name__ == "__main__":
    main()
