"""Forwarding module, to be removed in the next release: the command moved to
:mod:`pma_dist.tools.cli` (``pma-dist``, or ``python -m pma_dist.tools.cli``); this keeps
``python -m pma_dist.cli`` and ``from pma_dist.cli import main`` working until then."""

import sys

from .tools.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
