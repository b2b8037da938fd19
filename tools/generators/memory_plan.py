"""Per-rank memory plan for LoRA / ScaLoRA fine-tuning of a 12B-shaped decoder, next to
figures measured on a real decoder layer of that shape.

    python tools/generators/memory_plan.py                          # Gemma-3-12B shape, plan + measurement (~1 min CPU)
    python tools/generators/memory_plan.py --shape mistral-nemo-12b --rank 64 --optimizer adamw8bit
    python tools/generators/memory_plan.py --no-measure             # computed plan only (seconds)
    python tools/generators/memory_plan.py --tiny                   # tiny shape, for tests

Computed plan: GiB per rank for base {bf16, nf4} x method {lora, scalora} x {1, 8, 64} GPUs
(nf4 with several GPUs in both placements: `sharded` codes, or `replicated` codes with
everything else sharded), from the shapes alone, encoding how this repository behaves:

* bf16 base: LoRA leaves the targeted weights in bf16; ScaLoRA keeps them as float32 masters
  (per-step merges are too small for bf16). Embeddings and norms stay bf16.
* nf4 base: every projection is NF4 with double quantisation (bitsandbytes); ScaLoRA adds a
  float32 rank-R accumulator per projection. The QuantState (block scales and tables) stays
  whole on every rank under FSDP2; only the packed codes can be sharded.
* adapters, their gradients and AdamW moments are float32; FSDP2 shards all of them.
  --optimizer adamw8bit (bitsandbytes, 8-bit blockwise moments) applies to one GPU only: our
  FSDP2 path accepts torch AdamW alone (scalora_dist/optim.py).
* FSDP2 working set: two decoder blocks all-gathered in bf16 (current + prefetched; codes
  gathered packed), one block's unsharded float32 adapter gradients before the
  reduce-scatter, and the root group (embeddings, final norm, lm_head), which FSDP2 does
  not reshard after the forward, so it stays whole for the whole step. With the codes
  replicated everything FSDP2 manages is that one root group: all blocks' adapters, norms
  and accumulators whole in bf16, and all adapter gradients in float32 before the one
  reduce-scatter.
* activations: micro-batch b x sequence s per rank. The bytes a decoder layer saves for the
  backward, per token, are measured on the real 12B-shaped layer (bf16 compute, our
  adapters on all 7 projections) or, with --no-measure, come from a structural count of
  what the layer saves (formula_layer_activations); the loss head (logits + float32 log-
  softmax) is counted separately because a 262k vocabulary makes it the largest term.

Measured (--measure, the default): one (or --layers-measured N) real decoder layer of the
chosen shape built with transformers on CPU: bf16 parameter bytes, NF4 bytes after
bitsandbytes quantisation, adapter / gradient / optimizer bytes after one step, and the bytes
saved for the backward at a few short sequence lengths (fitted as constant + per-token +
per-token-squared, so a stored s x s attention matrix would show), next to the computed
numbers. Everything measured is measured on CPU; nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The tool runs as a script: make the repository (scalora_dist) importable whether or not
# the package is installed, as bench_distributed.py does.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from scalora_dist.model.quant import nf4_weight_bytes  # noqa: E402

MiB, GiB = 1024**2, 1024**3
BF16, FP32 = 2, 4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# bitsandbytes keeps, per 4-bit tensor, tables that nf4_weight_bytes (the per-weight cost)
# leaves out: the 16-entry float32 NF4 code, the 256-entry float32 code of the 8-bit
# second-level scales, and a float32 offset. Negligible for 12B layers, not for tiny ones.
NF4_TABLE_BYTES = 16 * FP32 + 256 * FP32 + FP32
# bitsandbytes' 8-bit optimizers: blockwise states of 256 elements with a float32 absmax per
# block; tensors smaller than min_8bit_size keep float32 states; two shared 256-entry maps.
ADAM8BIT_BLOCK, ADAM8BIT_MIN_SIZE, ADAM8BIT_QMAPS = 256, 4096, 2 * 256 * FP32
# Loss-head peak, bytes per (token x vocabulary entry), in the backward of transformers'
# ForCausalLMLoss: the bf16 logits (kept by the model output until backward ends) + the
# float32 log-softmax saved for backward + the float32 gradient arriving at it + the float32
# gradient it produces.
LOSS_HEAD_PEAK_BYTES = BF16 + 3 * FP32
# The chunked loss (model.chunked_loss, the default) holds one chunk of logits at a time:
# CHUNK_ELEMENTS (token x vocabulary entries) per chunk, whatever the sequence length. Per
# chunk element at most its bf16 logits, their float32 upcast and the float32 gradient of the
# softmax (an upper bound: tools/benchmarks/bench_loss.py measures less, see tools/benchmarks/README.md); plus the
# float32 gradient of the hidden states that the chunks fill in turn.
CHUNK_ELEMENTS = 1 << 25  # scalora_dist/model/chunked_loss.py: DEFAULT_CHUNK_ELEMENTS
CHUNKED_LOSS_PEAK_BYTES = BF16 + 2 * FP32


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only model (Llama-style projections)."""

    name: str
    arch: str  # gemma3, llama, mistral or qwen3: which transformers decoder layer the measurement builds
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def projections(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of the 7 adapted projections of one layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def projection_params(self) -> int:
        return sum(m * n for m, n in self.projections().values())

    def norm_params(self) -> int:
        """Per layer: Gemma 3 has four hidden-size norms plus q/k norms over head_dim, Qwen3
        two plus the q/k norms."""
        if self.arch == "gemma3":
            return 4 * self.hidden + 2 * self.head_dim
        if self.arch == "qwen3":
            return 2 * self.hidden + 2 * self.head_dim
        return 2 * self.hidden

    def root_params(self) -> int:
        """Outside the decoder blocks: embeddings, the untied lm_head, the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def rope_types(self) -> int:
        """Distinct rotary tables (Gemma 3: local and global attention layers)."""
        return 2 if self.arch == "gemma3" else 1


SHAPES = {
    "gemma3-12b": Shape(
        "gemma3-12b",
        "gemma3",
        layers=48,
        hidden=3840,
        intermediate=15360,
        heads=16,
        kv_heads=8,
        head_dim=256,
        vocab=262144,
        tied=True,
    ),
    "llama3.1-8b": Shape(
        "llama3.1-8b",
        "llama",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        tied=False,
    ),
    "qwen3-8b": Shape(
        "qwen3-8b",
        "qwen3",
        layers=36,
        hidden=4096,
        intermediate=12288,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        tied=False,
    ),
    "mistral-7b": Shape(
        "mistral-7b",
        "mistral",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=32768,
        tied=False,
    ),
    "mistral-nemo-12b": Shape(
        "mistral-nemo-12b",
        "mistral",
        layers=40,
        hidden=5120,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=131072,
        tied=False,
    ),
}


def tiny_shape(arch: str) -> Shape:
    """A shape of the same architecture small enough for tests (seconds)."""
    return Shape(
        f"tiny-{arch}",
        arch,
        layers=2,
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=2,
        head_dim=16,
        vocab=256,
        tied=arch == "gemma3",
    )


# ---------------------------------------------------------------------------------------
# Computed: bytes from the shapes alone
# ---------------------------------------------------------------------------------------


def nf4_tensor_bytes(m: int, n: int) -> float:
    """Codes + double-quantised scales (tools/benchmarks/bench_quant.py) + bitsandbytes' per-tensor tables."""
    return nf4_weight_bytes(m, n) + NF4_TABLE_BYTES


def nf4_state_bytes(m: int, n: int) -> float:
    """The QuantState part of nf4_tensor_bytes (everything but the packed codes)."""
    return nf4_tensor_bytes(m, n) - m * n / 2


def layer_bf16_bytes(shape: Shape) -> int:
    return (shape.projection_params() + shape.norm_params()) * BF16


def layer_nf4_bytes(shape: Shape) -> float:
    """Projections in NF4, norms in bf16."""
    return sum(nf4_tensor_bytes(m, n) for m, n in shape.projections().values()) + shape.norm_params() * BF16


def adapter_tensor_sizes(shape: Shape, rank: int) -> list[int]:
    """Element counts of one layer's trainable tensors: lora_A (r x in), lora_B (out x r)."""
    return [size for m, n in shape.projections().values() for size in (rank * n, m * rank)]


def adapter_params(shape: Shape, rank: int) -> int:
    return sum(adapter_tensor_sizes(shape, rank))


def adamw_bytes(sizes: Iterable[int]) -> int:
    """torch.optim.AdamW: two float32 moments per element + a float32 `step` per tensor."""
    sizes = list(sizes)
    return sum(sizes) * 2 * FP32 + len(sizes) * FP32


def adamw8bit_bytes(sizes: Iterable[int]) -> float:
    """bitsandbytes AdamW8bit: two uint8 states + a float32 absmax per 256-element block each;
    tensors under min_8bit_size keep two float32 states; the two quantisation maps are shared
    by all 8-bit tensors."""
    sizes = list(sizes)
    total = sum(
        2 * (n + math.ceil(n / ADAM8BIT_BLOCK) * FP32) if n >= ADAM8BIT_MIN_SIZE else 2 * n * FP32 for n in sizes
    )
    return total + (ADAM8BIT_QMAPS if any(n >= ADAM8BIT_MIN_SIZE for n in sizes) else 0)


def optimizer_bytes(optimizer: str, sizes: Iterable[int]) -> float:
    return adamw8bit_bytes(sizes) if optimizer == "adamw8bit" else adamw_bytes(sizes)


def optimizer_for(optimizer: str, gpus: int) -> str:
    """The optimizer a run on `gpus` GPUs actually gets: bitsandbytes' optimizers update plain
    tensors, so our FSDP2 path accepts only torch AdamW (scalora_dist/optim.py,
    check_optimizer); there the state is sharded instead."""
    return optimizer if gpus == 1 else "adamw"


def accumulator_bytes(shape: Shape, acc_rank: int) -> int:
    """ScaLoRA on a 4-bit base: float32 acc_U (out x R) and acc_V (in x R) per projection."""
    return sum((m + n) * acc_rank * FP32 for m, n in shape.projections().values())


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one decoder layer saves for the backward, for b sequences of s tokens:
    constant + per_token * b*s + per_token_sq * b*s*s (the last would be a stored s x s
    attention matrix; SDPA kernels store none)."""

    per_token: float
    constant: float = 0.0
    per_token_sq: float = 0.0
    source: str = "formula"

    def saved(self, b: int, s: int) -> float:
        return self.constant + self.per_token * b * s + self.per_token_sq * b * s * s


def formula_layer_activations(shape: Shape, rank: int) -> LayerActivations:
    """A structural count of what a bf16 decoder layer with float32 LoRA factors on all 7
    projections saves for the backward under SDPA (checked exactly against a real layer in
    tests/test_memory_plan.py). Frozen weights save no inputs of their own (no weight
    gradient), but every adapter's lora_A saves its input, so each projection input is kept."""
    h, i, r = shape.hidden, shape.intermediate, rank
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norm = FP32 * h + FP32  # RMSNorm upcasts its input to float32 and saves it + 1/rms per token
    hidden_norms = 4 if shape.arch == "gemma3" else 2
    per_token = hidden_norms * norm
    if shape.arch in ("gemma3", "qwen3"):  # q_norm / k_norm over each head, in float32 too
        per_token += FP32 * (q + kv) + FP32 * (shape.heads + shape.kv_heads)
    per_token += 2 * BF16 * h  # the normed inputs of attention and MLP (shared by q/k/v, gate/up)
    per_token += BF16 * (q + 2 * kv)  # rotated q, k and v handed to SDPA
    per_token += BF16 * q + FP32 * shape.heads  # SDPA output (= o_proj input) + logsumexp per head
    per_token += 4 * BF16 * i  # MLP: gate, act(gate), up, and their product (down_proj input)
    per_token += len(PROJECTIONS) * BF16 * r  # each adapter's r-wide intermediate (lora_B input)
    # The bf16 compute copies of the float32 factors, saved by each adapter's matmuls; Gemma's
    # norms also save their float32 (1 + weight).
    constant = BF16 * adapter_params(shape, rank)
    if shape.arch == "gemma3":
        constant += FP32 * (4 * h + 2 * shape.head_dim)
    return LayerActivations(per_token, constant, 0.0, "formula")


@dataclass(frozen=True)
class Activations:
    """Per-rank activation memory at its peak, and its parts."""

    boundaries: float  # with checkpointing: the bf16 hidden state kept at every layer input
    layers: float  # saved activations of the layers alive at once (one when checkpointing)
    loss_head: float  # logits / log-softmax peak
    rope: float  # cos / sin tables, shared by all layers
    peak: float
    host: float = 0.0  # model.offload_activations: the boundaries, in host memory instead


def loss_head_peak(shape: Shape, tokens: int, chunked: bool) -> float:
    """Bytes the loss head holds at its peak: the whole logits and their float32 companions
    (transformers' loss), or one chunk of them plus the hidden states' gradient (chunked)."""
    if not chunked:
        return LOSS_HEAD_PEAK_BYTES * tokens * shape.vocab
    return CHUNKED_LOSS_PEAK_BYTES * min(CHUNK_ELEMENTS, tokens * shape.vocab) + FP32 * tokens * shape.hidden


def activations(
    shape: Shape,
    layer: LayerActivations,
    b: int,
    s: int,
    checkpointing: bool,
    chunked_loss: bool = True,
    offload: bool = False,
) -> Activations:
    """With checkpointing, the loss head peaks at the start of the backward, before any layer
    is recomputed; afterwards (plain loss) only the bf16 logits stay while one layer at a time
    is recomputed, or (chunked) nothing of the head. Without checkpointing, every layer's
    activations are alive at the loss. `offload` (model.offload_activations, with
    checkpointing): the layer-input boundaries wait in host memory; the device holds at most
    two of them (the one being computed or copied, and the one copied back for the layer
    being recomputed)."""
    tokens = b * s
    rope = shape.rope_types() * 2 * tokens * shape.head_dim * FP32
    loss_peak = loss_head_peak(shape, tokens, chunked_loss)
    if checkpointing:
        boundary = tokens * shape.hidden * BF16
        boundaries = min(2, shape.layers) * boundary if offload else shape.layers * boundary
        one_layer = layer.saved(b, s)
        kept_logits = 0.0 if chunked_loss else BF16 * tokens * shape.vocab
        peak = boundaries + rope + max(loss_peak, kept_logits + one_layer)
        return Activations(
            boundaries, one_layer, loss_peak, rope, peak, host=shape.layers * boundary if offload else 0.0
        )
    layers = shape.layers * layer.saved(b, s)
    return Activations(0.0, layers, loss_peak, rope, layers + rope + loss_peak)


@dataclass(frozen=True)
class PlanRow:
    """Bytes per rank of one configuration."""

    base: str  # bf16 | nf4
    method: str  # lora | scalora
    gpus: int
    placement: str  # "-" (one GPU or bf16), "sharded" or "replicated" (nf4 codes under FSDP2)
    frozen_base: float
    adapter_params: float
    adapter_grads: float
    optimizer: float
    scalora_extra: float
    activations: float
    working_set: float

    @property
    def total(self) -> float:
        return (
            self.frozen_base
            + self.adapter_params
            + self.adapter_grads
            + self.optimizer
            + self.scalora_extra
            + self.activations
            + self.working_set
        )


def frozen_base_bytes(shape: Shape, base: str, method: str, gpus: int, placement: str) -> float:
    """Base weights as stored, per rank. Embeddings / norms (bf16) are always sharded."""
    other = (shape.layers * shape.norm_params() + shape.root_params()) * BF16 / gpus
    if base == "bf16":
        per_param = FP32 if method == "scalora" else BF16  # ScaLoRA's float32 masters
        return shape.layers * shape.projection_params() * per_param / gpus + other
    codes = shape.layers * sum(m * n / 2 for m, n in shape.projections().values())
    state = shape.layers * sum(nf4_state_bytes(m, n) for m, n in shape.projections().values())
    # The QuantState lives on the module, whole on every rank, in both placements.
    code_share = 1 if placement == "replicated" else gpus
    return codes / code_share + state + other


def scalora_extra_bytes(shape: Shape, base: str, rank: int, acc_rank: int, gpus: int, checkpointing: bool) -> float:
    """What ScaLoRA holds beyond LoRA besides the float32 masters counted in the base.

    nf4: the float32 accumulators (sharded). bf16: nothing at the activation peak. The
    forward casts the float32 masters to the bf16 compute dtype, but lora.frozen_linear
    saves the float32 tensor itself for the backward, not the cast copy (`checkpointing`
    does not matter); on several GPUs the merges' float32 lora_A travels in the refactor's
    all-reduce buffer, which exists only after the backward (refactor_buffer_bytes)."""
    if base == "nf4":
        return shape.layers * accumulator_bytes(shape, acc_rank) / gpus
    return 0.0


def refactor_buffer_bytes(shape: Shape, rank: int) -> float:
    """The refactor's one all-reduce buffer on several GPUs with bf16 compute: every layer's
    whole lora_A in float64 (the statistics beside it are a few KiB). It lives between the
    backward and the optimizer step, when the activations are gone."""
    return shape.layers * sum(rank * n * 8 for _, n in shape.projections().values())


def working_set_bytes(
    shape: Shape, base: str, method: str, rank: int, acc_rank: int, gpus: int, placement: str
) -> float:
    """FSDP2's unsharded parameters (bf16 compute dtype) and gradients; 0 on one GPU."""
    if gpus == 1:
        return 0.0
    projections = shape.projections().values()
    if base == "bf16":
        weights = shape.projection_params() * BF16  # float32 masters are gathered as bf16 too
    elif placement == "sharded":
        weights = sum(m * n / 2 for m, n in projections)  # packed codes, gathered as they are
    else:
        weights = 0.0  # replicated codes are FSDP2 ignored_params: never gathered
    block = weights + shape.norm_params() * BF16 + adapter_params(shape, rank) * BF16
    if base == "nf4" and method == "scalora":
        block += sum((m + n) * acc_rank for m, n in projections) * BF16
    unsharded_grads = adapter_params(shape, rank) * FP32  # reduce-scatter in float32
    root = shape.root_params() * BF16  # the root group is not resharded after the forward
    if placement == "replicated":
        # one FSDP2 group at the root (model/sharding.py): every block's adapters, norms (and
        # accumulators) whole for the step, and all adapter gradients before its one reduce-scatter
        return shape.layers * (block + unsharded_grads) + root
    return 2 * block + unsharded_grads + root


def plan(
    shape: Shape,
    rank: int = 16,
    acc_rank: int = 64,
    micro_batch: int = 1,
    seq_len: int = 2048,
    optimizer: str = "adamw",
    checkpointing: bool = True,
    layer: LayerActivations | None = None,
    gpu_counts: Sequence[int] = (1, 8, 64),
    chunked_loss: bool = True,
    offload: bool = False,
) -> list[PlanRow]:
    """Per-rank bytes for base {bf16, nf4} x method {lora, scalora} x gpu_counts."""
    layer = layer or formula_layer_activations(shape, rank)
    act = activations(shape, layer, micro_batch, seq_len, checkpointing, chunked_loss, offload).peak
    sizes = adapter_tensor_sizes(shape, rank) * shape.layers
    n_adapter = sum(sizes)
    rows = []
    for base in ("bf16", "nf4"):
        for method in ("lora", "scalora"):
            for gpus in gpu_counts:
                placements = ["sharded", "replicated"] if base == "nf4" and gpus > 1 else ["-"]
                for placement in placements:
                    rows.append(
                        PlanRow(
                            base,
                            method,
                            gpus,
                            placement,
                            frozen_base=frozen_base_bytes(shape, base, method, gpus, placement),
                            adapter_params=n_adapter * FP32 / gpus,
                            adapter_grads=n_adapter * FP32 / gpus,
                            # each rank optimises its shard of every tensor
                            optimizer=optimizer_bytes(
                                optimizer_for(optimizer, gpus), (math.ceil(n / gpus) for n in sizes)
                            ),
                            scalora_extra=(
                                scalora_extra_bytes(shape, base, rank, acc_rank, gpus, checkpointing)
                                if method == "scalora"
                                else 0.0
                            ),
                            activations=act,
                            working_set=working_set_bytes(shape, base, method, rank, acc_rank, gpus, placement),
                        )
                    )
    return rows


# ---------------------------------------------------------------------------------------
# Measured: a real decoder layer of the shape, on CPU
# ---------------------------------------------------------------------------------------


@dataclass
class LayerMeasurement:
    """Per-layer figures measured on real modules (divided by the number of layers built)."""

    layers: int
    bf16_param_bytes: float
    nf4_bytes: float
    adapter_param_bytes: float
    adapter_grad_bytes: float
    optimizer_bytes: float
    saved_by_length: dict[int, float] = field(default_factory=dict)
    activations: LayerActivations | None = None
    loss_head_saved_per_token: float = 0.0
    scalora_extra_saved: float = 0.0
    checkpointed_saved_per_token: float = 0.0
    seconds: float = 0.0


def layer_config(shape: Shape, layers: int):
    """A transformers config of the shape's architecture with `layers` decoder layers."""
    import transformers

    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
    )
    if shape.arch == "gemma3":
        config = transformers.Gemma3TextConfig(query_pre_attn_scalar=shape.head_dim, **common)
    else:
        config = getattr(transformers, f"{LAYER_CLASSES[shape.arch]}Config")(**common)
    # The attention modules read this at call time; unset, transformers falls back to eager
    # attention, which stores the s x s probabilities.
    config._attn_implementation = "sdpa"
    return config


