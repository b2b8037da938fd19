"""ScaLoRA math against dense float64 references (docs/method.md, sections 1-5).

Brute-force references build G explicitly and solve the least-squares problem over the rank-one
matrices U_i = a_i (G^T a_i)^T and V_j = (G b_j) b_j^T with torch.linalg.lstsq; the code under
test never forms G.
"""

import copy
import math

import pytest
import torch

from scalora_dist.scalora.scaling import (
    COLUMN,
    SCALAR,
    SKIPPED,
    Scales,
    column_norm_products,
    column_scaling_system,
    lora_grams,
    merge_increment_,
    rescale_adam_moments_,
    rescale_factors_,
    rescale_gradients_,
    solve_scales,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_layer(m, n, r, seed, dtype=F64):
    """Random W (m, n), lora_A (r, n), lora_B (m, r), explicit G = dL/dW (m, n)."""
    g = gen(seed)
    W = torch.randn(m, n, generator=g, dtype=F64).to(dtype)
    lora_A = torch.randn(r, n, generator=g, dtype=F64).to(dtype)
    lora_B = torch.randn(m, r, generator=g, dtype=F64).to(dtype)
    G = torch.randn(m, n, generator=g, dtype=F64).to(dtype)
    return W, lora_A, lora_B, G


def lora_grads(G, lora_A, lora_B, s):
    """Autograd grads of the LoRA factors for a loss whose dL/dW_eff is exactly G."""
    A = lora_A.detach().clone().requires_grad_()
    B = lora_B.detach().clone().requires_grad_()
    (G * (s * B @ A)).sum().backward()
    return A.grad, B.grad


def paper(G, lora_A, lora_B, s):
    """Paper coordinates A, B, G_A, G_B computed densely from explicit G."""
    A = math.sqrt(s) * lora_B
    B = math.sqrt(s) * lora_A.T
    return A, B, G @ B, G.T @ A


def dense_grams(A, B, G_A, G_B):
    L = torch.cat([A, G_A], 1)
    R = torch.cat([G_B, B], 1)
    return L.T @ L, R.T @ R


def grams_from_G(G, lora_A, lora_B, s):
    return dense_grams(*paper(G, lora_A, lora_B, s))


def design(G, A, B):
    """Columns vec(U_i), i < r, then vec(V_j): the brute-force least-squares design matrix."""
    U = [torch.outer(A[:, i], G.T @ A[:, i]).flatten() for i in range(A.shape[1])]
    V = [torch.outer(G @ B[:, j], B[:, j]).flatten() for j in range(B.shape[1])]
    return torch.stack(U + V, 1)


def lstsq(D, y):
    return torch.linalg.lstsq(D, y[:, None], driver="gelsd").solution[:, 0]


def objective(D, x, y):
    return ((D @ x - y) ** 2).sum()


def brute_column(G, A, B, kappa):
    return lstsq(design(G, A, B), kappa * G.flatten())


def brute_scalar(G, A, B, kappa):
    D = design(G, A, B)
    r = A.shape[1]
    D2 = torch.stack([D[:, :r].sum(1), D[:, r:].sum(1)], 1)
    return lstsq(D2, kappa * G.flatten())


def squares(sc):
    return torch.cat([sc.alpha**2, sc.beta**2])


# 1. closed form == brute force -------------------------------------------------------------


@pytest.mark.parametrize("m,n,r,seed", [(12, 10, 3, 0), (12, 10, 3, 1), (9, 14, 1, 2), (20, 16, 5, 3)])
def test_column_closed_form_equals_brute_force(m, n, r, seed):
    s, kappa = 0.5, 0.7
    _, lora_A, lora_B, G = make_layer(m, n, r, seed)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    sc = solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), kappa)
    assert sc.kind == COLUMN
    assert sc.alpha.dtype == F64 and sc.alpha.shape == (r,) and sc.beta.shape == (r,)

    A, B, _, _ = paper(G, lora_A, lora_B, s)
    x_ref = brute_column(G, A, B, kappa)
    torch.testing.assert_close(squares(sc), x_ref, rtol=1e-6, atol=0)

    D, y = design(G, A, B), kappa * G.flatten()
    x = squares(sc)
    g = gen(100 + seed)
    for _ in range(20):
        x_pert = x * (1 + 1e-3 * torch.randn(2 * r, generator=g, dtype=F64))
        assert objective(D, x, y) <= objective(D, x_pert, y)


