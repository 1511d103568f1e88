"""Distribution-matching distillation (DMD2): the formulas of one training iteration.

Read from the official code, tianweiy/DMD2 at commit 8d8fa55633d47cfb81bbc7a892e7248f9518763f:

* ``main/sd_guidance.py`` ``compute_distribution_matching_loss``: at a timestep ``t ~ U{min_step..max_step}``
  (``int(0.02 T)``..``int(0.98 T)``) the generator's sample ``x`` is noised to ``x_t``; with the fake
  score's and the real (teacher, CFG) score's clean predictions ``mu_fake``, ``mu_real``::

      grad = nan_to_num((mu_fake - mu_real) / mean_{c,h,w} |x - mu_real|)
      loss = 0.5 * mean((x - sg(x - grad))^2)                        (d loss / dx = grad / numel)

  The real score uses CFG ``uncond + g (cond - uncond)`` (``real_guidance_scale`` g: 8 for SDXL,
  1.75 for SD1.5; ``predict_noise`` skips the uncond pass when ``g <= 1``); the fake score has none.
* ``compute_loss_fake``: the fake score learns the generator's detached samples by denoising at
  ``t ~ U{0..T-1}`` with the eps-prediction MSE. Here it is the MSE of the probability-flow velocity
  ``(x - x0) / sigma``: in a VE space that is exactly eps, in a flow space the flow-matching loss
  (what FastGen's DMD2 uses for flow teachers: the teacher's own prediction type).
* ``main/sd_unified_model.py``: the generator's timesteps ``range(T - 1, 0, -(T // N))`` (4 steps:
  999, 749, 499, 249; 1 step: 999, or SDXL's ``conditioning_timestep`` 399); its first step sees pure unit
  noise (variance-preserving scale); ``prepare_denoising_data`` noises given latents to one of the
  timesteps, with pure noise at ``T - 1``; ``sample_backward`` (backward simulation) runs the current
  generator without gradient for ``k ~ U{0..N-1}`` steps (one ``k`` for the whole batch, shared by all
  ranks), re-noising each ``x0`` with fresh noise to the next timestep, and trains on the result.
* ``compute_cls_logits`` / ``cls_pred_branch`` (the GAN term): a convolutional head on the fake score's
  bottleneck features of noised (``diffusion_gan``, ``t ~ U{0..999}``) real and generated latents;
  classifier loss ``softplus(fake) + softplus(-real)`` (weight 1e-2), generator loss
  ``softplus(-fake)`` (weight 5e-3).
* ``main/train_sd_ode.py`` (with ``main/sdxl/generate_noise_image_pairs_laion_sdxl.py``): the paired ODE
  regression of the first DMD (Yin et al. 2023, ``L_reg``, weight 0.25 there), which DMD2 keeps as a
  pretraining script: pairs (noise, the teacher pipeline's deterministic ODE output from it, prompt); the
  generator's x0 from the noise (``denoising``: from the trajectory at a random generator timestep) is pulled
  to the output. DMD2 compares decoded images with LPIPS; here the distance is the latent MSE (no LPIPS
  network is available offline). Off by default (``regression_weight`` 0), as in DMD2.
* ``main/train_sd.py``: every iteration produces a generator sample and updates the fake score on it;
  the generator is updated (before that) on iterations ``i % dfake_gen_update_ratio == 0`` (5 for
  SDXL, 10 for SD1.5); both AdamW (weight decay 0.01), gradient clipping at ``max_grad_norm`` 10.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import POOL, Progress
from ..safe_files import read_safetensors
from ..spaces import NoiseSpace, per_sample
from .conditioning import Cond, Denoiser, cond_cat
from .config import DistillConfig, TrainingData
from .lora import LoraSet, attach_lora, load_lora_state_dict, lora_state_dict
from .teacher_cache import TeacherCache
from .trainer import STUDENT, LoraTrainer, step_seed

MIN_STEP_PERCENT = 0.02
MAX_STEP_PERCENT = 0.98
GAN_GENERATOR_WEIGHT = 5e-3
GAN_CLASSIFIER_WEIGHT = 1e-2
ODE_SUBSTEPS = 10
"""Teacher DDIM steps per generator interval (and from the last generator timestep to 0) for the regression pairs."""
REGRESSION_PAIRS_KIND = "dmd-ode-pairs"


# -- timesteps ------------------------------------------------------------------------------------
def dm_timestep_range(num_timesteps: int, min_percent: float = MIN_STEP_PERCENT,
                      max_percent: float = MAX_STEP_PERCENT) -> tuple[int, int]:
    """``(min_step, max_step)`` of the distribution-matching noise level, inclusive: 1000 -> (20, 980)."""
    if not 0 <= min_percent <= max_percent <= 1:
        raise ValueError(f"noise-level range must satisfy 0 <= min <= max <= 1, got [{min_percent}, {max_percent}]")
    return int(min_percent * num_timesteps), int(max_percent * num_timesteps)


def sample_dm_timesteps(batch: int, timestep_range: tuple[int, int], num_timesteps: int,
                        generator: torch.Generator) -> Tensor:
    """``t ~ U{min_step .. min(max_step, T - 1)}`` per sample (int64)."""
    low, high = timestep_range
    return torch.randint(low, min(high + 1, num_timesteps), (batch,), generator=generator)


def generator_timesteps(steps: int, num_timesteps: int) -> Tensor:
    """DMD2's generator timesteps ``T - 1 - k (T // N)``, ``k < N``: 1 -> 999; 4 -> 999, 749, 499, 249."""
    if not 1 <= steps < num_timesteps:
        raise ValueError(f"generator steps must be in 1..{num_timesteps - 1}, got {steps}")
    return (num_timesteps - 1) - (num_timesteps // steps) * torch.arange(steps, dtype=torch.int64)


def check_generator_timesteps(timesteps: Tensor | list[int], num_timesteps: int) -> Tensor:
    """The given generator timesteps as int64, or a ``ValueError`` if they do not fit the schedule:
    whole numbers in ``1..T-1``, strictly descending, at least one."""
    values = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("generator timesteps: give at least one timestep")
    if not torch.equal(values, values.round()):
        raise ValueError(f"generator timesteps must be whole training timesteps, got {values.tolist()}")
    ints = values.long()
    if ints.min() < 1 or ints.max() > num_timesteps - 1:
        raise ValueError(f"generator timesteps must lie in 1..{num_timesteps - 1} (this model's schedule has "
                         f"{num_timesteps} training timesteps), got {ints.tolist()}")
    if ints.numel() > 1 and not bool((ints[1:] < ints[:-1]).all()):
        raise ValueError(f"generator timesteps must be strictly descending (e.g. 999, 749, 499, 249), got "
                         f"{ints.tolist()}")
    return ints


# -- generator inputs -----------------------------------------------------------------------------
def pure_noise(space: NoiseSpace, eps: Tensor, timesteps: Tensor) -> Tensor:
    """Unit noise in variance-preserving scale, ``sqrt(a^2 + b^2) eps``, in the space's convention at each
    sample's timestep: what DMD2 feeds its generator's first step (at 999 also ComfyUI's ``max_denoise`` start)."""
    a, b = space.coefficients(space.sigma_of(timesteps).to(eps.device))
    return eps * per_sample((a**2 + b**2).sqrt(), eps)


def generator_input(space: NoiseSpace, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor:
    """``x0`` noised to each sample's generator timestep, pure noise at the top timestep ``T - 1``
    (DMD2's ``prepare_denoising_data`` with its ``pure_noise_mask``)."""
    sigma = space.sigma_of(timesteps).to(eps.device)
    noised = space.noise(x0, eps, sigma.reshape(-1, *([1] * (eps.ndim - 1))))
    top = (timesteps == space.num_timesteps - 1).to(eps.device).reshape(-1, *([1] * (eps.ndim - 1)))
    return torch.where(top, pure_noise(space, eps, timesteps), noised)


def backward_simulation(
    generator: Callable[[Tensor, Tensor], Tensor],
    space: NoiseSpace,
    timesteps: Tensor,
    steps: int,
    eps: Tensor,
    noise: Callable[[], Tensor],
) -> Tensor:
    """The generator's training input at ``timesteps[steps]``, made by the current generator (DMD2's
    ``sample_backward``): pure noise ``eps`` for ``steps = 0``; otherwise ``steps`` generator steps from it
    without gradient, each ``x0`` re-noised with fresh ``noise()`` to the next timestep.

    ``generator(x, timestep_batch) -> x0`` is the current generator.
    """
    if not 0 <= steps < len(timesteps):
        raise ValueError(f"backward simulation steps must be in 0..{len(timesteps) - 1}, got {steps}")
    batch = eps.shape[0]
    x = pure_noise(space, eps, timesteps[:1].expand(batch))
    with torch.no_grad():
        for index in range(steps):
            x0 = generator(x, timesteps[index].expand(batch))
            x = generator_input(space, x0, noise(), timesteps[index + 1].expand(batch))
    return x


def ode_timesteps(timesteps: Tensor, num_timesteps: int, substeps: int = ODE_SUBSTEPS) -> Tensor:
    """The teacher ODE's grid for the regression pairs: from the top timestep ``T - 1`` through every later
    generator timestep down to 0, each interval cut into ``substeps`` even steps (rounded to whole timesteps)."""
    anchors = [num_timesteps - 1, *[int(t) for t in timesteps[1:]], 0]
    parts = [torch.linspace(float(a), float(b), substeps + 1)[:-1] for a, b in itertools.pairwise(anchors)]
    return torch.cat([*parts, torch.zeros(1)]).round().long().unique_consecutive()


def ode_pairs(
    teacher: Callable[[Tensor, Tensor], Tensor],
    space: NoiseSpace,
    timesteps: Tensor,
    eps: Tensor,
    substeps: int = ODE_SUBSTEPS,
) -> tuple[Tensor, Tensor]:
    """DMD's regression pairs from unit noise ``eps``: ``(inputs, target)``.

    The teacher's probability-flow ODE (DDIM on :func:`ode_timesteps`) runs from pure noise at ``T - 1``, as the
    teacher's pipeline does; ``target`` is its final x0. ``inputs[:, k]`` is what generator step ``k`` sees:
    pure noise ``eps`` at the first generator timestep (as in sampling), the ODE's state at ``timesteps[k]`` for
    the later steps (DMD2's ``denoising`` variant of ``train_sd_ode.py``). ``teacher(x, timestep_batch) -> x0``.
    """
    grid = ode_timesteps(timesteps, space.num_timesteps, substeps)
    batch = eps.shape[0]
    x = pure_noise(space, eps, grid[:1].expand(batch))
    states: dict[int, Tensor] = {}
    x0 = x
    with torch.no_grad():
        for index, t in enumerate(grid.tolist()):
            states[t] = x
            x0 = teacher(x, grid[index].expand(batch))
            if index + 1 < len(grid):
                x = space.ddim(x, x0, space.sigma_of(grid[index]).expand(batch),
                               space.sigma_of(grid[index + 1]).expand(batch))
    first = pure_noise(space, eps, timesteps[:1].expand(batch))
    inputs = torch.stack([first, *(states[int(t)] for t in timesteps[1:])], dim=1)
    return inputs, x0


# -- losses ---------------------------------------------------------------------------------------
def distribution_matching_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """``(x0_fake - x0_real) / mean |x - x0_real|`` per sample in float64, through ``torch.nan_to_num`` (NaN -> 0)."""
    x, x0_real, x0_fake = (t.detach().to(torch.float64) for t in (x, x0_real, x0_fake))
    weight = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / weight)


def distribution_matching_loss(x: Tensor, gradient: Tensor) -> Tensor:
    """``0.5 * mean((x - sg(x - grad))^2)``: its gradient with respect to ``x`` is ``grad / x.numel()``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return 0.5 * F.mse_loss(x.to(dtype), (x.detach() - gradient.to(x.device, x.dtype)).to(dtype))


def fake_score_loss(x0_pred: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Denoising loss of the fake score: ``mean(((x0_pred - x0) / sigma)^2)``, the MSE of the velocity
    ``(x - x0) / sigma`` (eps in VE spaces, eps - x0 in flow spaces), in at least float32."""
    dtype = torch.promote_types(x0_pred.dtype, torch.float32)
    return (((x0_pred.to(dtype) - x0.to(dtype)) / per_sample(sigma, x0_pred).to(dtype)) ** 2).mean()


def regression_loss(x0_pred: Tensor, target: Tensor) -> Tensor:
    """DMD's paired regression term: ``mean((x0_pred - target)^2)`` in latent space, in at least float32."""
    dtype = torch.promote_types(x0_pred.dtype, torch.float32)
    return F.mse_loss(x0_pred.to(dtype), target.to(dtype))


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """``mean softplus(-D(fake))``: the generator's non-saturating GAN loss."""
    return F.softplus(-fake_logits).mean()


def gan_classifier_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``mean softplus(D(fake)) + mean softplus(-D(real))``: the realism classifier's loss."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


# -- the GAN head ---------------------------------------------------------------------------------
def classifier_head(channels: int, size: int, groups: int = 32) -> nn.Sequential:
    """DMD2's ``cls_pred_branch`` for ``channels x size x size`` features: (conv 4x4 stride 2, GroupNorm,
    SiLU) while the side exceeds 4, then a conv over the remaining side to 1x1 (GroupNorm, SiLU) and a
    1x1 conv to one logit. 8x8 features give SD1.5's head, 32x32 SDXL's."""
    if size < 1 or channels < 1:
        raise ValueError(f"classifier features must have a positive size, got {channels} x {size} x {size}")
    groups = groups if channels % groups == 0 else 1
    layers: list[nn.Module] = []
    while size > 4:
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
        size //= 2
    layers += [nn.Conv2d(channels, channels, size, stride=size), nn.GroupNorm(groups, channels), nn.SiLU(),
               nn.Conv2d(channels, 1, 1)]
    return nn.Sequential(*layers)


# -- the trainer ----------------------------------------------------------------------------------
FAKE = "fake"
"""The role of the fake score's LoRA (and of the GAN head, trained with it)."""
FAKE_SCORE_FORMAT = "stride-dmd-fake-score-1"


class _FeaturesReached(Exception):
    """Raised by the feature hook: the rest of the network's forward is not needed."""


def attach_fake_score_lora(module: nn.Module, config: DistillConfig) -> LoraSet:
    """The fake score's LoRA on ``module``: like the student's, initialised from ``config.seed + 1``.

    Its up factors are zero, so the fake score starts as the teacher (DMD2 copies the teacher's weights).
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed + 1)
        return attach_lora(module, config.rank, config.alpha, config.target_layers, config.name_filter,
                           skip_small_layers=config.skip_small_layers)


def fake_score_metadata(fingerprint: str, config: DistillConfig) -> dict[str, str]:
    """Metadata of a kept fake-score LoRA file: what it is and which base network it belongs to."""
    return {"stride.format": FAKE_SCORE_FORMAT, "stride.base_fingerprint": fingerprint,
            "stride.rank": str(config.rank), "stride.alpha": str(config.alpha)}


def read_fake_score(path: str, fingerprint: str) -> dict[str, Tensor]:
    """A kept fake-score LoRA (``diffusion_model.*`` keys), refused unless it was trained on the base network
    whose :func:`~distill_core.training.lora.weights_fingerprint` is ``fingerprint``."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("stride.format") != FAKE_SCORE_FORMAT:
        raise ValueError(f"{path} is not a Stride DMD fake-score LoRA (format {metadata.get('stride.format')!r}); "
                         "keep the fake score of a dmd run to get one")
    if metadata.get("stride.base_fingerprint") != fingerprint:
        raise ValueError(f"{path} is the fake score of another base model (weights fingerprint "
                         f"{metadata.get('stride.base_fingerprint')}, this model's is {fingerprint}); use a fake score "
                         "kept from a run on this model")
    return tensors


def dmd_timesteps(config: DistillConfig, num_timesteps: int) -> Tensor:
    """The run's generator timesteps: ``config.generator_timesteps`` (checked against the schedule), else DMD2's
    list for ``config.generator_steps``."""
    if config.generator_timesteps is None:
        return generator_timesteps(config.generator_steps, num_timesteps)
    return check_generator_timesteps(list(config.generator_timesteps), num_timesteps)


def step_weights(space: NoiseSpace, timesteps: Tensor) -> Tensor:
    """``1 / sigma(t)`` per sample: the generator loss of a step at ``t`` in the units of an eps or velocity
    network's own output (``x0 = x - sigma * output``), so that AdamW moves every generator step alike."""
    return 1 / space.sigma_of(timesteps)


@dataclass
class _GANDraws:
    """The GAN term's draws: real latents with their conditioning, diffusion-GAN noise (generated, then real)."""

    real: Tensor
    real_cond: Cond
    timesteps: Tensor
    noise: Tensor


@dataclass
class _RegressionDraws:
    """The regression term's draws: pair inputs at their generator timesteps, their targets and prompts."""

    inputs: Tensor
    timesteps: Tensor
    targets: Tensor
    cond: Cond


@dataclass
class _RegressionPairs:
    """The run's regression pairs (:func:`ode_pairs`) with each pair's conditioning index."""

    inputs: Tensor
    targets: Tensor
    cond_ids: Tensor


@dataclass
class _DMDBatch:
    """Every random draw of one iteration (a function of seed, rank and step)."""

    cond: Cond
    uncond: Cond
    inputs: Tensor  # the generator's input
    timesteps: Tensor  # generator timestep per sample
    dm_timesteps: Tensor
    dm_noise: Tensor
    fake_timesteps: Tensor
    fake_noise: Tensor
    gan: _GANDraws | None
    regression: _RegressionDraws | None = None


class DMDTrainer(LoraTrainer):
    """DMD2 with one base network: generator = teacher + student LoRA, real score = teacher (LoRAs off, CFG
    ``guidance_scale``), fake score = teacher + fake LoRA trained by denoising the generator's samples.

    Iteration ``i`` (see the module docstring for the sources): the generator makes a sample from its input
    (backward simulation from pure noise, or given latents noised to a generator timestep); on iterations with
    ``i % ttur == 0`` the generator takes a step on the distribution-matching loss (plus the GAN loss); then the
    fake score takes a step on the detached sample. Losses: ``"generator"`` (on generator iterations) and ``"fake"``.
    """

    def __init__(self, denoiser: Denoiser, loraset: LoraSet, space: NoiseSpace, config: DistillConfig,
                 data: TrainingData, fake_state: Mapping[str, Tensor] | None = None) -> None:
        if config.objective != "dmd":
            raise ValueError(f"DMDTrainer trains the 'dmd' objective, the config says {config.objective!r}")
        self.timesteps = dmd_timesteps(config, space.num_timesteps)
        needs_latents = config.gan_features is not None
        if needs_latents and data.latents is None:
            raise ValueError("the GAN term (gan_features) compares the generator's samples with real latents; give "
                             "training images or latents, or leave gan_features unset")
        super().__init__(denoiser, loraset, space, config, data)
        self._pairs: _RegressionPairs | None = None
        self.dm_range = dm_timestep_range(space.num_timesteps, config.min_step_percent, config.max_step_percent)
        self.shape = tuple(data.latents.shape[1:]) if data.latents is not None else tuple(data.latent_shape or ())
        self.dtype = loraset.parameters()[0].dtype
        fake = attach_fake_score_lora(loraset.root, config)
        try:
            if fake_state is not None:
                load_lora_state_dict(fake, fake_state)
            self.feature_module = head = None
            if config.gan_features is not None:
                self.feature_module, head = self._classifier(fake, config.gan_features)
            self.add_role(FAKE, fake, config.fake_lr or config.lr or 0.0, head)  # both resolved for dmd
        except BaseException:
            fake.remove()
            raise

    # -- networks -------------------------------------------------------------------------------
    def _run(self, x: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """The network (with whichever LoRAs are on) at integer ``timesteps``: its x0."""
        return self.denoiser(x, self.space.sigma_of(timesteps).to(device=x.device, dtype=x.dtype), cond)

    def run_role(self, role: str, x: Tensor, timesteps: Tensor, cond: Cond, grad: bool = False) -> Tensor:
        """x0 of the network with ``role``'s LoRA; without ``grad`` the LoRA is folded into the weights layer by
        layer (:meth:`LoraSet.merged`: one small product per layer instead of two low-rank passes)."""
        with self.roles(role):
            if grad:
                return self._run(x, timesteps, cond)
            with self.adapters[role].merged():
                return self._run(x, timesteps, cond)

    def real_x0(self, x: Tensor, timesteps: Tensor, cond: Cond, uncond: Cond) -> Tensor:
        """The real score's x0: the teacher with CFG ``uncond + g (cond - uncond)`` (one pass when ``g = 1``)."""
        guidance = self.config.guidance_scale
        if guidance == 1:
            with torch.no_grad(), self.roles():
                return self._run(x, timesteps, cond)
        sigma = self.space.sigma_of(timesteps).to(device=x.device, dtype=x.dtype)
        return self.teacher_x0(x, sigma, cond, uncond, torch.full((x.shape[0],), guidance - 1.0, dtype=torch.float64))

    def features(self, x: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """The fake score network's output at ``gan_features`` (its forward stops there)."""
        captured: list[Tensor] = []

        def stop(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            captured.append(output)
            raise _FeaturesReached

        if self.feature_module is None:
            raise ValueError("the GAN term is off (gan_features unset)")
        handle = self.feature_module.register_forward_hook(stop)
        try:
            with self.roles(FAKE):
                self._run(x, timesteps, cond)
        except _FeaturesReached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"gan_features: the network's forward never calls module '{self.config.gan_features}' "
                             "itself (a container its parent iterates, e.g. a UNet's middle_block, runs only its "
                             "layers); name its last layer, e.g. 'middle_block.2'")
        return captured[0]

    def _classifier(self, fake: LoraSet, name: str) -> tuple[nn.Module, nn.Module]:
        """The feature module and DMD2's classifier head for its output shape (seeded by ``config.seed + 2``)."""
        try:
            module = fake.root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"gan_features: the network has no module named '{name}'") from None
        self.feature_module = module
        probe = torch.zeros((1, *self.shape), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            shape = self.features(probe, self.timesteps[:1], self.conds[0]).shape
        if len(shape) != 4 or shape[-1] != shape[-2]:
            raise ValueError(f"gan_features: '{name}' gives features of shape {tuple(shape)}; the classifier head "
                             "needs square (batch, channels, size, size) feature maps")
        with torch.random.fork_rng():
            torch.manual_seed(self.config.seed + 2)
            head = classifier_head(shape[1], shape[-1]).to(device=self.device, dtype=self.dtype)
        return module, head

    def realism_logits(self, x: Tensor, timesteps: Tensor, noise: Tensor, cond: Cond) -> Tensor:
        """The classifier's logits for latents ``x`` noised to ``timesteps`` (DMD2's diffusion GAN)."""
        noised = self.space.noise(x, noise, per_sample(self.space.sigma_of(timesteps), x))
        return self.modules[FAKE](self.features(noised, timesteps, cond).to(self.dtype)).reshape(-1)

    # -- one iteration --------------------------------------------------------------------------
    def prepare_data(self, progress: Progress, cache: TeacherCache | None = None) -> None:
        """Training latents are needed only without backward simulation (the GAN reads the given ones); the
        regression pairs when ``regression_weight > 0`` (from ``cache`` when it holds them)."""
        if not self.config.backward_simulation:
            super().prepare_data(progress, cache)
        if self.config.regression_weight > 0 and self._pairs is None:
            key = self.teacher_key(REGRESSION_PAIRS_KIND, {
                "seed": self.config.seed, "batch": self.config.batch, "pairs": self.config.regression_pairs,
                "guidance_scale": self.config.guidance_scale, "timesteps": self.timesteps.tolist(),
                "substeps": ODE_SUBSTEPS, "shape": list(self.shape)})
            stored = cache.load(key) if cache is not None else None
            if stored is None:
                self._pairs = self._make_pairs(progress)
                if cache is not None:
                    cache.store(key, {"inputs": self._pairs.inputs, "targets": self._pairs.targets,
                                      "cond_ids": self._pairs.cond_ids})
            else:
                self._pairs = _RegressionPairs(stored["inputs"].to(self.device), stored["targets"].to(self.device),
                                               stored["cond_ids"])

    def _make_pairs(self, progress: Progress) -> _RegressionPairs:
        """``regression_pairs`` teacher ODE pairs (real score with CFG, :func:`ode_pairs`), drawn from ``seed``
        and the rank, in batches of ``batch``."""
        config = self.config
        generator = torch.Generator().manual_seed(step_seed(config.seed, self.rank, -2))
        grid = ode_timesteps(self.timesteps, self.space.num_timesteps)
        batches = range(0, config.regression_pairs, config.batch)
        phase = progress.phase(POOL, len(batches) * len(grid) * (1 if config.guidance_scale == 1 else 2))
        inputs, targets, cond_ids = [], [], []
        for first in batches:
            count = min(config.batch, config.regression_pairs - first)
            ids = torch.randint(len(self.conds), (count,), generator=generator)
            eps = torch.randn((count, *self.shape), generator=generator, dtype=self.dtype).to(self.device)
            cond, uncond = cond_cat([self.conds[i] for i in ids.tolist()]), cond_cat([self.uncond] * count)

            def teacher(x: Tensor, t: Tensor, cond: Cond = cond, uncond: Cond = uncond) -> Tensor:
                phase.check()
                x0 = self.real_x0(x, t, cond, uncond)
                phase.advance(1 if config.guidance_scale == 1 else 2)
                return x0

            pair_inputs, pair_targets = ode_pairs(teacher, self.space, self.timesteps, eps)
            inputs.append(pair_inputs)
            targets.append(pair_targets)
            cond_ids.append(ids)
        return _RegressionPairs(torch.cat(inputs), torch.cat(targets), torch.cat(cond_ids))

    def regression_pairs(self) -> _RegressionPairs:
        """The run's regression pairs (made now if :meth:`prepare_data` did not)."""
        if self._pairs is None:
            self._pairs = self._make_pairs(Progress())
        return self._pairs

    def sample_batch(self, step: int) -> _DMDBatch:
        """The draws of iteration ``step``; the backward-simulation depth is the same on every rank."""
        config, batch, num = self.config, self.config.batch, self.space.num_timesteps
        generator = self._generator(step)

        def noise() -> Tensor:
            return torch.randn((batch, *self.shape), generator=generator, dtype=self.dtype).to(self.device)

        uncond = cond_cat([self.uncond] * batch)
        if config.backward_simulation:
            cond_ids = torch.randint(len(self.conds), (batch,), generator=generator)
            cond = cond_cat([self.conds[i] for i in cond_ids.tolist()])
            shared = torch.Generator().manual_seed(step_seed(config.seed, 0, step))
            depth = int(torch.randint(len(self.timesteps), (1,), generator=shared))
            inputs = backward_simulation(lambda x, t: self.run_role(STUDENT, x, t, cond), self.space, self.timesteps,
                                         depth, noise(), noise)
            timesteps = self.timesteps[depth].expand(batch)
        else:
            latents = self.latents()
            picks = torch.randint(len(latents), (batch,), generator=generator)
            paired = self.data.paired and self.data.latents is not None
            cond_ids = picks if paired else torch.randint(len(self.conds), (batch,), generator=generator)
            cond = cond_cat([self.conds[i] for i in cond_ids.tolist()])
            timesteps = self.timesteps[torch.randint(len(self.timesteps), (batch,), generator=generator)]
            start = latents[picks.to(latents.device)].to(self.device, self.dtype)
            inputs = generator_input(self.space, start, noise(), timesteps)
        dm_timesteps = sample_dm_timesteps(batch, self.dm_range, num, generator)
        dm_noise = noise()
        fake_timesteps = torch.randint(0, num, (batch,), generator=generator)
        fake_noise = noise()
        gan = None
        real_latents = self.data.latents
        if self.feature_module is not None and real_latents is not None:
            real_picks = torch.randint(len(real_latents), (batch,), generator=generator)
            real = real_latents[real_picks.to(real_latents.device)].to(self.device, self.dtype)
            real_cond = cond_cat([self.conds[i] for i in real_picks.tolist()]) if self.data.paired else uncond
            gan_timesteps = torch.randint(0, num, (2 * batch,), generator=generator)
            gan = _GANDraws(real, real_cond, gan_timesteps, torch.cat([noise(), noise()]))
        regression = None
        if config.regression_weight > 0:
            pairs = self.regression_pairs()
            picks = torch.randint(len(pairs.targets), (batch,), generator=generator)
            steps = torch.randint(len(self.timesteps), (batch,), generator=generator)
            on = picks.to(pairs.targets.device)
            regression = _RegressionDraws(pairs.inputs[on, steps.to(on.device)].to(self.device, self.dtype),
                                          self.timesteps[steps], pairs.targets[on].to(self.device, self.dtype),
                                          cond_cat([self.conds[i] for i in pairs.cond_ids[picks].tolist()]))
        return _DMDBatch(cond, uncond, inputs, timesteps, dm_timesteps, dm_noise, fake_timesteps, fake_noise, gan,
                         regression)

    def generate(self, batch: _DMDBatch, grad: bool) -> Tensor:
        """The generator's sample (x0 at its timestep), with a graph into the student LoRA when ``grad``."""
        return self.run_role(STUDENT, batch.inputs, batch.timesteps, batch.cond, grad)

    def generator_losses(self, x: Tensor, batch: _DMDBatch) -> tuple[Tensor, Tensor]:
        """``(loss to minimise, loss to report)``: the DM loss (weighted per generator step when
        ``balance_generator_steps``) plus the GAN and regression terms; the reported DM loss is unweighted."""
        space, t = self.space, batch.dm_timesteps
        with torch.no_grad():
            x_t = space.noise(x.detach(), batch.dm_noise, per_sample(space.sigma_of(t), x))
            x0_fake = self.run_role(FAKE, x_t, t, batch.cond)
            x0_real = self.real_x0(x_t, t, batch.cond, batch.uncond)
        grad = distribution_matching_gradient(x, x0_real, x0_fake)
        reported = distribution_matching_loss(x.detach(), grad)
        if self.config.balance_generator_steps:
            grad = grad * per_sample(step_weights(space, batch.timesteps), grad)
        loss = distribution_matching_loss(x, grad)
        if batch.gan is not None and self.config.gan_generator_weight > 0:
            size = x.shape[0]
            gan = self.config.gan_generator_weight * gan_generator_loss(
                self.realism_logits(x, batch.gan.timesteps[:size], batch.gan.noise[:size], self._gan_cond(batch)))
            loss, reported = loss + gan, reported + gan.detach()
        if batch.regression is not None:
            draws = batch.regression
            regression = self.config.regression_weight * regression_loss(
                self.run_role(STUDENT, draws.inputs, draws.timesteps, draws.cond, grad=True), draws.targets)
            loss, reported = loss + regression, reported + regression.detach()
        return loss, reported

    def _gan_cond(self, batch: _DMDBatch) -> Cond:
        """Generated samples are classified with their prompt when the data is paired, else all with the empty one."""
        return batch.cond if self.data.paired else batch.uncond

    def fake_loss(self, x: Tensor, batch: _DMDBatch) -> Tensor:
        """The fake score's denoising loss on the detached sample, plus the classifier's GAN loss."""
        t = batch.fake_timesteps
        sigma = self.space.sigma_of(t)
        x_t = self.space.noise(x, batch.fake_noise, per_sample(sigma, x))
        loss = fake_score_loss(self.run_role(FAKE, x_t, t, batch.cond, grad=True), x, sigma)
        if batch.gan is not None and self.config.gan_classifier_weight > 0:
            both = torch.cat([x, batch.gan.real])
            logits = self.realism_logits(both, batch.gan.timesteps, batch.gan.noise,
                                         cond_cat([self._gan_cond(batch), batch.gan.real_cond]))
            fake_logits, real_logits = logits.chunk(2)
            loss = loss + self.config.gan_classifier_weight * gan_classifier_loss(real_logits, fake_logits)
        return loss

    def train_step(self, step: int) -> dict[str, float]:
        """One DMD2 iteration; losses ``"generator"`` (generator iterations only) and ``"fake"``, NaN if not finite."""
        batch = self.sample_batch(step)
        generator_turn = step % self.config.ttur == 0
        x = self.generate(batch, grad=generator_turn)
        losses: dict[str, float] = {}
        if generator_turn:
            self.optimizers[STUDENT].zero_grad(set_to_none=True)
            loss, reported = self.generator_losses(x, batch)
            self.backward(STUDENT, loss)
            stepped = self.step_gradients(STUDENT)
            value = self.rank_mean(reported)
            losses["generator"] = value if stepped and math.isfinite(value) else math.nan
            if math.isnan(losses["generator"]):
                return losses
        self.optimizers[FAKE].zero_grad(set_to_none=True)
        loss = self.fake_loss(x.detach(), batch)
        self.backward(FAKE, loss)
        stepped = self.step_gradients(FAKE)
        value = self.rank_mean(loss)
        losses["fake"] = value if stepped and math.isfinite(value) else math.nan
        return losses

    def fake_state_dict(self) -> dict[str, Tensor]:
        """The fake score's LoRA with ComfyUI keys (``diffusion_model.*``), to keep it for a later run."""
        return lora_state_dict(self.adapters[FAKE])
