"""The evidence study: LoRA vs rsLoRA vs ScaLoRA (I = 1, 10) vs full fine-tuning, from one
pre-trained base, on a task whose ideal update is high-rank. One command, CPU-sized:

    python tools/studies/study.py                 # the committed study: 50 runs of 200 steps, ~1.4 min
                                          # each on one busy CPU core (71 min summed)
    python tools/studies/study.py --ft-steps 400 --seeds 5 --hidden-size 256   # scale up
    python tools/studies/study.py --report-only   # tables and plots from the cached runs only

Several processes may share one work dir (e.g. one per core, each with a different
--methods order): a run is trained by whichever process takes its lock, the others wait for
it. Then one --report-only (same flags, canonical --methods) writes the report.

Steps (every training run goes through scalora_dist.train.train, in this process):
1. synthetic data (tools/studies/study_data.py): noisy walks along random permutations of 64 symbols;
   pre-training relations f, g; fine-tuning relation h (a new permutation: a new rule).
2. base: a make_tiny_model Llama pre-trained with our loop (adapter.method=full,
   all-linear: every decoder Linear trains; embeddings and output head stay at their
   random init) on the f/g corpus; its merged/ dir is the base checkpoint.
3. fine-tuning from that base on h: lora (alpha/r), rslora (alpha/sqrt r), scalora (I=1),
   scalora_i10 (I=10) at each rank, plus full; same data order and steps; an lr sweep per
   method (seed 0), then --seeds seeds at each method's best lr, then ScaLoRA's kappa
   sensitivity (kappa_multiplier x1/4 and x4 next to x1) at its best lr.
4. report: tools/studies/results/study.md (+ study_results.json) and PNGs: held-out loss curves, the
   lr sweep, per-layer numerical rank of W_final - W_base, kappa sensitivity.

Runs are cached: a run directory is named after its settings (with a hash of every
override), and a run whose `study_done.json` exists is not trained again; delete the work
dir (default runs/study/, git-ignored) to start over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_data import entropy_floor, write_study_data  # noqa: E402

METHODS = {
    "lora": ["adapter.method=lora", "adapter.use_rslora=false"],
    "rslora": ["adapter.method=lora", "adapter.use_rslora=true"],
    "scalora": ["adapter.method=scalora", "adapter.scalora.interval=1"],
    "scalora_i10": ["adapter.method=scalora", "adapter.scalora.interval=10"],
    "full": ["adapter.method=full"],
}
LABELS = {
    "lora": "LoRA",
    "rslora": "rsLoRA",
    "scalora": "ScaLoRA (I=1)",
    "scalora_i10": "ScaLoRA-I (I=10)",
    "full": "full FT",
}
RANK_THRESHOLD = 1e-3  # numerical rank: singular values > RANK_THRESHOLD * the largest one


@dataclass(frozen=True)
class Spec:
    """One fine-tuning run."""

    method: str
    rank: int | None  # None for full
    lr: float
    seed: int
    kappa_mult: float = 1.0

    @property
    def group(self) -> str:
        return self.method if self.rank is None else f"{self.method}_r{self.rank}"

    @property
    def name(self) -> str:
        k = "" if self.kappa_mult == 1.0 else f"-k{self.kappa_mult:g}"
        return f"{self.group}-lr{self.lr:g}-s{self.seed}{k}"


# ---------------------------------------------------------------------------------------
# Runs


def _hash(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:8]


def common_overrides(args, model_path: Path, train_file: Path, eval_file: Path) -> list[str]:
    return [
        f"model.path={model_path}",
        f"data.train_files=[{train_file}]",
        f"data.eval_files=[{eval_file}]",
        f"data.max_length={args.max_length}",
        f"train.micro_batch_size={args.batch_size}",
        "train.lr_scheduler=cosine",
        "train.log_every=1",
        "train.keep_last=1",
        "output.save_adapter=false",
    ]


def run_cached(args, name: str, overrides: list[str], log) -> Path:
    """Train (in-process) unless a finished run with exactly these overrides exists."""
    run_dir = Path(args.work_dir) / "runs" / f"{name}-{_hash(overrides)}"
    done = run_dir / "study_done.json"
    if done.is_file():
        return run_dir
    if getattr(args, "report_only", False):
        raise SystemExit(f"--report-only: run {run_dir} is missing")
    lock = run_dir.with_name(run_dir.name + ".lock")
    while not _take_lock(lock):  # another study process trains it: wait for it
        time.sleep(5)
        if done.is_file():
            return run_dir
    try:
        return _train_run(args, name, overrides, run_dir, done, log)
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(lock: Path) -> bool:
    """Several `tools/studies/study.py` processes may share a work dir (e.g. one per core): a run
    is trained by whichever takes its lock; a lock whose process is gone is taken over."""
    import os

    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            return False
        except (ValueError, ProcessLookupError, FileNotFoundError):
            lock.unlink(missing_ok=True)  # stale: its process died
            return False  # retried on the next poll
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _train_run(args, name: str, overrides: list[str], run_dir: Path, done: Path, log) -> Path:
    from scalora_dist.config import load_config
    from scalora_dist.train import train

    if done.is_file():
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    cfg = load_config(None, [*overrides, f"output.dir={run_dir}"])
    started = time.perf_counter()
    result = train(cfg, show_progress=False)
    wall = time.perf_counter() - started
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only merged/ is needed
    done.write_text(json.dumps({"wall_s": wall, "eval_loss": result.eval_loss, "overrides": overrides}, indent=1))
    log(f"  {name}: eval {result.eval_loss:.4f} ({wall:.0f}s)")
    return run_dir


def prepare_base(args, log) -> tuple[dict[str, Path], Path]:
    """Data, the randomly initialised model, and the pre-trained base (cached)."""
    from scalora_dist.model.tiny import make_tiny_model

    work = Path(args.work_dir)
    data_kw = dict(
        n_symbols=args.n_symbols,
        length=args.line_length,
        follow=args.follow,
        pretrain_lines=args.pretrain_lines,
        finetune_lines=args.finetune_lines,
        eval_lines=args.eval_lines,
        seed=args.data_seed,
    )
    data_dir = work / f"data-{_hash([json.dumps(data_kw, sort_keys=True)])}"
    if not (data_dir / "done").is_file():
        write_study_data(data_dir, **data_kw)
        (data_dir / "done").write_text(json.dumps(data_kw))
    files = {k: data_dir / f"{k}.jsonl" for k in ("pretrain_train", "pretrain_eval", "finetune_train", "finetune_eval")}
    model_kw = dict(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=max(128, args.max_length),
        vocab_size=512,
    )
    init_dir = work / f"init-{_hash([data_dir.name, json.dumps(model_kw, sort_keys=True), str(args.embed_init_scale)])}"
    if not (init_dir / "config.json").is_file():
        make_tiny_model(init_dir, corpus_files=[str(files["pretrain_train"]), str(files["finetune_train"])], **model_kw)
        rescale_frozen_init(init_dir, args.embed_init_scale)
    overrides = common_overrides(args, init_dir, files["pretrain_train"], files["pretrain_eval"]) + [
        "adapter.method=full",
        "adapter.target_modules=all-linear",
        f"train.max_steps={args.pretrain_steps}",
        f"train.lr={args.pretrain_lr}",
        f"train.warmup_steps={max(1, args.pretrain_steps // 20)}",
        f"train.eval_every={max(1, args.pretrain_steps // 10)}",
        "train.seed=0",
    ]
    log(f"pre-training the base ({args.pretrain_steps} steps)")
    base_run = run_cached(args, "pretrain", overrides, log)
    return files, base_run / "merged"


def rescale_frozen_init(model_dir: Path, factor: float) -> None:
    """Multiply the input embeddings and the output head of a fresh init by `factor`.

    Training with adapter.method=full only trains the decoder's Linear layers; the
    embeddings, the norms and the output head stay at their random init. At transformers'
    default init (std 0.02) the frozen head, fed an RMS-normalised hidden state, caps every
    logit at about 0.02 * hidden_size (2.6 for hidden 128): no training of the other layers
    can then push a prediction far above uniform. Scaling the frozen matrices (std 0.02 ->
    0.02 * factor) gives the head room for confident predictions."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    for name in tensors:
        if "embed_tokens" in name or "lm_head" in name:
            tensors[name] = (tensors[name] * factor).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def finetune_overrides(args, spec: Spec, base: Path, files: dict[str, Path]) -> list[str]:
    o = (
        common_overrides(args, base, files["finetune_train"], files["finetune_eval"])
        + METHODS[spec.method]
        + [
            "adapter.target_modules=all-linear",
            f"adapter.alpha={args.alpha:g}",
            f"train.max_steps={args.ft_steps}",
            f"train.lr={spec.lr:g}",
            f"train.warmup_steps={args.lr_warmup}",
            f"train.eval_every={args.eval_every}",
            f"train.seed={spec.seed}",
        ]
    )
    if spec.rank is not None:
        o.append(f"adapter.rank={spec.rank}")
    if spec.method.startswith("scalora"):
        o += [
            f"adapter.scalora.warmup_steps={args.scalora_warmup}",
            f"adapter.scalora.kappa_multiplier={spec.kappa_mult:g}",
        ]
    return o