# 2. scalar fallback and skip ------------------------------------------------------------------


def test_negative_column_optimum_falls_back_to_scalar():
    s, kappa, m, n, r = 2.0, 1.3, 8, 6, 4
    for seed in range(200):
        _, lora_A, lora_B, G = make_layer(m, n, r, seed)
        A, B, _, _ = paper(G, lora_A, lora_B, s)
        if (brute_column(G, A, B, kappa) < 0).any() and (brute_scalar(G, A, B, kappa) > 0).all():
            break
    else:
        pytest.fail("no seed with a negative column optimum and a positive scalar one")
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    sc = solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), kappa)
    assert sc.kind == SCALAR
    ab = brute_scalar(G, A, B, kappa)
    torch.testing.assert_close(sc.alpha, ab[0].sqrt().expand(r), rtol=1e-6, atol=0)
    torch.testing.assert_close(sc.beta, ab[1].sqrt().expand(r), rtol=1e-6, atol=0)


def test_ill_conditioned_column_system_falls_back():
    # Duplicated column pairs make U_1 = U_2 and V_1 = V_2: K is singular although the
    # ridge-regularised solution would be positive. The condition guard must reject it; the
    # scalar system is then regular and equals the brute-force scalar least squares.
    s, kappa, r = 0.5, 1.1, 2
    _, lora_A, lora_B, G = make_layer(10, 8, r, 3)
    lora_A[1], lora_B[:, 1] = lora_A[0], lora_B[:, 0]
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    sc = solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), kappa)
    assert sc.kind == SCALAR
    A, B, _, _ = paper(G, lora_A, lora_B, s)
    ab = brute_scalar(G, A, B, kappa)
    torch.testing.assert_close(sc.alpha, ab[0].sqrt().expand(r), rtol=1e-6, atol=0)
    torch.testing.assert_close(sc.beta, ab[1].sqrt().expand(r), rtol=1e-6, atol=0)


def test_max_condition_is_honoured_for_both_systems():
    s, r = 0.5, 3
    _, lora_A, lora_B, G = make_layer(12, 10, r, 0)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    P, Q = lora_grams(lora_A, gA, lora_B, gB, s)
    K, _ = column_scaling_system(P, Q)
    cond = torch.linalg.cond(K).item()
    assert solve_scales(P, Q, 1.0, max_condition=2 * cond).kind == COLUMN
    assert solve_scales(P, Q, 1.0, max_condition=cond / 2).kind in (SCALAR, SKIPPED)
    assert_skipped(solve_scales(P, Q, 1.0, max_condition=0.5), r)  # every cond is >= 1


def assert_skipped(sc, r):
    assert sc.kind == SKIPPED
    assert torch.equal(sc.alpha, torch.ones(r, dtype=F64))
    assert torch.equal(sc.beta, torch.ones(r, dtype=F64))


def test_negative_scalar_optimum_is_skipped():
    # G = I, B with singular values (2, 1), both columns of A close to B's top direction:
    # then ||A||^2 ||B^T B||^2 < ||B||^2 ||A^T B||^2, which makes the scalar a negative.
    # Random rotations make it generic; well-conditioned systems, so the sign alone decides.
    e = torch.eye(4, dtype=F64)
    A0 = torch.stack([e[0] + 0.3 * e[2], e[0] - 0.3 * e[2]], 1)
    B0 = torch.stack([2 * e[0], e[1]], 1)
    g = gen(7)
    U = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    G, A, B = U @ V.T, U @ A0, V @ B0
    P, Q = dense_grams(A, B, G @ B, G.T @ A)
    assert (brute_column(G, A, B, 1.0) < 0).any()
    assert (brute_scalar(G, A, B, 1.0) < 0).any()
    K, _ = column_scaling_system(P, Q)
    assert torch.linalg.cond(K) < 1e4
    assert_skipped(solve_scales(P, Q, 1.0), 2)


def test_zero_lora_B_warmup_is_skipped():
    s, r = 0.5, 4
    _, lora_A, lora_B, G = make_layer(10, 8, r, 0)
    lora_B = torch.zeros_like(lora_B)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    assert gB.abs().sum() > 0  # the layer does learn; only K is singular
    assert_skipped(solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), 1.0), r)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_are_skipped(bad):
    s, r = 0.5, 3
    _, lora_A, lora_B, G = make_layer(10, 8, r, 0)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    gB[2, 1] = bad
    assert_skipped(solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), 1.0), r)


