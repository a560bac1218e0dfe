"""Exceptions shared by the modules that keep and restore averaging state."""


class PMAStateError(ValueError):
    """A saved averaging state does not fit this model or configuration; nothing was loaded."""


class NonFiniteSnapshotError(RuntimeError):
    """A snapshot held NaN/Inf and ``on_nonfinite="raise"``; raised on every rank alike."""
