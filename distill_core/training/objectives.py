"""Consistency-distillation objectives: which outputs of student and target are compared.

All three objectives share one training step (see :mod:`distill_core.training.trainer`): a clean
latent is noised to a DDIM-grid timestep ``t`` (``grid = (1..N) * (T // N) - 1``), the
teacher takes one CFG DDIM step to ``t_prev = max(t - T // N, 0)``, the student sees
``x_t`` and the target (the student without gradient) sees ``x_prev``. They differ only in
the consistency output compared by the loss, read from the official training scripts:

* ``"lcm"`` (diffusers ``train_lcm_distill_lora_*``): ``c_skip(t) x_t + c_out(t) x0`` with
  ``c_skip = 0.25 / ((10 t)^2 + 0.25)``, ``c_out = 10 t / sqrt((10 t)^2 + 0.25)``.
* ``"tdd"`` (RedAIGC Target-Driven-Distillation ``train_tdd.py``): both jump (DDIM, with
  their own x0 and eps) to a target timestep ``s`` below ``t_prev``: take the largest
  timestep ``u <= t_prev`` among the union of the 4..8-step grids (with 0 added and the top
  timestep dropped), pick one of those grid timesteps in ``[u - 260, u]`` uniformly, then
  ``s = floor((1 - U * 0.3) * pick)``. No boundary scalings.
* ``"segmented"`` (Phased/Trajectory-Segmented consistency, PCM ``train_pcm_lora``): the
  N grid indices are cut into k segments starting at ``floor(linspace(0, N, k))``; both jump
  to the lower edge of the segment holding ``t``. When the teacher step lands exactly on that
  edge (``t`` is the first grid point of its segment) the target is ``x_prev`` itself.

Latents are compared in variance-preserving scale (``x / sqrt(a^2 + b^2)`` for
``x = a x0 + b eps``), as the scripts do, so the loss has the same magnitude in every space.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling.lcm import lcm_boundary_scalings
from ..spaces import NoiseSpace, per_sample


def ddim_timesteps(num_ddim_timesteps: int, num_train_timesteps: int) -> Tensor:
    """The skipping grid ``(1..N) * (T // N) - 1`` (ascending, int64): 50 -> 19, 39, ..., 999."""
    step = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * step - 1


def evenly_picked(grid: Tensor, steps: int) -> Tensor:
    """``steps`` timesteps read top-down from ``grid`` at ``floor(linspace(0, N, steps))``."""
    descending = grid.flip(0)
    indices = torch.floor(torch.arange(steps, dtype=torch.float64) * (len(grid) / steps)).long()
    return descending[indices]


def tdd_candidate_timesteps(grid: Tensor, min_steps: int, max_steps: int) -> Tensor:
    """Union of the ``min_steps..max_steps`` grids, ascending, with 0 prepended and the top dropped."""
    picks = torch.cat([evenly_picked(grid, steps) for steps in range(min_steps, max_steps + 1)])
    merged = torch.unique(picks)  # sorted ascending
    return torch.cat([merged.new_zeros(1), merged[:-1]])


def tdd_select_target(
    prev_timestep: Tensor, candidates: Tensor, window: int, shrink: float, generator: torch.Generator
) -> Tensor:
    """TDD's target timestep ``s`` per sample (int64), see the module docstring."""
    chosen = []
    for t_prev in prev_timestep.tolist():
        upper = candidates[candidates <= t_prev].max()
        allowed = candidates[(candidates >= max(int(upper) - window, 0)) & (candidates <= upper)]
        chosen.append(allowed[torch.randint(len(allowed), (1,), generator=generator)])
    picked = torch.cat(chosen).to(torch.float64)
    shrunk = 1 - torch.rand(picked.shape, generator=generator, dtype=torch.float64) * shrink
    return torch.floor(shrunk * picked).long()


def segment_starts(num_ddim_timesteps: int, segments: int) -> Tensor:
    """First grid index of each segment: ``floor(linspace(0, N, k, endpoint=False))``."""
    return torch.floor(torch.arange(segments, dtype=torch.float64) * (num_ddim_timesteps / segments)).long()


@dataclass(frozen=True)
class TrainingTimesteps:
    """Per-sample integer timesteps of one batch: student ``start``, teacher/target ``prev``, ``end``."""

    index: Tensor
    start: Tensor
    prev: Tensor
    end: Tensor | None = None  # where TDD / segmented outputs are compared


class ConsistencyObjective(ABC):
    """Chooses the comparison timesteps and forms the consistency outputs of student and target."""

    def __init__(self, space: NoiseSpace, num_ddim_timesteps: int) -> None:
        if not 1 <= num_ddim_timesteps <= space.num_timesteps:
            raise ValueError(f"num_ddim_timesteps must be in 1..{space.num_timesteps}, got {num_ddim_timesteps}")
        self.space = space
        self.grid = ddim_timesteps(num_ddim_timesteps, space.num_timesteps)
        self.skip = space.num_timesteps // num_ddim_timesteps

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> TrainingTimesteps:
        index = torch.randint(len(self.grid), (batch,), generator=generator)
        start = self.grid[index]
        prev = (start - self.skip).clamp(min=0)
        return TrainingTimesteps(index, start, prev, self.end_timesteps(index, prev, generator))

    def sigma(self, timestep: Tensor) -> Tensor:
        return self.space.sigma_of(timestep)

    @abstractmethod
    def end_timesteps(self, index: Tensor, prev: Tensor, generator: torch.Generator) -> Tensor | None:
        """Where the outputs are compared, or ``None`` when the objective uses boundary scalings."""

    @abstractmethod
    def student_output(self, x: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        """Consistency output of the student at ``(x_t, start)``."""

    @abstractmethod
    def target_output(self, x_prev: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        """Consistency output of the target at ``(x_prev, prev)``."""


class LCMObjective(ConsistencyObjective):
    def __init__(self, space: NoiseSpace, num_ddim_timesteps: int, timestep_scaling: float = 10.0) -> None:
        super().__init__(space, num_ddim_timesteps)
        self.timestep_scaling = timestep_scaling

    def end_timesteps(self, index: Tensor, prev: Tensor, generator: torch.Generator) -> None:
        return None

    def _boundary_output(self, x: Tensor, x0: Tensor, timestep: Tensor) -> Tensor:
        c_skip, c_out = lcm_boundary_scalings(timestep, self.timestep_scaling)
        return per_sample(c_skip, x) * self.space.vp_scaled(x, self.sigma(timestep)) + per_sample(c_out, x) * x0

    def student_output(self, x: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        return self._boundary_output(x, x0, steps.start)

    def target_output(self, x_prev: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        return self._boundary_output(x_prev, x0, steps.prev)


class _JumpObjective(ConsistencyObjective):
    """Outputs are DDIM jumps to ``steps.end``, compared in variance-preserving scale."""

    def _jump(self, x: Tensor, x0: Tensor, timestep: Tensor, steps: TrainingTimesteps) -> Tensor:
        if steps.end is None:
            raise ValueError("jump objectives compare at steps.end; these timesteps have none "
                             "(draw them with this objective's sample_timesteps)")
        sigma_end = self.sigma(steps.end)
        return self.space.vp_scaled(self.space.ddim(x, x0, self.sigma(timestep), sigma_end), sigma_end)

    def student_output(self, x: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        return self._jump(x, x0, steps.start, steps)

    def target_output(self, x_prev: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        return self._jump(x_prev, x0, steps.prev, steps)


class TDDObjective(_JumpObjective):
    def __init__(
        self, space: NoiseSpace, num_ddim_timesteps: int, window: int = 260, shrink: float = 0.3,
        min_steps: int = 4, max_steps: int = 8,
    ) -> None:
        super().__init__(space, num_ddim_timesteps)
        if not 1 <= min_steps <= max_steps <= num_ddim_timesteps:
            raise ValueError(f"TDD step range must satisfy 1 <= min <= max <= {num_ddim_timesteps}, "
                             f"got {min_steps}..{max_steps}")
        self.candidates = tdd_candidate_timesteps(self.grid, min_steps, max_steps)
        self.window = window
        self.shrink = shrink

    def end_timesteps(self, index: Tensor, prev: Tensor, generator: torch.Generator) -> Tensor:
        return tdd_select_target(prev, self.candidates, self.window, self.shrink, generator)


class SegmentedObjective(_JumpObjective):
    def __init__(self, space: NoiseSpace, num_ddim_timesteps: int, segments: int) -> None:
        super().__init__(space, num_ddim_timesteps)
        if not 1 <= segments <= num_ddim_timesteps:
            raise ValueError(f"segments must be in 1..{num_ddim_timesteps}, got {segments}")
        self.starts = segment_starts(num_ddim_timesteps, segments)
        # Timestep of each segment's lower edge: the grid point below its first index (0 for the last).
        below = torch.cat([self.grid.new_zeros(1), self.grid[:-1]])
        self.edge_timesteps = below[self.starts]

    def segment_of(self, index: Tensor) -> Tensor:
        return torch.searchsorted(self.starts, index, right=True) - 1

    def end_timesteps(self, index: Tensor, prev: Tensor, generator: torch.Generator) -> Tensor:
        return self.edge_timesteps[self.segment_of(index)]

    def target_output(self, x_prev: Tensor, x0: Tensor, steps: TrainingTimesteps) -> Tensor:
        on_edge = torch.isin(steps.index, self.starts).to(x_prev.device)
        jumped = super().target_output(x_prev, x0, steps)
        unchanged = self.space.vp_scaled(x_prev, self.sigma(steps.prev))
        return torch.where(on_edge.reshape(-1, *([1] * (x_prev.ndim - 1))), unchanged, jumped)


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """``mean(sqrt((pred - target)^2 + c^2) - c)`` (LCM / TDD / PCM ``loss_type="huber"``)."""
    return (((pred - target) ** 2 + c**2).sqrt() - c).mean()


def consistency_loss(pred: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """Loss between consistency outputs, computed in at least float32."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    if kind == "huber":
        return pseudo_huber(pred, target, huber_c)
    if kind == "l2":
        return torch.nn.functional.mse_loss(pred, target)
    raise ValueError(f"loss must be 'huber' or 'l2', got {kind!r}")
