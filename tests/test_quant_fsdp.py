"""4-bit bases under FSDP2 for real: bitsandbytes on CPU, gloo, torchrun jobs.

Public reports say FSDP2 can corrupt bf16-packed NF4 codes or lose their quant state, and
that a mixed-precision cast of packed codes turns them into random weights; these tests
check the function each 4-bit layer computes after wrapping, and the whole training run,
against one process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, assert_ok, assert_same_weights, logged_losses, merged_weights, train_job
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

pytest.importorskip("bitsandbytes")

QUANT = ["model.load_in_4bit=true", "adapter.scalora.accumulator_rank=8"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_every_4bit_layer_computes_the_same_function_after_fsdp2_wrapping(tiny_llama, tmp_path, nproc):
    out = tmp_path / "layers.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            str(REPO / "tests/workers/quant_fsdp_worker.py"),
            str(tiny_llama),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == nproc
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    for case, got in result["cases"].items():
        assert len(got["layers"]) == 7 * layers, case  # adapted and unadapted 4-bit layers alike
        worst = max(got["layers"].values())
        if case.startswith("control"):
            # a policy that casts the codes must be caught by this very comparison
            assert worst > 0.5 and got["logits"] > 0.1, (case, worst)
            continue
        # float32: the same bits in, the same bits out; bfloat16: the output's own rounding
        assert worst < (1e-6 if case.startswith("float32") else 1e-2), (case, got["layers"])
        assert got["logits"] < 1e-6, case


@pytest.mark.slow
def test_scalora_on_a_4bit_base_trains_the_same_on_2_ranks_in_both_placements(tiny_llama, tmp_path):
    one = assert_ok(train_job(tiny_llama, tmp_path / "one", 1, *QUANT))
    assert "done:" in one.stdout
    reference, ref_losses = merged_weights(tmp_path / "one"), logged_losses(tmp_path / "one")
    base = load_file(str(tiny_llama / "model.safetensors"))
    moved = max(((reference[k] - base[k]).norm() / base[k].norm()).item() for k in base)
    assert moved > 1e-2, "training must change the weights for the comparison to mean anything"
    sharded = tmp_path / "sharded"
    assert_ok(
        train_job(
            tiny_llama, sharded, 2, *QUANT, "train.save_every=3", "train.keep_last=0", "model.base_placement=sharded"
        )
    )
    assert_ok(train_job(tiny_llama, tmp_path / "replicated", 2, *QUANT, "model.base_placement=replicated"))
    for run in (sharded, tmp_path / "replicated"):
        assert_same_weights(reference, merged_weights(run))  # the full-precision merged export
        for step, loss in ref_losses.items():
            assert logged_losses(run)[step] == pytest.approx(loss, rel=1e-5)
    records = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    refactors = [r for r in records if r.get("scalora_column") is not None]
    assert refactors and all(r["scalora_collectives"] == 1 for r in refactors)
    # per layer 2 x (2r)^2 scaling statistics + 2 x (R+r)^2 accumulator Grams, float64
    layers = 7 * json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert all(r["scalora_reduced_bytes"] == layers * (2 * 4**2 + 2 * 10**2) * 8 for r in refactors)

    # The checkpoint leaves the frozen codes out (they are re-quantised from model.path) and
    # resumes on another world size to the same model.
    checkpoint = sharded / "checkpoints/step-00000003"
    saved = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert "model.model.layers.0.self_attn.q_proj.acc_U" in saved
    assert not [k for k in saved if "proj.base.weight" in k or "proj.weight" in k]
    assert_ok(train_job(tiny_llama, tmp_path / "resumed", 1, *QUANT, resume=checkpoint))
    assert_same_weights(reference, merged_weights(tmp_path / "resumed"))


@pytest.mark.slow
def test_lora_on_a_4bit_base_exports_the_same_adapter_from_2_ranks(tiny_llama, tmp_path):
    lora = ["model.load_in_4bit=true", "adapter.method=lora"]
    assert_ok(train_job(tiny_llama, tmp_path / "one", 1, *lora))
    assert_ok(train_job(tiny_llama, tmp_path / "two", 2, *lora))
    one = load_file(str(tmp_path / "one/adapter/adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two/adapter/adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    assert_same_weights(one, two)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}
