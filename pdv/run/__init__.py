"""Launch a plan under torchrun, the per-rank runtime, and the run report."""
