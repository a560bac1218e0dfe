"""Run the installed ``pma-dist`` console script (or the module when it is not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("pma-dist", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "pma_dist.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)
