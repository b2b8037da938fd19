"""Real checkpoint layouts on 1 and 2 ranks: multi-file safetensors with an index, tied and
untied embeddings, Gemma-3's multimodal class (stored as `language_model.model.*`), q/k/v
biases (Qwen2), Qwen3, Mistral; LoRA and ScaLoRA on each, on a 4-bit base for Llama and
Gemma-3. Every case trains through the production recipe in one process and under torchrun
with FSDP2 (tests/workers/layouts_worker.py); the two merged models must agree, the export must
load in transformers as the checkpoint's own class with its own tensor names, and give the
logits of our trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SAME_MODEL_TOL, assert_same_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {  # name: make_tiny_model arguments
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "gemma3-multimodal": dict(arch="gemma3-multimodal", tie_word_embeddings=True),
    "gemma3-text": dict(arch="gemma3", tie_word_embeddings=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "mistral": dict(arch="mistral"),
}
FOUR_BIT = ("llama", "gemma3-multimodal")


def _cases(models: dict[str, Path]) -> dict[str, dict]:
    cases = {}
    for layout, model in models.items():
        for method in ("lora", "scalora"):
            cases[f"{layout}-{method}"] = {"model": str(model), "overrides": [f"adapter.method={method}"]}
            if layout in FOUR_BIT:
                cases[f"{layout}-{method}-4bit"] = {
                    "model": str(model),
                    "overrides": [
                        f"adapter.method={method}",
                        "model.load_in_4bit=true",
                        "adapter.scalora.accumulator_rank=8",
                    ],
                }
    return cases


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from scalora_dist.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("layouts")
    models = {
        name: make_tiny_model(root / "models" / name, max_shard_size="40KB", **kw) for name, kw in LAYOUTS.items()
    }
    cases = _cases(models)
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = str(REPO / "tests/workers/layouts_worker.py")
    for world, launcher in (
        (1, [sys.executable, worker]),
        (2, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker]),
    ):
        proc = subprocess.run(
            [*launcher, str(root / "cases.json"), str(root / f"w{world}")],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return root, models, cases


def test_every_layout_is_a_multi_file_checkpoint(layout_runs):
    _, models, _ = layout_runs
    for name, model in models.items():
        index = json.loads((model / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2, name
    keys = json.loads((models["gemma3-multimodal"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("language_model.model.layers.") for k in keys)  # the real 12B layout


@pytest.mark.parametrize(
    "case",
    [f"{l}-{m}" for l in LAYOUTS for m in ("lora", "scalora")]
    + [f"{l}-{m}-4bit" for l in FOUR_BIT for m in ("lora", "scalora")],
)
def test_one_and_two_ranks_export_the_same_model_in_the_checkpoints_own_layout(layout_runs, case):
    root, models, cases = layout_runs
    original_dir = Path(cases[case]["model"])
    original = _load_dir(original_dir)
    one, two = _load_dir(root / "w1" / case / "merged"), _load_dir(root / "w2" / case / "merged")
    assert set(one) == set(original), "the export keeps the checkpoint's own tensor names"
    assert_same_weights(one, two, tol=SAME_MODEL_TOL)
    moved = max(((one[k] - original[k]).norm() / original[k].norm()).item() for k in original)
    assert moved > 1e-4, "training must change the weights for the comparison to mean anything"

    architecture = json.loads((original_dir / "config.json").read_text())["architectures"]
    merged = AutoModelForCausalLM.from_pretrained(root / "w1" / case / "merged", dtype=torch.float32)
    assert [type(merged).__name__] == architecture
    merged.eval()
    probe = torch.load(root / "w1" / case / "probe.pt")["logits"]
    from layouts_worker import probe_ids

    with torch.no_grad():
        logits = merged(input_ids=probe_ids(merged.config.get_text_config().vocab_size)).logits
    torch.testing.assert_close(logits, probe, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["gemma3-multimodal", "qwen2"])
def test_lora_adapter_of_each_layout_loads_in_peft_with_our_logits(layout_runs, layout):
    from peft import PeftModel

    root, models, _ = layout_runs
    case = f"{layout}-lora"
    adapter = json.loads((root / "w2" / case / "adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(models[layout].resolve())
    if layout == "gemma3-multimodal":  # all-linear: the language model only
        assert all(".language_model." in t for t in adapter["target_modules"])
    base = AutoModelForCausalLM.from_pretrained(models[layout], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, root / "w2" / case / "adapter").eval()
    from layouts_worker import probe_ids

    with torch.no_grad():
        logits = peft_model(input_ids=probe_ids(base.config.get_text_config().vocab_size)).logits
    torch.testing.assert_close(logits, torch.load(root / "w2" / case / "probe.pt")["logits"], rtol=1e-4, atol=1e-4)
