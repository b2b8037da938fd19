"""Job control: the torchrun launcher and its agent, the checks before any worker starts,
the sbatch template and the requeue helper."""