def test_all_zero_statistics_are_skipped():
    z = torch.zeros(6, 6, dtype=F64)
    assert_skipped(solve_scales(z, z, 1.0), 3)


# 3. sharded statistics and sqrt(s) bookkeeping --------------------------------------------------


def test_lora_grams_match_dense_paper_coordinates_and_add_over_shards():
    s, m, n, r = 0.37, 13, 11, 4
    _, lora_A, lora_B, G = make_layer(m, n, r, 5)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    P, Q = lora_grams(lora_A, gA, lora_B, gB, s)
    assert P.dtype == F64 and P.shape == (2 * r, 2 * r) and Q.shape == (2 * r, 2 * r)
    P_ref, Q_ref = grams_from_G(G, lora_A, lora_B, s)
    torch.testing.assert_close(P, P_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Q, Q_ref, rtol=1e-12, atol=1e-12)

    # three "ranks": uneven row blocks of lora_B, column blocks of lora_A (the last one empty)
    rows = [(0, 2), (2, 8), (8, 13)]
    cols = [(0, 4), (4, 11), (11, 11)]
    P_sum, Q_sum = torch.zeros_like(P), torch.zeros_like(Q)
    for (r0, r1), (c0, c1) in zip(rows, cols):
        p, q = lora_grams(lora_A[:, c0:c1], gA[:, c0:c1], lora_B[r0:r1], gB[r0:r1], s)
        P_sum += p
        Q_sum += q
    torch.testing.assert_close(P_sum, P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Q_sum, Q, rtol=1e-12, atol=1e-12)


def test_lora_grams_accepts_low_precision_inputs():
    _, lora_A, lora_B, G = make_layer(10, 8, 3, 0)
    gA, gB = lora_grads(G, lora_A, lora_B, 0.5)
    bf = [t.to(torch.bfloat16) for t in (lora_A, gA, lora_B, gB)]
    P, Q = lora_grams(*bf, 0.5)
    P_ref, Q_ref = lora_grams(*[t.to(F64) for t in bf], 0.5)
    assert P.dtype == F64
    assert torch.equal(P, P_ref) and torch.equal(Q, Q_ref)


# 4. the rewrite keeps the function ---------------------------------------------------------------


def solved_scales(lora_A, lora_B, G, s, kappa_mult=1.0):
    lora_A, lora_B = lora_A.to(F64), lora_B.to(F64)
    gA, gB = lora_grads(G.to(F64), lora_A, lora_B, s)
    P, Q = lora_grams(lora_A, gA, lora_B, gB, s)
    kappa = kappa_mult * column_norm_products(P, Q).mean().item()
    return solve_scales(P, Q, kappa)


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_merge_then_rescale_keeps_effective_weight(dtype, rtol):
    s, m, n, r = 0.25, 24, 20, 4
    W, lora_A, lora_B, G = make_layer(m, n, r, 11, dtype)
    sc = solved_scales(lora_A, lora_B, G, s, kappa_mult=0.5)
    assert sc.kind == COLUMN
    assert (sc.alpha * sc.beta - 1).abs().max() > 0.1  # a real merge, not a no-op
    before = W.to(F64) + s * lora_B.to(F64) @ lora_A.to(F64)
    A_old, B_old = lora_A.clone(), lora_B.clone()
    merge_increment_(W, lora_A, lora_B, s, sc)
    rescale_factors_(lora_A, lora_B, sc)
    assert W.dtype == lora_A.dtype == lora_B.dtype == dtype
    after = W.to(F64) + s * lora_B.to(F64) @ lora_A.to(F64)
    assert (after - before).norm() <= rtol * before.norm()
    torch.testing.assert_close(lora_B, B_old * sc.alpha.to(dtype))
    torch.testing.assert_close(lora_A, A_old * sc.beta.to(dtype)[:, None])


