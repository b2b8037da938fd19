"""The training recipe: setup in a fixed order, then a loop that reads top to bottom.

setup: process group -> tokenizer -> model (FSDP2-sharded when several processes) ->
       adapters -> data -> optimizer -> scheduler -> ScaLoRA
step:  micro-batches forward/backward (FSDP2 gathers, reduce-scatters) -> [ScaLoRA refactor:
       local statistics -> one all-reduce -> solve -> merge into own shard -> rescale] ->
       clip -> optimizer step -> scheduler -> metrics -> (eval)
end:   final eval -> exports (PEFT adapter for lora, merged transformers checkpoint)

One process runs the same code with a world of one; only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import is_initialized as dist_is_initialized
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from scalora_dist.config import Config, to_dict, to_yaml
from scalora_dist.data import BatchLoader, count_tokens, load_split, model_inputs, truncated_examples
from scalora_dist.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum_,
    barrier,
    init_distributed,
    is_collective_timeout,
    local_tensor,
    set_collective_timeout,
    silent_ranks,
)
from scalora_dist.inference import Sampling, evaluate, generate, move_to, prompt_ids
from scalora_dist.metrics import MetricsWriter, ProgressDisplay, format_eval, peak_rss_mib
from scalora_dist.model.build import build_model
from scalora_dist.model.chunked_loss import loss_description
from scalora_dist.model.compile import compiled_frame_count
from scalora_dist.model.hub import model_reference, resolve_model_dir
from scalora_dist.model.loading import load_tokenizer, model_dtype
from scalora_dist.model.lora import lora_layers, save_peft_adapter
from scalora_dist.optim import build_optimizer, lr_multiplier
from scalora_dist.relora import ReLoRA, with_rewarmup
from scalora_dist.run.checkpoint import (
    estimated_checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    warn_if_short_of_space,
)
from scalora_dist.run.export import export_merged
from scalora_dist.run.rundir import clear_run, nothing_to_do, plan_start
from scalora_dist.run.stopping import SaveClock, StopSignals, any_rank_asks, clear_marker, write_marker
from scalora_dist.scalora.refactor import RefactorReport, ScaLoRA

FAULT_ENV = "SCALORA_DIST_FAULT"
SLOW_STEP_ENV = "SCALORA_DIST_SLOW_STEP"
"""Seconds every step of a run's first start waits (fault injection: a job slow enough for
its time limit's warning to fall inside training; a resumed start runs at full speed)."""
ACC_DROPPED_WARNING = 0.10
"""Warn once when re-compressing a 4-bit base's accumulators drops more than this share
(Frobenius norm) of a logging window's ScaLoRA merges: beyond it the refactors stop being
function-preserving in any useful sense."""
log = logging.getLogger("scalora_dist")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message names the step."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    nothing_to_do: bool = False
    """A resume whose checkpoint had already reached the last step: nothing was changed."""
    checkpoint: Path | None = None
    first_step: int = 0
    stopped_at: int | None = None
    """The step a run stopped at on SIGUSR1 / SIGTERM, after its checkpoint (no export)."""


@dataclass
class Run:
    """Everything a training step needs, built by `setup` in a fixed order."""

    cfg: Config
    dist: DistInfo
    tokenizer: Any
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: BatchLoader
    eval_loader: BatchLoader | None
    scalora: ScaLoRA | None
    total_steps: int
    relora: ReLoRA | None = None
    placement_note: str | None = None
    """How model.base_placement auto placed the frozen base, and why (several processes)."""

    @property
    def device(self) -> torch.device:
        return self.dist.device


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: float
    report: RefactorReport | None
    skipped: bool = False
    """The loss or a gradient was not finite and train.on_nonfinite_loss is skip: no update was made."""
    labelled_tokens: int = 0
    """Tokens with a label (the ones the loss is over), all ranks together."""


