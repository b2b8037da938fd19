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

# The computed plan lives in the product (scalora-dist plan, base_placement auto); this tool
# measures it on real layers and writes its tables.
from scalora_dist.plan import *  # noqa: E402, F403

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
