"""model.offload_activations: with gradient checkpointing, what the forward keeps for the
backward (each decoder block's input) waits in host memory. On a GPU that frees device
memory; here on the CPU the same hooks make real copies, so these tests show that the
copies train exactly the model the originals do (in one process here, on 2 FSDP2 ranks in
tests/test_chunked_loss.py), and that what is copied is only the block inputs (not, say, the
loss head's logits)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_ok, logged_losses, merged_weights, train_job
from transformers import AutoModelForCausalLM

from scalora_dist.config import ConfigError, load_config
from scalora_dist.model.chunked_loss import enable_chunked_loss
from scalora_dist.train import saved_on_host


def test_offloaded_activations_train_the_same_model_in_bf16(tiny_llama, tmp_path):
    """ScaLoRA (a merge every step after the warm-up), checkpointed blocks, bf16 compute: the
    run whose saved block inputs went through host copies logs the same losses and merges the
    same weights, bit for bit. (Two FSDP2 ranks in float32: tests/test_chunked_loss.py.)"""
    runs = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        assert_ok(
            train_job(
                tiny_llama,
                out,
                1,
                "model.dtype=bfloat16",
                "model.gradient_checkpointing=true",
                f"model.offload_activations={str(offload).lower()}",
            )
        )
        runs[offload] = out
    assert logged_losses(runs[True]) == logged_losses(runs[False])
    a, b = merged_weights(runs[True]), merged_weights(runs[False])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpointed_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.requires_grad_(True)
    enable_chunked_loss(model, chunk_tokens=16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_only_the_block_inputs_and_the_head_gradient_are_offloaded(tiny_llama):
    """What the run's hooks see is what offloading copies: with checkpointing, each block's
    input, the final norm's few tensors and the loss head's gradient of the hidden states;
    never a chunk's logits, which the chunked loss keeps to itself (copying them out and
    back would cost a vocabulary's worth of bytes per token)."""
    model = _checkpointed_model(tiny_llama)
    cfg = model.config
    b, s = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    hidden_states = [t for t in packed if t.shape == (b, s, cfg.hidden_size)]
    assert len(hidden_states) >= cfg.num_hidden_layers  # every block's input
    assert not any(cfg.vocab_size in t.shape for t in packed)
    total = sum(t.numel() * t.element_size() for t in packed)
    # the blocks' inputs, the final norm (input, normed output, 1/rms, weight), the head's
    # gradient of the hidden states: nothing that grows with the blocks' width or the vocabulary
    per_hidden_state = b * s * cfg.hidden_size * 4
    assert total <= (cfg.num_hidden_layers + 3) * per_hidden_state + b * s * 8 + cfg.hidden_size * 4


def test_host_copies_give_the_same_gradients(tiny_llama):
    model = _checkpointed_model(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    grads = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        with saved_on_host(offload):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == model.config.num_hidden_layers
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_offloading_needs_checkpointing(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: m}\ndata: {train_files: [d.jsonl]}\ntrain: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="model.offload_activations: needs model.gradient_checkpointing=true"):
        load_config(config, ["model.offload_activations=true"])
    assert load_config(config, ["model.offload_activations=true", "model.gradient_checkpointing=true"])
