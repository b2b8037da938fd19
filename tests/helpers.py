"""Small helpers shared by the tests (import with `from helpers import ...`; tests/ is on
sys.path under pytest's default rootdir-based import mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def write_jsonl(path: str | Path, records: list[Any]) -> Path:
    """One JSON value per line. A record that is a str is written verbatim (for malformed
    lines and blank lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def write_json(path: str | Path, records: list[Any], indent: int | None = 1) -> Path:
    """A JSON array of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=indent), encoding="utf-8")
    return path


def write_parquet(path: str | Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_text(path: str | Path, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- training jobs run through the CLI (tests of several processes) ----------------------

REPO = Path(__file__).resolve().parents[1]
# N ranks sum the same float32 numbers in another order (see tests/test_distributed.py)
SAME_MODEL_TOL = 2e-5


def train_job(model_dir, out, nproc, *overrides, resume=None, env=None, timeout=300):
    """`scalora-dist train` on the quickstart recipe, shrunk to 6 steps of a global batch of 4
    on `nproc` processes (torchrun through the CLI when > 1), as a subprocess."""
    micro_batch = 4 // nproc
    cmd = [
        sys.executable, "-m", "scalora_dist.cli", "train", "configs/quickstart.yaml", "--quiet",
        f"model.path={model_dir}", f"output.dir={out}", "data.eval_files=[]", "train.eval_every=0",
        "data.max_length=32", "adapter.rank=2", "adapter.alpha=4", "adapter.scalora.warmup_steps=2",
        "train.max_steps=6", f"train.micro_batch_size={micro_batch}", "train.lr=1e-2",
        "train.warmup_steps=0", "train.log_every=1", *overrides,
    ]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    if resume:
        cmd += ["--resume", str(resume)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def merged_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "merged/model.safetensors"))


def logged_losses(out) -> dict[int, float]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def assert_same_weights(a: dict, b: dict, tol: float = SAME_MODEL_TOL) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        err = ((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp(min=1e-12)).item()
        worst = max(worst, err)
        assert err < tol, f"{k}: relative error {err:.2e}"
    return worst
