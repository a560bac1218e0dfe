"""Benchmarks of pma_dist, run from the repository root: ``python -m benchmarks.<name>``."""
