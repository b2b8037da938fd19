"""tools/generators/memory_plan.py: the computed per-rank plan against real tiny layers, its sharding
arithmetic, and the script end to end (seconds, CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]

import memory_plan as mp  # noqa: E402

GiB = 1024**3


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_computed_layer_bytes_match_a_real_tiny_layer(arch):
    shape = mp.tiny_shape(arch)
    rank = 4
    m = mp.measure(shape, rank, "adamw", layers=1, lengths=(16, 32, 48))
    # weights: the real layer's parameters in bf16, and bitsandbytes' own NF4 tensors
    assert m.bf16_param_bytes == mp.layer_bf16_bytes(shape)
    assert m.nf4_bytes == pytest.approx(mp.layer_nf4_bytes(shape), rel=0.02)
    assert m.nf4_bytes < 0.5 * m.bf16_param_bytes  # sanity: 4-bit codes really are small
    # trainable state: our injected adapters, their gradients, torch AdamW after one step
    assert m.adapter_param_bytes == mp.adapter_params(shape, rank) * 4
    assert m.adapter_grad_bytes == mp.adapter_params(shape, rank) * 4
    assert m.optimizer_bytes == mp.optimizer_bytes("adamw", mp.adapter_tensor_sizes(shape, rank))
    # activations: the structural count is what the real layer saves, and SDPA stores no s x s matrix
    formula = mp.formula_layer_activations(shape, rank)
    assert m.activations.per_token == pytest.approx(formula.per_token, abs=1e-6)
    assert m.activations.constant == pytest.approx(formula.constant, abs=1e-3)
    assert m.activations.per_token_sq == pytest.approx(0.0, abs=1e-6)
    # ScaLoRA on a bf16 model in one process keeps no bf16 copy of its float32 masters
    # (F.linear on the cast would save one: projection_params() * 2 bytes)
    assert m.scalora_extra_saved == 0
    assert m.loss_head_saved_per_token == pytest.approx(4 * shape.vocab + 8, rel=0.01)


def test_adamw8bit_bytes_match_bitsandbytes():
    # rank 64 on the tiny shape makes lora_A 64 x 64 = 4096 elements (8-bit state) and the
    # k/v lora_B 32 x 64 (below min_8bit_size: float32 state): both branches of the formula.
    shape = mp.tiny_shape("mistral")
    sizes = mp.adapter_tensor_sizes(shape, 64)
    assert min(sizes) < mp.ADAM8BIT_MIN_SIZE <= max(sizes)
    m = mp.measure(shape, 64, "adamw8bit", layers=1, lengths=(16,))
    assert m.optimizer_bytes == mp.optimizer_bytes("adamw8bit", sizes)
    assert m.optimizer_bytes < mp.optimizer_bytes("adamw", sizes) / 2


def test_measuring_several_layers_gives_the_same_per_layer_figures():
    shape = mp.tiny_shape("gemma3")
    one = mp.measure(shape, 4, "adamw", layers=1, lengths=(16, 32))
    two = mp.measure(shape, 4, "adamw", layers=2, lengths=(16, 32))
    assert two.bf16_param_bytes == one.bf16_param_bytes
    assert two.adapter_grad_bytes == one.adapter_grad_bytes
    assert two.activations.per_token == pytest.approx(one.activations.per_token)


def _rows(**kw):
    return {(r.base, r.method, r.gpus, r.placement): r for r in mp.plan(mp.SHAPES["gemma3-12b"], **kw)}


def test_plan_has_every_configuration():
    rows = _rows()
    assert len(rows) == 16
    for method in ("lora", "scalora"):
        for gpus in (1, 8, 64):
            assert ("bf16", method, gpus, "-") in rows
        assert ("nf4", method, 1, "-") in rows
        for gpus in (8, 64):
            assert {("nf4", method, gpus, p) for p in ("sharded", "replicated")} <= rows.keys()


def test_sharded_state_divides_by_gpus():
    rows = _rows()
    for base, placement in (("bf16", "-"), ("nf4", "sharded"), ("nf4", "replicated")):
        for method in ("lora", "scalora"):
            one = rows[(base, method, 1, "-")]
            by_gpus = {g: rows[(base, method, g, placement)] for g in (8, 64)}
            assert one.total > by_gpus[8].total > by_gpus[64].total
            for g, row in by_gpus.items():
                assert row.adapter_params == pytest.approx(one.adapter_params / g)
                assert row.adapter_grads == pytest.approx(one.adapter_grads / g)
                assert row.optimizer < one.optimizer / g * 1.01  # + a few step scalars per rank
                assert row.activations == one.activations  # data parallel: each rank its own batch
                assert row.working_set > 0 and one.working_set == 0
            if base == "bf16":
                assert by_gpus[64].frozen_base == pytest.approx(one.frozen_base / 64)


def test_replicated_codes_stay_whole_and_sharded_codes_do_not():
    shape = mp.SHAPES["gemma3-12b"]
    weights = shape.layers * sum(m * n for m, n in shape.projections().values())
    whole_codes = weights / 2  # 4 bits each
    whole_scales = weights / 64  # one 8-bit scale per 64-weight block: the QuantState stays whole
    rows = _rows()
    for method in ("lora", "scalora"):
        for gpus in (8, 64):
            replicated = rows[("nf4", method, gpus, "replicated")]
            sharded = rows[("nf4", method, gpus, "sharded")]
            assert replicated.frozen_base > whole_codes
            assert whole_scales < sharded.frozen_base < whole_codes / 4
            # ignored codes are never gathered; the rest is one FSDP2 group, whole for the step:
            # every block's adapters and norms (+ accumulators) in bf16, adapter gradients in float32
            adapters = shape.layers * sum((m + n) * 16 for m, n in shape.projections().values())
            accumulators = shape.layers * sum((m + n) * 64 for m, n in shape.projections().values())
            whole = (
                adapters * 2
                + shape.layers * shape.norm_params() * 2
                + adapters * 4
                + shape.root_params() * 2
                + (accumulators * 2 if method == "scalora" else 0)
            )
            assert replicated.working_set == pytest.approx(whole)


def test_gemma3_12b_totals_agree_with_the_readme_figures():
    # README "4-bit frozen bases": a Gemma-3-12B-shaped decoder is 20.0 GiB bf16, 5.2 GiB NF4,
    # +0.98 GiB for R = 64 accumulators (tools/benchmarks/bench_quant.py); the embedding is 262144 x 3840.
    rows = _rows()
    embedding = 262144 * 3840 * 2 / GiB
    assert rows[("bf16", "lora", 1, "-")].frozen_base / GiB - embedding == pytest.approx(20.0, abs=0.05)
    assert rows[("bf16", "scalora", 1, "-")].frozen_base / GiB - embedding == pytest.approx(40.0, abs=0.1)
    assert rows[("nf4", "lora", 1, "-")].frozen_base / GiB - embedding == pytest.approx(5.2, abs=0.05)
    assert rows[("nf4", "scalora", 8, "sharded")].scalora_extra * 8 / GiB == pytest.approx(0.98, abs=0.01)


def test_checkpointing_and_the_loss_head_in_activations():
    shape = mp.SHAPES["gemma3-12b"]
    layer = mp.formula_layer_activations(shape, 16)
    on = mp.activations(shape, layer, 1, 2048, checkpointing=True, chunked_loss=False)
    off = mp.activations(shape, layer, 1, 2048, checkpointing=False, chunked_loss=False)
    logits = 2048 * 262144
    assert on.loss_head == 14 * logits
    assert off.peak > shape.layers * layer.saved(1, 2048) > on.peak > on.loss_head
    # the chunked loss holds one chunk of logits (plus the hidden states' gradient), not all
    chunked = mp.activations(shape, layer, 1, 2048, checkpointing=True)
    assert chunked.loss_head == 10 * mp.CHUNK_ELEMENTS + 4 * 2048 * shape.hidden
    assert chunked.peak < on.peak - 12 * logits
    longer = mp.activations(shape, layer, 1, 8192, checkpointing=True)
    assert longer.loss_head - chunked.loss_head == 4 * (8192 - 2048) * shape.hidden
    # ScaLoRA on one GPU saves no bf16 copies of its float32 masters, with or without
    # checkpointing; on a 4-bit base it holds its float32 accumulators (0.98 GiB at R = 64)
    no_ckpt = _rows(checkpointing=False)
    assert no_ckpt[("bf16", "scalora", 1, "-")].scalora_extra == _rows()[("bf16", "scalora", 1, "-")].scalora_extra == 0
    assert no_ckpt[("nf4", "scalora", 1, "-")].scalora_extra / GiB == pytest.approx(0.98, abs=0.02)


def test_script_runs_on_the_tiny_shape_and_prints_both_tables():
    out = subprocess.run(
        [sys.executable, "tools/generators/memory_plan.py", "--tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.startswith("<!-- ") and "command: python tools/generators/memory_plan.py --tiny" in text
    assert "## Memory plan per rank (MiB, computed): tiny-gemma3" in text
    assert "## Measured vs computed, per decoder layer" in text
    plan_rows = [line for line in text.splitlines() if re.match(r"\| (bf16|nf4) \| (lora|scalora) \|", line)]
    assert len(plan_rows) == 16
    measured = text.split("## Measured vs computed")[1]
    ratios = [float(x) for x in re.findall(r"\| (\d+\.\d{4}) \|$", measured, flags=re.M)]
    assert len(ratios) >= 8 and all(0.98 <= r <= 1.02 for r in ratios)
    assert re.search(r"no bf16 copies\) \| 0\.0 \| 0\.0 \|", measured)  # computed 0, measured 0


def test_8bit_optimizer_applies_to_one_gpu_and_fsdp2_rows_use_adamw():
    # bitsandbytes optimizers run in one process only (scalora_dist/optim.py); under FSDP2
    # the float32 AdamW state is sharded instead.
    adamw, bnb8 = _rows(), _rows(optimizer="adamw8bit")
    one = ("nf4", "scalora", 1, "-")
    assert bnb8[one].optimizer < adamw[one].optimizer / 3.5  # 2 bytes + scales vs 8 bytes per element
    for key in adamw:
        if key[2] > 1:
            assert bnb8[key].optimizer == adamw[key].optimizer


def test_the_chunked_loss_brings_the_big_recipes_onto_small_cards():
    """Issue goals, in the plan: the 12B 4-bit one-GPU recipe (r 16, 8-bit AdamW, 2048
    tokens) under 12 GiB, and Llama-3.1-8B 4-bit LoRA r 32 at >= 16k tokens on a 16 GB card;
    the plain loss does neither. Longer sequences never fit where shorter ones do not."""

    def one_gpu(shape, **kw):
        rows = mp.plan(mp.SHAPES[shape], optimizer="adamw8bit", gpu_counts=(1,), **kw)
        return {(r.base, r.method): r.total for r in rows}

    assert one_gpu("gemma3-12b")[("nf4", "scalora")] / GiB < 12
    assert one_gpu("gemma3-12b", chunked_loss=False)[("nf4", "scalora")] / GiB > 16
    llama = mp.SHAPES["llama3.1-8b"]
    chunked = mp.longest_sequence(llama, "nf4", "lora", 16e9, rank=32, optimizer="adamw8bit")
    plain = mp.longest_sequence(llama, "nf4", "lora", 16e9, rank=32, optimizer="adamw8bit", chunked_loss=False)
    assert chunked >= 16384 > plain
    assert mp.longest_sequence(llama, "nf4", "lora", 24e9, rank=32, optimizer="adamw8bit") > chunked


def test_offloading_the_activations_keeps_two_boundaries_on_the_device():
    """model.offload_activations in the plan: the layer-input boundaries move to the host, two
    stay on the device; the rest of the activations is unchanged. With it, Llama-3.1-8B 4-bit
    LoRA r 32 reaches unsloth's 40.7k tokens on a 16 GB card in the plan."""
    shape = mp.SHAPES["llama3.1-8b"]
    layer = mp.formula_layer_activations(shape, 32)
    kept = mp.activations(shape, layer, 1, 8192, checkpointing=True)
    moved = mp.activations(shape, layer, 1, 8192, checkpointing=True, offload=True)
    boundary = 8192 * shape.hidden * 2
    assert kept.boundaries == shape.layers * boundary and kept.host == 0
    assert moved.boundaries == 2 * boundary and moved.host == shape.layers * boundary
    assert kept.peak - moved.peak == (shape.layers - 2) * boundary
    on_16gb = {
        offload: mp.longest_sequence(shape, "nf4", "lora", 16e9, rank=32, optimizer="adamw8bit", offload=offload)
        for offload in (False, True)
    }
    assert on_16gb[True] >= 40_700 > on_16gb[False] >= 16_384


