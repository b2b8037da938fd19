"""The same LoRA fine-tune side by side in one run: scalora-dist as it comes (no placement
key: `model.base_placement: auto`; on 2 processes also with the base sharded,
`model.base_placement: sharded`; and the plain loss instead of the chunked one), PEFT with a plain torch loop, and PEFT with transformers'
Trainer. Tokens/s, peak memory and the final loss, on 1 and 2 processes.

    python tools/benchmarks/bench_peers.py                         # SmolLM2-135M-Instruct, stdlib chat task
    python tools/benchmarks/bench_peers.py --nprocs 1 --steps 20
    python tools/benchmarks/bench_peers.py --tiny --steps 2 --warmup 1   # the code paths on a tiny model (CI)

What is the same for every contender: the checkpoint (float32, sdpa attention), the adapter
(LoRA r on all linear layers, alpha 2r, no dropout), AdamW with the same lr, betas and eps,
cosine schedule with warm-up, clipping at 1.0, and the very same micro-batches: scalora-dist's
loader (packed rows with per-example position_ids, so attention stays inside each example)
cut for each rank, handed as they are to the PEFT model. On 2 processes scalora-dist runs FSDP2
(the base whole on each rank unless it does not fit), the peers replicate with DDP (what PEFT users run), all over gloo on CPU.

Each contender runs in its own fresh process group (torchrun for > 1 process), so peak
memory (VmHWM, the largest rank's) is its own. Rounds alternate the contenders (A B C, A B C,
...) with --repeats so the machine's noise hits them alike; tokens/s is over the timed steps
after --warmup, the median over rounds. Writes tools/benchmarks/results/bench_peers.md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # sibling tools

OURS = {
    "scalora-dist": [],
    # the frozen base split across ranks (what auto takes for a model that does not fit): several processes only
    "scalora-dist-sharded": ["model.base_placement=sharded"],
    # the whole logits at once (what the peers do): what the chunked loss costs or saves, measured
    "scalora-dist-plain-loss": ["model.chunked_loss=false"],
}
PEERS = ("peft-loop", "peft-trainer")
CONTENDERS = (*OURS, *PEERS)


def contenders(nproc: int, chosen: tuple[str, ...] = CONTENDERS) -> list[str]:
    return [c for c in chosen if nproc > 1 or c != "scalora-dist-sharded"]


def config_overrides(args: argparse.Namespace, model: Path, train_file: Path, out_dir: Path) -> list[str]:
    return [
        f"model.path={model}",
        "model.dtype=float32",
        "model.attn_implementation=sdpa",
        f"data.train_files=[{train_file}]",
        f"data.format={args.format}",
        f"data.max_length={args.max_length}",
        "data.packing=true",
        f"train.micro_batch_size={args.batch_size}",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.lr={args.lr}",
        "train.lr_scheduler=cosine",
        f"train.warmup_steps={args.warmup}",
        "train.max_grad_norm=1.0",
        "train.seed=0",
        "adapter.method=lora",
        f"adapter.rank={args.rank}",
        f"adapter.alpha={2 * args.rank}",
        "adapter.use_rslora=false",
        "adapter.dropout=0.0",
        "adapter.target_modules=all-linear",
        f"output.dir={out_dir}",
    ]


# ---------------------------------------------------------------------------------------
# Worker: one contender in this process (torchrun starts one per rank)


def worker(args: argparse.Namespace) -> None:
    import torch

    from scalora_dist.config import load_config
    from scalora_dist.distributed import destroy_distributed, init_distributed
    from scalora_dist.metrics import peak_rss_mib, quiet_libraries

    quiet_libraries()
    dist = init_distributed()
    torch.manual_seed(0)
    overrides = config_overrides(args, args.model, args.train_file, args.out / f"run-{args.worker}")
    cfg = load_config(None, overrides + OURS.get(args.worker, []))
    total = args.warmup + args.steps
    if args.worker in OURS:
        times, losses, tokens = _scalora_dist(cfg, dist, total)
    else:
        batches = _batches(cfg, dist, total)
        tokens = [int(b["attention_mask"].sum()) for b in batches]
        run = _peft_loop if args.worker == "peft-loop" else _peft_trainer
        times, losses = run(cfg, _peft_model(cfg, args.model), batches, dist)
    result = {"times": times, "losses": losses, "tokens": tokens, "peak_rss_mib": peak_rss_mib()}
    (args.out / f"{args.worker}-rank{dist.rank}.json").write_text(json.dumps(result))
    destroy_distributed(wait_for_peers=True)


def _scalora_dist(cfg, dist, total: int) -> tuple[list[float], list[float], list[int]]:
    from scalora_dist.train import setup, train_step

    run = setup(cfg, dist)
    times, losses, tokens = [], [], []
    for step in range(total):
        started = time.perf_counter()
        result = train_step(run, step)
        times.append(time.perf_counter() - started)
        losses.append(result.loss)
        tokens.append(result.tokens // dist.world_size)  # this rank's share, as the peers count
    return times, losses, tokens


def _batches(cfg, dist, total: int) -> list[dict]:
    """This rank's micro-batches of the first `total` steps, exactly as scalora-dist's loader cuts them."""
    from scalora_dist.data import load_split
    from scalora_dist.data.loader import BatchLoader, model_inputs
    from scalora_dist.model.loading import load_tokenizer

    tokenizer = load_tokenizer(Path(cfg.model.path))
    loader = BatchLoader(
        load_split(cfg.data, tokenizer, cfg.data.train_files),
        cfg.train.micro_batch_size,
        tokenizer.pad_token_id,
        seed=cfg.train.seed,
        shuffle=True,
        drop_last=True,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    out = []
    for _ in range(total):
        batch = loader.next_batch()
        out.append({**model_inputs(batch), "attention_mask": batch["attention_mask"]})
    return out


def _peft_model(cfg, model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return get_peft_model(
        model,
        LoraConfig(
            r=cfg.adapter.rank,
            lora_alpha=cfg.adapter.alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_rslora=False,
            task_type="CAUSAL_LM",
        ),
    )


def _optimizer_and_schedule(cfg, model):
    """AdamW and the cosine schedule with warm-up, as scalora-dist's config says."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        betas=tuple(cfg.train.adam_betas),
        eps=cfg.train.adam_eps,
        weight_decay=0.0,
    )
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps
    )
    return optimizer, scheduler


