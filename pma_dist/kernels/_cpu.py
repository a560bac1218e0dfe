"""Compiled kernels for CPU snapshots: copy a tensor into its slot and find any NaN/Inf in
what was copied, in one pass over memory; and the compressed window's encode and merge passes
(``csrc/delta_codes.cpp``, the same bits as the torch expressions of ``_codes``).

Torch has no eager op that copies and reduces at once, so the blocked path of
:func:`pma_dist.kernels.copy_checked` copies a cache-sized block, then sums it (1.3-1.5x the
time of a plain copy on one core). The kernel (``csrc/copy_finite.cpp``) tests each element's
exponent bits as it copies it, at the speed of ``copy_``, and is exact where a sum can overflow.
It serves snapshots of weights that live on the CPU: DeepSpeed's fp32 master weights under
``offload_optimizer``, and CPU runs.

It is built on first use with ``torch.utils.cpp_extension`` (as DeepSpeed builds its CPU Adam;
about 10 s, needs a C++ compiler and ninja) into ``$TORCH_EXTENSIONS_DIR/pma_dist``, under a
name that hashes the sources and the torch version, and imported from there by later processes
without a build step. Builds hold an ``flock`` (released if the builder dies), so a rank
killed mid-build leaves no lock behind that would stall the next run. ``pma-dist build-kernel``
builds it ahead of a run. When it cannot be built, a warning says why once and the blocked path
does the work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("pma_dist")

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "copy_finite.cpp", CSRC / "delta_codes.cpp")
FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
enabled = True
"""Set False to keep every CPU copy on the blocked path (benchmarks compare the two)."""
BUILD_WAIT_S = 600.0
"""Longest wait for another process's build of the kernel before falling back."""

_KERNELS = {
    (torch.float64, torch.float64): "float64",
    (torch.float32, torch.float32): "float32",
    (torch.bfloat16, torch.bfloat16): "bfloat16",
    (torch.float16, torch.float16): "float16",
    (torch.float32, torch.bfloat16): "bfloat16_to_float32",
}
"""Kernel per (slot dtype, source dtype): bit copies, and the exact bf16 -> fp32 widening."""