LAYER_CLASSES = {"gemma3": "Gemma3", "llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3"}


class DecoderStack(nn.Module):
    """`layers` real decoder layers and their rotary embedding: what our adapters are
    injected into and what the measurement runs forward and backward."""

    def __init__(self, shape: Shape, layers: int):
        super().__init__()
        self.config = layer_config(shape, layers)
        import importlib

        prefix = LAYER_CLASSES[shape.arch]
        modeling = importlib.import_module(f"transformers.models.{shape.arch}.modeling_{shape.arch}")
        Layer, Rotary = getattr(modeling, f"{prefix}DecoderLayer"), getattr(modeling, f"{prefix}RotaryEmbedding")
        self.arch = shape.arch
        self.rotary = Rotary(self.config)
        self.layers = nn.ModuleList(Layer(self.config, layer_idx=i) for i in range(layers))

    def position_embeddings(self, x: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """cos / sin per layer type, computed once and shared by all layers (as in the model)."""
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        if self.arch == "gemma3":
            return {t: tuple(e.to(x.dtype) for e in self.rotary(x, positions, t)) for t in set(self.config.layer_types)}
        return {None: tuple(e.to(x.dtype) for e in self.rotary(x, positions))}

    def forward(self, x: torch.Tensor, rope: dict, checkpointed: bool = False) -> torch.Tensor:
        """`checkpointed`: each layer under torch.utils.checkpoint (non-reentrant), as training
        with model.gradient_checkpointing runs it."""
        from torch.utils.checkpoint import checkpoint

        for i, layer in enumerate(self.layers):
            kind = self.config.layer_types[i] if self.arch == "gemma3" else None
            if checkpointed:
                x = checkpoint(layer, x, position_embeddings=rope[kind], use_reentrant=False)
            else:
                x = layer(x, position_embeddings=rope[kind])
        return x


def quantised_nf4_bytes(weight: torch.Tensor) -> int:
    """Bytes of the packed codes and the whole (double-quantised) QuantState of one weight."""
    import bitsandbytes.functional as bnbf

    codes, state = bnbf.quantize_4bit(
        weight.detach().float().contiguous(), quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8
    )
    tensors = [codes, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    return unique_storage_bytes(tensors)


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def build_measured_stack(shape: Shape, layers: int) -> tuple[DecoderStack, float]:
    """The real stack, built in float32 (random init), its projections quantised to NF4 one
    at a time (for their bytes), then cast to bf16. Returns it and the NF4 bytes."""
    torch.manual_seed(0)
    stack = DecoderStack(shape, layers)
    linears = [m for m in stack.layers.modules() if isinstance(m, nn.Linear)]
    nf4 = float(sum(quantised_nf4_bytes(m.weight) for m in linears))
    others = sum(p.numel() for p in stack.layers.parameters()) - sum(m.weight.numel() for m in linears)
    nf4 += others * BF16  # norms stay bf16
    return stack.to(torch.bfloat16), nf4


def _stack_inputs(stack: DecoderStack, b: int, s: int):
    """b x s bf16 hidden states, their rotary tables, and a pack hook with the dict it fills:
    the bytes of each distinct storage autograd saves, parameters and the shared rotary tables
    left out (saved tensors stay alive until the backward, so no address is reused)."""
    x = torch.randn(b, s, stack.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rope = stack.position_embeddings(x)
    skip = {t.untyped_storage().data_ptr() for t in stack.parameters()}
    skip |= {t.untyped_storage().data_ptr() for pair in rope.values() for t in pair}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    return x, rope, pack, seen


def saved_bytes(stack: DecoderStack, b: int, s: int) -> float:
    """Bytes of the distinct storages autograd saves for the backward in one forward of b x s
    tokens (bf16), leaving out parameters and the shared rotary tables; then the backward."""
    x, rope, pack, seen = _stack_inputs(stack, b, s)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = stack(x, rope)
    y.backward(torch.randn_like(y))
    return float(sum(seen.values()))


def checkpointed_saved_bytes(stack: DecoderStack, b: int, s: int) -> float:
    """Bytes autograd keeps outside the recomputed blocks when every layer is checkpointed
    as in training (torch.utils.checkpoint, non-reentrant): what model.offload_activations
    moves to the host. Parameters and the shared rotary tables left out, as in saved_bytes."""
    x, rope, pack, seen = _stack_inputs(stack, b, s)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = stack(x, rope, checkpointed=True)
    # Counted in the forward, which is when the hooks run (no backward: it would only
    # recompute the layers).
    del y
    return float(sum(seen.values()))


def fit_activations(saved: dict[int, float], b: int) -> LayerActivations:
    """Exact fit of constant + a*(b s) + c*(b s s) through the measured lengths (a line
    through two; with one length, all of it per token)."""
    lengths = sorted(saved)
    if len(lengths) == 1:
        (s,) = lengths
        return LayerActivations(saved[s] / (b * s), source="measured")
    cols = (lambda s: 1.0, lambda s: b * s, lambda s: b * s * s)[: min(3, len(lengths))]
    A = torch.tensor([[f(s) for f in cols] for s in lengths], dtype=torch.float64)
    y = torch.tensor([saved[s] for s in lengths], dtype=torch.float64)
    # Saved bytes are integers, so round away the solver's float noise (and a -0.0).
    coef = [round(c, 3) + 0.0 for c in torch.linalg.lstsq(A, y[:, None]).solution.flatten().tolist()] + [0.0]
    return LayerActivations(per_token=coef[1], constant=coef[0], per_token_sq=coef[2], source="measured")


def loss_head_saved_per_token(vocab: int, b: int, s: int) -> float:
    """Bytes transformers' causal-LM loss saves for the backward per token (bf16 logits in)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(b, s, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ForCausalLMLoss(logits, labels, vocab)
    loss.backward()
    return sum(seen.values()) / (b * s)


def scalora_extra_saved(shape: Shape, rank: int, layers: int, b: int, s: int, lora_saved: float) -> float:
    """Per layer, what ScaLoRA saves for the backward beyond LoRA on a bf16 model in one
    process: inject_adapters makes the targeted weights float32 masters, which the forward
    casts to the bf16 compute dtype; lora.frozen_linear keeps the master, not the cast copy,
    so this should be 0."""
    from scalora_dist.config import AdapterConfig
    from scalora_dist.model.lora import inject_adapters

    torch.manual_seed(0)
    stack = DecoderStack(shape, layers).to(torch.bfloat16)
    inject_adapters(stack, AdapterConfig(method="scalora", rank=rank, alpha=2 * rank, target_modules="all-linear"))
    return saved_bytes(stack, b, s) / layers - lora_saved


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return unique_storage_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def measure_lora_stack(
    shape: Shape, rank: int, optimizer: str, layers: int, b: int, lengths: Sequence[int]
) -> LayerMeasurement:
    """Build `layers` real decoder layers of `shape`, inject our LoRA adapters (all 7
    projections), run forward+backward at each length and one optimizer step. The modules
    are freed on return."""
    from scalora_dist.config import AdapterConfig
    from scalora_dist.model.lora import inject_adapters

    stack, nf4 = build_measured_stack(shape, layers)
    bf16 = sum(p.numel() * p.element_size() for p in stack.layers.parameters())
    inject_adapters(stack, AdapterConfig(method="lora", rank=rank, alpha=2 * rank, target_modules="all-linear"))
    trainable = [p for p in stack.parameters() if p.requires_grad]
    saved = {}
    for s in lengths:
        for p in trainable:
            p.grad = None  # each length's backward starts without gradients
        saved[s] = saved_bytes(stack, b, s) / layers
    s_min = min(lengths)
    checkpointed = checkpointed_saved_bytes(stack, b, s_min) / (layers * b * s_min)
    opt = make_optimizer(optimizer, trainable)
    opt.step()
    return LayerMeasurement(
        layers=layers,
        bf16_param_bytes=bf16 / layers,
        nf4_bytes=nf4 / layers,
        adapter_param_bytes=sum(p.numel() * p.element_size() for p in trainable) / layers,
        adapter_grad_bytes=sum(p.grad.numel() * p.grad.element_size() for p in trainable) / layers,
        optimizer_bytes=optimizer_state_bytes(opt) / layers,
        saved_by_length=saved,
        activations=fit_activations(saved, b),
        checkpointed_saved_per_token=checkpointed,
    )


def measure(
    shape: Shape,
    rank: int,
    optimizer: str,
    layers: int = 1,
    micro_batch: int = 1,
    lengths: Sequence[int] = (64, 128, 256),
) -> LayerMeasurement:
    """Everything the measured table shows, one real stack at a time (bounded memory)."""
    start = time.perf_counter()
    m = measure_lora_stack(shape, rank, optimizer, layers, micro_batch, lengths)
    s_min = min(lengths)
    m.loss_head_saved_per_token = loss_head_saved_per_token(shape.vocab, micro_batch, s_min)
    m.scalora_extra_saved = scalora_extra_saved(shape, rank, layers, micro_batch, s_min, m.saved_by_length[s_min])
    m.seconds = time.perf_counter() - start
    return m


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gib(x: float, unit: int = GiB) -> str:
    return f"{x / unit:.3f}"


def unit_for(rows: list[PlanRow]) -> tuple[int, str]:
    """GiB, or MiB for shapes too small to show in GiB (--tiny)."""
    return (GiB, "GiB") if max(r.total for r in rows) >= GiB else (MiB, "MiB")


def plan_table(rows: list[PlanRow], unit: int = GiB) -> str:
    header = [
        "base",
        "method",
        "GPUs",
        "nf4 codes",
        "frozen base",
        "adapter params",
        "adapter grads",
        "optimizer",
        "ScaLoRA extra",
        "activations",
        "FSDP working set",
        "**total**",
    ]
    cells = (
        "frozen_base",
        "adapter_params",
        "adapter_grads",
        "optimizer",
        "scalora_extra",
        "activations",
        "working_set",
        "total",
    )
    return markdown_table(
        header,
        (
            [
                r.base,
                r.method,
                r.gpus,
                r.placement,
                *(gib(getattr(r, c), unit) for c in cells[:-1]),
                f"**{gib(r.total, unit)}**",
            ]
            for r in rows
        ),
    )


def ratio(measured: float, computed: float) -> str:
    return f"{measured / computed:.4f}" if computed else "–"


def measured_table(shape: Shape, rank: int, optimizer: str, m: LayerMeasurement) -> str:
    formula = formula_layer_activations(shape, rank)
    opt_sizes = adapter_tensor_sizes(shape, rank)
    loss_saved = FP32 * shape.vocab + 8  # the float32 log-softmax output + the int64 label
    rows = [
        ("bf16 parameters (projections + norms), bytes", layer_bf16_bytes(shape), m.bf16_param_bytes),
        ("NF4 projections (codes + QuantState) + bf16 norms, bytes", layer_nf4_bytes(shape), m.nf4_bytes),
        (f"adapter parameters (float32, r = {rank}), bytes", adapter_params(shape, rank) * FP32, m.adapter_param_bytes),
        ("adapter gradients after one backward, bytes", adapter_params(shape, rank) * FP32, m.adapter_grad_bytes),
        (f"{optimizer} state after one step, bytes", optimizer_bytes(optimizer, opt_sizes), m.optimizer_bytes),
        ("saved for backward, per token (bf16 compute)", formula.per_token, m.activations.per_token),
        (
            "saved for backward, constant (bf16 copies of float32 factors etc.)",
            formula.constant,
            m.activations.constant,
        ),
        ("saved for backward, per token x token (s x s attention)", formula.per_token_sq, m.activations.per_token_sq),
        ("loss head saved for backward, per token (float32 log-softmax)", loss_saved, m.loss_head_saved_per_token),
        (
            "kept with checkpointing, per token (the bf16 layer input: what model.offload_activations moves "
            "to the host)",
            shape.hidden * BF16,
            m.checkpointed_saved_per_token,
        ),
        (
            "ScaLoRA, bf16 model, one process: saved beyond LoRA (frozen_linear keeps the float32 masters, "
            "no bf16 copies)",
            0.0,
            m.scalora_extra_saved,
        ),
    ]
    body = []
    for label, computed, measured in rows:
        body.append([label, f"{computed:,.1f}", f"{measured:,.1f}", ratio(measured, computed)])
    return markdown_table(["per decoder layer", "computed", "measured (CPU)", "measured / computed"], body)


def command_line(argv: Sequence[str]) -> str:
    return " ".join(["python tools/generators/memory_plan.py", *argv])


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU, {gpu}"


def describe(shape: Shape) -> str:
    return (
        f"{shape.name} ({shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.heads} heads / {shape.kv_heads} KV heads x {shape.head_dim}, vocab {shape.vocab}, "
        f"{'tied' if shape.tied else 'untied'} embeddings)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-12b")
    p.add_argument("--tiny", action="store_true", help="a tiny shape of the same architecture (tests)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--accumulator-rank", type=int, default=64, help="ScaLoRA accumulator rank R (nf4)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per forward (b)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (s)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="keep every layer's activations (default: gradient checkpointing per layer)",
    )
    p.add_argument(
        "--plain-loss",
        dest="chunked_loss",
        action="store_false",
        help="transformers' loss over the whole logits (default: the chunked loss, model.chunked_loss)",
    )
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="the layer-input boundaries in host memory (model.offload_activations; needs checkpointing)",
    )
    p.add_argument(
        "--measure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure real decoder layers on CPU (default on)",
    )
    p.add_argument("--layers-measured", type=int, default=1, help="real decoder layers to build")
    p.add_argument(
        "--measure-seq-lens",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="sequence lengths of the measured forward/backward passes",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.offload_activations and not args.checkpointing:
        raise SystemExit("--offload-activations offloads the checkpointed layers' inputs: drop --no-checkpointing")
    shape = SHAPES[args.shape]
    shape = tiny_shape(shape.arch) if args.tiny else shape
    print(f"<!-- {datetime.date.today()} · {machine()} · torch {torch.__version__} · command: {command_line(argv)} -->")
    print()

    measured = None
    if args.measure:
        measured = measure(
            shape, args.rank, args.optimizer, args.layers_measured, args.micro_batch, args.measure_seq_lens
        )
    layer = measured.activations if measured else formula_layer_activations(shape, args.rank)
    rows = plan(
        shape,
        args.rank,
        args.accumulator_rank,
        args.micro_batch,
        args.seq_len,
        args.optimizer,
        args.checkpointing,
        layer,
        chunked_loss=args.chunked_loss,
        offload=args.offload_activations,
    )
    act = activations(
        shape, layer, args.micro_batch, args.seq_len, args.checkpointing, args.chunked_loss, args.offload_activations
    )

    unit, unit_name = unit_for(rows)
    print(f"## Memory plan per rank ({unit_name}, computed): {describe(shape)}")
    print()
    print(
        f"r = {args.rank}, R = {args.accumulator_rank}, b = {args.micro_batch}, s = {args.seq_len}, "
        f"optimizer {args.optimizer}, gradient checkpointing {'on' if args.checkpointing else 'off'}"
        f"{', activations offloaded to the host' if args.offload_activations else ''}; "
        f"adapters on {', '.join(PROJECTIONS)} of every layer; per-layer activations: {layer.source}"
        + (" (CPU, bf16 compute)" if measured else " (formula_layer_activations)")
    )
    print()
    print(plan_table(rows, unit))
    print()
    print(legend(shape, act, args.checkpointing, unit, unit_name, rank=args.rank, chunked_loss=args.chunked_loss))
    if not args.tiny:
        print()
        print(
            f"## Longest sequence on one GPU (b = 1, r = {args.rank}, gradient checkpointing, "
            f"{'chunked' if args.chunked_loss else 'plain'} loss, {args.optimizer})"
        )
        print()
        print(fits_table(shape, args.rank, args.accumulator_rank, args.optimizer, args.chunked_loss))
    if args.optimizer != "adamw":
        print(
            f"* optimizer: {args.optimizer} on one GPU only; the multi-GPU rows use AdamW (float32, "
            "sharded), the only optimizer our FSDP2 path accepts (scalora_dist/optim.py)."
        )
    if measured:
        print()
        print(
            f"## Measured vs computed, per decoder layer ({measured.layers} real {shape.arch} layer(s) of "
            f"{shape.name}, measured on CPU)"
        )
        print()
        lengths = ", ".join(f"s = {s}: {v:,.0f} B" for s, v in sorted(measured.saved_by_length.items()))
        print(
            f"Saved-for-backward bytes per layer at b = {args.micro_batch} ({lengths}), fitted exactly as "
            f"constant + per token + per token²; loss head measured at s = {min(args.measure_seq_lens)} "
            f"with vocab {shape.vocab}; {measured.seconds:.0f} s of CPU."
        )
        print()
        print(measured_table(shape, args.rank, args.optimizer, measured))


CARDS_GB = (16, 24, 80)
CARD_RESERVE = 1.0 * GiB  # CUDA context, kernels and allocator slack, which the plan leaves out


def longest_sequence(
    shape: Shape,
    base: str,
    method: str,
    card_bytes: float,
    rank: int = 16,
    acc_rank: int = 64,
    optimizer: str = "adamw",
    chunked_loss: bool = True,
    offload: bool = False,
) -> int:
    """The longest s (a multiple of 256) whose one-GPU total, b = 1 with checkpointing, fits in
    `card_bytes` less CARD_RESERVE; 0 if not even 256 tokens fit."""

    def fits(s: int) -> bool:
        rows = plan(
            shape, rank, acc_rank, 1, s, optimizer, True, gpu_counts=(1,), chunked_loss=chunked_loss, offload=offload
        )
        row = next(r for r in rows if r.base == base and r.method == method)
        return row.total <= card_bytes - CARD_RESERVE

    low, high = 0, 1 << 22
    while high - low > 256:
        mid = (low + high) // 2 // 256 * 256
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low if low == 0 or fits(low) else 0


def fits_table(shape: Shape, rank: int, acc_rank: int, optimizer: str, chunked_loss: bool) -> str:
    body = []
    for offload in (False, True):
        for method in ("lora", "scalora"):
            cells = []
            for gb in CARDS_GB:
                s = longest_sequence(shape, "nf4", method, gb * 1e9, rank, acc_rank, optimizer, chunked_loss, offload)
                host = activations(
                    shape, formula_layer_activations(shape, rank), 1, s, True, chunked_loss, offload
                ).host
                cells.append(f"{s:,}" + (f" ({host / GiB:.1f} GiB on the host)" if offload else ""))
            body.append([f"nf4 {method}" + (", activations offloaded" if offload else ""), *cells])
    return markdown_table(["4-bit base", *(f"{gb} GB card" for gb in CARDS_GB)], body) + (
        f"\n\nTokens per sequence; the card less {CARD_RESERVE / GiB:.0f} GiB for the CUDA context and allocator "
        "slack. `activations offloaded`: model.offload_activations, the layer-input boundaries in pinned host "
        "memory (the amount in brackets), two of them on the device at a time."
    )


def legend(
    shape: Shape,
    act: Activations,
    checkpointing: bool,
    unit: int = GiB,
    unit_name: str = "GiB",
    rank: int = 16,
    chunked_loss: bool = True,
) -> str:
    def g(x: float) -> str:
        return gib(x, unit)

    parts = [
        f"Activations (same for every row: data parallel, each rank runs its own micro-batch) = "
        f"{g(act.peak)} {unit_name} at the peak: "
        + (
            f"layer-input boundaries {g(act.boundaries)}"
            + (
                f" (two on the device; all {shape.layers}, {g(act.host)} {unit_name}, in host memory)"
                if act.host
                else ""
            )
            + f" + rotary tables {g(act.rope)} + the larger of the "
            f"loss-head peak {g(act.loss_head)} and ({'' if chunked_loss else 'bf16 logits + '}one recomputed layer "
            f"{g(act.layers)})"
            if checkpointing
            else f"all layers {g(act.layers)} + rotary tables {g(act.rope)} + loss-head peak {g(act.loss_head)}"
        )
        + (
            f". The loss head is chunked (model.chunked_loss): one chunk of {CHUNK_ELEMENTS:,} logits at a time, "
            f"{CHUNKED_LOSS_PEAK_BYTES} bytes each at most, plus the float32 gradient of the hidden states; nothing "
            "of it is kept between the forward and the backward."
            if chunked_loss
            else f". The loss head is {LOSS_HEAD_PEAK_BYTES} bytes x tokens x vocab (bf16 logits, float32 log-softmax,"
            " its float32 gradient in and out) and is not sharded by FSDP2."
        ),
        "frozen base: bf16 / float32 masters (scalora on bf16) / NF4 codes + QuantState, plus bf16 embeddings "
        "and norms, all sharded except NF4 QuantState (always whole) and `replicated` codes.",
        "ScaLoRA extra: nf4, the float32 rank-R accumulators (sharded). No bf16 compute copies of the float32 "
        "masters or accumulators are saved for the backward (lora.frozen_linear saves the float32 tensor itself). "
        f"bf16 on several GPUs: the refactor's all-reduce buffer, every layer's lora_A in float64 "
        f"({g(refactor_buffer_bytes(shape, rank))} {unit_name}), exists only between the backward and the "
        "optimizer step, when the activations are freed, so it is not at the peak.",
        f"FSDP working set: 2 decoder blocks all-gathered in bf16 (codes packed) + one block's float32 adapter "
        f"gradients + the root group (embeddings{'' if shape.tied else ', lm_head'}, final norm: "
        f"{g(shape.root_params() * BF16)} {unit_name}), which FSDP2 keeps unsharded from the forward through the "
        "backward. `replicated` codes are never gathered, and all the rest is the one root group: every block's "
        "adapters, norms (and accumulators) whole in bf16 and all adapter gradients in float32 before its one "
        "reduce-scatter (one collective each way a step instead of three per block).",
        "total: the sum of the columns. Not included: the CUDA context and allocator slack, the gradient "
        "buffers of the layer being back-propagated, bitsandbytes' transiently dequantised weight (one "
        "projection at a time), and the optimizer step's transients (ScaLoRA's per-layer merge), which come "
        "after the activations are freed.",
    ]
    return "\n".join(f"* {p}" for p in parts)


if __name__ == "__main__":
    main()
