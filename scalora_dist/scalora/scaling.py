"""ScaLoRA column scaling: the tensor math of one layer (see docs/method.md, sections 1-3).

Paper coordinates: A = sqrt(s) * lora_B (m, r), B = sqrt(s) * lora_A.T (n, r), W = W0 + A B^T,
G_A = G B = lora_B.grad / sqrt(s), G_B = G^T A = lora_A.grad.T / sqrt(s).

Every function works on shards: row blocks of W / lora_B (and its grad), column blocks of
lora_A (and its grad). The Gram statistics are sums over those rows/columns, so partial
statistics from the blocks add up (one all-reduce), and every rank then solves the same
tiny float64 system. No torch.distributed here: callers do the communication.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

COLUMN = "column"
SCALAR = "scalar"
SKIPPED = "skipped"


@dataclass(frozen=True)
class Scales:
    """Per-column factors of one layer's rewrite A -> A diag(alpha), B -> B diag(beta)."""

    alpha: torch.Tensor  # (r,) float64, scales columns of A (= columns of lora_B)
    beta: torch.Tensor  # (r,) float64, scales columns of B (= rows of lora_A)
    kind: str  # COLUMN | SCALAR | SKIPPED  (SKIPPED => alpha = beta = ones)
    rejected: str | None = None
    """Why the column system was not solved as it stands (REJECTIONS), None when it was."""


