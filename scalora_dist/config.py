"""Run configuration: one dataclass per YAML section, loaded and validated at the edge.

A config file is YAML; any key can be overridden on the command line with a dotted path
(`train.lr=1e-4`, `adapter.target_modules=[q_proj,v_proj]`). Values are parsed as YAML, so
ints, floats, bools and lists come out typed. Unknown keys and wrong types are errors that
name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the key (dotted path) and what is wrong."""


@dataclass
class ModelConfig:
    path: str = ""
    """A transformers causal-LM checkpoint (config.json + safetensors): a local directory
    (relative paths are resolved against the working directory), or a Hugging Face hub id
    such as `meta-llama/Llama-3.1-8B`, downloaded into the hub cache (HF_HOME, HF_TOKEN) or
    read from it when offline (HF_HUB_OFFLINE=1). Multimodal checkpoints whose text part is a
    causal LM (Gemma-3 4B-27B) train their language model."""
    revision: str = ""
    """Hub ids only: a branch, tag or commit of model.path (empty: main)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute and storage dtype of the model; `auto`: bfloat16 on a CUDA GPU, float32 on
    CPU. LoRA factors, and the targeted base weights of scalora and full runs, are kept in
    float32 regardless (a bf16 base would round the small per-step ScaLoRA merges away)."""
    load_in_4bit: bool = False
    """Load the frozen base through bitsandbytes as 4-bit codes (QLoRA-style low-memory
    mode; every linear layer of the language model except the output head). Needs
    bitsandbytes."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base."""
    double_quant: bool = True
    """Quantise the 4-bit block scales too (saves ~0.4 bit per weight)."""
    quant_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the 4-bit layers compute in; `auto`: the model dtype."""
    base_placement: Literal["auto", "sharded", "replicated"] = "auto"
    """FSDP2 runs: `sharded` splits the frozen weights of the base's linear layers (float,
    or 4-bit codes) across ranks like any parameter (least memory, all-gathered per block);
    `replicated` keeps them whole on every rank (FSDP2 ignored_params: no traffic for them,
    as DDP would hold a model that fits one rank) and shards only the adapters,
    embeddings and norms, as one FSDP2 group: one all-gather and one reduce-scatter a step
    (they are whole on every rank during the step). ScaLoRA and ReLoRA merge into every
    rank's whole copy. `auto`: replicated when the memory plan (`scalora-dist plan`) of the
    run with the base whole fits 85% of a rank's memory (model.memory_per_rank_gib), else
    sharded; the run's first line says which and why, and its config.yaml records it."""
    memory_per_rank_gib: float = 0.0
    """The memory one rank may plan with (base_placement auto); 0: its GPU's memory, or on
    CPU the host's memory divided among this node's processes."""
    cpu_offload: bool = False
    """FSDP2 runs on GPUs (several processes): keep sharded parameters, gradients and
    optimizer state in host memory (FSDP2's CPUOffloadPolicy). Method lora only."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. `flash_attention_2` needs the optional flash-attn package."""
    gradient_checkpointing: bool = False
    """Recompute decoder-block activations in the backward pass to save memory."""
    offload_activations: bool = False
    """With gradient_checkpointing: keep what the forward pass saves for the backward (with
    checkpointing, each decoder block's input: layers x tokens x hidden x 2 bytes in bf16)
    in host memory, pinned on a CUDA machine, and copy it back when the backward needs it
    (torch.autograd.graph.save_on_cpu), trading host-device copies for the longest sequences
    one GPU fits. On a CPU run it only copies (the path the tests check)."""
    chunked_loss: bool = True
    """Compute the training loss through the output head a chunk of positions at a time,
    each chunk's gradient taken as soon as its logits are, so the whole (tokens x vocabulary)
    logits never exist and nothing is recomputed; same loss and gradients. false:
    transformers' own loss."""
    loss_chunk_tokens: int = 0
    """Positions per chunk of the chunked loss (loss_kernel torch); 0: as many as make 128 MiB
    of float32 logits (128 positions for Gemma-3's 262k vocabulary, 682 for Llama-3's 128k)."""
    loss_kernel: Literal["auto", "torch", "liger"] = "auto"
    """The chunked loss's kernels. `torch`: this package's chunks in PyTorch, on any device.
    `liger`: Liger-Kernel's fused linear cross-entropy (Triton kernels that fuse the head's
    matmul, softmax and gradient chunk by chunk; `pip install 'scalora-dist[liger]'`, CUDA;
    on CPU only under Triton's interpreter, TRITON_INTERPRET=1, which the tests use). `auto`:
    liger on a CUDA device when liger-kernel is installed and loss_chunk_tokens is 0, torch
    otherwise. Both give the plain loss and gradients."""


