"""The method study's text task on the real SmolLM2 (tools/studies/study_real.py --task austen, the
novels from tools/studies/austen_task.py). Its own file so that pytest-xdist runs it beside
tests/test_real_model.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_ok

REPO = Path(__file__).resolve().parents[1]


def test_real_model_study_text_task_reports_accuracy_and_update_ranks(smollm2, tmp_path):
    """tools/studies/study_real.py --task austen --quick: Jane Austen's prose (Debian's
    r-cran-janeaustenr, fetched by tools/studies/austen_task.py), Persuasion held out; each run
    reports the held-out next-token accuracy, a continuation, and the rank of every adapted
    layer's accumulated update: LoRA's is at most r, ScaLoRA's, after its merges, more."""
    pytest.importorskip("rdata")
    import austen_task

    try:
        train_file, eval_file = austen_task.write(tmp_path / "work/data-austen")
    except SystemExit as e:
        pytest.skip(f"Jane Austen's novels are not at hand here: {e}")
    held_out = eval_file.read_text()
    assert "Kellynch" in held_out and "Kellynch" not in train_file.read_text()[:200_000]
    cmd = [
        sys.executable,
        "tools/studies/study_real.py",
        "--task",
        "austen",
        "--quick",
        "--update-ranks",
        "--parse-prompts",
        "1",
        "--accuracy-rows",
        "4",
        "--model",
        str(smollm2),
        "--work-dir",
        str(tmp_path / "work"),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # beside the other worker
    assert_ok(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env))
    lora, scalora = json.loads((tmp_path / "out/study_real_austen_quick.json").read_text())
    assert (lora["method"], scalora["method"]) == ("lora", "scalora")
    for r in (lora, scalora):
        assert r["task"] == "austen" and 0 < r["final_eval"] < 10 and 0 < r["accuracy"] < 1
        assert r["samples"][0]["answer"].strip() and r["samples"][0]["prompt"] in held_out
    assert 0 < lora["mean_update_rank"] <= lora["rank"]
    assert scalora["mean_update_rank"] > scalora["rank"]
    report = (tmp_path / "out/study_real_austen_quick.md").read_text()
    assert "next-token accuracy" in report and "Greedy continuations" in report
