"""Nothing in a checkpoint or a run directory runs code when a command reads it.

Each case plants a pickle whose `__reduce__` runs a shell command (it would create a file)
where a checkpoint or run directory holds data, then runs a real command on it: the command
must refuse the file in one line with exit code 2, and the file must not exist afterwards.
The manifest is updated with the planted file's size and checksum, so what refuses it is the
reader, not the manifest (an attacker can rewrite a manifest as easily as a file)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_rundir import cli, train

from scalora_dist.run.manifest import file_checksum


class _RunsAShellCommand:
    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return os.system, (f"touch {self.proof}",)


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """A 4-step LoRA run with checkpoints at steps 2 and 4 (LoRA: export also writes an adapter)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    proc = train(tiny_llama, out, "train.save_every=2", "adapter.method=lora", "output.save_adapter=true", steps=4)
    assert proc.returncode == 0, proc.stderr
    return out


def _plant(checkpoint: Path, name: str, payload: bytes) -> None:
    """Replace a file of the checkpoint and its manifest entry (size and checksum agree)."""
    (checkpoint / name).write_bytes(payload)
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    if "files" in marker:
        marker["files"][name] = {"size": len(payload), "xxh3_64": file_checksum(checkpoint / name)}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def _as_earlier_version(checkpoint: Path, proof: Path) -> None:
    """The checkpoint as versions before the manifest wrote it (app_state.pt, no manifest),
    with the malicious object inside its app state."""
    app = json.loads((checkpoint / "app_state.json").read_text())
    (checkpoint / "app_state.json").unlink()
    torch.save({**app, "extra": _RunsAShellCommand(proof)}, checkpoint / "app_state.pt")
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker.pop("files")
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def _refused(proc, proof: Path, *words: str) -> None:
    assert not proof.exists(), "the planted command ran"
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.slow
def test_a_malicious_dcp_metadata_is_refused_by_export_and_resume(run, tiny_llama, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run, work)
    proof = tmp_path / "PWNED"
    _plant(work / "checkpoints/step-00000004", ".metadata", pickle.dumps(_RunsAShellCommand(proof)))

    exported = cli("export", work / "checkpoints/step-00000004", "--out", tmp_path / "export")
    _refused(exported, proof, ".metadata", "refusing")
    assert not (tmp_path / "export" / "merged").exists()

    for resume in ("latest", str(work / "checkpoints/step-00000004")):
        resumed = train(
            tiny_llama,
            work,
            "train.save_every=2",
            "adapter.method=lora",
            "output.save_adapter=true",
            "--resume",
            resume,
            "--extend",
            steps=6,
        )
        _refused(resumed, proof, ".metadata")
    # two processes: refused by the launcher's checks, before any worker starts
    launched = train(
        tiny_llama,
        work,
        "train.save_every=2",
        "adapter.method=lora",
        "output.save_adapter=true",
        "--resume",
        "latest",
        "--extend",
        steps=6,
        nproc=2,
    )
    _refused(launched, proof, ".metadata")
    assert "torchrun job" not in launched.stdout


@pytest.mark.slow
def test_a_pickle_in_an_earlier_versions_app_state_is_refused(run, tiny_llama, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run, work)
    proof = tmp_path / "PWNED"
    for step in ("step-00000002", "step-00000004"):
        _as_earlier_version(work / "checkpoints" / step, proof)

    exported = cli("export", work / "checkpoints/step-00000004", "--out", tmp_path / "export")
    _refused(exported, proof, "app_state.pt", "refusing")
    resumed = train(
        tiny_llama,
        work,
        "train.save_every=2",
        "adapter.method=lora",
        "output.save_adapter=true",
        "--resume",
        "auto",
        "--extend",
        steps=6,
    )
    _refused(resumed, proof, "app_state.pt")
    # the SLURM script's requeue check reads only directory names and markers
    requeue = cli_module(
        "scalora_dist.launch.requeue",
        "start",
        "configs/quickstart.yaml",
        f"output.dir={work}",
        "--max-attempts",
        "3",
        env={"SLURM_RESTART_COUNT": "1"},
    )
    assert not proof.exists()
    assert requeue.returncode == 0, requeue.stderr


@pytest.mark.slow
def test_a_pickled_model_file_in_a_run_directory_is_refused_by_generate(run, tmp_path):
    """A run directory whose merged/ holds pytorch_model.bin instead of safetensors."""
    work = tmp_path / "run"
    shutil.copytree(run, work)
    proof = tmp_path / "PWNED"
    for f in (work / "merged").glob("model*.safetensors*"):
        f.unlink()
    torch.save({"weight": _RunsAShellCommand(proof)}, work / "merged" / "pytorch_model.bin")
    proc = cli("generate", work, "--prompt", "The fox", "--max-new-tokens", "2")
    assert not proof.exists(), "the planted command ran"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def cli_module(module: str, *args, env=None):
    import subprocess
    import sys

    from test_rundir import REPO

    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
