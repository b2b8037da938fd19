"""The shipped 7-12B recipes (configs/<model>/<setup>.yaml, rendered by tools/generators/recipes.py):
each is what the template and the memory plan say, and each runs, as shipped, for two steps
on a tiny model of the same architecture class, with local data in the same format: the
one-GPU recipes in one process, the multi-GPU ones under torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jsonl

from scalora_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]

import recipes  # noqa: E402

SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml"))


def test_every_recipe_is_the_rendered_template_with_the_planned_memory():
    assert len(SHIPPED) == len(recipes.MODELS) * len(recipes.SETUPS) == 12
    assert recipes.main(["--check", str(REPO / "configs")]) == 0
    for model in recipes.MODELS:
        for setup in recipes.SETUPS:
            text = (REPO / f"configs/{model.slug}/{setup.slug}.yaml").read_text()
            assert text.splitlines()[1] == "#   " + setup.command.format(path=f"configs/{model.slug}/{setup.slug}.yaml")
            gib, placement = recipes.planned(model, setup, text)  # the plan of the shipped file itself
            assert f"Memory per GPU: {gib:.1f} GiB" in text and (setup.gpus == 1 or f"auto: {placement}" in text)


@pytest.mark.parametrize("path", SHIPPED)
def test_every_recipe_loads_and_names_a_hub_model_and_dataset(path):
    cfg = load_config(REPO / path)
    assert "/" in cfg.model.path and not Path(cfg.model.path).exists()
    assert cfg.data.train_files[0].path == "tatsu-lab/alpaca"


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from scalora_dist.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("recipes")
    records = [
        {
            "instruction": f"Name colour number {i}.",
            "input": "" if i % 2 else f"hint {i}",
            "output": f"Colour {i} is blue.",
        }
        for i in range(64)
    ]
    data = write_jsonl(root / "alpaca.jsonl", records)
    tiny = {m.tiny_arch: make_tiny_model(root / m.tiny_arch, arch=m.tiny_arch) for m in recipes.MODELS}
    groups = {1: {}, 2: {}}
    for model in recipes.MODELS:
        for setup in recipes.SETUPS:
            groups[1 if setup.gpus == 1 else 2][f"{model.slug}-{setup.slug}"] = {
                "config": str(REPO / f"configs/{model.slug}/{setup.slug}.yaml"),
                "overrides": [
                    f"model.path={tiny[model.tiny_arch]}",
                    f"data.train_files=[{data}]",
                    f"data.eval_files=[{data}]",
                    "data.max_length=64",
                    "train.epochs=0",
                    "train.max_steps=2",
                    "train.eval_batches=2",
                ],
            }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = str(REPO / "tests/workers/layouts_worker.py")
    for nproc, cases in groups.items():
        (root / f"cases{nproc}.json").write_text(json.dumps(cases))
        launcher = (
            [sys.executable, worker]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker]
        )
        proc = subprocess.run(
            [*launcher, str(root / f"cases{nproc}.json"), str(root / "runs")],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED)
def test_every_recipe_runs_two_steps_on_a_tiny_model_of_its_class(recipe_runs, path):
    model, setup = Path(path).parent.name, Path(path).stem
    run = recipe_runs / "runs" / f"{model}-{setup}"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and all(r["loss"] == r["loss"] for r in records)
    assert (run / "eval.jsonl").is_file() and (run / "merged/config.json").is_file()
    assert (run / "checkpoints/step-00000002/COMPLETE").is_file()
    resolved = load_config(run / "config.yaml")
    assert resolved.model.load_in_4bit == setup.endswith("4bit")
    if setup.startswith("slurm"):  # the recipe's own command renders its sbatch script
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "scalora_dist.cli",
                "slurm",
                path,
                "--nodes",
                "8",
                "--gpus-per-node",
                "8",
                "--partition",
                "gpu",
                "--time",
                "12:00:00",
                "--dry-run",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "#SBATCH --nodes=8" in proc.stdout and "--resume auto" in proc.stdout
