"""Optimizer wrappers, unwrapped in one place.

DeepSpeed's ZeRO and BF16 optimizers and Accelerate's ``AcceleratedOptimizer`` keep the
optimizer they wrap as ``.optimizer``; the innermost one is the torch optimizer whose ``step``
writes the parameters, runs torch's step hooks and holds the moments.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 4
"""Wrappers followed at most (none nests deeper in practice)."""


def optimizer_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and every optimizer it wraps, outermost first."""
    chain = []
    while optimizer is not None and len(chain) < MAX_DEPTH:
        chain.append(optimizer)
        try:
            optimizer = getattr(optimizer, "optimizer", None)
        except Exception:  # noqa: BLE001 - a wrapper of several (Megatron's ChainedOptimizer)
            break
    return chain


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost torch optimizer under any wrappers, or None."""
    inner = [o for o in optimizer_chain(optimizer) if hasattr(o, "register_step_pre_hook")]
    return inner[-1] if inner else None
