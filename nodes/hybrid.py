"""Diversity distillation nodes: hybrid base -> distilled sampling, diffusion-target traces, image diversity.

The hybrid runs ComfyUI's own sampling path twice (guider.sample, like SamplerCustomAdvanced):
the base guider on ``sigmas[:k + 1]`` with the initial noise, then the distilled guider on the
SNR-converted ``sigmas[k:]`` with zero noise and the base result as its latent. ComfyUI's
``noise_scaling`` / ``inverse_noise_scaling`` keep that hand-over exact also across EPS <-> flow:
a flow phase returns ``x / (1 - s)`` (the VE latent at ``sigma = s / (1 - s)``) and starts from
``(1 - s) * latent``. Progress bar, previews and Cancel come from ComfyUI; the schedule, the seed
rule and the conversions come from ``distill_core.sampling.hybrid``. All nodes are V3 nodes (:mod:`.compat`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..distill_core import methods
from ..distill_core.methods import METHODS
from ..distill_core.reference import diversity
from ..distill_core.sampling import hybrid, schedules
from ..distill_core.sampling.trace import StepTrace, trace_grid
from ..distill_core.spaces import all_finite, convert_sigmas
from .compat import (
    StrideError,
    combo,
    guider_latent_format,
    guider_model_sampling,
    io,
    latent_spatial_downscale,
    model_sampling_of_patcher,
    noise_space,
)
from .families import check_family_steps, check_fits, family_sampler, family_sigmas, with_flux_guidance
from .reference import check_prompt_input
from .results import DIVERSITY_HELP, report_output
from .samplers import discrete_sigmas, non_finite_output, seed_input

CATEGORY = "stride/hybrid"
MAX_TRACE_ITEMS = 8
Trace = io.Custom("STRIDE_TRACE")

SCHEDULES: dict[str, Callable[[int], list[int]]] = {
    "lcm / tcd grid": schedules.lcm_timesteps,
    "tdd": schedules.tdd_timesteps,
    "trailing": schedules.trailing_timesteps,
}
# distilled_sampler: the registry entry whose sampler (with the authors' knobs) each name stands for
SAMPLER_FAMILIES = {"lcm": METHODS["lcm-lora"], "tcd": METHODS["tcd-lora"], "tdd": METHODS["tdd-sdxl"]}
DISTILLED_SAMPLERS: dict[str, Callable[[], Any]] = {
    **{name: functools.partial(family_sampler, entry) for name, entry in SAMPLER_FAMILIES.items()},
    "euler": lambda: comfy.samplers.sampler_object("euler"),
}
NO_FAMILY = "none (schedule + distilled_sampler)"
DEFAULT_DISTILLED_CFG = 1.0
"""The distilled CFG for distilled_sampler 'euler' without a family (one model call per step, no guidance)."""
EXPERT_BOUNDARIES = "; ".join(f"{m.key} {m.expert_boundary:g}" for m in METHODS.values() if m.expert_boundary)
BOUNDARY_TOOLTIP = ("Hand over at this sigma of the base model instead of after handover_steps: the base model runs "
                    "every step whose sigma is >= the boundary (Wan 2.2 A14B's expert switch, t >= boundary x 1000; "
                    f"its boundaries: {EXPERT_BOUNDARIES}). 0 = use handover_steps")
PHASE_COLOURS = {hybrid.BASE: (0.22, 0.47, 0.85), hybrid.DISTILLED: (0.95, 0.55, 0.1)}


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------
def _latent_format_summary(latent_format: Any) -> str:
    return (f"{type(latent_format).__name__}: {latent_format.latent_channels} channels, "
            f"{latent_spatial_downscale(latent_format)}x spatial downscale")


def check_same_latent_space(base_model: Any, distilled_model: Any, base_name: str, distilled_name: str) -> None:
    """Refuse model pairs whose latents mean different things (different VAE / latent format)."""
    base_format = base_model.get_model_object("latent_format")
    distilled_format = distilled_model.get_model_object("latent_format")
    if type(base_format) is type(distilled_format) and base_format.scale_factor == distilled_format.scale_factor:
        return
    raise StrideError(
        f"{distilled_name}: its latent format ({_latent_format_summary(distilled_format)}) differs from the one of "
        f"{base_name} ({_latent_format_summary(base_format)}). The hybrid hands the base model's latent to the "
        "distilled model, so both must share one VAE: e.g. an SDXL base with an SDXL LCM / Hyper-SD / TDD LoRA."
    )


def check_conditioning(name: str, conditioning: list, required: bool = True) -> None:
    """Refuse an empty CONDITIONING list where the phase needs it (before ComfyUI fails obscurely)."""
    if required and not conditioning:
        raise StrideError(f"{name}: the conditioning is empty; connect an encoded prompt for this phase.")


# ------------------------------------------------------------------------------------------
# Diffusion-target trace
# ------------------------------------------------------------------------------------------
class SamplingTrace:
    """STRIDE_TRACE: the recorded steps of the last run plus the latent format to decode them."""

    def __init__(self, max_items: int = MAX_TRACE_ITEMS) -> None:
        self.record = StepTrace(max_items)
        self.latent_format: Any = None


class TracingSampler(comfy.samplers.Sampler):
    """Any SAMPLER, recording x_t and the predicted x0 of every step into a :class:`SamplingTrace`.

    Steps are numbered from ``step_offset`` (the hybrid's distilled phase starts at ``handover_steps``) and
    recorded with ``phase``, the model that runs them in a hybrid run; a run starting at step 0 first clears the trace.
    """

    def __init__(self, inner: Any, trace: SamplingTrace, step_offset: int = 0, phase: str = "") -> None:
        self.inner = inner
        self.trace = trace
        self.step_offset = step_offset
        self.phase = phase

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        space = noise_space(guider_model_sampling(model_wrap))
        if self.step_offset == 0:
            self.trace.record.reset()
        self.trace.latent_format = guider_latent_format(model_wrap)
        last = len(sigmas) - 1

        def record_then_forward(step, x0, x, total_steps):
            self.trace.record.record(self.step_offset + step, sigmas[min(step, last)], x, x0, space, self.phase)
            if callback is not None:
                callback(step, x0, x, total_steps)

        return self.inner.sample(model_wrap, sigmas, extra_args, record_then_forward, noise, latent_image,
                                 denoise_mask, disable_pbar)


# ------------------------------------------------------------------------------------------
# The hybrid guider
# ------------------------------------------------------------------------------------------
def _offset_callback(callback: Callable | None, step_offset: int, total_steps: int) -> Callable | None:
    """Report a phase's steps on the whole schedule, so ComfyUI's progress bar runs once from 0 to the end."""
    if callback is None:
        return None
    return lambda step, x0, x, _phase_total: callback(step + step_offset, x0, x, total_steps)


class HybridGuider:
    """GUIDER: the base guider + base sampler for the first ``handover_steps`` sigmas (or, with a
    ``handover_boundary``, for every sigma at or above it), then the distilled guider with the sampler
    SamplerCustomAdvanced passes (sigmas converted by signal-to-noise ratio)."""

    def __init__(self, base_guider: Any, distilled_guider: Any, base_sampler: Any, handover_steps: int,
                 handover_boundary: float | None = None,
                 names: tuple[str, str] = ("base_guider", "distilled_guider")) -> None:
        self.base_guider = base_guider
        self.distilled_guider = distilled_guider
        self.base_sampler = base_sampler
        self.handover_steps = handover_steps
        self.handover_boundary = handover_boundary
        self.names = names  # the node inputs of the two models, for errors
        self.model_patcher = distilled_guider.model_patcher  # previews and denoised_output use the distilled model
        self.model_options = distilled_guider.model_options

    def _phase_samplers(self, sampler: Any, handover_steps: int) -> tuple[Any, Any]:
        """A traced distilled sampler also traces the base phase, into the same trace, each step with its phase."""
        if not isinstance(sampler, TracingSampler):
            return self.base_sampler, sampler
        return (TracingSampler(self.base_sampler, sampler.trace, 0, hybrid.BASE),
                TracingSampler(sampler.inner, sampler.trace, handover_steps, hybrid.DISTILLED))

    def base_steps(self, sigmas: torch.Tensor) -> int:
        """How many steps of ``sigmas`` the base model runs: ``handover_steps``, or those at or above the boundary."""
        if self.handover_boundary is None:
            return self.handover_steps
        return hybrid.handover_steps_at(sigmas, self.handover_boundary)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        steps = sigmas.shape[-1] - 1
        if steps < 1:
            return latent_image
        k = self.base_steps(sigmas)
        if k >= steps and self.handover_boundary is not None:
            raise StrideError(
                f"handover_boundary: every sigma of this {steps}-step schedule is at or above "
                f"{self.handover_boundary:g}, so the distilled model gets no step; choose a higher boundary (a sigma "
                "of the base model).")
        if k >= steps:
            raise StrideError(
                f"handover_steps: {k} base steps leave nothing for the distilled model on this {steps}-step schedule; "
                f"use at most {steps - 1} (the paper uses 1), or sample with the base model alone."
            )
        if denoise_mask is not None:
            raise StrideError("latent_image: hybrid sampling does not support a noise mask (inpainting); "
                              "remove the mask or sample with one model.")
        base_space = noise_space(model_sampling_of_patcher(self.base_guider.model_patcher))
        distilled_space = noise_space(model_sampling_of_patcher(self.distilled_guider.model_patcher))
        try:
            base_sigmas, distilled_sigmas = hybrid.split_schedule(sigmas, k, base_space, distilled_space)
        except ValueError as exc:
            raise StrideError(f"handover_steps: {exc}; hand over at least one step later.") from None
        base_sampler, distilled_sampler = self._phase_samplers(sampler, k)
        start, start_seed = latent_image, seed
        if k > 0:
            start = self._named(0, lambda: self.base_guider.sample(
                noise, latent_image, base_sampler, base_sigmas, None, _offset_callback(callback, 0, steps),
                disable_pbar, seed))
            if not all_finite(start):  # a core base sampler does not check each step
                raise non_finite_output(f"in its {k} step(s)", self.names[0])
            noise, start_seed = torch.zeros_like(noise), hybrid.handover_seed(seed)
        return self._named(1, lambda: self.distilled_guider.sample(
            noise, start, distilled_sampler, distilled_sigmas, None, _offset_callback(callback, k, steps),
            disable_pbar, start_seed))

    def _named(self, phase: int, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one phase; a model that returns NaN/inf is named by its input (base or distilled)."""
        try:
            return run()
        except StrideError as exc:
            where = getattr(exc, "stride_where", None)
            if where is None:
                raise
            raise non_finite_output(where, self.names[phase]) from None


# ------------------------------------------------------------------------------------------
# Nodes
# ------------------------------------------------------------------------------------------
class StrideHybridSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideHybridSample", display_name="Stride Hybrid Sample", category=CATEGORY,
            description=(
                "Diversity distillation (Gandikota & Bau): the base model runs the first step(s) of a shared "
                "few-step schedule with its own sampler and CFG, then the distilled model finishes with its own "
                "sampler and CFG. The first step decides the layout, so this aims at the base model's variety at "
                "almost the distilled cost (4-step LCM schedule, 1 base step: base at t=999, distilled at 759, 499, "
                "259; on Stride's reference models it brings back most of the mode diversity a collapsed distilled "
                "model lost: bench/RESULTS.md). EPS and flow models can be mixed (converted by signal-to-noise "
                "ratio); both must share a VAE. With a family (e.g. Wan2.2-Lightning) the shared schedule and the "
                "distilled sampler are the family's, and Wan 2.2's two experts hand over at its sigma boundary."
            ),
            inputs=[
                io.Model.Input("base_model", tooltip="The original (undistilled) model, e.g. SDXL base."),
                io.Conditioning.Input("base_positive", tooltip="Prompt for the base model's steps."),
                io.Conditioning.Input("base_negative", tooltip="Negative prompt for the base model's steps."),
                io.Float.Input("base_cfg", default=7.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the base steps (the paper's default 7)."),
                combo("base_sampler", comfy.samplers.KSampler.SAMPLERS,
                      "Sampler of the base steps (SDXL's default Euler; ddim is the same step).", default="euler"),
                io.Model.Input("distilled_model", tooltip="The distilled model: base + LCM / Hyper-SD / TCD / TDD "
                                                          "LoRA, or a distilled checkpoint with the same VAE."),
                io.Conditioning.Input("distilled_positive", tooltip="Prompt for the distilled model's steps."),
                io.Conditioning.Input("distilled_negative", tooltip="Negative prompt (used when distilled_cfg != 1)."),
                io.Float.Input("distilled_cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the distilled steps; 0 = the registry's: the family's if one is chosen, "
                                       "else the distilled_sampler's method ("
                                       + ", ".join(f"{name} {entry.cfg:g}" for name, entry in SAMPLER_FAMILIES.items())
                                       + f", euler {DEFAULT_DISTILLED_CFG:g})."),
                combo("distilled_sampler", DISTILLED_SAMPLERS,
                      "Sampler the distillation was trained for ("
                      + "; ".join(f"{name}: {entry.sampler.describe()}" for name, entry in SAMPLER_FAMILIES.items())
                      + "; euler). Ignored when a family is chosen. Other settings: use Stride Hybrid Guider."),
                combo("schedule", SCHEDULES, "Which steps both models share, as the base model's timesteps: LCM/TCD "
                                             "grid (4 steps: 999, 759, 499, 259), TDD (999, 751, 499, 251) or DDIM "
                                             "trailing (999, 749, 499, 249, Hyper-SD). Ignored when a family is "
                                             "chosen."),
                io.Int.Input("steps", default=4, min=1, max=50, tooltip="Total steps of the shared schedule."),
                io.Int.Input("handover_steps", default=1, min=0, max=49,
                             tooltip="Steps run by the base model before the distilled model takes over (paper: 1). "
                                     "0 = distilled model alone."),
                seed_input("Seed of the initial noise and of the samplers' per-step noise."),
                io.Latent.Input("latent_image", tooltip="Empty latent (its size and batch; image or video)."),
                combo("family", [NO_FAMILY, *METHODS], "The distilled model's few-step family (registry key): the "
                      "shared schedule is its schedule (on the distilled model's sigmas, converted to the base "
                      "model's) and the distilled steps use its sampler with the authors' knobs. Wan2.2-Lightning "
                      "families also hand over at Wan 2.2's expert boundary (high-noise expert = base_model, "
                      "low-noise expert = distilled_model).", default=NO_FAMILY, optional=True),
                io.Float.Input("handover_boundary", default=0.0, min=0.0, max=1000.0, step=0.001, optional=True,
                               tooltip=BOUNDARY_TOOLTIP + ", or the family's expert boundary if it has one."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The sampled latent."),
                Trace.Output(display_name="trace", tooltip="The noisy latent (x_t) and the model's guess of "
                                                           "the final picture (predicted x0) at every step of this "
                                                           "run (both phases), for Stride Trace Grid."),
            ],
        )

    @classmethod
    def execute(cls, base_model: Any, base_positive: list, base_negative: list, base_cfg: float, base_sampler: str,
                distilled_model: Any, distilled_positive: list, distilled_negative: list, distilled_cfg: float,
                distilled_sampler: str, schedule: str, steps: int, handover_steps: int, seed: int,
                latent_image: dict, family: str = NO_FAMILY, handover_boundary: float = 0.0) -> io.NodeOutput:
        check_same_latent_space(base_model, distilled_model, "base_model", "distilled_model")
        entry = None if family == NO_FAMILY else METHODS[family]
        distilled_cfg = distilled_cfg or registry_cfg(entry, distilled_sampler)
        if entry is not None and entry.flux_guidance is not None:
            distilled_positive = with_flux_guidance(distilled_positive, entry.flux_guidance)
        check_conditioning("base_positive", base_positive)
        check_conditioning("base_negative", base_negative, required=base_cfg != 1.0)
        check_conditioning("distilled_positive", distilled_positive)
        check_conditioning("distilled_negative", distilled_negative, required=distilled_cfg != 1.0)
        prompts = ((base_model, {"base_positive": base_positive, "base_negative": base_negative}),
                   (distilled_model, {"distilled_positive": distilled_positive,
                                      "distilled_negative": distilled_negative}))
        for model, conditionings in prompts:
            for name, conditioning in conditionings.items():
                check_prompt_input(model, conditioning, name)
        boundary = handover_boundary or (entry.expert_boundary if entry is not None else None) or None
        if boundary is None and handover_steps >= steps:
            raise StrideError(f"handover_steps ({handover_steps}) must be below steps ({steps}): the distilled model "
                              "needs at least one step. Use 1 (the paper's setting), or the base model alone.")
        if entry is None:
            try:
                timesteps = SCHEDULES[schedule](steps)
            except ValueError as exc:
                raise StrideError(f"steps: {exc}. Choose fewer steps or another schedule.") from None
            sigmas = discrete_sigmas(base_model, timesteps, schedule)
            distilled = DISTILLED_SAMPLERS[distilled_sampler]()
        else:
            sigmas = shared_family_sigmas(base_model, distilled_model, entry, steps, latent_image["samples"])
            distilled = family_sampler(entry)

        guiders = []
        phases = ((base_model, base_positive, base_negative, base_cfg),
                  (distilled_model, distilled_positive, distilled_negative, distilled_cfg))
        for model, positive, negative, cfg in phases:
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(positive, negative)
            guider.set_cfg(cfg)
            guiders.append(guider)
        guider = HybridGuider(guiders[0], guiders[1], comfy.samplers.sampler_object(base_sampler), handover_steps,
                              boundary, ("base_model", "distilled_model"))
        trace = SamplingTrace()
        sampler = TracingSampler(distilled, trace)

        latent = comfy.sample.fix_empty_latent_channels(base_model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(distilled_model, steps)
        samples = guider.sample(noise, latent, sampler, sigmas, denoise_mask=latent_image.get("noise_mask"),
                                callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out, trace)


def registry_cfg(entry: methods.Method | None, distilled_sampler: str) -> float:
    """The distilled steps' CFG the registry gives: the family's, else that of the method the sampler stands for."""
    if entry is not None:
        return entry.cfg
    return SAMPLER_FAMILIES[distilled_sampler].cfg if distilled_sampler in SAMPLER_FAMILIES else DEFAULT_DISTILLED_CFG


def shared_family_sigmas(base_model: Any, distilled_model: Any, entry: methods.Method, steps: int,
                         latent: torch.Tensor) -> torch.Tensor:
    """The family's schedule on the distilled model, in the base model's convention (the hybrid's shared SIGMAS)."""
    check_fits(distilled_model, entry, entry.key, "family")
    check_family_steps(entry, steps)
    sigmas = family_sigmas(distilled_model, entry, steps, 1.0, (int(latent.shape[-2]), int(latent.shape[-1])))
    distilled_space = noise_space(model_sampling_of_patcher(distilled_model))
    base_space = noise_space(model_sampling_of_patcher(base_model))
    return convert_sigmas(sigmas.double(), distilled_space, base_space).float()


class StrideHybridGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideHybridGuider", display_name="Stride Hybrid Guider", category=CATEGORY,
            description=(
                "Diversity distillation as a GUIDER for SamplerCustomAdvanced: the base guider with base_sampler runs "
                "the first handover_steps sigmas, then the distilled guider finishes with the sampler connected to "
                "SamplerCustomAdvanced. Give it the SIGMAS of the base model (e.g. Stride LCM Scheduler on the base "
                "model); a flow-model partner gets them converted by signal-to-noise ratio."
            ),
            inputs=[
                io.Guider.Input("base_guider", tooltip="Guider of the base model with its prompt and CFG (e.g. "
                                                       "CFGGuider, cfg 7)."),
                io.Guider.Input("distilled_guider", tooltip="Guider of the distilled model (e.g. CFGGuider, cfg 1)."),
                io.Sampler.Input("base_sampler", tooltip="Sampler of the base steps (e.g. KSamplerSelect euler)."),
                io.Int.Input("handover_steps", default=1, min=0, max=49,
                             tooltip="How many steps the base model takes before the distilled model takes over "
                                     "(paper: 1); must be below the number of steps."),
                io.Float.Input("handover_boundary", default=0.0, min=0.0, max=1000.0, step=0.001, optional=True,
                               tooltip=BOUNDARY_TOOLTIP + "."),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Plug into SamplerCustomAdvanced (its sampler "
                                                                     "is the distilled model's sampler).")],
        )

    @classmethod
    def execute(cls, base_guider: Any, distilled_guider: Any, base_sampler: Any, handover_steps: int,
                handover_boundary: float = 0.0) -> io.NodeOutput:
        for name, guider in (("base_guider", base_guider), ("distilled_guider", distilled_guider)):
            conds = getattr(guider, "original_conds", None)
            if conds is not None and not conds.get("positive"):
                raise StrideError(f"{name}: this guider has no (positive) conditioning; build it from a model and a "
                                  "prompt, e.g. with CFGGuider.")
        check_same_latent_space(base_guider.model_patcher, distilled_guider.model_patcher,
                                "base_guider", "distilled_guider")
        return io.NodeOutput(HybridGuider(base_guider, distilled_guider, base_sampler, handover_steps,
                                          handover_boundary or None))


class StrideTraceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideTraceSampler", display_name="Stride Trace Sampler", category=CATEGORY,
            description=(
                "Records every step of a sampling run: the noisy latent x_t and the model's guess of the final "
                "picture, the predicted x0 (the 'diffusion target' of Gandikota & Bau's diffusion-target, DT, "
                "visualisation). Wrap any sampler with it; with Stride Hybrid Guider the base steps are recorded "
                "too. View the result with Stride Trace Grid."
            ),
            inputs=[io.Sampler.Input("sampler", tooltip="The sampler to record.")],
            outputs=[
                io.Sampler.Output(display_name="sampler", tooltip="The same sampler, recording."),
                Trace.Output(display_name="trace", tooltip="The recording of its last run (for Stride Trace Grid)."),
            ],
        )

    @classmethod
    def execute(cls, sampler: Any) -> io.NodeOutput:
        trace = SamplingTrace()
        return io.NodeOutput(TracingSampler(sampler, trace), trace)


class StrideTraceGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideTraceGrid", display_name="Stride Trace Grid", category=CATEGORY,
            description=(
                "Draws how the picture forms, step by step, as one image (the diffusion-target or 'DT' visualisation "
                "of Gandikota & Bau): one row per sampling step; for each of the first batch items the noisy latent "
                "x_t (scaled to unit variance) beside the model's guess of the final picture, the predicted x0. "
                "Distilled models settle the final picture in the first row; base models over several. In a hybrid "
                "run a bar before each row marks which model ran the step: blue = base model (Wan 2.2: high-noise "
                "expert), orange = distilled model. Video latents have their frames side by side. Decodes with the "
                "VAE if connected, else with the model's latent preview colours."
            ),
            inputs=[
                Trace.Input("trace", tooltip="From Stride Trace Sampler or Stride Hybrid Sample."),
                io.Latent.Input("samples", tooltip="The output of the sampling run (connect it so the grid is drawn "
                                                   "after sampling)."),
                io.Int.Input("max_images", default=4, min=1, max=MAX_TRACE_ITEMS,
                             tooltip="How many batch items to show (two columns each)."),
                io.Vae.Input("vae", optional=True, tooltip="Decode the tiles with this VAE (full quality); without "
                                                           "it the latent preview colours are used (fast, rough)."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The grid as one image (rows: steps; columns: "
                                                                  "x_t | x0 per batch item).")],
        )

    @classmethod
    def execute(cls, trace: SamplingTrace, samples: dict, max_images: int, vae: Any = None) -> io.NodeOutput:
        steps = trace.record.steps
        if not steps or trace.latent_format is None:
            raise StrideError("trace: nothing was recorded; connect the trace of the sampler that produced samples.")
        decode = vae_decoder(vae, trace.latent_format) if vae is not None else preview_decoder(trace.latent_format)
        colours = PHASE_COLOURS if any(step.phase for step in steps) else None
        return io.NodeOutput(trace_grid(steps, decode, max_images, phase_colours=colours).unsqueeze(0))


def vae_decoder(vae: Any, latent_format: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> RGB with the VAE: images (m, h, w, 3), video latents (all frames at once) frames (m, F, h, w, 3)."""
    return lambda latents: vae.decode(latent_format.process_out(latents))[..., :3]


def preview_decoder(latent_format: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> RGB with the latent format's preview factors, upscaled to the image size (video latents: per frame,
    (m, F, h, w, 3))."""
    if latent_format.latent_rgb_factors is None:
        raise StrideError("vae: this model's latent format has no preview colours; connect a VAE.")
    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)
    bias = latent_format.latent_rgb_factors_bias
    bias = torch.zeros(3) if bias is None else torch.tensor(bias, dtype=torch.float32)
    reshape = getattr(latent_format, "latent_rgb_factors_reshape", None)
    scale = latent_spatial_downscale(latent_format)

    def decode_images(latents: torch.Tensor) -> torch.Tensor:
        if reshape is not None:
            latents = reshape(latents)
        rgb = ((latents.float().movedim(1, -1) @ factors + bias + 1) / 2).clamp(0, 1)
        return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim == 4:
            return decode_images(latents)
        frames = decode_images(latents.movedim(2, 1).flatten(0, 1))  # video: every frame as an image
        return frames.reshape(latents.shape[0], latents.shape[2], *frames.shape[1:])

    return decode


class StrideImageDiversity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideImageDiversity", display_name="Stride Image Diversity", category=CATEGORY,
            description=(
                "How different the images of a batch are from each other, shown as a table on the node: the mean "
                "distance between all pairs of images' colour statistics (CIE Lab means and spreads) and edge "
                "directions (Sobel edge-orientation histograms with edge density), computed with kornia. 0 = "
                "identical images; compare runs of equal batch size (base vs distilled vs hybrid). For the reference "
                "models, Stride Reference Metrics gives the exact mode recall and entropy."
            ),
            inputs=[
                io.Image.Input("images", tooltip="At least two images, e.g. a batch sampled with different noise."),
                io.String.Input("label", default="images", tooltip="Name of this row in the report."),
            ],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="JSON: diversity overall, of colour alone and of edges alone.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, label: str) -> io.NodeOutput:
        if images.shape[0] < 2:
            raise StrideError(f"images: diversity needs at least 2 images, got {images.shape[0]}.")
        try:
            result = diversity.image_diversity(images)
        except ValueError as exc:
            raise StrideError(f"images: {exc}; check the decode that produced them.") from None
        report = {"label": label, "n": int(images.shape[0]), "diversity": round(result.overall, 4),
                  "colour_diversity": round(result.colour, 4), "edge_diversity": round(result.edges, 4)}
        return report_output(report, DIVERSITY_HELP)


NODES: list[type[io.ComfyNode]] = [StrideHybridSample, StrideHybridGuider, StrideTraceSampler, StrideTraceGrid,
                                   StrideImageDiversity]
