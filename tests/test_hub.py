"""Hub model ids, offline: a checkpoint in huggingface_hub's cache layout
($HF_HOME/hub/models--org--name/snapshots/<commit>/, refs/main) is found by its id on 1 and
2 ranks with HF_HUB_OFFLINE=1; an id that is not cached is one clear error naming the id
and the command that downloads it."""

from __future__ import annotations

import json

import pytest
from helpers import assert_ok, assert_same_weights, merged_weights, put_in_hub_cache, train_job

from scalora_dist.config import ConfigError, ModelConfig
from scalora_dist.model.hub import model_reference, resolve_model_dir

MODEL_ID = "tiny-org/tiny-llama"


@pytest.fixture
def hub_home(tmp_path, tiny_llama):
    put_in_hub_cache(tmp_path / "hf", MODEL_ID, tiny_llama)
    return tmp_path / "hf"


@pytest.mark.slow
def test_a_cached_hub_id_trains_offline_on_one_and_two_ranks(hub_home, tiny_llama, tmp_path):
    env = {"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}
    for n in (1, 2):
        assert_ok(train_job(MODEL_ID, tmp_path / f"w{n}", n, "adapter.method=lora", env=env))
    assert_same_weights(merged_weights(tmp_path / "w1"), merged_weights(tmp_path / "w2"))
    adapter = json.loads((tmp_path / "w2/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == MODEL_ID  # the id, as PEFT expects it
    # the same model as training from the local directory
    assert_ok(train_job(tiny_llama, tmp_path / "local", 1, "adapter.method=lora"))
    assert_same_weights(merged_weights(tmp_path / "w1"), merged_weights(tmp_path / "local"), tol=1e-7)


def test_an_uncached_hub_id_offline_is_one_error_naming_it_and_the_download(hub_home, tiny_llama, tmp_path):
    env = {"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}
    for n in (1, 2):
        proc = train_job("tiny-org/not-here", tmp_path / f"x{n}", n, env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.count("error:") == 1, proc.stderr
        assert "'tiny-org/not-here' is not a local directory" in proc.stderr
        assert "hf download tiny-org/not-here" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_local_paths_and_references(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama.parent)
    relative = ModelConfig(path=tiny_llama.name)
    assert resolve_model_dir(relative) == type(tiny_llama)(tiny_llama.name)
    assert model_reference(relative) == str(tiny_llama.resolve())  # adapters record an absolute path
    with pytest.raises(ConfigError, match=r"'\./nowhere' is not a directory \(looked for /"):
        resolve_model_dir(ModelConfig(path="./nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_model_dir(ModelConfig(path=str(tmp_path / "empty")))
