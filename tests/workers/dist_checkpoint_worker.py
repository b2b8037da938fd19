"""Multi-process entry points for tests/test_checkpoint.py (real FSDP2 on gloo, CPU).

`run_job(fn, world, *args)` starts `world` processes running `fn(rank, world, port, *args)`;
each builds the tiny model with the production path and FSDP2 plan (model/build.py,
model/sharding.py: seeded adapters, fully_shard on every decoder layer and the root,
lora_A sharded on dim 1).
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODEL_SEED = 0
PROBE_SEED = 1234


# -- process plumbing -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the forkserver; every worker process is then a fork of it (a fresh
# `spawn` costs several seconds of imports per process on a small machine).
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "scalora_dist.run.checkpoint",
    "dist_checkpoint_worker",
]


def run_job(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) in `world` new processes; raise if any fails
    (mp.ProcessRaisedException / ProcessExitedException)."""
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    port = free_port()
    mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=True, start_method="forkserver")


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _done() -> None:
    dist.barrier()
    dist.destroy_process_group()


# -- models ---------------------------------------------------------------------------------


def build_model(model_dir, *, shard: bool):
    """Tiny llama + ScaLoRA adapters (rank 2), built by the production path
    (model/build.py), FSDP2-sharded with the production plan (sharding.apply_fsdp) if shard."""
    from torch.distributed.device_mesh import init_device_mesh

    from scalora_dist.config import AdapterConfig, ModelConfig
    from scalora_dist.model.build import build_model as production_build

    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if shard else None
    model = production_build(
        Path(model_dir),
        ModelConfig(path=str(model_dir), dtype="float32"),
        AdapterConfig(method="scalora", rank=2),
        torch.device("cpu"),
        seed=MODEL_SEED,
        mesh=mesh,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def batch(vocab_size: int, seed: int, n: int = 2, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def probe(vocab_size: int) -> dict:
    """The probe batch without labels: the model's logits (given labels, our training models
    compute only the chunked loss, no logits)."""
    return {"input_ids": batch(vocab_size, PROBE_SEED)["input_ids"]}


def train(model, optimizer, steps, first_seed=0) -> None:
    """Every rank sees the same batches (the production plan sums gradients across ranks:
    the same update direction, and AdamW is invariant to the gradient's scale)."""
    for i in range(steps):
        model(**batch(model.config.vocab_size, first_seed + i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_state(model, optimizer) -> dict:
    """Full (gathered) model and optimizer state on rank 0 ({} elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optim": osd}


def assert_same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, torch.as_tensor(b)), f"{path} differs"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def perturb(model, optimizer) -> None:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).add_(1.0)
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    (v.to_local() if isinstance(v, DTensor) else v).zero_()


# -- scenarios ------------------------------------------------------------------------------


def main_job(rank, world, port, model_dir, ckpt_root, out_dir) -> None:
    """Save three times (keep_last=2), export merged (one file and many files), reload on
    the same world size. Rank 0 writes ref.pt: the full state at the last save and the
    sharded model's logits on a probe batch."""
    from transformers import AutoTokenizer

    from scalora_dist.run.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from scalora_dist.run.export import export_merged

    _init(rank, world, port)
    ckpt_root, out_dir = Path(ckpt_root), Path(out_dir)
    model, opt = build_model(model_dir, shard=True)
    app = {"step": 0, "kappa": 0.5, "data": {"epoch": 0, "position": 3}}
    for step in (1, 2, 3):
        train(model, opt, 1, first_seed=step)
        app["step"] = step
        save_checkpoint(ckpt_root, step, model, opt, app, keep_last=2)
    ref = full_state(model, opt)
    with torch.no_grad():
        logits = model(**probe(model.config.vocab_size)).logits

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    got = export_merged(model, out_dir / "one", tokenizer, dtype=torch.float32)
    assert (got == out_dir / "one") if rank == 0 else got is None
    export_merged(model, out_dir / "many", tokenizer, dtype=torch.float32, max_shard_bytes=20_000)

    perturb(model, opt)
    assert latest_checkpoint(ckpt_root) == ckpt_root / "step-00000003"
    loaded = load_checkpoint(latest_checkpoint(ckpt_root), model, opt)
    assert loaded == app, loaded
    again = full_state(model, opt)
    if rank == 0:
        assert_same(again, ref)
        torch.save({"state": ref, "logits": logits, "app": app}, out_dir / "ref.pt")
    _done()


def reshard_job(rank, world, port, model_dir, ckpt_path, ref_path) -> None:
    """Load a checkpoint written by another world size; compare with the saved reference."""
    from scalora_dist.run.checkpoint import load_checkpoint

    _init(rank, world, port)
    model, opt = build_model(model_dir, shard=True)
    perturb(model, opt)
    load_checkpoint(Path(ckpt_path), model, opt)
    state = full_state(model, opt)
    if rank == 0:
        assert_same(state, torch.load(ref_path, weights_only=False)["state"])
    # training continues from the loaded state on the new world size
    train(model, opt, 1, first_seed=99)
    _done()


def crash_job(rank, world, port, model_dir, ckpt_root, ref_path) -> None:
    """Save step 1, then die (rank 1, os._exit) in the middle of saving step 2, after its
    DCP shard files are written but before the save completes."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from scalora_dist.run.checkpoint import save_checkpoint

    _init(rank, world, port)
    model, opt = build_model(model_dir, shard=True)
    train(model, opt, 2)
    save_checkpoint(Path(ckpt_root), 1, model, opt, {"step": 1}, keep_last=2)
    state = full_state(model, opt)
    if rank == 0:
        torch.save({"state": state}, ref_path)
    train(model, opt, 1, first_seed=5)

    if rank == 1:
        original = FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            original(self, plan, planner).wait()
            os._exit(17)

        FileSystemWriter.write_data = write_then_die
    save_checkpoint(Path(ckpt_root), 2, model, opt, {"step": 2}, keep_last=2)
    raise AssertionError("unreachable: the save of step 2 must fail")


def error_job(rank, world, port, model_dir, blocker) -> None:
    """Rank 0 cannot write (the target is a file): every rank must raise CheckpointError
    rather than wait for rank 0 at the next collective."""
    from scalora_dist.run.checkpoint import CheckpointError, save_checkpoint
    from scalora_dist.run.export import export_merged

    _init(rank, world, port)
    model, opt = build_model(model_dir, shard=True)
    for attempt in (
        lambda: save_checkpoint(Path(blocker), 1, model, opt, {}),
        lambda: export_merged(model, Path(blocker), None, dtype=torch.float32),
    ):
        try:
            attempt()
        except CheckpointError as e:
            assert "rank 0" in str(e), e
        else:
            raise AssertionError("expected CheckpointError")
    _done()
