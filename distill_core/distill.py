"""In-graph LoRA consistency distillation: one training loop for LCM, TDD and segmented targets.

The network is a callable ``denoiser(x, sigma, cond) -> x0`` in a :class:`NoiseSpace`
(ComfyUI's ``BaseModel.apply_model`` has this shape). A :class:`LoraSet` is attached to it by
hooks; the *teacher* is the same network with the adapters switched off (no second copy),
its conditional and unconditional passes batched into one call; the *target* is the student
under ``no_grad`` (no EMA, as in LCM-LoRA). One step, per sample:

1. pick a DDIM-grid timestep ``t`` (``N = num_ddim_timesteps``), noise the latent to ``x_t``;
2. teacher: ``x0 = x0_c + w (x0_c - x0_u)`` with ``w ~ U[guidance_min, guidance_max]``
   (LCM formulation; ComfyUI's cfg scale is ``w + 1``), one DDIM step to ``t_prev``;
3. target: the student at ``(x_prev, t_prev)`` under ``no_grad`` (its LoRA folded into the weights
   layer by layer, :meth:`LoraSet.merged`); student at ``(x_t, t)``;
4. loss between the objectives' consistency outputs (:mod:`distill_core.objectives`),
   AdamW step on the LoRA parameters after gradient clipping.

Data: given latents (e.g. VAE-encoded images, already in the model's latent scale), or
data-free: a pool of latents generated once from the teacher's own trajectories (pure noise,
``data_free_steps`` deterministic CFG DDIM steps, final x0 estimate); the pool depends only on
the seed and the rank, so a resumed run regenerates the same pool.

Randomness of step ``k`` comes from a generator seeded by ``(seed, rank, k)``, so resuming
reproduces the uninterrupted run exactly. Under ``torch.distributed`` every rank runs this
loop on its own samples and LoRA gradients are averaged with one all-reduce per step.
Checkpoints are safetensors (LoRA, AdamW state, RNG state) with JSON metadata, never pickle.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import Tensor, nn

from .lora import LoraSet, attach_lora, lora_state_dict, load_lora_state, load_lora_state_dict, save_lora
from .objectives import (
    ConsistencyObjective,
    LCMObjective,
    SegmentedObjective,
    TDDObjective,
    TrainingTimesteps,
    consistency_loss,
    ddim_jump,
    ddim_timesteps,
    evenly_picked,
    per_sample,
)
from .spaces import NoiseSpace

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
Cond = Any  # a tensor, or a dict / list / tuple of tensors, batch first (other leaves pass through)

OBJECTIVES = ("lcm", "tdd", "segmented")
# Per-objective defaults, from the official scripts (see objectives.py and DESIGN.md §3).
OBJECTIVE_DEFAULTS = {
    "lcm": {"guidance_min": 3.0, "guidance_max": 15.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0},
    "tdd": {"guidance_min": 3.5, "guidance_max": 3.5, "num_ddim_timesteps": 250, "empty_prompt_proportion": 0.2},
    "segmented": {"guidance_min": 4.0, "guidance_max": 5.0, "num_ddim_timesteps": 50, "empty_prompt_proportion": 0.0},
}
CHECKPOINT_FORMAT = "stride-distill-checkpoint-1"
CHECKPOINT_LORA_PREFIX = "lora."


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


def attach_student_lora(module: nn.Module, config: DistillConfig) -> LoraSet:
    """The student's LoRA on ``module`` as ``config`` describes it, initialised from ``config.seed``.

    The in-graph node and the headless runner both start from these weights, so a run resumed,
    repeated or moved to ``torchrun`` begins identically; the global RNG is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return attach_lora(module, config.rank, config.alpha, config.target_layers, config.name_filter,
                           skip_small_layers=config.skip_small_layers)


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


@dataclass
class TrainResult:
    steps_done: int
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False
    checkpoint: str | None = None


class DistillDivergedError(RuntimeError):
    """The loss or the gradients became NaN/inf; the last good checkpoint was kept."""


