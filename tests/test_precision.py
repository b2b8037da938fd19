"""Exact at the precision users train in: bf16 compute with float32 masters, on 1 process
and under FSDP2 (real torchrun, gloo), ScaLoRA-I, 4-bit accumulators; non-finite gradients;
packing that keeps examples apart; the order of refactor and clipping; and the rules that
refuse what cannot be exact (weight decay, CPU offload with ScaLoRA).

The round-off bound of one refactor. The rewrite adds s*B diag(1-ab) A to W0 and rescales
B, A; each float32 result is rounded once to the unit round-off u = 2^-24 of its size, so
the effective weight W0 + s*B*A moves by at most a few u*(|W0| + |s*B*A|) (Frobenius).
We assert 16 u (|W0| + |s*B*A|) per layer and refactor; measured: 0.5-1 u for a float32
base, up to 11 u on a 4-bit base (whose merged part lives in the re-compressed float64
factors of the accumulator, rounded to float32). A merge with bf16-rounded lora_A, as FSDP2
gathered it for the forward, misses by u_bf16 = 2^-9 of each increment: ~5000 u here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    SAME_MODEL_TOL,
    assert_ok,
    assert_same_weights,
    effective_masters,
    logged_losses,
    train_job,
    write_jsonl,
)

from scalora_dist.config import ConfigError, ScaLoRAConfig, load_config
from scalora_dist.model.lora import lora_layers
from scalora_dist.scalora import scaling as sm
from scalora_dist.scalora.refactor import ScaLoRA
from scalora_dist.train import TrainingError, forward_backward, setup, total_grad_norm, train_step

REPO = Path(__file__).resolve().parents[1]
U32 = 2.0**-24
ROUND_OFF_FACTOR = 16

CONFIGS = {  # name: (processes: 0 = in-process without FSDP2, overrides)
    "one process, bf16": (0, ["model.dtype=bfloat16"]),
    "FSDP2 1 rank, bf16": (1, ["model.dtype=bfloat16", "model.base_placement=sharded"]),
    "FSDP2 2 ranks, bf16": (2, ["model.dtype=bfloat16", "model.base_placement=sharded"]),
    "FSDP2 2 ranks, bf16, ScaLoRA-I (I=2), kappa x2": (
        2,
        [
            "model.dtype=bfloat16",
            "adapter.scalora.interval=2",
            "adapter.scalora.kappa_multiplier=2",
            "model.base_placement=sharded",
        ],
    ),
    "FSDP2 2 ranks, bf16, 4-bit base": (
        2,
        [
            "model.dtype=bfloat16",
            "model.load_in_4bit=true",
            "adapter.scalora.accumulator_rank=32",
            "model.base_placement=sharded",
        ],
    ),
    "one process, bf16, 4-bit base": (
        0,
        ["model.dtype=bfloat16", "model.load_in_4bit=true", "adapter.scalora.accumulator_rank=32"],
    ),
}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_refactor_keeps_the_function_on_the_float32_masters(name, tiny_llama, tmp_path):
    if "4-bit" in name:
        pytest.importorskip("bitsandbytes")
    nproc, overrides = CONFIGS[name]
    worker = str(REPO / "tests/workers/precision_worker.py")
    launcher = (
        [sys.executable, worker]
        if nproc == 0
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), worker]
    )
    out = tmp_path / "records.json"
    proc = subprocess.run(
        [*launcher, str(tiny_llama), str(out), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["distributed"] == (nproc > 0)
    records = result["records"]
    interval = 2 if "I=2" in name else 1
    assert len({r["step"] for r in records}) == len(range(2, 8, interval))
    assert all(r["increment"] > 1e-3 * r["merged"] for r in records), "the merges must be real"
    worst = max(r["change"] / (U32 * (r["merged"] + r["adapter"])) for r in records)
    assert worst < ROUND_OFF_FACTOR, f"a refactor moved the function by {worst:.0f} u"
    reports = [r["report"] for r in records if "report" in r]
    assert sum(r["scalora_column"] for r in reports) and sum(r["scalora_scalar"] for r in reports)
    if "4-bit" in name:  # rank of the accumulated update <= R: nothing may be dropped
        assert all(r["scalora_acc_dropped_fraction"] < 1e-6 for r in reports)
    if nproc == 2:
        assert all(r["scalora_collectives"] == 1 for r in reports)
        # bf16 compute: the forward's copy of lora_A is rounded, so the float32 columns
        # travel in the same single all-reduce (and are reported); float32: they do not
        carried = [r["scalora_gathered_bytes"] for r in reports]
        if "4-bit" in name:
            assert not any(carried)
        else:
            assert all(carried)


@pytest.mark.slow
def test_one_and_two_ranks_in_bf16_train_the_same_float32_masters(tiny_llama, tmp_path):
    """bf16 compute over float32 masters. With the same micro-batch shapes (1 x 4 accumulated,
    2 ranks x 2) every bf16 operation sees the same bf16 casts of the same masters, so what
    remains between world sizes is the order of float32 sums (the reduce-scatter, the
    accumulation): the float32 tolerance of tests/test_distributed.py applies (2e-5 relative
    per tensor; measured: 0, and 0 on 4 ranks x 1 when that ran here too; float32 runs on 4
    ranks are in tests/test_distributed.py). The merge with bf16-rounded lora_A this replaced
    missed by 4e-4 on the same run. Also 2 ranks with the base whole on every rank
    (base_placement: replicated), whose merges take lora_B's float32 rows from the refactor's
    all-reduce (measured: 0)."""
    runs = {}
    for name, n, extra in (
        (1, 1, ()),
        (2, 2, ("model.base_placement=sharded",)),
        ("2-replicated", 2, ("model.base_placement=replicated",)),
    ):
        assert_ok(
            train_job(
                tiny_llama,
                tmp_path / f"w{name}",
                n,
                "model.dtype=bfloat16",
                "train.micro_batch_size=1",
                f"train.grad_accum_steps={4 // n}",
                *extra,
            )
        )
        runs[name] = effective_masters(tmp_path / f"w{name}/checkpoints/step-00000006")
    for name in (2, "2-replicated"):
        assert_same_weights(runs[1], runs[name], tol=SAME_MODEL_TOL)
        for step, loss in logged_losses(tmp_path / "w1").items():
            assert logged_losses(tmp_path / f"w{name}")[step] == pytest.approx(loss, rel=1e-5)
    moved = [k for k in runs[1] if "q_proj" in k]
    assert moved and all(torch.isfinite(runs[1][k]).all() for k in moved)


def _config(model_dir, out, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train_files=[{REPO / 'configs/data/quickstart_train.jsonl'}]",
            "data.max_length=64",
            "data.packing=true",
            "adapter.rank=2",
            "adapter.alpha=4",
            "adapter.scalora.warmup_steps=1",
            "train.max_steps=4",
            "train.micro_batch_size=4",
            "train.lr=1e-2",
            f"output.dir={out}",
            *overrides,
        ],
    )


def test_scalora_with_accumulation_equals_the_same_global_batch_at_once(tiny_llama, tmp_path):
    runs = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        run = setup(
            _config(
                tiny_llama,
                tmp_path,
                "data.packing=false",
                f"train.micro_batch_size={micro}",
                f"train.grad_accum_steps={accum}",
            )
        )
        reports = [train_step(run, step).report for step in range(4)]
        assert sum(r.column + r.scalar for r in reports if r) > 0
        runs[(micro, accum)] = {n: (l.weight + l.delta_weight()).double() for n, l in lora_layers(run.model).items()}
    for key in ((2, 2), (1, 4)):
        assert_same_weights(runs[(4, 1)], runs[key], tol=1e-5)


def test_clipping_comes_after_the_refactor_and_sees_its_gradients(tiny_llama, tmp_path):
    """train_step clips the rescaled gradients with their own norm. Replaying the step by
    hand in that order gives the same model; clipping first, with the norm before the
    rescaling, gives another one (so the comparison can fail)."""
    overrides = ("train.max_grad_norm=0.05", "adapter.scalora.warmup_steps=1")
    recipe, correct, wrong = (setup(_config(tiny_llama, tmp_path, *overrides)) for _ in range(3))
    for run in (recipe, correct, wrong):
        train_step(run, 0)  # warm-up step: plain LoRA
    result = train_step(recipe, 1)
    assert result.report is not None and result.report.column + result.report.scalar > 0
    for run, clip_first in ((correct, False), (wrong, True)):
        run.scalora.prepare(1)
        forward_backward(run.model, run.train_loader, 1, run.device)
        if clip_first:
            torch.nn.utils.clip_grad_norm_(run.params, 0.05)
        run.scalora.refactor()
        norm = total_grad_norm(run.params)
        if not clip_first:
            assert result.grad_norm == pytest.approx(norm, rel=1e-6)
            torch.nn.utils.clip_grad_norm_(run.params, 0.05)
        run.optimizer.step()
    params = lambda run: torch.cat([p.detach().flatten() for p in run.params])  # noqa: E731
    torch.testing.assert_close(params(recipe), params(correct), rtol=0, atol=0)
    assert (params(recipe) - params(wrong)).abs().max() > 1e-6


def test_rewrite_with_unequal_non_unit_scales_matches_float64(tiny_llama, tmp_path):
    """One layer through the whole rewrite (merge, factors, gradients, AdamW moments) with
    random, unequal alpha != beta per column, against float64 formulas written out here: a
    swapped alpha/beta or a transposed scale fails."""
    run = setup(_config(tiny_llama, tmp_path, "adapter.rank=3"))
    for step in range(2):
        train_step(run, step)
    run.scalora.prepare(5)
    forward_backward(run.model, run.train_loader, 1, run.device)
    name, layer = next(iter(lora_layers(run.model).items()))
    g = torch.Generator().manual_seed(7)
    alpha = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    beta = torch.rand(3, generator=g, dtype=torch.float64) * 2 + 0.1
    state_A, state_B = run.optimizer.state[layer.lora_A], run.optimizer.state[layer.lora_B]
    d = lambda t: t.detach().double().clone()  # noqa: E731
    W, A, B, gA, gB = d(layer.weight), d(layer.lora_A), d(layer.lora_B), d(layer.lora_A.grad), d(layer.lora_B.grad)
    mA, vA, mB, vB = (d(state_A["exp_avg"]), d(state_A["exp_avg_sq"]), d(state_B["exp_avg"]), d(state_B["exp_avg_sq"]))
    ScaLoRA(ScaLoRAConfig(kappa=1.0), [layer], run.optimizer)._rewrite(layer, sm.Scales(alpha, beta, sm.COLUMN))
    s = layer.scale
    expected = {
        "W0": W + s * (B * (1 - alpha * beta)) @ A,
        "lora_B": B * alpha,
        "lora_A": beta[:, None] * A,
        "lora_B.grad": gB * beta,
        "lora_A.grad": alpha[:, None] * gA,
        "exp_avg B": mB * beta,
        "exp_avg_sq B": vB * beta**2,
        "exp_avg A": alpha[:, None] * mA,
        "exp_avg_sq A": alpha[:, None] ** 2 * vA,
    }
    got = {
        "W0": layer.weight,
        "lora_B": layer.lora_B,
        "lora_A": layer.lora_A,
        "lora_B.grad": layer.lora_B.grad,
        "lora_A.grad": layer.lora_A.grad,
        "exp_avg B": state_B["exp_avg"],
        "exp_avg_sq B": state_B["exp_avg_sq"],
        "exp_avg A": state_A["exp_avg"],
        "exp_avg_sq A": state_A["exp_avg_sq"],
    }
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-6, atol=1e-9, msg=f"{name} {key}")
    # the function is kept: W0 + s B A before == after
    torch.testing.assert_close(
        layer.weight.double() + s * layer.lora_B.double() @ layer.lora_A.double(), W + s * B @ A, rtol=1e-6, atol=1e-7
    )


def test_kappa_multiplier_scales_every_alpha_and_beta_by_its_square_root():
    torch.manual_seed(0)
    A, gA, B, gB = torch.randn(4, 20), torch.randn(4, 20), torch.randn(30, 4), torch.randn(30, 4)
    P, Q = sm.lora_grams(A, gA, B, gB, 2.0)
    base, times4 = sm.solve_scales(P, Q, 0.3), sm.solve_scales(P, Q, 1.2)
    assert base.kind == times4.kind != sm.SKIPPED
    torch.testing.assert_close(times4.alpha, 2 * base.alpha)
    torch.testing.assert_close(times4.beta, 2 * base.beta)
    due = ScaLoRA(ScaLoRAConfig(interval=3, warmup_steps=2), [], None)
    assert [s for s in range(12) if due.is_due(s)] == [2, 5, 8, 11]


def test_non_finite_gradients_stop_or_skip_naming_the_parameter(tiny_llama, tmp_path):
    run = setup(_config(tiny_llama, tmp_path))
    name, layer = list(lora_layers(run.model).items())[3]
    train_step(run, 0)
    handle = layer.lora_A.register_hook(lambda grad: grad * float("inf"))  # a bf16 overflow, say
    with pytest.raises(
        TrainingError,
        match=rf"step 2: the loss is finite but the gradients are not "
        rf"\({name}\.lora_A has the first non-finite gradient\)",
    ):
        train_step(run, 1)
    handle.remove()

    run = setup(_config(tiny_llama, tmp_path, "train.on_nonfinite_loss=skip"))
    train_step(run, 0)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in run.optimizer.state.items()}
    handle = layer_of(run, name).lora_B.register_hook(lambda grad: grad * float("nan"))
    result = train_step(run, 1)
    handle.remove()
    assert result.skipped and math.isfinite(result.loss)
    for n, p in run.model.named_parameters():  # no merge, no rescale, no update
        assert torch.equal(p, before[n]), n
    for p, s in run.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in s.items())
    assert not train_step(run, 2).skipped


def layer_of(run, name):
    return lora_layers(run.model)[name]


def test_scalora_refuses_weight_decay_and_cpu_offload(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"train.weight_decay: must be 0 for method scalora.*never decayed"):
        _config(tiny_llama, tmp_path, "train.weight_decay=0.01")
    with pytest.raises(ConfigError, match=r"model.cpu_offload: not supported with method scalora"):
        _config(tiny_llama, tmp_path, "model.cpu_offload=true")
    _config(tiny_llama, tmp_path, "adapter.method=lora", "train.weight_decay=0.01")  # fine for LoRA


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_see_each_other_and_lose_what_they_lose_alone(arch, attn, tiny_model, tmp_path):
    """Changing one example of a packed row leaves every other example's logits unchanged
    (float32, <= 1e-6), and a packed batch's loss is the unpacked loss of the same examples.
    Gemma-3 alternates sliding-window and full attention layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalora_dist.config import DataConfig
    from scalora_dist.data import BatchLoader, load_split, model_inputs

    model_dir = tiny_model(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        "The fox lives in the forest and eats berries.",
        "Anna takes a blue kite to the meadow.",
        "The grey owl watches the clouds at night.",
        "Ben feeds fish to the otter.",
    ]
    changed = ["A bear counts the stars while the river sleeps."] + texts[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    model.config.use_cache = False

    def packed_batch(examples, name):
        data = load_split(
            DataConfig(max_length=128, packing=True),
            tok,
            [str(write_jsonl(tmp_path / name, [{"text": t} for t in examples]))],
        )
        assert len(data) == 1  # all four in one row
        return BatchLoader(data, 1, tok.pad_token_id, shuffle=False).next_batch()

    a, b = packed_batch(texts, "a.jsonl"), packed_batch(changed, "b.jsonl")
    starts = lambda batch: (batch["position_ids"][0] == 0).nonzero().flatten().tolist()  # noqa: E731
    assert len(starts(a)) == len(starts(b)) == 4
    with torch.no_grad():
        la, lb = model(**model_inputs(a)).logits[0], model(**model_inputs(b)).logits[0]
    # examples 2-4 follow the changed first one; their logits must not move
    torch.testing.assert_close(la[starts(a)[1] :], lb[starts(b)[1] :], rtol=0, atol=1e-6)
    assert (la[: starts(a)[1]].shape != lb[: starts(b)[1]].shape) or not torch.allclose(la[:5], lb[:5])

    unpacked = load_split(
        DataConfig(max_length=128), tok, [str(write_jsonl(tmp_path / "u.jsonl", [{"text": t} for t in texts]))]
    )
    batch = BatchLoader(unpacked, 4, tok.pad_token_id, shuffle=False).next_batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss_unpacked = model(**model_inputs(batch), num_items_in_batch=torch.tensor(n)).loss
        n_packed = int((a["labels"][:, 1:] != -100).sum())
        loss_packed = model(**model_inputs(a), num_items_in_batch=torch.tensor(n_packed)).loss
    assert n_packed == n
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-6, atol=1e-6)
