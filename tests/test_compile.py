"""train.compile: torch.compile'd decoder blocks train the same model as eager ones, under
FSDP2 with activation checkpointing and ScaLoRA's in-place merges, without recompiling
step after step."""

from __future__ import annotations

import json

import pytest
from helpers import assert_ok, assert_same_weights, logged_losses, merged_weights, train_job


@pytest.mark.slow
def test_compiled_blocks_train_the_same_model_as_eager_on_two_fsdp2_ranks(tiny_llama, tmp_path):
    """10 ScaLoRA steps (a refactor, with its in-place merge, every step from step 3) on 2
    ranks with gradient checkpointing: same losses and merged model as eager (float32;
    measured 1e-7 relative when written), and the count of compiled frames stops growing once
    the first steps have shown every mode (refactor or not) and shape."""
    common = ["model.gradient_checkpointing=true", "train.max_steps=10", "model.base_placement=sharded"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(train_job(tiny_llama, eager, 2, *common, timeout=600))
    assert_ok(train_job(tiny_llama, compiled, 2, *common, "train.compile=true", timeout=600))
    a, b = logged_losses(eager), logged_losses(compiled)
    assert a.keys() == b.keys() == set(range(1, 11))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert_same_weights(merged_weights(eager), merged_weights(compiled), tol=1e-5)
    frames = [json.loads(line)["compiled_frames"] for line in (compiled / "metrics.jsonl").read_text().splitlines()]
    assert frames[0] >= 1, "nothing was compiled"
    # measured when written: 3, 3, 4, 4, 4, 5, 6, 6, 6, 6 (refactor capture from step 3,
    # a shorter batch, an unpadded batch)
    assert frames[-4:] == [frames[-1]] * 4 and frames[-1] <= 8, f"still recompiling: {frames}"
