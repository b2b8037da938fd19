"""End to end: the recipe and the CLI on real tiny transformers models and real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from scalora_dist.config import load_config
from scalora_dist.model.lora import lora_layers
from scalora_dist.model.tiny import ARCHITECTURES
from scalora_dist.train import TrainingError, export, setup, train, train_step

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_TRAIN = REPO / "configs/data/quickstart_train.jsonl"
QUICKSTART_EVAL = REPO / "configs/data/quickstart_eval.jsonl"


def _config(model_dir, out_dir, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train_files=[{QUICKSTART_TRAIN}]",
            "data.max_length=64",
            "data.packing=true",
            "adapter.rank=2",
            "adapter.alpha=4",
            "adapter.scalora.warmup_steps=2",
            "train.max_steps=6",
            "train.micro_batch_size=4",
            "train.lr=1e-2",
            f"output.dir={out_dir}",
            *overrides,
        ],
    )


def _probe_ids(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([tok("the fox sees the owl near the lake at night")["input_ids"]])


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quickstart_cli_end_to_end(tiny_llama, tmp_path):
    """The README's quickstart, with fewer steps: progress, metrics, eval, merged export."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalora_dist.cli",
            "train",
            "configs/quickstart.yaml",
            f"model.path={tiny_llama}",
            f"output.dir={out}",
            "train.max_steps=12",
            "train.log_every=2",
            "train.eval_every=6",
            "train.eval_batches=4",
            "adapter.scalora.warmup_steps=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: 12 steps" in proc.stdout and "eval @ step 12" in proc.stdout
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(isinstance(r[key], (int, float)) for r in records), key
    refactored = [r for r in records if "scalora_column" in r]
    assert refactored and refactored[-1]["scalora_refactors"] == 2  # steps 11 and 12
    assert all(r["scalora_column"] + r["scalora_scalar"] + r["scalora_skipped"] == 2 * 14 for r in refactored[1:])
    assert refactored[-1]["scalora_mean_alpha"] > 0 and refactored[-1]["scalora_mean_beta"] > 0
    evals = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [6, 12]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = torch.tensor([tok("the fox")["input_ids"]])
    assert torch.isfinite(merged(input_ids=ids).logits).all()
    assert not (out / "adapter").exists()  # a ScaLoRA result is not an adapter
    assert list((out / "merged").glob("*.safetensors"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scalora_on_each_architecture_exports_what_it_trained(arch, tiny_model, tmp_path):
    cfg = _config(tiny_model(arch), tmp_path, "train.max_steps=5")
    run = setup(cfg)
    for step in range(cfg.train.max_steps):
        result = train_step(run, step)
        assert torch.isfinite(torch.tensor(result.loss))
    ids = _probe_ids(cfg.model.path)
    expected = _logits(run.model, ids)
    export(run, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-4), "training changed nothing"


def _update_rank(method, model_dir, tmp_path, steps=30, rank=2):
    cfg = _config(
        model_dir,
        tmp_path,
        f"adapter.method={method}",
        f"adapter.rank={rank}",
        "adapter.target_modules=[layers.0.self_attn.q_proj]",
        f"train.max_steps={steps}",
        "train.lr=2e-2",
    )
    run = setup(cfg)
    (layer,) = lora_layers(run.model).values()
    initial = layer.weight.detach().double().clone()
    for step in range(steps):
        train_step(run, step)
    delta = (layer.lora_B.double() @ layer.lora_A.double()) * layer.scale
    update = layer.weight.double() + delta - initial
    s = torch.linalg.svdvals(update)
    return int((s > s[0] * 1e-6).sum()), run


def test_accumulated_update_is_high_rank_for_scalora_and_low_rank_for_lora(tiny_llama, tmp_path):
    rank = 2
    lora_rank, lora_run = _update_rank("lora", tiny_llama, tmp_path / "lora", rank=rank)
    scalora_rank, _ = _update_rank("scalora", tiny_llama, tmp_path / "scalora", rank=rank)
    assert lora_rank <= rank
    assert scalora_rank > 4 * rank, scalora_rank
    (layer,) = lora_layers(lora_run.model).values()
    assert layer.lora_B.abs().max() > 0  # LoRA did learn something


def test_auto_kappa_is_the_same_with_or_without_an_lr_warmup(tiny_llama, tmp_path):
    """kappa='auto' is taken at the first refactor (after 10 steps here). With a 10-step LR
    warm-up the adapters have seen 0.45x the learning rate of a constant schedule, and the
    raw ||a_i|| ||b_i|| (the rule before) comes out about that much smaller; the rule
    divides it out, so both schedules give kappa within 1.5x of each other."""

    def first_kappa(name, *overrides):
        cfg = _config(
            tiny_llama,
            tmp_path / name,
            "adapter.scalora.warmup_steps=10",
            "train.max_steps=11",
            "train.lr=3e-3",
            *overrides,
        )
        run = setup(cfg)
        for step in range(11):
            train_step(run, step)
        return run.scalora.kappa, run.scalora.lr_fraction(10)

    k_const, fraction_const = first_kappa("constant", "train.lr_scheduler=constant", "train.warmup_steps=0")
    k_warm, fraction_warm = first_kappa("warm", "train.lr_scheduler=cosine", "train.warmup_steps=10")
    assert fraction_const == 1.0 and fraction_warm == pytest.approx(0.45)
    assert 1 / 1.5 < k_warm / k_const < 1.5, (k_warm, k_const)
    assert k_warm * fraction_warm / k_const < 0.7, "the raw product should shrink under the warm-up"


def test_per_layer_auto_kappa_is_each_layers_own_mean_column_pair_size(tiny_llama, tmp_path):
    """kappa_scope: layer. At the first refactor each layer's kappa is the mean over its
    columns of ||a_i|| ||b_i|| = s ||lora_B[:, i]|| ||lora_A[i]|| (float64, from the factors
    that refactor sees), divided by the mean lr fraction so far; the layers differ, and the
    run's reported kappa is their mean. kappa_scope: global is the mean over every column."""
    warmup = 3

    def run_to_first_refactor(scope):
        cfg = _config(
            tiny_llama,
            tmp_path / scope,
            f"adapter.scalora.warmup_steps={warmup}",
            f"train.max_steps={warmup + 2}",
            "train.warmup_steps=2",
            f"adapter.scalora.kappa_scope={scope}",
        )
        run = setup(cfg)
        for step in range(warmup):
            train_step(run, step)
        layers = run.scalora.layers
        sizes = [
            (l.scale * l.lora_B.detach().double().norm(dim=0) * l.lora_A.detach().double().norm(dim=1)) for l in layers
        ]
        return run, sizes, train_step(run, warmup).report

    run, sizes, report = run_to_first_refactor("layer")
    fraction = run.scalora.lr_fraction(warmup)
    assert fraction < 1  # the LR warm-up: what the rule divides out
    expected = [float(s.mean()) / fraction for s in sizes]
    assert len(run.scalora.kappa) == len(expected) > 1
    for got, want in zip(run.scalora.kappa, expected):
        assert got == pytest.approx(want, rel=1e-12)
    assert max(expected) > 1.2 * min(expected), "tiny layers that all agree would test nothing"
    assert report.kappa == pytest.approx(sum(expected) / len(expected), rel=1e-12)

    # the per-layer kappas are in the checkpoint: a resumed run takes the next step exactly
    from scalora_dist.train import restore, save

    checkpoint = save(run, tmp_path / "ckpt", warmup + 1)
    resumed = setup(
        _config(
            tiny_llama,
            tmp_path / "resumed",
            f"adapter.scalora.warmup_steps={warmup}",
            f"train.max_steps={warmup + 2}",
            "train.warmup_steps=2",
            "adapter.scalora.kappa_scope=layer",
        )
    )
    assert restore(resumed, checkpoint) == warmup + 1 and resumed.scalora.kappa == run.scalora.kappa
    train_step(run, warmup + 1)
    train_step(resumed, warmup + 1)
    for name, layer in lora_layers(run.model).items():
        assert torch.equal(layer.weight, lora_layers(resumed.model)[name].weight), name

    run, sizes, _ = run_to_first_refactor("global")
    assert run.scalora.kappa == pytest.approx(float(torch.cat(sizes).mean()) / fraction, rel=1e-12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_export_loads_in_peft_with_the_same_logits(use_rslora, tiny_llama, tmp_path):
    from peft import PeftModel

    cfg = _config(
        tiny_llama,
        tmp_path,
        "adapter.method=lora",
        f"adapter.use_rslora={use_rslora}",
        "adapter.rank=4",
        "adapter.alpha=8",
        "adapter.target_modules=[q_proj,v_proj,down_proj]",
    )
    train(cfg, show_progress=False)
    adapter_cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["use_rslora"] is use_rslora and adapter_cfg["r"] == 4
    ids = _probe_ids(tiny_llama)
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(peft_model, ids), merged, rtol=1e-4, atol=1e-5)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama), ids)
    assert not torch.allclose(plain, merged, atol=1e-4), "the adapter must change the model"


