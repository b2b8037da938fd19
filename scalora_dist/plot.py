"""Runs side by side: `scalora-dist plot RUN_DIR [RUN_DIR ...] --out FILE.png`.

Four panels, aligned by optimizer step: training loss, held-out loss, learning rate, and for
ScaLoRA runs the share of layer refactors that found column scales, fell back to one scalar
pair, or were skipped. Each run is labelled by its method and rank (and rsLoRA, ScaLoRA-I's
interval) from its config.yaml, plus its directory name when labels would repeat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scalora_dist.config import ConfigError


@dataclass
class RunCurves:
    label: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    refactor_steps: list[int] = field(default_factory=list)
    column: list[float] = field(default_factory=list)
    scalar: list[float] = field(default_factory=list)
    skipped: list[float] = field(default_factory=list)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_label(config: dict) -> str:
    adapter = config.get("adapter", {})
    method = adapter.get("method", "?")
    if method == "full":
        return "full fine-tuning"
    name = {"lora": "rsLoRA" if adapter.get("use_rslora") else "LoRA", "scalora": "ScaLoRA", "relora": "ReLoRA"}.get(
        method, method
    )
    interval = adapter.get("scalora", {}).get("interval", 1)
    if method == "scalora" and interval > 1:
        name += f"-I (I={interval})"
    return f"{name} r={adapter.get('rank')}"


def read_run(run_dir: Path) -> RunCurves:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"plot: {run_dir.resolve()} is not a run directory (no metrics.jsonl)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    curves = RunCurves(run_label(config))
    for r in _jsonl(run_dir / "metrics.jsonl"):
        curves.steps.append(r["step"])
        curves.loss.append(r["loss"])
        curves.lr.append(r["lr"])
        kinds = [r.get(k, 0) for k in ("scalora_column", "scalora_scalar", "scalora_skipped")]
        if sum(kinds):
            curves.refactor_steps.append(r["step"])
            for series, n in zip((curves.column, curves.scalar, curves.skipped), kinds):
                series.append(n / sum(kinds))
    for r in _jsonl(run_dir / "eval.jsonl"):
        curves.eval_steps.append(r["step"])
        curves.eval_loss.append(r["eval_loss"])
    return curves


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None):
    """Draw the runs into `out` (PNG); returns the matplotlib figure (its lines are the data)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plot: needs matplotlib (pip install 'scalora-dist[tools]')") from None
    runs = [read_run(Path(d)) for d in run_dirs]
    labels = [r.label for r in runs]
    for run, d in zip(runs, run_dirs):
        if labels.count(run.label) > 1:
            run.label += f" ({Path(d).name})"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_ax, eval_ax), (lr_ax, kind_ax) = axes
    for run in runs:
        loss_ax.plot(run.steps, run.loss, label=run.label)
        if run.eval_steps:
            eval_ax.plot(run.eval_steps, run.eval_loss, marker="o", label=run.label)
        lr_ax.plot(run.steps, run.lr, label=run.label)
        if run.refactor_steps:
            for series, kind, style in (
                (run.column, "column", "-"),
                (run.scalar, "scalar", "--"),
                (run.skipped, "skipped", ":"),
            ):
                kind_ax.plot(run.refactor_steps, series, style, label=f"{run.label}: {kind}")
    for ax, name in (
        (loss_ax, "training loss"),
        (eval_ax, "held-out loss"),
        (lr_ax, "learning rate"),
        (kind_ax, "ScaLoRA refactors (share of layers)"),
    ):
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return fig
