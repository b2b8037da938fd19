"""Peak memory of the loss head, transformers' plain ForCausalLMLoss against our chunked loss
(scalora_dist/model/chunked_loss.py), forward + backward of one micro-batch, measured side by
side on the CPU:

    python tools/benchmarks/bench_loss.py                          # Gemma-3-270M's head: hidden 640, vocab 262,144
    python tools/benchmarks/bench_loss.py --hidden 576 --vocab 49152 --tokens 2048   # SmolLM2's

Each mode runs in a fresh process; its peak is the growth of the process's peak resident
memory (ru_maxrss) over what it held once the inputs existed. The head is frozen and tied, as
under LoRA; the gradient flows to the hidden states. The loss head depends only on these
shapes (and the dtype), not on the trained weights.

With --model, the same comparison is a whole training step of a real checkpoint through
scalora-dist's own path (scalora_dist.train: the model as the CLI builds it, LoRA on all
linear layers, one packed row of --tokens tokens of the quickstart text):

    python tools/generators/real_models.py gemma3-270m            # once: the real Gemma-3-270M (262k vocabulary)
    python tools/benchmarks/bench_loss.py --model ~/.cache/scalora-dist/gemma-3-270m --tokens 1024 2048

There the peak is the growth of the resident set (VmHWM, reset through /proc/self/clear_refs
just before the step) over what the process held before it, in the first training step and
in the second; weights, adapters and optimizer states are in the baseline, the rest (the
decoder's saved activations, the loss head, the gradients) is the step's. The difference
between plain and chunked over the tokens is the loss head's saving per token, the figure
tools/generators/memory_plan.py uses.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # sibling tools

MIB = 2**20


def measure(mode: str, hidden: int, vocab: int, tokens: int, dtype: str, chunk_tokens: int) -> dict:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from scalora_dist.model.chunked_loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(1, tokens, hidden, dtype=dt, requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=dt) / hidden**0.5
    labels = torch.randint(0, vocab, (1, tokens))
    n = torch.tensor(tokens - 1)
    torch.nn.functional.linear(h[:, :4].detach(), weight)  # warm the kernels before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if mode == "plain":
        loss = ForCausalLMLoss(torch.nn.functional.linear(h, weight), labels, vocab, num_items_in_batch=n)
    else:
        loss = chunked_causal_lm_loss(h, weight, labels, n, chunk_tokens=chunk_tokens)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "peak_bytes": peak - base, "seconds": seconds, "loss": loss.item()}


def resident_bytes() -> int:
    """The current resident set (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Hand freed heap back to the system (glibc's malloc_trim), so that the resident set is
    what is live, then VmHWM := the current resident set (Linux >= 4.0)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_model(mode: str, model_dir: str, tokens: int, dtype: str, chunk_tokens: int) -> dict:
    """Peak growth over each of two training steps of a real checkpoint (see the module doc)."""
    import tempfile

    from scalora_dist.config import load_config
    from scalora_dist.metrics import peak_rss_mib
    from scalora_dist.train import setup, train_step

    data = Path(__file__).resolve().parents[2] / "configs/data/quickstart_train.jsonl"
    out = tempfile.mkdtemp(prefix="bench-loss-")
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"model.dtype={dtype}",
            "model.attn_implementation=sdpa",
            f"model.chunked_loss={mode == 'chunked'}",
            f"model.loss_chunk_tokens={chunk_tokens}",
            f"data.train_files=[{data}]",
            "data.format=text",
            "data.packing=true",
            f"data.max_length={tokens}",
            "train.micro_batch_size=1",
            "train.max_steps=2",
            "train.lr=1e-4",
            "adapter.method=lora",
            "adapter.rank=16",
            "adapter.alpha=32",
            "adapter.target_modules=all-linear",
            f"output.dir={out}",
        ],
    )
    run = setup(cfg)
    steps = []
    for step in range(2):
        reset_peak_rss()
        before = resident_bytes()
        started = time.perf_counter()
        result = train_step(run, step)
        steps.append(
            {
                "peak_bytes": peak_rss_mib() * MIB - before,
                "seconds": time.perf_counter() - started,
                "loss": result.loss,
                "tokens": result.tokens,
            }
        )
    vocab, hidden = run.model.get_output_embeddings().weight.shape
    return {"mode": mode, "steps": steps, "vocab": vocab, "hidden": hidden, "model_class": type(run.model).__name__}


def planned_saving(vocab: int, hidden: int, tokens: int) -> float:
    """What tools/generators/memory_plan.py counts for the chunked loss's saving (bf16 logits)."""
    from types import SimpleNamespace

    from memory_plan import loss_head_peak

    shape = SimpleNamespace(vocab=vocab, hidden=hidden)
    return loss_head_peak(shape, tokens, chunked=False) - loss_head_peak(shape, tokens, chunked=True)


