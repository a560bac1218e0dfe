"""Run settings: typed dataclasses read from a YAML file (see configs/demo_*.yaml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """A small transformers causal LM, built from scratch."""

    arch: str = "llama"
    """``llama`` (dense) or ``mixtral`` (MoE with grouped experts)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 352
    """MLP width (per expert for ``mixtral``)."""
    num_local_experts: int = 4
    """Experts per MoE layer (``mixtral`` only)."""
    num_experts_per_tok: int = 2
    """Experts each token is routed to (``mixtral`` only)."""


@dataclass
class DataConfig:
    """The text corpus and how it is batched."""

    path: str | None = None
    """A folder of text files; ``None`` takes the Python standard library's source."""
    seq_len: int = 128
    """Bytes per training sequence."""
    batch_per_rank: int = 16
    """Sequences per rank and optimizer step."""
    eval_batches: int = 4
    """Held-out batches per rank for each evaluation (the same ones every time)."""
    max_bytes: int = 16_000_000
    """Stop reading the corpus after this many bytes (keeps start-up fast)."""


@dataclass
class ScheduleConfig:
    """Warmup-stable-decay learning rate and the annealing-forecast fork."""

    lr: float = 3e-3
    """Peak (constant) learning rate."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    fork_step: int = 360
    """Constant-LR steps before the two branches start from the same state."""
    branch_steps: int = 240
    """Steps of each branch: (a) constant LR, (b) cosine decay."""
    final_lr_ratio: float = 0.02
    """Branch (b) decays to ``lr * final_lr_ratio``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eval_every: int = 40
    """Steps between held-out evaluations of the live and the merged model."""


def _demo_grid() -> list[dict[str, Any]]:
    """14 merges from one ring: each method at N = 2, 8, 16 (the paper's Fig. 4 and the N of
    Fig. 5), SMA of 4 snapshots spaced 1, 2 and 4 snapshots apart (the V of Fig. 5), and the
    decay-shaped merges over the whole window."""
    by_n = [{"method": m, "last": n} for m in ("sma", "wma", "ema") for n in (2, 8, 16)]
    by_v = [{"method": "sma", "last": 4, "stride": s} for s in (1, 2, 4)]
    decays = [{"method": m, "last": 16} for m in ("cosine", "minus_sqrt")]
    return by_n + by_v + decays


@dataclass
class AblationConfig:
    """The paper's ablations from one run: merges of the ring ranked on held-out data by a
    ``pma_dist.MergeMonitor``, at the fork, at the end of branch (a) and every ``every``
    snapshots in between."""

    candidates: list[dict[str, Any]] | None = field(default_factory=_demo_grid)
    """Merges (``method``, ``last`` = N, ``stride``); None: the full default grid of
    ``Merger.select`` (``make demo-full``). Those the ring cannot span yet are left out."""
    every: int = 30
    """Snapshots between evaluations during training."""


@dataclass
class RunConfig:
    """One run of the program."""

    name: str = "demo"
    """Name of the run (its directory under ``runs/``)."""
    engine: str = "fsdp2"
    """``fsdp2`` (HSDP across nodes) or ``deepspeed``."""
    zero_stage: int = 2
    """ZeRO stage with ``engine: deepspeed``."""
    seed: int = 0
    """Seed of the initial weights and of the data order."""
    checkpoint_every: int = 0
    """Steps between resumable checkpoints (0: only the fork checkpoint)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule and the fork."""
    pma: dict[str, Any] = field(
        default_factory=lambda: {"method": "wma", "window": 10, "interval_steps": 8}
    )
    """``pma_dist.PMAConfig`` settings (``interval_steps`` is turned into tokens)."""
    ablation: AblationConfig = field(default_factory=AblationConfig)
    """Which merges of the ring the run ranks, and how often."""
    full: dict[str, Any] = field(default_factory=dict)
    """Overrides applied by ``--full`` (a longer run with sharper numbers)."""

    @classmethod
    def from_yaml(cls, path: str | Path, *, full: bool = False) -> RunConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if full:
            data = _merge(data, data.get("full", {}))
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            _merge(base.get(key, {}), value) if isinstance(value, dict) and key != "pma" else value
        )
    return out


def _build(cls, data: dict[str, Any], prefix: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; allowed: {sorted(known)}"
        )
    values = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        values[name] = (
            _build(type(default), value, f"{prefix}{name}.") if is_dataclass(default) else value
        )
    return cls(**values)
