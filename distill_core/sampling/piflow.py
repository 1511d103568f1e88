"""pi-Flow: few-step sampling with network-predicted policies (Lakonik/piFlow).

Once per NFE the network looks at ``(x_src, sigma_src)`` and outputs a *policy*: a cheap,
network-free velocity field valid over the next segment of the trajectory. The sampler then
integrates that policy with many Euler substeps (128 over the whole trajectory by default,
uniform in the un-shifted "raw" time) to the next source point.

Conventions follow the official code: flow space ``x = (1 - sigma) x0 + sigma eps``,
velocity ``u = (x - x0) / sigma`` (so ``dx/dsigma = u``), shifted time
``sigma = shift * t / (1 + (shift - 1) * t)`` with ``t`` the raw time in [0, 1].

Two policies:

* :class:`GMPolicy`: the x0-posterior at the source is a Gaussian mixture per latent
  location (K means, per-location log-weights, one variance shared by all components);
  at any other point of the trajectory its posterior mean follows in closed form.
* :class:`DXPolicy`: N x0 terms from one network output, in one of the official modes:
  ``"grid"``, N x0 predictions on an even grid of raw time over a fixed segment, linearly
  interpolated; or ``"polynomial"``, the coefficients of x0 as a polynomial of degree N - 1 in
  the raw time elapsed since the source.

Inpainting (:class:`Inpainting`) follows the official ComfyUI-piFlow rule: at every substep the
velocity is the policy's where the mask is 1 and, where it is 0, the straight-line velocity
towards the original latent, so the kept region stays the original latent noised to each
substep's sigma and ends exactly at it.

A policy may live on another arrangement of the sampler's latent: :class:`PackedLatentPolicy`
runs one built on the unfolded latent (FLUX.2: 32 channels, where ComfyUI holds each 2x2 patch
folded into 128 channels) on the folded latent, exactly.

``sample_piflow`` has the k-diffusion sampler shape, except that ``model(x, sigma)`` must
return a policy object anchored at ``(x, sigma)`` (a :class:`GMPolicy`, :class:`DXPolicy` or
:class:`PackedLatentPolicy`, or any object with ``velocity``, ``x0`` and ``denoised``, and
optionally ``with_temperature``) instead of a denoised tensor.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import trange

from ..spaces import per_sample, time_shift
from .steps import NoiseSampler, default_noise_sampler

DEFAULT_SHIFT = 3.2
DEFAULT_FINAL_STEP_SIZE_SCALE = 0.5
DEFAULT_SUBSTEPS = 128
AUTO_TEMPERATURE = "auto"
DX_GRID = "grid"
DX_POLYNOMIAL = "polynomial"
DX_MODES = (DX_GRID, DX_POLYNOMIAL)
_EPS = 1e-6  # clamps of the official code (sigma, GM denominators, temperature)


# -- time warping and schedule --------------------------------------------------------------
def warp_time(raw_t: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Sigma of raw time ``t``: :func:`~distill_core.spaces.time_shift` at pi-Flow's default shift."""
    return time_shift(raw_t, shift)