def base_eval_loss(args, base: Path, files: dict[str, Path]) -> float:
    """Held-out fine-tuning loss of the base itself (step 0 of every curve), cached."""
    cache = base.parent / f"base_eval-{_hash([str(files['finetune_eval']), str(args.max_length)])}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["eval_loss"]
    from scalora_dist.config import load_config
    from scalora_dist.train import evaluate, setup

    cfg = load_config(
        None,
        common_overrides(args, base, files["finetune_train"], files["finetune_eval"])
        + ["adapter.method=lora", "train.max_steps=1", "output.dir=" + str(base.parent)],
    )
    run = setup(cfg)  # lora_B = 0: the model is the base
    loss = evaluate(run.model, run.eval_loader, run.device)
    cache.write_text(json.dumps({"eval_loss": loss}))
    return loss


# ---------------------------------------------------------------------------------------
# Reading a run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def load_weights(merged: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(merged.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def update_ranks(base_weights: dict, merged: Path) -> dict[str, dict]:
    """Per targeted Linear: numerical rank of W_final - W_base (singular values above
    RANK_THRESHOLD * the largest) and its Frobenius norm."""
    import torch

    out = {}
    final = load_weights(merged)
    for name, w0 in base_weights.items():
        if w0.ndim != 2 or ".layers." not in f".{name}" or "embed" in name or "lm_head" in name:
            continue
        delta = final[name].double() - w0.double()
        s = torch.linalg.svdvals(delta)
        smax = s.max().item()
        rank = int((s > RANK_THRESHOLD * smax).sum()) if smax > 0 else 0
        out[name] = {"rank": rank, "fro": delta.norm().item(), "full_rank": min(delta.shape)}
    return out