def test_gradient_accumulation_matches_a_larger_batch(tiny_llama, tmp_path):
    """The step loss is a mean over all labelled tokens of the step, however it is split."""
    one = setup(_config(tiny_llama, tmp_path, "adapter.method=lora", "train.micro_batch_size=4", "data.packing=false"))
    two = setup(
        _config(
            tiny_llama,
            tmp_path,
            "adapter.method=lora",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=2",
            "data.packing=false",
        )
    )
    for step in range(3):
        a, b = train_step(one, step), train_step(two, step)
        assert a.tokens == b.tokens
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)


def test_full_fine_tuning_baseline(tiny_llama, tmp_path):
    cfg = _config(tiny_llama, tmp_path, "adapter.method=full", "adapter.target_modules=[o_proj]", "train.lr=1e-3")
    result = train(cfg, show_progress=False)
    assert result.steps == 6
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    changed = {n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)}
    assert changed and all(n.endswith("o_proj.weight") for n in changed)


def _corrupted_copy(model_dir, out_dir, value: float):
    """A copy of the checkpoint with one non-finite weight, as a broken download would be."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = value
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_llama, tmp_path):
    """A corrupted checkpoint (an inf weight) gives a NaN loss at the first step."""
    cfg = _config(_corrupted_copy(tiny_llama, tmp_path / "corrupt", float("inf")), tmp_path / "out")
    with pytest.raises(TrainingError, match=r"step 1: loss is nan"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "out/merged").exists()


def test_non_finite_loss_can_skip_the_update(tiny_llama, tmp_path):
    corrupt = _corrupted_copy(tiny_llama, tmp_path / "corrupt", float("nan"))
    cfg = _config(
        corrupt, tmp_path / "out", "train.on_nonfinite_loss=skip", "train.max_steps=3", "output.save_merged=false"
    )
    run = setup(cfg)
    factors = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    results = [train_step(run, step) for step in range(3)]
    assert all(r.skipped for r in results)
    for n, p in run.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, factors[n]), f"{n} changed by a skipped step"
    train(cfg, show_progress=False)
    records = [json.loads(l) for l in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_nonfinite_steps", 0) for r in records) == 3


def test_resume_auto_starts_fresh_then_continues(tiny_llama, tmp_path):
    cfg = _config(tiny_llama, tmp_path, "train.max_steps=4", "train.save_every=2", "output.save_merged=false")
    result = train(cfg, show_progress=False, resume="auto")  # nothing to resume: fresh start
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]
    result = train(cfg, show_progress=False, resume="auto")  # a restarted finished job: nothing to do
    assert result.nothing_to_do and result.first_step == 4
    cfg = _config(tiny_llama, tmp_path, "train.max_steps=6", "train.save_every=2", "output.save_merged=false")
    result = train(cfg, show_progress=False, resume="auto", extend=True)  # a longer schedule: asked for
    assert [r["step"] for r in result.history] == [5, 6]
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_latest_without_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    proc = _cli_train(f"model.path={tiny_llama}", f"output.dir={tmp_path}/o", "--resume", "latest")
    assert proc.returncode == 2 and "resume 'latest'" in proc.stderr and "Traceback" not in proc.stderr


def test_epochs_derive_the_step_count(tiny_llama, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"the fox number {i} sees the owl"} for i in range(20)])
    cfg = _config(
        tiny_llama,
        tmp_path,
        f"data.train_files=[{data}]",
        "train.max_steps=0",
        "train.epochs=2",
        "data.packing=false",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
    )
    assert setup(cfg).total_steps == 10


def test_tensorboard_logging(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard")
    train(_config(tiny_llama, tmp_path, "output.tensorboard=true", "output.save_merged=false"), show_progress=False)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline_logging(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_config(tiny_llama, tmp_path, "output.wandb=true", "output.save_merged=false"), show_progress=False)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# ---- errors a user sees on the command line --------------------------------------------


def _cli_train(*overrides, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scalora_dist.cli", "train", "configs/quickstart.yaml", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_bad_data_names_file_and_line(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n')
    proc = _cli_train(f"model.path={tiny_llama}", f"data.train_files=[{bad}]", f"output.dir={tmp_path}/o")
    assert proc.returncode == 2
    assert "bad.jsonl:3" in proc.stderr and "Traceback" not in proc.stderr
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"text": "ok"}, {"body": "no text"}])
    proc = _cli_train(f"model.path={tiny_llama}", f"data.train_files=[{missing}]", f"output.dir={tmp_path}/o")
    assert proc.returncode == 2 and "missing.jsonl:2" in proc.stderr and "'text'" in proc.stderr


def test_cli_bad_model_and_targets(tiny_llama, tmp_path):
    proc = _cli_train(f"model.path={tmp_path}/nope", f"output.dir={tmp_path}/o")
    assert proc.returncode == 2 and "model.path" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli_train(f"model.path={tiny_llama}", "adapter.target_modules=[qkv_proj]", f"output.dir={tmp_path}/o")
    assert proc.returncode == 2
    assert "adapter.target_modules: 'qkv_proj' matches no module" in proc.stderr


def test_kappa_schedules_inverse_lr_and_reestimate(tiny_llama, tmp_path):
    """kappa_schedule inverse_lr: every refactor's kappa is the first one's times the peak lr
    over that step's lr (at most 10x); reestimate: every refactor takes kappa: auto again
    from the columns as they are (the raw mean of ||a_i|| ||b_i||, no warm-up correction)."""
    from scalora_dist.scalora import scaling as sm
    from scalora_dist.scalora.refactor import KAPPA_SCHEDULE_CAP, auto_kappa

    def kappas(name, schedule, steps=8):
        cfg = _config(
            tiny_llama,
            tmp_path / name,
            "adapter.scalora.warmup_steps=2",
            f"train.max_steps={steps}",
            "train.lr_scheduler=cosine",
            "train.warmup_steps=0",
            f"adapter.scalora.kappa_schedule={schedule}",
        )
        run = setup(cfg)
        seen = []
        layers = list(lora_layers(run.model).values())
        original = run.scalora.refactor

        def refactor(step):
            grams = [sm.lora_grams(l.lora_A, l.lora_A.grad, l.lora_B, l.lora_B.grad, l.scale)[:2] for l in layers]
            report = original(step)
            seen.append((step, report.kappa, auto_kappa([(P.double(), Q.double()) for P, Q in grams])))
            return report

        run.scalora.refactor = refactor
        for step in range(steps):
            train_step(run, step)
        return run, seen

    run, seen = kappas("inverse", "inverse_lr")
    first = seen[0][1] / run.scalora.schedule_factor(seen[0][0])
    for step, kappa, _ in seen:
        factor = min(KAPPA_SCHEDULE_CAP, 1 / max(run.scheduler.lr_lambdas[0](step), 1 / KAPPA_SCHEDULE_CAP))
        assert kappa == pytest.approx(first * factor, rel=1e-12)
    assert seen[-1][1] > 1.5 * seen[0][1]  # the cosine decay grew it
    _, seen = kappas("reestimate", "reestimate")
    for step, kappa, current in seen[1:]:
        assert kappa == pytest.approx(current, rel=1e-9)  # taken again from the columns now
    assert len({round(k, 12) for _, k, _ in seen}) == len(seen)  # it moves
