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


def train_job(model_dir, out, nproc, *overrides, resume=None, env=None, timeout=300, quiet=True):
    """`scalora-dist train` on the quickstart recipe, shrunk to 6 steps of a global batch of 4
    on `nproc` processes (torchrun through the CLI when > 1), as a subprocess (`quiet`: no
    progress display, nor the run's first line)."""
    micro_batch = 4 // nproc
    cmd = [
        sys.executable,
        "-m",
        "scalora_dist.cli",
        "train",
        "configs/quickstart.yaml",
        *(["--quiet"] if quiet else []),
        f"model.path={model_dir}",
        f"output.dir={out}",
        "data.eval_files=[]",
        "train.eval_every=0",
        "data.max_length=32",
        "adapter.rank=2",
        "adapter.alpha=4",
        "adapter.scalora.warmup_steps=2",
        "train.max_steps=6",
        f"train.micro_batch_size={micro_batch}",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "train.log_every=1",
        *overrides,
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


# -- the Hugging Face hub, offline -------------------------------------------------------


def put_in_hub_cache(
    hf_home: str | Path,
    repo_id: str,
    source: str | Path,
    repo_type: str = "model",
    commit: str = "0123456789abcdef0123456789abcdef01234567",
) -> Path:
    """Lay `source`'s files out as huggingface_hub caches a downloaded repo
    ($HF_HOME/hub/{models|datasets}--org--name/snapshots/<commit>/..., refs/main), so
    HF_HUB_OFFLINE=1 resolves `repo_id` to them. Returns the snapshot directory."""
    import shutil

    repo = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_dataset_repo(
    root: str | Path,
    splits: dict[str, list[dict]],
    shards: int = 2,
    configs: dict[str, dict[str, list[dict]]] | None = None,
) -> Path:
    """A dataset folder as the hub stores one: Parquet shards under data/ named
    `{split}-0000K-of-0000N.parquet` and a README whose YAML header declares the configs."""
    root = Path(root)
    configs = {"default": splits, **(configs or {})}
    yaml_lines = ["---", "configs:"]
    for name, config_splits in configs.items():
        base = "data" if name == "default" else f"data/{name}"
        yaml_lines += [f"- config_name: {name}", "  data_files:"]
        for split, records in config_splits.items():
            n = max(1, min(shards, len(records)))
            for k in range(n):
                part = records[k * len(records) // n : (k + 1) * len(records) // n]
                write_parquet(root / base / f"{split}-{k:05d}-of-{n:05d}.parquet", part)
            yaml_lines += [f"  - split: {split}", f"    path: {base}/{split}-*.parquet"]
    (root / "README.md").write_text("\n".join(yaml_lines + ["---", "", "# A test dataset", ""]))
    return root


def effective_masters(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The float64 effective weight W0 + s * lora_B @ lora_A of every adapted layer (and the
    other trained tensors as they are) from the float32 masters in a DCP checkpoint:
    unlike the merged export, not rounded to the model dtype."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt_dir = Path(ckpt_dir)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(ckpt_dir, Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", weights_only=False)["model"]
    from scalora_dist.run.checkpoint import read_app_state

    adapter = read_app_state(ckpt_dir)["config"]["adapter"]
    r, alpha = adapter["rank"], adapter["alpha"]
    scale = alpha / r**0.5 if adapter["use_rslora"] else alpha / r
    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_B") or key.endswith(".lora_A") or not tensor.is_floating_point():
            continue
        layer = key.rsplit(".", 1)[0]
        effective = tensor.double()
        if f"{layer}.lora_A" in state and key.endswith(".weight"):
            effective = effective + scale * state[f"{layer}.lora_B"].double() @ state[f"{layer}.lora_A"].double()
        out[key] = effective
    return out
