"""The run's evaluation log (JSON lines, TensorBoard when installed), and the final report:
``report.json``, a PNG of the held-out curves, and a printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class EvalLog:
    """Append-only JSON lines on rank 0; on resume, entries after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                pass

    def truncate(self, phase: str, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        order = {"main": 0, "a": 1, "b": 2}
        kept = [r for r in self.records() if (order[r["phase"]], r["step"]) <= (order[phase], step)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.get("pma", {}).items():
                self.tensorboard.add_scalar(
                    f"held_out/{record['phase']}/pma_{key}", value, record["tokens"]
                )
            self.tensorboard.add_scalar(
                f"held_out/{record['phase']}/live", record["live"], record["tokens"]
            )

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def build_report(
    records: list[dict], cfg: dict, method: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """The forecast numbers from the evaluation log."""
    fork_step = cfg["schedule"]["fork_step"]
    end = fork_step + cfg["schedule"]["branch_steps"]

    def pick(phase: str, step: int) -> dict:
        return next(r for r in reversed(records) if r["phase"] == phase and r["step"] == step)

    fork, a, b = pick("main", fork_step), pick("a", end), pick("b", end)
    constant, pma, annealed = a["live"], a["pma"][method], b["live"]
    gain = constant - annealed
    return {
        "val_loss": {"constant": constant, "pma": pma, "annealed": annealed},
        "pma_method": method,
        "recovery": (constant - pma) / gain if gain > 0 else None,
        "val_loss_pma_methods": a["pma"],
        "fork": {
            "step": fork_step,
            "tokens": fork["tokens"],
            "constant": fork["live"],
            "pma": fork["pma"],
        },
        "tokens": {"fork": fork["tokens"], "end": a["tokens"]},
        "config": cfg,
        **extra,
    }


def print_table(report: dict[str, Any]) -> None:
    v, fork = report["val_loss"], report["fork"]
    method = report["pma_method"]
    print()
    print(f"{'held-out loss (nats per byte)':<44}{'loss':>8}")
    print(f"{'constant LR, end of branch (a)':<44}{v['constant']:>8.4f}")
    print(f"{'PMA ' + method + ' of branch (a), no extra training':<44}{v['pma']:>8.4f}")
    print(f"{'annealed, end of branch (b)':<44}{v['annealed']:>8.4f}")
    for other, value in report["val_loss_pma_methods"].items():
        if other != method:
            print(f"{'  PMA ' + other + ' of branch (a)':<44}{value:>8.4f}")
    print(f"{'at the fork: constant LR':<44}{fork['constant']:>8.4f}")
    for name, value in fork["pma"].items():
        print(f"{'  PMA ' + name + ' at the fork':<44}{value:>8.4f}")
    if report["recovery"] is not None:
        print(f"PMA recovers {report['recovery']:.0%} of annealing's gain with no extra training.")
    print(
        f"tokens: fork {report['tokens']['fork']:,}, end {report['tokens']['end']:,}; "
        f"wall time {report['wall_time_s']:.0f}s"
    )


def plot(records: list[dict], method: str, fork_tokens: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    main_a = [r for r in records if r["phase"] in ("main", "a")]
    ax.plot(
        [r["tokens"] for r in main_a],
        [r["live"] for r in main_a],
        label="constant LR (live)",
        color="tab:blue",
    )
    with_pma = [r for r in main_a if method in r.get("pma", {})]
    ax.plot(
        [r["tokens"] for r in with_pma],
        [r["pma"][method] for r in with_pma],
        label=f"PMA {method} (merged)",
        color="tab:green",
    )
    fork = [r for r in records if r["phase"] == "main" and r["tokens"] == fork_tokens]
    b = fork + [r for r in records if r["phase"] == "b"]
    ax.plot(
        [r["tokens"] for r in b],
        [r["live"] for r in b],
        label="annealed (cosine)",
        color="tab:orange",
    )
    ax.axvline(fork_tokens, color="grey", linestyle=":", label="fork")
    ax.set_xlabel("tokens")
    ax.set_ylabel("held-out loss")
    ax.set_title("PMA as an annealing forecast")
    low = min(r["live"] for r in records[len(records) // 3 :])
    ax.set_ylim(low - 0.1, low + 0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
