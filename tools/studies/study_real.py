"""The method on a real pretrained model: SmolLM2-135M-Instruct (tools/generators/real_models.py) on two
tasks from real text, with the schedule users run (cosine, LR warm-up, clipping):

- `--task stdlib` (default): Python standard-library docstring -> function, a chat task
  (tools/studies/stdlib_task.py) in the model's chat template, loss on the answers only; task metric:
  the share of generated held-out functions that parse;
- `--task austen`: Jane Austen's prose, domain adaptation (tools/studies/austen_task.py): five novels
  to train on, Persuasion held out; task metric: top-1 next-token accuracy on held-out text.

Every run goes through scalora_dist.train.train in this process and is cached like
tools/studies/study.py's.

    python tools/studies/study_real.py                       # the committed grid (see --help)
    python tools/studies/study_real.py --quick               # 2 methods x 4 steps: the code path, for CI
    python tools/studies/study_real.py --methods lora,scalora --lrs 1e-3,2e-3 --seeds 0,1,2
    python tools/studies/study_real.py --task austen --methods lora,scalora --lrs 2e-3,4e-3

Writes tools/studies/results/study_real.md / .json (study_real_austen.* for --task austen): held-out
loss per method, rank, lr and seed, kappa, the refactor column / scalar / skip split, the
task metric, and with --update-ranks the numerical rank of each layer's accumulated update.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # sibling tools

from study import load_weights, run_cached, summarize_run  # noqa: E402

METHODS = {
    "lora": ["adapter.method=lora", "adapter.use_rslora=false"],
    "rslora": ["adapter.method=lora", "adapter.use_rslora=true"],
    "scalora": ["adapter.method=scalora", "adapter.scalora.interval=1"],
    # kappa as the rule before the LR-warm-up correction gave it (0.45x: 10 warm-up steps
    # of 10 before the first refactor), to measure what the correction changes
    "scalora_rawkappa": [
        "adapter.method=scalora",
        "adapter.scalora.interval=1",
        "adapter.scalora.kappa_multiplier=0.45",
    ],
    "scalora_i10": ["adapter.method=scalora", "adapter.scalora.interval=10"],
    "scalora_rslora": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.use_rslora=true"],
    # kappa x4 and x1/4 around the auto rule: is the rule's kappa near the best one?
    "scalora_k4": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.kappa_multiplier=4"],
    "scalora_k025": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.kappa_multiplier=0.25"],
    # the first refactor after 3 plain LoRA steps instead of 10: do the columns stay apart
    # (the r = 16 collinearity grows in the plain-LoRA warm-up)?
    "scalora_w3": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.warmup_steps=3"],
    # kappa resolved per layer from its own columns (the layers' adapters grow at different
    # sizes; one global kappa drains the large ones and leaves the small ones)
    "scalora_lk": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.kappa_scope=layer"],
    # ablations of the facts study (tools/studies/README.md): kappa over the schedule, when
    # refactoring starts, the fallbacks for rejected column systems, kappa's size
    "scalora_inverse_lr": [
        "adapter.method=scalora",
        "adapter.scalora.interval=1",
        "adapter.scalora.kappa_schedule=inverse_lr",
    ],
    "scalora_reestimate": [
        "adapter.method=scalora",
        "adapter.scalora.interval=1",
        "adapter.scalora.kappa_schedule=reestimate",
    ],
    "scalora_w50": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.warmup_steps=50"],
    "scalora_w100": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.warmup_steps=100"],
    "scalora_nnls": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.column_fallback=nnls"],
    "scalora_boundary": [
        "adapter.method=scalora",
        "adapter.scalora.interval=1",
        "adapter.scalora.scalar_fallback=boundary",
    ],
    "scalora_k05": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.kappa_multiplier=0.5"],
    "scalora_k2": ["adapter.method=scalora", "adapter.scalora.interval=1", "adapter.scalora.kappa_multiplier=2"],
    "relora": ["adapter.method=relora"],
    "full": ["adapter.method=full"],
}


TASKS = {"stdlib": "chat", "austen": "text", "facts": "instruction"}  # task -> data.format


def task_files(work_dir: Path, task: str = "stdlib") -> tuple[Path, Path]:
    out = work_dir / ("data" if task == "stdlib" else f"data-{task}")
    if not (out / "eval.jsonl").is_file():
        if task == "stdlib":
            from stdlib_task import write

            write(out, max_chars=400, eval_fraction=0.15)
        elif task == "facts":
            import facts_task

            facts_task.write(out)
        else:
            import austen_task

            austen_task.write(out)
    return out / "train.jsonl", out / "eval.jsonl"


def overrides_for(
    args, model: Path, files: tuple[Path, Path], method: str, rank: int, lr: float, seed: int
) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train_files=[{files[0]}]",
        f"data.eval_files=[{files[1]}]",
        f"data.format={TASKS[args.task]}",
        f"data.max_length={args.max_length}",
        "data.packing=true",
        f"train.micro_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"train.lr={lr}",
        "train.lr_scheduler=cosine",
        f"train.warmup_steps={args.lr_warmup}",
        "train.max_grad_norm=1.0",
        f"train.seed={seed}",
        f"train.eval_every={args.eval_every}",
        f"train.eval_batches={args.eval_batches}",
        "train.log_every=1",
        "train.keep_last=1",
        f"adapter.rank={rank}",
        f"adapter.alpha={2 * rank}",
        "adapter.target_modules=all-linear",
        f"adapter.scalora.warmup_steps={args.scalora_warmup}",
        f"adapter.relora.restart_every={args.relora_every}",
        "adapter.relora.rewarmup_steps=5",
        "output.save_adapter=false",
        *METHODS[method],
    ]


def generations(run_dir: Path, eval_file: Path, n: int, max_new_tokens: int) -> tuple[float, list[dict]]:
    """The merged model's greedy answers to the first `n` held-out prompts: the share that
    parses as Python, and the answers themselves (prompt, answer, reference, parses)."""
    from scalora_dist.inference import Sampling, generate, load_model, prompt_ids

    loaded = load_model(str(run_dir / "merged"), device="cpu")
    rows = [json.loads(l) for l in eval_file.read_text().splitlines()[:n]]
    samples = []
    for row in rows:
        prompt, reference = row["messages"][0]["content"], row["messages"][1]["content"]
        ids = prompt_ids(loaded.tokenizer, prompt, chat=True)
        new = generate(loaded.model, loaded.tokenizer, ids, Sampling(max_new_tokens=max_new_tokens))
        answer = loaded.tokenizer.decode(new, skip_special_tokens=True)
        code = answer.split("```python")[-1].split("```")[0] if "```" in answer else answer
        try:
            ast.parse(code)
            parses = True
        except SyntaxError:
            parses = False
        samples.append({"prompt": prompt, "answer": answer, "reference": reference, "parses": parses})
    return sum(s["parses"] for s in samples) / max(1, len(samples)), samples


def answers(run_dir: Path, eval_file: Path, n: int) -> tuple[float, list[dict]]:
    """Facts task: the share of the first `n` held-out questions whose greedy answer is the
    fact exactly, and the answers themselves."""
    from scalora_dist.inference import Sampling, generate, load_model, prompt_ids

    loaded = load_model(str(run_dir / "merged"), device="cpu")
    tok = loaded.tokenizer
    rows = [json.loads(l) for l in eval_file.read_text().splitlines()[:n]]
    samples = []
    for row in rows:
        ids = prompt_ids(tok, row["prompt"], chat=False)  # as data.format=instruction trains: BOS, the prompt
        new = generate(loaded.model, tok, ids, Sampling(max_new_tokens=12))
        answer = tok.decode(new, skip_special_tokens=True).strip()
        samples.append(
            {
                "prompt": row["prompt"],
                "answer": answer,
                "reference": row["response"].strip(),
                "correct": answer == row["response"].strip(),
            }
        )
    return sum(s["correct"] for s in samples) / max(1, len(samples)), samples


def continuations(
    run_dir: Path, eval_file: Path, n: int, max_new_tokens: int, accuracy_rows: int
) -> tuple[float, list[dict]]:
    """Text task: the merged model's top-1 next-token accuracy over the first `accuracy_rows`
    held-out paragraphs, and its greedy continuations of the first half of the first `n`."""
    import torch

    from scalora_dist.inference import Sampling, generate, load_model, prompt_ids

    loaded = load_model(str(run_dir / "merged"), device="cpu")
    tok, model = loaded.tokenizer, loaded.model
    texts = [json.loads(l)["text"] for l in eval_file.read_text().splitlines()]
    right = total = 0
    with torch.no_grad():
        for text in texts[:accuracy_rows]:
            ids = prompt_ids(tok, text, chat=False)  # as data.format=text trains: BOS, then the text
            predicted = model(input_ids=ids).logits[0, :-1].argmax(-1)
            right += int((predicted == ids[0, 1:]).sum())
            total += ids.shape[1] - 1
    samples = []
    for text in texts[:n]:
        words = text.split()
        prompt = " ".join(words[: len(words) // 2])
        new = generate(model, tok, prompt_ids(tok, prompt, chat=False), Sampling(max_new_tokens=max_new_tokens))
        samples.append(
            {
                "prompt": prompt,
                "answer": tok.decode(new, skip_special_tokens=True),
                "reference": " ".join(words[len(words) // 2 :]),
            }
        )
    return right / max(1, total), samples


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--task", choices=sorted(TASKS), default="stdlib")
    a("--work-dir", type=Path, default=Path("runs/study-real"))
    a("--out-dir", type=Path, default=Path("tools/studies/results"))
    a("--model", type=Path, default=None, help="default: the converted SmolLM2 of tools/generators/real_models.py")
    a("--methods", default="lora,rslora,scalora,scalora_rawkappa,relora")
    a("--ranks", default="4")
    a("--lrs", default="2e-3")
    a("--seeds", default="0")
    a("--steps", type=int, default=60)
    a("--batch-size", type=int, default=8)
    a("--max-length", type=int, default=256)
    a("--lr-warmup", type=int, default=10)
    a("--scalora-warmup", type=int, default=10)
    a("--relora-every", type=int, default=20)
    a("--eval-every", type=int, default=20)
    a("--eval-batches", type=int, default=8)
    a("--parse-prompts", type=int, default=0, help="held-out prompts generated per run (0: skip)")
    a("--accuracy-rows", type=int, default=40, help="austen: held-out paragraphs of the next-token accuracy")
    a("--update-ranks", action="store_true", help="the numerical rank of each layer's accumulated update")
    a("--quick", action="store_true", help="lora and scalora, 4 steps: the code path only")
    args = ap.parse_args(argv)
    # generated tokens per held-out prompt: enough to see a function / a sentence
    args.new_tokens = {"stdlib": 160, "austen": 40, "facts": 12}[args.task]
    if args.quick:  # the code path in CI: one packed row of 64 tokens a step, short answers
        args.methods, args.steps, args.eval_every, args.eval_batches = "lora,scalora", 4, 4, 1
        args.lr_warmup, args.scalora_warmup, args.batch_size, args.max_length = 1, 2, 1, 64
        args.new_tokens = 24
    if args.model is None:
        from real_models import checkpoint

        args.model = checkpoint()
    files = task_files(args.work_dir, args.task)
    base_weights = load_weights(args.model) if args.update_ranks else None  # W_base, for the rank of ΔW
    results = []
    started = time.perf_counter()
    for method in args.methods.split(","):
        for rank in map(int, args.ranks.split(",")):
            for lr in map(float, args.lrs.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    name = f"{method}_r{rank}-lr{lr:g}-s{seed}"
                    run_dir = run_cached(
                        args, name, overrides_for(args, args.model, files, method, rank, lr, seed), print
                    )
                    summary = summarize_run(run_dir, base_weights)
                    if args.task == "facts" and args.parse_prompts:
                        summary["accuracy"], summary["samples"] = answers(run_dir, files[1], args.parse_prompts)
                    elif args.task == "austen":
                        summary["accuracy"], summary["samples"] = continuations(
                            run_dir, files[1], args.parse_prompts, args.new_tokens, args.accuracy_rows
                        )
                    elif args.parse_prompts:
                        summary["parse_rate"], summary["samples"] = generations(
                            run_dir, files[1], args.parse_prompts, args.new_tokens
                        )
                    if summary.get("ranks"):
                        summary["mean_update_rank"] = statistics.fmean(r["rank"] for r in summary["ranks"].values())
                        summary.pop("ranks")  # per layer, in the run's study_done.json; the mean in the report
                    results.append({"method": method, "rank": rank, "lr": lr, "seed": seed, **setting(args), **summary})
    write_report(args, results, time.perf_counter() - started)


def setting(args) -> dict:
    """What besides method, rank, lr and seed tells two runs apart in the report."""
    return {"task": args.task, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length}


def _key(r: dict) -> tuple:
    return (
        r.get("task", "stdlib"),
        r["method"],
        r["rank"],
        r["lr"],
        r["seed"],
        r.get("steps"),
        r.get("batch_size"),
        r.get("max_length"),
    )


def merged_results(path: Path, new: list[dict]) -> list[dict]:
    """The report's earlier rows (from other invocations, other settings) with this run's
    rows replacing the same runs: the report accumulates as the study runs in pieces."""
    old = json.loads(path.read_text()) if path.is_file() else []
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + new


TITLES = {
    "stdlib": "stdlib docstring -> function (chat, loss on the answers)",
    "facts": "facts about made-up people, asked back in an unseen phrasing (Q/A, loss on the answers)",
    "austen": "Jane Austen's prose (text; Persuasion held out)",
}


def write_report(args, results: list[dict], wall: float) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "study_real" + ("" if args.task == "stdlib" else f"_{args.task}") + ("_quick" if args.quick else "")
    results = merged_results(args.out_dir / f"{name}.json", results)
    (args.out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    metric = {"austen": "next-token accuracy", "facts": "exact answers"}.get(args.task, "parses")
    lines = [
        f"# {'Quick check' if args.quick else 'Study'}: SmolLM2-135M-Instruct, {TITLES[args.task]}",
        "",
        f"Rows accumulate over invocations (each run is cached); the last one: `python tools/studies/study_real.py "
        f"{' '.join(sys.argv[1:])}` ({wall / 60:.1f} min here).",
        f"Cosine with {args.lr_warmup} warm-up steps, clipping 1.0, all-linear; held-out loss at the end; steps x "
        "batch of packed rows x tokens per row in the setting column; rank of ΔW: the mean over the adapted layers "
        "of the numerical rank of W_final - W_base (where measured).",
        "",
        f"| method | rank | lr | seed | setting | held-out loss | kappa | column / scalar / skip | rank of ΔW | {metric} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        split = refactor_split(r["refactor"])
        kappa = f"{r['kappa']:.3g}" if r.get("kappa") else "-"
        value = r.get("accuracy", r.get("parse_rate"))
        shown = f"{100 * value:.{1 if 'accuracy' in r else 0}f}%" if value is not None else "-"
        update_rank = f"{r['mean_update_rank']:.1f}" if r.get("mean_update_rank") is not None else "-"
        where = f"{r.get('steps', '?')} x {r.get('batch_size', '?')} x {r.get('max_length', '?')}"
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['lr']:g} | {r['seed']} | {where} | {r['final_eval']:.4f} | "
            f"{kappa} | {split} | {update_rank} | {shown} |"
        )
    if not args.quick:
        lines += [
            "",
            "Each method at its best lr (the seed-0 run picks it; mean ± standard deviation over the seeds "
            "run there; best first):",
            "",
            *headline(results),
        ]
    by_method: dict[str, list[float]] = {}
    for r in results:
        by_method.setdefault(f"{r['method']} r{r['rank']} lr{r['lr']:g} ({r.get('steps', '?')} steps)", []).append(
            r["final_eval"]
        )
    if any(len(v) > 1 for v in by_method.values()):
        lines += ["", "| setting | mean | std | seeds |", "|---|---|---|---|"]
        for k, v in by_method.items():
            std = statistics.stdev(v) if len(v) > 1 else float("nan")
            lines.append(f"| {k} | {statistics.fmean(v):.4f} | {std:.4f} | {len(v)} |")
    with_samples = [r for r in results if r.get("samples")]
    if with_samples:
        what = (
            f"Greedy continuations of the first half of held-out paragraphs ({args.new_tokens} new tokens)"
            if args.task == "austen"
            else f"Greedy answers to the first held-out prompts ({args.new_tokens} new tokens at most)"
        )
        lines += ["", f"{what}, side by side:"]
        for i, first in enumerate(with_samples[0]["samples"][:3]):
            reference = first["reference"] if args.task == "austen" else f"```python\n{first['reference']}\n```"
            lines += ["", f"**Prompt:** {first['prompt']}", "", f"reference:\n{reference}"]
            for r in with_samples:
                if i < len(r["samples"]):
                    sample = r["samples"][i]
                    tag = "" if "parses" not in sample else f" ({'parses' if sample['parses'] else 'does not parse'})"
                    lines += [
                        f"{r['method']} r{r['rank']} lr{r['lr']:g}{tag}:",
                        f"````\n{sample['answer'].strip()}\n````",
                    ]  # answers hold ``` fences
    if not args.quick:
        lines += ["", *(f"![{path.stem}]({path.name})" for path in make_plots(results, args.out_dir / name))]
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def best_rows(results: list[dict]) -> dict[tuple[str, int], tuple[float, list[float]]]:
    """(method, rank) -> (its best lr by the seed-0 run, the held-out losses of every seed
    there), over the runs of the longest setting each has."""
    seed0 = {}
    for r in results:
        if r["seed"] == 0:
            seed0.setdefault((r["method"], r["rank"]), {})[r["lr"]] = r["final_eval"]
    out = {}
    for key, by_lr in seed0.items():
        lr = min(by_lr, key=by_lr.get)
        out[key] = lr, [r["final_eval"] for r in results if (r["method"], r["rank"], r["lr"]) == (*key, lr)]
    return out


def refactor_split(counts: dict[str, int]) -> str:
    """ScaLoRA's refactor outcomes as shares: 'column / scalar / skipped', or '-' for none."""
    total = sum(counts.values())
    return " / ".join(f"{100 * counts[k] / total:.0f}%" for k in ("column", "scalar", "skipped")) if total else "-"


