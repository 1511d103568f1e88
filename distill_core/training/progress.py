"""What a training run reports while it runs: the step, the loss per series (raw and smoothed), the time left.

One :class:`TrainingProgress` serves the ComfyUI node (its progress text, the live chart's events and the
history in its UI output) and the headless runner's terminal lines, so both show the same numbers.
The smoothed loss is an exponential moving average with bias correction (as in Adam's moment estimates):
``m_t = beta m_{t-1} + (1 - beta) loss_t``, shown as ``m_t / (1 - beta^n)`` after ``n`` values.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

EMA_BETA = 0.95  # about the last 20 steps (1 / (1 - beta))


def format_duration(seconds: float) -> str:
    """``"1h 05m"``, ``"2m 07s"`` or ``"9s"``."""
    total = max(0, round(seconds))
    hours, minutes, rest = total // 3600, total % 3600 // 60, total % 60
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {rest:02d}s"
    return f"{rest}s"


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a missing or non-finite value is sent as null."""
    return value if math.isfinite(value) else None


@dataclass
class _Series:
    """One loss series: the raw value and the smoothed value at every step of the run (NaN: no value)."""

    raw: list[float] = field(default_factory=list)
    ema: list[float] = field(default_factory=list)
    moment: float = 0.0
    count: int = 0

    def add(self, value: float, beta: float) -> None:
        if math.isfinite(value):
            self.moment = beta * self.moment + (1 - beta) * value
            self.count += 1
        self.raw.append(value)
        self.ema.append(self.moment / (1 - beta**self.count) if self.count and math.isfinite(value) else math.nan)


@dataclass
class TrainingProgress:
    """Progress of a run of ``steps`` optimizer steps that starts after step ``first_step - 1`` (a resumed run).

    Call :meth:`update` after every step with that step's loss per series (``{"loss": value}``; a run with
    several losses, e.g. a generator and a critic, names each; a series without a value this step is left out).
    """

    steps: int
    first_step: int = 1
    beta: float = EMA_BETA
    clock: Callable[[], float] = time.monotonic
    series: dict[str, _Series] = field(default_factory=dict)
    step: int = 0

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.step = self.first_step - 1

    def update(self, step: int, losses: dict[str, float]) -> None:
        """Record 1-based ``step`` (the next one) and its losses."""
        if step != self.step + 1:
            raise ValueError(f"step {step} follows step {self.step}; steps must come one by one")
        for name in losses.keys() - self.series.keys():
            missing = [math.nan] * (step - self.first_step)
            self.series[name] = _Series(raw=list(missing), ema=list(missing))
        for name, values in self.series.items():
            values.add(float(losses.get(name, math.nan)), self.beta)
        self.step = step

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.started

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the mean time per step of this run so far (None before the first step)."""
        done = self.step - self.first_step + 1
        return self.elapsed_s / done * (self.steps - self.step) if done > 0 else None

    def latest(self, name: str) -> tuple[float, float]:
        """The last finite raw value of a series and its smoothed value then."""
        values = self.series[name]
        for raw, ema in zip(reversed(values.raw), reversed(values.ema), strict=True):
            if math.isfinite(raw):
                return raw, ema
        return math.nan, math.nan

    def text(self) -> str:
        """One line: ``step 120/300 · loss 0.0123 (smoothed 0.0150) · ETA 1m 12s`` (``done in ...`` at the end)."""
        parts = [f"step {self.step}/{self.steps}"]
        for name in self.series:
            raw, ema = self.latest(name)
            parts.append(f"{name} {raw:.4g} (smoothed {ema:.4g})")
        if self.step >= self.steps:
            parts.append(f"done in {format_duration(self.elapsed_s)}")
        elif self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        return " · ".join(parts)

    def event(self) -> dict:
        """The live chart's message for the last step (JSON-safe)."""
        last = {name: (values.raw[-1], values.ema[-1]) for name, values in self.series.items()}
        eta = self.eta_s
        return {"step": self.step, "steps": self.steps,
                "losses": {name: _finite_or_none(raw) for name, (raw, _) in last.items()},
                "ema": {name: _finite_or_none(ema) for name, (_, ema) in last.items()},
                "eta_s": None if eta is None else round(eta, 1), "elapsed_s": round(self.elapsed_s, 1)}

    def history(self) -> dict:
        """The whole run so far, for the node's UI output (the chart rebuilds itself from it)."""
        return {"steps": self.steps, "first_step": self.first_step, "elapsed_s": round(self.elapsed_s, 1),
                "losses": {name: [_finite_or_none(v) for v in values.raw] for name, values in self.series.items()},
                "ema": {name: [_finite_or_none(v) for v in values.ema] for name, values in self.series.items()}}
