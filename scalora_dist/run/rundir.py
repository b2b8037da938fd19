"""The run directory's rules: a run never damages another run, and a resume continues the
run it claims to continue.

* `output.dir` must be a directory this process can write (checked before anything else).
* A fresh start into a directory that already holds a run is refused unless the user asks
  for it: `--overwrite` (its logs, checkpoints and exports are removed, but only once the
  new run has been set up successfully) or `--resume auto` (continue if there is a
  checkpoint, else start fresh: what a restarted or requeued job wants).
* A resume refuses a checkpoint whose model, method, data or training settings differ from
  this run's (world-independent keys: not the micro-batch, the logging or the output
  options) unless forced (`--force-resume`), and says which keys differ.
* A resume with nothing left to do says so and changes nothing.
* Training past the end of a checkpoint's schedule is an explicit choice (`--extend`): the
  learning-rate schedule is rebuilt over the new number of steps and continues at the
  checkpoint's step, so the LR jumps to what the new schedule gives there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalora_dist.config import Config, ConfigError, to_dict
from scalora_dist.run.checkpoint import (
    CheckpointError,
    dcp_keys,
    newest_verified_checkpoint,
    read_app_state,
    resolve_checkpoint,
    verify_checkpoint,
)

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "eval.jsonl",
    "samples.jsonl",
    "checkpoints",
    "merged",
    "adapter",
    "STOPPED",
)
LOGS = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")

# Keys a resumed run may change: how it is spread over processes, logged, evaluated,
# saved and exported; not what it trains, on what, or how.
RESUMABLE_CHANGES = {
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "model.cpu_offload",
    "model.offload_activations",
    "model.loss_kernel",
    "model.base_placement",
    "model.memory_per_rank_gib",
    "train.micro_batch_size",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.save_every_minutes",
    "train.keep_last",
    "train.on_nonfinite_loss",
    "train.collective_timeout_s",
    "train.sample_prompts",
    "train.sample_max_new_tokens",
    "train.max_steps",
    "train.epochs",
    "data.eval_files",
}


def check_output_dir(run_dir: Path) -> Path:
    """Create output.dir if needed and make sure it can be written; ConfigError otherwise."""
    where = Path(run_dir).expanduser().absolute()
    if where.exists() and not where.is_dir():
        raise ConfigError(f"output.dir: {where} is a file, not a directory")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output.dir: cannot create {where} ({e.strerror or e})") from None
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {where} is not writable")
    return where


def run_artifacts(run_dir: Path) -> list[str]:
    """What of a run is already in run_dir."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def refuse_fresh_start(run_dir: Path, found: list[str]) -> None:
    raise ConfigError(
        f"output.dir: {Path(run_dir).absolute()} already holds a run ({', '.join(found)}); "
        "continue it with --resume latest (or auto), start it over with --overwrite (its "
        "logs, checkpoints and exports are removed), or choose another output.dir"
    )


def clear_run(run_dir: Path, everything: bool) -> None:
    """Before a fresh start: the old logs, and with `everything` (--overwrite) the old
    checkpoints and exports too, so none of them can be mistaken for this run's."""
    for name in RUN_FILES if everything else LOGS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("model", "adapter", "data", "train", "output", "scalora"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every world-independent key that differs."""
    # as stored (JSON): tuples are lists there
    before, after = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    changed = []
    for key in sorted(set(before) | set(after)):
        if key.startswith("output.") or key in RESUMABLE_CHANGES:
            continue
        if before.get(key) != after.get(key):
            changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed


@dataclass
class Start:
    """Where a run starts: fresh, or from a checkpoint (with its saved small state)."""

    checkpoint: Path | None = None
    saved: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return int(self.saved["step"]) if self.saved else 0


def plan_start(
    cfg: Config, resume: str | None, *, overwrite: bool = False, force_resume: bool = False, checksums: bool = True
) -> Start:
    """Apply the rules that need no model or data: output.dir, a fresh start into a run,
    a checkpoint that does not verify against its manifest (--resume auto falls back to the
    newest that does; latest and a path refuse), a checkpoint of another configuration.
    Reads, never writes (but creates output.dir). `checksums`: verify the files' checksums
    too, not only their sizes (every rank calls this when distributed: a collective)."""
    run_dir = Path(cfg.output.dir)
    check_output_dir(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if resume == "auto":
        checkpoint = newest_verified_checkpoint(ckpt_root, checksums=checksums)
    else:
        checkpoint = resolve_checkpoint(resume, ckpt_root) if resume else None
        if checkpoint is not None:
            try:
                verify_checkpoint(checkpoint, checksums=checksums)
            except CheckpointError as e:
                raise CheckpointError(
                    f"resume: {e}; --resume auto would fall back to the newest checkpoint that verifies"
                ) from None
    found = run_artifacts(run_dir)
    if checkpoint is None and found and not overwrite and resume != "auto":
        refuse_fresh_start(run_dir, found)
    if checkpoint is None:
        return Start()
    saved = read_app_state(checkpoint)
    dcp_keys(checkpoint)  # its DCP metadata reads as metadata (never as code), before any worker starts
    if not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"resume: {checkpoint} holds no run configuration; it was not written by a training run")
    changed = config_differences(saved["config"], to_dict(cfg))
    if changed and not force_resume:
        raise CheckpointError(
            f"resume: {checkpoint} was written by a run with another configuration "
            f"({'; '.join(changed)}); resume with the same settings, or pass --force-resume "
            "to continue it under the new ones anyway"
        )
    return Start(checkpoint, saved)


def nothing_to_do(start: Start, total_steps: int, extend: bool) -> bool:
    """True when the checkpoint has already reached this run's last step; CheckpointError
    when this run's schedule is not the checkpoint's and `extend` was not asked for."""
    if start.saved is None:
        return False
    if start.step >= total_steps and not (extend and total_steps > start.step):
        return True
    saved_total = start.saved.get("total_steps", total_steps)
    if saved_total != total_steps and not extend:
        raise CheckpointError(
            f"resume: {start.checkpoint} was saved at step {start.step} of a {saved_total}-step "
            f"schedule, and this run has {total_steps} steps; pass --extend to continue it: the "
            f"learning-rate schedule is then rebuilt over {total_steps} steps from step "
            f"{start.step} (the LR jumps to the new schedule's value there)"
        )
    return False


def nothing_to_do_message(start: Start, total_steps: int) -> str:
    return (
        f"nothing to do: {start.checkpoint} is at step {start.step} and this run has "
        f"{total_steps} steps; nothing was changed (to train further raise train.max_steps "
        "and pass --extend)"
    )
