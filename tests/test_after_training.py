"""After training: generate, eval (held-out loss and a local lm-eval task), export of any
checkpoint in one process, plot, and sample prompts during training; all through the CLI
on real runs of a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "data.max_length=32",
    "adapter.rank=2",
    "adapter.alpha=4",
    "adapter.scalora.warmup_steps=1",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.eval_every=2",
    "train.save_every=2",
]


def cli(*args, timeout=300, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "scalora_dist.cli", *map(str, args)],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """A LoRA run in one process, with sample prompts; ScaLoRA runs on 2 ranks in bf16 and on a 4-bit base."""
    root = tmp_path_factory.mktemp("results")
    ok(
        cli(
            "train",
            "configs/quickstart.yaml",
            "--quiet",
            f"model.path={tiny_llama}",
            f"output.dir={root / 'lora'}",
            "adapter.method=lora",
            "train.max_steps=4",
            *COMMON,
            "train.micro_batch_size=4",
            'train.sample_prompts=["The fox", "Anna takes"]',
            "train.sample_max_new_tokens=5",
        )
    )
    for name, extra in (
        ("bf16", ["model.dtype=bfloat16"]),
        ("nf4", ["model.load_in_4bit=true", "adapter.scalora.accumulator_rank=8"]),
    ):
        ok(
            cli(
                "train",
                "configs/quickstart.yaml",
                "--quiet",
                f"model.path={tiny_llama}",
                f"output.dir={root / name}",
                "train.max_steps=4",
                *COMMON,
                "train.micro_batch_size=2",
                *extra,
                "--nproc-per-node",
                "2",
            )
        )
    return root


def test_generate_is_deterministic_and_merged_equals_base_plus_adapter(runs, tiny_llama):
    """The command once end to end; the rest through the same functions it calls."""
    from scalora_dist.inference import Sampling, generate, load_model, prompt_ids

    args = ["--prompt", "The fox lives", "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "1"]
    printed = ok(cli("generate", runs / "lora", *args)).stdout
    merged = load_model(str(runs / "lora"))  # a run directory: its merged/
    ids = prompt_ids(merged.tokenizer, "The fox lives", chat=False)
    sampled = [generate(merged.model, merged.tokenizer, ids, Sampling(12, 1.0, 1.0, seed=1)) for _ in range(2)]
    assert (
        sampled[0] == sampled[1]
        and printed.strip() == merged.tokenizer.decode(sampled[0], skip_special_tokens=True).strip()
    )
    assert generate(merged.model, merged.tokenizer, ids, Sampling(12, 1.0, 1.0, seed=2)) != sampled[0]
    greedy = generate(merged.model, merged.tokenizer, ids, Sampling(12))
    for spec, adapter in ((str(tiny_llama), str(runs / "lora" / "adapter")), (str(runs / "lora"), str(runs / "lora"))):
        peft = load_model(spec, adapter)  # base + PEFT adapter: the same tokens
        assert "adapter" in peft.source and generate(peft.model, peft.tokenizer, ids, Sampling(12)) == greedy


def test_generate_in_chat_mode_applies_the_chat_template(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = runs / "lora" / "merged"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Where is the owl?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected_text = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    got = ok(cli("generate", model_dir, "--chat", "--max-new-tokens", "8", stdin="Where is the owl?\n"))
    assert got.stdout.strip() == expected_text.strip()
    assert cli("generate", model_dir).returncode == 2  # neither --prompt nor --chat


def test_eval_equals_the_training_loops_final_eval_loss(runs):
    final = json.loads((runs / "lora" / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"]
    out = runs / "lora-eval.json"
    proc = ok(cli("eval", runs / "lora", "--out", out))  # a run directory: its data.eval_files and settings
    result = json.loads(out.read_text())["held_out"]
    assert result["eval_loss"] == pytest.approx(final, rel=1e-6)
    assert result["labelled_tokens"] > 0 and "held-out: loss" in proc.stdout
    explicit = ok(
        cli(
            "eval",
            runs / "lora" / "merged",
            "--data",
            "configs/data/quickstart_eval.jsonl",
            "--max-length",
            "32",
            "--packing",
            "--out",
            out,
        )
    )
    assert json.loads(out.read_text())["held_out"]["eval_loss"] == pytest.approx(final, rel=1e-6), explicit.stdout


def test_a_local_lm_eval_task_runs_offline(runs, tmp_path):
    pytest.importorskip("lm_eval")
    questions = [
        {"question": f"The fox number {i} is", "choices": [" red.", " the owl."], "answer": i % 2} for i in range(6)
    ]
    data = write_jsonl(tmp_path / "choice.jsonl", questions)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "lm_eval.json"
    proc = ok(
        cli(
            "eval",
            runs / "lora",
            "--tasks",
            "tiny_choice",
            "--include-path",
            tmp_path / "tasks",
            "--out",
            out,
            timeout=600,
        )
    )
    results = json.loads(out.read_text())["lm_eval"]["results"]["tiny_choice"]
    assert 0.0 <= results["acc,none"] <= 1.0
    assert "tiny_choice" in proc.stdout and "acc" in proc.stdout
    unknown = cli("eval", runs / "lora", "--tasks", "no_such_task", "--include-path", tmp_path / "tasks")
    assert unknown.returncode == 2 and "no_such_task" in unknown.stderr


@pytest.mark.parametrize("name", ["bf16", "nf4"])
def test_export_of_a_two_rank_checkpoint_in_one_process_is_the_runs_own_export(runs, name, tmp_path):
    ok(cli("export", runs / name / "checkpoints/step-00000004", "--out", tmp_path))
    mine, theirs = (
        load_file(str(tmp_path / "merged/model.safetensors")),
        load_file(str(runs / name / "merged/model.safetensors")),
    )
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    assert json.loads((tmp_path / "merged/config.json").read_text())["dtype"] == (
        "bfloat16" if name == "bf16" else "float32"
    )
    if name == "bf16":  # an earlier checkpoint exports too, and differs (in-process: the same function)
        from scalora_dist.run.export import export_checkpoint

        export_checkpoint(runs / name / "checkpoints/step-00000002", tmp_path / "two")
        earlier = load_file(str(tmp_path / "two/model.safetensors"))
        assert any(not torch.equal(earlier[k], theirs[k]) for k in theirs)


def test_export_of_a_lora_checkpoint_writes_its_adapter_and_refuses_bad_input(runs, tmp_path):
    ok(cli("export", runs / "lora" / "checkpoints/step-00000004", "--out", tmp_path))
    mine = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    theirs = load_file(str(runs / "lora" / "adapter/adapter_model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text()) == json.loads(
        (runs / "lora" / "adapter/adapter_config.json").read_text()
    )
    bad = cli("export", runs / "lora", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "COMPLETE" in bad.stderr and "Traceback" not in bad.stderr
    partial = runs / "lora" / "checkpoints" / ".tmp-step-00000009"
    partial.mkdir()
    bad = cli("export", partial, "--out", tmp_path / "y")
    assert bad.returncode == 2 and "interrupted save" in bad.stderr


def test_plot_draws_each_runs_curves(runs, tmp_path):
    from scalora_dist.plot import plot_runs

    ok(cli("plot", runs / "lora", runs / "bf16", "--out", tmp_path / "runs.png"))
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    fig = plot_runs([runs / "lora", runs / "bf16"], tmp_path / "again.png")
    loss_ax, eval_ax, lr_ax, kind_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.lines]
    assert labels == ["rsLoRA r=2", "ScaLoRA r=2"]
    metrics = [json.loads(l) for l in (runs / "bf16" / "metrics.jsonl").read_text().splitlines()]
    steps, losses = loss_ax.lines[1].get_xdata(), loss_ax.lines[1].get_ydata()
    assert list(steps) == [r["step"] for r in metrics] and list(losses) == [r["loss"] for r in metrics]
    assert [round(v, 12) for v in lr_ax.lines[0].get_ydata()] == [
        round(json.loads(l)["lr"], 12) for l in (runs / "lora" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [json.loads(l) for l in (runs / "lora" / "eval.jsonl").read_text().splitlines()]
    assert list(eval_ax.lines[0].get_ydata()) == [r["eval_loss"] for r in evals]
    shares = {line.get_label(): line.get_ydata() for line in kind_ax.lines}  # ScaLoRA only
    assert set(shares) == {"ScaLoRA r=2: column", "ScaLoRA r=2: scalar", "ScaLoRA r=2: skipped"}
    total = shares["ScaLoRA r=2: column"] + shares["ScaLoRA r=2: scalar"] + shares["ScaLoRA r=2: skipped"]
    assert all(abs(t - 1) < 1e-9 for t in total)
    bad = cli("plot", tmp_path, "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_sample_prompts_are_written_at_each_evaluation(runs):
    samples = [json.loads(l) for l in (runs / "lora" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [
        (2, "The fox"),
        (2, "Anna takes"),
        (4, "The fox"),
        (4, "Anna takes"),
    ]
    assert all(isinstance(s["completion"], str) for s in samples)
