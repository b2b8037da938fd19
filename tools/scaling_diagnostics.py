"""Why does ScaLoRA's per-column solve fail at r = 16? Diagnostics of the scaling system.

Fine-tunes ScaLoRA (I = 1) from the study's cached base on the study's fine-tuning data with
the study's settings (tools/study.py: lr 1e-2, alpha 16, all-linear, lr warm-up 10, batch 16,
max_length 64, ScaLoRA warm-up 10, kappa auto, cosine over the study's 200 steps), in this
process with scalora_dist.train.setup / train_step. At every refactor, BEFORE the rewrite,
it rebuilds every layer's statistics exactly as the refactor does (scalora.math.lora_grams on
lora_A, lora_A.grad, lora_B, lora_B.grad and the layer scale) and records:

- K = P * Q: eigenvalues (min, max, condition), condition of the unit-diagonal K;
- v = K^{-1} lam as solve_scales computes it (same ridge): negative entries (alpha^2 / beta^2
  halves, how negative), and which branch solve_scales takes and why (non-finite, min
  eigenvalue <= 0, condition > 1e12, negative entries), checked against the branch the real
  solve_scales returned on the same call;
- alternatives on the same system, scored by the objective f(v) = v^T K v - 2 lam^T v
  (= ||sum_i v_i M_i - G||^2 - ||G||^2, lower is better), as the fraction of the
  unconstrained optimum's reduction -f(K^+ lam) they reach: the product's choice, the scalar
  fallback, the exact non-negative least squares (NNLS) optimum (scipy.optimize.nnls on a
  factor of K, float64, and this file's torch active-set solver, cross-checked), NNLS with a
  floor v_i >= tau / ||a_i||^2 (new column norms >= sqrt(tau * kappa)), and larger ridges;
- sub-systems of k random column pairs of the same layer (k = 4, 8): does the positivity rate
  depend on how many coefficients there are rather than on the r=16 training state?

`--solver` replaces scalora_dist.scalora.math.solve_scales_batch INSIDE THIS PROCESS ONLY (the
product code is not changed): `nnls` / `nnls_floor` keep the product's column solution where
it exists and use the (floored) NNLS optimum where it does not.

Commands (OMP_NUM_THREADS=1, one torch thread; about 2-3 min per 200-step run on one core):

    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 4  --steps 200
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 16 --steps 200
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 16 --steps 200 --solver nnls
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 16 --steps 200 --solver nnls_floor --tau 0.01
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 16 --steps 200 --solver nnls_floor --tau 0.01 --seed 1
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 16 --steps 200 --solver nnls_floor --tau 0.01 --seed 2
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 4  --steps 200 --solver nnls_floor --tau 0.01
    OMP_NUM_THREADS=1 python tools/scaling_diagnostics.py --rank 16 --steps 40 --method lora   # control
    python tools/scaling_diagnostics.py --report runs/scaling_diagnostics/*.json   # tables

(--steps defaults to 40: a quick look at the first 30 refactors.) Each run writes
runs/scaling_diagnostics/r{rank}-{solver}-s{seed}-n{steps}.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import study  # noqa: E402  (tools/study.py: data, base, overrides)

RIDGES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
TAUS = (0.01, 0.1)
SUBSET_SIZES = (4, 8)
SUBSETS_PER_SIZE = 4
MAX_CONDITION = 1e12  # solve_scales' default
PRODUCT_RIDGE = 1e-12  # solve_scales' default


# ---------------------------------------------------------------------------------------
# Solvers on (K, lam), float64


def ridge_solve(K: torch.Tensor, lam: torch.Tensor, ridge: float) -> torch.Tensor:
    """(K + ridge * trace(K)/n * I)^{-1} lam, as _solve_psd does (without its checks)."""
    n = K.shape[0]
    shift = ridge * torch.trace(K) / n
    return torch.linalg.solve(K + shift * torch.eye(n, dtype=K.dtype), lam)


def pinv_solve(K: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Minimum-norm unconstrained optimum K^+ lam (eigen cut-off 1e-14 of the largest)."""
    e, V = torch.linalg.eigh(K)
    keep = e > e[-1].clamp(min=0) * 1e-14
    c = V.T @ lam
    return V[:, keep] @ (c[keep] / e[keep])