# -- conditioning trees ---------------------------------------------------------------------
def _cond_map(fn: Callable[..., Tensor], *conds: Cond) -> Cond:
    first = conds[0]
    if isinstance(first, Tensor):
        return fn(*conds)
    if isinstance(first, dict):
        return {key: _cond_map(fn, *(cond[key] for cond in conds)) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cond_map(fn, *items) for items in zip(*conds))
    return first


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension (shapes must agree beyond it)."""
    def cat(*tensors: Tensor) -> Tensor:
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"conditionings must share their shape beyond the batch to be batched together, got {sorted(shapes)}")
        return torch.cat(tensors)
    return _cond_map(cat, *conds)


def _cond_where(mask: Tensor, replacement: Cond, cond: Cond) -> Cond:
    def where(new: Tensor, old: Tensor) -> Tensor:
        if new.shape != old.shape:
            raise ValueError(f"empty-prompt substitution needs cond and uncond of equal shape, got "
                             f"{tuple(old.shape)} and {tuple(new.shape)}")
        return torch.where(mask.to(old.device).reshape(-1, *([1] * (old.ndim - 1))), new, old)
    return _cond_map(where, replacement, cond)


def _cond_to(cond: Cond, device: torch.device) -> Cond:
    """A private copy on ``device``: host tensors may be inference tensors autograd cannot save."""
    with torch.inference_mode(False):
        return _cond_map(lambda t: t.to(device, copy=True), cond)


# -- model context helpers ------------------------------------------------------------------
@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Stop gradients into the base weights inside the block; the flags are restored after."""
    flags = [(param, param.requires_grad) for param in module.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def checkpoint_blocks(module: nn.Module) -> list[nn.Module]:
    """The highest submodules with their own ``forward`` below ``module`` (containers are opened)."""
    blocks = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or type(child) is nn.Sequential:
            blocks.extend(checkpoint_blocks(child))
        else:
            blocks.append(child)
    return blocks


@contextlib.contextmanager
def gradient_checkpointing(module: nn.Module) -> Iterator[None]:
    """Recompute each top-level block in backward instead of storing its activations.

    Each block's ``forward`` is wrapped while the block is active and restored on exit; under
    ``no_grad`` (teacher and target passes) blocks run unwrapped.
    """
    patched = []
    for block in checkpoint_blocks(module):
        original = block.forward
        had_instance_forward = "forward" in block.__dict__

        def checkpointed(*args: Any, _forward: Callable = original, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        patched.append((block, original, had_instance_forward))
    try:
        yield
    finally:
        for block, original, had_instance_forward in patched:
            if had_instance_forward:
                block.forward = original
            else:
                del block.forward


# -- distributed helpers --------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct generator seed per (seed, rank, step), stable across runs and resumes."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 0x5EED) % (2**63)


# -- checkpoints ----------------------------------------------------------------------------
@dataclass
class TrainingCheckpoint:
    step: int
    config: dict[str, Any]
    lora: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Tensor]


def save_checkpoint(path: str, loraset: LoraSet, optimizer: torch.optim.Optimizer, step: int, config: DistillConfig) -> None:
    """Write LoRA weights, AdamW state, torch RNG state(s), step and config atomically."""
    tensors = {CHECKPOINT_LORA_PREFIX + key: value for key, value in lora_state_dict(loraset, prefix="").items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device_index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device_index}"] = cuda_state
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "config": json.dumps(config.to_dict()),
        "optimizer.param_groups": json.dumps(state["param_groups"]),
        "optimizer.scalars": json.dumps(scalars),
    }
    save_lora(path, tensors, metadata)


