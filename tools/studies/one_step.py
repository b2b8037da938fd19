"""One LoRA step against one ScaLoRA step from the same state: where does ScaLoRA lose?

A LoRA run of study_real.py's setting trains on; at chosen steps N its state (model,
optimizer, scheduler, data position) is copied, and from that same state each variant takes
one step on the same batch:

- `lora`: the plain LoRA step;
- `scalora`: a ScaLoRA refactor (kappa auto, resolved from the columns now, as at a run's
  first refactor), then the step; `scalora_k4`: the same with kappa x 4;
- `scalora_no_transfer`: the refactor without rescaling AdamW's moments;
- `scalora_clip_first`: the clip coefficient taken from the gradients before the rescale;
- `scalora_step_matched`: the remedy this tool tests (see `matched_kappa`): kappa chosen per
  refactor so that the refactored step moves the weights as far as LoRA's would.

For each: the held-out loss drop on fixed held-out batches, the norm of the step in weight
space ||dW|| (every adapted layer together, and the median layer's ratio to LoRA's), and its
cosine with -G, the full fine-tuning direction (G = dL/dW of the base weights on that
batch). Also the factors' balance: the median over columns of ||a_i|| / ||b_i|| (paper
coordinates: a = sqrt(s) lora_B columns, b = sqrt(s) lora_A rows).

    python tools/studies/one_step.py --task facts --lr 4e-3 --at 10,50,100
    python tools/studies/one_step.py --task facts --lr 4e-3 --trajectories lora,scalora,scalora_reestimate --to 100
    python tools/studies/one_step.py --quick          # the code path, for CI

Writes tools/studies/results/one_step_<task>.md / .json. With --trajectories, each method
trains on its own (the study's setting) and every step records the norm of the step it took
in weight space and the mean size of its adapter's column pairs, ||a_i|| ||b_i|| (what
ScaLoRA's kappa holds the adapter to): tools/studies/results/trajectories_<task>.md / .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # sibling tools

import torch  # noqa: E402

VARIANTS = ("lora", "scalora", "scalora_k4", "scalora_no_transfer", "scalora_clip_first", "scalora_step_matched")


def effective_weights(layers: dict) -> dict[str, torch.Tensor]:
    """W0 + s * lora_B @ lora_A of every adapted layer, in float64."""
    return {n: l.weight.double() + l.scale * (l.lora_B.double() @ l.lora_A.double()) for n, l in layers.items()}


def balance(layers: dict) -> float:
    """Median over every column pair of ||a_i|| / ||b_i|| (paper coordinates)."""
    ratios = []
    for l in layers.values():
        a, b = l.lora_B.double().norm(dim=0), l.lora_A.double().norm(dim=1)
        ratios += (a / b.clamp(min=1e-30)).tolist()
    return statistics.median(ratios)


@contextmanager
def no_moment_transfer():
    """The refactor rescales factors and gradients but leaves AdamW's moments as they are."""
    from scalora_dist.scalora import refactor

    original = refactor.adam_moments

    @contextmanager
    def none(optimizer, param):
        yield None

    refactor.adam_moments = none
    try:
        yield
    finally:
        refactor.adam_moments = original


def heldout_loss(run, batches) -> float:
    from scalora_dist.data import count_tokens, model_inputs
    from scalora_dist.inference import move_to

    run.model.eval()
    total = n = 0.0
    with torch.no_grad():
        for batch in batches:
            k = count_tokens([batch])[0]
            out = run.model(**move_to(model_inputs(batch), run.device), num_items_in_batch=torch.tensor(max(k, 1)))
            total += out.loss.item() * k
            n += k
    run.model.train()
    return total / n