def suits(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether copying ``src`` into the slot ``dst`` goes through the kernel."""
    return (
        enabled
        and dst.device.type == "cpu"
        and src.device.type == "cpu"
        and (dst.dtype, src.dtype) in _KERNELS
        and dst.numel() == src.numel()
        and dst.is_contiguous()
        and src.is_contiguous()
        and _module() is not None
    )


def copy_finite(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """``dst.copy_(src)`` for a pair that :func:`suits`; True when every element is finite."""
    if not suits(dst, src):
        raise ValueError(
            f"copy_finite: a {src.dtype} {tuple(src.shape)} tensor on {src.device} into a "
            f"{dst.dtype} {tuple(dst.shape)} slot on {dst.device} does not suit the kernel "
            "(contiguous CPU tensors of equal size, dtype pairs "
            f"{', '.join(f'{s} -> {d}' for d, s in _KERNELS)})"
        )
    if dst.numel() == 0:
        return True
    kernel = getattr(_module(), _KERNELS[dst.dtype, src.dtype])
    return kernel(dst.data_ptr(), src.data_ptr(), dst.numel())


_ENCODERS = {
    ("bf16", torch.float32): "encode_bf16_float32",
    ("bf16", torch.bfloat16): "encode_bf16_bfloat16",
    ("fp8", torch.float32): "encode_fp8_float32",
    ("fp8", torch.bfloat16): "encode_fp8_bfloat16",
}
"""Encode kernel per (code, live dtype); the base is float32."""


def suits_code(code: str, base: torch.Tensor, live: torch.Tensor | None = None) -> bool:
    """Whether the compressed window's passes over ``base`` (and ``live``) go through the
    kernels: contiguous CPU tensors, a float32 base, a float32 or bfloat16 live tensor."""
    return (
        enabled
        and base.device.type == "cpu"
        and base.dtype == torch.float32
        and base.is_contiguous()
        and (
            live is None
            or live.device.type == "cpu"
            and (code, live.dtype) in _ENCODERS
            and live.is_contiguous()
            and live.numel() == base.numel()
        )
        and _module() is not None
    )


def encode(
    code: str,
    base: torch.Tensor,
    live: torch.Tensor,
    delta: torch.Tensor,
    exps: torch.Tensor | None,
    rows: int,
    row: int,
    block: int,
) -> bool:
    """The encode pass of ``_codes.encode`` over contiguous flat views that :func:`suits_code`;
    True when every element was finite."""
    if base.numel() == 0:
        return True
    kernel = getattr(_module(), _ENCODERS[code, live.dtype])
    if code == "bf16":
        return kernel(base.data_ptr(), live.data_ptr(), delta.data_ptr(), base.numel())
    return kernel(
        base.data_ptr(), live.data_ptr(), delta.data_ptr(), exps.data_ptr(), rows, row, block
    )


def merge(
    code: str,
    out: torch.Tensor,
    base: torch.Tensor,
    weight: float,
    planes: list[tuple[torch.Tensor, torch.Tensor | None, float]],
    rows: int,
    row: int,
    block: int,
) -> None:
    """The merge pass of ``_codes.merge`` into a contiguous float32 ``out`` (which may be
    ``base`` itself) over flat views that :func:`suits_code`."""
    if base.numel() == 0:
        return
    deltas = [d.data_ptr() for d, _, _ in planes]
    coeffs = [float(c) for _, _, c in planes]
    module = _module()
    if code == "bf16":
        module.merge_bf16(out.data_ptr(), base.data_ptr(), weight, deltas, coeffs, base.numel())
    else:
        exps = [e.data_ptr() for _, e, _ in planes]
        module.merge_fp8(
            out.data_ptr(), base.data_ptr(), weight, deltas, exps, coeffs, rows, row, block
        )


def build_directory() -> Path:
    """Where the kernel is built and found: ``$TORCH_EXTENSIONS_DIR/pma_dist`` (by default
    ``~/.cache/torch_extensions/pma_dist``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "pma_dist"


def module_name() -> str:
    """The extension's name: a new source, flag set, torch or Python version is a new build."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES))
    digest.update(" ".join((*FLAGS, torch.__version__, sys.version)).encode())
    return f"pma_dist_copy_finite_{digest.hexdigest()[:16]}"


def built() -> str | None:
    """Build the kernel if needed; the path of the built module, or None when it cannot be
    built (the warning says why)."""
    module = _module()
    return None if module is None else module.__file__


@functools.cache
def _module() -> ModuleType | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded."""
    directory: Path | str = "the torch extensions directory"
    try:
        name = module_name()
        directory = build_directory() / name
        library = directory / f"{name}.so"
        module = _import_built(name, library)
        if module is not None:
            return module
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory):
            module = _import_built(name, library)  # built by another process while this waited
            if module is not None:
                return module
            library.unlink(missing_ok=True)  # torn by a build that was killed: linked anew
            (directory / "lock").unlink(missing_ok=True)  # torch's own lock: stale under ours
            log.info("pma_dist: building the CPU copy kernel once, in %s", directory)
            return cpp_extension.load(
                name,
                [str(source) for source in SOURCES],
                extra_cflags=list(FLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
            )
    except Exception as err:  # noqa: BLE001 - any build failure falls back to torch's kernels
        log.warning(
            "pma_dist: the CPU copy kernel could not be built in %s (%s); CPU snapshots "
            "check each block after copying it instead",
            directory,
            _reason(err),
        )
        return None


def _import_built(name: str, path: Path) -> ModuleType | None:
    """The module built at ``path``, or None when there is none or it does not load."""
    spec = importlib.util.spec_from_file_location(name, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)  # loads the library
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


@contextlib.contextmanager
def _build_lock(directory: Path, wait_s: float = BUILD_WAIT_S) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` for a build. The system releases it when
    its holder dies, unlike torch's lock file, which a process killed mid-build leaves behind
    for every later build to wait on forever; under this lock that file can only be stale.
    Raises ``TimeoutError`` after ``wait_s`` (the caller then falls back)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock file alone
        yield
        return
    with open(directory / "pma_dist_build.lock", "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has held the build lock of {directory} for {wait_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(err: Exception) -> str:
    """The line of a build failure that says what went wrong (not the compiler command)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines[1:]:
        if any(word in line.lower() for word in ("error", "not found", "no such")):
            return line
    return lines[-1] if lines else type(err).__name__
