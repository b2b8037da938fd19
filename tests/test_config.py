"""Config loading: YAML + typed dotted overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scalora_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.path=m", "data.train_files=[a.jsonl]", "train.max_steps=3"]


def test_quickstart_config_resolves():
    cfg = load_config(REPO / "configs/quickstart.yaml")
    assert cfg.adapter.method == "scalora" and cfg.adapter.scalora.kappa == "auto"
    assert cfg.model.attn_implementation == "sdpa"


def test_overrides_are_typed():
    cfg = load_config(
        None,
        BASE
        + [
            "train.lr=1e-4",
            "adapter.rank=16",
            "adapter.use_rslora=true",
            "adapter.target_modules=[q_proj,v_proj]",
            "adapter.scalora.kappa=0.5",
            "train.adam_betas=[0.9,0.95]",
            "data.eval_files=b.jsonl",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.rank == 16 and cfg.adapter.use_rslora is True
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.adapter.scalora.kappa == 0.5
    assert cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.data.eval_files == ["b.jsonl"]


def test_yaml_file_and_override_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "m"},
                "data": {"train_files": ["a.jsonl"]},
                "train": {"max_steps": 5, "lr": "2e-4"},  # YAML 1.1 reads 2e-4 as a string
            }
        )
    )
    cfg = load_config(path, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 2e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("trian.lr=1", "unknown key 'trian'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("adapter.rank=2.5", "adapter.rank: expected an integer"),
        ("adapter.use_rslora=maybe", "adapter.use_rslora: expected true or false"),
        ("adapter.method=qlora", "adapter.method: 'qlora' is not one of lora, scalora, relora, full"),
        ("adapter.scalora.kappa=big", "adapter.scalora.kappa"),
        ("adapter.scalora.kappa_scope=model", "adapter.scalora.kappa_scope"),
        ("adapter.rank=0", "adapter.rank: must be > 0"),
        ("adapter.dropout=0.1", "adapter.dropout: must be 0 for method scalora"),
        ("train.epochs=2", "exactly one of train.max_steps and train.epochs"),
        ("train.eval_every=10", "data.eval_files is empty"),
        ("train.adam_betas=[0.9]", "train.adam_betas"),
        ("model", "must look like key.path=value"),
        ("model.quant_placement=replicated", "'model.quant_placement' was renamed 'model.base_placement'"),
        ("model.base_placement=everywhere", "model.base_placement"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, BASE + [override])


def test_a_per_layer_kappa_needs_kappa_auto():
    with pytest.raises(ConfigError, match="adapter.scalora.kappa_scope: 'layer' needs adapter.scalora.kappa: auto"):
        load_config(None, BASE + ["adapter.scalora.kappa=0.5", "adapter.scalora.kappa_scope=layer"])


def test_a_replicated_base_cannot_be_trained_in_full():
    with pytest.raises(ConfigError, match="model.base_placement: replicated .* method full trains it"):
        load_config(None, BASE + ["model.base_placement=replicated", "adapter.method=full"])


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="model.path: required"):
        load_config(None, ["data.train_files=[a]", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="data.train_files: required"):
        load_config(None, ["model.path=m", "train.max_steps=1"])


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "scalora_dist.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_config_show_prints_resolved_config():
    out = _cli("config", "show", "configs/quickstart.yaml", "train.lr=5e-4", "adapter.rank=2")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["lr"] == 5e-4 and resolved["adapter"]["rank"] == 2
    assert resolved["adapter"]["scalora"]["interval"] == 1  # defaults are filled in


def test_cli_errors_are_one_clear_line():
    out = _cli("train", "configs/quickstart.yaml", "train.lr=fast")
    assert out.returncode == 2
    assert "train.lr: expected a number" in out.stderr and "Traceback" not in out.stderr
    out = _cli("config", "show", "does-not-exist.yaml")
    assert out.returncode == 2 and "config file not found: does-not-exist.yaml" in out.stderr


def test_cli_help_documents_overrides():
    out = _cli("train", "--help")
    assert out.returncode == 0
    assert "key.path=value" in out.stdout and "config keys" in out.stdout
    keys = _cli("config", "keys")
    assert "adapter.scalora.kappa" in keys.stdout and "train.micro_batch_size" in keys.stdout


def test_docs_document_every_config_key():
    """docs/config.md's reference is the generated one (tools/generators/config_reference.py)."""
    from config_reference import markdown

    assert markdown() in (REPO / "docs/config.md").read_text()