def setup(cfg: Config, dist: DistInfo | None = None) -> Run:
    dist = dist or init_distributed()
    torch.manual_seed(cfg.train.seed)
    model_dir = resolve_model_once_per_node(cfg.model, dist)
    tokenizer = load_tokenizer(model_dir)
    mesh = init_device_mesh(dist.device.type, (dist.world_size,)) if dist.distributed else None
    placement_note = place_base(cfg, model_dir, dist) if dist.distributed else None
    model = build_model(
        model_dir, cfg.model, cfg.adapter, dist.device, seed=cfg.train.seed, mesh=mesh, compile=cfg.train.compile
    )

    def loader(files: list[str], train: bool) -> BatchLoader:
        return BatchLoader(
            load_split(cfg.data, tokenizer, files),
            cfg.train.micro_batch_size,
            tokenizer.pad_token_id,
            seed=cfg.train.seed,
            shuffle=train,
            drop_last=train,
            rank=dist.rank,
            world_size=dist.world_size,
        )

    train_loader = loader(cfg.data.train_files, train=True)
    eval_loader = loader(cfg.data.eval_files, train=False) if cfg.data.eval_files else None
    total_steps = count_steps(cfg, train_loader)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train, dist.distributed)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    scalora = None
    if cfg.adapter.method == "scalora":
        scalora = ScaLoRA(
            cfg.adapter.scalora,
            list(lora_layers(model).values()),
            optimizer,
            all_reduce=all_reduce_sum_ if dist.distributed else None,
            lr_multiplier=scheduler.lr_lambdas[0],
        )
    relora = None
    if cfg.adapter.method == "relora":
        relora = ReLoRA(cfg.adapter.relora, lora_layers(model), optimizer, seed=cfg.train.seed)
    return Run(
        cfg,
        dist,
        tokenizer,
        model,
        params,
        optimizer,
        scheduler,
        train_loader,
        eval_loader,
        scalora,
        total_steps,
        relora,
        placement_note,
    )


def place_base(cfg: Config, model_dir: Path, dist: DistInfo) -> str | None:
    """model.base_placement auto, decided from the memory plan (scalora_dist/plan.py) on every
    rank, the base kept whole only if it fits on all of them; cfg records the choice. Returns
    the decision in words (None when the config named a placement)."""
    if cfg.model.base_placement != "auto":
        return None
    from transformers import AutoConfig

    from scalora_dist.plan import GiB, choose_placement, memory_per_rank, shape_of

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    memory, source = memory_per_rank(dist.device.type, local_world)
    if cfg.model.memory_per_rank_gib:
        memory, source = cfg.model.memory_per_rank_gib * GiB, "model.memory_per_rank_gib"
    shape = shape_of(AutoConfig.from_pretrained(model_dir), cfg.model.path)
    choice = choose_placement(cfg, shape, dist.world_size, dist.device.type, memory, source)
    sharded_somewhere = all_reduce_max(float(choice.placement == "sharded"), dist.device)
    cfg.model.base_placement = "sharded" if sharded_somewhere else "replicated"
    if cfg.model.base_placement == choice.placement:
        return choice.reason()
    return "sharded: the base whole does not fit on every rank"


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """train.lr_scheduler with its warm-up, and for relora the re-warm-up after each restart on top."""
    schedule = lr_multiplier(cfg.train.lr_scheduler, cfg.train.warmup_steps, total_steps)
    if cfg.adapter.method == "relora":
        schedule = with_rewarmup(schedule, cfg.adapter.relora)
    return LambdaLR(optimizer, schedule)


def count_steps(cfg: Config, train_loader: BatchLoader) -> int:
    """train.max_steps, or the optimizer steps of train.epochs passes over the data."""
    return cfg.train.max_steps or max(
        1, math.ceil(cfg.train.epochs * train_loader.batches_per_epoch() / cfg.train.grad_accum_steps)
    )


