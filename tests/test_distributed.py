"""Distributed training for real: torchrun jobs started by the CLI, FSDP2 on gloo.

Tolerance: N ranks sum the same float32 numbers in a different order (sharded Gram partial
sums, reduce-scattered gradients), so results agree to float32 rounding, ~1e-7 relative per
operation; a few Adam steps (which normalise small gradients) grow that to ~1e-6. We assert
a relative error below 2e-5 per tensor, far below any real divergence (a wrong shard, scale
or missing reduction shows up at 1e-2 or more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    assert_ok,
    assert_same_weights,
    logged_losses,
    merged_weights,
    train_job,
)
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_scalora_on_1_2_and_4_ranks_gives_the_same_model(tiny_llama, tmp_path):
    """Sharded on 2 ranks; with model.base_placement auto (the default) on 4 ranks and a
    memory budget too small for the base whole (it shards), and on 2 ranks with the default
    budget (the base whole on every rank: every rank merges the whole increment into its own
    copy). The run's first line says which placement auto took and why; config.yaml records it."""
    runs = {
        1: assert_ok(train_job(tiny_llama, tmp_path / "w1", 1)),
        2: assert_ok(train_job(tiny_llama, tmp_path / "w2", 2, "model.base_placement=sharded")),
        4: assert_ok(train_job(tiny_llama, tmp_path / "w4", 4, "model.memory_per_rank_gib=0.0001")),
    }
    auto = assert_ok(train_job(tiny_llama, tmp_path / "w2-replicated", 2, quiet=False))
    assert "base placement replicated: " in auto.stdout and "fits the budget of" in auto.stdout
    assert "base_placement: replicated" in (tmp_path / "w2-replicated/config.yaml").read_text()
    assert "base_placement: sharded" in (tmp_path / "w4/config.yaml").read_text()
    assert runs[2].stdout.count("done:") == 1  # only rank 0 prints
    reference = merged_weights(tmp_path / "w1")
    base = load_file(str(Path(tiny_llama) / "model.safetensors"))
    moved = max(((reference[k] - base[k]).norm() / base[k].norm()).item() for k in base)
    assert moved > 1e-3, "training must change the weights for the comparison to mean anything"
    for run in ("w2", "w4", "w2-replicated"):
        assert_same_weights(reference, merged_weights(tmp_path / run))
        for step, loss in logged_losses(tmp_path / "w1").items():
            assert logged_losses(tmp_path / run)[step] == pytest.approx(loss, rel=1e-5)
    records = [json.loads(l) for l in (tmp_path / "w2/metrics.jsonl").read_text().splitlines()]
    refactors = [r for r in records if "scalora_column" in r]
    assert len(refactors) == 4 and all(r["scalora_collectives"] == 1 for r in refactors)
    # replicated: lora_B's rows travel in the same one all-reduce (sharded: none of them)
    records = [json.loads(l) for l in (tmp_path / "w2-replicated/metrics.jsonl").read_text().splitlines()]
    replicated = [r for r in records if "scalora_column" in r]
    assert all(r["scalora_collectives"] == 1 for r in replicated)
    assert min(r["scalora_gathered_bytes"] for r in replicated) > max(r["scalora_gathered_bytes"] for r in refactors)


