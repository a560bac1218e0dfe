"""Child processes for tests: the installed ``pma-dist`` console script (or the module when it
is not installed), and Python code run with this checkout importable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("pma-dist", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "pma_dist.tools.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


def run_python(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, with this checkout on ``PYTHONPATH`` and the variables
    ``env`` set (settings that must not leak into other tests)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    child_env = {**os.environ, **env, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=timeout
    )