def adam_update(optimizer, param, grad: torch.Tensor) -> torch.Tensor:
    """The update AdamW would apply to `param` for this `grad` (no weight decay), without
    applying it: -lr * m_hat / (sqrt(v_hat) + eps)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta1, beta2 = group["betas"]
    state = optimizer.state.get(param, {})
    step = float(state["step"]) + 1 if "step" in state else 1.0
    m = state["exp_avg"] * beta1 + (1 - beta1) * grad if "exp_avg" in state else (1 - beta1) * grad
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad if "exp_avg_sq" in state else (1 - beta2) * grad * grad
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return -group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def matched_kappa(run, layers: dict, kappa: float, clip: float) -> float:
    """The remedy: the kappa whose refactor gives a first-order weight-space step as large as
    LoRA's. Under AdamW a factor's update does not change when the factor is rescaled (the
    moments are rescaled with it), so the step in weight space is U_A diag(beta) B^T + A
    diag(alpha) U_B^T: linear in the scales, which grow with sqrt(kappa). Balancing the
    factors (what the refactor does) shrinks it whenever LoRA's factors are unbalanced; this
    kappa undoes that shrink, measured on the whole model (one number)."""
    from scalora_dist.scalora import scaling as sm
    from scalora_dist.scalora.refactor import solve_all

    lora_sq = sca_sq = 0.0
    for layer in layers.values():
        s = layer.scale
        A, B = math.sqrt(s) * layer.lora_B.double(), math.sqrt(s) * layer.lora_A.double().T
        U_A = math.sqrt(s) * adam_update(run.optimizer, layer.lora_B, layer.lora_B.grad * clip).double()
        U_B = math.sqrt(s) * adam_update(run.optimizer, layer.lora_A, layer.lora_A.grad * clip).double().T
        P, Q, *_ = sm.lora_grams(layer.lora_A, layer.lora_A.grad, layer.lora_B, layer.lora_B.grad, layer.scale)
        (scales,) = solve_all([(P.double(), Q.double())], kappa)
        alpha, beta = scales.alpha.double(), scales.beta.double()
        lora_sq += (U_A @ B.T + A @ U_B.T).square().sum().item()
        sca_sq += ((U_A * beta) @ B.T + (A * alpha) @ U_B.T).square().sum().item()
    # scales are sqrt(kappa)-homogeneous: the step norm is proportional to sqrt(kappa)
    return kappa * lora_sq / max(sca_sq, 1e-300)


def one_step(run, step: int, variant: str, base_kappa_cfg, g_store: dict | None) -> dict:
    """From the run's current state, one step of `variant`; returns its figures. The caller
    restores the state afterwards."""
    from scalora_dist.model.lora import lora_layers
    from scalora_dist.scalora.refactor import ScaLoRA
    from scalora_dist.train import forward_backward, total_grad_norm

    layers = lora_layers(run.model)
    before = effective_weights(layers)
    if g_store is not None:
        for l in layers.values():
            l.weight.requires_grad_(True)
    loss, _, _ = forward_backward(run.model, run.train_loader, 1, run.device)
    if g_store is not None:
        for n, l in layers.items():
            g_store[n] = l.weight.grad.double().clone()
            l.weight.grad = None
            l.weight.requires_grad_(False)
    norm_before = total_grad_norm(run.params)
    max_norm = run.cfg.train.max_grad_norm
    report = None
    if variant != "lora":
        cfg = copy.deepcopy(base_kappa_cfg)
        cfg.warmup_steps, cfg.interval = 0, 1
        if variant == "scalora_k4":
            cfg.kappa_multiplier = 4.0
        scalora = ScaLoRA(cfg, list(layers.values()), run.optimizer, lr_multiplier=run.scheduler.lr_lambdas[0])
        if variant == "scalora_step_matched":
            from scalora_dist.scalora import scaling as sm
            from scalora_dist.scalora.refactor import auto_kappa

            grams = [
                sm.lora_grams(l.lora_A, l.lora_A.grad, l.lora_B, l.lora_B.grad, l.scale)[:2] for l in layers.values()
            ]
            kappa = auto_kappa([(P.double(), Q.double()) for P, Q in grams], scalora.lr_fraction(step))
            clip = min(1.0, max_norm / (norm_before + 1e-6)) if max_norm else 1.0
            if kappa is not None:  # None: the adapters are still zero, nothing to match
                scalora.kappa = matched_kappa(run, layers, kappa, clip)
        if variant == "scalora_no_transfer":
            with no_moment_transfer():
                report = scalora.refactor(step)
        else:
            report = scalora.refactor(step)
    norm = norm_before if variant == "scalora_clip_first" else total_grad_norm(run.params)
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(run.params, max_norm, torch.tensor(norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    after = effective_weights(layers)
    return {"loss": loss, "report": report, "delta": {n: after[n] - before[n] for n in before}}


def snapshot(run) -> dict:
    return {
        "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optim": copy.deepcopy(run.optimizer.state_dict()),
        "sched": copy.deepcopy(run.scheduler.state_dict()),
        "data": run.train_loader.state_dict(),
        "rng": torch.get_rng_state(),
    }


def restore(run, snap: dict) -> None:
    run.model.load_state_dict(snap["model"])
    run.optimizer.load_state_dict(copy.deepcopy(snap["optim"]))
    run.scheduler.load_state_dict(copy.deepcopy(snap["sched"]))
    run.train_loader.load_state_dict(snap["data"])
    torch.set_rng_state(snap["rng"])


def analyse(run, step: int, heldout, variants: list[str], scalora_cfg) -> dict:
    from scalora_dist.model.lora import lora_layers

    snap = snapshot(run)
    layers = lora_layers(run.model)
    row = {"step": step, "balance": balance(layers), "heldout_before": heldout_loss(run, heldout)}
    G: dict[str, torch.Tensor] = {}
    lora_norms = None
    for variant in variants:
        restore(run, snap)
        out = one_step(run, step, variant, scalora_cfg, G if not G else None)
        delta = out["delta"]
        norms = {n: d.norm().item() for n, d in delta.items()}
        dot = sum((-G[n] * d).sum().item() for n, d in delta.items())
        g_norm = math.sqrt(sum(G[n].square().sum().item() for n in delta))
        d_norm = math.sqrt(sum(v**2 for v in norms.values()))
        if variant == "lora":
            lora_norms = norms
        ratio = statistics.median(norms[n] / max(lora_norms[n], 1e-300) for n in norms) if lora_norms else None
        report = out["report"]
        row[variant] = {
            "heldout_drop": row["heldout_before"] - heldout_loss(run, heldout),
            "step_norm": d_norm,
            "median_layer_step_ratio_to_lora": ratio,
            "cos_with_minus_G": dot / max(d_norm * g_norm, 1e-300),
            "mean_alpha": getattr(report, "mean_alpha", None),
            "mean_beta": getattr(report, "mean_beta", None),
            "kappa": getattr(report, "kappa", None),
            "column_scalar_skipped": [report.column, report.scalar, report.skipped] if report else None,
            "balance_after": balance(layers),
        }
    restore(run, snap)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--task", default="facts")
    a("--lr", type=float, default=4e-3)
    a("--rank", type=int, default=4)
    a("--at", default="10,50,100", help="steps of the LoRA run to analyse")
    a("--variants", default=",".join(VARIANTS))
    a("--heldout-batches", type=int, default=4)
    a("--work-dir", type=Path, default=Path("runs/one-step"))
    a("--out-dir", type=Path, default=Path("tools/studies/results"))
    a(
        "--quick",
        action="store_true",
        help="steps 2 and 3 of one row of 64 tokens, and 3 steps of two trajectories: the code path only",
    )
    a("--trajectories", default="", help="methods to train on their own, recording each step (see above)")
    a("--to", type=int, default=100, help="--trajectories: steps of each")
    # the study's setting (study_real.py's flags, with the facts task's values)
    a("--steps", type=int, default=200)
    a("--batch-size", type=int, default=4)
    a("--max-length", type=int, default=128)
    a("--lr-warmup", type=int, default=10)
    args = ap.parse_args(argv)
    if args.quick:
        args.at, args.steps, args.lr_warmup = "2,3", 4, 1
        args.batch_size, args.max_length, args.heldout_batches = 1, 64, 1
    import study_real
    from real_models import checkpoint

    from scalora_dist.config import load_config
    from scalora_dist.train import setup, train_step

    study_args = argparse.Namespace(
        task=args.task,
        max_length=args.max_length,
        batch_size=args.batch_size,
        steps=args.steps,
        lr_warmup=args.lr_warmup,
        scalora_warmup=1 if args.quick else 10,
        relora_every=20,
        eval_every=0,
        eval_batches=0,
    )
    files = study_real.task_files(args.work_dir, args.task)
    overrides = study_real.overrides_for(study_args, checkpoint(), files, "lora", args.rank, args.lr, 0)
    cfg = load_config(None, [*overrides, f"output.dir={args.work_dir / 'run'}"])
    scalora_cfg = load_config(None, [*overrides, "adapter.method=scalora"]).adapter.scalora
    if args.trajectories:
        started = time.perf_counter()
        runs = trajectories(args, overrides)
        write_trajectories(args, runs, time.perf_counter() - started, argv)
        return
    run = setup(cfg)
    heldout = [b for _, b in zip(range(args.heldout_batches), run.eval_loader)]
    at = sorted(int(x) for x in args.at.split(","))
    variants = args.variants.split(",")
    rows, started = [], time.perf_counter()
    for step in range(max(at) + 1):
        if step in at:
            rows.append(analyse(run, step, heldout, variants, scalora_cfg))
            print(json.dumps(rows[-1], default=float), flush=True)
        if step < max(at):
            train_step(run, step)
    write_report(args, rows, variants, time.perf_counter() - started, argv)
    if args.quick:  # and the trajectories' code path: three steps of LoRA and ScaLoRA
        args.trajectories, args.to = "lora,scalora_reestimate", 3
        runs = trajectories(args, overrides)
        write_trajectories(args, runs, 0.0, argv)


TRAJECTORY_METHODS = {
    "lora": ["adapter.method=lora"],
    "scalora": ["adapter.method=scalora"],
    "scalora_reestimate": ["adapter.method=scalora", "adapter.scalora.kappa_schedule=reestimate"],
    "scalora_inverse_lr": ["adapter.method=scalora", "adapter.scalora.kappa_schedule=inverse_lr"],
}


def column_pair_size(layers: dict) -> float:
    """Mean over every layer and column of ||a_i|| ||b_i|| (paper coordinates)."""
    sizes = [
        (l.scale * l.lora_B.double().norm(dim=0) * l.lora_A.double().norm(dim=1)).mean().item() for l in layers.values()
    ]
    return statistics.fmean(sizes)


def trajectories(args, base_overrides: list[str]) -> dict[str, list[dict]]:
    from scalora_dist.config import load_config
    from scalora_dist.model.lora import lora_layers
    from scalora_dist.train import setup, train_step

    out = {}
    for method in args.trajectories.split(","):
        cfg = load_config(None, [*base_overrides, *TRAJECTORY_METHODS[method], f"output.dir={args.work_dir / method}"])
        run = setup(cfg)
        layers = lora_layers(run.model)
        rows = []
        for step in range(args.to):
            before = effective_weights(layers)
            result = train_step(run, step)
            after = effective_weights(layers)
            rows.append(
                {
                    "step": step + 1,
                    "loss": result.loss,
                    "step_norm": math.sqrt(sum((after[n] - before[n]).square().sum().item() for n in after)),
                    "pair_size": column_pair_size(layers),
                    "kappa": result.report.kappa if result.report is not None else None,
                }
            )
        out[method] = rows
        print(method, json.dumps(rows[-1]), flush=True)
    return out


def write_trajectories(args, runs: dict[str, list[dict]], wall: float, argv) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"trajectories_{args.task}" + ("_quick" if args.quick else "")
    (args.out_dir / f"{name}.json").write_text(json.dumps(runs, indent=1))
    command = "python tools/studies/one_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    methods = list(runs)
    lines = [
        f"# Each method's own steps ({args.task}, r {args.rank}, lr {args.lr:g})",
        "",
        f"`{command}` ({wall / 60:.1f} min). Per step: ||dW||, the norm of the step taken in weight space "
        "(every adapted layer), and the mean column-pair size ||a_i|| ||b_i||; the training loss, averaged "
        "over the 10 steps up to the row's.",
        "",
        "| step | " + " | ".join(f"{m}: loss, ‖dW‖, pair size" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for i in range(len(runs[methods[0]])):
        if (i + 1) % 10 and i + 1 != 1:
            continue
        cells = []
        for m in methods:
            window = runs[m][max(0, i - 9) : i + 1]
            r = runs[m][i]
            cells.append(
                f"{statistics.fmean(x['loss'] for x in window):.4f}, {r['step_norm']:.3f}, {r['pair_size']:.3g}"
            )
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_report(args, rows: list[dict], variants: list[str], wall: float, argv) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"one_step_{args.task}" + ("_quick" if args.quick else "")
    (args.out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1, default=float))
    command = "python tools/studies/one_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# One LoRA step against one ScaLoRA step from the same state ({args.task}, LoRA r {args.rank}, "
        f"lr {args.lr:g})",
        "",
        f"`{command}` ({wall / 60:.1f} min). Each row: from the LoRA run's state after `step` steps, one step "
        "of each variant on the same batch. Held-out drop: the loss on fixed held-out batches before minus "
        "after (higher is better). Step norm: ||dW|| over every adapted layer (the effective weights "
        "W0 + s B A). Ratio: the median layer's ||dW|| over LoRA's. cos: with -G, the full fine-tuning "
        "gradient direction. Balance: median ||a_i|| / ||b_i||.",
        "",
        "| step | balance | variant | held-out drop | step norm | layer ratio | cos with -G | mean alpha, beta | kappa |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for v in variants:
            r = row[v]
            ab = f"{r['mean_alpha']:.3g}, {r['mean_beta']:.3g}" if r["mean_alpha"] is not None else "-"
            kappa = f"{r['kappa']:.3g}" if r["kappa"] is not None else "-"
            ratio = f"{r['median_layer_step_ratio_to_lora']:.3f}" if r["median_layer_step_ratio_to_lora"] else "-"
            lines.append(
                f"| {row['step']} | {row['balance']:.3g} | {v} | {r['heldout_drop']:.5f} | "
                f"{r['step_norm']:.4g} | {ratio} | {r['cos_with_minus_G']:.4f} | {ab} | {kappa} |"
            )
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
