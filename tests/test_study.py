"""tools/studies/study.py on a tiny setting: every code path (data, base pre-training, sweep, seeds,
kappa, ranks, report, plots, cache), not the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"

pytest.importorskip("matplotlib")

import study  # noqa: E402
import study_data  # noqa: E402

TINY = [
    "--hidden-size",
    "32",
    "--num-layers",
    "2",
    "--num-heads",
    "2",
    "--num-kv-heads",
    "1",
    "--intermediate-size",
    "64",
    "--pretrain-steps",
    "4",
    "--ft-steps",
    "6",
    "--eval-every",
    "3",
    "--scalora-warmup",
    "2",
    "--lr-warmup",
    "1",
    "--ranks",
    "2",
    "--lrs-lora",
    "1e-3,1e-2",
    "--lrs-full",
    "1e-3",
    "--seeds",
    "2",
    "--kappa-mults",
    "0.25,1",
    "--kappa-ranks",
    "2",
    "--pretrain-lines",
    "32",
    "--finetune-lines",
    "32",
    "--eval-lines",
    "8",
    "--batch-size",
    "4",
    "--line-length",
    "12",
]


def test_study_data_is_deterministic_and_shaped(tmp_path):
    a = study_data.write_study_data(tmp_path / "a", pretrain_lines=10, finetune_lines=6, eval_lines=4, length=5)
    b = study_data.write_study_data(tmp_path / "b", pretrain_lines=10, finetune_lines=6, eval_lines=4, length=5)
    for key in a:
        assert a[key].read_text() == b[key].read_text()
    ft = [json.loads(l)["text"].split() for l in a["finetune_train"].read_text().splitlines()]
    assert len(ft) == 6 and all(words[0] == "h" and len(words) == 6 for words in ft)
    pre = {json.loads(l)["text"].split()[0] for l in a["pretrain_train"].read_text().splitlines()}
    assert pre == {"f", "g"}
    # follow=1: every step of a walk is the relation's permutation
    perm = study_data.relations(8)["h"]
    words = study_data.symbols(8)
    line = study_data.lines("h", 1, n_symbols=8, length=6, follow=1.0, seed=0, stream=0)[0].split()[1:]
    idx = [words.index(w) for w in line]
    assert all(perm[i] == j for i, j in zip(idx, idx[1:]))
    assert 0 < study_data.entropy_floor(64, 0.9) < study_data.entropy_floor(64, 0.5)


def test_study_end_to_end_and_cached(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [*TINY, "--work-dir", str(work), "--out-dir", str(out)]
    report = study.main(argv)
    text = report.read_text()
    for heading in ("## Headline", "## lr sweep", "## ScaLoRA refactors", "## kappa sensitivity", "## Per-layer rank"):
        assert heading in text
    for label in study.LABELS.values():
        assert label in text
    assert "python tools/studies/study.py" in text
    for png in ("study_curves.png", "study_lr_sweep.png", "study_rank.png", "study_kappa.png"):
        assert (out / png).stat().st_size > 1000
    results = json.loads((out / "study_results.json").read_text())
    assert set(results["seeds"]) == {"lora_r2", "rslora_r2", "scalora_r2", "scalora_i10_r2", "full"}
    assert all(len(runs) == 2 for runs in results["seeds"].values())
    assert set(results["kappa"]["scalora_r2"]) == {"0.25", "1"}
    # LoRA's accumulated update is rank <= r; full fine-tuning's is not limited to r
    lora_ranks = [v["rank"] for v in results["ranks"]["lora_r2"].values()]
    assert max(lora_ranks) <= 2
    assert max(v["rank"] for v in results["ranks"]["full"].values()) > 2
    fr = results["refactor"]["scalora_r2"]
    assert fr["layer_refactors"] > 0
    assert abs(fr["column"] + fr["scalar"] + fr["skipped"] - 1) < 1e-9
    runs = sorted((work / "runs").glob("*/study_done.json"))
    assert len(runs) == 1 + (4 * 2 + 1) + 5 + 1  # base, sweep, seed 1 of each, kappa x0.25
    assert not any((p.parent / "checkpoints").exists() for p in runs)

    # a second invocation trains nothing (report-only would fail on a missing run)
    stamps = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/metrics.jsonl")}
    study.main([*argv, "--report-only"])
    assert stamps == {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/metrics.jsonl")}

    # report-only names a run that is missing
    with pytest.raises(SystemExit, match="missing"):
        study.main([*argv, "--report-only", "--seeds", "3"])


def test_real_study_headline_picks_each_methods_best_lr_by_seed_0_and_averages_its_seeds():
    """tools/studies/study_real.py's headline table (the README's): per method and rank, the lr whose
    seed-0 run is lowest, the mean ± std of every seed there, the other lrs listed as tried."""
    import statistics

    import study_real

    def run(method, rank, lr, seed, loss, kappa=None):
        refactor = {"column": 3, "scalar": 1, "skipped": 0} if kappa else {"column": 0, "scalar": 0, "skipped": 0}
        return {
            "method": method,
            "rank": rank,
            "lr": lr,
            "seed": seed,
            "steps": 40,
            "final_eval": loss,
            "kappa": kappa,
            "refactor": refactor,
        }

    results = [
        run("lora", 4, 1e-3, 0, 1.60),
        run("lora", 4, 2e-3, 0, 1.50),
        run("lora", 4, 2e-3, 1, 1.56),
        run("lora", 4, 2e-3, 2, 1.53),
        run("lora", 4, 1e-3, 1, 1.40),  # seed 1 does not pick the lr
        run("scalora", 4, 2e-3, 0, 1.55, kappa=0.5),
        run("scalora", 4, 4e-3, 0, 1.45, kappa=1.0),
        {**run("lora", 4, 1e-3, 0, 1.0), "steps": 10},
    ]  # a shorter setting: not in the table
    header, rule, first, second = study_real.headline(results)
    assert header.startswith("| method | r | lrs tried | best lr | held-out loss |")
    assert first.split(" | ")[:4] == ["| scalora", "4", "0.002, 0.004", "0.004"]
    assert "1.4500 |" in first and "| 1 | 1 | 75% / 25% / 0% |" in first
    mean, std = statistics.fmean([1.50, 1.56, 1.53]), statistics.stdev([1.50, 1.56, 1.53])
    assert second.split(" | ")[:6] == ["| lora", "4", "0.001, 0.002", "0.002", f"{mean:.4f} ± {std:.4f}", "1.5000"]