@dataclass
class ScaLoRAConfig:
    interval: int = 1
    """Refactor every `interval` optimizer steps (ScaLoRA-I); plain LoRA steps in between."""
    kappa: float | Literal["auto"] = "auto"
    """kappa = 1/(L*eta) of docs/method.md §2: the column-pair size ‖a_i‖·‖b_i‖ the refactors
    pull the adapter toward. `auto`: the mean of ‖a_i‖·‖b_i‖ over all layers and columns at
    the first refactor, divided by the mean learning rate so far as a fraction of the peak
    (so an LR warm-up before the first refactor does not shrink it; docs/method.md, "kappa")."""
    kappa_multiplier: float = 1.0
    """Multiplies kappa (auto or given); for sensitivity studies (x1/4, x1, x4)."""
    kappa_scope: Literal["global", "layer"] = "global"
    """With `kappa: auto`: one kappa from every layer's columns (`global`), or each layer its
    own, from its own columns (`layer`; a layer whose adapter is still zero then takes the
    global value). On the real model the two were the same (tools/studies/README.md)."""
    accumulator_rank: int = 64
    """4-bit bases only: rank R of the float32 low-rank accumulator that holds the merged
    update (requantising 4-bit codes would drop it); re-compressed to its best rank-R
    approximation as it grows. Memory (in + out features) * R * 4 bytes per layer."""
    warmup_steps: int = 10
    """Plain LoRA steps before the first refactor (the zero-initialised lora_B makes the
    scaling system singular at first)."""
    kappa_schedule: Literal["constant", "inverse_lr", "reestimate"] = "constant"
    """How kappa moves after it is resolved. `constant`: as resolved at the first refactor
    (times kappa_multiplier). `inverse_lr`: the paper's 1/(L eta_t) with the step's own
    learning rate, kappa * lr_peak / lr_t, capped at 10x (a decay to 0 stays finite).
    `reestimate`: kappa: auto taken again at every refactor from the columns as they are then
    (alpha * beta about 1 on average: the adapter grows as LoRA's does)."""
    column_fallback: Literal["scalar", "nnls"] = "scalar"
    """A layer whose column system has no positive solution (or is singular or ill-
    conditioned): one shared scale pair for it (`scalar`), or the system's non-negative
    least-squares optimum with every new column at least 0.1 sqrt(kappa) long (`nnls`)."""
    scalar_fallback: Literal["skip", "boundary"] = "skip"
    """A layer whose shared-scale system fails too: left as it is for this step (`skip`), or
    its optimum with one of the two shared scales at 0 (`boundary`: that factor is merged into
    the base whole and restarts from zero), when that beats skipping."""


@dataclass
class ReLoRAConfig:
    restart_every: int = 50
    """Merge the adapter into the base and restart it every this many optimizer steps."""
    rewarmup_steps: int = 10
    """After each restart the learning rate ramps linearly from 0 back to the schedule's
    value over this many steps (ReLoRA's jagged schedule); 0: no re-warm-up."""


@dataclass
class AdapterConfig:
    method: Literal["lora", "scalora", "relora", "full"] = "scalora"
    """`lora`: low-rank adapters (base frozen); `scalora`: LoRA whose increment is merged
    into the base every `interval` steps with optimal column scales; `relora`: LoRA merged
    into the base and restarted (fresh factors, AdamW state reset, LR re-warm-up) every
    `relora.restart_every` steps (Lialin et al. 2023), the baseline for a high-rank update;
    `full`: full fine-tuning of the targeted layers (baseline)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha: scale s = alpha/r, or alpha/sqrt(r) with use_rslora."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = alpha/sqrt(r) (Kalajdzievski 2023)."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """`all-linear`: every nn.Linear of the language model except the output head (for a
    multimodal checkpoint, not the vision tower or projector); or module names, matched on
    their last dotted components as PEFT does: plain names (`q_proj`) inside the language
    model, dotted ones (`vision_tower.encoder.layers.0.self_attn.q_proj`) anywhere."""
    dropout: float = 0.0
    """Dropout on the adapter input. Must be 0 for scalora (a merge is only exact without it)."""
    scalora: ScaLoRAConfig = field(default_factory=ScaLoRAConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)


@dataclass
class DataSource:
    """One entry of data.train_files / data.eval_files, in its long form."""

    path: str = ""
    """A local file (.jsonl, .json, .parquet, .txt), a local dataset folder (as the hub
    stores datasets: data files plus a README), or a hub dataset id (org/name)."""
    split: str = "train"
    """The split to read; datasets' slicing works (`train[:95%]`, `train[95%:]`)."""
    name: str = ""
    """The dataset's configuration (subset) name, for datasets that have several."""
    revision: str = ""
    """Hub datasets: a branch, tag or commit (empty: main)."""


