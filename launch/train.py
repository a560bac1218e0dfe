"""Pre-train a small transformers model with PMA and report the annealing forecast.

    torchrun --nproc-per-node 2 launch/train.py --config configs/demo_dense.yaml
    deepspeed launch/train.py --config configs/demo_deepspeed.yaml

Trains at constant learning rate to a fork, then from that state (a) at constant LR and (b)
annealed; reports held-out loss of (a), of (a)'s PMA merge and of (b), and how much of
annealing's gain the merge recovers with no extra training (``runs/NAME/report.json``).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_dense.yaml", help="run config (YAML)")
    parser.add_argument(
        "--data", help="folder of text files (default: the Python standard library)"
    )
    parser.add_argument("--run-dir", help="output directory (default: runs/<name>)")
    parser.add_argument("--full", action="store_true", help="apply the config's `full:` overrides")
    parser.add_argument("--init-from", help="start from a merged export (PMA-init)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from <run-dir>/checkpoints/latest"
    )
    parser.add_argument(
        "--stop-after", type=int, help="stop after this step of the first phase (to try --resume)"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from pretrain.config import RunConfig
    from pretrain.forecast import Stopped, run

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = RunConfig.from_yaml(args.config, full=args.full)
    if args.data:
        cfg.data.path = args.data
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=10)
    )
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    try:
        run(cfg, run_dir, init_from=args.init_from, resume=args.resume, stop_after=args.stop_after)
    except Stopped as stop:
        if dist.get_rank() == 0:
            print(stop)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Ranks leave together: none tears down while rank 0 still writes the report. Then the
    # group is destroyed while everything it uses is alive (docs/semantics.md, "Exit"): a group
    # left to interpreter teardown can abort the process after training finished.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
