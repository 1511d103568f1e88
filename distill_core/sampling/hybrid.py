"""Diversity distillation: hybrid sampling with a base model first and a distilled model after.

Gandikota & Bau ("Distilling Diversity and Control in Diffusion Models") find that distilled
few-step models lose diversity in their first step, where the layout of the image is decided,
while the later steps only refine it. Hybrid sampling runs the base model (its own sampler and
CFG) for the first ``handover_steps`` steps of a shared schedule and the distilled model (its own
sampler, usually CFG 1) for the rest. The paper's setting is one base step on the 4-step LCM
schedule: base at timestep 999, distilled at 759, 499 and 259.

The same machinery hands over between the two experts of Wan 2.2 A14B (high-noise expert first, low-noise
expert after a sigma boundary, :func:`handover_steps_at`).

The hand-over is the base sampler's own step to ``sigmas[k]``: for DDIM, Euler and LCM-type steps
(and any sampler whose first ``k`` steps do not look at later sigmas) that is exactly the latent the
base sampler alone holds at step ``k``. When the two models use different noise conventions (an EPS
base and a flow student, or the reverse) the latent and the remaining sigmas are converted at equal
signal-to-noise ratio (:func:`~distill_core.spaces.convert_sigmas`, :func:`~distill_core.spaces.convert_latent`).

Per-step noise: each phase's sampler draws its own (Stride's and ComfyUI's samplers seed a private
generator from ``extra_args["seed"]``). The base phase gets ``seed``; the distilled phase gets
:func:`handover_seed` ``(seed)``, so it never replays the base phase's noise, except with
``handover_steps = 0``, where it is the whole run and gets ``seed`` itself. Hence ``handover_steps = 0``
is exactly the distilled sampler and ``handover_steps = len(sigmas) - 1`` exactly the base sampler.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..spaces import NoiseSpace, convert_latent, convert_sigmas

HANDOVER_SEED_OFFSET = 0x9E3779B97F4A7C15
"""Added (mod 2^64) to the seed of the distilled phase; the golden-ratio constant keeps it far from
neighbouring seeds, so runs with seeds s and s + 1 share no noise either."""

KDiffusionCallback = Callable[[dict[str, Any]], None]
BASE, DISTILLED = "base", "distilled"
"""The phase names a hybrid run reports per step (``"phase"`` in the callback; Wan 2.2: high- and low-noise expert)."""


def handover_seed(seed: int | None) -> int | None:
    """The per-step noise seed of the distilled phase when a base phase ran before it (``None`` stays ``None``)."""
    if seed is None:
        return None
    return (int(seed) + HANDOVER_SEED_OFFSET) % 2**64


@dataclass(frozen=True)
class HybridPhase:
    """One model's part of a hybrid run.

    ``model(x, sigma_batch, **extra_args)`` returns the denoised ``x0`` in the phase's ``space``, with
    that phase's CFG already applied; ``sampler`` is a k-diffusion sampler with its options bound
    (e.g. ``functools.partial(sample_lcm, space=space)``).
    """

    model: Callable[..., Tensor]
    sampler: Callable[..., Tensor]
    space: NoiseSpace
    extra_args: Mapping[str, Any] = field(default_factory=dict)


def check_handover_steps(handover_steps: int, steps: int) -> None:
    """Raise ``ValueError`` unless ``0 <= handover_steps <= steps``."""
    if not 0 <= handover_steps <= steps:
        raise ValueError(f"handover_steps must be between 0 and the schedule's {steps} steps, got {handover_steps}")


def handover_steps_at(sigmas: Tensor, boundary: float) -> int:
    """How many leading steps of ``sigmas`` run before a hand-over at the sigma ``boundary``: those with
    ``sigma >= boundary``, in the base model's convention.

    This is Wan 2.2 A14B's expert switch: its high-noise expert runs while ``t >= boundary * 1000`` with
    ``t = 1000 sigma`` (official ``text2video.py``; boundary 0.875 for T2V, 0.9 for I2V).
    """
    if not boundary > 0:
        raise ValueError(f"the hand-over boundary must be a positive sigma, got {boundary}")
    return int((sigmas[:-1] >= boundary).sum())


def split_schedule(
    sigmas: Tensor, handover_steps: int, base_space: NoiseSpace, distilled_space: NoiseSpace
) -> tuple[Tensor, Tensor]:
    """``(sigmas[:k + 1], sigmas[k:] in the distilled space)``: the two phases' SIGMAS.

    ``sigmas`` is the shared schedule in the base model's convention. The distilled phase's sigmas
    are converted at equal signal-to-noise ratio (unchanged when both spaces are of one kind).
    """
    check_handover_steps(handover_steps, len(sigmas) - 1)
    return sigmas[: handover_steps + 1], convert_sigmas(sigmas[handover_steps:], base_space, distilled_space)


def _with_seed(extra_args: Mapping[str, Any], seed: int | None) -> dict[str, Any]:
    return dict(extra_args) if seed is None else {**extra_args, "seed": seed}


def _phase_callback(callback: KDiffusionCallback | None, step_offset: int, space: NoiseSpace,
                    phase: str) -> KDiffusionCallback | None:
    """Forward a phase's callbacks with the step counted on the whole schedule, the phase's ``space`` and name."""
    if callback is None:
        return None

    def forward(info: dict[str, Any]) -> None:
        callback({**info, "i": info["i"] + step_offset, "space": space, "phase": phase})

    return forward


def sample_hybrid(
    base: HybridPhase,
    distilled: HybridPhase,
    x: Tensor,
    sigmas: Tensor,
    handover_steps: int = 1,
    seed: int | None = None,
    callback: KDiffusionCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """Sample ``x`` (noised to ``sigmas[0]`` in the base convention) with the base phase for the first
    ``handover_steps`` steps and the distilled phase for the rest.

    The base sampler runs on ``sigmas[:k + 1]``; its result is converted to the distilled convention
    and the distilled sampler runs on the converted ``sigmas[k:]``. The result comes back in the base
    convention at ``sigmas[-1]`` (at sigma 0 both conventions are the clean sample). ``callback``
    receives k-diffusion step dictionaries with ``i`` counted over the whole schedule and an extra
    ``"space"`` entry: the phase's space, in which that step's ``x`` and ``sigma`` are given, and a ``"phase"``
    entry: :data:`BASE` or :data:`DISTILLED`, the model that ran the step.
    Seeds: see the module docstring.
    """
    steps = len(sigmas) - 1
    base_sigmas, distilled_sigmas = split_schedule(sigmas, handover_steps, base.space, distilled.space)
    if handover_steps > 0:
        x = base.sampler(
            base.model, x, base_sigmas, extra_args=_with_seed(base.extra_args, seed),
            callback=_phase_callback(callback, 0, base.space, BASE), disable=disable,
        )
    if handover_steps == steps:
        return x
    distilled_seed = seed if handover_steps == 0 else handover_seed(seed)
    x = convert_latent(x, sigmas[handover_steps], base.space, distilled.space)
    x = distilled.sampler(
        distilled.model, x, distilled_sigmas, extra_args=_with_seed(distilled.extra_args, distilled_seed),
        callback=_phase_callback(callback, handover_steps, distilled.space, DISTILLED), disable=disable,
    )
    return convert_latent(x, distilled_sigmas[-1], distilled.space, base.space)