def summarize_run(run_dir: Path, base_weights: dict | None) -> dict:
    """Curve, final loss, refactor counts (and ranks when base_weights is given), cached in
    study_done.json."""
    done_path = run_dir / "study_done.json"
    done = json.loads(done_path.read_text())
    if "summary" in done and (base_weights is None or "ranks" in done["summary"]):
        return done["summary"]
    evals = read_jsonl(run_dir / "eval.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    refactor = {k: sum(m.get(f"scalora_{k}", 0) or 0 for m in metrics) for k in ("column", "scalar", "skipped")}
    alphas = [m["scalora_mean_alpha"] for m in metrics if m.get("scalora_mean_alpha") is not None]
    betas = [m["scalora_mean_beta"] for m in metrics if m.get("scalora_mean_beta") is not None]
    kappas = [m["scalora_kappa"] for m in metrics if m.get("scalora_kappa") is not None]
    summary = {
        "curve": [[e["step"], e["eval_loss"]] for e in evals],
        "final_eval": evals[-1]["eval_loss"] if evals else float("nan"),
        "final_train": metrics[-1]["loss"] if metrics else float("nan"),
        "refactor": refactor,
        "mean_alpha": statistics.fmean(alphas) if alphas else None,
        "mean_beta": statistics.fmean(betas) if betas else None,
        "kappa": kappas[-1] if kappas else None,
        "step_time_s": statistics.median(m["step_time_s"] for m in metrics) if metrics else None,
        "wall_s": done.get("wall_s"),
    }
    if base_weights is not None:
        summary["ranks"] = update_ranks(base_weights, run_dir / "merged")
    done["summary"] = summary
    done_path.write_text(json.dumps(done, indent=1))
    return summary


# ---------------------------------------------------------------------------------------
# The study


def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def groups_of(args) -> list[tuple[str, int | None]]:
    out = []
    for m in args.methods:
        if m == "full":
            out.append((m, None))
        else:
            out += [(m, r) for r in args.ranks]
    return out


def lrs_for(args, method: str) -> list[float]:
    return args.lrs_full if method == "full" else args.lrs_lora


def run_study(args, log=print) -> dict:
    import torch

    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    logging.getLogger("scalora_dist").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    files, base = prepare_base(args, log)
    base_loss = base_eval_loss(args, base, files)
    base_weights = load_weights(base)
    pre_evals = read_jsonl(base.parent / "eval.jsonl")
    log(
        f"base: pre-training held-out loss {pre_evals[-1]['eval_loss']:.4f}; "
        f"fine-tuning held-out loss before fine-tuning {base_loss:.4f}"
    )

    def do(spec: Spec, ranks: bool = False) -> dict:
        run_dir = run_cached(args, spec.name, finetune_overrides(args, spec, base, files), log)
        return summarize_run(run_dir, base_weights if ranks else None)

    groups = groups_of(args)
    sweep: dict[str, dict[float, dict]] = {}
    log(f"lr sweep: {len(groups)} methods x lrs, seed 0")
    for method, rank in groups:
        g = Spec(method, rank, 0, 0).group
        sweep[g] = {lr: do(Spec(method, rank, lr, 0)) for lr in lrs_for(args, method)}
    best = {g: min(runs, key=lambda lr: _nan_last(runs[lr]["final_eval"])) for g, runs in sweep.items()}

    log(f"seeds 0..{args.seeds - 1} at each method's best lr")
    seeds: dict[str, list[dict]] = {}
    for method, rank in groups:
        g = Spec(method, rank, 0, 0).group
        seeds[g] = [do(Spec(method, rank, best[g], s), ranks=(s == 0)) for s in range(args.seeds)]

    kappa: dict[str, dict[float, dict]] = {}
    if args.kappa_mults:
        log("kappa sensitivity (ScaLoRA I=1, best lr, seed 0)")
        for method, rank in groups:
            if method != "scalora" or (args.kappa_ranks and rank not in args.kappa_ranks):
                continue
            g = Spec(method, rank, 0, 0).group
            kappa[g] = {1.0: seeds[g][0]}
            for k in args.kappa_mults:
                if k != 1.0:
                    kappa[g][k] = do(Spec(method, rank, best[g], 0, k))
    results = {
        "base": {
            "pretrain_eval": pre_evals[-1]["eval_loss"] if pre_evals else None,
            "pretrain_curve": [[e["step"], e["eval_loss"]] for e in pre_evals],
            "finetune_eval_before": base_loss,
            "entropy_floor_walk_token": entropy_floor(args.n_symbols, args.follow),
        },
        "sweep": {g: {f"{lr:g}": _slim(s) for lr, s in runs.items()} for g, runs in sweep.items()},
        "best_lr": {g: lr for g, lr in best.items()},
        "seeds": {g: [_slim(s) for s in runs] for g, runs in seeds.items()},
        "ranks": {g: runs[0].get("ranks") for g, runs in seeds.items()},
        "refactor": {g: _refactor_fractions(runs) for g, runs in seeds.items() if g.startswith("scalora")},
        "kappa": {g: {f"{k:g}": _slim(s) for k, s in ks.items()} for g, ks in kappa.items()},
        "wall_s_this_invocation": time.perf_counter() - started,
        "wall_s_all_runs": _total_wall(
            base,
            [
                *(s for runs in sweep.values() for s in runs.values()),
                *(s for runs in seeds.values() for s in runs[1:]),
                *(s for ks in kappa.values() for k, s in ks.items() if k != 1.0),
            ],
        ),
    }
    return results


def _total_wall(base: Path, summaries: list[dict]) -> float:
    """Sum of the training wall times of the distinct runs used (and of the base)."""
    pre = json.loads((base.parent / "study_done.json").read_text()).get("wall_s") or 0.0
    return pre + sum(s.get("wall_s") or 0.0 for s in summaries)


def _nan_last(x: float) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def _slim(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "ranks"}


def _refactor_fractions(runs: list[dict]) -> dict:
    tot = {k: sum(r["refactor"][k] for r in runs) for k in ("column", "scalar", "skipped")}
    n = sum(tot.values())
    fr = {k: (v / n if n else None) for k, v in tot.items()}
    fr["layer_refactors"] = n
    alphas = [r["mean_alpha"] for r in runs if r["mean_alpha"] is not None]
    betas = [r["mean_beta"] for r in runs if r["mean_beta"] is not None]
    fr["mean_alpha"] = statistics.fmean(alphas) if alphas else None
    fr["mean_beta"] = statistics.fmean(betas) if betas else None
    fr["kappa"] = runs[0]["kappa"]
    return fr


# ---------------------------------------------------------------------------------------
# Report


def mean_curve(runs: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = [s for s, _ in runs[0]["curve"]]
    vals = [[dict(r["curve"]).get(s, math.nan) for r in runs] for s in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def steps_to_reach(runs: list[dict], target: float) -> int | None:
    steps, mean, _, _ = mean_curve(runs)
    for s, v in zip(steps, mean):
        if v <= target:
            return s
    return None


def _fmt(x, digits=4) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _group_label(g: str) -> tuple[str, str]:
    method, _, r = g.rpartition("_r")
    if not method:
        return LABELS[g], "—"
    return LABELS[method], r


def write_report(args, results: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out_dir)
    seeds = results["seeds"]
    lora_final = {
        g: statistics.fmean(r["final_eval"] for r in runs) for g, runs in seeds.items() if g.startswith("lora_r")
    }
    lines = []
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    lines += [
        "# Study: LoRA vs rsLoRA vs ScaLoRA vs full fine-tuning (tools/studies/study.py)",
        "",
        f"- Date: {now}. Machine: {platform.machine()} {platform.system()}, "
        f"{args.threads} torch thread(s), torch {torch.__version__}, Python {platform.python_version()}, CPU only.",
        f"- Command: `{command}`",
        f"- Training wall time, summed over the {_n_runs(results)} runs used (base included): "
        f"{results['wall_s_all_runs'] / 60:.1f} min; this invocation: "
        f"{results['wall_s_this_invocation'] / 60:.1f} min (cached runs are not retrained).",
        f"- Base: Llama, hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads "
        f"({args.num_kv_heads} kv), MLP {args.intermediate_size}; pre-trained {args.pretrain_steps} steps "
        f"(lr {args.pretrain_lr:g}, batch {args.batch_size}) with `adapter.method=full` on all decoder "
        "Linear layers (embeddings and output head frozen at random init); pre-training held-out loss "
        f"{_fmt(results['base']['pretrain_eval'])}.",
        f"- Task: noisy walks along a new random permutation of {args.n_symbols} symbols (relation `h`, "
        f"follow prob {args.follow}); {args.finetune_lines} train / {args.eval_lines} held-out lines. "
        f"Held-out loss of the base before fine-tuning: {_fmt(results['base']['finetune_eval_before'])}; "
        f"floor for a walk token: {_fmt(results['base']['entropy_floor_walk_token'])} nats "
        "(the reported loss is the mean over all tokens, including the unpredictable start symbol).",
        f"- Fine-tuning: {args.ft_steps} steps, batch {args.batch_size} x <= {args.max_length} tokens, AdamW, "
        f"cosine with {args.lr_warmup} warm-up steps, clip 1.0, alpha = {args.alpha:g} for every adapter "
        "(LoRA s = alpha/r, rsLoRA s = alpha/sqrt(r), ScaLoRA uses LoRA's alpha/r), all-linear targets, "
        f"ScaLoRA warm-up {args.scalora_warmup} steps, kappa auto. Held-out loss every {args.eval_every} steps.",
        f"- lr sweep at seed 0 (adapters: {', '.join(f'{x:g}' for x in args.lrs_lora)}; full: "
        f"{', '.join(f'{x:g}' for x in args.lrs_full)}); best lr = lowest final held-out loss; then seeds "
        f"0..{args.seeds - 1} at the best lr (seed = adapter init and data order; same order for every method).",
        "",
        "## Headline (best lr per method, mean ± std over seeds)",
        "",
        "| method | r | best lr | final held-out loss | min – max | "
        + "".join(f"steps to LoRA r={g.split('_r')[1]} final | " for g in lora_final)
        + "rank of ΔW (mean, min–max over layers) |",
        "|---|---|---|---|---|" + "---|" * len(lora_final) + "---|",
    ]
    for g, runs in seeds.items():
        finals = [r["final_eval"] for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        label, r = _group_label(g)
        reach = [steps_to_reach(runs, t) for t in lora_final.values()]
        ranks = results["ranks"].get(g) or {}
        rk = [v["rank"] for v in ranks.values()]
        rank_txt = f"{statistics.fmean(rk):.1f} ({min(rk)}–{max(rk)})" if rk else "—"
        lines.append(
            f"| {label} | {r} | {results['best_lr'][g]:g} | {statistics.fmean(finals):.4f} ± {sd:.4f} (n={len(finals)}) "
            f"| {min(finals):.4f} – {max(finals):.4f} | "
            + "".join(("never" if x is None else str(x)) + " | " for x in reach)
            + f"{rank_txt} |"
        )
    lines += [
        "",
        f"Steps to LoRA's final loss: first evaluation step (every {args.eval_every}) at which the seed-mean "
        "held-out loss is at or below LoRA's seed-mean final loss at that rank. "
        f"Rank of ΔW: numerical rank of W_final - W_base (merged checkpoint minus base, float64 SVD, "
        f"singular values > {RANK_THRESHOLD:g} x the largest), per targeted Linear, seed 0; "
        "the full rank of a layer is min(out, in).",
        "",
        "## lr sweep (seed 0, final held-out loss)",
        "",
    ]
    all_lrs = sorted({lr for runs in results["sweep"].values() for lr in map(float, runs)})
    lines += [
        "| method | r | " + " | ".join(f"lr {lr:g}" for lr in all_lrs) + " |",
        "|---|---|" + "---|" * len(all_lrs),
    ]
    for g, runs in results["sweep"].items():
        label, r = _group_label(g)
        cells = [_fmt(runs[f"{lr:g}"]["final_eval"]) if f"{lr:g}" in runs else "" for lr in all_lrs]
        lines.append(f"| {label} | {r} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## ScaLoRA refactors (best lr, all seeds; counted per layer and refactor step)",
        "",
        "| method | r | column | scalar | skipped | layer-refactors | mean alpha | mean beta | kappa (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g, fr in results["refactor"].items():
        label, r = _group_label(g)
        lines.append(
            f"| {label} | {r} | {_fmt(fr['column'], 3)} | {_fmt(fr['scalar'], 3)} | "
            f"{_fmt(fr['skipped'], 3)} | {fr['layer_refactors']} | {_fmt(fr['mean_alpha'])} | "
            f"{_fmt(fr['mean_beta'])} | {_fmt(fr['kappa'], 5)} |"
        )
    if results["kappa"]:
        lines += [
            "",
            "## kappa sensitivity (ScaLoRA I=1, best lr, seed 0, final held-out loss)",
            "",
            "| r | " + " | ".join(f"kappa x{k}" for k in next(iter(results["kappa"].values()))) + " |",
            "|---|" + "---|" * len(next(iter(results["kappa"].values()))),
        ]
        for g, ks in results["kappa"].items():
            _, r = _group_label(g)
            lines.append(f"| {r} | " + " | ".join(_fmt(s["final_eval"]) for s in ks.values()) + " |")
        lora0 = {
            g: results["sweep"][g][f"{results['best_lr'][g]:g}"]["final_eval"]
            for g in results["sweep"]
            if g.startswith("lora_r")
        }
        lines.append("")
        lines.append(
            "LoRA at its best lr, seed 0, for comparison: "
            + ", ".join(f"r={g.split('_r')[1]}: {_fmt(v)}" for g, v in lora0.items())
            + "."
        )
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Per-layer rank of ΔW (seed 0, best lr)", ""]
    names = sorted({n for ranks in results["ranks"].values() if ranks for n in ranks}, key=_layer_key)
    if names:
        groups = [g for g in results["ranks"] if results["ranks"][g]]
        lines += [
            "| layer | full rank | " + " | ".join(" ".join(_group_label(g)).replace(" —", "") for g in groups) + " |",
            "|---|---|" + "---|" * len(groups),
        ]
        for n in names:
            full = next(results["ranks"][g][n]["full_rank"] for g in groups)
            short = n.replace("model.layers.", "L").replace(".weight", "")
            lines.append(
                f"| {short} | {full} | " + " | ".join(str(results["ranks"][g][n]["rank"]) for g in groups) + " |"
            )
    path = out_dir / "study.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "study_results.json").write_text(json.dumps(results, indent=1, default=str))
    return path


def _n_runs(results: dict) -> int:
    sweep = sum(len(r) for r in results["sweep"].values())
    extra_seeds = sum(len(r) - 1 for r in results["seeds"].values())
    kappa = sum(len(k) - 1 for k in results["kappa"].values())
    return 1 + sweep + extra_seeds + kappa


def _layer_key(name: str):
    parts = name.split(".")
    idx = next((int(p) for p in parts if p.isdigit()), 0)
    return idx, name


def make_plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base0 = results["base"]["finetune_eval_before"]
    colors = {"lora": "C0", "rslora": "C1", "scalora": "C2", "scalora_i10": "C3", "full": "k"}
    ranks_present = sorted({int(g.rpartition("_r")[2]) for g in results["seeds"] if "_r" in g})
    paths = []

    def method_of(g):
        return g.rpartition("_r")[0] or g

    # 1. held-out loss curves at the best lr, mean over seeds, min-max band
    fig, axes = plt.subplots(
        1, max(1, len(ranks_present)), figsize=(5 * max(1, len(ranks_present)), 3.6), squeeze=False, sharey=True
    )
    for ax, r in zip(axes[0], ranks_present or [None]):
        for g, runs in results["seeds"].items():
            if "_r" in g and int(g.rpartition("_r")[2]) != r:
                continue
            steps, mean, lo, hi = mean_curve(runs)
            steps, mean, lo, hi = [0] + steps, [base0] + mean, [base0] + lo, [base0] + hi
            m = method_of(g)
            ax.plot(steps, mean, color=colors[m], label=f"{LABELS[m]} (lr {results['best_lr'][g]:g})")
            ax.fill_between(steps, lo, hi, color=colors[m], alpha=0.15)
        ax.set_title(
            f"r = {r}, best lr, mean of {len(next(iter(results['seeds'].values())))} seeds (band: min-max)", fontsize=9
        )
        ax.set_xlabel("step")
        _zoom(ax, results, base0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss")
    paths.append(_save(fig, out_dir / "study_curves.png"))

    # 2. lr sweep
    fig, axes = plt.subplots(
        1, max(1, len(ranks_present)), figsize=(5 * max(1, len(ranks_present)), 3.4), squeeze=False, sharey=True
    )
    for ax, r in zip(axes[0], ranks_present or [None]):
        for g, runs in results["sweep"].items():
            if "_r" in g and int(g.rpartition("_r")[2]) != r:
                continue
            lrs = sorted(map(float, runs))
            ax.plot(
                lrs,
                [runs[f"{lr:g}"]["final_eval"] for lr in lrs],
                "o-",
                color=colors[method_of(g)],
                label=LABELS[method_of(g)],
            )
        ax.set_xscale("log")
        ax.set_title(f"lr sweep, r = {r}, seed 0")
        ax.set_xlabel("peak lr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final held-out loss")
    paths.append(_save(fig, out_dir / "study_lr_sweep.png"))

    # 3. per-layer rank of the accumulated update
    ranked = {g: v for g, v in results["ranks"].items() if v}
    if ranked:
        names = sorted(next(iter(ranked.values())), key=_layer_key)
        fig, ax = plt.subplots(figsize=(10, 3.6))
        for g, v in ranked.items():
            m = method_of(g)
            style = "--" if g.endswith("_r4") else "-"
            ax.plot(
                range(len(names)),
                [v[n]["rank"] for n in names],
                style,
                marker=".",
                color=colors[m],
                label=" ".join(_group_label(g)).replace(" —", "").replace(" 4", " r=4").replace(" 16", " r=16"),
            )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(
            [
                n.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "").replace("mlp.", "")
                for n in names
            ],
            rotation=90,
            fontsize=6,
        )
        ax.set_yscale("log")
        ax.set_ylabel(f"rank of ΔW (σ > {RANK_THRESHOLD:g} σmax)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=3)
        paths.append(_save(fig, out_dir / "study_rank.png"))

    # 4. kappa sensitivity
    if results["kappa"]:
        fig, axes = plt.subplots(
            1, len(results["kappa"]), figsize=(5 * len(results["kappa"]), 3.4), squeeze=False, sharey=True
        )
        for ax, (g, ks) in zip(axes[0], results["kappa"].items()):
            for i, (k, s) in enumerate(ks.items()):
                steps = [0] + [p[0] for p in s["curve"]]
                ax.plot(steps, [base0] + [p[1] for p in s["curve"]], color=f"C{i + 4}", label=f"kappa x{k}")
            lora_g = "lora_r" + g.rpartition("_r")[2]
            if lora_g in results["seeds"]:
                s = results["seeds"][lora_g][0]
                ax.plot(
                    [0] + [p[0] for p in s["curve"]], [base0] + [p[1] for p in s["curve"]], "C0:", label="LoRA (seed 0)"
                )
            ax.set_title(f"ScaLoRA kappa sensitivity, r = {g.rpartition('_r')[2]}, seed 0", fontsize=9)
            _zoom(ax, results, base0)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("held-out loss")
        paths.append(_save(fig, out_dir / "study_kappa.png"))
    return paths


def _zoom(ax, results: dict, base0: float) -> None:
    """Linear y axis on the part where the methods differ; step 0 (the base) runs off the top."""
    finals = [s["final_eval"] for runs in results["seeds"].values() for s in runs]
    low, high = min(finals), max(finals)
    ax.set_ylim(low - 0.01, min(base0, high + 4 * (high - low) + 0.05))
    ax.text(0.01, 0.99, f"step 0 (base): {base0:.2f}, off scale", transform=ax.transAxes, fontsize=7, va="top")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--work-dir", default="runs/study", help="runs, data and the base (git-ignored)")
    a("--out-dir", default="tools/studies/results", help="study.md, study_results.json, PNGs")
    a("--methods", default="lora,rslora,scalora,scalora_i10,full", type=lambda s: s.split(","))
    a("--ranks", default="4,16", type=lambda s: parse_list(s, int))
    a("--lrs-lora", default="1e-3,3e-3,1e-2", type=parse_list, help="lr sweep of the adapter methods")
    a("--lrs-full", default="3e-4,1e-3,3e-3", type=parse_list, help="lr sweep of full fine-tuning")
    a("--seeds", type=int, default=3, help="seeds at the best lr (headline)")
    a("--kappa-mults", default="0.25,1,4", type=parse_list, help="ScaLoRA kappa multipliers ('' to skip)")
    a(
        "--kappa-ranks",
        default="4,16",
        type=lambda s: parse_list(s, int),
        help="ranks of the kappa sensitivity ('' : all of --ranks)",
    )
    a("--alpha", type=float, default=16.0)
    a("--ft-steps", type=int, default=200)
    a("--lr-warmup", type=int, default=10)
    a("--scalora-warmup", type=int, default=10)
    a("--eval-every", type=int, default=20)
    a("--batch-size", type=int, default=16)
    a("--max-length", type=int, default=64)
    a("--pretrain-steps", type=int, default=800)
    a("--pretrain-lr", type=float, default=3e-3)
    a("--hidden-size", type=int, default=128)
    a("--num-layers", type=int, default=4)
    a("--num-heads", type=int, default=4)
    a("--num-kv-heads", type=int, default=2)
    a("--intermediate-size", type=int, default=256)
    a(
        "--embed-init-scale",
        type=float,
        default=10.0,
        help="multiply the frozen embeddings / output head of the random init (see rescale_frozen_init)",
    )
    a("--n-symbols", type=int, default=64)
    a("--line-length", type=int, default=48, help="symbols per line")
    a("--follow", type=float, default=0.9, help="probability that a walk follows the permutation")
    a("--pretrain-lines", type=int, default=8000)
    a("--finetune-lines", type=int, default=2000)
    a("--eval-lines", type=int, default=128)
    a("--data-seed", type=int, default=0)
    a("--threads", type=int, default=1, help="torch threads (1 is fastest for this size on a shared CPU)")
    a("--report-only", action="store_true", help="fail instead of training a missing run")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = " ".join(["python tools/studies/study.py", *given])
    results = run_study(args, log=lambda m: print(m, flush=True))
    path = write_report(args, results, Path(args.out_dir), command)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
