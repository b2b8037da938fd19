"""Run state: the run directory's rules, checkpoints (DCP, atomic, verified), exports and
stopping on signals."""
