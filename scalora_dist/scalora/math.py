"""ScaLoRA column scaling: the tensor math of one layer (see design/method.md, sections 1-5).

Paper coordinates: A = sqrt(s) * lora_B (m, r), B = sqrt(s) * lora_A.T (n, r), W = W0 + A B^T,
G_A = G B = lora_B.grad / sqrt(s), G_B = G^T A = lora_A.grad.T / sqrt(s).

Every function works on shards: row blocks of W / lora_B (and its grad), column blocks of
lora_A (and its grad). The Gram statistics are sums over those rows/columns, so partial
statistics from the blocks add up (one all-reduce), and every rank then solves the same
tiny float64 system. No torch.distributed here: callers do the communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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
    r = lora_B.shape[1]
    root = math.sqrt(scale)
    left = torch.cat([lora_B, lora_B_grad], dim=1).to(torch.float64)  # (m_loc, 2r)
    right = torch.cat([lora_A_grad, lora_A], dim=0).to(torch.float64)  # (2r, n_loc)
    ones = torch.ones(r, dtype=torch.float64, device=left.device)
    d_p = torch.cat([ones * root, ones / root])  # [A, G_A] = [lora_B, lora_B_grad] diag(d_p)
    d_q = torch.cat([ones / root, ones * root])  # [G_B, B] = [lora_A_grad, lora_A]^T diag(d_q)
    P = (left.T @ left) * d_p[:, None] * d_p[None, :]
    Q = (right @ right.T) * d_q[:, None] * d_q[None, :]
    return P, Q


def column_scaling_system(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K = P * Q (the Gram of the rank-one matrices a_i a_i^T G and G b_j b_j^T) and their
    inner products with G, lam = [colnorm2(G_B); colnorm2(G_A)]."""
    r = P.shape[0] // 2
    K = P * Q
    lam = torch.cat([torch.diagonal(Q)[:r], torch.diagonal(P)[r:]])
    return K, lam


def _solve_psd(
    M: torch.Tensor, rhs: torch.Tensor, ridge: float, max_condition: float
) -> Optional[torch.Tensor]:
    """Positive solution of the symmetric PSD system M x = rhs, or None if there is none we trust."""
    if not (torch.isfinite(M).all() and torch.isfinite(rhs).all()):
        return None
    try:
        eig = torch.linalg.eigvalsh(M)
        if not eig[0] > 0 or eig[-1] > max_condition * eig[0]:
            return None
        shift = ridge * torch.trace(M) / M.shape[0]
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        x = torch.linalg.solve(M + shift * eye, rhs)
    except RuntimeError:  # LinAlgError is a RuntimeError; degenerate input must not raise
        return None
    if not (torch.isfinite(x).all() and (x > 0).all()):
        return None
    return x


def solve_scales(
    P: torch.Tensor,
    Q: torch.Tensor,
    kappa: float,
    *,
    ridge: float = 1e-12,
    max_condition: float = 1e12,
) -> Scales:
    """Least-squares optimal column scaling (closed form), else one shared scalar pair, else skip.

    The unconstrained optimum of [alpha^2; beta^2] is kappa * K^{-1} lam; when it is positive it
    is also the constrained optimum. Degenerate input (zeros, NaN, inf) yields SKIPPED.
    """
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be positive and finite, got {kappa}")
    r = P.shape[0] // 2
    P = P.to(torch.float64)
    Q = Q.to(torch.float64)
    K, lam = column_scaling_system(P, Q)
    v = _solve_psd(K, lam, ridge, max_condition)
    if v is not None:
        return Scales((kappa * v[:r]).sqrt(), (kappa * v[r:]).sqrt(), COLUMN)
    # Scalar fallback: the same least squares restricted to alpha_i = a, beta_j = b.
    K2 = torch.stack(
        [
            torch.stack([K[:r, :r].sum(), K[:r, r:].sum()]),
            torch.stack([K[r:, :r].sum(), K[r:, r:].sum()]),
        ]
    )
    lam2 = torch.stack([lam[:r].sum(), lam[r:].sum()])
    ab = _solve_psd(K2, lam2, ridge, max_condition)
    ones = torch.ones(r, dtype=torch.float64, device=P.device)
    if ab is not None:
        return Scales((kappa * ab[0]).sqrt() * ones, (kappa * ab[1]).sqrt() * ones, SCALAR)
    return Scales(ones, ones.clone(), SKIPPED)


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


