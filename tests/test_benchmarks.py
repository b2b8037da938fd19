"""The benchmark tools run end to end on a tiny setting (their code paths, not their numbers:
performance is measured by running the tools themselves, never by timed tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

TINY_MODEL = [
    "--hidden-size",
    "64",
    "--num-layers",
    "1",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
]


def _tool(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _rows(table: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for each body row of a rich table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if len(cells) > 2 and cells[0] and cells[1].replace(".", "", 1).isdigit():
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_bench_step_compares_methods_and_base_precisions():
    pytest.importorskip("bitsandbytes")
    variants = ["lora", "scalora", "full", "lora-nf4", "scalora-nf4"]
    rows = _rows(
        _tool("tools/benchmarks/bench_step.py", *TINY_MODEL, "--variants", ",".join(variants), "--peak-tflops", "0.5")
    )
    assert list(rows) == variants
    assert rows["lora"][1] == "1.000"  # the ratio column is relative to the first variant
    for cells in rows.values():  # MFU = achieved TFLOP/s over the given peak
        assert float(cells[4].rstrip("%")) == pytest.approx(100 * float(cells[3]) / 0.5, rel=0.01, abs=0.05)
    state = {v: float(cells[5]) for v, cells in rows.items()}
    # the 4-bit base stores its projections in a quarter of the bytes... but this model is
    # mostly embedding; it must still be smaller, and ScaLoRA's accumulators must show
    assert state["lora-nf4"] < state["lora"] and state["scalora-nf4"] > state["lora-nf4"]
    assert state["full"] > state["lora"]  # AdamW moments of every targeted weight


@pytest.mark.slow
def test_bench_distributed_runs_on_1_and_2_ranks():
    out = _tool(
        "tools/benchmarks/bench_distributed.py",
        "--ranks",
        "1,2",
        "--skip-load",
        "--skip-alone",
        *TINY_MODEL,
        "--variants",
        "lora,scalora",
    )
    assert "ScaLoRA" in out or "scalora" in out
    assert "2" in _rows(out) and "1" in _rows(out)


def test_bench_quant_fidelity_table():
    pytest.importorskip("bitsandbytes")
    out = _tool(
        "tools/benchmarks/bench_quant.py",
        "--size",
        "64",
        "--rank",
        "2",
        "--steps",
        "3",
        "--acc-ranks",
        "8",
        "--skip-real",
    )
    assert "naive requantisation" in out and "R=8" in out


def test_bench_loss_shows_the_chunked_head_holding_less_than_the_plain_one():
    """A vocabulary large enough that the whole logits dominate (64 x 32768 = 2M per row of
    tokens): the chunked loss, 4 chunks here, peaks lower and gives the same loss."""
    out = _tool(
        "tools/benchmarks/bench_loss.py",
        "--hidden",
        "64",
        "--vocab",
        "32768",
        "--tokens",
        "1024",
        "--dtype",
        "float32",
        "--chunk-tokens",
        "256",
    )
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}
    plain, chunked = float(rows["plain"][0]), float(rows["chunked"][0])
    assert chunked < 0.5 * plain, out
    assert rows["plain"][3].strip() == rows["chunked"][3].strip(), out  # the loss, to 6 decimals


def test_bench_loss_on_a_checkpoint_measures_whole_training_steps(tmp_path):
    """--model: real training steps of a saved checkpoint through scalora-dist's own path. A
    tiny model with a 32k vocabulary, so that the logits (1024 tokens x 32768) dominate the
    step: the chunked loss (64 positions a chunk) holds a fraction of the plain step's bytes
    and trains on the same loss."""
    import json

    import transformers

    from scalora_dist.model.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny", hidden_size=64, num_layers=1, max_position_embeddings=1024)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(32768, mean_resizing=False)
    model.save_pretrained(model_dir)
    out = tmp_path / "loss.md"
    _tool(
        "tools/benchmarks/bench_loss.py",
        "--model",
        str(model_dir),
        "--tokens",
        "1024",
        "--dtype",
        "float32",
        "--chunk-tokens",
        "64",
        "--out",
        str(out),
    )
    (row,) = json.loads(out.with_suffix(".json").read_text())
    plain, chunked = row["plain"], row["chunked"]
    assert plain["vocab"] == 32768 and row["tokens"] == 1024
    logits = 1024 * 32768 * 4
    # the plain step holds at least the float32 logits and their gradient at once
    assert max(s["peak_bytes"] for s in plain["steps"]) > 2 * logits
    for p, c in zip(plain["steps"], chunked["steps"]):
        assert c["peak_bytes"] < 0.5 * p["peak_bytes"]
        assert c["loss"] == pytest.approx(p["loss"], rel=1e-5)
    assert "| 1024 |" in out.read_text()


@pytest.mark.slow
def test_bench_peers_runs_every_contender_on_the_same_batches(tmp_path):
    """scalora-dist, PEFT + a torch loop and PEFT + Trainer on 1 and 2 processes (FSDP2 vs
    DDP). With one process all start from the same base and the same first batch, so their
    first losses agree: the data really is the same. (The plain-loss and sharded-base
    contenders, the same worker with model.chunked_loss=false or model.base_placement=sharded,
    are left out by --contenders to keep the suite short.)"""
    import json

    _tool(
        "tools/benchmarks/bench_peers.py",
        "--tiny",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--max-length",
        "64",
        "--nprocs",
        "1,2",
        "--contenders",
        "scalora-dist",
        "--out",
        str(tmp_path),
    )
    results = json.loads((tmp_path / "bench_peers.json").read_text())
    assert set(results) == {"1", "2"}
    for nproc, by_name in results.items():
        assert set(by_name) == {"scalora-dist", "peft-loop", "peft-trainer"}  # the peers always run
        for figures in by_name.values():
            assert figures["tokens_per_s"] > 0 and figures["peak_rss_mib"] > 100
    first = {name: r["first_loss"] for name, r in results["1"].items()}
    assert max(first.values()) - min(first.values()) < 1e-5 * first["scalora-dist"], first
    assert "| 2 | peft-trainer |" in (tmp_path / "bench_peers.md").read_text()


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_check(tmp_path):
    """tools/benchmarks/gpu_check.py --device cpu --tiny: the GPU check's code paths, so the script a
    lent GPU would run cannot rot. On CPU the exactness, 4-bit, attention, loss-kernel and
    offload checks pass (the last without device memory to free); throughput and memory run
    but have no GPU peak or CUDA memory to judge."""
    import importlib.util
    import json

    out = _tool("tools/benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path))
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = results["checks"]
    assert list(checks) == [
        "exactness",
        "bitsandbytes",
        "attention",
        "throughput",
        "memory",
        "loss_kernels",
        "offload",
    ], out[-2000:]
    for name in ("exactness", "bitsandbytes", "attention", "loss_kernels", "offload"):
        assert checks[name]["passed"] is True, (name, checks[name])
    if importlib.util.find_spec("liger_kernel"):  # run through Triton's interpreter here (conftest.py)
        assert checks["loss_kernels"]["liger"]["grad_rel_gap"] < 2e-2
    assert checks["exactness"]["fsdp2"] and checks["exactness"]["refactors"] >= 4
    for variant in ("lora", "scalora", "scalora-I10", "full"):
        assert checks["throughput"][variant]["tokens_per_s"] > 0
    assert all(b["planned_gib"] > 0 for b in checks["memory"]["blocks"].values())
    assert "| exactness | pass |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_bench_startup_times_the_first_logged_step():
    out = _tool("tools/benchmarks/bench_startup.py", "--quick", "--nprocs", "1")
    row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    assert float(row.split("|")[2].split()[0]) > 0
