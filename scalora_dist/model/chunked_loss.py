"""A causal-LM loss that never holds the whole (tokens x vocabulary) logits.

transformers computes `logits = lm_head(hidden)` for every position, upcasts them to
float32 and keeps both for the backward pass: with Gemma-3's 262k vocabulary that is ~3 GiB
per 2,048 tokens, more than the rest of a LoRA step's activations. Here the hidden states go
through the output head a chunk of positions at a time, and each chunk's gradient (with
respect to the hidden states, and to the head's weight when it trains) is taken right there,
in the forward pass, so its logits are freed before the next chunk's and the backward pass
has nothing to recompute: it only hands the gradients on. The loss and the gradients are
those of the plain path.

On CUDA, `model.loss_kernel` can hand the same computation to Liger-Kernel's fused linear
cross-entropy, whose Triton kernels do each chunk's softmax and gradient in place. It takes
each chunk's gradient in the forward pass as well, so neither kernel keeps anything of the
head for the backward pass: with FSDP2 the head's weight is used only while the root module
has it gathered.

The model keeps its class name and parameters: `enable_chunked_loss` swaps the class of the
top-level model for a subclass whose forward calls the decoder (`model.model`) and this loss,
inside the model's own forward, so that FSDP2's hooks on the root module (which gather the
head's weight, tied or not) run as they always do.
"""

from __future__ import annotations

import importlib.util
import os

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
    h, y, divisor = _positions(hidden, labels, num_items_in_batch)
    chunk = chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // head_weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        return _ChunkedLossWithGradients.apply(h, head_weight, y, chunk, softcap, divisor)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start, h_chunk, y_chunk in _labelled_chunks(h, y, chunk):
        total = total + _chunk_loss_sum(h_chunk, head_weight, y_chunk, softcap)
    return total / divisor


def liger_causal_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same loss as `chunked_causal_lm_loss`, through Liger-Kernel's fused linear
    cross-entropy (its own chunk size; each chunk's gradient taken in the forward)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, y, divisor = _positions(hidden, labels, num_items_in_batch)
    weight = head_weight.to(h.dtype)  # the head's matmul in the compute dtype, as lm_head does
    loss_sum = liger_fused_linear_cross_entropy(
        h,
        weight,
        y,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        softcap=softcap or None,
        # a trained head accumulates its gradient over the chunks in float32, as autograd would
        accum_dtype=torch.float32 if weight.requires_grad else None,
    )
    return loss_sum.float() / divisor


def _positions(hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> tuple:
    """(hidden rows, their next-token labels, the divisor of the summed loss): labels shifted
    by one as transformers' ForCausalLMLoss does, the divisor num_items_in_batch or, when it
    is None, the count of labelled positions (the mean)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shifted.reshape(-1).to(h.device)
    if num_items_in_batch is None:
        divisor = (y != IGNORE_INDEX).sum().clamp(min=1)
    else:
        divisor = num_items_in_batch.to(h.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return h, y, divisor


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
            # The chunk's graph lives only inside this loop: keep what it saves where it is
            # (the run's own saved-tensor hooks, model.offload_activations, would copy every
            # chunk's logits to the host and back).
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
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


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = F.linear(h, weight.to(h.dtype)).float()  # the head's matmul in the compute dtype, as lm_head does
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedLossCausalLM:
    """Mixin: the forward of a *ForCausalLM / *ForConditionalGeneration whose loss is
    chunked. Without labels (generation, evaluation of logits) it is the original forward."""

    loss_chunk_tokens: int = 0
    loss_kernel: str = "torch"

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, **kwargs)
        kwargs.pop("logits_to_keep", None)
        outputs = self.model(input_ids=input_ids, **kwargs)
        head = self.get_output_embeddings()
        softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        hidden = outputs.last_hidden_state
        if self.loss_kernel == "liger":
            loss = liger_causal_lm_loss(hidden, head.weight, labels, num_items_in_batch, softcap)
        else:
            loss = chunked_causal_lm_loss(
                hidden, head.weight, labels, num_items_in_batch, self.loss_chunk_tokens, softcap
            )
        return CausalLMOutputWithPast(loss=loss, logits=None)


_CLASSES: dict[type, type] = {}


def resolve_loss_kernel(requested: str, device: torch.device, chunk_tokens: int = 0) -> str:
    """model.loss_kernel for a run on `device`: `torch` or `liger` (see config.ModelConfig)."""
    installed = importlib.util.find_spec("liger_kernel") is not None
    if requested == "auto":
        return "liger" if device.type == "cuda" and installed and not chunk_tokens else "torch"
    if requested == "liger":
        if not installed:
            raise ConfigError(
                "model.loss_kernel: liger needs the liger-kernel package "
                "(pip install 'scalora-dist[liger]'); use torch or auto otherwise"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                f"model.loss_kernel: liger runs Triton kernels on CUDA devices, and this run is on "
                f"{device.type}; use torch or auto (TRITON_INTERPRET=1 runs them on the CPU through "
                "Triton's interpreter, slowly: for tests)"
            )
    return requested


def enable_chunked_loss(model: nn.Module, chunk_tokens: int = 0, kernel: str = "torch") -> None:
    """Give `model` (in place) the chunked loss, computed by `kernel` (`torch` or `liger`, as
    resolve_loss_kernel gives it). Its head must be a plain bias-free linear layer over the
    decoder's last hidden state, which is what every causal LM we load has."""
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
    model.loss_kernel = kernel


def loss_description(model: nn.Module) -> str:
    """How `model` computes its training loss, for the run's first line."""
    if isinstance(model, ChunkedLossCausalLM):
        return f"chunked loss ({model.loss_kernel} kernel)"
    return "plain loss"