def resolve_model_once_per_node(model_cfg, dist: DistInfo) -> Path:
    """The checkpoint directory of model.path. A hub id is downloaded (if needed) by the
    first process of each node while the others wait, then read from the cache by them."""
    if not dist.distributed:
        return resolve_model_dir(model_cfg)
    if dist.local_rank == 0:
        model_dir = resolve_model_dir(model_cfg)
        barrier()
        return model_dir
    barrier()
    return resolve_model_dir(model_cfg, local_files_only=True)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step; `step` counts the steps already taken."""
    run.model.train()
    if run.scalora is not None:
        run.scalora.prepare(step)
    loss, tokens, labelled = forward_backward(
        run.model,
        run.train_loader,
        run.cfg.train.grad_accum_steps,
        run.device,
        offload_activations=run.cfg.model.offload_activations,
    )
    # Checked before the refactor: a non-finite gradient would be merged into the base.
    grad_norm = total_grad_norm(run.params) if math.isfinite(loss) else float("nan")
    if not math.isfinite(grad_norm):
        what = (
            f"loss is {loss}"
            if not math.isfinite(loss)
            else (
                f"the loss is finite but the gradients are not ({first_nonfinite_grad(run.model)} "
                "has the first non-finite gradient)"
            )
        )
        if run.cfg.train.on_nonfinite_loss == "stop":
            raise TrainingError(
                f"step {step + 1}: {what}; stopping before the optimizer step, so no "
                "checkpoint holds a broken model (lower train.lr, check the data, or set "
                "train.on_nonfinite_loss=skip)"
            )
        log.warning("step %d: %s; skipping the update (train.on_nonfinite_loss=skip)", step + 1, what)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        _restart_relora_if_due(run, step)
        return StepResult(loss, tokens, float("nan"), None, skipped=True, labelled_tokens=labelled)
    report = None
    if run.scalora is not None and run.scalora.is_due(step):
        report = run.scalora.refactor(step)
        grad_norm = total_grad_norm(run.params)  # the rescaled gradients are what is clipped
    if run.cfg.train.max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(run.params, run.cfg.train.max_grad_norm, torch.tensor(grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    _restart_relora_if_due(run, step)
    return StepResult(loss, tokens, grad_norm, report, labelled_tokens=labelled)


def _restart_relora_if_due(run: Run, step: int) -> None:
    """After optimizer step `step` (0-based), skipped or not: the restarts keep their places
    in the schedule, whose re-warm-ups follow them."""
    if run.relora is not None and run.relora.is_due(step + 1, run.total_steps):
        run.relora.restart(step + 1)


def total_grad_norm(params: list[nn.Parameter]) -> float:
    """The global L2 norm of all gradients (all ranks' shards together)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


def first_nonfinite_grad(model: nn.Module) -> str:
    """Name of the first trainable parameter whose gradient holds a NaN or inf on any rank."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    device = named[0][1].grad.device if named else torch.device("cpu")
    flags = torch.tensor(
        [float(not torch.isfinite(local_tensor(p.grad)).all()) for _, p in named],
        dtype=torch.float64,
        device=device,
    )
    if dist_is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad = [n for (n, _), f in zip(named, flags.tolist()) if f]
    return bad[0] if bad else "no parameter"


def train(
    cfg: Config,
    show_progress: bool = True,
    resume: str | None = None,
    *,
    overwrite: bool = False,
    force_resume: bool = False,
    extend: bool = False,
) -> TrainResult:
    """Run the recipe. `resume`: "latest" or a checkpoint path (an error if there is none),
    or "auto": the latest checkpoint if there is one, else a fresh start (what a job that
    torchrun or SLURM restarts after a lost worker wants). The run directory's rules
    (rundir.py): nothing in it is written or removed before the run is set up; a fresh start
    into a directory holding a run needs `overwrite`; a checkpoint of another configuration
    needs `force_resume`; training past its schedule needs `extend`."""
    run_dir = Path(cfg.output.dir)
    dist = init_distributed(flight_recorder_dir=run_dir / "flight_recorder")
    ckpt_root = run_dir / "checkpoints"
    begin = plan_start(cfg, resume, overwrite=overwrite, force_resume=force_resume)
    checkpoint = begin.checkpoint
    run = setup(cfg, dist)
    if nothing_to_do(begin, run.total_steps, extend):
        return TrainResult(
            run_dir,
            run.total_steps,
            float("nan"),
            None,
            nothing_to_do=True,
            checkpoint=checkpoint,
            first_step=begin.step,
        )
    # The run is set up: only now is anything in the run directory written or removed.
    if dist.is_main:
        if checkpoint is None:
            clear_run(run_dir, everything=overwrite)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    barrier()
    checkpoint_bytes = estimated_checkpoint_bytes(run.model, 2 if "8bit" in cfg.train.optimizer else 8)
    if dist.is_main:
        warn_if_short_of_space(run_dir, checkpoint_bytes)
    start = restore(run, checkpoint, rebuild_schedule=extend) if checkpoint is not None else 0
    if checkpoint is not None and dist.is_main:
        for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):  # drop records of steps being redone
            _truncate_jsonl(run_dir / name, after_step=start)

    writer = MetricsWriter(cfg.output, run_dir, to_dict(cfg)) if dist.is_main else None
    history: list[dict[str, Any]] = []
    window = _Window()
    eval_loss = None
    fault = _fault(dist.rank)
    slow_step = float(os.environ.get(SLOW_STEP_ENV) or 0)
    warned_dropped = False
    if dist.is_main:
        clear_marker(run_dir)
    clock = SaveClock(cfg.train.save_every_minutes)
    stopped: tuple[int, str] | None = None
    path = checkpoint
    at = {"step": start + 1, "where": "before step"}  # where the run is, for a collective that times out
    set_collective_timeout(cfg.train.collective_timeout_s)
    with (
        StopSignals() as signals,
        collective_timeouts(at, cfg.train.collective_timeout_s, ckpt_root),
        ProgressDisplay(run.total_steps, enabled=show_progress and dist.is_main, start=start) as progress,
    ):

        def stop_asked() -> bool:
            """Whether any rank got a stop request (a collective: every rank calls it at the same point)."""
            return any_rank_asks(signals.received is not None, False, run.device)[0]

        trainable = sum(p.numel() for p in run.params)
        truncated = truncated_examples(run.train_loader.dataset, None if cfg.data.packing else cfg.data.max_length)
        progress.print(
            f"[bold]scalora-dist[/bold] {cfg.adapter.method} on {cfg.model.path}: "
            f"{trainable:,} trainable parameters, {run.total_steps} steps, "
            f"{dist.world_size} process(es) on {run.device.type}, {loss_description(run.model)}"
            + (", activations offloaded to the host" if cfg.model.offload_activations else "")
            + (f", base placement {run.placement_note}" if run.placement_note else "")
            + (
                f", {truncated:,} of {len(run.train_loader.dataset):,} training examples truncated to "
                f"data.max_length={cfg.data.max_length}"
                if truncated
                else ""
            )
            + (f", resumed from {checkpoint} at step {start}" if checkpoint else "")
        )
        if stop_asked():  # asked during setup: nothing trained since the start, nothing to save
            stopped = (start, signals.name or "a signal on another rank")
        for step in range(start, run.total_steps if stopped is None else start):
            at.update(step=step + 1, where="in step")
            if fault == step + 1:
                raise RuntimeError(f"{FAULT_ENV}: injected failure at step {step + 1} on rank {dist.rank}")
            started = time.perf_counter()
            result = train_step(run, step)
            if slow_step and checkpoint is None:
                time.sleep(slow_step)
            window.add(result, time.perf_counter() - started)
            done = step + 1
            at["where"] = "after step"
            if done % cfg.train.log_every == 0 or done == run.total_steps:
                record = {
                    "step": done,
                    **window.flush(),
                    "lr": run.scheduler.get_last_lr()[0],
                    "grad_norm": result.grad_norm,
                    "peak_rss_mib": round(all_reduce_max(peak_rss_mib(), run.device), 1),
                }
                if cfg.train.compile:
                    record["compiled_frames"] = compiled_frame_count()
                if truncated and not history:
                    record["truncated_examples"] = truncated  # once, in the run's first record
                history.append(record)
                dropped = record.get("scalora_acc_dropped_fraction")
                if dropped is not None and dropped > ACC_DROPPED_WARNING and not warned_dropped:
                    warned_dropped = True
                    log.warning(
                        "step %d: the 4-bit base's rank-%d accumulators dropped %.1f%% of this "
                        "window's ScaLoRA merges (they hold more than their rank): every refactor "
                        "now changes the function a little; raise adapter.scalora.accumulator_rank "
                        "(scalora_acc_dropped_fraction in metrics.jsonl tracks it; warned once)",
                        done,
                        cfg.adapter.scalora.accumulator_rank,
                        100 * dropped,
                    )
                if writer is not None:
                    writer.log_train(record)
                progress.update(done, record)
            eval_due = (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == run.total_steps
            if run.eval_loader is not None and eval_due:
                loss = evaluate(run.model, run.eval_loader, run.device, cfg.train.eval_batches, stop_asked=stop_asked)
                if loss is not None:  # None: a stop came during the evaluation, which was cut short
                    eval_loss = loss
                    record = {"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))}
                    if writer is not None:
                        writer.log_eval(record)
                    progress.print(format_eval(record))
            if cfg.train.sample_prompts and (eval_due if cfg.train.eval_every else done == run.total_steps):
                for sample in sample_completions(run, done, stop_asked):
                    if writer is not None:
                        writer.log_sample(sample)
                    progress.print(f"sample @ step {done}: {sample['prompt']!r} -> {sample['completion']!r}")
            stop, timed = any_rank_asks(signals.received is not None, dist.is_main and clock.due(), run.device)
            save_due = (cfg.train.save_every and done % cfg.train.save_every == 0) or timed or stop
            if save_due or done == run.total_steps:
                at["where"] = "saving after step"
                path = save(run, ckpt_root, done)
                clock.saved()
                progress.print(f"checkpoint {path}")
            if stop and done < run.total_steps:
                stopped = (done, signals.name or "a signal on another rank")
                break
        if stopped is not None:
            if dist.is_main:
                write_marker(run_dir, stopped[0], stopped[1], path)
            log.warning(
                "stopped at step %d on %s%s; run again with --resume auto to continue",
                stopped[0],
                stopped[1],
                f", after writing {path}" if path is not None else " (nothing to save yet)",
            )
        else:
            at["where"] = "exporting after step"
            export(run, run_dir)

    if writer is not None:
        writer.close()
    final_loss = history[-1]["loss"] if history else float("nan")
    return TrainResult(
        run_dir,
        run.total_steps,
        final_loss,
        eval_loss,
        history,
        checkpoint=checkpoint,
        first_step=start,
        stopped_at=stopped[0] if stopped is not None else None,
    )


@contextlib.contextmanager
def collective_timeouts(at: dict[str, Any], timeout_s: float, ckpt_root: Path):
    """A collective that timed out waiting for a rank ends the run with a TrainingError that
    names the rank(s) that stopped answering, the step, and the last complete checkpoint."""
    try:
        yield
    except RuntimeError as e:
        if not dist_is_initialized() or not is_collective_timeout(e):
            raise
        silent = silent_ranks(min(10.0, timeout_s))
        who = f"rank {', '.join(map(str, silent))} stopped answering" if silent else "a rank stopped answering"
        last = latest_checkpoint(ckpt_root)
        raise TrainingError(
            f"{who} {at['where']} {at['step']}: this rank waited {timeout_s:g} s for it in a collective "
            f"(train.collective_timeout_s); stopping the job (the last complete checkpoint is "
            f"{last if last is not None else 'none yet'})"
        ) from None


@torch.no_grad()
def sample_completions(run: Run, step: int, stop_asked: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Greedy completions of train.sample_prompts by the model as it is now. Every rank runs
    them (FSDP2 needs every rank in every forward); they agree, as the logits do. Between
    prompts, `stop_asked` (a collective) can cut them short."""
    chat = run.cfg.data.format in ("chat", "sharegpt", "alpaca") and bool(getattr(run.tokenizer, "chat_template", None))
    run.model.eval()
    samples = []
    for prompt in run.cfg.train.sample_prompts:
        if stop_asked is not None and stop_asked():
            break
        ids = prompt_ids(run.tokenizer, prompt, chat)
        new = generate(run.model, run.tokenizer, ids, Sampling(run.cfg.train.sample_max_new_tokens))
        samples.append(
            {"step": step, "prompt": prompt, "completion": run.tokenizer.decode(new, skip_special_tokens=True)}
        )
    run.model.train()
    return samples


def save(run: Run, ckpt_root: Path, step: int) -> Path:
    app_state = {
        "step": step,
        "scheduler": run.scheduler.state_dict(),
        "data": run.train_loader.state_dict(),
        "global_batch": run.cfg.train.micro_batch_size * run.dist.world_size,
        "scalora": run.scalora.state_dict() if run.scalora is not None else None,
        "world_size": run.dist.world_size,
        "config": to_dict(run.cfg),
        "total_steps": run.total_steps,
        "export_dtype": str(model_dtype(run.cfg.model, run.device)).removeprefix("torch."),
    }
    return save_checkpoint(ckpt_root, step, run.model, run.optimizer, app_state, keep_last=run.cfg.train.keep_last)


def restore(run: Run, checkpoint: Path, rebuild_schedule: bool = False) -> int:
    """Load a checkpoint into a freshly set-up run; returns the step to continue from.
    `rebuild_schedule`: keep this run's LR schedule (over its own step count) and move it
    to the checkpoint's step, instead of the checkpoint's schedule."""
    app_state = load_checkpoint(checkpoint, run.model, run.optimizer, verify=False)  # plan_start verified it
    if rebuild_schedule:
        import warnings

        with warnings.catch_warnings():  # stepping a scheduler with no optimizer step in between
            warnings.simplefilter("ignore")
            for _ in range(int(app_state["step"])):
                run.scheduler.step()
    else:
        run.scheduler.load_state_dict(app_state["scheduler"])
    data = dict(app_state["data"])
    global_batch = run.cfg.train.micro_batch_size * run.dist.world_size
    if app_state["global_batch"] != global_batch:
        # Same examples consumed, counted in the new global batch size.
        consumed = data["position"] * app_state["global_batch"]
        data["position"] = consumed // global_batch
        if consumed % global_batch:
            log.warning(
                "global batch changed from %d to %d: the data order after resuming is not the uninterrupted run's",
                app_state["global_batch"],
                global_batch,
            )
    run.train_loader.load_state_dict(data)
    if run.scalora is not None and app_state.get("scalora") is not None:
        run.scalora.load_state_dict(app_state["scalora"])
    return int(app_state["step"])


def _truncate_jsonl(path: Path, after_step: int) -> None:
    if not path.is_file():
        return
    import json

    kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= after_step]
    path.write_text("".join(l + "\n" for l in kept))


