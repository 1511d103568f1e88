"""What defines a distillation run: its settings (:class:`DistillConfig`) and its data (:class:`TrainingData`)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from torch import Tensor

from ..spaces import require_finite
from .conditioning import Cond, cond_tensors

CONSISTENCY_OBJECTIVES = ("lcm", "tdd", "segmented")
OBJECTIVES = (*CONSISTENCY_OBJECTIVES, "dmd")
_CONSISTENCY = {"lr": 1e-4, "weight_decay": 0.0, "grad_clip": 1.0}
# Per-objective defaults, from the official scripts (see objectives.py, dmd.py and DESIGN.md §3).
# DMD2 (LoRA SDXL run): lr 5e-5, AdamW weight decay 0.01, max_grad_norm 10; its guidance is `guidance_scale`.
OBJECTIVE_DEFAULTS = {
    "lcm": {"guidance_min": 3.0, "guidance_max": 15.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0,
            **_CONSISTENCY},
    "tdd": {"guidance_min": 3.5, "guidance_max": 3.5, "num_ddim_timesteps": 250, "empty_prompt_proportion": 0.2,
            **_CONSISTENCY},
    "segmented": {"guidance_min": 4.0, "guidance_max": 5.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0,
                  **_CONSISTENCY},
    "dmd": {"guidance_min": 0.0, "guidance_max": 0.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0,
            "lr": 5e-5, "weight_decay": 0.01, "grad_clip": 10.0},
}

_T = TypeVar("_T")


class _ObjectiveDefault(Generic[_T]):
    """A setting given as ``None`` for the objective's default: :meth:`DistillConfig.__post_init__` fills it in,
    so after construction it reads as ``_T`` (a dataclass field typed by this descriptor)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    @overload
    def __get__(self, instance: None, owner: type) -> None: ...
    @overload
    def __get__(self, instance: object, owner: type) -> _T: ...
    def __get__(self, instance: object | None, owner: type) -> _T | None:
        # on the class: ``None``, the field's default (see "Descriptor-typed fields" in the dataclasses docs)
        return None if instance is None else getattr(instance, self._slot)

    def __set__(self, instance: object, value: _T | None) -> None:
        setattr(instance, self._slot, value)


@dataclass
class DistillConfig:
    """Everything that defines a distillation run (JSON-serialisable; ``None`` = objective default).

    Guidance values use the LCM formulation ``x0_c + w (x0_c - x0_u)``; ComfyUI's cfg = w + 1. The
    ``dmd`` objective's real score uses ``guidance_scale`` instead, as a CFG scale (ComfyUI's cfg).
    """

    objective: str = "lcm"
    steps: int = 1000
    lr: _ObjectiveDefault[float] = _ObjectiveDefault()
    weight_decay: _ObjectiveDefault[float] = _ObjectiveDefault()
    rank: int = 64
    alpha: _ObjectiveDefault[float] = _ObjectiveDefault()
    target_layers: tuple[str, ...] = ("Linear", "Conv2d")
    name_filter: str | None = None
    skip_small_layers: bool = False
    batch: int = 1
    guidance_min: _ObjectiveDefault[float] = _ObjectiveDefault()
    guidance_max: _ObjectiveDefault[float] = _ObjectiveDefault()
    loss: str = "huber"
    huber_c: float = 0.001
    grad_clip: _ObjectiveDefault[float] = _ObjectiveDefault()
    num_ddim_timesteps: _ObjectiveDefault[int] = _ObjectiveDefault()
    timestep_scaling: float = 10.0
    empty_prompt_proportion: _ObjectiveDefault[float] = _ObjectiveDefault()
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
    # -- dmd (see dmd.py) --
    guidance_scale: float = 1.75
    ttur: int = 5
    generator_steps: int = 4
    generator_timesteps: tuple[int, ...] | None = None
    backward_simulation: bool = True
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    fake_lr: float | None = None
    balance_generator_steps: bool = True
    gan_features: str | None = None
    gan_generator_weight: float = 5e-3
    gan_classifier_weight: float = 1e-2
    regression_weight: float = 0.0
    regression_pairs: int = 256

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
            raise ValueError(f"guidance range must satisfy 0 <= min <= max, got "
                             f"[{self.guidance_min}, {self.guidance_max}]")
        if not 0 <= self.empty_prompt_proportion <= 1:
            raise ValueError(f"empty_prompt_proportion must be in [0, 1], got {self.empty_prompt_proportion}")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss must be 'huber' or 'l2', got {self.loss!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = only at the end), got {self.save_every}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self._check_dmd()

    def _check_dmd(self) -> None:
        """The dmd settings (checked for every objective: a config is valid or not on its own)."""
        if self.fake_lr is None and self.objective == "dmd":
            self.fake_lr = self.lr
        if self.generator_timesteps is not None:
            self.generator_timesteps = tuple(self.generator_timesteps)
            if len(self.generator_timesteps) != self.generator_steps:
                raise ValueError(f"generator_timesteps has {len(self.generator_timesteps)} entries for "
                                 f"generator_steps={self.generator_steps}; give one timestep per generator step")
        if not self.guidance_scale > 0:
            raise ValueError(f"guidance_scale (the real score's CFG scale, ComfyUI cfg) must be > 0, "
                             f"got {self.guidance_scale}")
        if isinstance(self.ttur, bool) or not isinstance(self.ttur, int) or self.ttur < 1:
            raise ValueError(f"ttur (fake-score updates per generator update) must be a whole number >= 1, "
                             f"got {self.ttur!r}")
        steps = self.generator_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"generator_steps must be a whole number >= 1, got {self.generator_steps!r}")
        if not 0 <= self.min_step_percent <= self.max_step_percent <= 1:
            raise ValueError(f"the noise-level range must satisfy 0 <= min_step_percent <= max_step_percent <= 1, got "
                             f"[{self.min_step_percent}, {self.max_step_percent}]")
        if self.fake_lr is not None and not self.fake_lr > 0:
            raise ValueError(f"fake_lr must be > 0, got {self.fake_lr!r}")
        if not (self.gan_generator_weight >= 0 and self.gan_classifier_weight >= 0):
            raise ValueError(f"GAN weights must be >= 0, got {self.gan_generator_weight!r} and "
                             f"{self.gan_classifier_weight!r}")
        if not (isinstance(self.regression_weight, (int, float)) and 0 <= self.regression_weight < math.inf):
            raise ValueError(f"regression_weight (DMD's paired ODE regression; 0 = off) must be a finite number >= 0, "
                             f"got {self.regression_weight!r}")
        pairs = self.regression_pairs
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
            raise ValueError(f"regression_pairs (teacher ODE noise-sample pairs) must be a whole number >= 1, "
                             f"got {pairs!r}")

    def to_dict(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
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
