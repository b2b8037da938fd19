"""The `scalora-dist` command line. Only argument handling lives here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from scalora_dist import config as cfgmod

app = typer.Typer(
    help="Distributed LoRA / rsLoRA / ScaLoRA fine-tuning of transformers causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

OVERRIDES_HELP = (
    "Overrides as dotted key paths, e.g. train.lr=1e-4 adapter.rank=16 "
    "adapter.target_modules=[q_proj,v_proj]. Values are parsed as YAML (ints, floats, bools, lists)."
)

TRAIN_HELP = """Train LoRA / rsLoRA / ScaLoRA adapters (or full fine-tuning) as CONFIG says.

CONFIG is a YAML file with the sections model, adapter (with adapter.scalora), data, train
and output; any key can be overridden after it with key.path=value. Unknown keys and wrong
types are errors that name the key. `scalora-dist config keys` lists every key with its
meaning and default; `scalora-dist config show CONFIG [overrides]` prints the resolved config.

Writes to output.dir: config.yaml, metrics.jsonl, eval.jsonl, merged/ (a transformers
checkpoint of the fine-tuned weights) and, for method lora, adapter/ (PEFT format).
"""


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


def _load(config_path: Path, overrides: Optional[list[str]]) -> cfgmod.Config:
    try:
        return cfgmod.load_config(config_path, overrides or [])
    except cfgmod.ConfigError as e:
        _fail(str(e))


@app.command(help=TRAIN_HELP)
def train(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    from scalora_dist.data import DataError
    from scalora_dist.train import TrainingError, train as run_training

    cfg = _load(config, overrides)
    try:
        result = run_training(cfg, show_progress=not quiet)
    except (cfgmod.ConfigError, DataError) as e:
        _fail(str(e))
    except TrainingError as e:
        _fail(str(e), code=1)
    console.print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}", highlight=False)
    if result.eval_loss is not None:
        console.print(f"eval loss {result.eval_loss:.4f}", highlight=False)
    console.print(f"outputs in {result.run_dir}", highlight=False)


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    cfg = _load(config, overrides)
    typer.echo(cfgmod.to_yaml(cfg), nl=False)


@config_app.command("keys")
def config_keys() -> None:
    """List every config key with its type, default and meaning."""
    table = Table("key", "default", "meaning", show_lines=False)
    for key, default, doc in iter_keys(cfgmod.Config):
        table.add_row(key, repr(default), doc)
    console.print(table)


def iter_keys(cls: type, prefix: str = ""):
    docs = cfgmod.field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_keys(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, docs.get(f.name, "")


@app.command("make-tiny-model")
def make_tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint and tokenizer to."),
    arch: str = typer.Option("llama", help="llama | mistral | qwen2 | qwen3 | gemma3"),
    corpus: Optional[list[Path]] = typer.Option(
        None, help="Text files (JSONL with a text field, or .txt) to train the tokenizer on; "
        "default: the shipped quickstart corpus."
    ),
    vocab_size: int = typer.Option(512),
    hidden_size: int = typer.Option(256),
    num_layers: int = typer.Option(4),
    num_heads: int = typer.Option(4),
    num_kv_heads: int = typer.Option(2),
    intermediate_size: int = typer.Option(512),
    seed: int = typer.Option(0),
) -> None:
    """Build a small random-weight causal LM and an offline-trained tokenizer, saved as a normal transformers checkpoint (no hub download)."""
    from scalora_dist.model.tiny import ARCHITECTURES
    from scalora_dist.model.tiny import make_tiny_model as build

    if arch not in ARCHITECTURES:
        _fail(f"--arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    missing = [str(p) for p in corpus or [] if not p.is_file()]
    if missing:
        _fail(f"--corpus: file not found: {', '.join(missing)}")
    path = build(
        out, arch=arch, corpus_files=[str(p) for p in corpus] if corpus else None,
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        seed=seed,
    )
    console.print(f"wrote a tiny {arch} model to {path}", highlight=False)


if __name__ == "__main__":
    app()