def unwarp_sigma(sigma: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Raw time of ``sigma`` (inverse of :func:`warp_time`)."""
    return sigma / (shift + (1 - shift) * sigma)


def piflow_sigmas(
    nfe: int,
    shift: float = DEFAULT_SHIFT,
    final_step_size_scale: float = DEFAULT_FINAL_STEP_SIZE_SCALE,
    denoise: float = 1.0,
) -> Tensor:
    """The SIGMAS of an ``nfe``-step pi-Flow run (float64, ``nfe + 1`` entries ending in 0).

    Raw times are ``nfe`` evenly spaced points from 1 down to (excluding)
    ``(f - 1) / (nfe + f - 1)``, so every step spans ``1 / (nfe - 1 + f)`` of raw time except
    the last, which is ``f`` times as long. ``denoise < 1`` scales the raw times (img2img),
    as the official ComfyUI node does. 4 NFE: 1, 0.889, 0.706, 0.348, 0.
    """
    if nfe < 1:
        raise ValueError(f"pi-Flow needs at least one step, got nfe={nfe}")
    if not 0 < final_step_size_scale <= 1:
        raise ValueError(f"final_step_size_scale must be in (0, 1], got {final_step_size_scale}")
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    f = final_step_size_scale
    end = (f - 1) / (nfe + f - 1)
    raw = torch.linspace(1.0, end, nfe + 1, dtype=torch.float64)[:-1].clamp(min=0) * denoise
    return torch.cat([warp_time(raw, shift), raw.new_zeros(1)])


def substep_sigmas(sigma_from: float, sigma_to: float, substeps: int = DEFAULT_SUBSTEPS,
                   shift: float = DEFAULT_SHIFT) -> Tensor:
    """The Euler substep grid of one policy rollout from ``sigma_from`` down to ``sigma_to``.

    ``substeps`` is the count for the whole raw-time range [0, 1]; a segment gets
    ``max(1, round(substeps * raw length))`` equal raw-time substeps (official rule).
    Returns float64 sigmas including both ends.
    """
    raw_from = unwarp_sigma(torch.as_tensor(sigma_from, dtype=torch.float64), shift)
    raw_to = unwarp_sigma(torch.as_tensor(sigma_to, dtype=torch.float64), shift)
    count = max(1, int(torch.round((raw_from - raw_to) * substeps)))
    raw = torch.linspace(0.0, 1.0, count + 1, dtype=torch.float64) * (raw_to - raw_from) + raw_from
    sigmas = warp_time(raw.clamp(min=0), shift)
    sigmas[0], sigmas[-1] = float(sigma_from), float(sigma_to)
    return sigmas


def resolve_temperature(temperature: float | str, nfe: int) -> float:
    """The GM temperature to use for an ``nfe``-step run; ``"auto"`` is ``clamp(0.1 (nfe - 1), 0, 1)``."""
    if temperature == AUTO_TEMPERATURE:
        return min(max(0.1 * (nfe - 1), 0.0), 1.0)
    if isinstance(temperature, str):
        raise ValueError(f"temperature must be a number or 'auto', got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return float(temperature)


# -- policies ---------------------------------------------------------------------------------
class Policy(Protocol):
    """What ``sample_piflow`` needs from a policy anchored at its source point.

    A policy with a temperature (GM) also has ``with_temperature(T) -> Policy``, see
    :func:`with_temperature`.
    """

    def velocity(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor: ...

    def x0(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor: ...

    @property
    def denoised(self) -> Tensor: ...


class GMPolicy:
    """Gaussian-mixture policy: the x0-posterior at the source, updated in closed form.

    At the source ``(x_src, sigma_src)`` each latent location's x0 is a K-component mixture
    with means ``means`` (B, K, C, *spatial), log-weights ``logweights`` (B, K, 1, *spatial)
    and an isotropic variance ``variance`` shared by all components and locations
    (broadcastable to (B, 1, 1, *[1])). At another point ``(x_t, sigma_t)`` of the same
    trajectory the posterior is that mixture times the Gaussian likelihood ratio
    ``p(x_t | x0) / p(x_src | x0)``; with ``alpha = 1 - sigma``:
    ``zeta = (a_t/s_t)^2 - (a_src/s_src)^2``, ``nu = a_t x_t/s_t^2 - a_src x_src/s_src^2``,
    ``d = var zeta + 1``, means ``(var nu + mu_k) / d``, log-weights
    ``logw_k + sum_c mu_k (nu - zeta mu_k / 2) / d``. The dropped terms are equal for all
    components only because the variance is shared, which is why it must be.
    """

    def __init__(self, means: Tensor, logweights: Tensor, variance: Tensor, x_src: Tensor,
                 sigma_src: Tensor | float) -> None:
        if means.ndim != x_src.ndim + 1 or means.shape[0] != x_src.shape[0] or means.shape[2:] != x_src.shape[1:]:
            raise ValueError(f"GM means must be (B, K, *x.shape[1:]) = (B, K, {tuple(x_src.shape[1:])}), "
                             f"got {tuple(means.shape)} for x of shape {tuple(x_src.shape)}")
        expected_logw = (means.shape[0], means.shape[1], 1, *means.shape[3:])
        if tuple(logweights.shape) != expected_logw:
            raise ValueError(f"GM log-weights must be {expected_logw}, got {tuple(logweights.shape)}")
        variance = torch.as_tensor(variance, dtype=means.dtype, device=means.device)
        variance = variance.reshape(*variance.shape, *([1] * (means.ndim - variance.ndim)))
        if variance.ndim != means.ndim or any(size != 1 for size in variance.shape[1:]):
            raise ValueError("GM variance must be one value per sample shared by all components, "
                             f"shape (B, 1, 1, ...), got {tuple(variance.shape)}")
        self.means = means
        self.logweights = logweights.log_softmax(dim=1)
        self.variance = variance
        self.x_src = x_src
        self.sigma_src = per_sample(sigma_src, x_src)

    @classmethod
    def from_velocity(cls, means: Tensor, logweights: Tensor, logstds: Tensor, x_src: Tensor,
                      sigma_src: Tensor | float) -> GMPolicy:
        """The policy from a GM network output in velocity space (official layout).

        ``means`` (B, K, C, H, W) are velocities u_k, ``logweights`` (B, K, 1, H, W) logits,
        ``logstds`` (B, 1, 1, 1, 1) the log-std of u. In x0 space the means are
        ``x_src - sigma_src u_k`` and the variance ``exp(2 logstd) sigma_src^2``.
        """
        sigma = per_sample(sigma_src, x_src).unsqueeze(1)
        means_x0 = x_src.unsqueeze(1) - sigma * means
        variance = (2 * logstds).exp() * sigma.square()
        return cls(means_x0, logweights, variance, x_src, sigma_src)

    def with_temperature(self, temperature: float) -> GMPolicy:
        """A copy with log-weights divided by ``T`` (renormalised) and variance times ``T``.

        ``T >= 1`` returns the policy unchanged, as the official code does; ``T`` is clamped
        to at least 1e-6 so ``T = 0`` means "collapse to the most likely component".
        """
        if temperature >= 1:
            return self
        temperature = max(temperature, _EPS)
        return GMPolicy(self.means, self.logweights / temperature, self.variance * temperature,
                        self.x_src, self.sigma_src)

    def x0(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        """Posterior mean of x0 at ``(x_t, sigma_t)`` on this policy's trajectory."""
        sigma_t = per_sample(sigma_t, x_t).clamp(min=_EPS)
        sigma_src = self.sigma_src.clamp(min=_EPS)
        snr_t = (1 - sigma_t) / sigma_t
        snr_src = (1 - sigma_src) / sigma_src
        zeta = (snr_t.square() - snr_src.square()).unsqueeze(1)
        nu = (snr_t * x_t / sigma_t - snr_src * self.x_src / sigma_src).unsqueeze(1)
        denom = (self.variance * zeta + 1).clamp(min=_EPS)
        means = (self.variance * nu + self.means) / denom
        logweights = self.logweights + (self.means * (nu - 0.5 * zeta * self.means)).sum(dim=2, keepdim=True) / denom
        return (logweights.softmax(dim=1) * means).sum(dim=1)

    def velocity(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        """Flow velocity ``(x_t - x0) / sigma_t`` of the policy at ``(x_t, sigma_t)``."""
        return (x_t - self.x0(x_t, sigma_t)) / per_sample(sigma_t, x_t).clamp(min=_EPS)

    @property
    def denoised(self) -> Tensor:
        """x0 at the source (the mixture's mean), e.g. for previews."""
        return (self.logweights.softmax(dim=1) * self.means).sum(dim=1)


class DXPolicy:
    """DX policy: N x0 terms ``x0_terms`` (B, N, C, *spatial) from one network output.

    ``mode`` (the adapter's ``policy_config["mode"]``, official default ``"grid"``):

    * ``"grid"``: x0 predictions spread evenly in raw time over a fixed segment. Entry
      ``N - 1`` belongs to the source, entry 0 to the segment's end ``raw_src - segment_size``
      (clamped at raw time 0); between grid points x0 is linear in raw time, outside the
      segment it is held at the nearest end.
    * ``"polynomial"``: coefficients ``c_n`` of ``x0(t) = sum_n c_n (raw_src - raw_t)^n``, a
      polynomial in the raw time elapsed since the source (not normalised, not clamped);
      ``segment_size`` is not used.

    ``segment_size`` and ``shift`` are properties of the trained adapter (the released pi-FLUX.1 and
    pi-Qwen-Image DX grids: 1 / 3.5 and 3.2), not of the sampling schedule.
    """

    def __init__(self, x0_terms: Tensor, x_src: Tensor, sigma_src: Tensor | float,
                 segment_size: float = 1.0, shift: float = DEFAULT_SHIFT, mode: str = DX_GRID) -> None:
        if (x0_terms.ndim != x_src.ndim + 1 or x0_terms.shape[0] != x_src.shape[0]
                or x0_terms.shape[2:] != x_src.shape[1:]):
            raise ValueError(f"DX terms must be (B, N, *x.shape[1:]), got {tuple(x0_terms.shape)} "
                             f"for x of shape {tuple(x_src.shape)}")
        if mode not in DX_MODES:
            raise ValueError(f"DX mode must be one of {DX_MODES}, got {mode!r}")
        if mode == DX_GRID and segment_size <= 0:
            raise ValueError(f"DX segment_size must be > 0, got {segment_size}")
        self.x0_terms = x0_terms
        self.x_src = x_src
        self.sigma_src = per_sample(sigma_src, x_src)
        self.shift = shift
        self.mode = mode
        self.raw_src = unwarp_sigma(self.sigma_src, shift)
        self.raw_end = (self.raw_src - segment_size).clamp(min=0)
        self.segment = (self.raw_src - self.raw_end).clamp(min=1e-4)

    @classmethod
    def from_velocity(cls, velocities: Tensor, x_src: Tensor, sigma_src: Tensor | float, segment_size: float = 1.0,
                      shift: float = DEFAULT_SHIFT, mode: str = DX_GRID) -> DXPolicy:
        """The policy from a DX network output: N velocities, each term ``x_src - sigma_src u_n``
        (in both modes, as the official code converts every output channel group)."""
        sigma = per_sample(sigma_src, x_src).unsqueeze(1)
        return cls(x_src.unsqueeze(1) - sigma * velocities, x_src, sigma_src, segment_size, shift, mode)

    def x0(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        """x0 at ``sigma_t``'s raw time (``x_t`` is not used by this policy)."""
        raw_t = unwarp_sigma(per_sample(sigma_t, x_t), self.shift)
        if self.mode == DX_POLYNOMIAL:
            return self._polynomial(self.raw_src - raw_t)
        return self._interpolate((raw_t - self.raw_end) / self.segment)

    def _polynomial(self, elapsed: Tensor) -> Tensor:
        """``sum_n c_n elapsed^n`` by Horner's rule (``elapsed`` broadcast per sample)."""
        x0 = self.x0_terms[:, -1]
        for n in range(self.x0_terms.shape[1] - 2, -1, -1):
            x0 = x0 * elapsed + self.x0_terms[:, n]
        return x0

    def _interpolate(self, fraction: Tensor) -> Tensor:
        """Linear interpolation of the grid at ``fraction`` of the segment (0 = end, 1 = source)."""
        count = self.x0_terms.shape[1]
        if count == 1:
            return self.x0_terms[:, 0]
        position = fraction.clamp(0, 1) * (count - 1)
        lower = position.floor().clamp(max=count - 2)
        frac = (position - lower).unsqueeze(1)
        index = lower.long().unsqueeze(1).expand(self.x0_terms.shape[0], 1, *self.x0_terms.shape[2:])
        below = self.x0_terms.gather(1, index)
        above = self.x0_terms.gather(1, index + 1)
        return ((1 - frac) * below + frac * above).squeeze(1)

    def velocity(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        """Flow velocity ``(x_t - x0) / sigma_t`` of the policy at ``(x_t, sigma_t)``."""
        return (x_t - self.x0(x_t, sigma_t)) / per_sample(sigma_t, x_t).clamp(min=1e-4)

    @property
    def denoised(self) -> Tensor:
        """x0 at the source (grid: the last entry; polynomial: the constant term), e.g. for previews."""
        return self.x0(self.x_src, self.sigma_src)


def with_temperature(policy: Policy, temperature: float) -> Policy:
    """``policy`` at GM temperature ``temperature``; policies without a temperature (DX) are returned as they are."""
    cool = getattr(policy, "with_temperature", None)
    return policy if cool is None else cool(temperature)


class PackedLatentPolicy:
    """A policy built on the unfolded latent, used on the folded latent a sampler holds.

    ``inner`` is anchored at ``pixel_shuffle(x, factor)``: the latent whose ``factor`` x ``factor``
    patches the sampler's latent ``x`` folds into channels in (c, p_y, p_x) order (FLUX.2: 32
    channels at twice the resolution of ComfyUI's 128-channel latent, where its policy is
    trained). Inputs are unfolded, outputs folded back; folding only permutes values, so a
    rollout on the folded latent is the inner policy's rollout, folded.
    """

    def __init__(self, inner: Policy, factor: int) -> None:
        self.inner = inner
        self.factor = factor

    def velocity(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        return F.pixel_unshuffle(self.inner.velocity(F.pixel_shuffle(x_t, self.factor), sigma_t), self.factor)

    def x0(self, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        return F.pixel_unshuffle(self.inner.x0(F.pixel_shuffle(x_t, self.factor), sigma_t), self.factor)

    @property
    def denoised(self) -> Tensor:
        return F.pixel_unshuffle(self.inner.denoised, self.factor)

    def with_temperature(self, temperature: float) -> PackedLatentPolicy:
        return PackedLatentPolicy(with_temperature(self.inner, temperature), self.factor)


# -- sampling -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inpainting:
    """Which part of the latent a rollout keeps: ``latent`` (the clean original) where ``mask`` is 0.

    ``mask`` (broadcastable to the latent, ComfyUI's ``denoise_mask`` convention) is 1 where the
    policy generates. The velocity is ``mask u_policy + (1 - mask) (x_t - latent) / sigma_t``
    (the official ComfyUI-piFlow rule): an Euler step with ``(x_t - latent) / sigma_t`` maps
    ``(1 - sigma) latent + sigma eps`` to ``(1 - sigma') latent + sigma' eps`` with the same
    ``eps``, so a kept region that starts as the noised original stays exactly that and ends
    at ``latent`` when sigma reaches 0. Masks between 0 and 1 blend the two velocities.
    The blend is value by value, so it is the same on a folded latent (:class:`PackedLatentPolicy`)
    as on the unfolded one, given a mask in the same arrangement as the latent.
    """

    latent: Tensor
    mask: Tensor

    def velocity(self, policy_velocity: Tensor, x_t: Tensor, sigma_t: Tensor | float) -> Tensor:
        """The rollout velocity at ``(x_t, sigma_t)`` given the policy's velocity there."""
        kept_velocity = (x_t - self.latent) / per_sample(sigma_t, x_t).clamp(min=_EPS)
        return policy_velocity * self.mask + kept_velocity * (1 - self.mask)

    def denoised(self, policy_denoised: Tensor) -> Tensor:
        """The x0 to preview: the policy's where it generates, the original latent where it is kept."""
        return policy_denoised * self.mask + self.latent * (1 - self.mask)


DenoiseMask = Tensor | Callable[[Tensor], Tensor]
"""A denoise mask (1 = generate, 0 = keep), or a function of a step's sigma batch giving that
step's mask (ComfyUI's ``denoise_mask_function``, e.g. Differential Diffusion)."""


def rollout(policy: Policy, x: Tensor, sigmas: Tensor, inpainting: Inpainting | None = None) -> Tensor:
    """Euler-integrate ``dx/dsigma = policy.velocity`` along the grid ``sigmas`` (masked by ``inpainting``)."""
    ones = x.new_ones([x.shape[0]])
    for sigma, sigma_next in itertools.pairwise(sigmas.tolist()):
        velocity = policy.velocity(x, sigma * ones)
        if inpainting is not None:
            velocity = inpainting.velocity(velocity, x, sigma * ones)
        x = x + (sigma_next - sigma) * velocity
    return x


def stochastic_target(sigma_from: float, sigma_to: float, h: float) -> tuple[float, float]:
    """``(sigma_dst, m)`` of the official flow-map SDE step with diffusion coefficient ``h``.

    The policy is rolled out to ``sigma_dst``, then
    ``x_to = (alpha_to + sigma_to m) x_dst + sigma_to sqrt(1 - m^2) z``. ``h = 0``: m = 1 and
    ``sigma_dst = sigma_to`` (deterministic); ``m = (sigma_to alpha_from / (sigma_from alpha_to))^(h^2)``.
    """
    if h < 0:
        raise ValueError(f"diffusion coefficient h must be >= 0, got {h}")
    alpha_from, alpha_to = 1 - sigma_from, 1 - sigma_to
    m = 1.0 if h == 0 else (sigma_to * alpha_from / max(sigma_from * alpha_to, _EPS)) ** (h * h)
    sigma_dst = sigma_to * m / max(alpha_to + sigma_to * m, _EPS)
    return sigma_dst, m


@torch.no_grad()
def sample_piflow(
    model: Callable[..., Policy],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    *,
    substeps: int = DEFAULT_SUBSTEPS,
    h: float = 0.0,
    temperature: float | str = AUTO_TEMPERATURE,
    shift: float = DEFAULT_SHIFT,
    noise_sampler: NoiseSampler | None = None,
    latent_image: Tensor | None = None,
    denoise_mask: DenoiseMask | None = None,
) -> Tensor:
    """pi-Flow sampling: one policy per step, integrated with Euler substeps.

    ``model(x, sigma_batch, **extra_args)`` returns a policy anchored at ``(x, sigma)``.
    ``substeps`` counts substeps over the whole raw-time range (split per step by raw
    length), ``shift`` is the time warp that defines raw time (3.2 for the released
    adapters), ``h`` the diffusion coefficient of the optional stochastic step (0 =
    deterministic), ``temperature`` the GM temperature for all steps but the last (a number
    or ``"auto"``; ``>= 1`` leaves policies unchanged; applied to every policy that has a
    temperature, see :func:`with_temperature`). ``callback`` gets the policy's x0 at
    the source as ``denoised``, once per step.

    Inpainting: with a ``denoise_mask`` (1 = generate, 0 = keep; or a function of the step's
    sigma batch returning that step's mask) the kept region follows ``latent_image`` (the clean
    original), see :class:`Inpainting`; ``x`` must then start as ``latent_image`` noised to
    ``sigmas[0]``. With ``h > 0`` the stochastic step re-noises the kept region too, as the
    official sampler does: it stays the original latent noised to each sigma, with that step's noise.
    """
    extra_args = {} if extra_args is None else extra_args
    inpainting_inputs: tuple[Tensor, DenoiseMask] | None = None  # (latent_image, denoise_mask)
    if denoise_mask is not None:
        if latent_image is None:
            raise ValueError("a denoise_mask needs the latent_image whose masked-out region it keeps")
        inpainting_inputs = (latent_image, denoise_mask)
    nfe = len(sigmas) - 1
    gm_temperature = resolve_temperature(temperature, nfe)
    if noise_sampler is None:  # only drawn from when h > 0
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    ones = x.new_ones([x.shape[0]])
    for i in trange(nfe, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_batch = sigmas[i] * ones
        policy = model(x, sigma_batch, **extra_args)
        if i < nfe - 1:
            policy = with_temperature(policy, gm_temperature)
        inpainting = None
        if inpainting_inputs is not None:
            original, mask = inpainting_inputs
            inpainting = Inpainting(original, mask(sigma_batch) if callable(mask) else mask)
        if callback is not None:
            denoised = policy.denoised if inpainting is None else inpainting.denoised(policy.denoised)
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_dst, m = stochastic_target(sigma, sigma_next, h)
        x_dst = rollout(policy, x, substep_sigmas(sigma, sigma_dst, substeps, shift), inpainting)
        if m == 1.0:
            x = x_dst
        else:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = (1 - sigma_next + sigma_next * m) * x_dst + sigma_next * (1 - m * m) ** 0.5 * noise
    return x
