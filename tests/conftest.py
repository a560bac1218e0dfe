import pytest
import torch


def pytest_sessionstart(session):
    """Build the CPU snapshot kernel once, before any test starts ranks that would otherwise
    build it inside their deadlines (a no-op once built; without a compiler, one warning)."""
    from pma_dist.kernels import build_cpu_kernel

    build_cpu_kernel()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
