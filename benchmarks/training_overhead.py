"""Training-step time of the reference program with PMA on against off, FSDP2, in one run.

    python -m benchmarks.training_overhead [--nproc 2] [--steps 400]
    python -m benchmarks.training_overhead --model llama-1b --nproc 1 --steps 40 --interval 50 \
        --offload none,cpu          # the GPU row: a 1.1B Llama in bf16 (FSDP2 mixed precision)

The demo model (configs/demo_dense.yaml) with PMA at the paper's cadence scaled down (a
snapshot every 100 steps, window 10). Steps alternate on and off on the same model ("off" skips
``merger.step``, so PMA counts only the "on" steps and snapshots every 100 of them), which
cancels the machine's drift (:func:`benchmarks.common.paired_overhead`). Also timed: every
``merger.step`` call inside training ("time in PMA"; on CPU the snapshot is synchronous, so
this is PMA's share of the training time), and one snapshot directly, spread over 100 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import (
    REPOSITORY,
    paired_overhead,
    record_merger_steps,
    save_figures,
    torchrun_json,
)

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 5632,
}
"""A Llama of about 1.1B parameters (with a 32000-token vocabulary): the GPU row."""


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from launch.pretrain.config import ModelConfig, RunConfig
    from launch.pretrain.data import TrainBatches, load_corpus
    from launch.pretrain.trainer import Trainer
    from pma_dist import Merger

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    cfg = RunConfig.from_yaml(REPOSITORY / "configs" / "demo_dense.yaml")
    cfg.pma = {"method": "wma", "window": 10, "interval_steps": args.interval}
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.model == "demo":
        vocab = 384
        train, _ = load_corpus(None, 4_000_000)
        batches = TrainBatches(train, cfg.data.seq_len, cfg.data.batch_per_rank, rank, world, 0)
        batch_of = batches.at
    else:
        sizes = dict(LLAMA_1B, **json.loads(args.sizes or "{}"))
        vocab = sizes.pop("vocab_size", 32000)
        cfg.model = ModelConfig(arch="llama", **sizes)
        cfg.data.seq_len, cfg.data.batch_per_rank = args.seq_len, args.batch
        generator = torch.Generator().manual_seed(rank)

        def batch_of(index: int) -> torch.Tensor:
            shape = (cfg.data.batch_per_rank, cfg.data.seq_len + 1)
            return torch.randint(0, vocab, shape, generator=generator)

    trainer = Trainer(cfg, device, vocab, None)
    rows = []
    for offload in args.offload.split(","):
        if offload != "none":
            trainer.merger.close()
            config = trainer.pma_config.to_dict() | {"offload": offload}
            trainer.merger = Merger(trainer.model, trainer.optimizer, config)
        rows.append(_measure(trainer, batch_of, args.steps, args.interval, device, offload))
        rows[-1] |= {"world_size": world, "model": args.model, "device": device.type}
    if rank == 0:
        print(json.dumps(rows[0] if len(rows) == 1 else {"rows": rows}))
    dist.barrier()  # ranks leave together (docs/semantics.md, "Exit")
    dist.destroy_process_group()


def _measure(trainer, batch_of, steps: int, interval: int, device, offload: str) -> dict:
    """Steps with PMA on and off in turns, every PMA call timed, and one snapshot alone."""
    step = trainer.merger.step

    def skip(tokens=None) -> bool:
        return False

    for index in range(5):
        trainer.step(batch_of(index))
    calls = record_merger_steps(trainer.merger)
    timed = trainer.merger.step
    times: dict[str, list[float]] = {"on": [], "off": []}
    for index in range(5, 5 + 2 * steps):
        name = "on" if index % 2 else "off"
        trainer.merger.step = timed if name == "on" else skip
        _sync(device)
        start = time.perf_counter()
        trainer.step(batch_of(index))
        _sync(device)
        times[name].append(time.perf_counter() - start)
    trainer.merger.step = step
    taken = trainer.merger.num_snapshots
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        trainer.merger.snapshot()
    trainer.merger.agree()
    _sync(device)
    snapshot = (time.perf_counter() - start) / 5
    off, on = (1000 * statistics.mean(times[k]) for k in ("off", "on"))
    return {
        "offload": offload,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "step_ms_off": off,
        "step_ms_on": on,
        **paired_overhead(times["off"], times["on"]),
        "time_in_pma": sum(calls) / sum(times["on"]),
        "snapshot_ms": 1000 * snapshot,
        "interval_steps": interval,
        "snapshot_share_of_interval": 1000 * snapshot / (interval * off),
        "snapshots_taken": taken,
    }


def _sync(device) -> None:
    from benchmarks.common import synchronize

    synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per setting")
    parser.add_argument("--model", choices=("demo", "llama-1b"), default="demo")
    parser.add_argument("--interval", type=int, default=100, help="steps between snapshots")
    parser.add_argument("--offload", default="none", help="settings, comma-separated: none,cpu")
    parser.add_argument("--seq-len", type=int, default=1024, help="llama-1b: tokens a sequence")
    parser.add_argument("--batch", type=int, default=8, help="llama-1b: sequences a rank")
    parser.add_argument("--sizes", help="llama-1b: JSON overrides of its sizes (smaller runs)")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    forwarded = [
        f"--steps={args.steps}", f"--model={args.model}", f"--interval={args.interval}",
        f"--offload={args.offload}", f"--seq-len={args.seq_len}", f"--batch={args.batch}",
    ] + ([f"--sizes={args.sizes}"] if args.sizes else [])  # fmt: skip
    r = torchrun_json("benchmarks.training_overhead", args.nproc, forwarded)
    rows = r.get("rows", [r])
    print(
        "| model | ranks | offload | step ms off | step ms on | overhead | time in PMA "
        "| snapshot ms | snapshot / interval |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['world_size']} | {row['offload']} | {row['step_ms_off']:.1f} "
            f"| {row['step_ms_on']:.1f} | {row['overhead']:+.2%} ± {row['error']:.2%} "
            f"| {row['time_in_pma']:.3%} | {row['snapshot_ms']:.2f} "
            f"| {row['snapshot_share_of_interval']:.3%} of {row['interval_steps']} steps |"
        )
    save_figures(args.out, r)


if __name__ == "__main__":
    main()
