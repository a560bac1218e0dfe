"""``pma-dist``: command-line tools around PMA configs and saved averaging state."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import PMAConfig, PMAConfigError


def _config(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.suffix == ".json":
        config = PMAConfig.from_deepspeed(path)
        if config is None:
            print(f'{path}: no enabled "pma" section; PMA is off')
            return 0
    else:
        config = PMAConfig.from_yaml(path)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect_state import read_pma_summary

    print(json.dumps(read_pma_summary(args.checkpoint, args.key), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pma-dist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pma-dist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser(
        "config", help='validate a PMA YAML file or a DeepSpeed JSON\'s "pma" section'
    )
    config.add_argument("path", help="YAML (settings at top level or under pma:) or DeepSpeed JSON")
    config.set_defaults(run=_config)
    inspect = commands.add_parser("inspect", help="summarize the PMA state in a DCP checkpoint")
    inspect.add_argument("checkpoint", help="directory written by torch.distributed.checkpoint")
    inspect.add_argument("--key", default="pma", help="state-dict key the Merger was saved under")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PMAConfigError, FileNotFoundError, KeyError) as err:
        print(f"pma-dist {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
