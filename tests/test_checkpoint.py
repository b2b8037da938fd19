"""Distributed checkpoints and the merged export: single process, and real FSDP2 jobs (gloo,
2 and 3 processes, tiny llama) started through tests/workers/dist_checkpoint_worker.py."""

from __future__ import annotations

import json
import random

import dist_checkpoint_worker as w
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing.spawn import ProcessException
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from scalora_dist.config import AdapterConfig
from scalora_dist.model.lora import inject_adapters, lora_layers, merge_and_unwrap
from scalora_dist.run.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from scalora_dist.run.export import export_merged


def _plain_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {
        "model": {k: v.detach().clone() for k, v in msd.items()},
        "optim": {
            "state": {k: {n: t.clone() for n, t in s.items()} for k, s in osd["state"].items()},
            "param_groups": osd["param_groups"],
        },
    }


def _steps(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# -- single process -------------------------------------------------------------------------


def test_round_trip_single_process(tiny_llama, tmp_path):
    model, opt = w.build_model(tiny_llama, shard=False)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=10)
    for i in range(2):
        w.train(model, opt, 1, first_seed=i)
        sched.step()
    app = {
        "step": 2,
        "scheduler": sched.state_dict(),
        "data": {"epoch": 0, "position": 2},
        "kappa": 0.25,
        "config": {"adapter": {"method": "scalora", "rank": 2}},
    }
    path = save_checkpoint(tmp_path / "ckpt", 2, model, opt, app)
    assert path == tmp_path / "ckpt" / "step-00000002"
    assert {"COMPLETE", "app_state.json", "rng-rank0.safetensors", ".metadata"} <= set(_steps(path))
    expected = _plain_state(model, opt)
    draws = (torch.rand(3), random.random(), np.random.rand())

    w.perturb(model, opt)
    opt.param_groups[0]["lr"] = 123.0
    torch.rand(5), random.random(), np.random.rand()
    loaded = load_checkpoint(resolve_checkpoint("latest", tmp_path / "ckpt"), model, opt)

    assert loaded == app
    w.assert_same(_plain_state(model, opt), expected)
    assert opt.state[lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_B]["exp_avg"].abs().sum() > 0
    # RNG streams continue exactly where the save left them (same world size)
    assert torch.equal(torch.rand(3), draws[0])
    assert random.random() == draws[1] and np.random.rand() == draws[2]
    # and training goes on
    w.train(model, opt, 1, first_seed=7)


def test_keep_last_latest_and_resolve(tiny_llama, tmp_path):
    model, opt = w.build_model(tiny_llama, shard=False)
    root = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("latest", root)
    for step in (10, 20, 30):
        save_checkpoint(root, step, model, opt, {"step": step}, keep_last=2)
    assert _steps(root) == ["step-00000020", "step-00000030"]

    # partial directories are never "latest", whatever their step
    (root / ".tmp-step-00000040").mkdir()
    (root / ".tmp-step-00000040" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step-00000050").mkdir()
    assert latest_checkpoint(root) == root / "step-00000030"
    assert resolve_checkpoint("latest", root) == root / "step-00000030"
    assert resolve_checkpoint("step-00000020", root) == root / "step-00000020"
    assert resolve_checkpoint(str(root / "step-00000020"), root) == root / "step-00000020"
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_checkpoint(str(root / "step-00000050"), root)
    with pytest.raises(CheckpointError, match="interrupted save"):
        resolve_checkpoint(str(root / ".tmp-step-00000040"), root)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(root / "step-00000099"), root)
    with pytest.raises(CheckpointError, match="app_state.json"):
        (root / "step-00000020" / "app_state.json").unlink()
        load_checkpoint(root / "step-00000020", model, opt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint("latest", tmp_path / "empty")
    assert issubclass(CheckpointError, ValueError)

    # the next save removes the stale tmp dir; saving an existing step replaces it
    save_checkpoint(root, 30, model, opt, {"step": 30, "again": True}, keep_last=2)
    assert ".tmp-step-00000040" not in _steps(root)
    assert load_checkpoint(root / "step-00000030", model, opt) == {"step": 30, "again": True}
    # a save that died between setting step 30 aside and renaming its replacement: the next
    # save puts the complete one back
    (root / "step-00000030").rename(root / ".old-step-00000030")
    (root / ".tmp-step-00000030").mkdir()
    save_checkpoint(root, 31, model, opt, {"step": 31}, keep_last=2)
    assert _steps(root) == ["step-00000030", "step-00000031", "step-00000050"]

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="rank 0: FileExistsError"):
        save_checkpoint(blocker, 1, model, opt, {})
    with pytest.raises(CheckpointError, match="export_merged"):
        export_merged(model, blocker, None, dtype=torch.float32)


