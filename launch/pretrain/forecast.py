"""The annealing forecast: train at constant LR to the fork, then from that same state
(a) keep the constant LR and (b) anneal, for the same number of steps, evaluating the live and
the merged model as it goes."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pma_dist import MergeMonitor, MonitorConfig

from .config import RunConfig
from .data import TrainBatches, eval_batches, load_corpus
from .report import EvalLog, build_report, plot, plot_ablations, print_table
from .trainer import Trainer, wsd_lr

METHODS = ["sma", "wma", "ema"]
MONITOR_LOG = "pma_monitor.jsonl"


class Stopped(Exception):
    """``stop_after`` was reached; the run resumes from its last checkpoint."""


def run(
    cfg: RunConfig,
    run_dir: Path,
    *,
    init_from: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict | None:
    import torch.distributed as dist
    from transformers import ByT5Tokenizer

    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    started = time.perf_counter()
    tokenizer = ByT5Tokenizer()
    train_ids, held_ids = load_corpus(cfg.data.path, cfg.data.max_bytes)
    batches = TrainBatches(
        train_ids, cfg.data.seq_len, cfg.data.batch_per_rank, rank, world, cfg.seed
    )
    held = eval_batches(
        held_ids, cfg.data.seq_len, cfg.data.batch_per_rank, cfg.data.eval_batches, rank, world
    )
    trainer = Trainer(cfg, device, len(tokenizer), init_from)
    if rank == 0:
        (run_dir / "exports").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dist.barrier()
    log = EvalLog(run_dir / "log.jsonl", enabled=rank == 0)
    checkpoints = run_dir / "checkpoints"
    state = {"phase": "main", "step": 0}
    if not resume and rank == 0:
        log.path.unlink(missing_ok=True)
        (run_dir / "merges" / MONITOR_LOG).unlink(missing_ok=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    dist.barrier()
    monitor = None
    if not resume or trainer.saved_phase(checkpoints / "latest") != "b":
        monitor = _monitor(cfg, trainer, held, run_dir, tokenizer)
    if resume:
        state = trainer.load(checkpoints / "latest")
        log.truncate(state["phase"], state["step"])
    s = cfg.schedule
    total = s.fork_step + 2 * s.branch_steps
    bar = _progress(rank, total, state, s)
    if rank == 0:
        print(
            f"{world} ranks, {cfg.engine}, {cfg.model.arch}; {len(train_ids):,} train / "
            f"{len(held_ids):,} held-out bytes; {trainer.tokens_per_step:,} tokens per step; "
            f"PMA {trainer.pma_config.method}, window {trainer.pma_config.window}, "
            f"every {trainer.pma_config.interval_tokens:,} tokens",
            flush=True,
        )

    def evaluate(phase: str, step: int, train_loss: float, merged: bool) -> None:
        record = {
            "phase": phase,
            "step": step,
            "tokens": step * trainer.tokens_per_step,
            "lr": wsd_lr(step - 1, cfg, phase),
            "train_loss": train_loss,
            "live": trainer.evaluate(held),
            "pma": trainer.evaluate_merged(held, METHODS) if merged else {},
        }
        log.write(record)
        if rank == 0 and not bar.interactive:
            pma = " ".join(f"{k} {v:.4f}" for k, v in record["pma"].items())
            print(
                f"[{phase}] step {step:5d}  train {train_loss:.4f}  "
                f"held-out {record['live']:.4f}  {pma}",
                flush=True,
            )

    def train(phase: str, start: int, stop: int, merged_evals: bool) -> None:
        loss = float("nan")
        for step in range(start, stop):
            trainer.set_lr(wsd_lr(step, cfg, phase))
            loss = trainer.step(batches.at(step))
            if merged_evals:
                monitor.step()
            done = step + 1
            bar.update(loss, trainer.tokens_per_step)
            if done % s.eval_every == 0 or done == stop:
                evaluate(phase, done, loss, merged_evals)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != stop:
                trainer.save(checkpoints / "latest", {"phase": phase, "step": done})
            if phase == "main" and done == stop_after:
                raise Stopped(f"stopped after step {done} (--stop-after)")

    if state["phase"] == "main":
        train("main", state["step"], s.fork_step, merged_evals=True)
        _evaluated(monitor)
        trainer.save(checkpoints / "fork", {"phase": "a", "step": s.fork_step})
        state = {"phase": "a", "step": s.fork_step}
    if state["phase"] == "a":
        train("a", state["step"], s.fork_step + s.branch_steps, merged_evals=True)
        _evaluated(monitor)
        trainer.export_live(run_dir / "exports" / "constant", tokenizer)
        trainer.export_merged(run_dir / "exports" / "pma", tokenizer)
        monitor.close()
        trainer.load(checkpoints / "fork")
        state = {"phase": "b", "step": s.fork_step}
    train("b", state["step"], s.fork_step + s.branch_steps, merged_evals=False)
    trainer.export_live(run_dir / "exports" / "annealed", tokenizer)
    trainer.merger.check_replicas()
    bar.close()
    if rank != 0:
        return None
    report = build_report(
        log.records(),
        EvalLog(run_dir / "merges" / MONITOR_LOG, enabled=False).records(),
        cfg.to_dict(),
        trainer.pma_config.method,
        {
            "wall_time_s": time.perf_counter() - started,
            "replicas_agree": True,
            "world_size": world,
            "exports": {
                k: str((run_dir / "exports" / k).absolute())
                for k in ("pma", "constant", "annealed")
            },
        },
    )
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot(log.records(), report["pma_method"], report["fork"]["tokens"], run_dir / "curves.png")
    plot_ablations(report["ablation"], run_dir / "ablations.png")
    print_table(report)
    print(f"report: {run_dir / 'report.json'}  plot: {run_dir / 'curves.png'}")
    return report


def _monitor(cfg: RunConfig, trainer: Trainer, held, run_dir: Path, tokenizer) -> MergeMonitor:
    """Ranks the ablation grid on the held-out batches; keeps the best merge in exports/best."""
    config = MonitorConfig(
        every=cfg.ablation.every,
        candidates=cfg.ablation.candidates,
        log_dir=str(run_dir / "merges"),
        best_dir=str(run_dir / "exports" / "best"),
        export_options={"tokenizer": tokenizer, "config": trainer.hf_config(), "progress": False},
    )
    return MergeMonitor(trainer.merger, lambda: trainer.evaluate(held), config)


def _evaluated(monitor: MergeMonitor) -> None:
    """The monitor's figures for the snapshots held now (an evaluation unless it just ran)."""
    if monitor.snapshots_taken != monitor.evaluated_at:
        monitor.evaluate_now()


class _progress:
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise eval lines are printed."""

    def __init__(self, rank: int, total: int, state: dict, s) -> None:
        self.bar = None
        self.interactive = rank == 0 and sys.stderr.isatty()
        self.started, self.tokens = time.perf_counter(), 0
        if self.interactive:
            from tqdm.auto import tqdm

            done = {"main": 0, "a": s.fork_step, "b": s.fork_step + s.branch_steps}[state["phase"]]
            done += state["step"] - (0 if state["phase"] == "main" else s.fork_step)
            self.bar = tqdm(total=total, initial=done, unit="step")

    def update(self, loss: float, tokens: int) -> None:
        if self.bar is None:
            return
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