def lora_grams(
    lora_A: torch.Tensor,
    lora_A_grad: torch.Tensor,
    lora_B: torch.Tensor,
    lora_B_grad: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial P = [A, G_A]^T [A, G_A] and Q = [G_B, B]^T [G_B, B], (2r, 2r) float64.

    Computed from (shards of) the PyTorch-layout tensors without forming G, so the cost is
    O((m+n) r^2). lora_B / lora_B_grad: any row block; lora_A / lora_A_grad: any column block.
    The sqrt(s) factors go on the small result so shards of any size are treated alike.
    """
    left = torch.cat([lora_B, lora_B_grad], dim=1).to(torch.float64)  # (m_loc, 2r)
    right = torch.cat([lora_A_grad, lora_A], dim=0).to(torch.float64)  # (2r, n_loc)
    d_p, d_q = _gram_diagonals(lora_B.shape[1], scale, left.device)
    P = (left.T @ left) * d_p[:, None] * d_p[None, :]
    Q = (right @ right.T) * d_q[:, None] * d_q[None, :]
    return P, Q


@functools.lru_cache(maxsize=64)
def _gram_diagonals(r: int, scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """d_p, d_q of lora_grams: [A, G_A] = [lora_B, lora_B_grad] diag(d_p) and
    [G_B, B] = [lora_A_grad, lora_A]^T diag(d_q); the same few numbers for every layer of a
    rank and scale, so made once (never written to)."""
    root = math.sqrt(scale)
    ones = torch.ones(r, dtype=torch.float64, device=device)
    return torch.cat([ones * root, ones / root]), torch.cat([ones / root, ones * root])


def column_scaling_system(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K = P * Q (the Gram of the rank-one matrices a_i a_i^T G and G b_j b_j^T) and their
    inner products with G, lam = [colnorm2(G_B); colnorm2(G_A)]."""
    r = P.shape[0] // 2
    K = P * Q
    lam = torch.cat([torch.diagonal(Q)[:r], torch.diagonal(P)[r:]])
    return K, lam


REJECTIONS = ("nonfinite", "not_pd", "ill_conditioned", "negative")
"""Why a layer's column system was not used: its statistics are not finite; K is not
positive definite (a rank-deficient adapter, e.g. two collinear columns); K is worse
conditioned than `max_condition`; or its solution has an entry <= 0 (no real scales)."""

NNLS_FLOOR = 0.01
"""column_fallback nnls: the non-negative optimum with v_i >= NNLS_FLOOR / ||column_i||^2,
so no new column is shorter than sqrt(NNLS_FLOOR * kappa) (a zero pair would never train
again; tools/studies/results/study_investigation.md measured 0.01 to cost almost nothing)."""


def _solve_psd_batch(
    M: torch.Tensor, rhs: torch.Tensor, ridge: float, max_condition: float
) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Positive solutions of a batch (B, n, n) of symmetric PSD systems M x = rhs: (x (B, n),
    trusted (B,), why each untrusted one was rejected (REJECTIONS), None where trusted)."""
    n = M.shape[-1]
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    finite = torch.isfinite(M).flatten(1).all(1) & torch.isfinite(rhs).all(1)
    M = torch.where(finite[:, None, None], M, eye)  # placeholders keep the batch solvable
    rhs = torch.where(finite[:, None], rhs, torch.ones_like(rhs))
    eig = torch.linalg.eigvalsh(M)
    pd = eig[:, 0] > 0
    conditioned = ~(eig[:, -1] > max_condition * eig[:, 0])
    trusted = finite & pd & conditioned
    shift = torch.stack([ridge * torch.trace(m) / n for m in M])
    system = torch.where(trusted[:, None, None], M + shift[:, None, None] * eye, eye)
    x = torch.linalg.solve(system, rhs)
    positive = torch.isfinite(x).all(1) & (x > 0).all(1)
    why = [
        None if t and p else "nonfinite" if not f else "not_pd" if not d else "ill_conditioned" if not c else "negative"
        for t, p, f, d, c in zip(
            trusted.tolist(), positive.tolist(), finite.tolist(), pd.tolist(), conditioned.tolist()
        )
    ]
    return x, trusted & positive, why


def nnls_gram(K: torch.Tensor, lam: torch.Tensor, lower: torch.Tensor, ridge: float = 1e-12) -> torch.Tensor:
    """argmin over v >= lower of v^T K v - 2 lam^T v (K symmetric PSD, float64): the
    Lawson-Hanson active set on the Gram form, in w = v - lower >= 0 (linear term
    lam - K lower). Each passive-set solve takes the same tiny relative ridge as the column
    solve, so a singular K still has an answer."""
    n = lam.numel()
    b = lam - K @ lower
    Kr = K + ridge * torch.trace(K) / n * torch.eye(n, dtype=K.dtype)
    x = torch.zeros_like(lam)
    passive = torch.zeros(n, dtype=torch.bool)
    blocked = torch.zeros(n, dtype=torch.bool)  # entered and left at once (degenerate): not again
    tol = 1e-12 * max(b.abs().max().item(), 1e-300) * n
    for _ in range(10 * n):
        w = b - Kr @ x
        candidates = (~passive) & (~blocked) & (w > tol)
        if not candidates.any():
            break
        j = int(torch.where(candidates, w, torch.full_like(w, -math.inf)).argmax())
        passive[j] = True
        for _ in range(10 * n):
            idx = passive.nonzero().flatten()
            trial = torch.zeros_like(x)
            trial[idx] = torch.linalg.solve(Kr[idx][:, idx], b[idx])
            if (trial[idx] > 0).all():
                x = trial
                break
            bad = idx[trial[idx] <= 0]
            steps = x[bad] / (x[bad] - trial[bad])
            k = int(steps.argmin())
            x = x + steps[k].clamp(0, 1) * (trial - x)
            leaving = passive & (x <= 0)
            leaving[bad[k]] = True  # the blocking index leaves even if round-off kept it > 0
            passive &= ~leaving
            x[~passive] = 0
        blocked = torch.zeros_like(blocked) if passive[j] else blocked | (torch.arange(n) == j)
    return x + lower


def _scalar_boundary(K2: torch.Tensor, lam2: torch.Tensor, skip: torch.Tensor) -> torch.Tensor | None:
    """scalar_fallback boundary: the better of (a, 0) and (0, b), each the 1-D optimum of
    f(v) = v^T K2 v - 2 lam2^T v on its axis, if it beats `skip` (alpha = beta = 1) on f."""

    def f(v: torch.Tensor) -> float:
        return (v @ K2 @ v - 2 * lam2 @ v).item()

    best, best_f = None, f(skip)
    for i in range(2):
        if K2[i, i] > 0 and lam2[i] > 0:
            v = torch.zeros(2, dtype=K2.dtype)
            v[i] = lam2[i] / K2[i, i]
            if f(v) < best_f:
                best, best_f = v, f(v)
    return best


def solve_scales_batch(
    P: torch.Tensor,
    Q: torch.Tensor,
    kappa: float | list[float],
    *,
    ridge: float = 1e-12,
    max_condition: float = 1e12,
    column_fallback: str = "scalar",
    scalar_fallback: str = "skip",
) -> list[Scales]:
    """Least-squares optimal column scaling (closed form) for B layers of the same rank, P and
    Q stacked (B, 2r, 2r) on the CPU: one batched eigendecomposition and solve for the column
    systems, one for the scalar fallbacks. `kappa`: one for all, or one per system.

    The unconstrained optimum of [alpha^2; beta^2] is kappa * K^{-1} lam; when it is positive it
    is also the constrained optimum (COLUMN). Where it is not: `column_fallback` scalar (one
    shared alpha and beta: the same least squares restricted to alpha_i = a, beta_j = b) or
    nnls (the non-negative optimum with a floor, NNLS_FLOOR, kept as COLUMN); where the scalar
    system fails too, `scalar_fallback` skip (alpha = beta = 1: SKIPPED) or boundary (its
    optimum with a = 0 or b = 0, if that beats skipping). Degenerate input (zeros, NaN, inf)
    is SKIPPED. Each result records why its column system was rejected (REJECTIONS)."""
    kappas = [kappa] * P.shape[0] if isinstance(kappa, (int, float)) else list(kappa)
    if len(kappas) != P.shape[0]:
        raise ValueError(f"{len(kappas)} kappas for {P.shape[0]} systems")
    for k in kappas:
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"kappa must be positive and finite, got {k}")
    r = P.shape[-1] // 2
    P, Q = P.to(torch.float64), Q.to(torch.float64)
    K = P * Q
    lam = torch.cat([torch.diagonal(Q, dim1=1, dim2=2)[:, :r], torch.diagonal(P, dim1=1, dim2=2)[:, r:]], dim=1)
    v, column, why = _solve_psd_batch(K, lam, ridge, max_condition)
    if column_fallback == "nnls":
        norms_sq = torch.cat([torch.diagonal(P, dim1=1, dim2=2)[:, :r], torch.diagonal(Q, dim1=1, dim2=2)[:, r:]], 1)
        v = v.clone()
        for i in [i for i, reason in enumerate(why) if reason in ("not_pd", "ill_conditioned", "negative")]:
            if (norms_sq[i] > 0).all():
                v[i] = nnls_gram(K[i], lam[i], NNLS_FLOOR / norms_sq[i])
                column[i] = bool(torch.isfinite(v[i]).all() and (v[i] > 0).all())
    blocks = [[K[:, :r, :r], K[:, :r, r:]], [K[:, r:, :r], K[:, r:, r:]]]
    K2 = torch.stack([torch.stack([b.sum(dim=(1, 2)) for b in row], dim=1) for row in blocks], dim=1)
    lam2 = torch.stack([lam[:, :r].sum(1), lam[:, r:].sum(1)], dim=1)
    ab, scalar, _ = _solve_psd_batch(K2, lam2, ridge, max_condition)
    k = torch.tensor(kappas, dtype=torch.float64)[:, None]
    if scalar_fallback == "boundary":
        ab = ab.clone()
        for i in range(len(kappas)):
            if not column[i] and not scalar[i] and torch.isfinite(K2[i]).all() and torch.isfinite(lam2[i]).all():
                found = _scalar_boundary(K2[i], lam2[i], 1.0 / k[i, 0].expand(2))
                if found is not None:
                    ab[i], scalar[i] = found, True
    # Every layer's scales in a few whole-batch operations (elementwise, so each row is
    # what its own system's formula gives): column, scalar or ones (skipped).
    ones = torch.ones(r, dtype=torch.float64)
    scalar_ab = (k * ab).sqrt()[:, :, None] * ones  # (B, 2, r)
    alpha = torch.where(column[:, None], (k * v[:, :r]).sqrt(), torch.where(scalar[:, None], scalar_ab[:, 0], ones))
    beta = torch.where(column[:, None], (k * v[:, r:]).sqrt(), torch.where(scalar[:, None], scalar_ab[:, 1], ones))
    kinds = [COLUMN if c else SCALAR if s else SKIPPED for c, s in zip(column.tolist(), scalar.tolist())]
    return [Scales(a, b, kind, reason) for a, b, kind, reason in zip(alpha, beta, kinds, why)]


def solve_scales(P: torch.Tensor, Q: torch.Tensor, kappa: float, **options) -> Scales:
    """solve_scales_batch for one layer."""
    return solve_scales_batch(P[None], Q[None], kappa, **options)[0]


def column_norm_products(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """(r,) ||a_i|| * ||b_i||: the column pair sizes that kappa='auto' averages."""
    r = P.shape[0] // 2
    return (torch.diagonal(P)[:r] * torch.diagonal(Q)[r:]).sqrt()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def merge_increment_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    scales: Scales,
) -> None:
    """weight += s * lora_B diag(1 - alpha*beta) lora_A, so the rewrite keeps the function.

    Must use the OLD factors (call before rescale_factors_). weight / lora_B: matching row
    blocks; lora_A: the FULL (r, n). At least float32 so a small increment is not rounded away
    before the single add.
    """
    if scales.kind == SKIPPED:
        return
    dtype = _compute_dtype(weight)
    coef = (1.0 - scales.alpha * scales.beta).to(device=lora_B.device, dtype=dtype)
    delta = (lora_B.to(dtype) * (scale * coef)) @ lora_A.to(dtype)
    weight.add_(delta.to(weight.device))


#: (tensor, factor, axis) of a rewrite's rescales: the tensor's rows (axis 0) or columns
#: (axis 1) multiplied by alpha, beta or a square of one (rescale_many_ applies them).
RescalePlan = list[tuple[torch.Tensor, str, int]]


def factor_plan(lora_A: torch.Tensor, lora_B: torch.Tensor) -> RescalePlan:
    """A -> A diag(alpha), B -> B diag(beta) in PyTorch layout: lora_B columns, lora_A rows."""
    return [(lora_B, "alpha", 1), (lora_A, "beta", 0)]


def gradient_plan(lora_A_grad: torch.Tensor, lora_B_grad: torch.Tensor) -> RescalePlan:
    """Map the current gradients to the new parametrisation: d/dA~ = G_A diag(beta) and
    d/dB~ = G_B diag(alpha), i.e. each factor's gradient takes the OTHER factor's scale."""
    return [(lora_B_grad, "beta", 1), (lora_A_grad, "alpha", 0)]


def adam_moment_plan(
    exp_avg_A: torch.Tensor, exp_avg_sq_A: torch.Tensor, exp_avg_B: torch.Tensor, exp_avg_sq_B: torch.Tensor
) -> RescalePlan:
    """Map AdamW state like the gradients (second moments by the squares), so the direction
    m / sqrt(v) is unchanged and no reset or re-warm-up is needed. A/B = lora_A/lora_B."""
    return [
        (exp_avg_A, "alpha", 0),
        (exp_avg_sq_A, "alpha_sq", 0),
        (exp_avg_B, "beta", 1),
        (exp_avg_sq_B, "beta_sq", 1),
    ]


def rescale_many_(plans: list[RescalePlan], scales: list[Scales]) -> None:
    """Every layer's rescales (plans[i] with scales[i]) in one foreach multiply. The factors
    travel as one float64 tensor, squared once and cast once for each (device, dtype) they
    meet (at least float32), so each tensor is multiplied by exactly what a factor cast for
    it alone would be: t * f.to(dtype), with f**2 taken in float64."""
    if not plans:
        return
    flat = torch.cat([t for s in scales for t in (s.alpha, s.beta)])
    both = torch.cat([flat, flat.square()])
    sizes = [s.alpha.numel() for s in scales for _ in (0, 1)] * 2
    pieces: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
    tensors, factors = [], []
    n = 2 * len(scales)
    for k, plan in enumerate(plans):
        at = {"alpha": 2 * k, "beta": 2 * k + 1, "alpha_sq": n + 2 * k, "beta_sq": n + 2 * k + 1}
        for t, which, axis in plan:
            key = (t.device, _compute_dtype(t))
            if key not in pieces:
                pieces[key] = both.to(device=key[0], dtype=key[1]).split(sizes)
            f = pieces[key][at[which]]
            tensors.append(t)
            factors.append(f[:, None] if axis == 0 else f[None, :])
    torch._foreach_mul_(tensors, factors)


def rescale_factors_(lora_A: torch.Tensor, lora_B: torch.Tensor, scales: Scales) -> None:
    """factor_plan of one layer, applied."""
    rescale_many_([factor_plan(lora_A, lora_B)], [scales])


def rescale_gradients_(lora_A_grad: torch.Tensor, lora_B_grad: torch.Tensor, scales: Scales) -> None:
    """gradient_plan of one layer, applied."""
    rescale_many_([gradient_plan(lora_A_grad, lora_B_grad)], [scales])


def rescale_adam_moments_(
    exp_avg_A: torch.Tensor,
    exp_avg_sq_A: torch.Tensor,
    exp_avg_B: torch.Tensor,
    exp_avg_sq_B: torch.Tensor,
    scales: Scales,
) -> None:
    """adam_moment_plan of one layer, applied."""
    rescale_many_([adam_moment_plan(exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B)], [scales])


def accumulator_grams(
    acc_U: torch.Tensor, acc_V: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial Grams [U, lora_B]^T [U, lora_B] and [V, lora_A^T]^T [V, lora_A^T], (R+r)^2
    float64, over this rank's rows of (acc_U, lora_B) and of (acc_V, lora_A^T). They depend
    only on tensors known before the solve, so they travel in the same all-reduce as the
    scaling statistics; the merge coefficients are applied afterwards (left_gram_for)."""
    left = torch.cat([acc_U, lora_B], dim=1).to(torch.float64)
    right = torch.cat([acc_V, lora_A.T], dim=1).to(torch.float64)
    return left.T @ left, right.T @ right


def left_gram_for(gram: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The Gram of [U, lora_B diag(coef)] from that of [U, lora_B]."""
    R = gram.shape[0] - coef.numel()
    d = torch.cat([torch.ones(R, dtype=gram.dtype, device=gram.device), coef.to(gram)])
    return gram * d[:, None] * d[None, :]


def increment_norm_sq(left_gram: torch.Tensor, right_gram: torch.Tensor, r: int) -> float:
    """||a b^T||_F^2 = sum((a^T a) * (b^T b)) for the last r columns of the stacked factors
    [U, a], [V, b] whose (reduced) Grams are given: the size of a merged increment."""
    return (left_gram[-r:, -r:] * right_gram[-r:, -r:]).sum().item()


def _range_from_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For X with X^T X = gram: (M, T) with X M orthonormal and X = (X M) T, dropping the
    directions X does not span (eigenvalues at float64 round-off of the largest)."""
    eigvals, eigvecs = torch.linalg.eigh(gram)
    keep = eigvals > eigvals[-1].clamp(min=0) * gram.shape[0] * 1e-14
    vals, vecs = eigvals[keep], eigvecs[:, keep]
    return vecs / vals.sqrt(), vals.sqrt()[:, None] * vecs.T


def accumulate_low_rank(
    U: torch.Tensor,
    V: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    left_gram: torch.Tensor | None = None,
    right_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-R approximation (Eckart-Young) of U V^T + a b^T, returned as (U', V') of the
    same shapes as (U, V) (R columns), plus the Frobenius norm of what was dropped.

    Works on row blocks: U, a may be any rows of the left factors and V, b any rows of the
    right ones, given the Grams of the WHOLE stacked factors [U, a] and [V, b] (summed over
    ranks); without them the blocks are taken to be whole. Orthonormal bases come from the
    Grams' eigendecompositions and the small (R+r) core is SVD'd, so the cost is
    O((m+n)(R+r)^2), no m x n matrix and no extra collective. The small decompositions run
    where the Grams are (the CPU, in training); float64; U' carries the singular values."""
    R = U.shape[1]
    left = torch.cat([U, a], dim=1).double()
    right = torch.cat([V, b], dim=1).double()
    if left_gram is None:
        left_gram = left.T @ left
    if right_gram is None:
        right_gram = right.T @ right
    to_left_basis, left_coords = _range_from_gram(left_gram.double())
    to_right_basis, right_coords = _range_from_gram(right_gram.double())
    new_U = torch.zeros_like(U, dtype=torch.float64)
    new_V = torch.zeros_like(V, dtype=torch.float64)
    if left_coords.numel() == 0 or right_coords.numel() == 0:
        return new_U.to(U.dtype), new_V.to(V.dtype), 0.0
    x, s, yh = torch.linalg.svd(left_coords @ right_coords.T, full_matrices=False)
    dropped = s[R:].square().sum().sqrt().item()
    k = min(R, s.numel())  # R may exceed the rank available: the extra columns stay zero
    new_U[:, :k] = left @ (to_left_basis @ (x[:, :k] * s[:k])).to(left.device)
    new_V[:, :k] = right @ (to_right_basis @ yh[:k].T).to(right.device)
    return new_U.to(U.dtype), new_V.to(V.dtype), dropped
