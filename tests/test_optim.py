"""Optimizers: torch AdamW and bitsandbytes' low-memory AdamWs, and ScaLoRA's access to
their moments (float32 views; 8-bit moments dequantised and written back)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from scalora_dist.config import ConfigError, TrainConfig, load_config  # noqa: E402
from scalora_dist.model.lora import lora_layers  # noqa: E402
from scalora_dist.optim import adam_moments, build_optimizer  # noqa: E402
from scalora_dist.scalora import scaling as sm  # noqa: E402
from scalora_dist.scalora.refactor import auto_kappa  # noqa: E402
from scalora_dist.train import forward_backward, setup, train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EIGHT_BIT_TOL = 0.03  # relative (norm) error of blockwise 8-bit moments after a few steps


def _stepped(name: str, grads: list[torch.Tensor]) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))  # 8192 elements: above bitsandbytes' 8-bit minimum
    opt = build_optimizer([p], TrainConfig(optimizer=name, lr=1e-3), distributed=False)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["paged_adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_moments_of_every_optimizer_read_as_torch_adamw_and_rescale_in_place(name):
    torch.manual_seed(1)
    grads = [torch.randn(64, 128) for _ in range(3)]
    p_ref, reference = _stepped("adamw", grads)
    p, opt = _stepped(name, grads)
    tol = EIGHT_BIT_TOL if "8bit" in name else 1e-5
    with adam_moments(reference, p_ref) as (m_ref, v_ref), adam_moments(opt, p) as (m, v):
        assert m.dtype == v.dtype == torch.float32
        assert _rel(m, m_ref) < tol and _rel(v, v_ref) < tol
        before = m.clone(), v.clone()
        rows = torch.rand(64, 1) + 0.5
        m.mul_(rows)
        v.mul_(rows.square())
    with adam_moments(opt, p) as (m, v):  # the change was stored, in the optimizer's own format
        assert _rel(m, before[0] * rows) < tol / 3 and _rel(v, before[1] * rows.square()) < tol / 3
        assert _rel(m, before[0]) > 0.1


def test_moments_before_the_first_step_are_none():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    for name in ("adamw", "adamw_8bit"):
        with adam_moments(build_optimizer([p], TrainConfig(optimizer=name), False), p) as moments:
            assert moments is None


def test_scalora_rescales_8bit_adamw_moments_with_the_refactor_scales(tiny_llama, tmp_path):
    cfg = load_config(
        None,
        [
            f"model.path={tiny_llama}",
            f"data.train_files=[{REPO / 'configs/data/quickstart_train.jsonl'}]",
            "data.max_length=32",
            "data.packing=true",
            "adapter.rank=64",
            "adapter.alpha=64",  # 64x64 factors: 8-bit state
            "adapter.target_modules=[q_proj]",
            "adapter.scalora.warmup_steps=3",
            "train.max_steps=6",
            "train.micro_batch_size=2",
            "train.lr=1e-2",
            "train.optimizer=adamw_8bit",
            f"output.dir={tmp_path}",
        ],
    )
    run = setup(cfg)
    assert isinstance(run.optimizer, bnb.optim.AdamW8bit)
    for step in range(3):
        train_step(run, step)
    layer = next(iter(lora_layers(run.model).values()))
    assert run.optimizer.state[layer.lora_A]["state1"].dtype == torch.uint8  # really 8-bit
    run.scalora.prepare(3)
    forward_backward(run.model, run.train_loader, 1, run.device)
    # the scales the refactor will use, computed independently from the same statistics
    grams = [
        sm.lora_grams(l.lora_A, l.lora_A.grad, l.lora_B, l.lora_B.grad, l.scale)
        for l in lora_layers(run.model).values()
    ]
    scales = sm.solve_scales(*grams[0], auto_kappa(grams))
    assert scales.kind != sm.SKIPPED and (scales.alpha - 1).abs().max() > 0.05
    with (
        adam_moments(run.optimizer, layer.lora_A) as (m_A, v_A),
        adam_moments(run.optimizer, layer.lora_B) as (m_B, v_B),
    ):
        before = [t.clone() for t in (m_A, v_A, m_B, v_B)]
    run.scalora.refactor()
    alpha, beta = scales.alpha.float(), scales.beta.float()
    expected = [
        before[0] * alpha[:, None],
        before[1] * alpha[:, None] ** 2,
        before[2] * beta[None, :],
        before[3] * beta[None, :] ** 2,
    ]
    with (
        adam_moments(run.optimizer, layer.lora_A) as (m_A, v_A),
        adam_moments(run.optimizer, layer.lora_B) as (m_B, v_B),
    ):
        for got, want in zip((m_A, v_A, m_B, v_B), expected):
            assert _rel(got, want) < EIGHT_BIT_TOL


def test_bitsandbytes_optimizers_are_refused_under_fsdp2_before_launch(tiny_llama, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalora_dist.cli",
            "train",
            "configs/quickstart.yaml",
            f"model.path={tiny_llama}",
            f"output.dir={tmp_path}",
            "train.optimizer=adamw_8bit",
            "--nproc-per-node",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "train.optimizer: adamw_8bit (bitsandbytes) runs in one process only" in proc.stderr
    assert "launching" not in proc.stderr
    with pytest.raises(ConfigError, match="train.optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="adamw_8bit"), distributed=True)


@pytest.mark.parametrize(
    "kind, theirs", [("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")]
)
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 20), (5, 20), (10, 10), (3, 7)])
def test_lr_schedules_are_transformers_own_step_by_step(kind, theirs, warmup, total):
    """lr_multiplier keeps transformers' get_scheduler formulas (written out only to keep
    transformers' Trainer imports out of every process)."""
    from transformers import get_scheduler

    from scalora_dist.optim import lr_multiplier

    reference = get_scheduler(
        theirs,
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
        num_warmup_steps=warmup,
        num_training_steps=total,
    ).lr_lambdas[0]
    ours = lr_multiplier(kind, warmup, total)
    for step in range(total + 3):
        assert ours(step) == pytest.approx(reference(step), abs=1e-15), step
