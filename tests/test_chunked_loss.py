"""The chunked loss head: the loss and gradients of transformers' plain path, without the
whole logits, on real tiny models (tied and untied heads, Gemma-3's multimodal class and its
logit soft-capping), with packing and masked labels, in one process and on 2 FSDP2 ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_ok, assert_same_weights, logged_losses, merged_weights, train_job
from transformers import AutoModelForCausalLM

from scalora_dist.config import ConfigError
from scalora_dist.model.chunked_loss import chunked_causal_lm_loss, enable_chunked_loss


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


@pytest.mark.parametrize("arch, softcap", [("llama", None), ("gemma3-multimodal", None), ("gemma3", 5.0)])
def test_chunked_loss_equals_the_plain_loss_and_gradients(tiny_model, arch, softcap):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32)
    if softcap:
        model.config.get_text_config().final_logit_softcapping = softcap
    model.requires_grad_(True)
    chunked = copy.deepcopy(model)
    enable_chunked_loss(chunked, chunk_tokens=7)  # 48 positions: 7 chunks, the last one short
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
        torch.testing.assert_close(chunked(input_ids=batch["input_ids"]).logits,
                                   model(input_ids=batch["input_ids"]).logits)


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
    """2 ranks (the tied head all-gathered by FSDP2), 16-position chunks: the chunked default
    and transformers' plain loss log the same losses and merge the same model (float32:
    measured 4e-8 and 0 when this was written)."""
    chunked, plain = tmp_path / "chunked", tmp_path / "plain"
    assert_ok(train_job(tiny_llama, chunked, 2, "model.loss_chunk_tokens=16"))
    assert_ok(train_job(tiny_llama, plain, 2, "model.chunked_loss=false"))
    a, b = logged_losses(chunked), logged_losses(plain)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6), step
    assert_same_weights(merged_weights(chunked), merged_weights(plain), tol=1e-6)
