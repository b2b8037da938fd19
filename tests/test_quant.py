"""4-bit (bitsandbytes NF4) frozen bases on CPU: real quantisation, forward and backward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("bitsandbytes")

from scalora_dist.config import ConfigError, ModelConfig, load_config  # noqa: E402
from scalora_dist.model.build import build_model  # noqa: E402
from scalora_dist.model.lora import lora_layers  # noqa: E402
from scalora_dist.model.quant import dequantized_weight, is_quantized_linear  # noqa: E402
from scalora_dist.scalora.scaling import accumulate_low_rank, accumulator_grams, left_gram_for  # noqa: E402
from scalora_dist.train import export, setup, train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _config(model_dir, out, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.load_in_4bit=true",
            f"data.train_files=[{REPO / 'configs/data/quickstart_train.jsonl'}]",
            "data.max_length=64",
            "data.packing=true",
            "adapter.rank=2",
            "adapter.alpha=4",
            "adapter.scalora.warmup_steps=2",
            "train.max_steps=6",
            "train.micro_batch_size=4",
            "train.lr=1e-2",
            f"output.dir={out}",
            *overrides,
        ],
    )


def _ids():
    return torch.arange(12).view(1, 12) + 20


def _bnb_config(dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def test_load_in_4bit_quantises_every_linear_but_the_head(tiny_llama):
    model = build_model(tiny_llama, ModelConfig(path=str(tiny_llama), load_in_4bit=True), None, torch.device("cpu"))
    quantized = [n for n, m in model.named_modules() if is_quantized_linear(m)]
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert not is_quantized_linear(model.lm_head)
    # eval then train (what the training loop does) keeps the outputs right
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    w = dequantized_weight(layer)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.T)
    model.train()
    torch.testing.assert_close(layer(x), x @ w.T)
    # the codes and block scales are bit for bit those of transformers' own 4-bit loading
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=_bnb_config(), device_map={"": "cpu"}
    )
    for name in quantized:
        ours, theirs = model.get_submodule(name), reference.get_submodule(name)
        assert torch.equal(ours.weight.data.view(torch.int32), theirs.weight.data.view(torch.int32)), name
        assert torch.equal(dequantized_weight(ours), dequantized_weight(theirs)), name


def test_scalora_on_4bit_base_keeps_codes_and_accumulates_the_update(tiny_llama, tmp_path):
    run = setup(_config(tiny_llama, tmp_path, "adapter.scalora.accumulator_rank=16", "train.max_steps=8"))
    layers = lora_layers(run.model)
    # packed codes in bf16-typed storage: compare the bits (some patterns read as NaN)
    codes = {n: l.weight.data.view(torch.int16).clone() for n, l in layers.items()}
    reports = [train_step(run, step).report for step in range(8)]
    assert sum(r.column + r.scalar for r in reports if r) > 0
    for n, l in layers.items():
        assert torch.equal(l.weight.data.view(torch.int16), codes[n]), "4-bit codes must not change"
    acc = {n: l.acc_U @ l.acc_V.T for n, l in layers.items()}
    ranks = [int((torch.linalg.svdvals(a) > 1e-6 * torch.linalg.svdvals(a)[0]).sum()) for a in acc.values()]
    assert max(ranks) > 2, "the accumulated update must exceed the adapter's rank"


def test_scalora_4bit_export_is_the_trained_model_in_full_precision(tiny_llama, tmp_path):
    run = setup(_config(tiny_llama, tmp_path, "adapter.scalora.accumulator_rank=8"))
    for step in range(6):
        train_step(run, step)
    with torch.no_grad():
        expected = run.model(input_ids=_ids()).logits
    export(run, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids()).logits, expected, rtol=1e-4, atol=1e-4)


def test_lora_on_4bit_base_exports_a_peft_adapter_for_the_same_4bit_base(tiny_llama, tmp_path):
    from peft import PeftModel

    cfg = _config(tiny_llama, tmp_path, "adapter.method=lora")
    run = setup(cfg)
    for step in range(6):
        train_step(run, step)
    with torch.no_grad():
        expected = run.model(input_ids=_ids()).logits
    export(run, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama,
        quantization_config=_bnb_config(),
        device_map={"": "cpu"},
    )
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    peft_model.train()  # the training-mode 4-bit kernel, as in `expected`
    with torch.no_grad():
        got = peft_model(input_ids=_ids()).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_low_rank_accumulator_is_exact_until_full_then_best_rank_R():
    torch.manual_seed(0)
    m, n, r, R = 40, 30, 2, 8
    U, V = torch.zeros(m, R), torch.zeros(n, R)
    total = torch.zeros(m, n, dtype=torch.float64)
    for step in range(6):
        a, b = torch.randn(m, r), torch.randn(n, r)
        total += a.double() @ b.double().T
        previous = (U.double() @ V.double().T).clone()
        U, V, dropped = accumulate_low_rank(U, V, a, b)
        approx = U.double() @ V.double().T
        if (step + 1) * r <= R:
            torch.testing.assert_close(approx, total, rtol=1e-5, atol=1e-5)
            assert dropped < 1e-4
        # each re-compression is the best rank-R approximation of what it was given
        exact = previous + a.double() @ b.double().T
        s = torch.linalg.svdvals(exact)
        assert (exact - approx).norm().item() == pytest.approx(s[R:].square().sum().sqrt().item(), rel=1e-4, abs=1e-5)


def test_accumulator_on_row_blocks_with_summed_grams_equals_the_whole_computation():
    """What FSDP2 ranks do: each holds some rows of U, lora_B (and of V, lora_A^T), the
    Grams are summed across ranks, and the blocks of the result are the whole result's."""
    torch.manual_seed(1)
    m, n, r, R = 37, 24, 3, 8  # uneven row split on purpose
    U, V = torch.randn(m, R), torch.randn(n, R)
    lora_A, lora_B = torch.randn(r, n), torch.randn(m, r)
    coef = torch.rand(r, dtype=torch.float64) - 0.5
    whole_U, whole_V, whole_dropped = accumulate_low_rank(U, V, lora_B * coef.float(), lora_A.T)
    rows_m, rows_n = [(0, 20), (20, m)], [(0, 12), (12, n)]
    partial = [accumulator_grams(U[i:j], V[k:l], lora_A[:, k:l], lora_B[i:j]) for (i, j), (k, l) in zip(rows_m, rows_n)]
    left_gram = left_gram_for(partial[0][0] + partial[1][0], coef)
    right_gram = partial[0][1] + partial[1][1]
    blocks = [
        accumulate_low_rank(U[i:j], V[k:l], lora_B[i:j] * coef.float(), lora_A[:, k:l].T, left_gram, right_gram)
        for (i, j), (k, l) in zip(rows_m, rows_n)
    ]
    got = torch.cat([b[0] for b in blocks]).double() @ torch.cat([b[1] for b in blocks]).double().T
    dense = U.double() @ V.double().T + (lora_B.double() * coef) @ lora_A.double()
    x, s, yh = torch.linalg.svd(dense)
    best = (x[:, :R] * s[:R]) @ yh[:R]  # dense float64 reference: the truncated SVD
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole_U.double() @ whole_V.double().T, best, rtol=1e-5, atol=1e-5)
    assert blocks[0][2] == pytest.approx(s[R:].square().sum().sqrt().item(), rel=1e-6)
    assert whole_dropped == pytest.approx(blocks[1][2], rel=1e-6)


def test_naive_requantisation_loses_the_update_that_the_accumulator_keeps():
    from bench_quant import random_fidelity

    kept = random_fidelity(128, 128, r=2, steps=8, ranks=[16], rel_size=1e-3)
    assert kept["accumulator R=16"] > 0.99  # rank of the sum 16 <= R: all of it
    assert kept["naive requantisation"] < 0.2


def test_4bit_errors(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="full fine-tuning cannot train a 4-bit base"):
        _config(tiny_llama, tmp_path, "adapter.method=full")
    hide = "import sys; sys.modules['bitsandbytes'] = None; from scalora_dist.cli import app; app()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            hide,
            "train",
            "configs/quickstart.yaml",
            f"model.path={tiny_llama}",
            "model.load_in_4bit=true",
            f"output.dir={tmp_path}/o",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "needs the bitsandbytes package" in proc.stderr
