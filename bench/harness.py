"""Host-independent machinery of the benchmark suite: result sections, sanity checks, interleaved
timing, peak-memory measurement and the facts about the machine a run happened on.

Every benchmark follows the same discipline: build all compared paths in one process on the same
inputs, check that they compute what they should (:func:`check` raises :class:`SanityError`),
then time them with :func:`run_interleaved` (repeats alternate between the candidates, so load
changes on a shared machine hit all of them alike) and report medians, ratio first.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TIERS = ("smoke", "quick", "full")
"""Size tiers: ``smoke`` is a functional check for the test suite (its numbers mean nothing),
``quick`` fits in a few minutes on 2 CPU cores, ``full`` is the reported configuration."""


class SanityError(AssertionError):
    """A benchmark's own correctness check failed, so its speeds would be meaningless."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`SanityError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SanityError(message)


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A markdown table: a caption saying what was measured on what, column names, rows of text."""

    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells for {len(self.columns)} columns: {cells}")
        self.rows.append([str(cell) for cell in cells])

    def to_markdown(self) -> str:
        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Goal:
    """A target from the issue and whether this run met it (``met``, ``missed`` or ``undecided``)."""

    text: str
    status: str
    evidence: str

    def __post_init__(self) -> None:
        if self.status not in ("met", "missed", "undecided"):
            raise ValueError(f"goal status must be met, missed or undecided, got {self.status!r}")


@dataclass
class Section:
    """One benchmark's contribution to RESULTS.md."""

    name: str
    title: str
    summary: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------
def fmt_seconds(seconds: float) -> str:
    """A duration with a unit that keeps three significant digits (``12.3 ms``, ``450 us``)."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.3g}x"


def fmt_bytes(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def fmt_percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
Measurement = dict[str, float]
"""What one timed call reports besides its wall time (e.g. seconds spent inside model calls)."""


def run_interleaved(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[float]]]:
    """Time each candidate ``repeats`` times, alternating between them (the order rotates every
    repeat), after ``warmup`` untimed rounds. Returns, per candidate, lists of ``"wall"`` seconds
    plus every quantity of the :data:`Measurement` dict a candidate returns (any other return value
    is ignored). ``sync`` is called before and after each timed call (``torch.cuda.synchronize`` on GPU)."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": []} for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            extra = candidates[name]()
            sync()
            samples[name]["wall"].append(time.perf_counter() - start)
            if isinstance(extra, dict):
                for key, value in extra.items():
                    samples[name].setdefault(key, []).append(value)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative half-width of the middle half of ``values`` (IQR / 2 / median): a noise indicator."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / statistics.median(values)


class CallTimer:
    """Wraps a k-diffusion model callable: counts its calls and sums their wall time.

    Attribute access falls through to the wrapped model, so samplers that inspect it (e.g. to read
    ``inner_model.model_sampling``) see the original.
    """

    def __init__(self, model: Callable[..., Any], sync: Callable[[], None]) -> None:
        self.model = model
        self.sync = sync
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.sync()
        start = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def cuda_sync_for(device: torch.device | str) -> Callable[[], None]:
    """A synchronisation function for timing work on ``device`` (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_rss_available() -> bool:
    """Whether this Linux lets a process reset its peak RSS (``/proc/self/clear_refs``, value 5)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return ``(result, bytes)``: its peak resident set size above the RSS just before.

    Freed heap memory is first returned to the OS (``malloc_trim``) and the kernel's high-water
    mark is reset, so the peak belongs to this call alone. Memory the allocator reuses without the
    RSS growing is not counted (this measures what the process needed from the OS).
    """
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    before = _status_kib("VmRSS")
    result = fn()
    return result, max(0, _status_kib("VmHWM") - before) * 1024


# ------------------------------------------------------------------------------------------
# Machine
# ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(comfyui_version: str) -> dict[str, str]:
    """What a reader needs to interpret the absolute times of a run."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    facts = {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "CPU": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch threads": str(torch.get_num_threads()),
        "load average (1, 5, 15 min) at start": load,
        "Python / torch / ComfyUI": f"{platform.python_version()} / {torch.__version__} / {comfyui_version}",
    }
    if torch.cuda.is_available():
        facts["GPU"] = torch.cuda.get_device_name(0)
    return facts
