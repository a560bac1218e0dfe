"""``pma-dist``: command-line tools around PMA configs and saved averaging state."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..config import COMPRESSIONS, METHODS, PMAConfig, PMAConfigError
from ..export import ExportError


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
    from ..state import read_pma_summary

    print(json.dumps(read_pma_summary(args.checkpoint, args.key), indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..export import convert_to_hf

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out = convert_to_hf(
        args.source,
        args.out,
        config=args.config,
        method=args.method,
        dtype=args.dtype,
        pma_key=args.pma_key,
        model_key=args.model_key,
        tokenizer=tokenizer,
        max_shard_size=args.max_shard_size,
        last=args.last,
        stride=args.stride,
    )
    print(f"wrote {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..export import verify_export

    problems = verify_export(args.path, load_tensors=not args.quick)
    for problem in problems:
        print(f"{args.path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.path}: OK")
    return 1 if problems else 0


def _plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from ._plan import describe, plan

    window = None if args.window == "running" else int(args.window)
    result = plan(
        args.model,
        args.world,
        replicas=args.replicas,
        rank=args.rank,
        window=window,
        offload=args.offload,
        experts_dim=args.experts_dim,
        compression=args.compression,
    )
    print(json.dumps(asdict(result), indent=2) if args.json else describe(result))
    return 0


def _build_kernel(args: argparse.Namespace) -> int:
    import logging

    from ..kernels import build_cpu_kernel

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_cpu_kernel()
    if path is None:
        print("CPU copy kernel: not built; CPU snapshots use the blocked check", file=sys.stderr)
        return 1
    print(f"CPU copy kernel: {path}")
    return 0


def _window(value: str) -> str:
    if value != "running" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or 'running'")
    return value


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
    export = commands.add_parser(
        "export",
        help="write a Hugging Face directory from a DCP export, a checkpoint's PMA state, or "
        "per-rank PMA state files (Merger.save, a DeepSpeed checkpoint tag)",
    )
    export.add_argument(
        "source",
        help="a pma_dist DCP export, a DCP checkpoint with a Merger's state, or a directory of "
        "per-rank PMA state files (holding pma_index.json)",
    )
    export.add_argument("out", help="Hugging Face directory to write (replaced atomically)")
    export.add_argument("--config", required=True, help="config.json, or a directory holding it")
    export.add_argument("--method", choices=METHODS, help="merge (window mode)")
    export.add_argument("--last", type=int, help="merge the newest N snapshots (window mode)")
    export.add_argument("--stride", type=int, help="every s-th of them (window mode)")
    export.add_argument("--dtype", help="cast the weights, e.g. bfloat16")
    export.add_argument("--pma-key", default="pma", help="key the Merger was saved under")
    export.add_argument("--model-key", default="model", help="key the model was saved under")
    export.add_argument("--tokenizer", help="directory of tokenizer files to include")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    export.set_defaults(run=_export)
    verify = commands.add_parser("verify", help="check an export against its manifest and load it")
    verify.add_argument("path", help="export directory")
    verify.add_argument("--quick", action="store_true", help="headers only, do not read tensors")
    verify.set_defaults(run=_verify)
    planner = commands.add_parser(
        "plan", help="per-rank state, snapshot, resume and export cost at a given scale"
    )
    planner.add_argument(
        "--model", required=True, help="llama3-70b, llama3-405b, mixtral-8x22b, deepseek-v3 or "
        "a config.json"
    )  # fmt: skip
    planner.add_argument("--world", type=int, required=True, help="ranks in the job")
    planner.add_argument("--replicas", type=int, default=1, help="HSDP replica groups")
    planner.add_argument("--rank", type=int, default=0, help="the rank to simulate")
    planner.add_argument("--window", type=_window, default="10", help="N, or 'running'")
    planner.add_argument(
        "--compression", choices=COMPRESSIONS, default="none", help="how the window is stored"
    )
    planner.add_argument("--offload", choices=["none", "cpu"], default="none")
    planner.add_argument(
        "--experts-dim", type=int, choices=[0, 1], default=1,
        help="shard grouped-expert tensors within experts (1) or by expert (0)",
    )  # fmt: skip
    planner.add_argument("--json", action="store_true", help="print the figures as JSON")
    planner.set_defaults(run=_plan)
    kernel = commands.add_parser(
        "build-kernel",
        help="build the CPU snapshot kernel ahead of a run (otherwise built at first use)",
    )
    kernel.set_defaults(run=_build_kernel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (
        PMAConfigError, FileNotFoundError, KeyError, ExportError, ValueError, RuntimeError
    ) as err:  # fmt: skip
        print(f"pma-dist {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