@dataclass
class DataConfig:
    train_files: list[str | DataSource] = field(default_factory=list)
    """Training data: entries that are local files (.jsonl/.json/.parquet/.txt), local
    dataset folders or hub dataset ids, each a string or a mapping {path, split (default
    train), name, revision}, e.g. `[{path: tatsu-lab/alpaca, split: "train[:95%]"}]`.
    Relative paths are resolved against the working directory."""
    eval_files: list[str | DataSource] = field(default_factory=list)
    """Held-out data, entries as in train_files (e.g. the same dataset with split
    `train[95%:]`); empty: no evaluation."""
    format: Literal["text", "instruction", "alpaca", "chat", "sharegpt"] = "text"
    """`text`: loss on every token of `text_field`; `instruction`: prompt + response, loss
    on the response only; `alpaca`: columns instruction, input (optional), output, as a
    chat turn when the tokenizer has a chat template (else Alpaca's prompt text), loss on
    output; `chat`: `messages_field` ({role, content} turns) rendered with the tokenizer's
    chat template, loss on assistant turns only; `sharegpt`: column conversations
    ({from, value} turns: system, human, gpt), as chat."""
    text_field: str = "text"
    """Field holding the text (format text)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (format instruction; no loss on it)."""
    response_field: str = "response"
    """Field holding the response (format instruction; the loss is on it)."""
    messages_field: str = "messages"
    """Field holding the list of {role, content} messages (format chat)."""
    max_length: int = 512
    """Sequence length: examples are truncated to it; with packing, it is the row length
    (longer examples are cut into pieces of at most this length)."""
    packing: bool = False
    """Put whole examples side by side in rows of up to `max_length` tokens; each example
    attends only to itself (per-example position_ids, no cross-example attention) and its
    loss is what it would be unpacked."""


@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps to run; 0: derive from `epochs`."""
    epochs: float = 0.0
    """Passes over the training data (used when max_steps is 0)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass (per process)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the step's loss is the mean over all its labelled tokens."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    """`adamw`: torch AdamW, float32 moments. bitsandbytes, one process only: `adamw_8bit`
    keeps both moments as 8-bit blockwise codes (1/4 of the optimizer memory); `paged_*`
    keep the state in CUDA unified memory that spills to the host under memory pressure (on
    CPU they run unpaged). ScaLoRA rescales the moments of all of them."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up: cosine or linear to 0, or constant."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay of the trained tensors (LoRA factors, or the weights
    under `full`). Must be 0 for scalora: see docs/method.md, "Weight decay"."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 disables clipping."""
    seed: int = 0
    """Seed for adapter initialisation and data order."""
    log_every: int = 1
    """Write a metrics.jsonl record every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end); needs data.eval_files."""
    eval_batches: int = 0
    """Cap on eval micro-batches per evaluation (0: the whole eval set)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts the model completes (greedily) at every evaluation, into samples.jsonl: see
    the model change, not only the loss. With a chat, sharegpt or alpaca format and a chat
    template, each prompt is a user turn."""
    sample_max_new_tokens: int = 48
    """Tokens generated per sample prompt."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: `stop` the run with an error naming the step (before any update or
    checkpoint), or `skip` the step's update and count it in metrics.jsonl."""
    collective_timeout_s: float = 300.0
    """Several processes: how long a collective may wait for a rank during training before
    the job stops with an error naming the rank that stopped answering and the step (setup,
    where a node's first rank may be downloading the model, allows 30 minutes). On CUDA,
    NCCL's flight recorder then leaves each rank's last collectives in
    output.dir/flight_recorder/."""
    save_every: int = 0
    """Write a resumable checkpoint (DCP: model shards, optimizer, scheduler, data
    position, RNG, step) every this many steps; one is always written at the end."""
    save_every_minutes: float = 0.0
    """Also write a checkpoint whenever this many minutes of wall-clock time have passed
    since the last one (0: off); on clusters, where time limits are in minutes."""
    keep_last: int = 2
    """Keep only the newest this many checkpoints (0: keep all)."""
    compile: bool = False
    """torch.compile every decoder block (inductor), as torchtitan and torchtune do: the
    graphs of the first block serve them all; works with FSDP2, activation checkpointing and
    ScaLoRA's in-place merges (they change values, not shapes). The first steps pay the
    compile time (tens of seconds on CPU) and a few recompiles (metrics.jsonl's
    compiled_frames), then none."""


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, merged/, adapter/."""
    save_merged: bool = True
    """Write merged/: a full transformers checkpoint of the fine-tuned weights."""
    save_adapter: bool = True
    """For lora: also write adapter/ in PEFT format."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb; WANDB_MODE=offline works)."""
    wandb_project: str = "scalora-dist"
    """W&B project name."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> typed dataclasses


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key.path=value` overrides, validate, return a Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A Config from its dict form (to_dict, e.g. the copy a checkpoint keeps), validated."""
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


