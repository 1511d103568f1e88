"""Dynamic loss scaling for networks that compute in float16.

float16 has 5 exponent bits: gradients below 2^-14 lose precision and below 2^-24 vanish. The
distillation loss is a mean over every latent element, so its gradient per element is about
``1 / (batch * C * H * W)``: 1.5e-5 for a batch of 4 at 64x64 latents, already below float16's
smallest normal number. Backward on ``S * loss`` keeps those gradients representable; dividing the
LoRA's float32 gradients by ``S`` (a power of two, so exactly) restores their value.

The rule is PyTorch's ``torch.amp.GradScaler`` (pytorch/pytorch, ``torch/amp/grad_scaler.py``, read
as installed with torch 2.14.1): ``S`` starts at 2^16; a step whose gradients hold inf/NaN is skipped and
``S`` is multiplied by 0.5; after 2000 consecutive finite steps ``S`` is multiplied by 2. Unlike
GradScaler, a run whose gradients are still not finite at ``S <= 1`` is reported as diverged (no
scale helps it). Disabled (float32/bfloat16 networks) it scales nothing and reports any non-finite
gradient as diverged, as the trainer did before.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


class DynamicLossScale:
    """The loss scale ``S`` of one run and the count of finite steps since it last changed."""

    STEP, SKIP, DIVERGED = "step", "skip", "diverged"

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = enabled  # None: the trainer decides at its first step (on when the network computes in float16)
        self.scale = INIT_SCALE
        self.good_steps = 0

    def scaled(self, loss: Tensor) -> Tensor:
        """``S * loss`` when enabled (call ``backward`` on this), else ``loss``."""
        return loss * self.scale if self.enabled else loss

    def unscale_(self, grads: Sequence[Tensor]) -> str:
        """Divide ``grads`` by ``S`` in place and update ``S``; says whether to step, skip or stop.

        :attr:`STEP`: the gradients are finite (and now unscaled). :attr:`SKIP`: they overflowed at
        this scale; ``S`` was halved, the optimizer must not step. :attr:`DIVERGED`: not finite even at
        ``S <= 1`` (or scaling is off).
        """
        finite = all(bool(torch.isfinite(grad).all()) for grad in grads)
        if not self.enabled:
            return self.STEP if finite else self.DIVERGED
        if not finite:
            if self.scale <= 1.0:
                return self.DIVERGED
            self.scale *= BACKOFF_FACTOR
            self.good_steps = 0
            return self.SKIP
        inverse = 1.0 / self.scale
        for grad in grads:
            grad.mul_(inverse)
        self.good_steps += 1
        if self.good_steps == GROWTH_INTERVAL:
            self.scale *= GROWTH_FACTOR
            self.good_steps = 0
        return self.STEP

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps, so a resumed run scales exactly as the uninterrupted one."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state(self, state: dict[str, float] | None) -> None:
        """Restore :meth:`state` (``None``: a checkpoint from before loss scaling; keep the start values)."""
        if state is not None:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
