"""Peak memory of the loss head, transformers' plain ForCausalLMLoss against our chunked loss
(scalora_dist/model/chunked_loss.py), forward + backward of one micro-batch, measured side by
side on the CPU:

    python tools/bench_loss.py                          # Gemma-3-270M's head: hidden 640, vocab 262,144
    python tools/bench_loss.py --hidden 576 --vocab 49152 --tokens 2048   # SmolLM2's

Each mode runs in a fresh process; its peak is the growth of the process's peak resident
memory (ru_maxrss) over what it held once the inputs existed. The head is frozen and tied, as
under LoRA; the gradient flows to the hidden states. The loss head depends only on these
shapes (and the dtype), not on the trained weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MIB = 2**20


def measure(mode: str, hidden: int, vocab: int, tokens: int, dtype: str, chunk_tokens: int) -> dict:
    import torch

    from scalora_dist.model.chunked_loss import chunked_causal_lm_loss
    from transformers.loss.loss_utils import ForCausalLMLoss

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


def run_mode(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--_one", mode, "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--tokens", str(args.tokens), "--dtype", args.dtype, "--chunk-tokens", str(args.chunk_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--chunk-tokens", type=int, default=0, help="0: the default (128 MiB of float32 logits)")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        print(json.dumps(measure(args._one, args.hidden, args.vocab, args.tokens, args.dtype, args.chunk_tokens)))
        return
    plain, chunked = run_mode(args, "plain"), run_mode(args, "chunked")
    print(f"loss head, hidden {args.hidden}, vocab {args.vocab:,}, {args.tokens} tokens, {args.dtype}:")
    print("| loss | peak MiB | bytes per token x vocab entry | seconds | loss value |")
    print("|---|---|---|---|---|")
    for r in (plain, chunked):
        per = r["peak_bytes"] / (args.tokens * args.vocab)
        print(f"| {r['mode']} | {r['peak_bytes'] / MIB:.0f} | {per:.2f} | {r['seconds']:.1f} | {r['loss']:.6f} |")
    print(f"chunked / plain peak: {chunked['peak_bytes'] / max(plain['peak_bytes'], 1):.3f}")


if __name__ == "__main__":
    main()
