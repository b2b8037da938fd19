"""Checks run once by the launcher before any worker starts: everything that does not need
the weights. A problem is one message and exit code 2, instead of the same error from every
rank after the job has started.

In order: the run directory's rules (rundir.plan_start), the model (a local directory, or a
hub id downloaded here, once for this node's workers), the architecture built on the meta
device with the adapters in it (target modules, FSDP2 blocks, every adapted layer's
in_features against the world size), the tokenizer, and the data: every source is read and
tokenised here, into the datasets cache the workers then read, so a bad record is found
once, and the loader is sized for the job's global batch. A resume with nothing left to do
is found here too.
"""

from __future__ import annotations

from scalora_dist.config import Config
from scalora_dist.data import BatchLoader, load_split
from scalora_dist.model.build import check_attention, meta_model
from scalora_dist.model.hub import resolve_model_dir
from scalora_dist.model.loading import checkpoint_files, load_tokenizer, model_dtype
from scalora_dist.model.lora import inject_adapters
from scalora_dist.model.quant import require_bitsandbytes
from scalora_dist.model.sharding import decoder_blocks, lora_A_on_dim1
from scalora_dist.run.rundir import nothing_to_do, nothing_to_do_message, plan_start


def preflight(
    cfg: Config,
    world_sizes: list[int],
    resume: str | None,
    *,
    overwrite: bool = False,
    force_resume: bool = False,
    extend: bool = False,
) -> str | None:
    """Raise ConfigError / DataError / CheckpointError for the first problem; return a
    message when a resume has nothing to do (the launcher then starts nothing)."""
    start = plan_start(cfg, resume, overwrite=overwrite, force_resume=force_resume)
    check_attention(cfg.model)
    if cfg.model.load_in_4bit:
        require_bitsandbytes()
    model_dir = resolve_model_dir(cfg.model)
    checkpoint_files(model_dir)  # every shard the index names is there
    model = meta_model(model_dir, cfg.model, model_dtype(cfg.model))
    inject_adapters(model, cfg.adapter, seed=cfg.train.seed)
    decoder_blocks(model)
    for world in world_sizes:
        lora_A_on_dim1(model, world)
    tokenizer = load_tokenizer(model_dir)
    train = load_split(cfg.data, tokenizer, cfg.data.train_files)
    if cfg.data.eval_files:
        load_split(cfg.data, tokenizer, cfg.data.eval_files)
    from scalora_dist.train import count_steps

    for world in world_sizes:
        loader = BatchLoader(
            train, cfg.train.micro_batch_size, tokenizer.pad_token_id, seed=cfg.train.seed, rank=0, world_size=world
        )
        total = count_steps(cfg, loader)
        if nothing_to_do(start, total, extend):
            return nothing_to_do_message(start, total)
    return None