def objective(K: torch.Tensor, lam: torch.Tensor, v: torch.Tensor) -> float:
    """f(v) = v^T K v - 2 lam^T v = ||sum v_i M_i - G||^2 - ||G||^2."""
    return (v @ K @ v - 2 * lam @ v).item()


def nnls_gram(K: torch.Tensor, lam: torch.Tensor, lower: torch.Tensor | None = None,
              ridge: float = PRODUCT_RIDGE, max_iter: int | None = None) -> torch.Tensor:
    """argmin_{v >= lower} v^T K v - 2 lam^T v: Lawson-Hanson active set on the Gram form,
    float64, pure torch (a candidate for the product; scipy is only a test dependency).

    With lower = l the problem in w = v - l >= 0 has the linear term lam - K l. Each passive-
    set solve uses the same tiny relative ridge as solve_scales."""
    n = lam.numel()
    l = torch.zeros_like(lam) if lower is None else lower
    b = lam - K @ l
    shift = ridge * torch.trace(K) / n
    Kr = K + shift * torch.eye(n, dtype=K.dtype)
    x = torch.zeros_like(lam)
    passive = torch.zeros(n, dtype=torch.bool)
    blocked = torch.zeros(n, dtype=torch.bool)  # entered and left at once (degenerate): skip
    tol = 1e-12 * max(b.abs().max().item(), 1e-300) * n
    max_iter = max_iter or 10 * n
    it = 0
    w = b - Kr @ x
    while it < max_iter:
        cand = (~passive) & (~blocked) & (w > tol)
        if not cand.any():
            break
        j = int(torch.where(cand, w, torch.full_like(w, -math.inf)).argmax())
        passive[j] = True
        while it < max_iter:
            it += 1
            idx = passive.nonzero().flatten()
            s = torch.zeros_like(x)
            s[idx] = torch.linalg.solve(Kr[idx][:, idx], b[idx])
            if (s[idx] > 0).all():
                x = s
                break
            bad = idx[s[idx] <= 0]
            ratios = x[bad] / (x[bad] - s[bad])
            k = int(ratios.argmin())
            x = x + ratios[k].clamp(0, 1) * (s - x)
            drop = passive & (x <= 0)
            drop[bad[k]] = True  # the blocking index leaves even if round-off kept it > 0
            passive &= ~drop
            x[~passive] = 0
        if passive[j]:
            blocked.zero_()
        else:
            blocked[j] = True
        w = b - Kr @ x
    return x + l