def test_a_model_config_gives_the_shape_the_plan_was_written_for():
    from transformers import LlamaConfig

    from scalora_dist.plan import shape_of

    config = LlamaConfig(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    got = shape_of(config, "llama3.1-8b")
    assert got == mp.SHAPES["llama3.1-8b"]


def test_plan_command_says_what_fits_and_what_would(tiny_llama):
    from scalora_dist.config import load_config
    from scalora_dist.plan import BUDGET_FRACTION, GiB, choose_placement, model_shape, run_plan

    cfg = load_config("configs/quickstart.yaml", [f"model.path={tiny_llama}"])
    shape = model_shape(cfg.model)
    one = run_plan(cfg, shape, 1, "-", 0, "cuda")

    def plan(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "scalora_dist.cli",
                "plan",
                "configs/quickstart.yaml",
                f"model.path={tiny_llama}",
                *args,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

    fits = plan("--nproc-per-node", "2", "--device-memory", "80GiB")
    assert fits.returncode == 0, fits.stderr
    for part in (
        "frozen base",
        "adapters and gradients",
        "optimizer state",
        "activations",
        "loss head",
        "FSDP2 working set",
        "base whole (replicated)",
        "base sharded",
        "auto would take replicated",
        "fits:",
    ):
        assert part in fits.stdout, part
    tight = plan("--device-memory", f"{int(0.9 * one.total / BUDGET_FRACTION)}B")  # 10% short
    assert tight.returncode == 1 and "does not fit" in tight.stdout and "it would fit with" in tight.stdout
    assert "model.gradient_checkpointing=true" in tight.stdout
    bad = plan("--device-memory", "lots")
    assert bad.returncode == 2 and "--device-memory" in bad.stderr
    # the decision itself: the base whole when it fits the budget, sharded when it does not
    roomy = choose_placement(cfg, shape, 2, "cpu", 8 * GiB, "test")
    tight = choose_placement(cfg, shape, 2, "cpu", roomy.replicated.total * 1.05, "test")
    assert roomy.placement == "replicated" and tight.placement == "sharded"
    # what sharding is for: an 8B model on 8 GPUs takes far less per rank sharded
    big = load_config(
        "configs/quickstart.yaml",
        [
            "adapter.rank=16",
            "data.max_length=2048",
            "train.micro_batch_size=1",
            "model.gradient_checkpointing=true",
        ],
    )
    sharded, whole = (
        run_plan(big, mp.SHAPES["llama3.1-8b"], 8, p, 80 * GiB, "cuda") for p in ("sharded", "replicated")
    )
    assert whole.total - sharded.total > 10 * GiB