def test_export_merged_tied_embeddings_single_process(tiny_tokenizer, tmp_path):
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_adapters(model, AdapterConfig(method="scalora", rank=2))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
    probe = w.batch(config.vocab_size, w.PROBE_SEED)
    with torch.no_grad():
        expected = model(**probe).logits

    out = export_merged(model, tmp_path / "merged", tiny_tokenizer, dtype=torch.bfloat16)
    assert out == tmp_path / "merged"
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert not any(".base." in k or "lora_" in k for k in tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(out)("the fox").input_ids == tiny_tokenizer("the fox").input_ids

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = reloaded(**probe).logits
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)  # bf16 weights


# -- FSDP2, several processes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama, tmp_path_factory):
    """One 2-rank FSDP2 job: 3 saves (keep_last=2), exports, reload; see main_job."""
    base = tmp_path_factory.mktemp("fsdp-ckpt")
    root, out = base / "ckpt", base / "out"
    out.mkdir()
    w.run_job(w.main_job, 2, str(tiny_llama), str(root), str(out))
    return {"root": root, "out": out, "ref": torch.load(out / "ref.pt", weights_only=False)}


@pytest.mark.slow
def test_fsdp_keep_last(fsdp_run):
    assert _steps(fsdp_run["root"]) == ["step-00000002", "step-00000003"]
    ckpt = fsdp_run["root"] / "step-00000003"
    files = set(_steps(ckpt))
    assert {"COMPLETE", "app_state.json", "rng-rank0.safetensors", "rng-rank1.safetensors", ".metadata"} <= files
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_one_process(fsdp_run, tiny_llama):
    model, opt = w.build_model(tiny_llama, shard=False)
    app = load_checkpoint(fsdp_run["root"] / "step-00000003", model, opt)  # 2 ranks -> 1
    assert app == fsdp_run["ref"]["app"]
    w.assert_same(_plain_state(model, opt), fsdp_run["ref"]["state"])
    with torch.no_grad():
        logits = model(**w.probe(model.config.vocab_size)).logits
    torch.testing.assert_close(logits, fsdp_run["ref"]["logits"])


@pytest.mark.slow
def test_fsdp_checkpoint_reshards_to_four_ranks(fsdp_run, tiny_llama):
    w.run_job(
        w.reshard_job, 4, str(tiny_llama), str(fsdp_run["root"] / "step-00000003"), str(fsdp_run["out"] / "ref.pt")
    )


def _dense_merged(tiny_llama, ckpt) -> dict[str, torch.Tensor]:
    model, opt = w.build_model(tiny_llama, shard=False)
    load_checkpoint(ckpt, model, opt)
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())
    merge_and_unwrap(model)
    return model.state_dict()


@pytest.mark.slow
def test_fsdp_export_merged(fsdp_run, tiny_llama):
    dense = _dense_merged(tiny_llama, fsdp_run["root"] / "step-00000003")
    probe = w.batch(len(dense["model.embed_tokens.weight"]), w.PROBE_SEED)

    one = fsdp_run["out"] / "one"
    assert not (one / "model.safetensors.index.json").exists()
    tensors = load_file(one / "model.safetensors")
    assert set(tensors) == set(dense)
    for name, t in tensors.items():
        torch.testing.assert_close(t, dense[name], atol=1e-6, rtol=1e-6, msg=name)

    many = fsdp_run["out"] / "many"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in many.glob("model*.safetensors"))
    # 20 kB: embed, layer 0, layer 1, norm, lm_head (a decoder block is never split)
    assert files == [f"model-0000{k}-of-00005.safetensors" for k in range(1, 6)]
    assert set(index["weight_map"]) == set(dense) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    layer0 = {f for k, f in index["weight_map"].items() if k.startswith("model.layers.0.")}
    assert len(layer0) == 1
    split = {}
    for f in files:
        split.update(load_file(many / f))
    w.assert_same(split, tensors)

    for out in (one, many):
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            logits = model(**probe).logits
        torch.testing.assert_close(logits, fsdp_run["ref"]["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(tiny_llama, tmp_path):
    root, ref = tmp_path / "ckpt", tmp_path / "ref.pt"
    with pytest.raises(ProcessException):
        w.run_job(w.crash_job, 2, str(tiny_llama), str(root), str(ref))

    partial = root / ".tmp-step-00000002"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / "COMPLETE").exists()
    assert not (root / "step-00000002").exists()
    assert latest_checkpoint(root) == root / "step-00000001"
    with pytest.raises(CheckpointError):
        resolve_checkpoint(str(partial), root)

    model, opt = w.build_model(tiny_llama, shard=False)
    assert load_checkpoint(resolve_checkpoint("latest", root), model, opt) == {"step": 1}
    w.assert_same(_plain_state(model, opt), torch.load(ref, weights_only=False)["state"])

    # the next save cleans the leftover up
    save_checkpoint(root, 2, model, opt, {"step": 2})
    assert _steps(root) == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_rank0_write_error_raises_on_every_rank(tiny_llama, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    w.run_job(w.error_job, 2, str(tiny_llama), str(blocker))
