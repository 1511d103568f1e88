"""pi-Flow nodes: policy sampling, its schedule and an exact reference (adapters: :mod:`.piflow_loader`).

A pi-Flow network outputs a *policy* once per step (a Gaussian mixture per latent location,
"GM", or x0 predictions on a time grid or as a polynomial in time, "DX"); the sampler
integrates it with many cheap substeps (``distill_core.sampling.piflow``). Inside ComfyUI a pi-Flow
MODEL stays an ordinary flow model: its
network returns the policy's mean velocity (so ComfyUI's pipeline, previews and plain samplers
work), and also deposits the full policy in a :class:`PolicyStash` that the Stride pi-Flow
sampler puts into ``transformer_options`` for each model call. The stash is a plain object, not
a list or dict: ComfyUI merges ``transformer_options`` per call and copies lists and dicts, but
passes other objects by reference. All nodes are V3 nodes (:mod:`.compat`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

import comfy.samplers

from ..distill_core import piflow_adapter
from ..distill_core.methods import METHODS, PiFlowSchedule, schedule_as
from ..distill_core.reference.demo import piflow_demo_mixture
from ..distill_core.reference.mixture import FactorizedMixture
from ..distill_core.sampling import piflow
from ..distill_core.spaces import NoiseSpace
from .compat import (
    StrideError,
    combo,
    inpainting_latent,
    io,
    is_flow,
    mask_function_options,
    model_sampling_of_patcher,
    sampling_kind,
    step_noise_sampler,
)
from .reference import AnalyticModule, wrap_as_model
from .samplers import check_sigmas, denoise_input, require_finite_latent, sample_with, seed_input

CATEGORY = "stride/piflow"
STASH_KEY = "stride_piflow_stash"
TEMPERATURE_MODES = ["auto", "manual"]
# the registry entries whose settings are these nodes' defaults (every released pi-Flow adapter shares them)
PIFLOW_FLUX1, PIFLOW_FLUX2 = METHODS["pi-flux1-gm-4step"], METHODS["pi-flux2-gm"]
PIFLOW_KNOBS, PIFLOW_SCHEDULE = PIFLOW_FLUX1.sampler.knobs, schedule_as(PIFLOW_FLUX1, PiFlowSchedule)
FLUX_GUIDANCE_TEXT = (f"Flux guidance {PIFLOW_FLUX1.flux_guidance:g} for FLUX.1 and {PIFLOW_FLUX2.flux_guidance:g} "
                      "for FLUX.2 adapters")
NOT_A_PIFLOW_MODEL = ("model: this model did not output a pi-Flow policy. Load a pi-Flow adapter onto its FLUX.1, "
                      "FLUX.2 or Qwen-Image model with 'Stride pi-Flow Adapter Loader' (or use 'Stride pi-Flow "
                      "Reference "
                      "Teacher'); plain models need a plain sampler.")
GUIDANCE_HINT = ("pi-Flow models have guidance distilled in: use BasicGuider (or CFGGuider with cfg 1.0) with one "
                 "positive conditioning (no negative prompt, areas or combined conditionings)")


# ------------------------------------------------------------------------------------------
# The policy stash: network -> sampler
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyOutput:
    """One network call's policy in the official velocity-space layout.

    GM: ``tensors = (means (B, K, C, H, W), logweights (B, K, 1, H, W), logstds (B, 1, 1, 1, 1))``.
    DX: ``tensors = (velocities (B, N, C, H, W),)`` with the adapter's ``segment_size``, ``shift``
    and ``mode`` (``policy_config["mode"]``: "grid", the default, or "polynomial", which has no
    segment size).
    """

    kind: str
    tensors: tuple[Tensor, ...]
    segment_size: float = 0.0
    shift: float = piflow.DEFAULT_SHIFT
    mode: str = piflow.DX_GRID

    @property
    def rows(self) -> int:
        return self.tensors[0].shape[0]


class PolicyStash:
    """Collects the policies a pi-Flow network deposits during one sampler model call."""

    def __init__(self) -> None:
        self.outputs: list[PolicyOutput] = []

    def policy(self, x: Tensor, sigma: Tensor) -> piflow.Policy:
        """The policy anchored at ``(x, sigma)``, from all deposited chunks in batch order.

        A policy deposited for the unfolded latent of ``x`` (FLUX.2: 32 channels at twice the
        resolution of ComfyUI's 128-channel latent) is built there and used through
        :class:`distill_core.sampling.piflow.PackedLatentPolicy`.
        """
        if not self.outputs:
            raise StrideError(NOT_A_PIFLOW_MODEL)
        rows = sum(output.rows for output in self.outputs)
        if rows != x.shape[0]:
            raise StrideError(f"guider: the model produced policies for {rows} latents, but the batch has "
                              f"{x.shape[0]}. {GUIDANCE_HINT}.")
        first = self.outputs[0]
        settings = (first.kind, first.segment_size, first.shift, first.mode)
        if any((o.kind, o.segment_size, o.shift, o.mode) != settings for o in self.outputs):
            raise StrideError("model: one model call produced different kinds of pi-Flow policy")
        tensors = [torch.cat([o.tensors[i] for o in self.outputs]).to(x) for i in range(len(first.tensors))]
        factor = piflow_adapter.packing_factor(tensors[0].shape[2:], x.shape[1:])
        if not factor:
            raise StrideError(f"guider: the policy covers latents of shape {tuple(tensors[0].shape[2:])}, the batch is "
                              f"{tuple(x.shape[1:])}. {GUIDANCE_HINT}.")
        source = F.pixel_shuffle(x, factor) if factor > 1 else x  # FLUX.2: the policy's unfolded latent
        policy: piflow.Policy
        if first.kind == "gm":
            means, logweights, logstds = tensors
            policy = piflow.GMPolicy.from_velocity(means, logweights, logstds, source, sigma)
        else:
            policy = piflow.DXPolicy.from_velocity(tensors[0], source, sigma, first.segment_size, first.shift,
                                                   first.mode)
        return piflow.PackedLatentPolicy(policy, factor) if factor > 1 else policy


def deposit_policy(transformer_options: dict, output: PolicyOutput) -> None:
    """Hand a network's policy to the sampler's stash, if this call has one (plain samplers don't)."""
    stash = transformer_options.get(STASH_KEY)
    if stash is not None:
        stash.outputs.append(output)


def policy_model(model: Callable[..., Tensor]) -> Callable[..., piflow.Policy]:
    """``model(x, sigma, **extra_args) -> policy`` on top of ComfyUI's denoiser ``model``.

    Each call gets a fresh stash in copies of ``model_options`` and its ``transformer_options``
    (the shared dicts are never modified); the denoised output itself is not needed.
    """

    def call(x: Tensor, sigma: Tensor, **extra_args: Any) -> piflow.Policy:
        stash = PolicyStash()
        model_options = dict(extra_args.get("model_options") or {})
        model_options["transformer_options"] = {**model_options.get("transformer_options", {}), STASH_KEY: stash}
        model(x, sigma, **{**extra_args, "model_options": model_options})
        return stash.policy(x, sigma)

    return call


def step_masks(model: Any, denoise_mask: Tensor, model_options: dict) -> piflow.DenoiseMask:
    """The denoise mask, or, if the MODEL sets a ``denoise_mask_function`` (e.g. Differential
    Diffusion), a function giving each step's mask, called as ComfyUI's inpainting wrapper calls it."""
    mask_function = model_options.get("denoise_mask_function")
    if mask_function is None:
        return denoise_mask
    extra_options = mask_function_options(model)
    return lambda sigma: mask_function(sigma, denoise_mask, extra_options=extra_options)


def piflow_ksampler(substeps: int, temperature: float | str, diffusion_coefficient: float,
                    shift: float) -> comfy.samplers.KSAMPLER:
    """The pi-Flow sampler as a ComfyUI SAMPLER (composes with SamplerCustomAdvanced and guiders).

    Inpainting (a LATENT with a noise mask): ComfyUI's wrapper would blend the kept region in
    only at network calls, but the substeps between calls must keep it too, so the sampler takes
    the mask over (official ComfyUI-piFlow rule, :class:`distill_core.sampling.piflow.Inpainting`) and the
    network sees the trajectory's own latent, as in the official sampler.
    """

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        denoise_mask = extra_args.get("denoise_mask")
        extra_args["denoise_mask"] = None  # the mask is applied here, not by ComfyUI's per-call blend
        check_sigmas(sigmas)
        require_finite_latent(x)
        inpainting: dict[str, Any] = {}
        if denoise_mask is not None:
            inpainting = {"latent_image": inpainting_latent(model),
                          "denoise_mask": step_masks(model, denoise_mask, extra_args.get("model_options") or {})}
        return piflow.sample_piflow(policy_model(model), x, sigmas, extra_args, callback, disable, substeps=substeps,
                                    h=diffusion_coefficient, temperature=temperature, shift=shift,
                                    noise_sampler=step_noise_sampler(x, extra_args.get("seed")), **inpainting)

    return comfy.samplers.KSAMPLER(sampler)


def _temperature(mode: str, manual_temperature: float) -> float | str:
    return piflow.AUTO_TEMPERATURE if mode == "auto" else manual_temperature


def piflow_schedule(model: Any, steps: int, shift: float, final_step_size_scale: float, denoise: float) -> Tensor:
    """pi-Flow SIGMAS for a flow (CONST) model; other models are refused."""
    sampling = model_sampling_of_patcher(model)
    if not is_flow(sampling):
        raise StrideError(f"model: pi-Flow schedules are for flow-matching models (FLUX, SD3, Qwen-Image), but this is "
                          f"an {sampling_kind(sampling).upper()} model. Load a pi-Flow model (Stride pi-Flow Adapter "
                          "Loader).")
    try:
        return piflow.piflow_sigmas(steps, shift, final_step_size_scale, denoise).float()
    except ValueError as exc:
        raise StrideError(str(exc)) from None


# ------------------------------------------------------------------------------------------
# Sampling nodes
# ------------------------------------------------------------------------------------------
def temperature_inputs() -> list[io.Input]:
    return [
        combo("temperature", TEMPERATURE_MODES, "GM policies only: how sharp the predicted mixture is made; lower "
                                                "= less noisy, less diverse. 'auto' follows the authors' rule, min(0.1 "
                                                "(steps - 1), 1) for every step but the last (4 steps -> 0.3); "
                                                "'manual' uses manual_temperature.",
              default=PIFLOW_KNOBS["temperature"]),
        io.Float.Input("manual_temperature", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Temperature when 'manual' is chosen (1.0 = the policy as predicted)."),
    ]


def substep_inputs() -> list[io.Input]:
    return [
        io.Int.Input("substeps", default=PIFLOW_KNOBS["substeps"], min=1, max=10000,
                     tooltip="Policy substeps over the whole trajectory (no network calls; authors' default "
                             f"{PIFLOW_KNOBS['substeps']})."),
        io.Float.Input("diffusion_coefficient", default=PIFLOW_KNOBS["h"], min=0.0, max=100.0, step=0.01,
                       tooltip="How much fresh noise each step adds: 0 = none, deterministic (authors' default), "
                               "1 = as much as DDPM (the paper's diffusion coefficient h)."),
    ]


def shift_input() -> io.Float.Input:
    return io.Float.Input("shift", default=PIFLOW_SCHEDULE.shift, min=0.01, max=100.0, step=0.01,
                          tooltip="Spends more of the steps at high noise when larger: "
                                  f"{PIFLOW_SCHEDULE.shift:g} for all released pi-FLUX.1, pi-FLUX.2 and pi-Qwen-Image "
                                  "adapters (time shift sigma = s t / (1 + (s - 1) t)). Use the same value in sampler "
                                  "and scheduler.")


def final_scale_input() -> io.Float.Input:
    return io.Float.Input("final_step_size_scale", default=PIFLOW_SCHEDULE.final_step_size_scale, min=0.01, max=1.0,
                          step=0.01, tooltip="Length of the last step relative to the others (authors' default "
                                             f"{PIFLOW_SCHEDULE.final_step_size_scale:g}).")


class StridePiFlowSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StridePiFlowSampler", display_name="Stride pi-Flow Sampler", category=CATEGORY,
            description=("Samples a pi-Flow model: once per step the model predicts how to move (a policy: a "
                         "Gaussian mixture, GM, or x0 grid points, DX), which the sampler follows in cheap substeps to "
                         "the next sigma without calling the network again. Needs a pi-Flow model (Stride "
                         "pi-Flow Adapter Loader) and the Stride pi-Flow Scheduler; use BasicGuider (guidance is "
                         "distilled in). Inpaints latents with a noise mask (Set Latent Noise Mask): the unmasked "
                         "region is kept exactly."),
            inputs=[*substep_inputs(), *temperature_inputs(), shift_input()],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="Plug into SamplerCustomAdvanced / SamplerCustom.")],
        )

    @classmethod
    def execute(cls, substeps: int, diffusion_coefficient: float, temperature: str, manual_temperature: float,
                shift: float) -> io.NodeOutput:
        return io.NodeOutput(piflow_ksampler(substeps, _temperature(temperature, manual_temperature),
                                             diffusion_coefficient, shift))


class StridePiFlowScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StridePiFlowScheduler", display_name="Stride pi-Flow Scheduler", category=CATEGORY,
            description=("The pi-Flow schedule: evenly spaced raw times with a shorter final step, warped by the time "
                         f"shift (4 steps, shift {PIFLOW_SCHEDULE.shift:g} -> sigmas "
                         + ", ".join(f"{v:.3g}" for v in PIFLOW_SCHEDULE.full_sigmas(4, None).tolist()) + ")."),
            inputs=[
                io.Model.Input("model", tooltip="The pi-Flow model (must be a flow-matching model)."),
                io.Int.Input("steps", default=PIFLOW_FLUX1.default_steps, min=1, max=1000,
                             tooltip="Network evaluations; match the adapter (4 for the 4-step adapters such as "
                                     "gmflux_k8_piid_4step, 8 for gmflux_k8_piid_8step)."),
                shift_input(),
                final_scale_input(),
                denoise_input("Below 1 for img2img: scales the raw times (the official rule)."),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas",
                                      tooltip="Sigmas for SamplerCustomAdvanced / SamplerCustom.")],
        )

    @classmethod
    def execute(cls, model: Any, steps: int, shift: float, final_step_size_scale: float,
                denoise: float) -> io.NodeOutput:
        return io.NodeOutput(piflow_schedule(model, steps, shift, final_step_size_scale, denoise))


class StridePiFlowSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StridePiFlowSample", display_name="Stride pi-Flow Sample", category=CATEGORY,
            description=("One node for pi-Flow sampling (pi-FLUX.1, pi-FLUX.2 and pi-Qwen-Image adapters, or the "
                         "reference teacher): the pi-Flow schedule and policy sampler through ComfyUI's own sampling "
                         "path (progress bar, previews, Cancel), guidance 1 (distilled in). Keep the Flux guidance of "
                         f"the conditioning: {FLUX_GUIDANCE_TEXT}."),
            inputs=[
                io.Model.Input("model", tooltip="A pi-Flow model (Stride pi-Flow Adapter Loader or Reference "
                                                "Teacher)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning (no negative: guidance is distilled "
                                                          "in)."),
                io.Latent.Input("latent_image", tooltip="Empty latent, or an image latent with denoise < 1. With a "
                                                        "noise mask (Set Latent Noise Mask) only the masked region is "
                                                        "regenerated; the rest stays exactly as it is."),
                io.Int.Input("steps", default=PIFLOW_FLUX1.default_steps, min=1, max=1000,
                             tooltip="Network evaluations; match the adapter (4-step adapters: 4, 8-step: 8)."),
                *substep_inputs(),
                shift_input(),
                final_scale_input(),
                *temperature_inputs(),
                seed_input("Seed of the initial (and, with diffusion_coefficient > 0, per-step) noise."),
                denoise_input("Below 1 for img2img."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent.")],
        )

    @classmethod
    def execute(cls, model: Any, positive: list, latent_image: dict, steps: int, substeps: int,
                diffusion_coefficient: float, shift: float, final_step_size_scale: float, temperature: str,
                manual_temperature: float, seed: int, denoise: float) -> io.NodeOutput:
        sigmas = piflow_schedule(model, steps, shift, final_step_size_scale, denoise)
        sampler = piflow_ksampler(substeps, _temperature(temperature, manual_temperature), diffusion_coefficient, shift)
        return io.NodeOutput(sample_with(model, positive, [], latent_image, sampler, sigmas, 1.0, seed))


# ------------------------------------------------------------------------------------------
# Exact reference: a factorised mixture whose x0-posterior is a GM policy
# ------------------------------------------------------------------------------------------
def reference_policy_mixture() -> FactorizedMixture:
    """The reference pi-Flow teacher's data: a letter pi whose every latent location independently takes
    one of four colours (:func:`piflow_demo_mixture`), so its exact x0-posterior is a GM policy."""
    return piflow_demo_mixture()


class ExactPolicyNetwork(AnalyticModule):
    """A factorised mixture's exact x0-posterior as a pi-Flow GM policy behind ComfyUI's network interface.

    Deposits the policy (velocity means ``(x - mu_k) / sigma``, log-weights, log-std of the
    velocity ``log(std_x0 / sigma)``, the official layout) and returns the mean velocity
    ``(x - E[x0|x]) / sigma``, what a flow model predicts. The true sigma comes from
    ``transformer_options["sigmas"]`` (repeated over cond/uncond chunks).
    """

    def __init__(self, mixture: FactorizedMixture) -> None:
        super().__init__()
        self.mixture = mixture
        self.space = NoiseSpace.flow()

    def forward(self, xc, timesteps, context=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        sigma = self.true_sigmas(xc, timesteps, transformer_options)
        x = xc.to(torch.float64)
        posterior = self.mixture.posterior_gm(x, sigma, self.space)
        sigma5 = sigma.view(-1, 1, 1, 1, 1)
        velocity_means = (x.unsqueeze(1) - posterior.means) / sigma5
        logstds = 0.5 * posterior.variance.log().view(-1, 1, 1, 1, 1) - sigma5.log()
        deposit_policy(transformer_options, PolicyOutput("gm", (velocity_means, posterior.log_weights, logstds)))
        mean_x0 = (posterior.log_weights.exp() * posterior.means).sum(dim=1)
        return ((x - mean_x0) / sigma5.squeeze(1)).to(xc.dtype)


class StridePiFlowReferenceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StridePiFlowReferenceModel", display_name="Stride pi-Flow Reference Teacher",
            category="stride/reference",
            description=("A pi-Flow model to try the pi-Flow nodes without downloads: its data is the letter pi "
                         "in varied warm colours on grey, and its prediction is exact. Every latent location (4x8x8, "
                         "SD1.5 format) comes from a 4-component mixture, so the exact x0-posterior is a "
                         "Gaussian-mixture (GM) policy; with it, pi-Flow sampling equals the teacher's own ODE on the "
                         "substep grid."),
            inputs=[],
            outputs=[io.Model.Output(display_name="model", tooltip="A flow-matching MODEL whose "
                                                                   "predictions are Gaussian-mixture (GM) policies; "
                                                                   "any conditioning works (it is unconditional).")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        network = ExactPolicyNetwork(reference_policy_mixture())
        model = wrap_as_model(network, "flow")
        network.model_sampling = model_sampling_of_patcher(model)
        return io.NodeOutput(model)


NODES: list[type[io.ComfyNode]] = [StridePiFlowSampler, StridePiFlowScheduler, StridePiFlowSample,
                                   StridePiFlowReferenceModel]