def test_merge_on_row_shards_equals_dense_merge():
    s, m, n, r = 0.25, 13, 9, 3
    W, lora_A, lora_B, _ = make_layer(m, n, r, 3)
    g = gen(4)
    sc = Scales(torch.rand(r, generator=g, dtype=F64) + 0.5, torch.rand(r, generator=g, dtype=F64) + 0.5, COLUMN)
    W_dense = W.clone()
    merge_increment_(W_dense, lora_A, lora_B, s, sc)
    torch.testing.assert_close(W_dense - W, s * lora_B @ torch.diag(1 - sc.alpha * sc.beta) @ lora_A)
    W_sharded = W.clone()
    for r0, r1 in [(0, 2), (2, 8), (8, 13)]:
        merge_increment_(W_sharded[r0:r1], lora_A, lora_B[r0:r1], s, sc)  # views: in place
    torch.testing.assert_close(W_sharded, W_dense, rtol=1e-14, atol=1e-14)


def test_skipped_rewrite_is_identity():
    W, lora_A, lora_B, _ = make_layer(6, 5, 2, 0)
    ones = torch.ones(2, dtype=F64)
    sc = Scales(ones, ones, SKIPPED)
    W0, A0, B0 = W.clone(), lora_A.clone(), lora_B.clone()
    merge_increment_(W, lora_A, lora_B, 0.5, sc)
    rescale_factors_(lora_A, lora_B, sc)
    assert torch.equal(W, W0) and torch.equal(lora_A, A0) and torch.equal(lora_B, B0)


def test_merge_into_bf16_base_keeps_dtype_and_adds_once():
    s, m, n, r = 0.5, 8, 6, 2
    W, lora_A, lora_B, _ = make_layer(m, n, r, 1)
    W_bf = W.to(torch.bfloat16)
    sc = Scales(torch.full((r,), 0.5, dtype=F64), torch.full((r,), 0.5, dtype=F64), SCALAR)
    expected = (W_bf.float() + s * 0.75 * lora_B.float() @ lora_A.float()).to(torch.bfloat16)
    merge_increment_(W_bf, lora_A.to(torch.bfloat16), lora_B.to(torch.bfloat16), s, sc)
    assert W_bf.dtype == torch.bfloat16
    torch.testing.assert_close(W_bf, expected, rtol=1e-2, atol=1e-2)


# 5. gradients of the rescaled factors -------------------------------------------------------------


def test_rescaled_gradients_equal_autograd_on_rescaled_factors():
    s, m, n, r, batch = 0.3, 10, 7, 3, 5
    W, lora_A, lora_B, _ = make_layer(m, n, r, 21)
    x = torch.randn(batch, n, generator=gen(22), dtype=F64)

    def loss_and_grads(W, lora_A, lora_B):
        leaves = [t.detach().clone().requires_grad_() for t in (W, lora_A, lora_B)]
        Wl, Al, Bl = leaves
        loss = torch.sin(x @ (Wl + s * Bl @ Al).T).sum()
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    loss0, (gW, gA, gB) = loss_and_grads(W, lora_A, lora_B)
    P, Q = lora_grams(lora_A, gA, lora_B, gB, s)
    sc = solve_scales(P, Q, 2.0 * column_norm_products(P, Q).mean().item())
    assert sc.kind in (COLUMN, SCALAR)

    merge_increment_(W, lora_A, lora_B, s, sc)
    rescale_factors_(lora_A, lora_B, sc)
    loss1, (gW1, gA1, gB1) = loss_and_grads(W, lora_A, lora_B)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gW1, gW, rtol=1e-10, atol=1e-12)

    rescale_gradients_(gA, gB, sc)
    torch.testing.assert_close(gA, gA1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gB, gB1, rtol=1e-10, atol=1e-12)


# 6. AdamW moments ---------------------------------------------------------------------------------