RENAMED_KEYS = {"model.quant_placement": "model.base_placement"}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"'{prefix}{key}' was renamed '{RENAMED_KEYS[prefix + key]}'")
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return value converted to `hint`, or raise a ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        sections = [o for o in typing.get_args(hint) if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and sections:  # a mapping can only mean the section
            return _build(sections[0], value, f"{key}.")
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{key}: {value!r} is not valid ({'; or '.join(errors)})")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        single = item_type is str or str in typing.get_args(item_type)
        if isinstance(value, (str, int, float)) and single and not isinstance(value, bool):
            value = [value]  # a single name is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")  # a bug in this file, not in the config


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    m, a, d, t = config.model, config.adapter, config.data, config.train
    if not m.path:
        raise ConfigError("model.path: required (a local transformers checkpoint directory or a hub model id)")
    if m.loss_chunk_tokens < 0:
        raise ConfigError(f"model.loss_chunk_tokens: must be >= 0 (0: automatic), got {m.loss_chunk_tokens}")
    if m.loss_kernel == "liger" and not m.chunked_loss:
        raise ConfigError(
            "model.loss_kernel: liger is a kernel of the chunked loss, but model.chunked_loss is "
            "false; set model.chunked_loss=true, or leave loss_kernel at auto"
        )
    if m.loss_kernel == "liger" and m.loss_chunk_tokens:
        raise ConfigError(
            f"model.loss_chunk_tokens: {m.loss_chunk_tokens} sets the chunks of model.loss_kernel "
            "torch; liger chooses its own: set it to 0, or use loss_kernel torch"
        )
    if m.offload_activations and not m.gradient_checkpointing:
        raise ConfigError(
            "model.offload_activations: needs model.gradient_checkpointing=true (it offloads "
            "the checkpointed blocks' inputs; without checkpointing it would copy every "
            "activation to the host and back each step)"
        )
    _positive("adapter.rank", a.rank)
    _positive("adapter.alpha", a.alpha)
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError(f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    if a.method == "scalora" and a.dropout != 0.0:
        raise ConfigError(
            "adapter.dropout: must be 0 for method scalora (dropout changes the function "
            "across a merge, so the rewrite would not be exact)"
        )
    if isinstance(a.target_modules, list) and not a.target_modules:
        raise ConfigError("adapter.target_modules: empty list; give names or 'all-linear'")
    s = a.scalora
    _positive("adapter.scalora.interval", s.interval)
    _positive("adapter.scalora.kappa_multiplier", s.kappa_multiplier)
    if s.kappa_schedule == "reestimate" and s.kappa != "auto":
        raise ConfigError(
            f"adapter.scalora.kappa_schedule: reestimate takes kappa again from the columns at every refactor, "
            f"which needs adapter.scalora.kappa: auto (it is {s.kappa})"
        )
    if s.kappa != "auto":
        _positive("adapter.scalora.kappa", s.kappa)
        if s.kappa_scope != "global":
            raise ConfigError(
                f"adapter.scalora.kappa_scope: {s.kappa_scope!r} needs adapter.scalora.kappa: auto "
                f"(a kappa given as a number, here {s.kappa:g}, is the same for every layer)"
            )
    _positive("adapter.scalora.accumulator_rank", s.accumulator_rank)
    if m.memory_per_rank_gib < 0:
        raise ConfigError(f"model.memory_per_rank_gib: must be >= 0 (0: the device's), got {m.memory_per_rank_gib}")
    if m.base_placement == "replicated" and a.method == "full":
        raise ConfigError(
            "model.base_placement: replicated keeps the frozen base whole on every rank, but "
            "method full trains it; use sharded"
        )
    if m.base_placement == "replicated" and m.cpu_offload:
        raise ConfigError(
            "model.base_placement: replicated keeps the base whole on every rank, in device "
            "memory; model.cpu_offload moves sharded parameters to the host: use one of them"
        )
    if m.load_in_4bit and a.method == "full":
        raise ConfigError(
            "adapter.method: full fine-tuning cannot train a 4-bit base (model.load_in_4bit); use lora or scalora"
        )
    if a.method == "scalora" and t.weight_decay > 0:
        raise ConfigError(
            "train.weight_decay: must be 0 for method scalora. AdamW would decay only the "
            "current factors, whose decayed part the next refactor merges into the base: the "
            "merged (high-rank) update is never decayed, and the factors' decay turns into a "
            "drift of about -2*lr*weight_decay*s*lora_B*lora_A per step instead of a pull toward "
            "the pretrained weights. Use method lora or full for weight decay."
        )
    if a.method == "scalora" and m.cpu_offload:
        raise ConfigError(
            "model.cpu_offload: not supported with method scalora yet (its merges and "
            "statistics have not been tested with offloaded shards); use method lora, or "
            "a 4-bit base (model.load_in_4bit) to save memory"
        )
    if s.warmup_steps < 0:
        raise ConfigError("adapter.scalora.warmup_steps: must be >= 0")
    _positive("adapter.relora.restart_every", a.relora.restart_every)
    if a.relora.rewarmup_steps < 0:
        raise ConfigError("adapter.relora.rewarmup_steps: must be >= 0")
    if a.method == "relora" and a.relora.rewarmup_steps >= a.relora.restart_every:
        raise ConfigError(
            f"adapter.relora.rewarmup_steps: {a.relora.rewarmup_steps} must be smaller than "
            f"adapter.relora.restart_every ({a.relora.restart_every})"
        )
    if a.method == "relora" and m.load_in_4bit:
        raise ConfigError(
            "adapter.method: relora cannot merge into a 4-bit base (requantising drops the "
            "merged update); use scalora, whose float32 accumulator holds it, or lora"
        )
    if a.method == "relora" and m.cpu_offload:
        raise ConfigError("model.cpu_offload: not supported with method relora; use method lora")
    if not d.train_files:
        raise ConfigError("data.train_files: required (one or more files, dataset folders or hub dataset ids)")
    for key in ("train_files", "eval_files"):
        for i, entry in enumerate(getattr(d, key)):
            path = entry.path if isinstance(entry, DataSource) else entry
            if not str(path).strip():
                raise ConfigError(f"data.{key}[{i}]: empty path")
    _positive("data.max_length", d.max_length)
    if t.max_steps < 0 or t.epochs < 0:
        raise ConfigError("train.max_steps / train.epochs: must be >= 0")
    if (t.max_steps > 0) == (t.epochs > 0):
        raise ConfigError("train: set exactly one of train.max_steps and train.epochs")
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    _positive("train.lr", t.lr)
    _positive("train.log_every", t.log_every)
    _positive("train.sample_max_new_tokens", t.sample_max_new_tokens)
    if t.save_every_minutes < 0:
        raise ConfigError("train.save_every_minutes: must be >= 0")
    if t.collective_timeout_s <= 0:
        raise ConfigError(f"train.collective_timeout_s: must be > 0 seconds, got {t.collective_timeout_s}")
    for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}: must be >= 0")
    if t.weight_decay < 0 or t.max_grad_norm < 0 or t.adam_eps <= 0:
        raise ConfigError("train.weight_decay / max_grad_norm must be >= 0 and adam_eps > 0")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas: two numbers in [0, 1), got {t.adam_betas}")
    if t.eval_every and not d.eval_files:
        raise ConfigError("train.eval_every: set, but data.eval_files is empty")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field), for --help and docs/config.md."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_keys(cls: type, prefix: str = ""):
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_keys(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, docs.get(f.name, "")


def type_name(key: str) -> str:
    """The type of a dotted config key as a user writes it: int, list of str, one of a|b, ..."""
    import typing

    cls = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return _describe(typing.get_type_hints(cls)[name])


def _describe(hint) -> str:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + " | ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is list:
        return f"list of {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    return getattr(hint, "__name__", str(hint))
