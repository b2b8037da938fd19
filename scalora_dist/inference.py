"""Using what was trained: load a model the way users name it, generate from it, score it.

MODEL (for `scalora-dist generate` and `scalora-dist eval`) is any of:

* a merged transformers checkpoint directory (a run's `merged/`, or any model directory);
* a run directory: its `merged/` is used;
* a base model (directory or hub id) with `--adapter DIR`: a PEFT LoRA adapter (a run's
  `adapter/`, or the run directory itself), loaded by PEFT onto it;
* a hub id, resolved like `model.path` (downloaded, or read from the cache offline).

`--load-in-4bit` loads the base as bitsandbytes NF4 (transformers' own BitsAndBytesConfig
loading); the model runs on the GPU when there is one, else on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from scalora_dist.config import ConfigError, DataConfig, ModelConfig

if TYPE_CHECKING:
    from scalora_dist.data import BatchLoader

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    source: str
    """What was loaded, in words (for the user)."""
    run_dir: Path | None = None
    """The run directory MODEL named, if any (its config.yaml holds the data settings)."""


def resolve_model_arg(spec: str, adapter: str | None = None) -> tuple[str, str | None, Path | None]:
    """(model directory or hub id, adapter directory or None, run directory or None)."""
    path = Path(spec).expanduser()
    run_dir = None
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        run_dir = path
        if adapter is None:
            if not (path / "merged" / "config.json").is_file():
                raise ConfigError(f"MODEL: the run directory {path.resolve()} has no merged/ (did it finish?)")
            return str(path / "merged"), None, run_dir
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if (adapter_dir / "adapter" / "adapter_config.json").is_file():
            adapter_dir = adapter_dir / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter: {adapter_dir.resolve()} holds no adapter_config.json (a PEFT adapter)")
        if run_dir is not None:  # base = the run's own model.path
            import yaml

            spec = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"]
        return spec, str(adapter_dir), run_dir
    return spec, None, run_dir


def load_model(
    spec: str,
    adapter: str | None = None,
    *,
    load_in_4bit: bool = False,
    dtype: str = "auto",
    device: str = DEFAULT_DEVICE,
) -> Loaded:
    """The model MODEL names, in eval mode, ready to generate or score."""
    from transformers import AutoModelForCausalLM

    from scalora_dist.model.hub import resolve_model_dir
    from scalora_dist.model.loading import DTYPES, load_tokenizer

    base, adapter_dir, run_dir = resolve_model_arg(spec, adapter)
    model_dir = resolve_model_dir(ModelConfig(path=base))
    torch_dtype = (
        DTYPES[dtype]
        if dtype != "auto"
        else (torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32)
    )
    extra = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        from scalora_dist.model.quant import require_bitsandbytes

        require_bitsandbytes()
        extra = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype,
                bnb_4bit_quant_storage=torch_dtype,
            ),
            "device_map": {"": device},
        }
    with _refusing_pickles(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra)
    if not load_in_4bit:
        model.to(device)
    source = str(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        with _refusing_pickles(adapter_dir):
            model = PeftModel.from_pretrained(model, adapter_dir)
        source += f" + adapter {adapter_dir}"
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    return Loaded(model, tokenizer, source, run_dir)


@contextmanager
def _refusing_pickles(where) -> Iterator[None]:
    """Weights in pickle files (pytorch_model.bin, adapter_model.bin) are read by
    transformers and PEFT with torch.load(weights_only=True): one that holds anything but
    tensors is refused, here as one ConfigError line."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "not only tensors")
        raise ConfigError(
            f"MODEL: refusing to load the weights in {where}: a pickle file there holds objects "
            f"other than tensors, which could run code ({detail})"
        ) from None


# -- generation ----------------------------------------------------------------------------


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int = 0


def prompt_ids(tokenizer, text: str, chat: bool, history: list[dict] | None = None) -> torch.Tensor:
    """Token ids of a prompt: the tokenizer's chat template with a generation prompt in chat
    mode (with the conversation so far), the plain text (after BOS) otherwise."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: this model's tokenizer has no chat template; use --prompt")
        messages = [*(history or []), {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor([ids])


@torch.no_grad()
def generate(model: nn.Module, tokenizer, ids: torch.Tensor, sampling: Sampling, stream=None) -> list[int]:
    """New token ids after `ids`; `stream` (a transformers streamer) sees them as they come."""
    torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id, streamer=stream)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=True, **kwargs
    )
    return out[0, ids.shape[1] :].tolist()


# -- held-out loss -------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    device: torch.device,
    max_batches: int = 0,
    stop_asked: Callable[[], bool] | None = None,
) -> float | None:
    """Mean loss per labelled token over the eval set (all ranks' shares together). Ranks
    with fewer batches run masked copies, since FSDP2 needs every rank in every forward.
    `stop_asked` (a collective, so every rank calls it for every batch) cuts it short: None."""
    from scalora_dist.data import count_tokens, model_inputs
    from scalora_dist.distributed import all_reduce_max, all_reduce_sum_

    model.eval()
    batches = list(loader)
    n_batches = int(all_reduce_max(len(batches), device))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, labelled tokens
    for i in range(n_batches):
        if stop_asked is not None and stop_asked():
            model.train()
            return None
        batch = batches[i] if i < len(batches) else _masked(batches[0])
        n = count_tokens([batch])[0]
        out = model(**move_to(model_inputs(batch), device), num_items_in_batch=torch.tensor(max(n, 1), device=device))
        totals += torch.tensor([out.loss.item() * n, n], dtype=torch.float64, device=device)
    all_reduce_sum_(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def _masked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def move_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def held_out_loss(loaded: Loaded, data: list, data_cfg: DataConfig, micro_batch_size: int = 4) -> dict:
    """Loss, perplexity and labelled-token count of `data` through the training pipeline
    (same formats, masking, packing) and the training loop's own evaluation."""
    from scalora_dist.data import BatchLoader, count_tokens, load_split

    split = load_split(data_cfg, loaded.tokenizer, data)
    loader = BatchLoader(split, micro_batch_size, loaded.tokenizer.pad_token_id, shuffle=False, drop_last=False)
    labelled = sum(count_tokens([b])[0] for b in loader)
    device = next(loaded.model.parameters()).device
    model = loaded.model
    model.config.use_cache = False
    loss = evaluate(model, loader, device)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "labelled_tokens": labelled, "examples": len(split)}


# -- lm-evaluation-harness ------------------------------------------------------------------


def run_lm_eval(
    loaded: Loaded,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: float | None = None,
    batch_size: int = 4,
    num_fewshot: int | None = None,
) -> tuple[dict, str]:
    """lm-evaluation-harness on the loaded model, in this process: (results, table). Task
    data comes from the hub unless the task is a local YAML task (`include_path`)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ConfigError("--tasks: needs lm-evaluation-harness (pip install 'scalora-dist[eval]')") from None
    device = str(next(loaded.model.parameters()).device)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (see `lm-eval ls tasks`; "
            "a local YAML task needs --include-path DIR)"
        )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=0,
    )
    return results, make_table(results)
