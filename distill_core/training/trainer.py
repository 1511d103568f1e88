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
4. loss between the objectives' consistency outputs (:mod:`distill_core.training.objectives`),
   AdamW step on the LoRA parameters after gradient clipping.

Data: given latents (e.g. VAE-encoded images, already in the model's latent scale), or
data-free: a pool of latents generated once from the teacher's own trajectories (pure noise,
``data_free_steps`` deterministic CFG DDIM steps, final x0 estimate); the pool depends only on
the seed and the rank, so a resumed run regenerates the same pool (or reads it from a
:class:`~distill_core.training.teacher_cache.TeacherCache`). Building it is the run's first long
phase: it reports its progress and stops at a Cancel within one teacher call, writing nothing
(:mod:`distill_core.progress`).

Randomness of step ``k`` comes from a generator seeded by ``(seed, rank, k)``, so resuming
reproduces the uninterrupted run exactly. Under ``torch.distributed`` every rank runs this
loop on its own samples and LoRA gradients are averaged with one all-reduce per step.
A float16 network gets dynamic loss scaling, one scaler per trained LoRA (role), since each role
backpropagates a loss of its own (:mod:`distill_core.training.loss_scale`). Checkpoints are
safetensors (every role's LoRA, AdamW state and loss scale, the loss history, RNG state) with JSON
metadata, never pickle (:mod:`distill_core.training.checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..progress import POOL, Cancelled, PhaseCallback, Progress
from ..spaces import NoiseSpace, per_sample
from .checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from .conditioning import Cond, Denoiser, cond_cat, cond_to, cond_where, named_cond_tensors
from .config import CONSISTENCY_OBJECTIVES, RESUMABLE_CHANGES, DistillConfig, TrainingData
from .distributed import all_reduce_mean, any_rank, barrier, broadcast_from_rank0, flatten, unflatten_into, world
from .lora import LoraSet, attach_lora, check_lora_state_dict, load_lora_state_dict
from .loss_scale import DynamicLossScale
from .memory import frozen_parameters, gradient_checkpointing
from .objectives import (
    ConsistencyObjective,
    LCMObjective,
    SegmentedObjective,
    TDDObjective,
    TrainingTimesteps,
    consistency_loss,
    ddim_timesteps,
    evenly_picked,
)
from .teacher_cache import CacheKey, TeacherCache

POOL_KIND = "pool"
POOL_SETTINGS = ("seed", "batch", "data_free_samples", "data_free_steps", "data_free_guidance", "num_ddim_timesteps")
"""The settings the data-free pool depends on (with the rank, latent shape, dtype, device and prompts)."""


def attach_student_lora(module: nn.Module, config: DistillConfig) -> LoraSet:
    """The student's LoRA on ``module`` as ``config`` describes it, initialised from ``config.seed``.

    The in-graph node and the headless runner both start from these weights, so a run resumed,
    repeated or moved to ``torchrun`` begins identically; the global RNG is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return attach_lora(module, config.rank, config.alpha, config.target_layers, config.name_filter,
                           skip_small_layers=config.skip_small_layers)


STUDENT = "student"
"""The role of the LoRA users load (the consistency student, the dmd generator)."""

StepCallback = Callable[[int, dict[str, float]], None]
"""``callback(step, losses)`` after every finished step: 1-based step, rank-mean loss per series."""


@dataclass
class TrainResult:
    steps_done: int
    # series -> value per step of the whole run (NaN: none)
    losses: dict[str, list[float]] = field(default_factory=dict)
    cancelled: bool = False
    checkpoint: str | None = None
    resumed_from: int | None = None  # the checkpoint's step when the run resumed from one

    def resume_note(self, steps: int) -> str | None:
        """Plain words for a resume that trained nothing (the checkpoint already had ``steps`` steps or more)."""
        if self.resumed_from is None or self.resumed_from < steps:
            return None
        more = f", more than the {steps} asked for" if self.resumed_from > steps else ""
        return (f"the checkpoint already had {self.resumed_from} steps{more}, so nothing was trained and the LoRA is "
                "the checkpoint's; raise steps to train further, or set resume off to start again")


class DistillDivergedError(RuntimeError):
    """The loss or the gradients became NaN/inf; the last good checkpoint was kept."""


def make_objective(config: DistillConfig, space: NoiseSpace) -> ConsistencyObjective:
    if config.objective == "lcm":
        return LCMObjective(space, config.num_ddim_timesteps, config.timestep_scaling)
    if config.objective == "tdd":
        return TDDObjective(space, config.num_ddim_timesteps, config.tdd_window, config.tdd_shrink,
                            config.tdd_min_steps, config.tdd_max_steps)
    return SegmentedObjective(space, config.num_ddim_timesteps, config.segments)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct generator seed per (seed, rank, step), stable across runs and resumes."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 0x5EED) % (2**63)


@dataclass
class _Batch:
    x0: Tensor
    cond: Cond
    uncond: Cond
    noise: Tensor
    guidance: Tensor
    timesteps: TrainingTimesteps


class LoraTrainer:
    """The loop shared by every objective: data, teacher passes, LoRA updates, checkpoints, Cancel, DDP.

    Subclasses implement :meth:`train_step`. Each trained LoRA has a *role* (``STUDENT`` = the LoRA
    users load) with its own AdamW; ``modules`` holds extra trainable modules (e.g. a GAN head).
    """

    def __init__(self, denoiser: Denoiser, loraset: LoraSet, space: NoiseSpace, config: DistillConfig,
                 data: TrainingData) -> None:
        self.denoiser = denoiser
        self.loraset = loraset
        self.space = space
        self.config = config
        self.data = data
        self.rank, self.world_size = world()
        self.device = loraset.parameters()[0].device
        self.conds = [cond_to(cond, self.device) for cond in data.conds]
        self.uncond = cond_to(data.uncond, self.device)
        self.adapters: dict[str, LoraSet] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.modules: dict[str, nn.Module] = {}
        self.history: dict[str, list[float]] = {}
        self.loss_scales: dict[str, DynamicLossScale] = {}
        self.add_role(STUDENT, loraset, config.lr)
        self._pool: Tensor | None = None

    def add_role(self, role: str, loraset: LoraSet, lr: float, extra: nn.Module | None = None) -> None:
        """Train ``loraset`` (and ``extra``'s parameters, saved as module ``role``) with an AdamW of its own."""
        config = self.config
        ranks = {adapter.rank for adapter in loraset.adapters.values()}
        alphas = {adapter.alpha for adapter in loraset.adapters.values()}
        if ranks != {config.rank} or alphas != {float(config.alpha)}:
            raise ValueError(f"LoRA set has rank(s) {sorted(ranks)} / alpha(s) {sorted(alphas)}, "
                             f"config says rank {config.rank} / alpha {config.alpha}")
        params = loraset.parameters()
        if extra is not None:
            self.modules[role] = extra
            params += list(extra.parameters())
        self.adapters[role] = loraset
        self.optimizers[role] = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        self.loss_scales[role] = DynamicLossScale()

    @property
    def params(self) -> list[Tensor]:
        """Every trained tensor, role by role, in optimizer order."""
        return [param for optimizer in self.optimizers.values() for group in optimizer.param_groups
                for param in group["params"]]

    def detach(self) -> None:
        """Remove every LoRA hook from the network (it is left as it was before training)."""
        for loraset in self.adapters.values():
            loraset.remove()

    @contextlib.contextmanager
    def roles(self, *active: str) -> Iterator[None]:
        """Inside the block only the LoRAs of the ``active`` roles act on the network (none: the teacher)."""
        with contextlib.ExitStack() as stack:
            for role, loraset in self.adapters.items():
                stack.enter_context(loraset.enabled(role in active))
            yield

    # -- data -----------------------------------------------------------------------------
    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.config.seed, self.rank, step))

    def teacher_x0(self, x: Tensor, sigma: Tensor, cond: Cond, uncond: Cond, guidance: Tensor) -> Tensor:
        """CFG x0 of the base network: cond and uncond in one batched call, LoRAs off, no grad."""
        with torch.no_grad(), self.roles():
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, uncond]))
        x0_cond, x0_uncond = both.chunk(2)
        return x0_cond + per_sample(guidance, x0_cond) * (x0_cond - x0_uncond)

    def latents(self) -> Tensor:
        """Training latents: the given ones, or the data-free pool (generated once per run)."""
        if self.data.latents is not None:
            return self.data.latents
        if self._pool is None:
            self._pool = self._generate_pool(Progress())
        return self._pool

    def pool_steps(self) -> Tensor:
        """The timesteps of the data-free pool's teacher trajectories."""
        config = self.config
        return evenly_picked(ddim_timesteps(config.num_ddim_timesteps, self.space.num_timesteps),
                             min(config.data_free_steps, config.num_ddim_timesteps))

    def pool_key(self) -> CacheKey:
        """Everything the data-free pool depends on besides the model (see :mod:`.teacher_cache`)."""
        config = self.config
        settings = {name: getattr(config, name) for name in POOL_SETTINGS}
        return self.teacher_key(POOL_KIND, settings | {"timesteps": self.pool_steps().tolist()})

    def teacher_key(self, kind: str, settings: dict) -> CacheKey:
        """The cache key of teacher outputs of ``kind`` made with ``settings`` from this run's conditionings, noise
        space, rank, latent shape, dtype and device."""
        settings = settings | {"rank": self.rank, "latent_shape": list(self.data.latent_shape or ()),
                               "dtype": str(self.loraset.parameters()[0].dtype), "device": self.device.type}
        conds = [("uncond", self.uncond), *((f"cond.{i}", cond) for i, cond in enumerate(self.conds))]
        inputs = [(f"{label}{path}", tensor) for label, cond in conds for path, tensor in named_cond_tensors(cond)]
        return CacheKey.of(kind, settings, [*inputs, ("sigma_table", self.space.sigma_table)])

    def prepare_data(self, progress: Progress, cache: TeacherCache | None = None) -> None:
        """Build the data-free pool now (or read it from ``cache``), reporting its progress.

        Raises :class:`~distill_core.progress.Cancelled` when the host stops it; then nothing is
        kept or written. A cache entry made by another model is refused and replaced.
        """
        if self.data.latents is not None or self._pool is not None:
            return
        key = self.pool_key() if cache is not None else None
        stored = cache.load(key) if cache is not None and key is not None else None
        pool = stored["pool"] if stored is not None else self._generate_pool(progress)
        if cache is not None and key is not None and stored is None:
            cache.store(key, {"pool": pool})
        self._pool = pool.to(self.device)

    def _generate_pool(self, progress: Progress) -> Tensor:
        """Data-free latents: teacher CFG DDIM trajectories from pure noise, final x0 estimates."""
        config = self.config
        generator = torch.Generator().manual_seed(step_seed(config.seed, self.rank, -1))
        sigmas = self.space.sigma_of(self.pool_steps())
        dtype = self.loraset.parameters()[0].dtype
        shape = self.data.latent_shape
        if shape is None:  # TrainingData has one whenever it has no latents
            raise ValueError("data-free training needs latent_shape")
        batches = range(0, config.data_free_samples, config.batch)
        phase = progress.phase(POOL, len(batches) * len(sigmas))
        samples = []
        for first in batches:
            count = min(config.batch, config.data_free_samples - first)
            cond_ids = torch.randint(len(self.conds), (count,), generator=generator)
            noise = torch.randn((count, *shape), generator=generator, dtype=dtype).to(self.device)
            cond = cond_cat([self.conds[i] for i in cond_ids.tolist()])
            uncond = cond_cat([self.uncond] * count)
            guidance = torch.full((count,), config.data_free_guidance, dtype=dtype, device=self.device)
            x = noise * per_sample(self.space.coefficients(sigmas[0])[1].expand(count), noise)
            for i, sigma in phase.each(enumerate(sigmas)):
                sigma_batch = sigma.expand(count).to(device=self.device, dtype=dtype)
                x0 = self.teacher_x0(x, sigma_batch, cond, uncond, guidance)
                if i + 1 < len(sigmas):
                    x = self.space.ddim(x, x0, sigma.expand(count), sigmas[i + 1].expand(count))
            samples.append(x0)
        return torch.cat(samples)

    def backward(self, role: str, loss: Tensor) -> None:
        """``backward`` of ``role``'s loss, scaled by its :class:`DynamicLossScale` when the network computes in
        float16 (decided at the role's first backward, once its adapted layers have run)."""
        scale = self.loss_scales[role]
        if scale.enabled is None:
            scale.enabled = torch.float16 in self.adapters[role].output_dtypes
        scale.scaled(loss).backward()

    def step_gradients(self, role: str) -> bool:
        """After :meth:`backward`: rank-mean of ``role``'s gradients, unscale, clip, AdamW step.

        A step whose scaled gradients overflow is skipped and the scale halved (True, no update); False when the
        gradients are not finite even unscaled (:mod:`distill_core.training.loss_scale`).
        """
        optimizer = self.optimizers[role]
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for param in params:
            if param.grad is None:  # a layer the forward did not reach
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in params if param.grad is not None]  # all of them, after the zeros
        if self.world_size > 1:
            unflatten_into(all_reduce_mean(flatten(grads), self.world_size), grads)
        update = self.loss_scales[role].unscale_(grads)
        if update == DynamicLossScale.DIVERGED:
            return False
        if update == DynamicLossScale.STEP:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            optimizer.step()
        return True

    def rank_mean(self, loss: Tensor) -> float:
        """The loss averaged over ranks, as a float."""
        return float(all_reduce_mean(loss.detach().double().reshape(1), self.world_size))

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (or several, one per role); the rank-mean losses, NaN where not finite."""
        raise NotImplementedError

    # -- checkpoint / resume ----------------------------------------------------------------
    def save(self, path: str, step: int, progress: Progress | None = None) -> None:
        """Rank 0 writes the checkpoint (its progress reported, never cancelled); every rank waits."""
        if self.rank == 0:
            save_checkpoint(path, step, self.config, self.adapters, self.optimizers, self.history, self.modules,
                            {role: scale.state() for role, scale in self.loss_scales.items()},
                            (progress or Progress()).on_phase)
        barrier(self.world_size)

    def restore(self, checkpoint: TrainingCheckpoint) -> int:
        """Load a checkpoint's LoRAs, optimizers, modules, loss history, loss scales and RNG state; returns its step.

        Everything is checked before anything is loaded: a refused checkpoint changes nothing.
        """
        saved = DistillConfig.from_dict(checkpoint.config).to_dict()
        current = self.config.to_dict()
        for name in ("objective", "rank"):
            if saved[name] != current[name]:
                raise ValueError(f"cannot resume: the checkpoint was trained with different settings ({name} "
                                 f"{saved[name]!r} there, {current[name]!r} here)")
        changed = sorted(name for name in current if name not in RESUMABLE_CHANGES and current[name] != saved[name])
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was trained with different settings {changed} "
                             f"(only {list(RESUMABLE_CHANGES)} may change)")
        if set(checkpoint.loras) != set(self.adapters) or set(checkpoint.optimizers) != set(self.optimizers):
            raise ValueError(f"cannot resume: the checkpoint holds LoRAs {sorted(checkpoint.loras)}, this run trains "
                             f"{sorted(self.adapters)}")
        for role, loraset in self.adapters.items():
            check_lora_state_dict(loraset, checkpoint.loras[role], prefix="")
        for role, loraset in self.adapters.items():
            load_lora_state_dict(loraset, checkpoint.loras[role], prefix="")
        for name, module in self.modules.items():
            module.load_state_dict(checkpoint.modules[name])
        for role, optimizer in self.optimizers.items():
            optimizer.load_state_dict(checkpoint.optimizers[role])
        for role, scale in self.loss_scales.items():
            scale.load_state(checkpoint.loss_scale[role] if checkpoint.loss_scale is not None else None)
        self.history = {series: list(values) for series, values in checkpoint.history.items()}
        torch.set_rng_state(checkpoint.rng["torch"])
        cuda_states = [checkpoint.rng[key] for key in sorted(checkpoint.rng) if key.startswith("cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        return checkpoint.step

    # -- the loop ---------------------------------------------------------------------------
    def record(self, step: int, losses: dict[str, float]) -> None:
        """Append 0-based ``step``'s losses to the history (NaN for a series without a value this step)."""
        for series in losses.keys() - self.history.keys():
            self.history[series] = [math.nan] * step
        for series, values in self.history.items():
            values.append(losses.get(series, math.nan))

    def train(
        self,
        callback: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint_path: str | None = None,
        resume: bool = False,
        on_phase: PhaseCallback | None = None,
        cache: TeacherCache | None = None,
    ) -> TrainResult:
        """Run until ``config.steps``; ``should_stop()`` is polled before every step (Cancel).

        ``callback(step, losses)`` follows every finished step (1-based step, rank-mean loss per
        series). With ``checkpoint_path`` a checkpoint is written every ``save_every`` steps, on
        cancel and at the end; ``resume=True`` continues from it when the file exists, and the
        result's loss history then covers the whole run. A NaN/inf loss or gradient raises
        :class:`DistillDivergedError` without touching the checkpoint. ``on_phase(phase, done, total)`` hears
        the long phases before and between steps (the data-free pool, checkpoint writes); a stop during the pool
        ends the run cancelled with nothing written. ``cache`` keeps the data-free pool across runs.
        """
        config = self.config
        inference_tensors = [name for name, tensor in [*self.loraset.root.named_parameters(),
                                                      *self.loraset.root.named_buffers()] if tensor.is_inference()]
        if inference_tensors:
            raise ValueError(f"{len(inference_tensors)} weights of the model were created under torch.inference_mode "
                             f"(e.g. {inference_tensors[0]}) and cannot take part in backward; call "
                             "distill_core.training.lora.ensure_autograd_compatible(module) first")
        start = 0
        saved_step: int | None = None
        result = TrainResult(steps_done=start)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))  # hosts run graphs under inference mode
            if resume and checkpoint_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    start = saved_step = result.steps_done = self.restore(load_checkpoint(checkpoint_path))
                    result.resumed_from = start
            broadcast_from_rank0(self.params, self.world_size)
            stack.enter_context(frozen_parameters(self.loraset.root))
            if config.gradient_checkpointing:
                stack.enter_context(gradient_checkpointing(self.loraset.root))
            stop_any_rank = lambda: any_rank(bool(should_stop and should_stop()), self.world_size,  # noqa: E731
                                             self.device)
            progress = Progress(on_phase, stop_any_rank)
            try:
                self.prepare_data(progress, cache)
            except Cancelled:
                result.cancelled = True
                return result
            for step in range(start, config.steps):
                if stop_any_rank():
                    result.cancelled = True
                    break
                losses = self.train_step(step)
                if not all(math.isfinite(value) for value in losses.values()):
                    kept = (f"the last good checkpoint ({checkpoint_path}, step {saved_step}) was kept"
                            if saved_step is not None else "no checkpoint had been written")
                    raise DistillDivergedError(f"distillation diverged at step {step + 1}: the loss or its gradient "
                                               f"is NaN/inf; {kept}. Lower lr or check the inputs.")
                self.record(step, losses)
                result.steps_done = step + 1
                if callback is not None:
                    callback(step + 1, losses)
                if checkpoint_path and config.save_every and result.steps_done % config.save_every == 0:
                    self.save(checkpoint_path, result.steps_done, progress)
                    saved_step = result.steps_done
            if checkpoint_path and saved_step != result.steps_done:
                self.save(checkpoint_path, result.steps_done, progress)
                saved_step = result.steps_done
        result.checkpoint = checkpoint_path if saved_step is not None else None
        result.losses = {series: list(values) for series, values in self.history.items()}
        return result


class DistillTrainer(LoraTrainer):
    """Distils ``denoiser`` into the LoRA of ``loraset`` with a consistency objective; see the module docstring."""

    def __init__(self, denoiser: Denoiser, loraset: LoraSet, space: NoiseSpace, config: DistillConfig,
                 data: TrainingData) -> None:
        if config.objective not in CONSISTENCY_OBJECTIVES:
            raise ValueError(f"DistillTrainer trains the consistency objectives {CONSISTENCY_OBJECTIVES}; "
                             f"'{config.objective}' runs in its own trainer (see build_trainer)")
        super().__init__(denoiser, loraset, space, config, data)
        self.objective = make_objective(config, space)

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
            cond = cond_where(empty, uncond, cond)
        return _Batch(x0, cond, uncond, noise, guidance, timesteps)

    # -- one step ---------------------------------------------------------------------------
    def batch_loss(self, step: int) -> Tensor:
        """The consistency loss of ``step``'s batch (with a graph into the LoRA when grad is on)."""
        batch = self.sample_batch(step)
        steps = batch.timesteps
        x0 = batch.x0
        sigma_start = self.space.sigma_of(steps.start)
        sigma_prev = self.space.sigma_of(steps.prev)
        x_t = self.space.noise(x0, batch.noise, per_sample(sigma_start, x0))
        teacher = self.teacher_x0(x_t, sigma_start.to(x0), batch.cond, batch.uncond, batch.guidance)
        x_prev = self.space.ddim(x_t, teacher, sigma_start, sigma_prev)
        with self.loraset.merged():  # no grad: the LoRA folded into the weights is cheaper than its hooks
            target_x0 = self.denoiser(x_prev, sigma_prev.to(x0), batch.cond)
            target = self.objective.target_output(x_prev, target_x0, steps)
        student_x0 = self.denoiser(x_t, sigma_start.to(x0), batch.cond)
        prediction = self.objective.student_output(x_t, student_x0, steps)
        return consistency_loss(prediction, target, self.config.loss, self.config.huber_c)

    def train_step(self, step: int) -> dict[str, float]:
        """Forward, (scaled) backward, rank-mean of the LoRA gradients, clip, AdamW; NaN if not finite."""
        self.optimizers[STUDENT].zero_grad(set_to_none=True)
        loss = self.batch_loss(step)
        self.backward(STUDENT, loss)
        stepped = self.step_gradients(STUDENT)
        mean_loss = self.rank_mean(loss)
        return {"loss": mean_loss if stepped and math.isfinite(mean_loss) else math.nan}


def train(
    denoiser: Denoiser,
    loraset: LoraSet,
    space: NoiseSpace,
    config: DistillConfig,
    data: TrainingData,
    callback: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | None = None,
    resume: bool = False,
    on_phase: PhaseCallback | None = None,
    cache: TeacherCache | None = None,
) -> TrainResult:
    """One call for :class:`DistillTrainer` ``(...).train(...)``."""
    trainer = DistillTrainer(denoiser, loraset, space, config, data)
    return trainer.train(callback, should_stop, checkpoint_path, resume, on_phase, cache)


def build_trainer(denoiser: Denoiser, module: nn.Module, space: NoiseSpace, config: DistillConfig,
                  data: TrainingData, fake_state: dict[str, Tensor] | None = None) -> LoraTrainer:
    """The trainer of ``config.objective`` with its LoRA(s) attached to ``module`` (the network ``denoiser`` runs).

    The student LoRA starts from :func:`attach_student_lora`; ``fake_state`` (``dmd`` only) starts the fake
    score from a kept one. ``trainer.detach()`` removes every hook again.
    """
    if fake_state is not None and config.objective != "dmd":
        raise ValueError("a fake-score LoRA belongs to the 'dmd' objective")
    student = attach_student_lora(module, config)
    try:
        if config.objective == "dmd":
            from .dmd import DMDTrainer  # dmd.py builds on this module

            return DMDTrainer(denoiser, student, space, config, data, fake_state)
        return DistillTrainer(denoiser, student, space, config, data)
    except BaseException:
        student.remove()
        raise