def test_adam_direction_and_next_step_unchanged_by_rescaling():
    m, n, r, lr, eps, betas = 9, 7, 3, 1e-2, 1e-14, (0.9, 0.999)
    _, lora_A, lora_B, _ = make_layer(m, n, r, 31)
    g = gen(32)
    A = lora_A.clone().requires_grad_()
    B = lora_B.clone().requires_grad_()
    opt = torch.optim.AdamW([A, B], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    for _ in range(3):
        A.grad = torch.randn(r, n, generator=g, dtype=F64)
        B.grad = torch.randn(m, r, generator=g, dtype=F64)
        opt.step()
    sc = Scales(
        torch.rand(r, generator=g, dtype=F64) * 1.5 + 0.5, torch.rand(r, generator=g, dtype=F64) * 1.5 + 0.5, COLUMN
    )

    # a copy of parameters and optimizer, rewritten
    A2 = A.detach().clone().requires_grad_()
    B2 = B.detach().clone().requires_grad_()
    opt2 = torch.optim.AdamW([A2, B2], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sA, sB = opt2.state[A2], opt2.state[B2]
    direction = [st["exp_avg"] / st["exp_avg_sq"].sqrt() for st in (sA, sB)]
    with torch.no_grad():
        rescale_factors_(A2, B2, sc)
    rescale_adam_moments_(sA["exp_avg"], sA["exp_avg_sq"], sB["exp_avg"], sB["exp_avg_sq"], sc)
    for st, d in zip((sA, sB), direction):
        torch.testing.assert_close(st["exp_avg"] / st["exp_avg_sq"].sqrt(), d, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sA["exp_avg"], opt.state[A]["exp_avg"])  # moments did change

    # the 4th step: the rescaled run moves every element by the same amount as the original
    A.grad = torch.randn(r, n, generator=g, dtype=F64)
    B.grad = torch.randn(m, r, generator=g, dtype=F64)
    A2.grad, B2.grad = A.grad.clone(), B.grad.clone()
    rescale_gradients_(A2.grad, B2.grad, sc)
    before = [t.detach().clone() for t in (A, B, A2, B2)]
    opt.step()
    opt2.step()
    dA, dB, dA2, dB2 = [t.detach() - b for t, b in zip((A, B, A2, B2), before)]
    torch.testing.assert_close(dA2, dA, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dB2, dB, rtol=1e-10, atol=1e-14)
    # and that common step is -lr * mhat / (sqrt(vhat) + eps) from the original moments
    for d, st in ((dA2, opt.state[A]), (dB2, opt.state[B])):
        mhat = st["exp_avg"] / (1 - betas[0] ** 4)
        vhat = st["exp_avg_sq"] / (1 - betas[1] ** 4)
        torch.testing.assert_close(d, -lr * mhat / (vhat.sqrt() + eps), rtol=1e-10, atol=1e-14)


# 7. invariances ----------------------------------------------------------------------------------


def test_scales_invariant_to_gradient_scale_and_grow_with_sqrt_kappa():
    s, kappa, r = 0.5, 0.8, 3
    _, lora_A, lora_B, G = make_layer(12, 10, r, 0)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    ref = solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), kappa)
    assert ref.kind == COLUMN
    for c in (1e-4, 3.0, 1e5):
        sc = solve_scales(*lora_grams(lora_A, c * gA, lora_B, c * gB, s), kappa)
        assert sc.kind == COLUMN
        torch.testing.assert_close(squares(sc), squares(ref), rtol=1e-9, atol=0)
    sc4 = solve_scales(*lora_grams(lora_A, gA, lora_B, gB, s), 4 * kappa)
    torch.testing.assert_close(sc4.alpha, 2 * ref.alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc4.beta, 2 * ref.beta, rtol=1e-12, atol=0)


# 8. column norm products --------------------------------------------------------------------------


def test_column_norm_products_in_paper_coordinates():
    s, r = 0.2, 4
    _, lora_A, lora_B, G = make_layer(11, 9, r, 8)
    gA, gB = lora_grads(G, lora_A, lora_B, s)
    got = column_norm_products(*lora_grams(lora_A, gA, lora_B, gB, s))
    expected = s * lora_B.norm(dim=0) * lora_A.norm(dim=1)  # ||sqrt(s) b_col|| ||sqrt(s) a_row||
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


# 9. near-diagonal limit (method.md §3) --------------------------------------------------------------


def test_near_diagonal_limit_pulls_column_norms_to_sqrt_kappa():
    # Orthogonal columns make A^T A and B^T B diagonal; the remaining coupling of U_i and V_j
    # through (a_i^T G b_j)^2 is O(r / min(m, n)) ~ 0.005 here for a random G (max 0.012 over
    # 20 seeds), so alpha_i^2 ||a_i||^2 = kappa within 5%. Distinct column norms make a mix-up
    # of columns or factors fail by far more than that.
    m, n, r, kappa = 1024, 768, 4, 1.7
    g = gen(41)
    G = torch.randn(m, n, generator=g, dtype=F64)
    A = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0] * torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64)
    B = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0] * torch.tensor([3.0, 0.7, 1.5, 0.25], dtype=F64)
    sc = solve_scales(*dense_grams(A, B, G @ B, G.T @ A), kappa)
    assert sc.kind == COLUMN
    torch.testing.assert_close(sc.alpha**2, kappa / A.norm(dim=0) ** 2, rtol=0.05, atol=0)
    torch.testing.assert_close(sc.beta**2, kappa / B.norm(dim=0) ** 2, rtol=0.05, atol=0)


