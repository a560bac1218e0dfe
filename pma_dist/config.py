"""Typed, validated PMA settings, loadable from Python, YAML or a DeepSpeed ``"pma"`` section.

Every loader ends in :meth:`PMAConfig.validate`, so a bad value fails at start-up with one error
that names the key, the value and what is allowed, instead of deep inside a training run.
"""

from __future__ import annotations

import difflib
import json
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ._parsing import is_int, parse_count, strict_int

RUNNING_METHODS = ("sma", "wma", "ema")
"""Methods a running average can fold with."""
DECAY_METHODS = ("linear", "cosine", "minus_sqrt")
"""Decay-shaped merges (window mode only): see :func:`pma_dist.core.decay_weights`."""
METHODS = RUNNING_METHODS + DECAY_METHODS
OFFLOAD = ("none", "cpu")
ON_NONFINITE = ("skip", "raise", "ignore")
DTYPES = ("float32", "float64", "bfloat16", "float16")
COMPRESSIONS = ("none", "bf16", "fp8")
_LOW_PRECISION = ("bfloat16", "float16")


class PMAConfigError(ValueError):
    """A PMA setting is missing, unknown or out of range; the message names each offending key."""


@dataclass
class PMAConfig:
    """Settings of one pre-trained model average (PMA, arXiv 2505.12082).

    Token counts accept integers, integral floats (``4e9``) and strings with a suffix
    (``"4B"``, ``"500M"``, ``"4e9"``), because configs written by people use all three.
    """

    method: str = "sma"
    """How snapshots are weighted: ``"sma"`` (equal), ``"wma"`` (snapshot i of N weighs i,
    later ones heavier) or ``"ema"`` (recursive, smoothing factor ``ema_alpha``). The paper finds
    WMA/EMA better early in training and SMA the robust default later. Window mode also has the
    decay-shaped merges ``"linear"`` (equal to SMA), ``"cosine"`` and ``"minus_sqrt"``: the
    window's updates replayed under that learning-rate decay (WSM, arXiv 2507.17634). In window
    mode this is only the default for merges: any method can be asked for at merge time."""

    window: int | None = 10
    """N, the number of most recent snapshots averaged (the paper's usual choice is 10). Keeps N
    fp32 copies of the local shard. ``None`` selects running mode: one copy, every snapshot
    folded in with a single lerp (cumulative SMA/WMA over all snapshots, or EMA), and the method
    fixed at configuration time."""

    last: int | None = None
    """The default merge's N in window mode: the newest ``last`` valid snapshots (None: every
    one held). Merges take ``last=`` to choose another from the same ring."""

    stride: int = 1
    """The default merge's spacing in window mode: every ``stride``-th snapshot, so the merge's
    V is ``stride`` intervals. Merges take ``stride=`` to choose another."""

    interval_tokens: int | None = None
    """V, tokens between snapshots, counted over all data-parallel ranks (the paper's spacing:
    about 4B tokens for 0.7B/7B-MoE models, 8B for 1.3B/13B, 80B for 10B/100B). Exactly one of
    ``interval_tokens`` and ``interval_steps`` is set."""

    interval_steps: int | None = None
    """Optimizer steps between snapshots, for runs that count steps rather than tokens."""

    tokens_per_step: int | None = None
    """Global tokens consumed by one optimizer step, used when ``Merger.step`` is called without
    ``tokens=``. Leave unset when the batch size changes during training and pass ``tokens=``."""

    start_tokens: int = 0
    """No snapshot is taken before this many tokens; with ``interval_tokens`` the snapshot grid is
    ``start_tokens + k * interval_tokens`` for k >= 1."""

    start_step: int = 0
    """No snapshot is taken before this optimizer step; with ``interval_steps`` the snapshot grid
    is ``start_step + k * interval_steps`` for k >= 1."""

    ema_alpha: float = 0.2
    """EMA smoothing factor alpha in (0, 1]: the newest snapshot weighs alpha, the previous
    average 1 - alpha. Used by ``method="ema"`` in both modes."""

    offload: str = "none"
    """Where the averaging slots live: ``"none"`` (beside the parameters) or ``"cpu"`` (host
    memory, pinned when the parameters are on an accelerator, filled on a side stream)."""

    on_nonfinite: str = "skip"
    """What a snapshot with NaN/Inf in any rank's shard does: ``"skip"`` (every rank leaves it
    out), ``"raise"`` (every rank raises), or ``"ignore"`` (no check: saves one read of the shard
    and one scalar all-reduce per snapshot, for runs guarded elsewhere)."""

    max_consecutive_skips: int | None = 3
    """After this many non-finite snapshots in a row, raise ``NonFiniteSnapshotError`` naming
    the tensors and ranks that held NaN/Inf instead of skipping on: a rare bad snapshot is
    skipped, a run that skips every one has no average at all. A good snapshot resets the
    count, which is saved with the state. ``None`` never raises."""

    average_buffers: bool = True
    """Average the model's persistent floating-point buffers with the parameters, as averaging
    checkpoints offline does: training may move them outside the optimizer (the expert bias of
    auxiliary-loss-free MoE balancing, running statistics), and a merge with live buffers next
    to averaged weights is not the average of the checkpoints. ``False`` keeps them live.
    Integer and non-persistent buffers are never averaged."""

    dtype: str = "float32"
    """Accumulation dtype of the slots. ``"float32"`` whatever the parameter dtype;
    ``"float64"`` for reference runs; lower precision is accepted with a warning."""

    compression: str = "none"
    """How a window stores its snapshots: ``"none"`` (N float32 copies), or the newest in
    float32 and the others as differences with error feedback, each snapshot carrying one
    rounding of its own: ``"bf16"`` (22 bytes an element at N = 10, against 40) or ``"fp8"``
    (e4m3, a power-of-two scale per 128 elements: 13.1). Window mode, ``dtype: float32``."""

    enabled: bool = True
    """Read by the integrations (a DeepSpeed ``"pma"`` section with ``"enabled": false`` is off)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def running(self) -> bool:
        """True in running mode (no window)."""
        return self.window is None

    @property
    def interval_unit(self) -> str:
        """``"tokens"`` or ``"steps"``: what the snapshot interval counts."""
        return "tokens" if self.interval_tokens is not None else "steps"

    def validate(self) -> PMAConfig:
        """Normalize token counts and check every field; raise one error listing all problems."""
        problems: list[str] = []

        def check(key: str, ok: bool, allowed: str) -> None:
            if not ok:
                problems.append(f"pma.{key} = {getattr(self, key)!r}: {allowed}")

        check("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}")
        check(
            "method",
            self.window is not None or self.method not in DECAY_METHODS,
            "decay-shaped merges need window mode (pma.window = N); running mode folds with "
            f"{', '.join(RUNNING_METHODS)}",
        )
        check(
            "window",
            self.window is None or is_int(self.window) and self.window >= 1,
            "must be a positive integer (N snapshots) or null for running mode",
        )
        for key in ("interval_tokens", "interval_steps", "tokens_per_step"):
            value = getattr(self, key)
            if value is None:
                continue
            parsed = parse_count(value) if key != "interval_steps" else strict_int(value)
            if parsed is None or parsed < 1:
                check(key, False, "must be a positive integer or null")
            else:
                setattr(self, key, parsed)
        for key in ("start_tokens", "start_step"):
            value = getattr(self, key)
            parsed = parse_count(value) if key == "start_tokens" else strict_int(value)
            if parsed is None or parsed < 0:
                check(key, False, "must be a non-negative integer")
            else:
                setattr(self, key, parsed)
        if (self.interval_tokens is None) == (self.interval_steps is None):
            problems.append(
                f"pma.interval_tokens = {self.interval_tokens!r}, "
                f"pma.interval_steps = {self.interval_steps!r}: set exactly one of them"
            )
        self._check_default_merge(check)
        alpha = self.ema_alpha
        check(
            "ema_alpha",
            isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and 0 < alpha <= 1,
            "must be a number in (0, 1]",
        )
        check("offload", self.offload in OFFLOAD, f"must be one of {', '.join(OFFLOAD)}")
        check(
            "on_nonfinite",
            self.on_nonfinite in ON_NONFINITE,
            f"must be one of {', '.join(ON_NONFINITE)}",
        )
        check(
            "max_consecutive_skips",
            self.max_consecutive_skips is None
            or is_int(self.max_consecutive_skips)
            and self.max_consecutive_skips >= 1,
            "must be a positive integer or null (never raise)",
        )
        check("average_buffers", isinstance(self.average_buffers, bool), "must be true or false")
        check("dtype", self.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}")
        self._check_compression(check)
        check("enabled", isinstance(self.enabled, bool), "must be true or false")
        if problems:
            raise PMAConfigError("invalid PMA config:\n  " + "\n  ".join(problems))
        if self.dtype in _LOW_PRECISION:
            warnings.warn(
                f"pma.dtype = {self.dtype!r} accumulates averages in low precision; "
                "float32 is recommended whatever the parameter dtype",
                stacklevel=3,
            )
        return self

    def _check_default_merge(self, check) -> None:
        check("stride", is_int(self.stride) and self.stride >= 1, "must be an integer >= 1")
        if self.last is not None and not (is_int(self.last) and self.last >= 1):
            check("last", False, "must be an integer >= 1, or null (every snapshot held)")
        elif self.running and (self.last is not None or self.stride != 1):
            check("last" if self.last is not None else "stride", False, "needs window mode")
        elif self.last is not None and is_int(self.stride) and is_int(self.window):
            span = (self.last - 1) * self.stride + 1
            check(
                "last",
                span <= self.window,
                f"at stride {self.stride} spans {span} "
                f"snapshots, more than pma.window = {self.window}",
            )

    def _check_compression(self, check) -> None:
        if self.compression not in COMPRESSIONS:
            check("compression", False, f"must be one of {', '.join(COMPRESSIONS)}")
        elif self.compression != "none" and self.running:
            check("compression", False, "needs window mode (a running average is one slot)")
        elif self.compression != "none" and self.dtype != "float32":
            check("compression", False, "keeps its base snapshot in float32: set pma.dtype")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict that :meth:`from_dict` reads back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, section: str = "pma") -> PMAConfig:
        """Build from a mapping; unknown keys are an error naming the closest known key."""
        if not isinstance(values, Mapping):
            raise PMAConfigError(
                f"{section} = {values!r}: must be a mapping of PMA settings, "
                f"got {type(values).__name__}"
            )
        known = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                hints.append(f"{section}.{key}{hint}")
            raise PMAConfigError(
                f"unknown PMA config key(s): {', '.join(hints)}; allowed keys: {', '.join(known)}"
            )
        return cls(**dict(values))

    @classmethod
    def coerce(cls, value: Any, *, owner: str = "config") -> PMAConfig:
        """``value`` as a config: itself when it is one, else built from a mapping of settings
        (a YAML section, a DeepSpeed ``"pma"`` section, a trainer's keyword arguments) by
        :meth:`from_dict`. Anything else is refused naming ``owner`` and what is allowed."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        example = "PMAConfig(method='sma', window=10, interval_tokens=4_000_000_000)"
        if value is None:
            raise PMAConfigError(f"{owner}: config is required, e.g. {example}")
        raise PMAConfigError(
            f"{owner}: config = {value!r} ({type(value).__name__}) must be a PMAConfig or a "
            f"mapping of its settings, e.g. {example}"
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> PMAConfig:
        """Read a YAML file holding the settings, either at top level or under a ``pma:`` key."""
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if isinstance(data, Mapping) and isinstance(data.get("pma"), Mapping):
            data = data["pma"]
        return cls.from_dict(data if data is not None else {})

    @classmethod
    def from_deepspeed(cls, ds_config: Mapping[str, Any] | str | Path) -> PMAConfig | None:
        """Read the ``"pma"`` section of a DeepSpeed config (dict or JSON path).

        Returns ``None`` when the section is absent or has ``"enabled": false``.
        """
        if not isinstance(ds_config, Mapping):
            ds_config = json.loads(Path(ds_config).read_text())
        section = ds_config.get("pma")
        if section is None:
            return None
        config = cls.from_dict(section)
        return config if config.enabled else None
