"""train.compile: torch.compile each decoder block in place, before FSDP2 wraps it.

Per block, as torchtitan and torchtune do, rather than the whole model: the blocks share
one code object, so the graphs compiled for the first block serve all of them, and the
embedding, the loss head and FSDP2's hooks stay outside.
`Module.compile()` keeps the module and its parameter names, so checkpoints and exports
are the same with or without it.
"""

from __future__ import annotations

import torch
from torch import nn

from scalora_dist.model.sharding import decoder_blocks


def compile_decoder_blocks(model: nn.Module) -> None:
    """Compile every decoder block of `model` in place."""
    # Every block is traced from the same code: allow a graph per distinct block type and
    # mode (train / eval, refactor-step capture of lora_A) without hitting the default limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in decoder_blocks(model):
        block.compile()


def compiled_frame_count() -> int:
    """Frames torch.compile has compiled in this process so far, recompiles included
    (metrics.jsonl's `compiled_frames`). It grows over the first steps, as each mode (a
    refactor step's capture of lora_A, padded or unpadded batches, a new sequence length
    before shapes turn dynamic) is first seen, then stays put; growth step after step would
    be a recompile every step."""
    return int(torch._dynamo.utils.counters["frames"]["ok"])
