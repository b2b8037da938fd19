"""Metrics: metrics.jsonl / eval.jsonl always, TensorBoard and W&B when asked, a rich
progress bar on the console."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from scalora_dist.config import ConfigError, OutputConfig


def peak_rss_mib() -> float:
    """Peak resident memory of this process. On Linux VmHWM, since ru_maxrss survives
    execve: a process started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsWriter:
    """Appends one JSON object per record; mirrors scalars to TensorBoard / W&B if enabled."""

    def __init__(self, cfg: OutputConfig, run_dir: Path, run_config: dict[str, Any]):
        self.run_dir = run_dir
        self.train_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "output.tensorboard: true, but tensorboard is not installed "
                    "(pip install 'scalora-dist[tensorboard]')"
                ) from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "output.wandb: true, but wandb is not installed (pip install 'scalora-dist[wandb]')"
                ) from None
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(run_dir), config=run_config)

    def log_train(self, record: dict[str, Any]) -> None:
        self._append(self.train_path, record)
        self._mirror("train", record)

    def log_eval(self, record: dict[str, Any]) -> None:
        self._append(self.eval_path, record)
        self._mirror("eval", record)

    def log_sample(self, record: dict[str, Any]) -> None:
        self._append(self.samples_path, record)

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _mirror(self, prefix: str, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {
            f"{prefix}/{k}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class _ProgressWithStats(Progress):
    """A progress bar with one line of training statistics under it."""

    stats = Text("")

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield self.stats


class _ConsoleLogHandler(logging.Handler):
    """Log records printed through the live console, above the bar (never into it)."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record)), highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


class ProgressDisplay:
    """What rank 0 shows while training.

    On a terminal: a live bar (steps done of the whole run, resumed steps included) with an
    ETA from the steps timed so far, and the latest loss, lr, tokens/s and ScaLoRA counts
    under it; log lines are printed above it through the same console. Anywhere else (a
    pipe, a SLURM log): one plain, flushed line per logged step with the same figures.
    Silent when `enabled` is False (non-zero ranks, --quiet)."""

    def __init__(self, total_steps: int, enabled: bool = True, start: int = 0):
        self.console = Console(quiet=not enabled)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total, self.start = total_steps, start
        self._started = time.perf_counter()
        self._progress = _ProgressWithStats(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.live,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start)
        self._log = logging.getLogger("scalora_dist")
        self._handler: _ConsoleLogHandler | None = None
        self._saved_handlers: list[logging.Handler] = []

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            self._progress.start()
            self._handler = _ConsoleLogHandler(self.console)
            if self._log.handlers:
                self._handler.setFormatter(self._log.handlers[0].formatter)
            self._saved_handlers, self._log.handlers = self._log.handlers, [self._handler]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._progress.stop()
            self._log.handlers = self._saved_handlers

    def eta_seconds(self, step: int) -> float | None:
        done = step - self.start
        if done <= 0:
            return None
        return (time.perf_counter() - self._started) / done * (self.total - step)

    def update(self, step: int, record: dict[str, Any]) -> None:
        parts = [
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"grad {record['grad_norm']:.3g}",
            f"{record['tokens_per_s']:,.0f} tok/s",
        ]
        if record.get("tokens"):
            parts.append(f"{record['labelled_tokens'] / record['tokens']:.0%} labelled")
        if "scalora_column" in record:
            parts.append(
                f"scalora col/scal/skip {record['scalora_column']}/{record['scalora_scalar']}/"
                f"{record['scalora_skipped']}"
            )
            if record.get("scalora_mean_alpha") is not None:
                parts.append(f"α {record['scalora_mean_alpha']:.3f} β {record['scalora_mean_beta']:.3f}")
            if record.get("scalora_acc_dropped_fraction") is not None:
                parts.append(f"acc dropped {record['scalora_acc_dropped_fraction']:.1%}")
        eta = self.eta_seconds(step)
        if eta is not None and step < self.total:
            parts.append(f"eta {_duration(eta)}")
        line = "  ".join(parts)
        if self.live:
            self._progress.stats = Text(line)
            self._progress.update(self._task, completed=step)
        elif self.enabled:
            self.print(f"step {step}/{self.total}  {line}")

    def print(self, *args: Any) -> None:
        self.console.print(*args, highlight=False, soft_wrap=not self.live)
        if not self.live and self.enabled:
            self.console.file.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def quiet_libraries() -> None:
    """Our progress bar replaces the libraries' own bars and per-call warnings."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # bitsandbytes warns at import on some CPUs about an optional hub kernel we never use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def format_eval(record: dict[str, Any]) -> str:
    ppl = math.exp(record["eval_loss"]) if record["eval_loss"] < 50 else float("inf")
    return f"eval @ step {record['step']}: loss {record['eval_loss']:.4f}  ppl {ppl:.2f}"
