"""ReLoRA, the merge-and-restart baseline: a restart resets exactly the adapter and its
optimizer state, keeps the function, ramps the learning rate up again, and gives the same
model on 1 and 2 ranks and across a resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_ok, assert_same_weights, merged_weights, train_job
from test_train import QUICKSTART_TRAIN, _config, _logits, _probe_ids

from scalora_dist.config import ConfigError, ReLoRAConfig, load_config
from scalora_dist.model.lora import initial_lora_A, lora_layers
from scalora_dist.relora import rewarmup_factor
from scalora_dist.train import FAULT_ENV, setup, train_step

RELORA = ["adapter.method=relora", "adapter.relora.restart_every=3", "adapter.relora.rewarmup_steps=1"]


def test_rewarmup_ramps_after_each_restart_only():
    cfg = ReLoRAConfig(restart_every=4, rewarmup_steps=2)
    assert [rewarmup_factor(t, cfg) for t in range(12)] == [
        1,
        1,
        1,
        1,
        1 / 3,
        2 / 3,
        1,
        1,
        1 / 3,
        2 / 3,
        1,
        1,
    ]
    assert all(rewarmup_factor(t, ReLoRAConfig(restart_every=4, rewarmup_steps=0)) == 1 for t in range(12))


def test_a_restart_merges_resets_the_adapter_and_its_optimizer_state_and_nothing_else(tiny_llama, tmp_path):
    cfg = _config(tiny_llama, tmp_path, *RELORA, "adapter.relora.restart_every=4", "train.max_steps=8")
    run = setup(cfg)
    layers = lora_layers(run.model)
    ids = _probe_ids(tiny_llama)
    for step in range(3):
        train_step(run, step)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
    expected_weights = {
        n: (l.weight.double() + l.scale * l.lora_B.double() @ l.lora_A.double()) for n, l in layers.items()
    }
    # what the 4th step (the last before the restart) does, then the restart
    torch.manual_seed(0)
    snapshot = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in layers.items()}
    train_step(run, 3)
    expected_weights = {
        n: l.weight.double() + l.scale * l.lora_B.double() @ l.lora_A.double() for n, l in layers.items()
    }
    assert any(not torch.equal(snapshot[n][1], l.lora_B) for n, l in layers.items())
    # train_step(3) restarted after its optimizer step: the function is that of the merged model
    logits_after = _logits(run.model, ids)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.weight.double(), expected_weights[name], rtol=0, atol=1e-6)
        assert torch.count_nonzero(layer.lora_B) == 0
        fresh = initial_lora_A(name, layer.rank, layer.in_features, cfg.train.seed + 7919)
        assert torch.equal(layer.lora_A.detach(), fresh)
        assert not torch.equal(fresh, initial_lora_A(name, layer.rank, layer.in_features, cfg.train.seed))
        for param in (layer.lora_A, layer.lora_B):
            state = run.optimizer.state[param]
            assert state["step"].item() == 0
            assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    # nothing else changed: the other weights, embeddings and norms are the frozen originals
    for name, p in run.model.named_parameters():
        if name in frozen and not any(name == f"{n}.weight" for n in layers):
            assert torch.equal(p, frozen[name]), name
    # and the function is kept: the merged weights with a zero lora_B give the same logits
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.copy_(expected_weights[name].float())
    torch.testing.assert_close(_logits(run.model, ids), logits_after, rtol=0, atol=1e-5)
    # the next step is a first AdamW step again, at the re-warmed-up lr (1/2 of the schedule's)
    assert run.scheduler.get_last_lr()[0] == pytest.approx(cfg.train.lr * 0.5 * _cosine(4, 8), rel=1e-6)
    train_step(run, 4)
    for layer in layers.values():
        assert run.optimizer.state[layer.lora_A]["step"].item() == 1


def _cosine(step: int, total: int) -> float:
    import math

    return 0.5 * (1 + math.cos(math.pi * step / total))


def test_relora_on_two_ranks_and_across_a_resume_gives_the_one_process_model(tiny_llama, tmp_path):
    """Restarts after steps 3 and 6 of 8 (the last one is merged at export): the 2-rank model
    equals the one-process model, and so does a run stopped at step 4 and resumed."""
    steps = ["train.max_steps=8", *RELORA]
    one = tmp_path / "one"
    assert_ok(train_job(tiny_llama, one, 1, *steps))
    two = tmp_path / "two"
    assert_ok(train_job(tiny_llama, two, 2, *steps))
    assert_same_weights(merged_weights(one), merged_weights(two))
    replicated = tmp_path / "two-replicated"  # the base whole on every rank: each merges all of lora_B
    assert_ok(train_job(tiny_llama, replicated, 2, *steps, "model.base_placement=replicated"))
    assert_same_weights(merged_weights(one), merged_weights(replicated))
    lrs = [json.loads(l)["lr"] for l in (one / "metrics.jsonl").read_text().splitlines()]
    # each record's lr is the next step's: the cosine schedule, halved right after each restart
    relora = ReLoRAConfig(restart_every=3, rewarmup_steps=1)
    expected = [1e-2 * _cosine(t, 8) * rewarmup_factor(t, relora) for t in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert expected[2] < 0.6 * 1e-2 * _cosine(3, 8)

    resumed = tmp_path / "resumed"
    crashed = train_job(tiny_llama, resumed, 1, *steps, "train.save_every=4", env={FAULT_ENV: "0:5"})
    assert crashed.returncode != 0 and (resumed / "checkpoints/step-00000004").is_dir()
    assert_ok(train_job(tiny_llama, resumed, 1, *steps, "train.save_every=4", resume="latest"))
    assert_same_weights(merged_weights(one), merged_weights(resumed))


@pytest.mark.parametrize(
    "override, message",
    [
        (["adapter.relora.rewarmup_steps=5", "adapter.relora.restart_every=5"], "adapter.relora.rewarmup_steps"),
        (["adapter.relora.restart_every=0"], "adapter.relora.restart_every"),
        (["model.load_in_4bit=true"], "relora cannot merge into a 4-bit base"),
    ],
)
def test_bad_relora_settings_name_the_key(override, message, tiny_llama):
    with pytest.raises(ConfigError, match=message):
        load_config(
            None,
            [
                f"model.path={tiny_llama}",
                f"data.train_files=[{QUICKSTART_TRAIN}]",
                "train.max_steps=2",
                "adapter.method=relora",
                *override,
            ],
        )
