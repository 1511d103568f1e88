"""Noise spaces: how a model's sigma relates to the clean sample, the noise and the timestep.

Samplers in Stride have the k-diffusion shape: they see latents ``x`` and a model that maps
``(x, sigma)`` to the denoised ``x0``. Two conventions cover every ComfyUI model type:

* ``"ve"`` (EPS, V_PREDICTION and X0 models): ``x = x0 + sigma * eps``. This is the
  variance-preserving latent of diffusers divided by ``sqrt(alpha_cumprod)``, with
  ``sigma = sqrt((1 - alpha_cumprod) / alpha_cumprod)``.
* ``"flow"`` (CONST / rectified flow): ``x = (1 - sigma) * x0 + sigma * eps``.

Both are ``x = a(sigma) * x0 + b(sigma) * eps``. Methods defined on discrete training
timesteps (LCM, TCD, TDD) also need the map between sigma and timestep, given here by a
table of 1000 sigmas (timestep ``t`` -> ``sigma_table[t]``), interpolated in log-sigma like
ComfyUI's ``ModelSamplingDiscrete``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def time_shift(t: Tensor, shift: float) -> Tensor:
    """Rectified-flow time shift ``shift t / (1 + (shift - 1) t)`` of raw time ``t`` in [0, 1].

    The one copy of this formula: SD3's and Wan's ``shift``, pi-Flow's warp, and FLUX's resolution
    shift ``exp(mu) / (exp(mu) + 1 / t - 1)``, which is the same map with ``shift = exp(mu)``.
    """
    return shift * t / (1 + (shift - 1) * t)


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """The SD1.5/SDXL training schedule (diffusers ``beta_schedule="scaled_linear"``), float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class NoiseSpace:
    """One model's noise convention plus its sigma <-> timestep table (float64, ascending)."""

    kind: str  # "ve" or "flow"
    sigma_table: Tensor

    def __post_init__(self) -> None:
        if self.kind not in ("ve", "flow"):
            raise ValueError(f"noise space kind must be 've' or 'flow', got {self.kind!r}")
        if self.sigma_table.ndim != 1 or self.sigma_table.numel() < 2:
            raise ValueError("sigma_table must be a 1-D table with at least two entries")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> NoiseSpace:
        """A discrete VE space (EPS / V-prediction model) from its training ``alphas_cumprod``."""
        ac = alphas_cumprod.to(torch.float64)
        return cls("ve", ((1 - ac) / ac).sqrt())

    @classmethod
    def from_sigma_table(cls, kind: str, table: Tensor) -> NoiseSpace:
        """A space from a host's per-timestep sigma table (e.g. ComfyUI's ``model_sampling.sigmas``),
        resampled to the 1000-step grid when the host keeps a different number of entries."""
        table = table.detach().to("cpu", torch.float64)
        if table.numel() != NUM_TRAIN_TIMESTEPS:
            index = torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64) * table.numel() / NUM_TRAIN_TIMESTEPS
            table = table[(index.round().long() - 1).clamp(0, table.numel() - 1)]
        return cls(kind, table)

    @classmethod
    def flow(cls, shift: float = 1.0, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> NoiseSpace:
        """A rectified-flow space: timestep t -> shifted sigma of (t + 1) / num_timesteps."""
        t = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        return cls("flow", time_shift(t, shift))

    # -- convention -----------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.sigma_table.numel()

    def coefficients(self, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``x = a * x0 + b * eps`` at ``sigma``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.kind == "ve":
            return torch.ones_like(sigma), sigma
        return 1 - sigma, sigma

    def scalar_coefficients(self, sigma: float) -> tuple[float, float]:
        """:meth:`coefficients` of one Python float, as floats (the samplers' per-step path: no tensors)."""
        return (1.0, sigma) if self.kind == "ve" else (1.0 - sigma, sigma)

    def _coefficients_for(self, sigma: Tensor | float, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """Coefficients ready to scale ``like``: floats for a float sigma, else tensors in its dtype and device;
        a 1-D sigma is one value per batch element (:func:`per_sample`)."""
        if isinstance(sigma, float):
            return self.scalar_coefficients(sigma)
        a, b = self.coefficients(sigma)
        if a.ndim == 1:
            return per_sample(a, like), per_sample(b, like)
        return a.to(like.dtype), b.to(like.dtype)

    def noise(self, x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
        """Put ``x0`` at noise level ``sigma`` with the given unit noise."""
        a, b = self._coefficients_for(sigma, x0)
        # floats (a float sigma): one fused multiply-add, and no scaling of x0 when a = 1 (the VE case)
        if isinstance(a, float) and isinstance(b, float):
            return torch.add(x0 if a == 1.0 else x0 * a, eps, alpha=b)
        return x0 * a + eps * b

    def eps(self, x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
        """The noise implied by a latent ``x`` at ``sigma`` and a prediction ``x0`` (sigma > 0)."""
        a, b = self._coefficients_for(sigma, x)
        return (x - x0 * a) / b

    def ddim(self, x: Tensor, x0: Tensor, sigma: Tensor | float, sigma_target: Tensor | float) -> Tensor:
        """Deterministic DDIM move of ``x`` at ``sigma`` to ``sigma_target`` given the prediction ``x0``.

        Keeps the implied noise ``eps_hat = (x - a x0) / b`` and re-weights it: ``a_s x0 + b_s eps_hat``.
        This is also DPM-Solver++(1) and, on flow models, one Euler step. Sigmas are floats (one for the
        batch) or tensors (one per sample); a float ``sigma_target`` of 0 returns ``x0``.
        """
        if isinstance(sigma_target, float) and sigma_target == 0:
            return x0
        return self.noise(x0, self.eps(x, x0, sigma), sigma_target)

    def vp_scaled(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``x`` in variance-preserving scale, ``x / sqrt(a^2 + b^2)``, at per-sample ``sigma``."""
        a, b = self.coefficients(sigma)
        return x * per_sample((a**2 + b**2).rsqrt(), x)

    def renoise(self, x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float, noise: Tensor) -> Tensor:
        """Forward-diffuse ``x`` from ``sigma_from`` to a noisier ``sigma_to`` with fresh unit noise.

        With ``x = a_f x0 + b_f eps`` the result is ``a_t x0 + b_t eps'`` in distribution:
        ``(a_t / a_f) x + sqrt(b_t^2 - (a_t b_f / a_f)^2) noise``.
        """
        if isinstance(sigma_from, float) and isinstance(sigma_to, float):
            (a_f, b_f), (a_t, b_t) = self.scalar_coefficients(sigma_from), self.scalar_coefficients(sigma_to)
            ratio = a_t / a_f
            return torch.add(x if ratio == 1.0 else x * ratio, noise,
                             alpha=math.sqrt(max(b_t**2 - (ratio * b_f) ** 2, 0.0)))
        a_from, b_from = self.coefficients(sigma_from)
        a_to, b_to = self.coefficients(sigma_to)
        ratios = a_to / a_from
        extra = (b_to**2 - (ratios * b_from) ** 2).clamp(min=0).sqrt()
        return x * ratios.to(x.dtype) + noise * extra.to(x.dtype)

    def alpha_cumprod(self, sigma: Tensor | float) -> Tensor:
        """The variance-preserving ``alpha_cumprod`` equivalent of ``sigma`` (signal fraction)."""
        a, b = self.coefficients(sigma)
        return a**2 / (a**2 + b**2)

    def sigma_at_half_log_snr(self, lam: Tensor) -> Tensor:
        """The sigma whose ``log(a / b)`` equals ``lam`` (the inverse of the half log-SNR)."""
        return torch.exp(-lam) if self.kind == "ve" else torch.sigmoid(-lam)

    # -- timesteps ------------------------------------------------------------------------
    @cached_property
    def log_sigma_table(self) -> Tensor:
        return self.sigma_table.log()

    def sigma_of(self, timestep: Tensor | float) -> Tensor:
        """Sigma at (possibly fractional) training timestep(s), log-linear between table entries."""
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_table = self.log_sigma_table
        return ((1 - w) * log_table[low] + w * log_table[high]).exp()

    @cached_property
    def _log_sigma_list(self) -> list[float]:
        return self.log_sigma_table.tolist()

    @cached_property
    def _sigma_min(self) -> float:
        return float(self.sigma_table[0])

    def scalar_sigma_of(self, timestep: float) -> float:
        """:meth:`sigma_of` of one Python number, as a float (no tensors)."""
        t = min(max(float(timestep), 0.0), self.num_timesteps - 1.0)
        low, high = math.floor(t), math.ceil(t)
        w = t - low
        return math.exp((1 - w) * self._log_sigma_list[low] + w * self._log_sigma_list[high])

    def scalar_timestep_of(self, sigma: float) -> float:
        """:meth:`timestep_of` of one Python float, as a float (no tensors)."""
        logs = self._log_sigma_list
        log_sigma = logs[0] if sigma <= self._sigma_min else math.log(sigma)
        high = min(max(bisect.bisect_left(logs, log_sigma), 1), self.num_timesteps - 1)
        low = high - 1
        return low + min(max((log_sigma - logs[low]) / (logs[high] - logs[low]), 0.0), 1.0)

    def timestep_of(self, sigma: Tensor | float) -> Tensor:
        """Fractional training timestep of ``sigma`` (inverse of :meth:`sigma_of`)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_table = self.log_sigma_table
        log_sigma = sigma.reshape(-1).clamp(min=self.sigma_table[0]).log()
        high = torch.searchsorted(log_table, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = ((log_sigma - log_table[low]) / (log_table[high] - log_table[low])).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def sigmas_for_timesteps(self, timesteps: list[int] | Tensor, append_zero: bool = True) -> Tensor:
        """The SIGMAS of a schedule given as training timesteps (descending), plus a final 0."""
        sigmas = self.sigma_of(torch.as_tensor(timesteps, dtype=torch.float64))
        if append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return sigmas


# -- per-sample values ---------------------------------------------------------------------------
def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or inf, by one summation (NaN/inf propagate through a sum), which
    is ~30x cheaper than ``isfinite(x).all()`` on a latent: the samplers' per-step check."""
    if x.numel() == 0:
        return True
    return math.isfinite(float(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)))


def require_finite(x: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``x`` holds NaN or inf: a decoder, metric or trainer fed such
    values would otherwise return a silently wrong answer (NaN decodes to black, NaN scores compare false)."""
    if not all_finite(x):
        raise ValueError(f"{what} contain NaN or inf values")


def per_sample(values: Tensor | float, like: Tensor) -> Tensor:
    """``values`` (a scalar or one per sample) shaped to broadcast over ``like`` (batch first), in its dtype/device."""
    if isinstance(values, Tensor):
        values = values.to(device=like.device, dtype=like.dtype)
    else:
        values = torch.tensor(values, dtype=like.dtype, device=like.device)
    if values.ndim == 0:
        return values.reshape([1] * like.ndim)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def sigma_batch(sigma: Tensor | float, n: int, device: torch.device) -> Tensor:
    """``sigma`` (scalar, 0-d or ``(n,)``) as a float64 ``(n,)`` tensor on ``device``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
    if sigma.numel() == 1:
        return sigma.expand(n)
    if sigma.numel() != n:
        raise ValueError(f"sigma has {sigma.numel()} entries for a batch of {n}")
    return sigma


# -- prediction types ------------------------------------------------------------------------------
PREDICTION_KINDS = ("x0", "eps", "v", "velocity")


def prediction_target(x: Tensor, x0: Tensor, sigma: Tensor | float, space: NoiseSpace, kind: str) -> Tensor:
    """What a model of prediction type ``kind`` should output at ``(x, sigma)`` when the clean sample is ``x0``.

    With ``x = a x0 + b eps`` (``sigma > 0`` except for ``"x0"``):

    * ``"x0"``: ``x0``.
    * ``"eps"``: ``eps = (x - a x0) / b``; a ComfyUI EPS model outputs this.
    * ``"v"``: ``v = alpha eps - s x0`` with the variance-preserving ``alpha = a / sqrt(a^2 + b^2)``,
      ``s = b / sqrt(a^2 + b^2)``. In the VE space this is ``(eps - sigma x0) / sqrt(1 + sigma^2)``,
      which ComfyUI's ``V_PREDICTION.calculate_denoised`` (``sigma_data = 1``) maps back to ``x0``.
    * ``"velocity"``: ``(x - x0) / sigma = dx/dsigma`` of the probability-flow ODE; in the flow space
      ``eps - x0`` (a ComfyUI CONST model's output), in the VE space equal to ``eps``.

    Computed in float64; the result has ``x``'s dtype.
    """
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"prediction kind must be one of {PREDICTION_KINDS}, got {kind!r}")
    if kind == "x0":
        return x0
    x64, x064 = x.to(torch.float64), x0.to(torch.float64)
    sigma64 = sigma_batch(sigma, x.shape[0], x.device)
    a, b = (per_sample(c, x64) for c in space.coefficients(sigma64))
    if kind == "velocity":
        out = (x64 - x064) / per_sample(sigma64, x64)
    else:
        eps = (x64 - a * x064) / b
        out = eps if kind == "eps" else (a * eps - b * x064) / (a**2 + b**2).sqrt()
    return out.to(x.dtype)


def x0_from_prediction(x: Tensor, prediction: Tensor, sigma: Tensor | float, space: NoiseSpace, kind: str) -> Tensor:
    """The clean sample implied by a model output of type ``kind`` (inverse of :func:`prediction_target`)."""
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"prediction kind must be one of {PREDICTION_KINDS}, got {kind!r}")
    if kind == "x0":
        return prediction
    x64, p64 = x.to(torch.float64), prediction.to(torch.float64)
    sigma64 = sigma_batch(sigma, x.shape[0], x.device)
    a, b = (per_sample(c, x64) for c in space.coefficients(sigma64))
    if kind == "velocity":
        out = x64 - per_sample(sigma64, x64) * p64
    elif kind == "eps":
        out = (x64 - b * p64) / a
    else:
        # x = a x0 + b eps and v = (a eps - b x0) / norm  =>  x0 = (a x - b norm v) / (a^2 + b^2).
        norm2 = a**2 + b**2
        out = (a * x64 - b * norm2.sqrt() * p64) / norm2
    return out.to(x.dtype)


# -- conversion between noise conventions -------------------------------------------------------
def sigma_for_noise_ratio(kind: str, ratio: Tensor | float) -> Tensor:
    """The sigma of a ``kind`` space ("ve" or "flow") whose noise-to-signal ratio ``b / a`` is ``ratio``.

    VE: ``sigma = ratio``; flow: ``(1 - s) * ratio = s``, so ``s = ratio / (1 + ratio)``.
    """
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    if kind == "ve":
        return ratio
    if kind == "flow":
        return ratio / (1 + ratio)
    raise ValueError(f"noise space kind must be 've' or 'flow', got {kind!r}")


def _noise_ratio(space: NoiseSpace, sigma: Tensor | float) -> Tensor:
    a, b = space.coefficients(sigma)
    if (a == 0).any():
        raise ValueError(
            f"sigma {float(torch.as_tensor(sigma).max())} of a {space.kind} space is pure noise (no signal): "
            "it has no equivalent in another noise convention"
        )
    return b / a


def convert_sigmas(sigmas: Tensor, source: NoiseSpace, target: NoiseSpace) -> Tensor:
    """Sigmas of ``source`` mapped to ``target`` at equal signal-to-noise ratio (same dtype as ``sigmas``).

    VE -> flow: ``s = sigma / (1 + sigma)``; flow -> VE: ``sigma = s / (1 - s)``. Spaces of the same
    kind share the ratio at equal sigma, so their sigmas come back unchanged (the very tensor).
    """
    if source.kind == target.kind:
        return sigmas
    converted = sigma_for_noise_ratio(target.kind, _noise_ratio(source, sigmas.detach().to("cpu", torch.float64)))
    return converted.to(sigmas.device, sigmas.dtype)


def convert_latent(x: Tensor, sigma: Tensor | float, source: NoiseSpace, target: NoiseSpace) -> Tensor:
    """A latent at ``sigma`` of ``source`` rewritten in ``target``'s convention at the SNR-matched sigma.

    With ``x = a x0 + b eps`` in both conventions and equal ``b / a``, the target latent is
    ``(a_target / a_source) x``: VE -> flow ``x_flow = (1 - s) x_ve``, flow -> VE ``x_ve = x_flow / (1 - s)``.
    The same ``x0`` and ``eps`` stay behind it, so an exact model predicts the same ``x0`` from either.
    ``sigma`` is a scalar or one value per batch element.
    """
    if source.kind == target.kind:
        return x
    sigma64 = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    a_source, _ = source.coefficients(sigma64)
    a_target, _ = target.coefficients(convert_sigmas(sigma64, source, target))
    scale = a_target / a_source
    if scale.ndim == 1:  # one sigma per batch element
        scale = scale.reshape(-1, *([1] * (x.ndim - 1)))
    return x * scale.to(x.device, x.dtype)
