"""Progress and Cancel for long phases, without a host.

A long phase (the teacher's data pool, image encoding, an export, a checkpoint write) tells the host
``on_phase(phase, done, total)`` as it goes and, when it can be cancelled, polls ``should_stop()``
before each unit of work. A unit is one model call or one chunk of a file, so a phase stops within
one unit of a Cancel: :class:`Cancelled` is raised before the next unit starts, and a phase that
writes a file writes it atomically (:mod:`distill_core.safe_files`), so a cancelled phase leaves
nothing half-written. The host maps this onto its own progress display (ComfyUI: the node's
progress bar and the live chart's panel).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

PhaseCallback = Callable[[str, int, int], None]
"""``on_phase(phase, done, total)``: ``done`` of ``total`` units of ``phase`` are finished."""
StopPoll = Callable[[], bool]
"""``should_stop() -> bool``: true once the host wants the run to stop (Cancel)."""

# Phase names (what the host shows) and what each counts.
POOL = "teacher data pool"
ENCODE = "encoding images"
EXPORT = "headless export"
CHECKPOINT = "writing checkpoint"
UNITS = {POOL: "teacher calls", ENCODE: "images", EXPORT: "MiB", CHECKPOINT: "MiB"}

MIB = 1 << 20
T = TypeVar("T")


class Cancelled(Exception):
    """The host asked a phase to stop; what the phase was going to write was not written."""

    def __init__(self, phase: str, done: int, total: int) -> None:
        super().__init__(f"{phase} cancelled after {done} of {total}")
        self.phase, self.done, self.total = phase, done, total


class Phase:
    """One long phase: reports ``(name, done, total)`` and, if ``cancellable``, raises :class:`Cancelled` on request.

    The host hears ``(name, 0, total)`` when the phase starts and after every :meth:`advance`.
    """

    def __init__(self, name: str, total: int, on_phase: PhaseCallback | None = None,
                 should_stop: StopPoll | None = None, cancellable: bool = True) -> None:
        if total < 0:
            raise ValueError(f"a phase needs a total >= 0, got {total}")
        self.name, self.total, self.done = name, total, 0
        self._on_phase = on_phase
        self._should_stop = should_stop if cancellable else None
        self._report()

    def _report(self) -> None:
        if self._on_phase is not None:
            self._on_phase(self.name, self.done, self.total)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the host asked to stop (call before starting a unit)."""
        if self._should_stop is not None and self._should_stop():
            raise Cancelled(self.name, self.done, self.total)

    def advance(self, units: int = 1) -> None:
        """``units`` more are finished (never past ``total``)."""
        self.done = min(self.total, self.done + units)
        self._report()

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, checking for Cancel before each and counting it done after."""
        for item in items:
            self.check()
            yield item
            self.advance()

    def bytes_written(self, written: int, size: int) -> None:
        """A write callback (``safe_files.write_atomically``'s ``on_chunk``) counting whole MiB."""
        self.check()
        self.done = min(self.total, -(-written // MIB))
        self._report()


class Progress:
    """Where a run reports its phases and hears about Cancel (both optional)."""

    def __init__(self, on_phase: PhaseCallback | None = None, should_stop: StopPoll | None = None) -> None:
        self.on_phase = on_phase
        self.should_stop = should_stop

    def phase(self, name: str, total: int, cancellable: bool = True) -> Phase:
        return Phase(name, total, self.on_phase, self.should_stop, cancellable)

    def write_phase(self, name: str, size: int, cancellable: bool = True) -> Phase:
        """A phase counting the MiB of a ``size``-byte write."""
        return self.phase(name, -(-size // MIB), cancellable)