def longest_setting(results: list[dict]) -> list[dict]:
    """The runs of the most steps: the headline and the plots compare like with like."""
    longest = max(r.get("steps", 0) for r in results)
    return [r for r in results if r.get("steps", 0) == longest]


def headline(results: list[dict]) -> list[str]:
    """The report's headline table: each (method, rank) at its best lr, over the runs of the
    longest setting."""
    results = longest_setting(results)
    lines = [
        "| method | r | lrs tried | best lr | held-out loss | seed 0 | seeds | kappa | column / scalar / skip | rank of ΔW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for (method, rank), (lr, losses) in best_rows(results).items():
        runs = [r for r in results if (r["method"], r["rank"], r["lr"]) == (method, rank, lr)]
        tried = sorted({r["lr"] for r in results if (r["method"], r["rank"], r["seed"]) == (method, rank, 0)})
        mean = statistics.fmean(losses)
        seed0 = next(r["final_eval"] for r in runs if r["seed"] == 0)  # like with like for the one-seed rows
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        kappas = [r["kappa"] for r in runs if r.get("kappa")]
        split = refactor_split({k: sum(r["refactor"][k] for r in runs) for k in ("column", "scalar", "skipped")})
        ranks = [r["mean_update_rank"] for r in runs if r.get("mean_update_rank") is not None]
        rows.append(
            (
                mean,
                f"| {method} | {'-' if method == 'full' else rank} | {', '.join(f'{x:g}' for x in tried)} | "
                f"{lr:g} | {mean:.4f}{spread} | {seed0:.4f} | {len(losses)} | "
                f"{f'{statistics.fmean(kappas):.3g}' if kappas else '-'} | {split} | "
                f"{f'{statistics.fmean(ranks):.1f}' if ranks else '-'} |",
            )
        )
    return lines + [line for _, line in sorted(rows)]


SWEPT = ("lora", "rslora", "scalora", "scalora_i10", "scalora_rslora", "relora")
"""The adapter methods of the lr plot (full fine-tuning's lrs are 10x lower: only in the other)."""


def make_plots(results: list[dict], prefix: Path) -> list[Path]:
    """prefix_lr.png: held-out loss against lr per method (seed 0), one panel per rank;
    prefix_best.png: each method at its best lr, mean and standard deviation over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    results = longest_setting(results)
    ranks = sorted({r["rank"] for r in results})
    fig, axes = plt.subplots(1, len(ranks), figsize=(5 * len(ranks), 3.4), squeeze=False, sharey=True)
    for ax, rank in zip(axes[0], ranks):
        for method in [m for m in dict.fromkeys(r["method"] for r in results) if m in SWEPT]:
            runs = sorted(
                (r["lr"], r["final_eval"])
                for r in results
                if r["method"] == method and r["rank"] == rank and r["seed"] == 0
            )
            if runs:
                ax.plot(*zip(*runs), "o-", label=method)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({r["lr"] for r in results if r["method"] in SWEPT}))
        ax.set_title(f"lr sweep, r = {rank}, seed 0", fontsize=9)
        ax.set_xlabel("peak lr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss")
    paths = [prefix.with_name(prefix.name + "_lr.png")]
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    best = sorted(best_rows(results).items(), key=lambda kv: (kv[0][1], kv[0][0]))
    fig, ax = plt.subplots(figsize=(max(5, 0.75 * len(best)), 3.4))
    labels = [
        (m if m == "full" else f"{m} r{r}") + f"\nlr {lr:g}" + (f"\n{len(v)} seeds" if len(v) > 1 else "")
        for (m, r), (lr, v) in best
    ]
    means = [sum(v) / len(v) for _, (_, v) in best]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, (_, v) in best]
    ax.bar(
        range(len(best)),
        means,
        yerr=stds,
        capsize=3,
        color=["C2" if m.startswith("scalora") else "C0" for (m, _), _ in best],
    )
    ax.set_xticks(range(len(best)), labels, fontsize=6, rotation=35, ha="right")
    ax.set_ylim(min(means) - 2 * max(stds + [0.005]), max(means) + 2 * max(stds + [0.005]))
    ax.set_ylabel("held-out loss (lower is better)")
    ax.set_title("each method at its best lr (seed 0 picks it); bars: mean, whiskers: std over seeds", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    paths.append(prefix.with_name(prefix.name + "_best.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    main()
