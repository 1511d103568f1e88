"""What defines a distillation run: its settings (:class:`DistillConfig`) and its data (:class:`TrainingData`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..spaces import require_finite
from .conditioning import Cond, cond_tensors

OBJECTIVES = ("lcm", "tdd", "segmented")
# Per-objective defaults, from the official scripts (see objectives.py and DESIGN.md §3).
OBJECTIVE_DEFAULTS = {
    "lcm": {"guidance_min": 3.0, "guidance_max": 15.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0},
    "tdd": {"guidance_min": 3.5, "guidance_max": 3.5, "num_ddim_timesteps": 250, "empty_prompt_proportion": 0.2},
    "segmented": {"guidance_min": 4.0, "guidance_max": 5.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0},
}

@dataclass
class DistillConfig:
    """Everything that defines a distillation run (JSON-serialisable; ``None`` = objective default).

    Guidance values use the LCM formulation ``x0_c + w (x0_c - x0_u)``; ComfyUI's cfg = w + 1.
    """

    objective: str = "lcm"
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    rank: int = 64
    alpha: float | None = None
    target_layers: tuple[str, ...] = ("Linear", "Conv2d")
    name_filter: str | None = None
    skip_small_layers: bool = False
    batch: int = 1
    guidance_min: float | None = None
    guidance_max: float | None = None
    loss: str = "huber"
    huber_c: float = 0.001
    grad_clip: float = 1.0
    num_ddim_timesteps: int | None = None
    timestep_scaling: float = 10.0
    empty_prompt_proportion: float | None = None
    tdd_shrink: float = 0.3
    tdd_window: int = 260
    tdd_min_steps: int = 4
    tdd_max_steps: int = 8
    segments: int = 4
    seed: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 0
    data_free_samples: int = 16
    data_free_steps: int = 8
    data_free_guidance: float = 4.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name, value in OBJECTIVE_DEFAULTS[self.objective].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.alpha is None:
            self.alpha = float(self.rank)
        self.target_layers = tuple(self.target_layers)
        positive = {"steps": self.steps, "lr": self.lr, "rank": self.rank, "alpha": self.alpha, "batch": self.batch,
                    "huber_c": self.huber_c, "grad_clip": self.grad_clip, "data_free_samples": self.data_free_samples,
                    "data_free_steps": self.data_free_steps}
        bad = [f"{name}={value!r}" for name, value in positive.items() if not value > 0]
        if bad:
            raise ValueError(f"these settings must be > 0: {', '.join(bad)}")
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"guidance range must satisfy 0 <= min <= max, got [{self.guidance_min}, {self.guidance_max}]")
        if not 0 <= self.empty_prompt_proportion <= 1:
            raise ValueError(f"empty_prompt_proportion must be in [0, 1], got {self.empty_prompt_proportion}")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss must be 'huber' or 'l2', got {self.loss!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = only at the end), got {self.save_every}")

    def to_dict(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distillation settings: {unknown}")
        return cls(**values)


# Settings that may change between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("steps", "save_every")


@dataclass
class TrainingData:
    """Conditionings (each with batch size 1), the unconditional one, and latents or a shape.

    ``latents`` (N, ...) are in the denoiser's space. Without latents the run is data-free and
    ``latent_shape`` (without batch) is required. ``paired`` ties ``latents[i]`` to ``conds[i]``;
    otherwise each sample draws its conditioning independently.
    """

    conds: Sequence[Cond]
    uncond: Cond
    latents: Tensor | None = None
    latent_shape: tuple[int, ...] | None = None
    paired: bool = False

    def __post_init__(self) -> None:
        if not self.conds:
            raise ValueError("at least one conditioning is required")
        if self.latents is None and self.latent_shape is None:
            raise ValueError("give latents, or latent_shape for data-free training")
        if self.latents is not None and len(self.latents) == 0:
            raise ValueError("latents must hold at least one sample")
        if self.paired and (self.latents is None or len(self.latents) != len(self.conds)):
            raise ValueError("paired data needs exactly one conditioning per latent")
        if self.latents is not None:
            require_finite(self.latents, "the training latents")
        for index, cond in enumerate([*self.conds, self.uncond]):
            for tensor in cond_tensors(cond):
                if tensor.is_floating_point():
                    require_finite(tensor, "the empty prompt's conditioning tensors" if index == len(self.conds)
                                   else f"the conditioning tensors of prompt {index + 1}")
