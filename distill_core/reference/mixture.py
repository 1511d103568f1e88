"""The analytic reference: Gaussian-mixture data whose exact denoiser and flow map are known.

With data ``x0`` from a mixture of isotropic Gaussians and ``x = a x0 + b eps`` (the
:class:`~distill_core.spaces.NoiseSpace` convention), each component's posterior of ``x0``
given ``x`` is Gaussian and the component responsibilities are a softmax of the components'
log-likelihoods of ``x``. That gives two exact models for any sigma and space:

* the *denoiser* ``E[x0 | x]`` (:meth:`GaussianMixture.denoise`), the ideal many-step teacher;
* the *flow map* (:meth:`GaussianMixture.flow_map`): the probability-flow ODE solved
  accurately from ``(x, sigma)`` to 0, the ideal consistency-distilled student.

:class:`GaussianMixture` draws a whole latent from one component (optionally one set of
components per class label, so classifier-free guidance matters); :class:`FactorizedMixture`
draws each latent location's channel vector independently, which makes its x0-posterior a
per-location Gaussian mixture, the form of a pi-Flow GM policy.

Everything is computed in float64 on the input's device; results come back in the input's dtype.
The probability-flow solver is :mod:`distill_core.reference.ode`; the demo's mixture is
:mod:`distill_core.reference.demo`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..spaces import NoiseSpace, per_sample, prediction_target, sigma_batch
from .ode import solve_probability_flow


# ---------------------------------------------------------------------------------------------
# Whole-latent Gaussian mixture
# ---------------------------------------------------------------------------------------------
class Posterior(NamedTuple):
    """The x0-posterior given ``x_t``: a mixture of isotropic Gaussians per sample.

    ``responsibilities`` ``(n, K)`` (sum to 1), ``means`` ``(n, K, C, H, W)``, ``variances`` ``(n, K)``
    (per-element variance of component k's Gaussian posterior).
    """

    responsibilities: Tensor
    means: Tensor
    variances: Tensor


class _ComponentMeans:
    """Shape facts shared by the mixtures: ``means`` is ``(K, C, H, W)``."""

    means: Tensor

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return self.means[0].numel()


class GaussianMixture(_ComponentMeans):
    """Data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` over whole latents of shape ``(C, H, W)``.

    ``means`` ``(K, C, H, W)``, ``stds`` ``(K,)`` (or a scalar for all), ``log_weights`` ``(K,)``
    (normalised here; ``-inf`` drops a component) and optional ``classes`` ``(K,)``: each class
    label's components form a sub-mixture with the renormalised weights. Methods taking
    ``class_ids`` ``(n,)`` use that class's sub-mixture per sample; ``None`` or a negative id
    means the unconditional mixture (every component).
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        log_weights: Tensor | None = None,
        classes: Tensor | None = None,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 4:
            raise ValueError(f"means must have shape (K, C, H, W), got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64, device=means.device).reshape(-1).expand(k).clone()
        if (stds <= 0).any():
            raise ValueError("component stds must be positive")
        if log_weights is None:
            log_weights = torch.zeros(k, dtype=torch.float64, device=means.device)
        log_weights = torch.as_tensor(log_weights, dtype=torch.float64, device=means.device).reshape(k)
        self.means = means
        self.stds = stds
        self.log_weights = torch.log_softmax(log_weights, dim=0)
        self.classes = (None if classes is None
                        else torch.as_tensor(classes, dtype=torch.long, device=means.device).reshape(k))
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}


    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(flat means (K, D), stds, log-weights, classes) on ``device``, cached."""
        device = torch.device(device)
        if device not in self._device_cache:
            classes = None if self.classes is None else self.classes.to(device)
            self._device_cache[device] = (
                self.means.reshape(self.num_components, -1).to(device),
                self.stds.to(device),
                self.log_weights.to(device),
                classes,
            )
        return self._device_cache[device]

    def conditional_log_weights(self, n: int, class_ids: Tensor | None, device: torch.device) -> Tensor:
        """Per-sample normalised log-weights ``(n, K)`` of the (class-)conditional mixture."""
        _, _, log_w, classes = self._params(device)
        log_w = log_w.expand(n, -1)
        if class_ids is None:
            return log_w
        if classes is None:
            raise ValueError("class_ids given but this mixture has no classes")
        class_ids = torch.as_tensor(class_ids, device=device).reshape(-1)
        if class_ids.numel() != n:
            raise ValueError(f"class_ids has {class_ids.numel()} entries for a batch of {n}")
        in_class = (classes.unsqueeze(0) == class_ids.unsqueeze(1)) | (class_ids.unsqueeze(1) < 0)
        empty = ~(in_class & torch.isfinite(log_w)).any(dim=1)
        if empty.any():
            label = int(class_ids[empty][0])
            raise ValueError(f"class {label} has no component with positive weight in this mixture")
        return torch.log_softmax(log_w.masked_fill(~in_class, -math.inf), dim=1)

    def _joint_log_likelihoods(self, x_flat: Tensor, a: Tensor, b: Tensor, log_w: Tensor) -> Tensor:
        """``log w_k + log N(x; a mu_k, (a^2 s_k^2 + b^2) I)``, shape ``(n, K)``."""
        means, stds, _, _ = self._params(x_flat.device)
        a, b = a.unsqueeze(1), b.unsqueeze(1)
        variance = a**2 * stds**2 + b**2
        squared_distance = (
            (x_flat**2).sum(dim=1, keepdim=True) - 2 * a * (x_flat @ means.T) + a**2 * (means**2).sum(dim=1)
        ).clamp(min=0)
        dim = x_flat.shape[1]
        return log_w - 0.5 * squared_distance / variance - 0.5 * dim * torch.log(2 * math.pi * variance)

    # -- sampling and densities ---------------------------------------------------------------
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        class_ids: Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> tuple[Tensor, Tensor]:
        """``n`` draws ``x0`` ``(n, C, H, W)`` and their component ids ``(n,)``, on the generator's device."""
        device = generator.device if generator is not None else self.means.device
        log_w = self.conditional_log_weights(n, class_ids, device)
        components = torch.multinomial(log_w.exp(), 1, generator=generator).squeeze(1)
        means, stds, _, _ = self._params(device)
        noise = torch.randn((n, self.dim), generator=generator, device=device, dtype=torch.float64)
        x0 = means[components] + stds[components].unsqueeze(1) * noise
        return x0.reshape(n, *self.latent_shape).to(dtype), components

    def marginal_log_prob(
        self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, class_ids: Tensor | None = None
    ) -> Tensor:
        """Exact ``log p_t(x)`` ``(n,)`` of noisy latents at ``sigma`` (differentiable in ``x``)."""
        a, b = space.coefficients(sigma_batch(sigma, x.shape[0], x.device))
        return self._log_prob64(x, a, b, class_ids).to(x.dtype)

    def log_prob(self, x: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """Data log-density ``log p(x0)`` ``(n,)`` (nats, summed over all latent elements)."""
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return self._log_prob64(x, ones, ones * 0, class_ids).to(x.dtype)

    def _log_prob64(self, x: Tensor, a: Tensor, b: Tensor, class_ids: Tensor | None) -> Tensor:
        n = x.shape[0]
        log_w = self.conditional_log_weights(n, class_ids, x.device)
        return torch.logsumexp(self._joint_log_likelihoods(x.reshape(n, -1).to(torch.float64), a, b, log_w), dim=1)

    def component_log_likelihoods(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; mu_k, s_k^2 I)`` ``(n, K)``: argmax is the most responsible component at sigma = 0."""
        n = x.shape[0]
        ones = torch.ones(n, dtype=torch.float64, device=x.device)
        log_w = self.conditional_log_weights(n, None, x.device)
        return self._joint_log_likelihoods(x.reshape(n, -1).to(torch.float64), ones, ones * 0, log_w)

    def expected_nll(
        self, class_ids: Tensor | None = None, num_samples: int = 8192, generator: torch.Generator | None = None
    ) -> float:
        """The data's own expected ``-log p(x0)`` (nats per sample), i.e. its differential entropy.

        For ``x0`` drawn from component k, ``-log p(x0) = -log w_k - log N_k(x0) + log r_k(x0)`` with
        ``r_k`` the responsibility of the true component; the first two terms have exact
        expectations, only the small ``log r_k`` term is estimated by Monte Carlo (low variance).
        With ``class_ids`` the value is averaged over the given labels' conditional mixtures.
        """
        if class_ids is None:
            return self._expected_nll_of(None, num_samples, generator)
        labels, counts = torch.as_tensor(class_ids).reshape(-1).unique(return_counts=True)
        values = [self._expected_nll_of(int(label), num_samples, generator) for label in labels]
        return float(sum(v * int(c) for v, c in zip(values, counts, strict=True)) / counts.sum().item())

    def _expected_nll_of(self, label: int | None, num_samples: int, generator: torch.Generator | None) -> float:
        device = generator.device if generator is not None else self.means.device
        class_ids = None if label is None else torch.full((num_samples,), label, dtype=torch.long, device=device)
        x0, components = self.sample(num_samples, generator, class_ids)
        log_w = self.conditional_log_weights(num_samples, class_ids, device)
        ones = torch.ones(num_samples, dtype=torch.float64, device=device)
        joint = self._joint_log_likelihoods(x0.reshape(num_samples, -1), ones, ones * 0, log_w)
        log_resp = torch.log_softmax(joint, dim=1).gather(1, components.unsqueeze(1)).squeeze(1)
        _, stds, _, _ = self._params(device)
        own_log_w = log_w.gather(1, components.unsqueeze(1)).squeeze(1)
        gaussian_entropy = 0.5 * self.dim * (torch.log(2 * math.pi * stds[components] ** 2) + 1)
        return float((-own_log_w + gaussian_entropy + log_resp).mean())

    # -- posterior, denoiser, flow map ----------------------------------------------------------
    def posterior(
        self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, class_ids: Tensor | None = None
    ) -> Posterior:
        """Exact x0-posterior given ``x = a x0 + b eps``: component k contributes
        ``N((b^2 mu_k + a s_k^2 x) / (b^2 + a^2 s_k^2), s_k^2 b^2 / (b^2 + a^2 s_k^2))``."""
        n = x.shape[0]
        x_flat = x.reshape(n, -1).to(torch.float64)
        responsibilities, mean_coefficient_x, mean_coefficient_mu, variances = self._posterior_terms(
            x_flat, sigma, space, class_ids
        )
        means, _, _, _ = self._params(x.device)
        post_means = mean_coefficient_x.unsqueeze(2) * x_flat.unsqueeze(1) + mean_coefficient_mu.unsqueeze(2) * means
        return Posterior(
            responsibilities.to(x.dtype),
            post_means.reshape(n, self.num_components, *self.latent_shape).to(x.dtype),
            variances.to(x.dtype),
        )

    def _posterior_terms(
        self, x_flat: Tensor, sigma: Tensor | float, space: NoiseSpace, class_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Responsibilities and, per component, the coefficients of ``x`` and ``mu_k`` in the posterior mean,
        and its variance."""
        n = x_flat.shape[0]
        a, b = space.coefficients(sigma_batch(sigma, n, x_flat.device))
        log_w = self.conditional_log_weights(n, class_ids, x_flat.device)
        responsibilities = torch.softmax(self._joint_log_likelihoods(x_flat, a, b, log_w), dim=1)
        _, stds, _, _ = self._params(x_flat.device)
        a, b = a.unsqueeze(1), b.unsqueeze(1)
        denominator = b**2 + a**2 * stds**2
        return responsibilities, a * stds**2 / denominator, b**2 / denominator, stds**2 * b**2 / denominator

    def denoise(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, class_ids: Tensor | None = None) -> Tensor:
        """The exact denoiser ``E[x0 | x]`` (ideal many-step teacher), same dtype as ``x``."""
        return self._denoise64(x, sigma, space, class_ids).to(x.dtype)

    def _denoise64(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, class_ids: Tensor | None) -> Tensor:
        n = x.shape[0]
        x_flat = x.reshape(n, -1).to(torch.float64)
        responsibilities, coefficient_x, coefficient_mu, _ = self._posterior_terms(x_flat, sigma, space, class_ids)
        means, _, _, _ = self._params(x.device)
        x0 = ((responsibilities * coefficient_x).sum(dim=1, keepdim=True) * x_flat
              + (responsibilities * coefficient_mu) @ means)
        return x0.reshape(x.shape)

    def cfg_denoise(
        self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, class_ids: Tensor, scale: float
    ) -> Tensor:
        """Classifier-free guidance on the exact denoisers: ``uncond + scale * (cond - uncond)``."""
        uncond = self._denoise64(x, sigma, space, None)
        cond = self._denoise64(x, sigma, space, class_ids)
        return (uncond + scale * (cond - uncond)).to(x.dtype)

    def targets(
        self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, kind: str, class_ids: Tensor | None = None
    ) -> Tensor:
        """The exact model output of prediction type ``kind`` (see :func:`prediction_target`)."""
        x0 = self._denoise64(x, sigma, space, class_ids)
        return prediction_target(x.to(torch.float64), x0, sigma, space, kind).to(x.dtype)

    def flow_map(
        self,
        x: Tensor,
        sigma: Tensor | float,
        space: NoiseSpace,
        class_ids: Tensor | None = None,
        steps: int = 200,
    ) -> Tensor:
        """The probability-flow ODE solved from ``(x, sigma)`` to 0 with the exact denoiser
        (ideal consistency-distilled student; see :func:`solve_probability_flow`)."""
        final_ratio = 1e-3 * float(self.stds.min())
        solution = solve_probability_flow(
            lambda z, s: self._denoise64(z, s, space, class_ids), x, sigma, space, steps, final_ratio
        )
        return solution.to(x.dtype)

    # -- partners ------------------------------------------------------------------------------
    def reweighted(self, log_weights: Tensor) -> GaussianMixture:
        """The same components with new (unnormalised) log-weights."""
        return GaussianMixture(self.means, self.stds, log_weights, self.classes)

    def sharpened(
        self, keep: Sequence[int], residual_weight: float = 0.0, std_scale: float = 1.0
    ) -> GaussianMixture:
        """A mode-collapsed partner: the components in ``keep`` share all but ``residual_weight`` of the mass
        (in proportion to their weights), the rest share ``residual_weight``; stds are multiplied by
        ``std_scale`` (< 1 also loses diversity inside modes). Class sub-mixtures renormalise their
        own weights; a class left without mass can only be sampled unconditionally."""
        kept = torch.zeros(self.num_components, dtype=torch.bool)
        kept[list(keep)] = True
        kept = kept.to(self.means.device)
        weights = self.weights
        kept_mass = weights[kept].sum()
        dropped_mass = weights[~kept].sum()
        new_weights = torch.where(
            kept,
            weights * (1 - residual_weight) / kept_mass,
            weights * residual_weight / dropped_mass.clamp(min=1e-300),
        )
        return GaussianMixture(self.means, self.stds * std_scale, new_weights.log(), self.classes)


# ---------------------------------------------------------------------------------------------
# Factorized (per-location) mixture
# ---------------------------------------------------------------------------------------------
class PosteriorGM(NamedTuple):
    """Exact per-location x0-posterior of a :class:`FactorizedMixture`, in the pi-Flow GM layout.

    At every location ``(h, w)`` and sample ``i``, ``x0[i, :, h, w]`` is distributed as
    ``sum_k softmax_k(log_weights[i, :, 0, h, w]) N(means[i, k, :, h, w], variance[i] I_C)``
    independently of the other locations. ``means`` ``(n, K, C, H, W)`` in x0 space,
    ``log_weights`` ``(n, K, 1, H, W)`` normalised over K, ``variance`` ``(n,)`` per element.
    """

    means: Tensor
    log_weights: Tensor
    variance: Tensor


class FactorizedMixture(_ComponentMeans):
    """Each location's channel vector drawn independently: ``x0[:, h, w] ~ sum_k w_k[h, w] N(mu_k[:, h, w], s^2 I_C)``.

    ``means`` ``(K, C, H, W)``, ``log_weights`` ``(K, H, W)`` or ``(K,)`` (normalised over K here),
    one shared ``std`` for every component and location.
    """

    def __init__(self, means: Tensor, std: float, log_weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 4:
            raise ValueError(f"means must have shape (K, C, H, W), got {tuple(means.shape)}")
        k, _, h, w = means.shape
        if std <= 0:
            raise ValueError("std must be positive")
        if log_weights is None:
            log_weights = torch.zeros(k, dtype=torch.float64)
        log_weights = torch.as_tensor(log_weights, dtype=torch.float64, device=means.device)
        if log_weights.ndim == 1:
            log_weights = log_weights.reshape(k, 1, 1)
        self.means = means
        self.std = float(std)
        self.log_weights = torch.log_softmax(log_weights.expand(k, h, w), dim=0).contiguous()


    def _location_log_likelihoods(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``log w_k[h,w] + log N(x[:, h, w]; a mu_k[:, h, w], (a^2 s^2 + b^2) I_C)``, shape ``(n, K, H, W)``."""
        means = self.means.to(x.device)
        log_w = self.log_weights.to(x.device)
        a4, b4 = a.reshape(-1, 1, 1, 1), b.reshape(-1, 1, 1, 1)
        variance = a4**2 * self.std**2 + b4**2
        squared_distance = ((x.unsqueeze(1) - a4.unsqueeze(1) * means) ** 2).sum(dim=2)
        channels = self.means.shape[1]
        return log_w - 0.5 * squared_distance / variance - 0.5 * channels * torch.log(2 * math.pi * variance)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple[Tensor, Tensor]:
        """``n`` draws ``x0`` ``(n, C, H, W)`` and the component id per location ``(n, H, W)``."""
        device = generator.device if generator is not None else self.means.device
        k, c, h, w = self.means.shape
        probabilities = self.log_weights.to(device).exp().permute(1, 2, 0).reshape(h * w, k)
        components = torch.multinomial(probabilities.repeat(n, 1), 1, generator=generator).reshape(n, h, w)
        means = self.means.to(device)
        rows, columns = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)
        chosen = means.permute(0, 2, 3, 1)[components, rows, columns]
        noise = torch.randn((n, c, h, w), generator=generator, device=device, dtype=torch.float64)
        x0 = chosen.permute(0, 3, 1, 2) + self.std * noise
        return x0.to(dtype), components

    def marginal_log_prob(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace) -> Tensor:
        """Exact ``log p_t(x)`` ``(n,)`` of noisy latents at ``sigma`` (differentiable in ``x``)."""
        a, b = space.coefficients(sigma_batch(sigma, x.shape[0], x.device))
        return self._log_prob64(x, a, b).to(x.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Data log-density ``log p(x0)`` ``(n,)`` (nats, summed over all latent elements)."""
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return self._log_prob64(x, ones, ones * 0).to(x.dtype)

    def _log_prob64(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        joint = self._location_log_likelihoods(x.to(torch.float64), a, b)
        return torch.logsumexp(joint, dim=1).sum(dim=(1, 2))

    def expected_nll(self, num_samples: int = 8192, generator: torch.Generator | None = None) -> float:
        """The data's own expected ``-log p(x0)`` (nats per sample); exact terms plus a low-variance
        Monte-Carlo estimate of the responsibility term, as in :meth:`GaussianMixture.expected_nll`."""
        x0, components = self.sample(num_samples, generator)
        ones = torch.ones(num_samples, dtype=torch.float64, device=x0.device)
        joint = self._location_log_likelihoods(x0, ones, ones * 0)
        own = components.unsqueeze(1)
        log_resp = torch.log_softmax(joint, dim=1).gather(1, own).squeeze(1)
        log_w = self.log_weights.to(x0.device).unsqueeze(0).expand(num_samples, -1, -1, -1)
        own_log_w = log_w.gather(1, own).squeeze(1)
        gaussian_entropy = 0.5 * self.dim * (math.log(2 * math.pi * self.std**2) + 1)
        return float((-own_log_w + log_resp).sum(dim=(1, 2)).mean() + gaussian_entropy)

    def posterior_gm(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace) -> PosteriorGM:
        """The exact per-location x0-posterior at ``(x, sigma)`` (see :class:`PosteriorGM`), same dtype as ``x``."""
        means, log_weights, variance = self._posterior64(x, sigma, space)
        return PosteriorGM(means.to(x.dtype), log_weights.to(x.dtype), variance.to(x.dtype))

    def _posterior64(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[0]
        x64 = x.to(torch.float64)
        a, b = space.coefficients(sigma_batch(sigma, n, x.device))
        log_weights = torch.log_softmax(self._location_log_likelihoods(x64, a, b), dim=1).unsqueeze(2)
        denominator = b**2 + a**2 * self.std**2
        coefficient_x = per_sample(a * self.std**2 / denominator, x64.unsqueeze(1))
        coefficient_mu = per_sample(b**2 / denominator, x64.unsqueeze(1))
        means = coefficient_x * x64.unsqueeze(1) + coefficient_mu * self.means.to(x.device)
        return means, log_weights, self.std**2 * b**2 / denominator

    def denoise(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace) -> Tensor:
        """The exact denoiser ``E[x0 | x]``, same dtype as ``x``."""
        return self._denoise64(x, sigma, space).to(x.dtype)

    def _denoise64(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace) -> Tensor:
        means, log_weights, _ = self._posterior64(x, sigma, space)
        return (log_weights.exp() * means).sum(dim=1)

    def targets(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, kind: str) -> Tensor:
        """The exact model output of prediction type ``kind`` (see :func:`prediction_target`)."""
        x0 = self._denoise64(x, sigma, space)
        return prediction_target(x.to(torch.float64), x0, sigma, space, kind).to(x.dtype)

    def flow_map(self, x: Tensor, sigma: Tensor | float, space: NoiseSpace, steps: int = 200) -> Tensor:
        """The probability-flow ODE solved from ``(x, sigma)`` to 0 with the exact denoiser."""
        solution = solve_probability_flow(
            lambda z, s: self._denoise64(z, s, space), x, sigma, space, steps, 1e-3 * self.std
        )
        return solution.to(x.dtype)