def test_non_positive_kappa_is_a_caller_error():
    z = torch.eye(4, dtype=F64)
    for kappa in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            solve_scales(z, z, kappa)


from scalora_dist.scalora import scaling as sm  # noqa: E402


def test_batched_solve_equals_the_per_layer_solve_bit_for_bit():
    """solve_scales_batch (all layers of a rank in one eigendecomposition and solve) against
    solve_scales one layer at a time, on random layers that take all three outcomes."""
    Ps, Qs = [], []
    for seed in range(80):  # small layers: many negative column optima (scalar or skipped)
        _, lora_A, lora_B, G = make_layer(8, 6, 4, seed)
        gA, gB = lora_grads(G, lora_A, lora_B, 2.0)
        if seed % 9 == 4:
            lora_B = torch.zeros_like(lora_B)
        if seed % 13 == 6:
            gB[0, 0] = float("inf")
        P, Q = lora_grams(lora_A, gA, lora_B, gB, 2.0)
        Ps.append(P)
        Qs.append(Q)
    batch = sm.solve_scales_batch(torch.stack(Ps), torch.stack(Qs), 1.3)
    single = [sm.solve_scales(P, Q, 1.3) for P, Q in zip(Ps, Qs)]
    assert {s.kind for s in single} == {sm.COLUMN, sm.SCALAR, sm.SKIPPED}
    for b, s in zip(batch, single):
        assert b.kind == s.kind and torch.equal(b.alpha, s.alpha) and torch.equal(b.beta, s.beta)
    # one kappa per layer (kappa_scope: layer): each system takes its own
    kappas = [0.2 + 0.05 * i for i in range(len(Ps))]
    batch = sm.solve_scales_batch(torch.stack(Ps), torch.stack(Qs), kappas)
    for b, P, Q, k in zip(batch, Ps, Qs, kappas):
        s = sm.solve_scales(P, Q, k)
        assert b.kind == s.kind and torch.equal(b.alpha, s.alpha) and torch.equal(b.beta, s.beta)
    with pytest.raises(ValueError, match="3 kappas for 80 systems"):
        sm.solve_scales_batch(torch.stack(Ps), torch.stack(Qs), kappas[:3])


