"""The `scalora-dist` command line. Only argument handling lives here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
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
    "adapter.target_modules=\\[q_proj,v_proj]. Values are parsed as YAML (ints, floats, bools, lists)."
)

TRAIN_HELP = """Train LoRA / rsLoRA / ScaLoRA adapters (or full fine-tuning) as CONFIG says.

CONFIG is a YAML file with the sections model, adapter (with adapter.scalora), data, train
and output; any key can be overridden after it with key.path=value. Unknown keys and wrong
types are errors that name the key. `scalora-dist config keys` lists every key with its
meaning and default; `scalora-dist config show CONFIG \\[overrides]` prints the resolved config.

Writes to output.dir: config.yaml, metrics.jsonl, eval.jsonl, merged/ (a transformers
checkpoint of the fine-tuned weights) and, for method lora, adapter/ (PEFT format).

Several processes: --nproc-per-node N starts a torchrun job of N processes on this node
(one per GPU); the command builds and runs `python -m torch.distributed.run ...` itself
(see it with --dry-run). Several nodes: run the same command on every node with --nnodes,
--rdzv-endpoint HOST:PORT (the same on all nodes, e.g. the first node's address) and,
optionally, --node-rank and --rdzv-id; under SLURM, one task per node:
srun --ntasks-per-node 1 scalora-dist train ... --nnodes $SLURM_NNODES ...
Without these options (or with 1 process on 1 node) the training runs in this process.
The config is checked before any worker starts. Only rank 0 shows progress and the
summary; errors from other ranks are prefixed with \\[rankN]. Ctrl-C stops every
rank (exit code 130).
"""


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


def _load(config_path: Path, overrides: Optional[list[str]]) -> cfgmod.Config:
    try:
        return cfgmod.load_config(config_path, overrides or [])
    except cfgmod.ConfigError as e:
        _fail(str(e))


LAUNCH_PANEL = "Multi-process launch (torchrun)"


def _train_fail(message: str, code: int, prefix: str) -> None:
    err_console.print(f"{escape(prefix)}[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@app.command(help=TRAIN_HELP)
def train(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="PATH|latest|auto",
        help="Resume from a checkpoint directory, or 'latest' for the newest one in "
        "output.dir/checkpoints (an error if there is none), or 'auto': the newest if any, "
        "else start fresh (for jobs restarted after a lost worker).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run",
        help="Check the config and print the torchrun command that would run (or 'in-process' "
        "for a single-process run), then exit without training.",
    ),
    nproc_per_node: int = typer.Option(
        1, "--nproc-per-node", min=1, rich_help_panel=LAUNCH_PANEL,
        help="Processes on this node (one per GPU). More than 1 starts a torchrun job.",
    ),
    nnodes: str = typer.Option(
        "1", "--nnodes", rich_help_panel=LAUNCH_PANEL,
        help="Number of nodes, or an elastic range MIN:MAX (e.g. 1:4). More than 1 needs "
        "--rdzv-endpoint.",
    ),
    node_rank: Optional[int] = typer.Option(
        None, "--node-rank", min=0, rich_help_panel=LAUNCH_PANEL,
        help="This node's rank in [0, nnodes) (optional with the c10d rendezvous, which "
        "assigns ranks itself).",
    ),
    rdzv_endpoint: Optional[str] = typer.Option(
        None, "--rdzv-endpoint", metavar="HOST:PORT", rich_help_panel=LAUNCH_PANEL,
        help="Rendezvous address, the same on every node (e.g. first-node:29500).",
    ),
    rdzv_id: Optional[str] = typer.Option(
        None, "--rdzv-id", rich_help_panel=LAUNCH_PANEL,
        help="Job id shared by all nodes. Default: $SLURM_JOB_ID (or PBS_JOBID, LSB_JOBID, "
        "JOB_ID) when set, else derived from the command line, so the same command on every "
        "node joins the same job.",
    ),
    rdzv_backend: str = typer.Option(
        "c10d", "--rdzv-backend", rich_help_panel=LAUNCH_PANEL,
        help="torchrun rendezvous backend (c10d, static, etcd, ...).",
    ),
    max_restarts: int = typer.Option(
        0, "--max-restarts", min=0, rich_help_panel=LAUNCH_PANEL,
        help="How often torchrun restarts all workers after a failure before giving up.",
    ),
) -> None:
    from scalora_dist.distributed import launched_by_torchrun
    from scalora_dist.launch import LaunchError, LaunchOptions

    if launched_by_torchrun():
        # A worker of a torchrun job: train here, never launch again (the launcher passes no
        # launch option on, and any given by hand are ignored).
        if dry_run:
            console.print("in-process", highlight=False)
            return
        _train_worker(config, overrides or [], quiet, resume)
        return

    options = LaunchOptions(
        nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, rdzv_backend=rdzv_backend,
        max_restarts=max_restarts,
    )
    try:
        options.validate()
    except LaunchError as e:
        _fail(str(e))
    cfg = _load(config, overrides)  # config errors show once, here, before any worker starts
    if options.needs_torchrun():
        from scalora_dist.optim import check_optimizer

        try:
            check_optimizer(cfg.train, distributed=True)
        except cfgmod.ConfigError as e:
            _fail(str(e))
        _launch(config, overrides or [], options, quiet, resume, dry_run)
        return
    if dry_run:
        console.print("in-process", highlight=False)
        return
    _run_training(cfg, quiet, resume, rank=0, prefix="")


def _launch(
    config: Path, overrides: list[str], options, quiet: bool, resume: Optional[str], dry_run: bool
) -> None:
    from scalora_dist.launch import format_command, run_torchrun, torchrun_command

    extra = (["--quiet"] if quiet else []) + (["--resume", resume] if resume is not None else [])
    cmd = torchrun_command(config, overrides, options, extra)
    if dry_run:
        typer.echo(format_command(cmd))
        return
    nodes = "" if options.nnodes == "1" else f" (node of {options.nnodes})"
    err_console.print(
        f"launching {options.nproc_per_node} processes on this node{nodes}: "
        f"{escape(format_command(cmd))}",
        highlight=False, style="dim", soft_wrap=True,
    )
    code = run_torchrun(cmd)
    if code == 130:
        err_console.print("[bold red]interrupted[/bold red]: all ranks stopped", highlight=False)
    elif code != 0:
        err_console.print(
            f"[bold red]error:[/bold red] the training job failed (torchrun exit code {code}); "
            "see the \\[rankN] errors above",
            highlight=False,
        )
    raise typer.Exit(code)


def _train_worker(config: Path, overrides: list[str], quiet: bool, resume: Optional[str]) -> None:
    rank = int(os.environ.get("RANK", 0))
    prefix = f"[rank{rank}] "
    try:
        cfg = cfgmod.load_config(config, overrides)
    except cfgmod.ConfigError as e:
        _train_fail(str(e), 2, prefix)
    if rank == 0:
        world = os.environ.get("WORLD_SIZE", "1")
        console.print(f"torchrun job of {world} processes (output from rank 0)", highlight=False)
    _run_training(cfg, quiet, resume, rank=rank, prefix=prefix)


def _run_training(cfg: cfgmod.Config, quiet: bool, resume: Optional[str], rank: int, prefix: str) -> None:
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    from scalora_dist.checkpoint import CheckpointError
    from scalora_dist.data import DataError
    from scalora_dist.distributed import destroy_distributed
    from scalora_dist.train import TrainingError, train as run_training

    finished = False
    try:
        result = run_training(cfg, show_progress=not quiet and rank == 0, resume=resume)
        finished = True
    except (cfgmod.ConfigError, DataError, CheckpointError) as e:
        _train_fail(str(e), 2, prefix)
    except TrainingError as e:
        _train_fail(str(e), 1, prefix)
    except KeyboardInterrupt:
        err_console.print(f"{escape(prefix)}[bold red]interrupted[/bold red]", highlight=False)
        raise typer.Exit(130)
    finally:
        # Shut gloo/NCCL down before interpreter exit; its threads otherwise abort the
        # process ("terminate called without an active exception") after a good run.
        destroy_distributed(wait_for_peers=finished)
    if rank != 0:
        return
    console.print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}", highlight=False)
    if result.eval_loss is not None:
        console.print(f"eval loss {result.eval_loss:.4f}", highlight=False)
    console.print(f"outputs in {result.run_dir}", highlight=False)


SLURM_HELP = """Write an sbatch script for this run into output.dir and submit it (one srun task
per node, each a torchrun launcher of --gpus-per-node processes, c10d rendezvous on the
first node, --resume auto so restarts and requeues continue from the newest checkpoint).

The config is checked first. #SBATCH lines hold literal values. With --dry-run the script
is printed, not written or submitted; with --no-submit it is written but not submitted.
"""


@app.command("slurm", help=SLURM_HELP)
def slurm(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    nodes: int = typer.Option(1, "--nodes", "-N", help="Number of nodes."),
    gpus_per_node: int = typer.Option(
        1, "--gpus-per-node", "-G", help="Processes (= GPUs) per node."
    ),
    request_gpus: bool = typer.Option(
        True, "--request-gpus/--no-request-gpus",
        help="Put #SBATCH --gpus-per-node in the script (--no-request-gpus for CPU partitions).",
    ),
    partition: Optional[str] = typer.Option(None, "--partition", "-p"),
    time_limit: Optional[str] = typer.Option("24:00:00", "--time", "-t", help="Time limit (HH:MM:SS, D-HH:MM:SS, minutes)."),
    account: Optional[str] = typer.Option(None, "--account", "-A"),
    job_name: Optional[str] = typer.Option(None, "--job-name", "-J", help="Default: scalora-<output dir name>."),
    cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", "-c", help="CPUs for each node's task (all its workers)."),
    mem: Optional[str] = typer.Option(None, "--mem", help="Memory per node, e.g. 200G."),
    max_restarts: int = typer.Option(3, "--max-restarts", help="torchrun restarts after a failed worker."),
    rdzv_port: Optional[int] = typer.Option(None, "--rdzv-port", help="Rendezvous port (default 20000 + job id % 10000)."),
    join_timeout: int = typer.Option(1800, "--join-timeout", help="Seconds the nodes wait for each other at the rendezvous."),
    python: Optional[str] = typer.Option(
        None, "--python", help="Interpreter the job runs (must have scalora_dist installed). "
        "Default: the one running this command.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the script; write and submit nothing."),
    submit: bool = typer.Option(True, "--submit/--no-submit", help="Submit with sbatch after writing."),
) -> None:
    import shutil
    import subprocess
    import sys

    from scalora_dist.slurm import SbatchOptions, SlurmError, parse_job_id, render_sbatch

    cfg = _load(config, overrides)
    run_dir = Path(cfg.output.dir)
    cwd = Path.cwd().resolve()
    run_dir_abs = run_dir if run_dir.is_absolute() else cwd / run_dir
    options = SbatchOptions(
        nodes=nodes, gpus_per_node=gpus_per_node, request_gpus=request_gpus, partition=partition,
        time=time_limit, account=account,
        job_name=job_name or "scalora-" + (run_dir_abs.name or "run"),
        cpus_per_task=cpus_per_task, mem=mem, max_restarts=max_restarts,
        config=str(config.resolve()), overrides=list(overrides or []),
        output=str(run_dir_abs / "slurm-%j.out"), chdir=str(cwd), python=python or sys.executable,
        join_timeout_s=join_timeout, rdzv_port=rdzv_port,
    )
    try:
        script = render_sbatch(options)
    except SlurmError as e:
        _fail(str(e))
    if dry_run:
        typer.echo(script, nl=False)
        return
    run_dir_abs.mkdir(parents=True, exist_ok=True)
    path = run_dir_abs / "slurm-job.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    console.print(f"wrote {path}", highlight=False)
    if not submit:
        console.print(f"submit with: sbatch {path}", highlight=False)
        return
    if shutil.which("sbatch") is None:
        _fail(f"sbatch not found on PATH; the script is in {path} (submit it on a SLURM login node)", 1)
    proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        _fail(f"sbatch failed (exit code {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}", 1)
    job_id = parse_job_id(proc.stdout)
    if job_id is None:
        _fail(f"sbatch gave no job id: {proc.stdout.strip()!r}", 1)
    log = run_dir_abs / f"slurm-{job_id}.out"
    console.print(f"submitted batch job {job_id} (log: {log})", highlight=False)


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
