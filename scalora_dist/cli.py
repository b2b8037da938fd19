"""The `scalora-dist` command line. Only argument handling lives here."""

from __future__ import annotations

from scalora_dist.run.stopping import install_early

install_early()  # before the heavy imports: a SIGUSR1 then is a stop request, not death

import dataclasses
import os
import sys
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


def _version(value: bool) -> None:
    if value:
        from scalora_dist import __version__

        typer.echo(f"scalora-dist {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Distributed LoRA / rsLoRA / ScaLoRA fine-tuning of transformers causal LMs."""


config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console(soft_wrap=True)  # the terminal wraps; logs and pipes get whole lines
err_console = Console(stderr=True, soft_wrap=True)

OVERRIDES_HELP = (
    "Overrides as dotted key paths, e.g. train.lr=1e-4 adapter.rank=16 "
    "adapter.target_modules=\\[q_proj,v_proj]. Values are parsed as YAML (ints, floats, bools, lists)."
)


def _reflow(text: str) -> str:
    """Help text as paragraphs: the line breaks of the source are not the terminal's."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


TRAIN_HELP = _reflow("""Train LoRA / rsLoRA / ScaLoRA adapters (or full fine-tuning) as CONFIG says.

CONFIG is a YAML file with the sections model, adapter (with adapter.scalora), data, train
and output; any key can be overridden after it with key.path=value. Unknown keys and wrong
types are errors that name the key. `scalora-dist config keys` lists every key with its
type, meaning and default; `scalora-dist config show CONFIG \\[overrides]` prints the
resolved config. Relative paths are taken from the working directory.

Writes to output.dir: config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, merged/ (a
transformers checkpoint of the fine-tuned weights) and, for method lora, adapter/ (PEFT
format). A directory that already holds a run is never overwritten unless --overwrite (or
continued with --resume).

Several processes: --nproc-per-node N starts a torchrun job of N processes on this node
(one per GPU); the command builds and runs `python -m torch.distributed.run ...` itself
(see it with --dry-run). Several nodes: run the same command on every node with --nnodes,
--rdzv-endpoint HOST:PORT (the same on all nodes, e.g. the first node's address) and,
optionally, --node-rank and --rdzv-id; under SLURM, one task per node: srun
--ntasks-per-node 1 scalora-dist train ... --nnodes $SLURM_NNODES ... Without these
options (or with 1 process on 1 node) the training runs in this process, with as many CPU
threads as the machine has idle cores unless OMP_NUM_THREADS says otherwise.

The config, the model, the data and the run directory are checked before any worker
starts: a problem is one message and exit code 2. Only rank 0 shows progress and the
summary; a failing rank's error is shown once, prefixed with \\[rankN], and the job's exit
code is that rank's (2: bad config or data, 1: the run failed). Ctrl-C stops every rank
(exit code 130).""")


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _load(config_path: Path, overrides: Optional[list[str]]) -> cfgmod.Config:
    try:
        return cfgmod.load_config(config_path, overrides or [])
    except cfgmod.ConfigError as e:
        _fail(str(e))


LAUNCH_PANEL = "Multi-process launch (torchrun)"


def _train_fail(message: str, code: int, prefix: str) -> None:
    """Report a failed run once: a torchrun worker leaves the message to the agent
    (scalora_dist.launch.agent prints the first failing rank's), anything else prints it."""
    from scalora_dist.launch.agent import record_worker_error

    if not (prefix and record_worker_error(message, code)):
        err_console.print(f"{escape(prefix)}[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@app.command(help=TRAIN_HELP)
def train(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="PATH|latest|auto",
        help="Resume from a checkpoint directory, or 'latest' for the newest one in "
        "output.dir/checkpoints (an error if there is none), or 'auto': the newest if any, "
        "else start fresh (for jobs restarted after a lost worker).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start afresh in an output.dir that holds a run: its logs, checkpoints and exports are "
        "removed once this run has been set up (without it, such a start is refused).",
    ),
    force_resume: bool = typer.Option(
        False,
        "--force-resume",
        help="Resume a checkpoint even though it was written with another model, method, data or "
        "training settings (refused otherwise, naming the keys that differ).",
    ),
    extend: bool = typer.Option(
        False,
        "--extend",
        help="Resume past the end of the checkpoint's schedule (a larger train.max_steps): the LR "
        "schedule is rebuilt over the new step count and continues at the checkpoint's step.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check the config and print the torchrun command that would run (or 'in-process' "
        "for a single-process run), then exit without training.",
    ),
    nproc_per_node: int = typer.Option(
        1,
        "--nproc-per-node",
        min=1,
        rich_help_panel=LAUNCH_PANEL,
        help="Processes on this node (one per GPU). More than 1 starts a torchrun job.",
    ),
    nnodes: str = typer.Option(
        "1",
        "--nnodes",
        rich_help_panel=LAUNCH_PANEL,
        help="Number of nodes, or an elastic range MIN:MAX (e.g. 1:4). More than 1 needs --rdzv-endpoint.",
    ),
    node_rank: Optional[int] = typer.Option(
        None,
        "--node-rank",
        min=0,
        rich_help_panel=LAUNCH_PANEL,
        help="This node's rank in [0, nnodes) (optional with the c10d rendezvous, which assigns ranks itself).",
    ),
    rdzv_endpoint: Optional[str] = typer.Option(
        None,
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        rich_help_panel=LAUNCH_PANEL,
        help="Rendezvous address, the same on every node (e.g. first-node:29500).",
    ),
    rdzv_id: Optional[str] = typer.Option(
        None,
        "--rdzv-id",
        rich_help_panel=LAUNCH_PANEL,
        help="Job id shared by all nodes. Default: $SLURM_JOB_ID (or PBS_JOBID, LSB_JOBID, "
        "JOB_ID) when set, else derived from the command line, so the same command on every "
        "node joins the same job.",
    ),
    rdzv_backend: str = typer.Option(
        "c10d",
        "--rdzv-backend",
        rich_help_panel=LAUNCH_PANEL,
        help="torchrun rendezvous backend (c10d, static, etcd, ...).",
    ),
    max_restarts: int = typer.Option(
        0,
        "--max-restarts",
        min=0,
        rich_help_panel=LAUNCH_PANEL,
        help="How often torchrun restarts all workers after a failure before giving up.",
    ),
) -> None:
    from scalora_dist.distributed import launched_by_torchrun
    from scalora_dist.launch.torchrun import LaunchError, LaunchOptions

    if launched_by_torchrun():
        # A worker of a torchrun job: train here, never launch again (the launcher passes no
        # launch option on, and any given by hand are ignored).
        if dry_run:
            console.print("in-process", highlight=False)
            return
        _train_worker(config, overrides or [], quiet, resume, overwrite, force_resume, extend)
        return

    options = LaunchOptions(
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id,
        rdzv_backend=rdzv_backend,
        max_restarts=max_restarts,
    )
    try:
        options.validate()
    except LaunchError as e:
        _fail(str(e))
    if overwrite and resume not in (None, "auto"):
        _fail("--overwrite starts afresh; it cannot go with --resume (except auto)")
    cfg = _load(config, overrides)  # config errors show once, here, before any worker starts
    flags = dict(overwrite=overwrite, force_resume=force_resume, extend=extend)
    if options.needs_torchrun():
        from scalora_dist.run.stopping import install_handlers

        install_handlers()  # a stop asked for (Ctrl-C too) before the workers start: start none
        _launch(config, overrides or [], options, quiet, resume, dry_run, flags, cfg)
        return
    if dry_run:
        console.print("in-process", highlight=False)
        return
    from scalora_dist.distributed import choose_threads
    from scalora_dist.run.stopping import install_handlers

    install_handlers()  # SIGUSR1 / SIGTERM / a first Ctrl-C: checkpoint at the next step, then stop
    threads, why = choose_threads()
    if not quiet:
        console.print(f"{threads} CPU thread(s) for this process ({why})", style="dim", highlight=False)
    code = 0
    try:
        _run_training(cfg, quiet, resume, rank=0, prefix="", **flags)
    except typer.Exit as e:
        code = e.exit_code
    _leave(code)


def _leave(code: int) -> None:
    """Exit now, without the interpreter's teardown: the run has written and closed all it
    keeps (metrics, checkpoints, exports, the wandb run), and unloading torch, transformers
    and datasets takes over a second; in a torchrun worker, gloo's threads have also aborted
    finished workers during that teardown ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _preflight(cfg: cfgmod.Config, options, resume: Optional[str], flags: dict) -> None:
    """Everything checkable without the weights, once, before torchrun starts (preflight.py)."""
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    from scalora_dist.data import DataError
    from scalora_dist.launch.preflight import preflight
    from scalora_dist.optim import check_optimizer
    from scalora_dist.run.checkpoint import CheckpointError

    low, high = options.node_range()
    worlds = sorted({options.nproc_per_node * low, options.nproc_per_node * high})
    try:
        check_optimizer(cfg.train, distributed=True)
        message = preflight(cfg, worlds, resume, **flags)
    except (cfgmod.ConfigError, DataError, CheckpointError) as e:
        _fail(str(e))
    if message:
        console.print(message, highlight=False)
        raise typer.Exit(0)


def _launch(
    config: Path,
    overrides: list[str],
    options,
    quiet: bool,
    resume: Optional[str],
    dry_run: bool,
    flags: dict,
    cfg: cfgmod.Config,
) -> None:
    """torchrun starts at once, its workers waiting at a gate after their imports, while this
    process checks everything it can without the weights (_preflight); then the gate opens,
    or on a problem the job ends before any worker did anything, and the problem is one line."""
    from scalora_dist.launch.torchrun import (
        Gate,
        abort_torchrun,
        format_command,
        run_torchrun,
        start_torchrun,
        torchrun_command,
    )

    extra = (["--quiet"] if quiet else []) + (["--resume", resume] if resume is not None else [])
    extra += [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    cmd = torchrun_command(config, overrides, options, extra)
    if dry_run:
        typer.echo(format_command(cmd))
        return
    from scalora_dist.run.stopping import EXIT_REQUEUE, clear_marker, read_marker, requested, write_marker

    gate = Gate()
    job = start_torchrun(cmd, gate)
    try:
        _preflight(cfg, options, resume, flags)
    except BaseException:  # a problem found (typer.Exit after its one line), Ctrl-C, a crash
        abort_torchrun(job, gate)
        raise
    run_dir = Path(cfg.output.dir)
    clear_marker(run_dir)
    if requested():  # told to stop before anything ran: nothing is lost, run again later
        abort_torchrun(job, gate)
        write_marker(run_dir, -1, requested(), None)
        err_console.print(f"stopped on {requested()} before the workers started; nothing was lost", highlight=False)
        raise typer.Exit(EXIT_REQUEUE)
    nodes = "" if options.nnodes == "1" else f" (node of {options.nnodes})"
    err_console.print(
        f"launching {options.nproc_per_node} processes on this node{nodes}: {escape(format_command(cmd))}",
        highlight=False,
        style="dim",
        soft_wrap=True,
    )
    gate.open()
    code = run_torchrun(cmd, started=job)  # a failing rank's error is printed once, by scalora_dist.launch.agent
    if code == 130:
        err_console.print("[bold red]interrupted[/bold red]: all ranks stopped", highlight=False)
    elif code == 0 and read_marker(run_dir) is not None:
        code = EXIT_REQUEUE  # stopped on a signal after its checkpoint: run again to continue
    _leave(code)  # the workers wrote everything; this process only checked and launched


def _train_worker(
    config: Path,
    overrides: list[str],
    quiet: bool,
    resume: Optional[str],
    overwrite: bool,
    force_resume: bool,
    extend: bool,
) -> None:
    from scalora_dist.run.stopping import install_handlers

    install_handlers(ctrl_c=False)  # SIGUSR1 / SIGTERM: checkpoint, then stop; SIGINT (a second Ctrl-C): at once
    rank = int(os.environ.get("RANK", 0))
    prefix = f"[rank{rank}] "
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    import scalora_dist.train  # noqa: F401  (the imports take seconds: done while the launcher checks)
    from scalora_dist.launch.torchrun import wait_at_gate

    if not wait_at_gate():  # the launcher found a problem and says it
        _leave(0)
    try:
        cfg = cfgmod.load_config(config, overrides)
    except cfgmod.ConfigError as e:
        _train_fail(str(e), 2, prefix)
    if rank == 0:
        world = os.environ.get("WORLD_SIZE", "1")
        console.print(f"torchrun job of {world} processes (output from rank 0)", highlight=False)
    code = 0
    try:
        _run_training(
            cfg, quiet, resume, rank=rank, prefix=prefix, overwrite=overwrite, force_resume=force_resume, extend=extend
        )
    except typer.Exit as e:
        code = e.exit_code
    _leave(code)  # the process group is gone too


def _run_training(
    cfg: cfgmod.Config, quiet: bool, resume: Optional[str], rank: int, prefix: str, **flags: bool
) -> None:
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    from scalora_dist.data import DataError
    from scalora_dist.distributed import destroy_distributed
    from scalora_dist.run.checkpoint import CheckpointError
    from scalora_dist.train import TrainingError
    from scalora_dist.train import train as run_training

    finished = False
    try:
        result = run_training(cfg, show_progress=not quiet and rank == 0, resume=resume, **flags)
        finished = True
    except (cfgmod.ConfigError, DataError, CheckpointError) as e:
        _train_fail(str(e), 2, prefix)
    except TrainingError as e:
        _train_fail(str(e), 1, prefix)
    except KeyboardInterrupt:
        if not prefix:  # a torchrun job's launcher says it once for all ranks
            err_console.print("[bold red]interrupted[/bold red]", highlight=False)
        raise typer.Exit(130)
    except Exception as e:
        if not prefix:
            raise  # one process: the traceback is the report
        import traceback

        if os.environ.get("SCALORA_DIST_TRACEBACK"):
            traceback.print_exc()
        _train_fail(f"{type(e).__name__}: {e} (SCALORA_DIST_TRACEBACK=1 prints the traceback)", 1, prefix)
    finally:
        # Shut gloo/NCCL down before interpreter exit; its threads otherwise abort the
        # process ("terminate called without an active exception") after a good run.
        destroy_distributed(wait_for_peers=finished)
    if rank != 0:
        return
    if result.stopped_at is not None:
        if not prefix:  # one process: say so with the exit code; a job's launcher reads the marker
            from scalora_dist.run.stopping import EXIT_REQUEUE

            raise typer.Exit(EXIT_REQUEUE)
        return
    if result.nothing_to_do:
        from scalora_dist.run.rundir import Start, nothing_to_do_message

        console.print(
            nothing_to_do_message(Start(result.checkpoint, {"step": result.first_step}), result.steps), highlight=False
        )
        return
    console.print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}", highlight=False)
    if result.eval_loss is not None:
        console.print(f"eval loss {result.eval_loss:.4f}", highlight=False)
    console.print(f"outputs in {result.run_dir}", highlight=False)


SLURM_HELP = _reflow("""Write an sbatch script for this run into output.dir and submit it (one srun task
per node, each a torchrun launcher of --gpus-per-node processes, c10d rendezvous on the
first node, --resume auto so restarts and requeues continue from the newest checkpoint).

The config is checked first. #SBATCH lines hold literal values. With --dry-run the script
is printed, not written or submitted; with --no-submit it is written but not submitted.
""")


@app.command("slurm", help=SLURM_HELP)
def slurm(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    nodes: int = typer.Option(1, "--nodes", "-N", help="Number of nodes."),
    gpus_per_node: int = typer.Option(1, "--gpus-per-node", "-G", help="Processes (= GPUs) per node."),
    request_gpus: bool = typer.Option(
        True,
        "--request-gpus/--no-request-gpus",
        help="Put #SBATCH --gpus-per-node in the script (--no-request-gpus for CPU partitions).",
    ),
    partition: Optional[str] = typer.Option(None, "--partition", "-p"),
    time_limit: Optional[str] = typer.Option(
        "24:00:00", "--time", "-t", help="Time limit (HH:MM:SS, D-HH:MM:SS, minutes)."
    ),
    account: Optional[str] = typer.Option(None, "--account", "-A"),
    job_name: Optional[str] = typer.Option(None, "--job-name", "-J", help="Default: scalora-<output dir name>."),
    cpus_per_task: Optional[int] = typer.Option(
        None, "--cpus-per-task", "-c", help="CPUs for each node's task (all its workers)."
    ),
    mem: Optional[str] = typer.Option(None, "--mem", help="Memory per node, e.g. 200G."),
    max_restarts: int = typer.Option(3, "--max-restarts", help="torchrun restarts after a failed worker."),
    rdzv_port: Optional[int] = typer.Option(
        None, "--rdzv-port", help="Rendezvous port (default 20000 + (job id + 997 x restart count) % 10000)."
    ),
    join_timeout: int = typer.Option(
        1800, "--join-timeout", help="Seconds the nodes wait for each other at the rendezvous."
    ),
    python: Optional[str] = typer.Option(
        None,
        "--python",
        help="Interpreter the job runs (must have scalora_dist installed). Default: the one running this command.",
    ),
    signal_margin: Optional[int] = typer.Option(
        None,
        "--signal-margin",
        help="Seconds before the time limit at which the job gets SIGUSR1 and checkpoints "
        "(default: 3 x (the slowest step + save measured in output.dir) + 60 s, else 300 s).",
    ),
    max_requeues: int = typer.Option(
        3, "--max-requeues", min=1, help="Stop requeueing after this many stops in a row without a new checkpoint."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the script; write and submit nothing."),
    submit: bool = typer.Option(True, "--submit/--no-submit", help="Submit with sbatch after writing."),
) -> None:
    import shutil
    import subprocess
    import sys

    from scalora_dist.launch.slurm import SbatchOptions, SlurmError, default_signal_margin, parse_job_id, render_sbatch

    cfg = _load(config, overrides)
    run_dir = Path(cfg.output.dir)
    cwd = Path.cwd().resolve()
    run_dir_abs = run_dir if run_dir.is_absolute() else cwd / run_dir
    options = SbatchOptions(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        request_gpus=request_gpus,
        partition=partition,
        time=time_limit,
        account=account,
        job_name=job_name or "scalora-" + (run_dir_abs.name or "run"),
        cpus_per_task=cpus_per_task,
        mem=mem,
        max_restarts=max_restarts,
        config=str(config.resolve()),
        overrides=list(overrides or []),
        output=str(run_dir_abs / "slurm-%j.out"),
        chdir=str(cwd),
        python=python or sys.executable,
        join_timeout_s=join_timeout,
        rdzv_port=rdzv_port,
        max_requeues=max_requeues,
        signal_margin_s=signal_margin or default_signal_margin(run_dir_abs, time_limit),
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


@app.command("plan")
def plan_cmd(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Processes per node."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes."),
    device_memory: Optional[str] = typer.Option(
        None,
        "--device-memory",
        metavar="SIZE",
        help="Memory of one rank's device, e.g. 80GiB (default: model.memory_per_rank_gib, else this "
        "machine's GPU, else its host memory per process).",
    ),
    device: Optional[str] = typer.Option(
        None,
        "--device",
        help="cuda or cpu: what the run computes on (default: cuda when this machine has a GPU "
        "or --device-memory is given, else cpu).",
    ),
) -> None:
    """Will this config fit, and why not: the memory plan per rank (frozen base, adapters,
    optimizer state, activations, loss head, FSDP2's working set), the base placement `auto`
    would take, and what would make it fit. Reads only the model's config.json. Exit code 1
    when it does not fit."""
    import torch

    from scalora_dist.plan import GiB, memory_per_rank, parse_memory, plan_report

    cfg = _load(config, overrides)
    if device not in (None, "cuda", "cpu"):
        _fail(f"--device: {device!r} is not cuda or cpu")
    device = device or ("cuda" if torch.cuda.is_available() or device_memory else "cpu")
    if device_memory:
        try:
            memory, source = parse_memory(device_memory), f"--device-memory {device_memory}"
        except ValueError as e:
            _fail(f"--device-memory: {e}")
    elif cfg.model.memory_per_rank_gib:
        memory, source = cfg.model.memory_per_rank_gib * GiB, "model.memory_per_rank_gib"
    elif device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda on a machine without a GPU: give its memory with --device-memory (e.g. 80GiB)")
    else:
        memory, source = memory_per_rank(device, nproc_per_node)
    try:
        report, fits = plan_report(cfg, nproc_per_node * nnodes, device, memory, source)
    except (OSError, ValueError) as e:
        _fail(f"model.path: cannot read the model's config ({e})")
    console.print(report, highlight=False, markup=False)
    raise typer.Exit(0 if fits else 1)


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
    """List every config key with its type (or choices), default and meaning. Paths in a
    config (model.path, data files, output.dir) are resolved against the working directory."""
    rows = [(key, cfgmod.type_name(key), repr(default), doc) for key, default, doc in cfgmod.iter_keys(cfgmod.Config)]
    if console.is_terminal:
        table = Table("key", "type", "default", "meaning", show_lines=False)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # a pipe or a file: one whole line per key, nothing cut to a terminal's width
        for key, kind, default, doc in rows:
            console.print(f"{key} ({kind}; default {default}): {doc}", highlight=False, markup=False)
    console.print("The method behind the adapter keys: docs/method.md in the repository.", highlight=False)


MODEL_HELP = "A merged checkpoint directory, a run directory (its merged/), a base model with --adapter, or a hub id."


def _inference_errors(fn):
    """Run fn, turning our errors into one message and exit code 2."""
    from scalora_dist.data import DataError
    from scalora_dist.run.checkpoint import CheckpointError

    try:
        return fn()
    except (cfgmod.ConfigError, DataError, CheckpointError) as e:
        _fail(str(e))


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Text to continue (or, with --chat, the first user turn)."
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="Apply the tokenizer's chat template: a conversation on a terminal, one turn read from stdin otherwise.",
    ),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="A PEFT adapter directory (or a LoRA run directory) to load onto MODEL."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: the same seed gives the same tokens."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Load the base as bitsandbytes NF4."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
) -> None:
    """Generate text from a trained model, streaming tokens as they come."""
    import sys as _sys

    from transformers import TextStreamer

    from scalora_dist.inference import Sampling, generate, load_model, prompt_ids
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    loaded = _inference_errors(lambda: load_model(model, adapter, load_in_4bit=load_in_4bit, dtype=dtype))
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    interactive = chat and prompt is None and _sys.stdin.isatty()
    if not chat and prompt is None:
        _fail("give --prompt TEXT, or --chat")
    history: list[dict] = []
    text = prompt if prompt is not None else ("" if interactive else _sys.stdin.read().strip())
    while True:
        if interactive and not text:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if not text:
                continue
        ids = _inference_errors(lambda: prompt_ids(loaded.tokenizer, text, chat, history))
        new = generate(loaded.model, loaded.tokenizer, ids, sampling, stream=streamer)
        if not interactive:
            break
        history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": loaded.tokenizer.decode(new, skip_special_tokens=True)},
        ]
        text = ""


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Optional[list[str]] = typer.Option(
        None,
        "--data",
        help="Held-out data (a file, dataset folder or hub id; repeatable). "
        "Default: a run directory's data.eval_files.",
    ),
    data_format: Optional[str] = typer.Option(
        None, "--format", help="text | instruction | alpaca | chat | sharegpt (default: the run's, else text)."
    ),
    split: str = typer.Option("train", "--split", help="Split of a dataset folder or hub dataset."),
    max_length: Optional[int] = typer.Option(None, "--max-length"),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A PEFT adapter to load onto MODEL."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="lm-evaluation-harness tasks, comma-separated (pip install 'scalora-dist\\[eval]')."
    ),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="A folder of local lm-eval YAML tasks."),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval: examples per task (or a fraction)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON here."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit"),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Score a trained model: held-out loss, perplexity and labelled tokens through the
    training data pipeline, and/or lm-evaluation-harness tasks."""
    import json as _json

    import yaml

    from scalora_dist.config import DataConfig, DataSource
    from scalora_dist.inference import held_out_loss, load_model, run_lm_eval
    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    loaded = _inference_errors(lambda: load_model(model, adapter, load_in_4bit=load_in_4bit, dtype=dtype))
    results: dict = {"model": loaded.source}
    run_data = {}
    if loaded.run_dir is not None:
        run_data = yaml.safe_load((loaded.run_dir / "config.yaml").read_text()).get("data", {})
    entries = [DataSource(path=d, split=split) for d in data] if data else run_data.get("eval_files") or []
    if entries:
        fields = {k: v for k, v in run_data.items() if k in {f.name for f in dataclasses.fields(DataConfig)}}
        fields.update(
            {
                k: v
                for k, v in (("format", data_format), ("max_length", max_length), ("packing", packing))
                if v is not None
            }
        )
        data_cfg = _inference_errors(
            lambda: cfgmod._build(DataConfig, {**fields, "train_files": [], "eval_files": []}, "data.")
        )
        loss = _inference_errors(lambda: held_out_loss(loaded, entries, data_cfg))
        results["held_out"] = loss
        console.print(
            f"held-out: loss {loss['eval_loss']:.4f}  ppl {loss['eval_ppl']:.2f}  "
            f"{loss['labelled_tokens']:,} labelled tokens in {loss['examples']:,} sequences",
            highlight=False,
        )
    if tasks:
        metrics, table = _inference_errors(
            lambda: run_lm_eval(
                loaded, [t.strip() for t in tasks.split(",") if t.strip()], include_path=include_path, limit=limit
            )
        )
        results["lm_eval"] = {
            "results": metrics["results"],
            "versions": metrics.get("versions", {}),
            "n-shot": metrics.get("n-shot", {}),
        }
        console.print(table, highlight=False)
    if not entries and not tasks:
        _fail("nothing to evaluate: give --data (or a run directory with data.eval_files), or --tasks")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_json.dumps(results, indent=2, default=str) + "\n")
        console.print(f"results in {out}", highlight=False)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory (output.dir/checkpoints/step-XXXXXXXX)."),
    out: Path = typer.Option(
        ..., "--out", help="Directory to write merged/ (and, for LoRA, adapter/) into, as a run directory holds them."
    ),
    model_path: Optional[str] = typer.Option(
        None, "--model-path", help="The base model, if not where the run's model.path says."
    ),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the run's)."),
) -> None:
    """Write a merged transformers checkpoint (and, for LoRA runs, the PEFT adapter) from any
    checkpoint of a run: offline, in this one process, whatever the number of ranks that wrote it."""
    from scalora_dist.metrics import quiet_libraries
    from scalora_dist.model.loading import DTYPES
    from scalora_dist.run.export import export_checkpoint, export_checkpoint_adapter

    quiet_libraries()
    if dtype is not None and dtype not in DTYPES:
        _fail(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    merged = _inference_errors(
        lambda: export_checkpoint(
            checkpoint, out / "merged", model_path=model_path, dtype=DTYPES[dtype] if dtype else None
        )
    )
    console.print(f"merged checkpoint in {merged}", highlight=False)
    adapter = _inference_errors(lambda: export_checkpoint_adapter(checkpoint, out / "adapter", model_path=model_path))
    if adapter is not None:
        console.print(f"PEFT adapter in {adapter}", highlight=False)


@app.command("plot")
def plot_cmd(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    title: Optional[str] = typer.Option(None, "--title"),
) -> None:
    """Plot several runs side by side, aligned by step: training loss, held-out loss, learning
    rate and, for ScaLoRA, the column / scalar / skipped shares of refactors."""
    from scalora_dist.plot import plot_runs

    _inference_errors(lambda: plot_runs(runs, out, title))
    console.print(f"wrote {out}", highlight=False)


@app.command("make-tiny-model")
def make_tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint and tokenizer to."),
    arch: str = typer.Option("llama", help="llama | mistral | qwen2 | qwen3 | gemma3 | gemma3-multimodal"),
    corpus: Optional[list[Path]] = typer.Option(
        None,
        help="Text files (JSONL with a text field, or .txt) to train the tokenizer on; "
        "default: the shipped quickstart corpus.",
    ),
    vocab_size: int = typer.Option(512),
    hidden_size: int = typer.Option(256),
    num_layers: int = typer.Option(4),
    num_heads: int = typer.Option(4),
    num_kv_heads: int = typer.Option(2),
    intermediate_size: int = typer.Option(512),
    tie_word_embeddings: bool = typer.Option(False, help="Share the input embedding with the output head."),
    max_shard_size: Optional[str] = typer.Option(
        None, help="Split the weights into safetensors files of at most this size plus an index (e.g. 200KB)."
    ),
    seed: int = typer.Option(0),
) -> None:
    """Build a small random-weight causal LM and an offline-trained tokenizer, saved as a
    normal transformers checkpoint (no hub download)."""
    from scalora_dist.model.tiny import ARCHITECTURES
    from scalora_dist.model.tiny import make_tiny_model as build

    if arch not in ARCHITECTURES:
        _fail(f"--arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    missing = [str(p) for p in corpus or [] if not p.is_file()]
    if missing:
        _fail(f"--corpus: file not found: {', '.join(missing)}")
    path = build(
        out,
        arch=arch,
        corpus_files=[str(p) for p in corpus] if corpus else None,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_shard_size=max_shard_size,
        seed=seed,
    )
    console.print(f"wrote a tiny {arch} model to {path}", highlight=False)


def main() -> None:
    """The `scalora-dist` command: every subcommand writes and closes what it keeps before it
    returns, so the process leaves without the interpreter's teardown (see _leave)."""
    try:
        app()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        _leave(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))


if __name__ == "__main__":
    main()
