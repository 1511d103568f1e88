"""Diffusion-target (DT) visualisation: the predicted clean sample at every sampling step.

Gandikota & Bau decode the model's prediction of ``x0`` at each step (the "diffusion target")
next to the noisy latent ``x_t``: a distilled model commits to its final layout in the first
step, a base model refines it over many. :class:`StepTrace` records both from k-diffusion
callbacks (also across the two phases of a hybrid run); :func:`trace_grid` lays the decoded
tiles out as one picture, one row per step.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..spaces import NoiseSpace


@dataclass(frozen=True)
class TraceStep:
    """One recorded step: ``x_t`` scaled to unit variance (``x / sqrt(a^2 + b^2)``, what an EPS model
    sees, comparable across noise conventions) and the predicted ``x0``; float32 on the CPU. ``phase`` names
    the model that ran the step in a hybrid run (:data:`~distill_core.sampling.hybrid.BASE` / ``DISTILLED``),
    empty otherwise."""

    step: int
    sigma: float
    kind: str
    x_t: Tensor
    x0: Tensor
    phase: str = ""


class StepTrace:
    """Records ``x_t`` and the predicted ``x0`` of the first ``max_items`` batch items at every step.

    A step recorded twice keeps the later record; :meth:`reset` starts a new run.
    """

    def __init__(self, max_items: int = 8) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self._steps: dict[int, TraceStep] = {}

    def reset(self) -> None:
        self._steps.clear()

    @property
    def steps(self) -> list[TraceStep]:
        """The recorded steps in step order."""
        return [self._steps[i] for i in sorted(self._steps)]

    def record(self, step: int, sigma: Tensor | float, x: Tensor, denoised: Tensor, space: NoiseSpace,
               phase: str = "") -> None:
        """Keep ``x`` (at ``sigma`` of ``space``) and ``denoised`` of step ``step``, run by the model ``phase``."""
        sigma = float(sigma)
        a, b = space.coefficients(sigma)
        scale = float(1 / (a**2 + b**2).sqrt())
        self._steps[int(step)] = TraceStep(
            int(step), sigma, space.kind,
            (x[: self.max_items].detach().float() * scale).cpu(),
            denoised[: self.max_items].detach().float().cpu(),
            phase,
        )

    def callback(self, space: NoiseSpace | None = None) -> Callable[[dict[str, Any]], None]:
        """A k-diffusion callback that records each step; the step's ``"space"`` and ``"phase"`` entries (set by
        :func:`~distill_core.sampling.hybrid.sample_hybrid`) override ``space`` and name the model."""

        def record_step(info: dict[str, Any]) -> None:
            step_space = info.get("space", space)
            if step_space is None:
                raise ValueError("the callback needs the noise space: pass one or record a hybrid run")
            self.record(info["i"], info["sigma"], info["x"], info["denoised"], step_space, info.get("phase", ""))

        return record_step


def _decode_tiles(latents: Tensor, decode: Callable[[Tensor], Tensor]) -> Tensor:
    """Tiles ``(m, th, tw, 3)`` of latents ``(m, C, h, w)``; video latents ``(m, C, T, h, w)`` decode to frames
    ``(m, F, th, tw, 3)`` (a video VAE may give ``F != T``), put side by side (``(m, th, F * tw, 3)``)."""
    if latents.ndim not in (4, 5):
        raise ValueError("trace latents must be images (B, C, H, W) or videos (B, C, T, H, W), got "
                         f"{tuple(latents.shape)}")
    tiles = decode(latents).float().cpu()
    if latents.ndim == 4:
        return tiles
    return tiles.movedim(1, 2).flatten(2, 3)


def trace_grid(
    steps: Sequence[TraceStep],
    decode: Callable[[Tensor], Tensor],
    max_items: int = 4,
    gap: int = 2,
    background: float = 1.0,
    phase_colours: Mapping[str, tuple[float, float, float]] | None = None,
) -> Tensor:
    """One ``(H, W, 3)`` picture of a trace: a row per step, for each of the first ``max_items`` batch
    items a column pair ``x_t | x0``, tiles ``gap`` pixels apart on a ``background`` grey level.

    ``decode`` maps latents ``(m, C, h, w)`` to images ``(m, th, tw, 3)`` in [0, 1], video latents
    ``(m, C, T, h, w)`` to frames ``(m, F, th, tw, 3)`` (shown side by side); all tiles are decoded in one
    call. With ``phase_colours`` each row starts with a bar in the colour of the model that ran the step
    (:attr:`TraceStep.phase`; background for a phase without a colour).
    """
    if not steps:
        raise ValueError("the trace is empty: run the sampler that records it first")
    items = min(max_items, steps[0].x0.shape[0])
    latents = torch.cat([torch.cat([step.x_t[:items], step.x0[:items]]) for step in steps])
    tiles = _decode_tiles(latents, decode)
    tile_h, tile_w = tiles.shape[1:3]
    rows, columns = len(steps), 2 * items
    bar = 0 if phase_colours is None else max(2, tile_h // 8) + gap
    canvas = torch.full((rows * (tile_h + gap) - gap, bar + columns * (tile_w + gap) - gap, 3), background)
    for row, step in enumerate(steps):
        top = row * (tile_h + gap)
        if phase_colours is not None and step.phase in phase_colours:
            canvas[top : top + tile_h, : bar - gap] = torch.tensor(phase_colours[step.phase])
        for item in range(items):
            for part in range(2):  # 0: x_t, 1: x0
                tile = tiles[row * 2 * items + part * items + item]
                left = bar + (2 * item + part) * (tile_w + gap)
                canvas[top : top + tile_h, left : left + tile_w] = tile
    return canvas