def test_batched_refactor_of_a_real_model_equals_the_layer_by_layer_rewrite(tiny_llama):
    """ScaLoRA.refactor (statistics in one buffer, systems solved together, one copy of the
    scales) leaves exactly the weights, factors, gradients and moments that solving and
    rewriting one layer at a time leaves."""
    import copy

    from transformers import AutoModelForCausalLM

    from scalora_dist.config import AdapterConfig, ScaLoRAConfig
    from scalora_dist.model.lora import inject_adapters, lora_layers
    from scalora_dist.scalora.refactor import ScaLoRA

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    inject_adapters(model, AdapterConfig(method="scalora", rank=4, alpha=8.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    twin_opt.load_state_dict(opt.state_dict())
    for m in (model, twin):  # the same gradients on both
        m(input_ids=ids, labels=ids).loss.backward()
    report = ScaLoRA(ScaLoRAConfig(kappa=0.5), list(lora_layers(model).values()), opt).refactor()
    by_layer = ScaLoRA(ScaLoRAConfig(kappa=0.5), list(lora_layers(twin).values()), twin_opt)
    kinds = {sm.COLUMN: 0, sm.SCALAR: 0, sm.SKIPPED: 0}
    for layer in by_layer.layers:
        P, Q = by_layer._layer_statistics(layer)
        scales = sm.solve_scales(P, Q, 0.5)
        kinds[scales.kind] += 1
        if scales.kind != sm.SKIPPED:
            by_layer._rewrite(layer, scales)
    assert (report.column, report.scalar, report.skipped) == (kinds[sm.COLUMN], kinds[sm.SCALAR], kinds[sm.SKIPPED])
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name
    for pa, pb in zip(opt.param_groups[0]["params"], twin_opt.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[pa][key], twin_opt.state[pb][key])


def _negative_column_layer(seed_range=range(400), scalar_ok=True):
    """A small random layer whose column optimum has a negative entry (and whose scalar
    optimum is positive, or not, as asked)."""
    s, kappa = 2.0, 1.3
    for seed in seed_range:
        _, lora_A, lora_B, G = make_layer(8, 6, 4, seed)
        A, B, _, _ = paper(G, lora_A, lora_B, s)
        if (brute_column(G, A, B, kappa) < 0).any() and ((brute_scalar(G, A, B, kappa) > 0).all() == scalar_ok):
            gA, gB = lora_grads(G, lora_A, lora_B, s)
            return G, A, B, lora_grams(lora_A, gA, lora_B, gB, s), kappa
    pytest.fail("no such seed")


def test_rejections_name_why_the_column_system_was_not_used():
    *_, grams, kappa = _negative_column_layer()
    assert solve_scales(*grams, kappa).rejected == "negative"
    _, lora_A, lora_B, G = make_layer(10, 8, 2, 3)
    lora_A[1], lora_B[:, 1] = lora_A[0], lora_B[:, 0]  # two equal column pairs: K singular
    gA, gB = lora_grads(G, lora_A, lora_B, 0.5)
    assert solve_scales(*lora_grams(lora_A, gA, lora_B, gB, 0.5), 1.1).rejected in ("not_pd", "ill_conditioned")
    gA[0, 0] = float("nan")
    assert solve_scales(*lora_grams(lora_A, gA, lora_B, gB, 0.5), 1.1).rejected == "nonfinite"
    _, lora_A, lora_B, G = make_layer(40, 30, 2, 1)
    gA, gB = lora_grads(G, lora_A, lora_B, 0.5)
    assert solve_scales(*lora_grams(lora_A, gA, lora_B, gB, 0.5), 1.1).rejected is None


def test_nnls_fallback_is_the_floored_non_negative_least_squares_optimum():
    """column_fallback nnls against scipy's bounded least squares on the dense float64 design:
    min ||D x - kappa vec(G)|| over x = [alpha^2; beta^2] >= kappa * floor / ||column||^2."""
    lsq_linear = pytest.importorskip("scipy.optimize").lsq_linear
    G, A, B, grams, kappa = _negative_column_layer()
    sc = solve_scales(*grams, kappa, column_fallback="nnls")
    assert sc.kind == COLUMN and sc.rejected == "negative"
    norms_sq = torch.cat([A.norm(dim=0) ** 2, B.norm(dim=0) ** 2])
    lower = kappa * sm.NNLS_FLOOR / norms_sq
    D, y = design(G, A, B), kappa * G.flatten()
    ref = torch.from_numpy(lsq_linear(D.numpy(), y.numpy(), bounds=(lower.numpy(), math.inf), tol=1e-14).x)
    assert (squares(sc) >= lower * (1 - 1e-9)).all()
    assert objective(D, squares(sc), y) <= objective(D, ref, y) * (1 + 1e-9)
    torch.testing.assert_close(squares(sc), ref, rtol=1e-5, atol=1e-9)


def test_boundary_scalar_fallback_takes_the_better_axis_optimum_over_skipping():
    G, A, B, grams, kappa = _negative_column_layer(range(2000), scalar_ok=False)
    assert solve_scales(*grams, kappa).kind == SKIPPED
    sc = solve_scales(*grams, kappa, scalar_fallback="boundary")
    D, y = design(G, A, B), kappa * G.flatten()
    r = A.shape[1]
    D2 = torch.stack([D[:, :r].sum(1), D[:, r:].sum(1)], 1)
    candidates = [torch.tensor([1.0, 1.0])]  # skipping: alpha = beta = 1
    for i in range(2):
        x = torch.zeros(2, dtype=F64)
        x[i] = (D2[:, i] @ y) / (D2[:, i] @ D2[:, i])
        if x[i] > 0:
            candidates.append(x)
    best = min(candidates, key=lambda x: objective(D2, x.to(F64), y))
    if best is candidates[0]:
        assert sc.kind == SKIPPED
    else:
        assert sc.kind == SCALAR
        torch.testing.assert_close(torch.stack([sc.alpha[0] ** 2, sc.beta[0] ** 2]), best, rtol=1e-6, atol=1e-12)
