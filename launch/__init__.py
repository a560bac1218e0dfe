"""The reference pre-training program and its launchers; ``launch.pretrain`` is importable
from the repository root (the benchmarks time its trainer)."""