def _fault(rank: int) -> int | None:
    """`SCALORA_DIST_FAULT=RANK:STEP` makes that rank raise at that step: a way to check,
    on a real cluster, that one failing rank ends the whole job (docs/faults.md)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault_rank, _, fault_step = spec.partition(":")
    return int(fault_step) if int(fault_rank) == rank else None


def forward_backward(
    model: nn.Module,
    loader: BatchLoader,
    accum_steps: int,
    device: torch.device,
    offload_activations: bool = False,
) -> tuple[float, int, int]:
    """Accumulate gradients over `accum_steps` micro-batches. Every rank divides its summed
    token losses by the labelled-token count of the whole global step, and FSDP2 sums the
    gradients: the result is the mean over all the step's tokens, independent of how the
    step is split into micro-batches and ranks. Returns the global loss, token count and
    labelled-token count. `offload_activations`: what the forward saves for the backward
    waits in host memory (model.offload_activations)."""
    batches = [loader.next_batch() for _ in range(accum_steps)]
    counts = torch.tensor(count_tokens(batches), dtype=torch.float64, device=device)
    all_reduce_sum_(counts)
    labelled, tokens = int(counts[0]), int(counts[1])
    num_items = torch.tensor(max(labelled, 1), device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        with saved_on_host(offload_activations):
            out = model(**move_to(model_inputs(batch), device), num_items_in_batch=num_items)
        out.loss.backward()
        loss += out.loss.detach().double()
    all_reduce_sum_(loss)
    return loss.item(), tokens, labelled


def saved_on_host(enabled: bool) -> contextlib.AbstractContextManager:
    """While active, tensors saved for the backward pass are copied to host memory (pinned
    where CUDA is, so the copy back can overlap) and copied back when the backward needs
    them. With gradient checkpointing the saved tensors are the blocks' inputs: the
    checkpointed blocks keep nothing else, and their recomputation saves under its own hooks."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def export(run: Run, run_dir: Path) -> None:
    """PEFT adapter (lora), then the merged transformers checkpoint; every rank takes part
    (sharded tensors are gathered one at a time), rank 0 writes."""
    cfg = run.cfg
    if cfg.adapter.method == "lora" and cfg.output.save_adapter:
        save_peft_adapter(run.model, run_dir / "adapter", cfg.adapter, model_reference(cfg.model))
    if cfg.output.save_merged:
        export_merged(run.model, run_dir / "merged", run.tokenizer, dtype=model_dtype(cfg.model, run.device))


class _Window:
    """Sums a few steps' figures between two metrics records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.labelled_tokens = 0
        self.seconds = 0.0
        self.reports: list[RefactorReport] = []
        self.skipped = 0

    def add(self, result: StepResult, seconds: float) -> None:
        self.tokens += result.tokens
        self.labelled_tokens += result.labelled_tokens
        self.seconds += seconds
        if result.skipped:
            self.skipped += 1
        else:
            self.losses.append(result.loss)
        if result.report is not None:
            self.reports.append(result.report)

    def flush(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
            "tokens": self.tokens,
            "labelled_tokens": self.labelled_tokens,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "step_time_s": self.seconds / max(len(self.losses) + self.skipped, 1),
        }
        if self.skipped:
            out["skipped_nonfinite_steps"] = self.skipped
        if self.reports:
            out["scalora_refactors"] = len(self.reports)
            out.update(RefactorReport.combine(self.reports).as_metrics())
        self.reset()
        return out