def nnls_scipy(K: torch.Tensor, lam: torch.Tensor) -> torch.Tensor | None:
    """Reference: scipy.optimize.nnls on R v ~ d with K = R^T R, lam = R^T d (eigen factor)."""
    try:
        from scipy.optimize import nnls
    except ImportError:
        return None
    import numpy as np

    e, V = torch.linalg.eigh(K)
    keep = e > e[-1].clamp(min=0) * 1e-15
    R = (e[keep].sqrt()[:, None] * V[:, keep].T).numpy()
    d = ((V[:, keep].T @ lam) / e[keep].sqrt()).numpy()
    x, _ = nnls(R, d, maxiter=50 * K.shape[0])
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def diagonal_solution(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """lam_i / K_ii = [1/||a_i||^2 ; 1/||b_j||^2] (0 for a zero column)."""
    r = P.shape[0] // 2
    d = torch.cat([torch.diagonal(P)[:r], torch.diagonal(Q)[r:]])
    return torch.where(d > 0, 1.0 / d.clamp(min=1e-300), torch.zeros_like(d))


# ---------------------------------------------------------------------------------------
# Replaying solve_scales' decision


def psd_branch(M: torch.Tensor, rhs: torch.Tensor, ridge: float = PRODUCT_RIDGE,
               max_condition: float = MAX_CONDITION) -> tuple[str, torch.Tensor | None]:
    """_solve_psd's decision and its reason: ok | nonfinite | min_eig<=0 | cond>1e12 |
    solve_error | negative."""
    if not (torch.isfinite(M).all() and torch.isfinite(rhs).all()):
        return "nonfinite", None
    eig = torch.linalg.eigvalsh(M)
    if not eig[0] > 0:
        return "min_eig<=0", None
    if eig[-1] > max_condition * eig[0]:
        return "cond>1e12", None
    try:
        x = ridge_solve(M, rhs, ridge)
    except RuntimeError:
        return "solve_error", None
    if not torch.isfinite(x).all():
        return "nonfinite", x
    if not (x > 0).all():
        return "negative", x
    return "ok", x


def scalar_system(K: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = K.shape[0] // 2
    K2 = torch.stack([torch.stack([K[:r, :r].sum(), K[:r, r:].sum()]),
                      torch.stack([K[r:, :r].sum(), K[r:, r:].sum()])])
    return K2, torch.stack([lam[:r].sum(), lam[r:].sum()])


def participation_ratio(G: torch.Tensor) -> float:
    """(sum eig)^2 / sum eig^2 of a Gram: the effective number of directions (<= size)."""
    e = torch.linalg.eigvalsh(G).clamp(min=0)
    return (e.sum() ** 2 / (e.square().sum() + 1e-300)).item()


def mean_abs_offdiag_cos(G: torch.Tensor) -> float:
    d = torch.diagonal(G).clamp(min=1e-300).sqrt()
    C = G / d[:, None] / d[None, :]
    n = C.shape[0]
    return ((C.abs().sum() - torch.diagonal(C).abs().sum()) / (n * (n - 1))).item() if n > 1 else 0.0


def analyse(P: torch.Tensor, Q: torch.Tensor, kappa: float, gen: torch.Generator) -> dict:
    """Everything about one layer's scaling system (P, Q float64 from lora_grams)."""
    from scalora_dist.scalora import math as sm

    r = P.shape[0] // 2
    K, lam = sm.column_scaling_system(P, Q)
    out: dict = {}
    eig = torch.linalg.eigvalsh(K)
    out["min_eig"], out["max_eig"] = eig[0].item(), eig[-1].item()
    out["cond"] = (eig[-1] / eig[0]).item() if eig[0] > 0 else math.inf
    dg = torch.diagonal(K).clamp(min=1e-300).sqrt()
    Kn = K / dg[:, None] / dg[None, :]
    en = torch.linalg.eigvalsh(Kn)
    out["cond_unit_diag"] = (en[-1] / en[0]).item() if en[0] > 0 else math.inf
    out["eff_rank_A"] = participation_ratio(P[:r, :r]) / r
    out["eff_rank_B"] = participation_ratio(Q[r:, r:]) / r
    out["cos_A"] = mean_abs_offdiag_cos(P[:r, :r])
    out["cos_B"] = mean_abs_offdiag_cos(Q[r:, r:])

    reason, v = psd_branch(K, lam)
    out["reason"] = reason
    if reason == "ok":
        kind, out["reason_scalar"] = "column", None
    else:
        K2, lam2 = scalar_system(K, lam)
        rs, ab = psd_branch(K2, lam2)
        out["reason_scalar"] = rs
        kind = "scalar" if rs == "ok" else "skipped"
    out["kind_predicted"] = kind
    # the unconstrained solution as solve_scales computes it (same ridge), even if rejected
    try:
        v_prod = ridge_solve(K, lam, PRODUCT_RIDGE)
    except RuntimeError:
        v_prod = torch.full_like(lam, math.nan)
    neg = v_prod < 0
    out["neg_alpha"], out["neg_beta"] = int(neg[:r].sum()), int(neg[r:].sum())
    out["nonpos"] = int((v_prod <= 0).sum())
    l1 = v_prod.abs().sum().item()
    out["neg_mass"] = (v_prod[neg].abs().sum().item() / l1) if l1 > 0 else math.nan
    out["min_over_max"] = (v_prod.min() / v_prod.abs().max()).item() if l1 > 0 else math.nan

    # objective reductions relative to the unconstrained optimum
    v_opt = pinv_solve(K, lam)
    best = -objective(K, lam, v_opt)
    out["best_reduction"] = best

    def frac(x: torch.Tensor | None) -> float | None:
        if x is None or not torch.isfinite(x).all() or best <= 0:
            return None
        return -objective(K, lam, x) / best

    out["red_unconstrained_ridge"] = frac(v_prod)
    K2, lam2 = scalar_system(K, lam)
    try:
        ab = ridge_solve(K2, lam2, PRODUCT_RIDGE)
        v_scalar = torch.cat([ab[0] * torch.ones(r, dtype=K.dtype), ab[1] * torch.ones(r, dtype=K.dtype)])
    except RuntimeError:
        v_scalar = None
    out["red_scalar"] = frac(v_scalar)  # the scalar fallback's value (whether or not it is taken)
    out["scalar_ab"] = None if v_scalar is None else [ab[0].item(), ab[1].item()]
    v_skip = torch.full_like(lam, 1.0 / kappa)  # alpha = beta = 1
    out["red_skip"] = frac(v_skip)
    chosen = {"column": v, "scalar": v_scalar, "skipped": v_skip}[kind]
    out["red_product"] = frac(chosen)

    v_nn = nnls_gram(K, lam)
    out["red_nnls"] = frac(v_nn)
    out["nnls_zero_alpha"] = int((v_nn[:r] <= 0).sum())
    out["nnls_zero_beta"] = int((v_nn[r:] <= 0).sum())
    out["nnls_dead_pairs"] = int(((v_nn[:r] <= 0) & (v_nn[r:] <= 0)).sum())
    v_sp = nnls_scipy(K, lam)
    if v_sp is not None:
        out["red_nnls_scipy"] = frac(v_sp)
        out["nnls_torch_minus_scipy_obj"] = (objective(K, lam, v_nn) - objective(K, lam, v_sp)) / best if best > 0 else None
    d = diagonal_solution(P, Q)
    for tau in TAUS:
        v_f = nnls_gram(K, lam, lower=tau * d)
        out[f"red_nnls_floor{tau:g}"] = frac(v_f)
        out[f"nnls_floor{tau:g}_at_floor"] = int((v_f <= tau * d * (1 + 1e-9)).sum())
    for ridge in RIDGES:
        try:
            x = ridge_solve(K, lam, ridge)
        except RuntimeError:
            x = None
        out[f"ridge{ridge:g}_pos"] = bool(x is not None and torch.isfinite(x).all() and (x > 0).all())
        out[f"ridge{ridge:g}_accept"] = psd_branch(K, lam, ridge=ridge)[0] == "ok"
        out[f"red_ridge{ridge:g}"] = frac(x)
    # sub-systems of k random column pairs: positivity vs number of coefficients
    for k in SUBSET_SIZES:
        if k >= r:
            continue
        ok = 0
        for _ in range(SUBSETS_PER_SIZE):
            cols = torch.randperm(r, generator=gen)[:k]
            idx = torch.cat([cols, cols + r])
            ok += psd_branch(K[idx][:, idx], lam[idx])[0] == "ok"
        out[f"subset{k}_pos_rate"] = ok / SUBSETS_PER_SIZE
    return out


# ---------------------------------------------------------------------------------------
# Solver replacements (this process only)


def make_solver(kind: str, tau: float):
    from scalora_dist.scalora import math as sm

    original = sm.solve_scales

    def solve(P, Q, kappa, *, ridge=PRODUCT_RIDGE, max_condition=MAX_CONDITION):
        res = original(P, Q, kappa, ridge=ridge, max_condition=max_condition)
        if res.kind == sm.COLUMN:
            return res  # where the product's column solution exists, keep it
        P64, Q64 = P.to(torch.float64), Q.to(torch.float64)
        K, lam = sm.column_scaling_system(P64, Q64)
        if not (torch.isfinite(K).all() and torch.isfinite(lam).all()):
            return res
        r = P.shape[0] // 2
        lower = tau * diagonal_solution(P64, Q64) if kind == "nnls_floor" else None
        v = nnls_gram(K, lam, lower=lower, ridge=ridge)
        if not torch.isfinite(v).all() or not (v > 0).any():
            return res
        x = kappa * v.clamp(min=0)
        # a column that is already zero (exact NNLS zeroed it earlier) is unaffected by its
        # scale; keep 1 there so the other factor's gradient and Adam moments are untouched
        x = torch.where(torch.diagonal(K) > 0, x, torch.ones_like(x))
        return sm.Scales(x[:r].sqrt(), x[r:].sqrt(), sm.COLUMN)

    return solve


# ---------------------------------------------------------------------------------------
# The run


def run(args) -> Path:
    from scalora_dist.config import load_config
    from scalora_dist.metrics import quiet_libraries
    from scalora_dist.model.lora import lora_layers
    from scalora_dist.scalora import math as sm
    from scalora_dist.scalora import refactor as rf
    from scalora_dist.train import evaluate, setup, train_step

    torch.set_num_threads(1)
    quiet_libraries()
    import logging

    logging.getLogger("scalora_dist").setLevel(logging.WARNING)
    sargs = study.build_parser().parse_args(["--work-dir", args.work_dir, *shlex.split(args.study_args)])
    sargs.report_only = True  # never pre-train here: a missing cached base is an error
    files, base = study.prepare_base(sargs, log=lambda m: None)  # cached: returns at once
    spec = study.Spec(args.method, args.rank, args.lr, args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = ("lora-" if args.method == "lora" else "") + f"r{args.rank}-{args.solver}" + (f"{args.tau:g}" if args.solver == "nnls_floor" else "") + f"-s{args.seed}-n{args.steps}"
    overrides = study.finetune_overrides(sargs, spec, base, files) + [
        f"train.max_steps={args.schedule_steps}", f"output.dir={out_dir / ('tmp-' + tag)}"]
    cfg = load_config(None, overrides)
    run_ = setup(cfg)
    names = list(lora_layers(run_.model).keys())
    layers = list(lora_layers(run_.model).values())
    if run_.scalora is not None:
        assert [id(l) for l in run_.scalora.layers] == [id(l) for l in layers]

    # Record what the real solver (or the replacement) returns, layer by layer. The refactor
    # solves every layer of a rank at once (sm.solve_scales_batch, bit for bit solve_scales
    # per layer), so that is what is replaced, here only.
    product_solve = sm.solve_scales_batch
    real_solve = sm.solve_scales if args.solver == "default" else make_solver(args.solver, args.tau)
    calls: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def recording_solve(P, Q, kappa, **kw):
        results = [real_solve(p, q, kappa, **kw) for p, q in zip(P, Q)]
        calls.extend((p, q, res.kind) for p, q, res in zip(P, Q, results))
        return results

    sm.solve_scales_batch = recording_solve
    records: list[dict] = []
    gen = torch.Generator().manual_seed(1234)
    original_refactor = run_.scalora.refactor if run_.scalora is not None else None
    state = {"step": None}
    diag_time = [0.0]

    def refactor_with_diagnostics(step=None):
        t0 = time.perf_counter()
        sc = run_.scalora
        todo = [(n, l) for n, l in zip(names, sc.layers)
                if l.lora_A.grad is not None and l.lora_B.grad is not None]
        with torch.no_grad():  # as in ScaLoRA.refactor
            grams = [sm.lora_grams(l.lora_A, l.lora_A.grad, l.lora_B, l.lora_B.grad, l.scale) for _, l in todo]
        kappa = sc.kappa if sc.kappa is not None else rf.auto_kappa(grams, sc.lr_fraction(step))
        recs = []
        if kappa is not None:
            kappa *= sc.cfg.kappa_multiplier
            for (name, _), (P, Q) in zip(todo, grams):
                rec = {"step": state["step"] + 1, "layer": name, "kappa": kappa}
                rec.update(analyse(P, Q, kappa, gen))
                recs.append(rec)
        diag_time[0] += time.perf_counter() - t0
        calls.clear()
        report = original_refactor(step)
        if recs:
            assert len(calls) == len(recs), (len(calls), len(recs))
            for rec, (P, Q), (Pc, Qc, kind) in zip(recs, grams, calls):
                assert torch.equal(P, Pc) and torch.equal(Q, Qc), "statistics differ from the refactor's"
                rec["kind_actual"] = kind
            records.extend(recs)
        return report

    lora_kappa: list[float] = []

    def lora_step_with_diagnostics(*a, **kw):
        """--method lora (control, no rewrite): the scaling system ScaLoRA WOULD solve on plain
        LoRA's state, from step scalora.warmup_steps + 1 on. Gradients are already clipped
        here, a global rescale that leaves v unchanged."""
        step = state["step"] + 1
        if step > cfg.adapter.scalora.warmup_steps:
            t0 = time.perf_counter()
            with torch.no_grad():
                grams = [sm.lora_grams(l.lora_A, l.lora_A.grad, l.lora_B, l.lora_B.grad, l.scale) for l in layers]
            if not lora_kappa:
                lora_kappa.append(rf.auto_kappa(grams))
            for name, (P, Q) in zip(names, grams):
                rec = {"step": step, "layer": name, "kappa": lora_kappa[0]}
                rec.update(analyse(P, Q, lora_kappa[0], gen))
                records.append(rec)
            diag_time[0] += time.perf_counter() - t0
        return original_opt_step(*a, **kw)

    if run_.scalora is not None:
        run_.scalora.refactor = refactor_with_diagnostics
    else:
        import warnings

        warnings.filterwarnings("ignore", message="Seems like `optimizer.step()` has been overridden")
        original_opt_step = run_.optimizer.step
        run_.optimizer.step = lora_step_with_diagnostics
    curve, train_losses = [], []
    started = time.perf_counter()
    for step in range(args.steps):
        state["step"] = step
        res = train_step(run_, step)
        train_losses.append(res.loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append([step + 1, evaluate(run_.model, run_.eval_loader, run_.device, cfg.train.eval_batches)])
            print(f"step {step + 1}: train {res.loss:.4f} held-out {curve[-1][1]:.4f} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    wall = time.perf_counter() - started
    sm.solve_scales_batch = product_solve
    if args.solver == "default" and run_.scalora is not None:
        mism = sum(r["kind_predicted"] != r["kind_actual"] for r in records)
        print(f"branch replay: {mism} mismatches in {len(records)} layer-refactors")
    out = {
        "args": vars(args), "overrides": overrides, "final_eval": curve[-1][1] if curve else None,
        "curve": curve, "train_loss": train_losses, "wall_s": wall, "diagnostics_s": diag_time[0],
        "records": records,
    }
    path = out_dir / f"{tag}.json"
    path.write_text(json.dumps(out, default=_json_default))
    print(f"wrote {path} (final held-out {out['final_eval']:.4f}, {wall:.0f}s, diagnostics {diag_time[0]:.0f}s)")
    print(report([path]))
    return path


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(type(x))


# ---------------------------------------------------------------------------------------
# Report


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def _med(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def _f(x, d=3):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def _e(x):
    return "inf" if x == math.inf else ("—" if x is None or math.isnan(x) else f"{x:.1e}")


def report(paths: list[Path], window: tuple[int, int] | None = None) -> str:
    runs = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        for r in d["records"]:
            for k, v in r.items():
                if v in ("inf", "nan"):
                    r[k] = float(v)
        if window:
            d["records"] = [r for r in d["records"] if window[0] <= r["step"] <= window[1]]
        runs.append((Path(p).stem, d))
    L = []
    L.append("| run | final held-out | layer-refactors | column | scalar: negative entries | scalar: cond>1e12 "
             "| scalar: min eig<=0 | scalar: other | skipped |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, d in runs:
        R = d["records"]
        n = len(R)
        if not n:
            continue
        kind = lambda r: r.get("kind_actual", r["kind_predicted"])  # noqa: E731
        col = sum(r["kind_predicted"] == "column" for r in R) / n
        sc = [r for r in R if r["kind_predicted"] == "scalar"]
        why = lambda w: sum(r["reason"] == w for r in sc) / n  # noqa: E731
        other = len([r for r in sc if r["reason"] not in ("negative", "cond>1e12", "min_eig<=0")]) / n
        skip = sum(r["kind_predicted"] == "skipped" for r in R) / n
        actual_col = sum(kind(r) == "column" for r in R) / n
        L.append(f"| {name} | {_f(d['final_eval'], 4)} | {n} | {col:.3f} (applied: {actual_col:.3f}) | "
                 f"{why('negative'):.3f} | {why('cond>1e12'):.3f} | {why('min_eig<=0'):.3f} | {other:.3f} | {skip:.3f} |")
    L.append("")
    L.append("Conditioning of K and where the negatives are (product's v = (K + 1e-12 tr(K)/2r I)^{-1} lam):")
    L.append("")
    L.append("| run | cond(K) p10 / p50 / p90 / max | cond(unit-diag K) p50 / p90 | eff. rank A/r, B/r (median) "
             "| mean abs cos A, B | fraction of v entries < 0 | (1-p)^{2r} | negatives per failing layer: mean, median, p90, max "
             "| failing: alpha-half / beta-half negatives | failing: neg L1 share (median) | min v / max abs v (median, failing) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, d in runs:
        R = d["records"]
        if not R:
            continue
        r_ = d["args"]["rank"]
        conds = [r["cond"] for r in R]
        condn = [r["cond_unit_diag"] for r in R]
        fail = [r for r in R if r["reason"] == "negative"]
        negs = [r["neg_alpha"] + r["neg_beta"] for r in fail]
        p = sum(r["neg_alpha"] + r["neg_beta"] for r in R) / (len(R) * 2 * r_)
        na = sum(r["neg_alpha"] for r in fail)
        nb = sum(r["neg_beta"] for r in fail)
        L.append(
            f"| {name} | {_e(_q(conds, .1))} / {_e(_q(conds, .5))} / {_e(_q(conds, .9))} / {_e(max(conds))} | "
            f"{_e(_q(condn, .5))} / {_e(_q(condn, .9))} | {_f(_med([r['eff_rank_A'] for r in R]), 2)}, "
            f"{_f(_med([r['eff_rank_B'] for r in R]), 2)} | {_f(_mean([r['cos_A'] for r in R]), 2)}, "
            f"{_f(_mean([r['cos_B'] for r in R]), 2)} | {p:.3f} | {(1 - p) ** (2 * r_):.3f} | "
            + (f"{_mean(negs):.2f}, {_med(negs):g}, {_q(negs, .9):g}, {max(negs)} | {na} / {nb} | "
               f"{_f(_med([r['neg_mass'] for r in fail]))} | {_f(_med([r['min_over_max'] for r in fail]))} |"
               if fail else "— | — | — | — |"))
    L.append("")
    L.append("Sub-systems of k random column pairs of the same layers (rate of a valid positive column solution):")
    L.append("")
    L.append("| run | all r pairs | k = 4 | k = 8 |")
    L.append("|---|---|---|---|")
    for name, d in runs:
        R = d["records"]
        if not R:
            continue
        col = sum(r["reason"] == "ok" for r in R) / len(R)
        L.append(f"| {name} | {col:.3f} | {_f(_mean([r.get('subset4_pos_rate') for r in R]))} | "
                 f"{_f(_mean([r.get('subset8_pos_rate') for r in R]))} |")
    L.append("")
    L.append("Alternatives on the same systems: objective reduction as a fraction of the unconstrained optimum's "
             "(1 = unconstrained optimum; mean over layers, [median]); 'valid' = all alpha, beta > 0 strictly.")
    L.append("")
    alts = [("product (what solve_scales applies)", "red_product", None),
            ("scalar fallback (its value everywhere)", "red_scalar", None),
            ("alpha = beta = 1 (skip)", "red_skip", None),
            ("NNLS exact (torch active set)", "red_nnls", "nnls"),
            ("NNLS exact (scipy reference)", "red_nnls_scipy", None)]
    alts += [(f"NNLS, floor v >= {t:g}/norm^2", f"red_nnls_floor{t:g}", f"floor{t:g}") for t in TAUS]
    alts += [(f"ridge {rd:g} x tr(K)/2r", f"red_ridge{rd:g}", f"ridge{rd:g}") for rd in RIDGES]
    header = "| alternative | " + " | ".join(f"{n}: valid | {n}: all layers | {n}: failing layers" for n, _ in runs) + " |"
    L.append(header)
    L.append("|---|" + "---|---|---|" * len(runs))
    for label, key, valid_key in alts:
        cells = []
        for _, d in runs:
            R = d["records"]
            fail = [r for r in R if r["reason"] != "ok"]
            if valid_key == "nnls":
                valid = sum(r["nnls_zero_alpha"] + r["nnls_zero_beta"] == 0 for r in R) / max(1, len(R))
            elif valid_key and valid_key.startswith("floor"):
                valid = 1.0  # the floor keeps every entry > 0
            elif valid_key and valid_key.startswith("ridge"):
                valid = sum(r[f"{valid_key}_pos"] for r in R) / max(1, len(R))
            elif key == "red_product":
                valid = sum(r["kind_predicted"] != "skipped" for r in R) / max(1, len(R))
            elif key == "red_scalar":
                valid = sum(r["scalar_ab"] is not None and min(r["scalar_ab"]) > 0 for r in R) / max(1, len(R))
            else:
                valid = math.nan
            vals = [r.get(key) for r in R]
            fv = [r.get(key) for r in fail]
            cells.append(f"{_f(valid)} | {_f(_mean(vals))} [{_f(_med(vals))}] | {_f(_mean(fv))} [{_f(_med(fv))}]")
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Exact NNLS optimum on failing layers: entries at zero, and column pairs with both alpha = beta = 0:")
    L.append("")
    L.append("| run | zeros per failing layer (mean, max) | alpha / beta zeros | dead pairs (alpha=beta=0) per failing layer | "
             "floor 0.1: entries at the floor (mean) | torch minus scipy NNLS objective, relative (largest magnitude; < 0: torch better) |")
    L.append("|---|---|---|---|---|---|")
    for name, d in runs:
        R = d["records"]
        fail = [r for r in R if r["reason"] != "ok"]
        if not fail:
            continue
        z = [r["nnls_zero_alpha"] + r["nnls_zero_beta"] for r in fail]
        gaps = [r.get("nnls_torch_minus_scipy_obj") or 0.0 for r in R]
        L.append(f"| {name} | {_mean(z):.2f}, {max(z)} | {sum(r['nnls_zero_alpha'] for r in fail)} / "
                 f"{sum(r['nnls_zero_beta'] for r in fail)} | {_mean([r['nnls_dead_pairs'] for r in fail]):.3f} | "
                 f"{_mean([r['nnls_floor0.1_at_floor'] for r in fail]):.2f} | {_e(max(gaps, key=abs))} |")
    L.append("")
    L.append("Column-solve rate by refactor step window:")
    L.append("")
    L.append("| run | steps 11-20 | 21-40 | 41-100 | 101-200 |")
    L.append("|---|---|---|---|---|")
    for name, d in runs:
        R = d["records"]
        cells = []
        for a, b in ((11, 20), (21, 40), (41, 100), (101, 200)):
            W = [r for r in R if a <= r["step"] <= b]
            cells.append(f"{sum(r['reason'] == 'ok' for r in W) / len(W):.3f}" if W else "—")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Column-solve rate by module type:")
    L.append("")
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    L.append("| run | " + " | ".join(types) + " |")
    L.append("|---|" + "---|" * len(types))
    for name, d in runs:
        R = d["records"]
        cells = []
        for t in types:
            W = [r for r in R if r["layer"].endswith(t)]
            cells.append(f"{sum(r['reason'] == 'ok' for r in W) / len(W):.3f}" if W else "—")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--rank", type=int, default=16)
    a("--method", choices=["scalora", "lora"], default="scalora",
      help="lora: control run without rewrites; records the system ScaLoRA would solve on LoRA's state")
    a("--steps", type=int, default=40, help="optimizer steps to run")
    a("--schedule-steps", type=int, default=200,
      help="train.max_steps for the cosine schedule (the study's 200: the first --steps steps are the study's)")
    a("--lr", type=float, default=1e-2)
    a("--seed", type=int, default=0)
    a("--solver", choices=["default", "nnls", "nnls_floor"], default="default",
      help="replace solve_scales in this process: keep the product's column solution, else (floored) NNLS")
    a("--tau", type=float, default=0.1, help="nnls_floor: v_i >= tau/||a_i||^2, i.e. new column norm >= sqrt(tau*kappa)")
    a("--eval-every", type=int, default=20)
    a("--work-dir", default="runs/study", help="the study's cache (base, data)")
    a("--study-args", default="", help="tools/study.py flags the cached study was made with (default: none)")
    a("--out-dir", default="runs/scaling_diagnostics")
    a("--report", nargs="+", type=Path, help="only print the tables for these result JSONs")
    a("--window", type=lambda s: tuple(int(x) for x in s.split(",")),
      help="with --report: only refactors at steps a,b (inclusive), e.g. 11,40")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.report:
        print(report(args.report, args.window))
        return
    run(args)


if __name__ == "__main__":
    main()
