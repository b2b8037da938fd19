"""A torchrun worker for tests/test_launch.py: rank 1 is SIGKILLed (what the out-of-memory
killer does) while rank 0 waits for it in a collective, fails there with gloo's lost-peer
error, and records it the way scalora-dist's workers record theirs."""

import os
import signal
import sys

import torch.distributed as dist

from scalora_dist.launch.agent import record_worker_error

dist.init_process_group("gloo")
rank = dist.get_rank()
dist.barrier()  # both joined
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    dist.barrier()
except RuntimeError as e:
    print(f"rank {rank} lost its peer: {e}", file=sys.stderr, flush=True)
    record_worker_error(f"{type(e).__name__}: {e}", 1)
    os._exit(1)
os._exit(0)
