"""The compressed window against the exact ring, side by side in one run: bytes it keeps, how far
its merges lie from the exact ones on a real trajectory, and what its snapshot and merge cost.

    python -m benchmarks.compressed_window [--snapshots 60] [--params-millions 50]

Accuracy: the demo's model (configs/demo_dense.yaml: a 0.5M-parameter Llama, byte-level, on the
Python standard library's source) trained by AdamW at the demo's constant learning rate, a
snapshot every 4 steps as the demo takes them, four window-10 Mergers on the one trajectory:
the exact fp32 ring, ``compression: bf16``, ``compression: fp8``, and ``dtype: bfloat16``
slots. At 20 and at 60 snapshots, for SMA, WMA, EMA, cosine and SMA of 4 snapshots at stride 2:
eps = ||merge - exact|| / ||exact - live|| and the held-out loss of each merge against the exact
merge's. Speed: one snapshot (copy, finiteness check and encode) and one merge of 10 snapshots
of a ``--params-millions`` fp32 shard, against ``torch._foreach_copy_`` of it and against the
exact ring, timed in turns (:func:`benchmarks.common.interleaved_medians`); on an accelerator
(``--device cuda``) also with each window in host memory (``offload: cpu``, the ``... offload``
rows: the staged copy and the host encode, waited for).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import REPOSITORY, interleaved_medians, save_figures
from pma_dist import Merger, MergeSpec, PMAConfig

WINDOW = 10
KINDS = {
    "exact": {},
    "bf16": {"compression": "bf16"},
    "fp8": {"compression": "fp8"},
    "bf16 slots": {"dtype": "bfloat16"},
}
MERGES = {
    "sma": MergeSpec("sma"),
    "wma": MergeSpec("wma"),
    "ema": MergeSpec("ema"),
    "cosine": MergeSpec("cosine"),
    "sma N=4 V=2": MergeSpec("sma", last=4, stride=2),
}
VOCAB = 384
"""The demo's vocabulary (ByT5's byte ids, padded)."""
TARGETS = {"bf16": (1e-3, 1e-4), "fp8": (1.5e-2, 1e-3)}
"""Largest eps and held-out loss difference (nats) each code must stay within."""


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[n].double() - b[n].double()).square().sum()) for n in a))


def accuracy(snapshots: int, checks: tuple[int, ...], warm: int) -> dict:
    from launch.pretrain.config import RunConfig
    from launch.pretrain.data import TrainBatches, eval_batches, load_corpus
    from launch.pretrain.model import build_model

    cfg = RunConfig.from_yaml(REPOSITORY / "configs" / "demo_dense.yaml")
    train, held = load_corpus(None, 4_000_000)
    batches = TrainBatches(train, cfg.data.seq_len, cfg.data.batch_per_rank, 0, 1, 0)
    evals = eval_batches(held, cfg.data.seq_len, cfg.data.batch_per_rank, 4, 0, 1)
    model = build_model(cfg.model, VOCAB, cfg.data.seq_len, 0, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.schedule.lr)
    interval = cfg.pma["interval_steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bfloat16 slots warn, as they should
        mergers = {
            kind: Merger(
                model,
                optimizer,
                PMAConfig(window=WINDOW, interval_steps=interval, start_step=warm, **extra),
            )
            for kind, extra in KINDS.items()
        }

    def held_out() -> float:
        with torch.no_grad():
            losses = [
                F.cross_entropy(model(b[:, :-1]).logits.flatten(0, 1), b[:, 1:].flatten())
                for b in evals
            ]
        return float(torch.stack(losses).mean())

    step, rows = 0, {}
    while mergers["exact"].num_snapshots < snapshots:
        tokens = batches.at(step)
        loss = F.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        taken = {kind: m.step() for kind, m in mergers.items()}
        count = mergers["exact"].num_snapshots
        if not taken["exact"] or count not in checks:
            continue
        live = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name, spec in MERGES.items():
            exact = mergers["exact"].merged_shards(spec)
            with mergers["exact"].swapped(spec):
                exact_loss = held_out()
            for kind in ("bf16", "fp8", "bf16 slots"):
                merged = mergers[kind].merged_shards(spec)
                with mergers[kind].swapped(spec):
                    loss_gap = abs(held_out() - exact_loss)
                eps = _distance(merged, exact) / _distance(exact, live)
                rows.setdefault(kind, {}).setdefault(name, {})[count] = {
                    "eps": eps,
                    "loss_gap": loss_gap,
                }
    numel = sum(p.numel() for p in model.parameters())
    per_element = {kind: m.state_bytes / numel for kind, m in mergers.items()}
    return {"steps": step, "params": numel, "rows": rows, "bytes_per_element": per_element}


class Matrices(torch.nn.Module):
    """About ``numel`` parameters as a model holds most of them: matrices of rows of 4096."""

    def __init__(self, numel: int, device: torch.device) -> None:
        super().__init__()
        rows = [4096, 1024, 4096, 2048]
        sizes, left, i = [], numel, 0
        while left >= 4096:
            count = min(rows[i % len(rows)], left // 4096)
            sizes.append(count)
            left -= count * 4096
            i += 1
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(r, 4096, device=device) * 0.02) for r in sizes
        )


def speed(millions: int, repeats: int, device: torch.device) -> dict:
    shard = Matrices(millions * 1_000_000, device)
    params = [p.detach() for p in shard.parameters()]
    copies = [torch.empty_like(p) for p in params]
    kinds = {kind: extra for kind, extra in KINDS.items() if kind != "bf16 slots"}
    if device.type != "cpu":  # the window in host memory: staged, encoded on the host
        kinds.update(
            {f"{kind} offload": {**extra, "offload": "cpu"} for kind, extra in kinds.items()}
        )
    mergers = {
        kind: Merger(shard, None, PMAConfig(window=WINDOW, interval_steps=1, **extra))
        for kind, extra in kinds.items()
    }
    for merger in mergers.values():
        for _ in range(WINDOW):
            with torch.no_grad():
                for p in params:
                    p.add_(1e-4)
            merger.snapshot()
    cases = {"foreach_copy": lambda: torch._foreach_copy_(copies, params)}
    for kind, merger in mergers.items():
        cases[f"snapshot {kind}"] = lambda m=merger: (m.snapshot(), m._state.wait_host())
        cases[f"merge {kind}"] = lambda m=merger: m.merged_shards("sma")
    t = interleaved_medians(cases, device, repeats)
    copy_bytes = 2 * sum(p.numel() * 4 for p in params)
    return {
        "params_millions": millions,
        "device": str(device),
        "copy_GBps": copy_bytes / t["foreach_copy"] / 1e9,
        "seconds": t,
        "snapshot_vs_copy": {k: t[f"snapshot {k}"] / t["foreach_copy"] for k in mergers},
        "merge_vs_exact": {k: t[f"merge {k}"] / t["merge exact"] for k in mergers},
    }


def table(result: dict) -> str:
    acc, fast = result["accuracy"], result["speed"]
    first, last = result["checks"]
    lines = [
        f"| window of {WINDOW} | bytes/element | eps at {first} (worst merge) | eps at {last} | "
        f"growth | held-out loss vs exact merge (nats) | snapshot vs _foreach_copy_ | "
        "merge vs exact ring |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        bytes_ = f"{acc['bytes_per_element'][kind]:.2f}"
        if kind == "exact":
            snap = f"{fast['snapshot_vs_copy']['exact']:.2f}x"
            lines.append(f"| exact fp32 ring | {bytes_} | 0 | 0 | | 0 | {snap} | 1.00x |")
            continue
        rows = acc["rows"][kind]
        at_first = max(r[first]["eps"] for r in rows.values())
        at_last = max(r[last]["eps"] for r in rows.values())
        gap = max(v["loss_gap"] for r in rows.values() for v in r.values())
        snap = fast["snapshot_vs_copy"].get(kind)
        merge = fast["merge_vs_exact"].get(kind)
        lines.append(
            f"| {kind} | {bytes_} | {at_first:.2e} | {at_last:.2e} | {at_last / at_first:.2f}x | "
            f"{gap:.1e} | {f'{snap:.2f}x' if snap else ''} | {f'{merge:.2f}x' if merge else ''} |"
        )
    return "\n".join(lines)


def misses(result: dict) -> list[str]:
    """The targets a code missed in this run."""
    acc, fast, out = result["accuracy"], result["speed"], []
    first, last = result["checks"]
    most_bytes = {"bf16": 22.5, "fp8": 13.5}
    for code, (eps_max, gap_max) in TARGETS.items():
        rows = acc["rows"][code].values()
        worst = max(v["eps"] for r in rows for v in r.values())
        gap = max(v["loss_gap"] for r in rows for v in r.values())
        growth = max(r[last]["eps"] / r[first]["eps"] for r in rows)
        size = acc["bytes_per_element"][code]
        snapshot, merge = fast["snapshot_vs_copy"][code], fast["merge_vs_exact"][code]
        checks = [
            (worst > eps_max, f"{code} eps {worst:.2e} > {eps_max}"),
            (gap > gap_max, f"{code} held-out loss {gap:.1e} nats from the exact merge's"),
            (growth > 2, f"{code} eps grew {growth:.2f}x from {first} to {last} snapshots"),
            (size > most_bytes[code], f"{code} {size:.2f} bytes an element"),
            (snapshot > 2, f"{code} snapshot {snapshot:.2f}x a copy"),
            (merge > 1, f"{code} merge {merge:.2f}x the exact ring's"),
        ]
        out += [what for missed, what in checks if missed]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=60, help="at least 7")
    parser.add_argument("--warm-steps", type=int, default=100, help="steps before the first")
    parser.add_argument("--params-millions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu", help="where the speed part runs (cuda)")
    parser.add_argument("--speed-only", action="store_true", help="skip the accuracy part")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    fast = speed(args.params_millions, args.repeats, device)
    if args.speed_only:
        print(
            json.dumps(
                {k: fast[k] for k in ("device", "copy_GBps", "snapshot_vs_copy", "merge_vs_exact")}
            )
        )
        save_figures(args.out, {"speed": fast})
        return
    checks = (min(20, args.snapshots), args.snapshots)
    result = {
        "checks": checks,
        "accuracy": accuracy(args.snapshots, checks, args.warm_steps),
        "speed": fast,
    }
    result["misses"] = misses(result)
    print(table(result))
    print("targets missed:", "; ".join(result["misses"]) or "none")
    save_figures(args.out, result)


if __name__ == "__main__":
    main()