def _scale_columns_(t: torch.Tensor, f: torch.Tensor) -> None:
    t.mul_(f.to(device=t.device, dtype=_compute_dtype(t))[None, :])


def _scale_rows_(t: torch.Tensor, f: torch.Tensor) -> None:
    t.mul_(f.to(device=t.device, dtype=_compute_dtype(t))[:, None])


def rescale_factors_(lora_A: torch.Tensor, lora_B: torch.Tensor, scales: Scales) -> None:
    """A -> A diag(alpha), B -> B diag(beta) in PyTorch layout: lora_B columns, lora_A rows."""
    _scale_columns_(lora_B, scales.alpha)
    _scale_rows_(lora_A, scales.beta)


def rescale_gradients_(lora_A_grad: torch.Tensor, lora_B_grad: torch.Tensor, scales: Scales) -> None:
    """Map the current gradients to the new parametrisation: d/dA~ = G_A diag(beta) and
    d/dB~ = G_B diag(alpha), i.e. each factor's gradient takes the OTHER factor's scale."""
    _scale_columns_(lora_B_grad, scales.beta)
    _scale_rows_(lora_A_grad, scales.alpha)


def rescale_adam_moments_(
    exp_avg_A: torch.Tensor,
    exp_avg_sq_A: torch.Tensor,
    exp_avg_B: torch.Tensor,
    exp_avg_sq_B: torch.Tensor,
    scales: Scales,
) -> None:
    """Map AdamW state like the gradients (second moments by the squares), so the direction
    m / sqrt(v) is unchanged and no reset or re-warm-up is needed. A/B = lora_A/lora_B."""
    _scale_rows_(exp_avg_A, scales.alpha)
    _scale_rows_(exp_avg_sq_A, scales.alpha.square())
    _scale_columns_(exp_avg_B, scales.beta)
    _scale_columns_(exp_avg_sq_B, scales.beta.square())


def increment_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, scales: Scales
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge increment s * lora_B diag(1 - alpha*beta) lora_A as a product a @ b.T with
    a (m, r) and b (n, r), float32: what a base that cannot absorb it (4-bit codes) hands
    to its accumulator instead."""
    coef = (1.0 - scales.alpha * scales.beta).to(device=lora_B.device, dtype=torch.float32)
    return lora_B.float() * (scale * coef), lora_A.float().T


def accumulate_low_rank(
    U: torch.Tensor, V: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-R approximation (Eckart-Young) of U V^T + a b^T, returned as (U', V') of the
    same shapes as (U, V) (R columns), plus the Frobenius norm of what was dropped.

    QR of the stacked factors and an SVD of the small (R+r) core: O((m+n)(R+r)^2), never an
    m x n matrix. Computed in float64; U' carries the singular values."""
    R = U.shape[1]
    left = torch.cat([U, a], dim=1).double()
    right = torch.cat([V, b], dim=1).double()
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right)
    x, s, yh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    dropped = s[R:].square().sum().sqrt().item()
    k = min(R, s.numel())  # R may exceed min(m, n): the extra columns stay zero
    new_U = torch.zeros_like(U, dtype=torch.float64)
    new_V = torch.zeros_like(V, dtype=torch.float64)
    new_U[:, :k] = (q_left @ x[:, :k]) * s[:k]
    new_V[:, :k] = q_right @ yh[:k].T
    return new_U.to(U.dtype), new_V.to(V.dtype), dropped