def _peer_inputs(batch: dict) -> dict:
    # packed rows: position_ids and no attention mask (as scalora-dist calls the model)
    return {k: v for k, v in batch.items() if k != "attention_mask" or "position_ids" not in batch}


def _peft_loop(cfg, model, batches, dist) -> tuple[list[float], list[float]]:
    import torch

    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer, scheduler = _optimizer_and_schedule(cfg, model)
    times, losses = [], []
    model.train()
    for batch in batches:
        started = time.perf_counter()
        loss = model(**_peer_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    return times, losses


def _peft_trainer(cfg, model, batches, dist) -> tuple[list[float], list[float]]:
    """transformers' Trainer over the same micro-batches (it wraps the model in DDP itself).
    Its data loader is replaced by one over this rank's ready micro-batches (the documented
    get_train_dataloader override), so Trainer does not re-shard or re-collate them;
    everything else is Trainer's own."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    optimizer, scheduler = _optimizer_and_schedule(cfg, model)
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)

    class ReadyBatches(Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader([_peer_inputs(b) for b in batches], batch_size=None)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = ReadyBatches(
            model=model,
            args=TrainingArguments(
                output_dir=tmp,
                max_steps=len(batches),
                per_device_train_batch_size=cfg.train.micro_batch_size,
                max_grad_norm=cfg.train.max_grad_norm,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                dataloader_num_workers=0,
                remove_unused_columns=False,
                disable_tqdm=True,
                ddp_backend="gloo" if dist.distributed else None,
                seed=cfg.train.seed,
            ),
            optimizers=(optimizer, scheduler),
            callbacks=[StepClock()],
        )
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return times, losses


# ---------------------------------------------------------------------------------------
# Driver


def launch(args: argparse.Namespace, contender: str, nproc: int, out: Path) -> dict:
    """Run one contender on `nproc` processes in fresh processes; returns its figures."""
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        contender,
        "--model",
        str(args.model),
        "--train-file",
        str(args.train_file),
        "--out",
        str(out),
        *_shared_argv(args),
    ]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{contender} on {nproc} process(es) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = [json.loads((out / f"{contender}-rank{r}.json").read_text()) for r in range(nproc)]
    timed = slice(args.warmup, None)
    seconds = sum(ranks[0]["times"][timed])
    tokens = sum(sum(r["tokens"][timed]) for r in ranks)
    losses = ranks[0]["losses"]
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": statistics.median(ranks[0]["times"][timed]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
        "final_loss": statistics.mean(losses[-3:]),
        "first_loss": losses[0],
    }


def _shared_argv(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("steps", "warmup", "batch_size", "max_length", "rank", "lr", "format")
    ]


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The model and the training file: SmolLM2 on the stdlib chat task, or a tiny model."""
    if args.tiny:
        from scalora_dist.model.tiny import make_tiny_model

        args.model = args.model or make_tiny_model(work / "tiny-llama")
        args.train_file = args.train_file or Path(__file__).resolve().parents[2] / "configs/data/quickstart_train.jsonl"
        args.format = "text"
        return
    if args.model is None:
        import real_models

        if not real_models.available():
            raise SystemExit(f"SmolLM2: {real_models.SMOLLM2.install} (or pass --model DIR)")
        args.model = real_models.checkpoint()
    if args.train_file is None:
        from stdlib_task import write

        args.train_file, _ = write(work / "data", max_chars=400, eval_fraction=0.15)


def report(args: argparse.Namespace, results: dict[int, dict[str, dict]], wall: float) -> str:
    lines = [
        f"# The same LoRA fine-tune, ours and the peers' (`python tools/benchmarks/bench_peers.py{' ' + ' '.join(args.argv) if args.argv else ''}`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, model `{args.model}`, LoRA r {args.rank} all-linear, "
        f"micro-batch {args.batch_size} x {args.max_length} packed tokens per process, {args.steps} timed steps after "
        f"{args.warmup}, median of {args.repeats} alternating round(s); {wall / 60:.1f} min in all.",
        "",
        "| processes | contender | tokens/s | vs best peer | median step (s) | peak RSS per process (MiB) | loss: first -> last 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for nproc, by_name in results.items():
        best_peer = max(by_name[c]["tokens_per_s"] for c in PEERS)
        for name in by_name:
            r = by_name[name]
            lines.append(
                f"| {nproc} | {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / best_peer:.2f}x | "
                f"{r['step_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['first_loss']:.4f} -> {r['final_loss']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", default="1,2", help="process counts to run, e.g. 1,2")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (also the LR warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds; the median is reported")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per process")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--format", default="chat")
    p.add_argument("--model", type=Path, help="a checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--train-file", type=Path, help="a jsonl of --format (default: the stdlib chat task)")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama and the quickstart text: the code paths only")
    p.add_argument("--out", type=Path, help="results folder (default: tools/benchmarks/results)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, from {', '.join(CONTENDERS)}; both peers are always run",
    )
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        p.error(f"--contenders: unknown {', '.join(unknown)} (choose from {', '.join(CONTENDERS)})")
    chosen = tuple(c for c in CONTENDERS if c in chosen or c in PEERS)  # the peers: the ratios' denominator
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)

    started = time.monotonic()
    out = args.out or TOOLS / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(args, work)
        results: dict[int, dict[str, dict]] = {}
        for nproc in [int(n) for n in args.nprocs.split(",")]:
            rounds: dict[str, list[dict]] = {c: [] for c in contenders(nproc, chosen)}
            for _ in range(args.repeats):
                for contender in contenders(nproc, chosen):
                    print(f"{nproc} process(es): {contender} ...", flush=True)
                    rounds[contender].append(launch(args, contender, nproc, work))
            results[nproc] = {c: _median_round(rs) for c, rs in rounds.items()}
    text = report(args, results, time.monotonic() - started)
    (out / "bench_peers.md").write_text(text)
    (out / "bench_peers.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(text)


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median tokens/s (its other figures with it)."""
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    main()
