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
    records: list[dict], merges: list[dict], cfg: dict, method: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """The forecast numbers from the evaluation log, and the ablations from the merge
    monitor's records (``merges``)."""
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
        "ablation": _ablation(merges, fork_step, end, annealed),
        "config": cfg,
        **extra,
    }


def _ablation(merges: list[dict], fork_step: int, end: int, annealed: float) -> dict[str, Any]:
    """Every merge the monitor ranked at the fork and at the end of branch (a), what it picked,
    and the annealed branch's loss to set the decay-shaped merges against."""
    out: dict[str, Any] = {"annealed": annealed}
    for name, step in (("fork", fork_step), ("end", end)):
        record = next((r for r in reversed(merges) if r["step"] == step), None)
        if record is None:
            continue
        out[name] = {
            "step": step,
            "tokens": record["tokens"],
            "live": record["live_loss"],
            "merges": record["merges"],
            "selected": record["best"]["merge"],
        }
    return out


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
    print_ablation(report["ablation"])


def _by_merge(phase: dict | None) -> dict[str, dict]:
    return {m["merge"]: m for m in (phase or {}).get("merges", [])}


def print_ablation(ablation: dict[str, Any]) -> None:
    """One row per merge ranked (N snapshots, V = their mean spacing), fork and end columns."""
    fork, end = _by_merge(ablation.get("fork")), _by_merge(ablation.get("end"))
    if not end:
        return
    order = sorted(end.values(), key=lambda m: (m["method"], m["stride"], m["n"]))
    print()
    print(
        f"{'merges of one ring (held-out loss)':<34}{'N':>4}{'V tokens':>10}{'fork':>9}{'end':>9}"
    )
    for m in order:
        at_fork = fork.get(m["merge"], {}).get("loss")
        spacing = m["mean_spacing_tokens"]
        print(
            f"{m['method'] + ' stride ' + str(m['stride']):<34}{m['n']:>4}"
            f"{(f'{spacing:,.0f}' if spacing else '-'):>10}"
            f"{(f'{at_fork:.4f}' if at_fork is not None else '-'):>9}{m['loss']:>9.4f}"
        )
    live_fork = ablation.get("fork", {}).get("live")
    print(
        f"{'live model':<48}{(f'{live_fork:.4f}' if live_fork else '-'):>9}"
        f"{ablation['end']['live']:>9.4f}"
    )
    print(f"{'annealed branch (b)':<57}{ablation['annealed']:>9.4f}")
    picks = [f"{k}: {ablation[k]['selected']}" for k in ("fork", "end") if k in ablation]
    print("select picked " + "; ".join(picks))


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


def plot_ablations(ablation: dict[str, Any], path: Path) -> None:
    """Held-out loss by N (each method, consecutive snapshots) and by V (SMA of 4 snapshots at
    growing spacing), at the fork (dashed) and at the end of branch (a) (solid)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (by_n, by_v) = plt.subplots(1, 2, figsize=(10, 4.2))
    colors = {"sma": "tab:green", "wma": "tab:purple", "ema": "tab:red"}
    for phase, style in (("fork", "--"), ("end", "-")):
        merges = ablation.get(phase, {}).get("merges", [])
        for method, color in colors.items():
            points = sorted(
                (m["n"], m["loss"]) for m in merges if m["method"] == method and m["stride"] == 1
            )
            if points:
                by_n.plot(
                    *zip(*points), style, marker="o", color=color, label=f"{method} ({phase})"
                )
        spaced = sorted(
            (m["mean_spacing_tokens"], m["loss"])
            for m in merges
            if m["method"] == "sma" and m["last"] == 4 and m["mean_spacing_tokens"]
        )
        if spaced:
            by_v.plot(
                *zip(*spaced), style, marker="o", color="tab:green", label=f"sma N=4 ({phase})"
            )
        if phase in ablation:
            for ax in (by_n, by_v):
                ax.axhline(ablation[phase]["live"], color="tab:blue", linestyle=style, lw=0.8)
    for ax in (by_n, by_v):
        ax.axhline(ablation["annealed"], color="tab:orange", lw=0.8, label="annealed (end)")
        ax.set_ylabel("held-out loss")
    by_n.set_xscale("log", base=2)
    by_n.set_xlabel("N (snapshots merged)")
    by_n.set_title("loss by N, per method (blue: live model)")
    by_v.set_xlabel("V (tokens between merged snapshots)")
    by_v.set_title("loss by V")
    by_n.legend(fontsize=7)
    by_v.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
