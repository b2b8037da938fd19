"""The memory plan: bytes per rank of a fine-tuning run, from the model's shape alone, as
this repository places and computes everything. It answers "will this config fit, and why
not" before any weight is loaded: `scalora-dist plan CONFIG.yaml` prints it, and
`model.base_placement: auto` decides with it whether to keep the frozen base whole on every
rank (no weight all-gathers: the fastest placement) or to shard it.

How each part is counted:

* bf16 base: LoRA leaves the targeted weights in the compute dtype; ScaLoRA keeps them as
  float32 masters (per-step merges are too small for bf16). Embeddings and norms stay in the
  compute dtype. A float32 run (CPU) stores everything in float32.
* nf4 base: every projection is NF4 with double quantisation (bitsandbytes); ScaLoRA adds a
  float32 rank-R accumulator per projection. The QuantState (block scales and tables) stays
  whole on every rank under FSDP2; only the packed codes can be sharded.
* adapters, their gradients and AdamW moments are float32; FSDP2 shards all of them.
  8-bit AdamW (bitsandbytes) applies to one process only: the FSDP2 path takes torch AdamW
  alone (scalora_dist/optim.py).
* FSDP2 working set: two decoder blocks all-gathered in the compute dtype (current +
  prefetched; codes gathered packed), one block's unsharded float32 adapter gradients before
  the reduce-scatter, and the root group (embeddings, final norm, lm_head), which FSDP2 does
  not reshard after the forward. With a replicated base everything FSDP2 manages is that one
  root group: all blocks' adapters and norms whole, all adapter gradients in float32 before
  the one reduce-scatter.
* activations: micro-batch b x sequence s per rank, a structural count of what a decoder
  layer saves for the backward (checked against real layers in tests/test_memory_plan.py);
  the loss head (logits + float32 log-softmax, or one chunk of them) counted separately.

tools/generators/memory_plan.py measures these figures on real layers and writes the tables
of docs/memory.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scalora_dist.model.quant import nf4_weight_bytes

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


def formula_layer_activations(shape: Shape, rank: int, compute: int = BF16) -> LayerActivations:
    """A structural count of what a bf16 decoder layer with float32 LoRA factors on all 7
    projections saves for the backward under SDPA (checked exactly against a real layer in
    tests/test_memory_plan.py; `compute`: bytes of the compute dtype, 4 for float32). Frozen
    weights save no inputs of their own (no weight gradient), but every adapter's lora_A saves
    its input, so each projection input is kept."""
    h, i, r = shape.hidden, shape.intermediate, rank
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norm = FP32 * h + FP32  # RMSNorm upcasts its input to float32 and saves it + 1/rms per token
    hidden_norms = 4 if shape.arch == "gemma3" else 2
    per_token = hidden_norms * norm
    if shape.arch in ("gemma3", "qwen3"):  # q_norm / k_norm over each head, in float32 too
        per_token += FP32 * (q + kv) + FP32 * (shape.heads + shape.kv_heads)
    per_token += 2 * compute * h  # the normed inputs of attention and MLP (shared by q/k/v, gate/up)
    per_token += compute * (q + 2 * kv)  # rotated q, k and v handed to SDPA
    per_token += compute * q + FP32 * shape.heads  # SDPA output (= o_proj input) + logsumexp per head
    per_token += 4 * compute * i  # MLP: gate, act(gate), up, and their product (down_proj input)
    per_token += len(PROJECTIONS) * compute * r  # each adapter's r-wide intermediate (lora_B input)
    # The bf16 compute copies of the float32 factors, saved by each adapter's matmuls; Gemma's
    # norms also save their float32 (1 + weight).
    constant = compute * adapter_params(shape, rank)
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


def loss_head_peak(shape: Shape, tokens: int, chunked: bool, compute: int = BF16) -> float:
    """Bytes the loss head holds at its peak: the whole logits and their float32 companions
    (transformers' loss), or one chunk of them plus the hidden states' gradient (chunked)."""
    if not chunked:
        return (LOSS_HEAD_PEAK_BYTES - BF16 + compute) * tokens * shape.vocab
    return (CHUNKED_LOSS_PEAK_BYTES - BF16 + compute) * min(
        CHUNK_ELEMENTS, tokens * shape.vocab
    ) + FP32 * tokens * shape.hidden


def activations(
    shape: Shape,
    layer: LayerActivations,
    b: int,
    s: int,
    checkpointing: bool,
    chunked_loss: bool = True,
    offload: bool = False,
    compute: int = BF16,
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
    loss_peak = loss_head_peak(shape, tokens, chunked_loss, compute)
    if checkpointing:
        boundary = tokens * shape.hidden * compute
        boundaries = min(2, shape.layers) * boundary if offload else shape.layers * boundary
        one_layer = layer.saved(b, s)
        kept_logits = 0.0 if chunked_loss else compute * tokens * shape.vocab
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
    """Base weights as stored, per rank. Embeddings / norms (in the compute dtype) are always
    sharded; the projections are whole on every rank with placement `replicated`. `base`:
    bf16, fp32 (a float32 run) or nf4."""
    compute = FP32 if base == "fp32" else BF16
    other = (shape.layers * shape.norm_params() + shape.root_params()) * compute / gpus
    share = 1 if placement == "replicated" else gpus
    if base in ("bf16", "fp32"):
        per_param = FP32 if method == "scalora" else compute  # ScaLoRA's float32 masters
        return shape.layers * shape.projection_params() * per_param / share + other
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
    compute = FP32 if base == "fp32" else BF16
    if placement == "replicated":
        weights = 0.0  # a replicated base is FSDP2 ignored_params: never gathered
    elif base in ("bf16", "fp32"):
        weights = shape.projection_params() * compute  # float32 masters are gathered in the compute dtype
    else:
        weights = sum(m * n / 2 for m, n in projections)  # packed codes, gathered as they are
    block = weights + (shape.norm_params() + adapter_params(shape, rank)) * compute
    if base == "nf4" and method == "scalora":
        block += sum((m + n) * acc_rank for m, n in projections) * compute
    unsharded_grads = adapter_params(shape, rank) * FP32  # reduce-scatter in float32
    root = shape.root_params() * compute  # the root group is not resharded after the forward
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
# A run's plan: the config's model, method and batch on N ranks
# ---------------------------------------------------------------------------------------

BUDGET_FRACTION = 0.85
"""model.base_placement auto replicates the frozen base only if the plan for it stays under
this share of each rank's memory (the allocator, CUDA's context, fragmentation and what the
plan does not count take the rest)."""

_ARCHES = {"gemma3": "gemma3", "gemma3_text": "gemma3", "qwen3": "qwen3"}


def shape_of(hf_config, name: str = "model") -> Shape:
    """The Shape of a transformers model config (its text part, for multimodal ones)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = text.num_attention_heads
    return Shape(
        name,
        _ARCHES.get(text.model_type, "llama"),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=bool(getattr(hf_config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
    )


@dataclass(frozen=True)
class RunPlan:
    """Bytes per rank of one run (a config on `world` ranks) with one base placement."""

    world: int
    placement: str  # sharded | replicated | - (one process)
    parts: dict[str, float]
    budget: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def run_plan(cfg, shape: Shape, world: int, placement: str, budget: float, device: str = "cuda") -> RunPlan:
    """The plan of `cfg` (a scalora_dist Config) on `world` ranks of `device` (cuda: bf16 or
    as model.dtype says; cpu: float32) with the frozen base `placement`d."""
    m, a, t = cfg.model, cfg.adapter, cfg.train
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    compute = FP32 if dtype == "float32" else BF16
    base = "nf4" if m.load_in_4bit else ("fp32" if compute == FP32 else "bf16")
    method = "scalora" if a.method == "scalora" else ("full" if a.method == "full" else "lora")
    gpus = max(world, 1)
    placement = placement if world > 1 else "-"
    rank = a.rank
    optimizer = optimizer_for("adamw8bit" if "8bit" in t.optimizer else "adamw", gpus)
    layer = formula_layer_activations(shape, 0 if method == "full" else rank, compute)
    act = activations(
        shape,
        layer,
        t.micro_batch_size,
        cfg.data.max_length,
        m.gradient_checkpointing,
        m.chunked_loss,
        m.offload_activations,
        compute,
    )
    if method == "full":  # the targeted weights train: float32 masters, gradients, moments
        weights = shape.layers * shape.projection_params()
        parts = {
            "frozen base": (shape.layers * shape.norm_params() + shape.root_params()) * compute / gpus,
            "trainable weights and gradients": 2 * weights * FP32 / gpus,
            "optimizer state": optimizer_bytes(optimizer, [math.ceil(weights / gpus)]),
        }
        work = 0.0 if gpus == 1 else 2 * shape.projection_params() * (compute + FP32) + shape.root_params() * compute
    else:
        sizes = adapter_tensor_sizes(shape, rank) * shape.layers
        parts = {
            "frozen base": frozen_base_bytes(shape, base, method, gpus, placement),
            "adapters and gradients": 2 * sum(sizes) * FP32 / gpus,
            "optimizer state": optimizer_bytes(optimizer, (math.ceil(n / gpus) for n in sizes)),
        }
        if method == "scalora" and base == "nf4":
            parts["scalora accumulators"] = scalora_extra_bytes(
                shape, base, rank, a.scalora.accumulator_rank, gpus, m.gradient_checkpointing
            )
        work = working_set_bytes(shape, base, method, rank, a.scalora.accumulator_rank, gpus, placement)
    parts["activations"] = act.peak - act.loss_head
    parts["loss head"] = act.loss_head
    if work:
        parts["FSDP2 working set"] = work
    return RunPlan(world, placement, parts, budget)


def memory_per_rank(device: str, local_world: int) -> tuple[float, str]:
    """(bytes, where they come from) of one rank's memory: its GPU's, or on CPU the host's
    memory shared by this node's processes."""
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return float(total), f"{total / GiB:.1f} GiB of GPU memory"
    total = _host_memory()
    return total / max(local_world, 1), f"{total / GiB:.1f} GiB of host memory over {local_world} process(es)"


def _host_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class PlacementChoice:
    placement: str
    replicated: RunPlan
    sharded: RunPlan
    memory_source: str

    def reason(self) -> str:
        budget = f"{self.replicated.budget / GiB:.2f} GiB ({BUDGET_FRACTION:.0%} of {self.memory_source})"
        whole = f"{self.replicated.total / GiB:.2f} GiB per rank with the base whole"
        if self.placement == "replicated":
            return f"replicated: {whole} fits the budget of {budget}"
        return (
            f"sharded: {whole} would not fit the budget of {budget}; sharded it takes "
            f"{self.sharded.total / GiB:.2f} GiB"
        )


def choose_placement(cfg, shape: Shape, world: int, device: str, memory: float, memory_source: str) -> PlacementChoice:
    """model.base_placement auto: replicated (no weight all-gathers, the fastest placement)
    when its plan fits BUDGET_FRACTION of a rank's memory, else sharded. Full fine-tuning
    trains the base, so it is always sharded."""
    budget = BUDGET_FRACTION * memory
    replicated = run_plan(cfg, shape, world, "replicated", budget, device)
    sharded = run_plan(cfg, shape, world, "sharded", budget, device)
    fits = replicated.fits and cfg.adapter.method != "full" and not cfg.model.cpu_offload
    return PlacementChoice("replicated" if fits else "sharded", replicated, sharded, memory_source)


def what_would_fit(cfg, shape: Shape, world: int, device: str, budget: float) -> list[str]:
    """Single changes to the config (or the job) after which its plan fits `budget`, in words."""
    import copy

    tries = []

    def variant(label: str, edit, ranks: int = world) -> None:
        changed = copy.deepcopy(cfg)
        if edit(changed) is False:
            return
        placements = ("replicated", "sharded") if ranks > 1 else ("-",)
        best = min((run_plan(changed, shape, ranks, p, budget, device) for p in placements), key=lambda r: r.total)
        if best.fits:
            tries.append(f"{label} ({best.total / GiB:.2f} GiB per rank)")

    m = cfg.model
    if not m.load_in_4bit and cfg.adapter.method != "full":
        variant("a 4-bit base (model.load_in_4bit=true)", lambda c: setattr(c.model, "load_in_4bit", True))
    if not m.gradient_checkpointing:
        variant("model.gradient_checkpointing=true", lambda c: setattr(c.model, "gradient_checkpointing", True))
    elif not m.offload_activations:
        variant("model.offload_activations=true", lambda c: setattr(c.model, "offload_activations", True))
    if not m.chunked_loss:
        variant("model.chunked_loss=true", lambda c: setattr(c.model, "chunked_loss", True))
    if cfg.train.micro_batch_size > 1:
        variant(
            "train.micro_batch_size=1 (and grad_accum_steps to keep the batch)",
            lambda c: setattr(c.train, "micro_batch_size", 1),
        )
    if cfg.data.max_length > 256:
        variant(
            f"data.max_length={cfg.data.max_length // 2}",
            lambda c: setattr(c.data, "max_length", cfg.data.max_length // 2),
        )
    for ranks in (2 * world, 4 * world, 8 * world):
        before = len(tries)
        variant(f"{ranks} ranks", lambda c: None, ranks)
        if len(tries) > before:
            break
    return tries


def parse_memory(text: str) -> float:
    """`80GiB`, `80GB`, `16G`, `512MiB` -> bytes (ValueError otherwise)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a memory size such as 80GiB or 16GB")
    value, prefix, unit = float(match.group(1)), match.group(2).upper(), match.group(3).lower()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    return value * (1024 if unit.startswith("i") or unit == "" and prefix else 1000) ** power


def model_shape(model_cfg) -> Shape:
    """The Shape of model.path (a local checkpoint or a hub id: only its config.json is read)."""
    from transformers import AutoConfig

    from scalora_dist.model.hub import is_local

    source = str(Path(model_cfg.path).expanduser()) if is_local(model_cfg.path) else model_cfg.path
    kwargs = {} if is_local(model_cfg.path) or not model_cfg.revision else {"revision": model_cfg.revision}
    return shape_of(AutoConfig.from_pretrained(source, **kwargs), model_cfg.path)


def plan_report(cfg, world: int, device: str, memory: float, memory_source: str) -> tuple[str, bool]:
    """What `scalora-dist plan` prints (GiB per rank of each part, for each placement on
    several ranks), and whether the config fits."""
    shape = model_shape(cfg.model)
    budget = BUDGET_FRACTION * memory
    if world > 1:
        choice = choose_placement(cfg, shape, world, device, memory, memory_source)
        chosen = choice.replicated if choice.placement == "replicated" else choice.sharded
        columns = [("base whole (replicated)", choice.replicated), ("base sharded", choice.sharded)]
        if cfg.model.base_placement != "auto":
            chosen = choice.replicated if cfg.model.base_placement == "replicated" else choice.sharded
            decided = f"model.base_placement: {cfg.model.base_placement} (set in the config)"
        else:
            decided = f"model.base_placement auto would take {choice.reason()}"
    else:
        chosen = run_plan(cfg, shape, 1, "-", budget, device)
        columns, decided = [("one process", chosen)], "one process: nothing to place"
    names = list(dict.fromkeys(k for _, plan_ in columns for k in plan_.parts))
    header = "| per rank (GiB) | " + " | ".join(label for label, _ in columns) + " |"
    lines = [
        f"{cfg.adapter.method} r {cfg.adapter.rank} on {cfg.model.path} ({shape.layers} layers, hidden {shape.hidden}, "
        f"vocabulary {shape.vocab}), {world} rank(s) on {device}, {cfg.train.micro_batch_size} x "
        f"{cfg.data.max_length} tokens per rank"
        + (", 4-bit base" if cfg.model.load_in_4bit else "")
        + (", gradient checkpointing" if cfg.model.gradient_checkpointing else ""),
        "",
        header,
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{p.parts.get(name, 0.0) / GiB:.3f}" for _, p in columns) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p.total / GiB:.3f}**" for _, p in columns) + " |")
    lines += ["", decided, f"budget: {budget / GiB:.2f} GiB per rank ({BUDGET_FRACTION:.0%} of {memory_source})"]
    if chosen.fits:
        lines.append(f"fits: {chosen.total / GiB:.2f} GiB of {budget / GiB:.2f} GiB per rank")
    else:
        lines.append(f"does not fit: {chosen.total / GiB:.2f} GiB per rank against {budget / GiB:.2f} GiB")
        remedies = what_would_fit(cfg, shape, world, device, budget)
        lines.append(
            "it would fit with " + "; or ".join(remedies)
            if remedies
            else "no single change tried (4-bit base, checkpointing, offload, a smaller batch or sequence, "
            "up to 8x the ranks) makes it fit"
        )
    lines.append("Computed from the model's shape (docs/memory.md says how); measured on CPU layers, not yet on a GPU.")
    return "\n".join(lines), chosen.fits
