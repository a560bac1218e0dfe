"""The one rule for engines whose private layout a backend reads: only the tested releases."""

from __future__ import annotations

import re


def check_release(
    engine: str, package: str, version: str, supported: tuple[tuple[int, int], ...], why: str,
    install: str,
) -> None:  # fmt: skip
    """Raise ``RuntimeError`` unless ``version`` of ``engine`` (pip's ``package``) is within
    ``supported`` ([low, high) minor releases), saying ``why`` the backend depends on it and how
    to ``install`` a tested one."""
    low, high = supported
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None or not low <= (int(match[1]), int(match[2])) < high:
        raise RuntimeError(
            f"{engine} {version} is not supported by pma_dist: it reads {why}, "
            f"tested for {package}>={low[0]}.{low[1]},<{high[0]}.{high[1]}; install a version in "
            f"that range ({install})"
        )
