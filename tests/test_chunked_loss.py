"""The chunked loss head: the loss and gradients of transformers' plain path, without the
whole logits, on real tiny models (tied and untied heads, Gemma-3's multimodal class and its
logit soft-capping), with packing and masked labels, in one process and on 2 FSDP2 ranks;
through both kernels (ours in PyTorch, and Liger-Kernel's Triton kernels, which run here on
the CPU through Triton's interpreter: see conftest.py)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from helpers import assert_ok, assert_same_weights, logged_losses, merged_weights, train_job
from transformers import AutoModelForCausalLM

from scalora_dist.config import ConfigError, load_config
from scalora_dist.model.chunked_loss import chunked_causal_lm_loss, enable_chunked_loss, resolve_loss_kernel

needs_liger = pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None,
    reason="liger-kernel is not installed (pip install 'scalora-dist[liger]')",
)


def _packed_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[1, 10:13] = -100
    # two packed examples per row, each with its own positions
    position_ids = torch.cat([torch.arange(9), torch.arange(15)]).repeat(2, 1)
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    return dict(input_ids=ids, labels=labels, position_ids=position_ids, num_items_in_batch=num_items)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.double().flatten() for _, g in sorted(grads.items())])


KERNELS = ["torch", pytest.param("liger", marks=needs_liger)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch, softcap", [("llama", None), ("gemma3-multimodal", None), ("gemma3", 5.0)])
def test_chunked_loss_equals_the_plain_loss_and_gradients(tiny_model, arch, softcap, kernel):
    if kernel == "liger" and softcap and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(
            "Triton's interpreter hands Liger's softcap kernel argument over as a Python float, "
            "which the kernel calls .to() on; compiled on CUDA it is a Triton scalar"
        )
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32)
    if softcap:
        model.config.get_text_config().final_logit_softcapping = softcap
    model.requires_grad_(True)
    chunked = copy.deepcopy(model)
    # torch: 48 positions in 7 chunks, the last one short; liger picks its own chunks
    enable_chunked_loss(chunked, chunk_tokens=7 if kernel == "torch" else 0, kernel=kernel)
    assert type(chunked).__name__ == type(model).__name__
    batch = _packed_batch(model.config.get_text_config().vocab_size)
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(chunked, batch)
    assert abs(loss.item() - plain_loss.item()) <= 1e-6 * plain_loss.item()
    assert grads.keys() == plain_grads.keys()
    a, b = _flat(grads), _flat(plain_grads)
    assert ((a - b).norm() / b.norm()).item() <= 1e-6
    # and a wrong head would show: the gradient of the head itself is part of the comparison
    head = [n for n in grads if "embed_tokens" in n or "lm_head" in n]
    assert head and all(grads[n].abs().sum() > 0 for n in head)
    # without labels the model is the original one (generation needs the logits)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits
        )


def test_the_mean_without_a_token_count_and_fully_masked_chunks():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 10, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (1, 10), generator=g)
    labels[0, :6] = -100  # the first chunks of 3 have no label at all
    logits = (hidden @ weight.T).float().view(-1, 30)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, shifted, ignore_index=-100)
    got = chunked_causal_lm_loss(hidden.float(), weight.float(), labels, None, chunk_tokens=3)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # with gradients (taken chunk by chunk inside the forward), against float64 autograd of
    # the dense loss; the masked chunks' rows get exactly zero
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    dense = torch.nn.functional.cross_entropy((h @ w.T).view(-1, 30), shifted, ignore_index=-100)
    dense.backward()
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = chunked_causal_lm_loss(h32, w32, labels, None, chunk_tokens=3)
    (2.5 * loss).backward()  # an incoming gradient other than 1 scales both
    torch.testing.assert_close(h32.grad.double(), 2.5 * h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w32.grad.double(), 2.5 * w.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(h32.grad[0, :5], torch.zeros_like(h32.grad[0, :5]))


def test_a_head_with_a_bias_is_refused_with_the_key_to_turn_it_off(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with pytest.raises(ConfigError, match="model.chunked_loss=false"):
        enable_chunked_loss(model)


def test_chunked_and_plain_loss_train_the_same_model_on_two_fsdp2_ranks(tiny_llama, tmp_path):
    """2 ranks (the tied head all-gathered by FSDP2), checkpointed blocks: the chunked loss
    through each kernel (16-position chunks for ours) and transformers' plain loss log the same
    losses and merge the same model (float32: ours bit for bit, 0; Liger's kernels sum in
    another order, and after 6 AdamW steps the weights differ by 1.2e-6 relative on an AMD
    EPYC, 4e-8 on the Intel CPU this was first measured on). With the blocks' saved inputs
    offloaded to host copies (model.offload_activations) our kernel's run is the same bit for
    bit."""
    checkpointed = "model.gradient_checkpointing=true"
    plain = tmp_path / "plain"
    assert_ok(train_job(tiny_llama, plain, 2, checkpointed, "model.chunked_loss=false"))
    kernels = {"torch": "model.loss_chunk_tokens=16"}
    if importlib.util.find_spec("liger_kernel"):
        kernels["liger"] = "model.loss_chunk_tokens=0"
    for kernel, chunks in kernels.items():
        chunked = tmp_path / kernel
        assert_ok(train_job(tiny_llama, chunked, 2, checkpointed, f"model.loss_kernel={kernel}", chunks))
        a, b = logged_losses(chunked), logged_losses(plain)
        assert a.keys() == b.keys()
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-6), (kernel, step)
        assert_same_weights(merged_weights(chunked), merged_weights(plain), tol=1e-6 if kernel == "torch" else 1e-5)
    offloaded = tmp_path / "torch-offloaded"
    assert_ok(
        train_job(
            tiny_llama,
            offloaded,
            2,
            checkpointed,
            "model.offload_activations=true",
            "model.loss_kernel=torch",
            kernels["torch"],
        )
    )
    assert logged_losses(offloaded) == logged_losses(tmp_path / "torch")
    a, b = merged_weights(offloaded), merged_weights(tmp_path / "torch")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_liger
def test_the_liger_kernel_in_bf16_agrees_with_the_torch_kernel(tiny_llama):
    """bf16 compute: both kernels round the head's matmul to bf16 and take the softmax in
    float32, so they agree to bf16 precision, not bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.requires_grad_(True)
    ours, liger = copy.deepcopy(model), copy.deepcopy(model)
    enable_chunked_loss(ours, kernel="torch")
    enable_chunked_loss(liger, kernel="liger")
    batch = _packed_batch(model.config.vocab_size)
    loss_a, grads_a = _loss_and_grads(ours, batch)
    loss_b, grads_b = _loss_and_grads(liger, batch)
    assert loss_a.dtype == loss_b.dtype == torch.float32
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-3)
    a, b = _flat(grads_a), _flat(grads_b)
    assert ((a - b).norm() / a.norm()).item() < 2e-2


def test_loss_kernel_choice_and_bad_settings(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    # auto: our kernel on a CPU, whatever is installed (Liger's kernels need CUDA)
    assert resolve_loss_kernel("auto", cpu) == "torch"
    assert resolve_loss_kernel("torch", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        ConfigError, match=r"model.loss_kernel: liger (runs Triton kernels on CUDA|needs the liger-kernel)"
    ):
        resolve_loss_kernel("liger", cpu)
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: m}\ndata: {train_files: [d.jsonl]}\ntrain: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="model.loss_kernel: liger is a kernel of the chunked loss"):
        load_config(config, ["model.loss_kernel=liger", "model.chunked_loss=false"])
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens: 64 sets the chunks of model.loss_kernel torch"):
        load_config(config, ["model.loss_kernel=liger", "model.loss_chunk_tokens=64"])
    with pytest.raises(ConfigError, match="model.loss_kernel: 'triton' is not one of auto, torch, liger"):
        load_config(config, ["model.loss_kernel=triton"])
