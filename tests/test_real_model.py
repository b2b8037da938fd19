"""A real pretrained model: SmolLM2-135M-Instruct (30 layers, tied embeddings, ChatML) fine-
tuned through the CLI on a chat task in its own chat template, with LoRA and with ScaLoRA;
the PEFT adapter and the merged model agree, and the merged model still talks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_ok, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Chile", "Santiago"),
]


def _chat_data(path: Path) -> Path:
    return write_jsonl(
        path,
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": f"The capital of {country} is {city}."},
                ]
            }
            for country, city in CAPITALS
        ],
    )


def _train(model_dir, out, method, data):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "scalora_dist.cli",
            "train",
            "configs/quickstart.yaml",
            "--quiet",
            f"model.path={model_dir}",
            f"output.dir={out}",
            f"adapter.method={method}",
            f"data.train_files=[{data}]",
            f"data.eval_files=[{data}]",
            "data.format=chat",
            "data.max_length=128",
            "data.packing=true",
            "adapter.rank=4",
            "adapter.alpha=8",
            "adapter.scalora.warmup_steps=1",
            "train.max_steps=3",
            "train.micro_batch_size=2",
            "train.lr=2e-4",
            "train.warmup_steps=0",
            "train.log_every=1",
            "train.eval_every=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},  # beside the other worker
    )


@pytest.fixture(scope="module")
def runs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    data = _chat_data(root / "capitals.jsonl")
    for method in ("lora", "scalora"):
        assert_ok(_train(smollm2, root / method, method, data))
    return root


def _held_out_loss(model_dir, data) -> float:
    """The loss the training loop's evaluation computes, for an untrained model."""
    from scalora_dist.config import DataConfig
    from scalora_dist.data import BatchLoader, load_split
    from scalora_dist.train import evaluate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    split = load_split(DataConfig(format="chat", max_length=128, packing=True), tok, [str(data)])
    return evaluate(model, BatchLoader(split, 2, tok.pad_token_id, shuffle=False, drop_last=False), torch.device("cpu"))


def _prompt_ids(tok, question):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "scalora"])
def test_fine_tuning_the_real_model_lowers_its_loss_and_it_still_answers(runs, smollm2, method):
    records = [json.loads(l) for l in (runs / method / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["labelled_tokens"] > 0 for r in records)
    final_eval = json.loads((runs / method / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"]
    assert final_eval < _held_out_loss(smollm2, runs / "capitals.jsonl")  # it learned the answers' form
    if method == "scalora":
        assert any(r.get("scalora_column", 0) + r.get("scalora_scalar", 0) for r in records)
    tok = AutoTokenizer.from_pretrained(runs / method / "merged")
    model = AutoModelForCausalLM.from_pretrained(runs / method / "merged", dtype=torch.float32).eval()
    ids = _prompt_ids(tok, "What is the capital of Portugal?")
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert sum(c.isalpha() for c in answer) > 5, answer
    assert "Lisbon" in answer or "Portugal" in answer, answer  # on topic: a real model, still one


@pytest.mark.slow
def test_the_peft_adapter_and_the_merged_model_give_the_same_logits(runs, smollm2):
    from peft import PeftModel

    adapter = json.loads((runs / "lora/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(smollm2).resolve())
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = _prompt_ids(tok, "What is the capital of Chile?")
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, runs / "lora/adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(runs / "lora/merged", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-3, "the adapter must change the model"


def test_real_model_study_quick_mode_trains_reports_and_caches(smollm2, tmp_path):
    """tools/studies/study_real.py --quick: LoRA and ScaLoRA on the stdlib docstring -> function task
    (real standard-library text) from the real SmolLM2, a report with each method's held-out
    loss and ScaLoRA's kappa and refactor split; a second call trains nothing."""
    cmd = [
        sys.executable,
        "tools/studies/study_real.py",
        "--quick",
        "--model",
        str(smollm2),
        "--work-dir",
        str(tmp_path / "work"),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # beside the other worker
    first_call = assert_ok(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env))
    results = json.loads((tmp_path / "out/study_real_quick.json").read_text())
    assert [r["method"] for r in results] == ["lora", "scalora"]
    assert all(0 < r["final_eval"] < 10 for r in results)
    scalora = results[1]
    assert scalora["kappa"] > 0 and sum(scalora["refactor"].values()) > 0
    train = (tmp_path / "work/data/train.jsonl").read_text().splitlines()
    first = json.loads(train[0])["messages"]
    assert first[0]["role"] == "user" and first[1]["content"].startswith("def ")
    # Again, with one held-out prompt answered by each run: no training, the answers in the report.
    again = subprocess.run(
        [*cmd, "--parse-prompts", "1"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert_ok(again)
    assert ": eval " not in again.stdout and ": eval " in first_call.stdout, "a cached run was trained again"
    answered = json.loads((tmp_path / "out/study_real_quick.json").read_text())
    assert len(answered) == 2 and all(0 <= r["parse_rate"] <= 1 and len(r["samples"]) == 1 for r in answered)
    report = (tmp_path / "out/study_real_quick.md").read_text()
    assert "Greedy answers" in report and answered[0]["samples"][0]["prompt"] in report


@pytest.mark.slow
def test_one_step_comparison_quick_mode(smollm2, tmp_path):
    """tools/studies/one_step.py --quick on the real SmolLM2 and the facts task: from the same
    LoRA state every variant takes one step (ScaLoRA's with a refactor, LoRA's without), and
    two methods train on their own for three steps, each step's size in weight space recorded."""
    cmd = [
        sys.executable,
        "tools/studies/one_step.py",
        "--quick",
        "--work-dir",
        str(tmp_path / "work"),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert_ok(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env))
    rows = json.loads((tmp_path / "out/one_step_facts_quick.json").read_text())
    assert [r["step"] for r in rows] == [2, 3]
    for row in rows:
        assert row["lora"]["median_layer_step_ratio_to_lora"] == 1.0 and row["lora"]["kappa"] is None
        assert row["scalora"]["kappa"] > 0 and sum(row["scalora"]["column_scalar_skipped"]) > 0
        assert row["scalora_k4"]["kappa"] == pytest.approx(4 * row["scalora"]["kappa"])
        assert all(-1 <= row[v]["cos_with_minus_G"] <= 1 for v in row if isinstance(row[v], dict))
    runs = json.loads((tmp_path / "out/trajectories_facts_quick.json").read_text())
    assert set(runs) == {"lora", "scalora_reestimate"} and all(len(r) == 3 for r in runs.values())
    assert all(r[-1]["step_norm"] > 0 and r[-1]["pair_size"] > 0 for r in runs.values())
    # the facts task: every held-out question is in a phrasing training never uses
    train = (tmp_path / "work/data-facts/train.jsonl").read_text()
    held_out = [json.loads(l)["prompt"] for l in (tmp_path / "work/data-facts/eval.jsonl").read_text().splitlines()]
    assert len(held_out) == 400 and not any(q in train for q in held_out)