def test_scalora_communication_is_one_small_all_reduce(tiny_model, tmp_path):
    """Measured at the dispatcher: one all-reduce of L x 2 x (2r)^2 float64 per refactor,
    the same for hidden size 64 and 128 (independent of the model width)."""
    from scalora_dist.model.tiny import make_tiny_model

    wide = make_tiny_model(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    results = {}
    for name, model_dir in (("narrow", tiny_model("llama")), ("wide", wide)):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                str(REPO / "tests/workers/dist_comm_worker.py"),
                str(model_dir),
                str(out),
                "model.base_placement=sharded",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[name] = json.loads(out.read_text())
    for r in results.values():
        expected = r["layers"] * 2 * (2 * r["rank"]) ** 2 * 8
        assert r["refactor"] == [["allreduce_", expected]]
        assert r["reported_bytes"] == expected and r["gathered_bytes"] == 0
    fsdp = {n: sum(b for op, b in r["step"] if op != "allreduce_") for n, r in results.items()}
    assert fsdp["wide"] > 2 * fsdp["narrow"]  # FSDP's own traffic grows with the width


def test_a_replicated_base_communicates_like_ddp_one_gather_and_one_reduce_scatter_a_step(tiny_llama, tmp_path):
    """base_placement: replicated leaves FSDP2 the adapters, norms and embeddings only, as one
    group: a step all-gathers once and reduce-scatters once (plus the loss's and ScaLoRA's
    all-reduces), where the sharded base pays a gather per block and a reduce-scatter per block,
    and it moves none of the base's weights."""
    calls = {}
    for placement in ("sharded", "replicated"):
        out = tmp_path / f"{placement}.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                str(REPO / "tests/workers/dist_comm_worker.py"),
                str(tiny_llama),
                str(out),
                f"model.base_placement={placement}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        calls[placement] = json.loads(out.read_text())["step"]

    def fsdp(placement: str, kind: str) -> list[int]:
        return [b for op, b in calls[placement] if kind in op]

    blocks = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert len(fsdp("replicated", "allgather")) == 1 and len(fsdp("replicated", "reduce_scatter")) == 1
    assert len(fsdp("sharded", "allgather")) >= 2 * blocks and len(fsdp("sharded", "reduce_scatter")) >= blocks
    assert sum(fsdp("replicated", "allgather")) < sum(fsdp("sharded", "allgather")) / 2


def test_resume_reproduces_the_uninterrupted_run_on_the_same_and_other_rank_counts(tiny_llama, tmp_path):
    """The interrupted run keeps its base whole on every rank (base_placement: replicated):
    its checkpoints hold plain tensors where the uninterrupted run's hold shards."""
    steps = ["train.max_steps=8", "train.save_every=4", "train.keep_last=3"]
    assert_ok(train_job(tiny_llama, tmp_path / "full", 2, *steps))
    steps.append("model.base_placement=replicated")

    # A rank that raises ends the whole job instead of hanging; the launcher reports its error
    # once, in one line with its rank, and exits 1 (a failed run).
    crashed = train_job(tiny_llama, tmp_path / "crash", 2, *steps, env={"SCALORA_DIST_FAULT": "1:6"}, timeout=240)
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert crashed.stderr.count("error:") == 1
    assert "[rank1] error: RuntimeError: SCALORA_DIST_FAULT: injected failure at step 6 on rank 1" in crashed.stderr
    assert "Traceback" not in crashed.stderr and "ChildFailedError" not in crashed.stderr
    ckpts = sorted(p.name for p in (tmp_path / "crash/checkpoints").iterdir())
    assert ckpts == ["step-00000004"]

    assert_ok(train_job(tiny_llama, tmp_path / "crash", 2, *steps, resume="latest"))
    reference = merged_weights(tmp_path / "full")
    assert_same_weights(reference, merged_weights(tmp_path / "crash"))
    full_losses = logged_losses(tmp_path / "full")
    resumed_losses = logged_losses(tmp_path / "crash")
    assert sorted(resumed_losses) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)

    # The 2-rank checkpoint resumes on 1 process (same global batch: micro-batch 4 x 1).
    checkpoint = tmp_path / "crash/checkpoints/step-00000004"
    assert_ok(train_job(tiny_llama, tmp_path / "one", 1, *steps, resume=checkpoint))
    assert_same_weights(reference, merged_weights(tmp_path / "one"))
    for step, loss in logged_losses(tmp_path / "one").items():
        assert loss == pytest.approx(full_losses[step], rel=1e-5)


def test_activation_checkpointing_under_fsdp2_changes_nothing(tiny_llama, tmp_path):
    assert_ok(train_job(tiny_llama, tmp_path / "plain", 1))
    assert_ok(train_job(tiny_llama, tmp_path / "ckpt", 2, "model.gradient_checkpointing=true"))
    assert_same_weights(merged_weights(tmp_path / "plain"), merged_weights(tmp_path / "ckpt"))


def test_world_size_that_cannot_shard_the_adapter_is_a_clear_error(tiny_llama, tmp_path):
    proc = train_job(tiny_llama, tmp_path / "w3", 3, "train.micro_batch_size=1", timeout=240)
    assert proc.returncode != 0
    assert "do not divide by 3" in proc.stderr
    proc = train_job(tiny_llama, tmp_path / "offload", 2, "model.cpu_offload=true", timeout=240)
    assert proc.returncode != 0 and "model.cpu_offload" in proc.stderr