def run_mode(args, mode: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_one",
        mode,
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--tokens",
        str(args.tokens[0]),
        "--dtype",
        args.dtype,
        "--chunk-tokens",
        str(args.chunk_tokens),
    ]
    if args.model:
        cmd += ["--model", str(args.model)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # the measuring process's own error, not a CalledProcessError about it
        raise SystemExit(f"bench_loss: the {mode} measurement failed:\n{done.stderr.strip()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048], help="with --model, several lengths")
    ap.add_argument("--model", type=Path, help="a real checkpoint: measure whole training steps (see above)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("tools/benchmarks/results/bench_loss_model.md"),
        help="with --model: where the table goes (and its .json)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--chunk-tokens", type=int, default=0, help="0: the default (128 MiB of float32 logits)")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        if args.model:
            result = measure_model(args._one, str(args.model), args.tokens[0], args.dtype, args.chunk_tokens)
        else:
            result = measure(args._one, args.hidden, args.vocab, args.tokens[0], args.dtype, args.chunk_tokens)
        print(json.dumps(result))
        return
    if args.model:
        model_report(args)
        return
    args.tokens = args.tokens[:1]
    plain, chunked = run_mode(args, "plain"), run_mode(args, "chunked")
    print(f"loss head, hidden {args.hidden}, vocab {args.vocab:,}, {args.tokens[0]} tokens, {args.dtype}:")
    print("| loss | peak MiB | bytes per token x vocab entry | seconds | loss value |")
    print("|---|---|---|---|---|")
    for r in (plain, chunked):
        per = r["peak_bytes"] / (args.tokens[0] * args.vocab)
        print(f"| {r['mode']} | {r['peak_bytes'] / MIB:.0f} | {per:.2f} | {r['seconds']:.1f} | {r['loss']:.6f} |")
    print(f"chunked / plain peak: {chunked['peak_bytes'] / max(plain['peak_bytes'], 1):.3f}")


def model_report(args) -> None:
    """Plain and chunked at each length, alternating, each in its own process."""
    rows, started = [], time.perf_counter()
    for tokens in args.tokens:
        one = argparse.Namespace(**{**vars(args), "tokens": [tokens]})
        plain, chunked = run_mode(one, "plain"), run_mode(one, "chunked")
        rows.append({"tokens": tokens, "plain": plain, "chunked": chunked})
    write_model_report(args, rows, time.perf_counter() - started)


def write_model_report(args, rows: list[dict], wall: float) -> None:
    vocab, cls = rows[0]["plain"]["vocab"], rows[0]["plain"]["model_class"]
    lines = [
        f"# Loss head on a real checkpoint: {args.model.name} ({cls}, vocabulary {vocab:,}), {args.dtype}",
        "",
        f"`python tools/benchmarks/bench_loss.py --model {args.model} --tokens {' '.join(map(str, args.tokens))} "
        f"--dtype {args.dtype}` ({wall / 60:.1f} min). One training step of LoRA r 16 on all "
        "linear layers, micro-batch 1 x tokens; peak = growth of the resident set over the step, first step / second "
        "step (the first step's baseline can hold pages the step gives back, such as the mapped checkpoint file, so "
        "the second is the figure); saved = the second steps' difference; the plan = what tools/generators/memory_plan.py "
        "counts for it (bf16 logits).",
        "",
        "| tokens | plain peak MiB | chunked peak MiB | saved MiB | saved bytes per token x vocab entry | "
        "the plan's | plain s/step | chunked s/step | plain loss | chunked loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, c = r["plain"]["steps"], r["chunked"]["steps"]
        saved, entries = p[1]["peak_bytes"] - c[1]["peak_bytes"], r["tokens"] * vocab
        planned = (
            f"{planned_saving(vocab, r['plain']['hidden'], r['tokens']) / entries:.2f}"
            if args.dtype == "bfloat16"
            else "-"
        )
        lines.append(
            f"| {r['tokens']} | {p[0]['peak_bytes'] / MIB:.0f} / {p[1]['peak_bytes'] / MIB:.0f} | "
            f"{c[0]['peak_bytes'] / MIB:.0f} / {c[1]['peak_bytes'] / MIB:.0f} | {saved / MIB:.0f} | "
            f"{saved / entries:.2f} | {planned} | {p[1]['seconds']:.1f} | {c[1]['seconds']:.1f} | "
            f"{p[0]['loss']:.6f} | {c[0]['loss']:.6f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