def load_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle)."""
    tensors, metadata = load_lora_state(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Stride distillation checkpoint (format {metadata.get('format')!r})")
    lora = {key[len(CHECKPOINT_LORA_PREFIX):]: value for key, value in tensors.items() if key.startswith(CHECKPOINT_LORA_PREFIX)}
    param_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            index, name = key[len("optimizer.state."):].split(".", 1)
            param_state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata["optimizer.scalars"]).items():
        param_state.setdefault(int(index), {}).update(values)
    groups = json.loads(metadata["optimizer.param_groups"])
    for group in groups:  # JSON turns tuples (AdamW betas) into lists
        for name, value in group.items():
            if name != "params" and isinstance(value, list):
                group[name] = tuple(value)
    rng = {key[len("rng."):]: value for key, value in tensors.items() if key.startswith("rng.")}
    return TrainingCheckpoint(int(metadata["step"]), json.loads(metadata["config"]), lora,
                              {"state": param_state, "param_groups": groups}, rng)


# -- the trainer ----------------------------------------------------------------------------
def make_objective(config: DistillConfig, space: NoiseSpace) -> ConsistencyObjective:
    if config.objective == "lcm":
        return LCMObjective(space, config.num_ddim_timesteps, config.timestep_scaling)
    if config.objective == "tdd":
        return TDDObjective(space, config.num_ddim_timesteps, config.tdd_window, config.tdd_shrink,
                            config.tdd_min_steps, config.tdd_max_steps)
    return SegmentedObjective(space, config.num_ddim_timesteps, config.segments)


@dataclass
class _Batch:
    x0: Tensor
    cond: Cond
    uncond: Cond
    noise: Tensor
    guidance: Tensor
    timesteps: TrainingTimesteps


class DistillTrainer:
    """Distils ``denoiser`` into the LoRA of ``loraset``; see the module docstring."""

    def __init__(self, denoiser: Denoiser, loraset: LoraSet, space: NoiseSpace, config: DistillConfig,
                 data: TrainingData) -> None:
        ranks = {adapter.rank for adapter in loraset.adapters.values()}
        alphas = {adapter.alpha for adapter in loraset.adapters.values()}
        if ranks != {config.rank} or alphas != {float(config.alpha)}:
            raise ValueError(f"LoRA set has rank(s) {sorted(ranks)} / alpha(s) {sorted(alphas)}, "
                             f"config says rank {config.rank} / alpha {config.alpha}")
        self.denoiser = denoiser
        self.loraset = loraset
        self.space = space
        self.config = config
        self.data = data
        self.objective = make_objective(config, space)
        self.rank, self.world_size = _world()
        self.params = loraset.parameters()
        self.device = self.params[0].device
        self.conds = [_cond_to(cond, self.device) for cond in data.conds]
        self.uncond = _cond_to(data.uncond, self.device)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self._pool: Tensor | None = None

    # -- data -----------------------------------------------------------------------------
    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(_step_seed(self.config.seed, self.rank, step))

    def teacher_x0(self, x: Tensor, sigma: Tensor, cond: Cond, uncond: Cond, guidance: Tensor) -> Tensor:
        """CFG x0 of the base network: cond and uncond in one batched call, LoRA off, no grad."""
        with torch.no_grad(), self.loraset.enabled(False):
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, uncond]))
        x0_cond, x0_uncond = both.chunk(2)
        return x0_cond + per_sample(guidance, x0_cond) * (x0_cond - x0_uncond)

    def latents(self) -> Tensor:
        """Training latents: the given ones, or the data-free pool (generated once per run)."""
        if self.data.latents is not None:
            return self.data.latents
        if self._pool is None:
            self._pool = self._generate_pool()
        return self._pool

    def _generate_pool(self) -> Tensor:
        """Data-free latents: teacher CFG DDIM trajectories from pure noise, final x0 estimates."""
        config = self.config
        generator = torch.Generator().manual_seed(_step_seed(config.seed, self.rank, -1))
        timesteps = evenly_picked(ddim_timesteps(config.num_ddim_timesteps, self.space.num_timesteps),
                                  min(config.data_free_steps, config.num_ddim_timesteps))
        sigmas = self.space.sigma_of(timesteps)
        dtype = self.params[0].dtype
        samples = []
        for first in range(0, config.data_free_samples, config.batch):
            count = min(config.batch, config.data_free_samples - first)
            cond_ids = torch.randint(len(self.conds), (count,), generator=generator)
            noise = torch.randn((count, *self.data.latent_shape), generator=generator, dtype=dtype).to(self.device)
            cond = cond_cat([self.conds[i] for i in cond_ids.tolist()])
            uncond = cond_cat([self.uncond] * count)
            guidance = torch.full((count,), config.data_free_guidance, dtype=dtype, device=self.device)
            x = noise * per_sample(self.space.coefficients(sigmas[0])[1].expand(count), noise)
            for i, sigma in enumerate(sigmas):
                sigma_batch = sigma.expand(count).to(device=self.device, dtype=dtype)
                x0 = self.teacher_x0(x, sigma_batch, cond, uncond, guidance)
                if i + 1 < len(sigmas):
                    x = ddim_jump(self.space, x, x0, sigma.expand(count), sigmas[i + 1].expand(count))
            samples.append(x0)
        return torch.cat(samples)

    def sample_batch(self, step: int) -> _Batch:
        """The samples, noise, guidance and timesteps of ``step`` (a function of seed, rank, step)."""
        config = self.config
        generator = self._generator(step)
        latents = self.latents()
        picks = torch.randint(len(latents), (config.batch,), generator=generator)
        paired = self.data.paired and self.data.latents is not None
        cond_ids = picks if paired else torch.randint(len(self.conds), (config.batch,), generator=generator)
        empty = torch.rand(config.batch, generator=generator) < config.empty_prompt_proportion
        x0 = latents[picks.to(latents.device)].to(self.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(self.device)
        guidance = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(
            config.batch, generator=generator, dtype=torch.float64)
        timesteps = self.objective.sample_timesteps(config.batch, generator)
        uncond = cond_cat([self.uncond] * config.batch)
        cond = cond_cat([self.conds[i] for i in cond_ids.tolist()])
        if bool(empty.any()):
            cond = _cond_where(empty, uncond, cond)
        return _Batch(x0, cond, uncond, noise, guidance, timesteps)

    # -- one step ---------------------------------------------------------------------------
    def batch_loss(self, step: int) -> Tensor:
        """The consistency loss of ``step``'s batch (with a graph into the LoRA when grad is on)."""
        batch = self.sample_batch(step)
        steps = batch.timesteps
        x0 = batch.x0
        sigma_start = self.space.sigma_of(steps.start)
        sigma_prev = self.space.sigma_of(steps.prev)
        as_model = dict(device=x0.device, dtype=x0.dtype)
        x_t = self.space.noise(x0, batch.noise, per_sample(sigma_start, x0))
        teacher = self.teacher_x0(x_t, sigma_start.to(**as_model), batch.cond, batch.uncond, batch.guidance)
        x_prev = ddim_jump(self.space, x_t, teacher, sigma_start, sigma_prev)
        with self.loraset.merged():  # no grad: the LoRA folded into the weights is cheaper than its hooks
            target_x0 = self.denoiser(x_prev, sigma_prev.to(**as_model), batch.cond)
            target = self.objective.target_output(x_prev, target_x0, steps)
        student_x0 = self.denoiser(x_t, sigma_start.to(**as_model), batch.cond)
        prediction = self.objective.student_output(x_t, student_x0, steps)
        return consistency_loss(prediction, target, self.config.loss, self.config.huber_c)

    def _all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean over ranks (gloo reduces CPU tensors, other backends the tensor's own device)."""
        if self.world_size == 1:
            return tensor
        staged = tensor.cpu() if dist.get_backend() == "gloo" else tensor
        dist.all_reduce(staged)
        return (staged / self.world_size).to(tensor.device)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device="cpu" if dist.get_backend() == "gloo" else self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _sync_initial_weights(self) -> None:
        """Every rank starts from rank 0's LoRA weights."""
        if self.world_size > 1:
            with torch.no_grad():
                flat = _flat([p.detach() for p in self.params])
                staged = flat.cpu() if dist.get_backend() == "gloo" else flat
                dist.broadcast(staged, src=0)
                _unflatten_into(staged.to(self.device), self.params)

    def _train_step(self, step: int) -> float:
        """Forward, backward, rank-mean of the LoRA gradients, clip, AdamW; NaN if not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.batch_loss(step)
        loss.backward()
        for param in self.params:
            if param.grad is None:  # a layer the forward did not reach
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.params]
        if self.world_size > 1:
            _unflatten_into(self._all_reduce_mean(_flat(grads)), grads)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        mean_loss = float(self._all_reduce_mean(loss.detach().double().reshape(1)))
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            return math.nan
        self.optimizer.step()
        return mean_loss

    # -- checkpoint / resume ----------------------------------------------------------------
    def save(self, path: str, step: int) -> None:
        """Rank 0 writes the checkpoint; every rank waits until it is on disk."""
        if self.rank == 0:
            save_checkpoint(path, self.loraset, self.optimizer, step, self.config)
        if self.world_size > 1:
            dist.barrier()

    def restore(self, checkpoint: TrainingCheckpoint) -> int:
        """Load a checkpoint's LoRA, optimizer and RNG state; returns the step it was saved at."""
        saved = DistillConfig.from_dict(checkpoint.config).to_dict()
        current = self.config.to_dict()
        changed = sorted(name for name in current if name not in RESUMABLE_CHANGES and current[name] != saved[name])
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was trained with different settings {changed} "
                             f"(only {list(RESUMABLE_CHANGES)} may change)")
        load_lora_state_dict(self.loraset, checkpoint.lora, prefix="")
        self.optimizer.load_state_dict(checkpoint.optimizer)
        torch.set_rng_state(checkpoint.rng["torch"])
        cuda_states = [checkpoint.rng[key] for key in sorted(checkpoint.rng) if key.startswith("cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        return checkpoint.step

    # -- the loop ---------------------------------------------------------------------------
    def train(
        self,
        callback: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint_path: str | None = None,
        resume: bool = False,
    ) -> TrainResult:
        """Run until ``config.steps``; ``should_stop()`` is polled before every step (Cancel).

        ``callback(step, loss)`` follows every finished step (1-based step, rank-mean loss).
        With ``checkpoint_path`` a checkpoint is written every ``save_every`` steps, on cancel
        and at the end; ``resume=True`` continues from it when the file exists. A NaN/inf loss
        or gradient raises :class:`DistillDivergedError` without touching the checkpoint.
        """
        config = self.config
        inference_tensors = [name for name, tensor in [*self.loraset.root.named_parameters(),
                                                      *self.loraset.root.named_buffers()] if tensor.is_inference()]
        if inference_tensors:
            raise ValueError(f"{len(inference_tensors)} weights of the model were created under torch.inference_mode "
                             f"(e.g. {inference_tensors[0]}) and cannot take part in backward; call "
                             "distill_core.lora.ensure_autograd_compatible(module) first")
        start = 0
        saved_step: int | None = None
        result = TrainResult(steps_done=start)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))  # hosts run graphs under inference mode
            if resume and checkpoint_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    start = saved_step = result.steps_done = self.restore(load_checkpoint(checkpoint_path))
            self._sync_initial_weights()
            stack.enter_context(frozen_parameters(self.loraset.root))
            if config.gradient_checkpointing:
                stack.enter_context(gradient_checkpointing(self.loraset.root))
            self.latents()
            for step in range(start, config.steps):
                if self._any_rank(bool(should_stop and should_stop())):
                    result.cancelled = True
                    break
                loss = self._train_step(step)
                if math.isnan(loss):
                    kept = (f"the last good checkpoint ({checkpoint_path}, step {saved_step}) was kept"
                            if saved_step is not None else "no checkpoint had been written")
                    raise DistillDivergedError(f"distillation diverged at step {step + 1}: the loss or its gradient "
                                               f"is NaN/inf; {kept}. Lower lr or check the inputs.")
                result.steps_done = step + 1
                result.losses.append(loss)
                if callback is not None:
                    callback(step + 1, loss)
                if checkpoint_path and config.save_every and result.steps_done % config.save_every == 0:
                    self.save(checkpoint_path, result.steps_done)
                    saved_step = result.steps_done
            if checkpoint_path and saved_step != result.steps_done:
                self.save(checkpoint_path, result.steps_done)
                saved_step = result.steps_done
        result.checkpoint = checkpoint_path if saved_step is not None else None
        return result


def train(
    denoiser: Denoiser,
    loraset: LoraSet,
    space: NoiseSpace,
    config: DistillConfig,
    data: TrainingData,
    callback: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | None = None,
    resume: bool = False,
) -> TrainResult:
    """One call for :class:`DistillTrainer` ``(...).train(...)``."""
    trainer = DistillTrainer(denoiser, loraset, space, config, data)
    return trainer.train(callback, should_stop, checkpoint_path, resume)
