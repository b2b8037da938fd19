"""A causal-LM loss that never holds the whole (tokens x vocabulary) logits.

transformers computes `logits = lm_head(hidden)` for every position, upcasts them to
float32 and keeps both for the backward pass: with Gemma-3's 262k vocabulary that is ~3 GiB
per 2,048 tokens, more than the rest of a LoRA step's activations. Here the hidden states go
through the output head a chunk of positions at a time, and each chunk's gradient (with
respect to the hidden states, and to the head's weight when it trains) is taken right there,
in the forward pass, so its logits are freed before the next chunk's and the backward pass
has nothing to recompute: it only hands the gradients on. The loss and the gradients are
those of the plain path.

The model keeps its class name and parameters: `enable_chunked_loss` swaps the class of the
top-level model for a subclass whose forward calls the decoder (`model.model`) and this loss,
inside the model's own forward, so that FSDP2's hooks on the root module (which gather the
head's weight, tied or not) run as they always do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from scalora_dist.config import ConfigError

IGNORE_INDEX = -100
DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Logit elements per chunk by default: 128 MiB of float32 logits, whatever the vocabulary."""


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss of `hidden @ head_weight.T` (labels shifted by one,
    IGNORE_INDEX ignored, the float32 sum divided by `num_items_in_batch`, or the mean when it
    is None), computed `chunk_tokens` positions at a time (0: DEFAULT_CHUNK_ELEMENTS worth).
    `softcap`: Gemma's final_logit_softcapping, tanh(logits/c)*c before the softmax."""
    vocab = head_weight.shape[0]
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shifted.reshape(-1).to(h.device)
    chunk = chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    if num_items_in_batch is None:
        divisor = (y != IGNORE_INDEX).sum().clamp(min=1)
    else:
        divisor = num_items_in_batch.to(h.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        return _ChunkedLossWithGradients.apply(h, head_weight, y, chunk, softcap, divisor)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start, h_chunk, y_chunk in _labelled_chunks(h, y, chunk):
        total = total + _chunk_loss_sum(h_chunk, head_weight, y_chunk, softcap)
    return total / divisor


def _labelled_chunks(h: torch.Tensor, y: torch.Tensor, chunk: int):
    """(start, hidden rows, labels) of each chunk with a labelled position (the others add nothing)."""
    for start in range(0, h.shape[0], chunk):
        y_chunk = y[start : start + chunk]
        if (y_chunk != IGNORE_INDEX).any():
            yield start, h[start : start + chunk], y_chunk


class _ChunkedLossWithGradients(torch.autograd.Function):
    """The chunked loss, each chunk's backward run inside the forward (autograd on the
    chunk's own small graph, the same operations the plain path's backward runs), so only
    the gradients outlive a chunk. The backward multiplies them by the incoming gradient
    (1 for `loss.backward()`, which changes nothing)."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk, softcap, divisor):
        needs_h, needs_weight = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(h) if needs_h else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start, h_chunk, y_chunk in _labelled_chunks(h, y, chunk):
            with torch.enable_grad():
                h_chunk = h_chunk.detach().requires_grad_(needs_h)
                w = weight.detach().requires_grad_(needs_weight)
                loss_sum = _chunk_loss_sum(h_chunk, w, y_chunk, softcap)
                # the gradient of loss_sum / divisor: what the plain path's division sends back
                grads = torch.autograd.grad(loss_sum / divisor, [t for t in (h_chunk, w) if t.requires_grad])
            if needs_h:
                grad_h[start : start + h_chunk.shape[0]] = grads[0]
            if needs_weight:
                grad_weight += grads[-1]
            total = total + loss_sum.detach()
        ctx.save_for_backward(grad_h, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return grad_h, grad_weight, None, None, None, None


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = F.linear(h, weight.to(h.dtype)).float()  # the head's matmul in the compute dtype, as lm_head does
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedLossCausalLM:
    """Mixin: the forward of a *ForCausalLM / *ForConditionalGeneration whose loss is
    chunked. Without labels (generation, evaluation of logits) it is the original forward."""

    loss_chunk_tokens: int = 0

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, **kwargs)
        kwargs.pop("logits_to_keep", None)
        outputs = self.model(input_ids=input_ids, **kwargs)
        head = self.get_output_embeddings()
        softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state, head.weight, labels, num_items_in_batch, self.loss_chunk_tokens, softcap
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)


_CLASSES: dict[type, type] = {}


def enable_chunked_loss(model: nn.Module, chunk_tokens: int = 0) -> None:
    """Give `model` (in place) the chunked loss. Its head must be a plain bias-free linear
    layer over the decoder's last hidden state, which is what every causal LM we load has."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "model") or getattr(head, "bias", None) is not None:
        raise ConfigError(
            f"{type(model).__name__}: no bias-free output head over model.model's hidden states; "
            "set model.chunked_loss=false (the plain loss)"
        )
    cls = type(model)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (ChunkedLossCausalLM, cls), {})
    model.__class__ = _CLASSES[cls]
    model.loss_chunk_tokens = chunk_tokens
