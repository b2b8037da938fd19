"""A torchrun worker for tests/test_launch.py: rank 1 raises after joining the process group
while the other ranks wait in a collective that rank 1 never enters."""

import os
import sys

import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
print(f"rank {rank} of {dist.get_world_size()} joined", flush=True)
if rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
print(f"rank {rank} waiting in barrier", file=sys.stderr, flush=True)
dist.barrier()  # never completes: only torchrun stopping the job ends this rank
print(f"rank {rank} passed the barrier (unexpected)", flush=True)
os._exit(0)
