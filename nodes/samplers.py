"""Few-step SAMPLER, SIGMAS and convenience nodes: LCM, TCD / Hyper-SD and TDD.

The math lives in ``distill_core`` (schedules, lcm, tcd, tdd); these nodes only read the
model's noise convention from ComfyUI and wrap the samplers in ``comfy.samplers.KSAMPLER``, so
they compose with SamplerCustom / SamplerCustomAdvanced, any guider and any noise node.
All nodes are V3 nodes (``io.ComfyNode``, the API pinned in :mod:`.compat`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import comfy.sample
import comfy.samplers
import latent_preview

from ..distill_core.methods import METHODS, LCMGrid, TDDGrid, schedule_as
from ..distill_core.sampling import lcm, schedules, tcd, tdd
from ..distill_core.sampling.steps import all_finite
from .compat import (
    StrideError,
    combo,
    has_discrete_timesteps,
    io,
    model_sampling_in_sampler,
    model_sampling_of_patcher,
    noise_space,
    step_noise_sampler,
)
from .reference import check_prompt_input

CATEGORY = "stride/sampling"
# the registry entries whose defaults these nodes show (distill_core.methods is the one place they are written)
LCM_LORA, TCD_LORA, HYPER_UNIFIED, TDD_SDXL = (METHODS[key] for key in ("lcm-lora", "tcd-lora", "hyper-sd-unified",
                                                                      "tdd-sdxl"))
LCM_GRID, TDD_GRID = schedule_as(LCM_LORA, LCMGrid), schedule_as(TDD_SDXL, TDDGrid)


def stride_ksampler(sample_fn: Callable[..., torch.Tensor], **options: Any) -> comfy.samplers.KSAMPLER:
    """Wrap a distill_core sampler so it learns the model's noise space inside ComfyUI's loop and draws its
    per-step noise as the host's own samplers do (:func:`.compat.step_noise_sampler`)."""

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        space = noise_space(model_sampling_in_sampler(model))
        check_sigmas(sigmas)
        require_finite_latent(x)
        noise_sampler = step_noise_sampler(x, (extra_args or {}).get("seed"))
        return sample_fn(finite_output_model(model), x, sigmas, extra_args=extra_args, callback=callback,
                         disable=disable, space=space, noise_sampler=noise_sampler, **options)

    return comfy.samplers.KSAMPLER(sampler)


def require_finite_latent(x: torch.Tensor) -> None:
    """Refuse a starting latent with NaN/inf values, naming the input and where to look."""
    if not all_finite(x):
        raise StrideError("latent_image: the latent contains NaN or inf values; check the nodes that produced it "
                          "(e.g. a VAE Encode of a broken image, or a latent math node).")


def check_sigmas(sigmas: torch.Tensor) -> None:
    """Refuse SIGMAS no scheduler makes (NaN/inf, negative, rising, too large to square in float32), by name."""
    values = sigmas.detach().to("cpu", torch.float64).reshape(-1)
    if not bool(torch.isfinite(values).all()):
        raise StrideError("sigmas: the sigmas contain NaN or inf values; check the node that made them.")
    if bool((values < 0).any()):
        raise StrideError("sigmas: the sigmas contain negative values; check the node that made them.")
    if bool((values[1:] > values[:-1]).any()):
        raise StrideError("sigmas: the sigmas must decrease from the first to the last; check the scheduler (a Flip "
                          "Sigmas node reverses them).")
    if values.numel() and float(values.max()) ** 2 > torch.finfo(torch.float32).max:
        raise StrideError(f"sigmas: the largest sigma, {float(values.max()):.3g}, is too large to sample with (its "
                          "square overflows); check the scheduler's sigma_max.")


def non_finite_output(where: str, input_name: str = "model") -> StrideError:
    """The error for a model that returned NaN/inf while sampling; ``stride_where`` lets a node with two models
    (Stride Hybrid Sample) name the MODEL input at fault."""
    error = StrideError(f"{input_name}: the model returned NaN or inf values {where}. Its weights may be broken, or "
                        "half precision overflowed: try another model file, or run the model in fp32/bf16 (e.g. "
                        "--force-fp32).")
    error.stride_where = where  # type: ignore[attr-defined]
    return error


def finite_output_model(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The sampler's model with a check of every output: a NaN/inf x0 stops sampling with a clear error
    instead of silently producing a NaN latent."""

    def checked(x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        denoised = model(x, sigma, **extra_args)
        if not all_finite(denoised):
            raise non_finite_output(f"at sigma {float(sigma.reshape(-1)[0]):.4g}")
        return denoised

    return checked


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise StrideError(f"{name} must be between 0 and 1 (got {value}).")



def seed_input(tooltip: str) -> io.Int.Input:
    """The seed widget of Stride's sampling nodes (ComfyUI's seed range, with control after generate)."""
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=tooltip)


def denoise_input(tooltip: str) -> io.Float.Input:
    return io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=tooltip)


# ------------------------------------------------------------------------------------------
# SAMPLER nodes
# ------------------------------------------------------------------------------------------
def sampler_output(tooltip: str = "Plug into SamplerCustom / SamplerCustomAdvanced.") -> io.Sampler.Output:
    return io.Sampler.Output(display_name="sampler", tooltip=tooltip)


class StrideLCMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideLCMSampler", display_name="Stride LCM Sampler", category=CATEGORY,
            description=("Samples an LCM (Latent Consistency Model) or LCM-LoRA model in a few steps: each step "
                         "guesses the final picture (predicts x0, with LCM's consistency boundary condition), then "
                         "adds fresh noise back for the next step (re-noise to the next sigma). Use with a Stride LCM "
                         "Scheduler. " + LCM_LORA.notes),
            inputs=[
                io.Float.Input("s_noise", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Scale of the fresh noise added between steps (1.0 = LCM as trained; lower "
                                       "keeps more of the previous prediction's structure)."),
                io.Boolean.Input("boundary_condition", default=LCM_LORA.sampler.knobs["boundary"],
                                 tooltip="Blend the prediction with the current latent near the end, as LCM does (its "
                                         "c_skip/c_out boundary condition, diffusers LCMScheduler). Matters only near "
                                         "timestep 0."),
            ],
            outputs=[sampler_output()],
        )

    @classmethod
    def execute(cls, s_noise: float, boundary_condition: bool) -> io.NodeOutput:
        return io.NodeOutput(stride_ksampler(lcm.sample_lcm, s_noise=s_noise, boundary=boundary_condition))


class StrideTCDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideTCDSampler", display_name="Stride TCD / Hyper-SD Sampler", category=CATEGORY,
            description=("TCD sampling (Trajectory Consistency Distillation), the sampler Hyper-SD's unified LoRA "
                         "and TCD LoRAs were trained for. gamma sets how much fresh noise each step adds. "
                         + TCD_LORA.notes),
            inputs=[
                io.Float.Input("gamma", default=TCD_LORA.sampler.knobs["gamma"], min=0.0, max=1.0, step=0.01,
                               tooltip="How much fresh noise each step adds (TCD's gamma, Hyper-SD's eta). Authors' "
                                       f"default {TCD_LORA.sampler.knobs['gamma']:g}. Hyper-SD unified LoRA: "
                                       f"{HYPER_UNIFIED.notes} Not confirmed: {HYPER_UNIFIED.unconfirmed[0]}."),
            ],
            outputs=[sampler_output()],
        )

    @classmethod
    def execute(cls, gamma: float) -> io.NodeOutput:
        check_unit("gamma", gamma)
        return io.NodeOutput(stride_ksampler(tcd.sample_tcd, gamma=gamma))


class StrideTDDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideTDDSampler", display_name="Stride TDD Sampler", category=CATEGORY,
            description=("Samples a TDD (Target-Driven Distillation) model: each step moves a little past the next "
                         "timestep (DPM-Solver++(1) to a shrunk target) and adds noise back (eta), optionally limiting "
                         "extreme values in the first steps (x0 clipping). TDD LoRAs were trained with empty prompts, "
                         f"so real CFG works: authors' SDXL default {TDD_SDXL.default_steps} steps, CFG "
                         f"{TDD_SDXL.cfg:g}, eta {TDD_SDXL.sampler.knobs['eta']:g}."),
            inputs=[
                io.Float.Input("eta", default=TDD_SDXL.sampler.knobs["eta"], min=0.0, max=1.0, step=0.01,
                               tooltip="How much fresh noise each step adds: a step goes a little past the next "
                                       "timestep, to floor((1-eta) t_next), then adds noise back (TDD's name for TCD's "
                                       f"gamma). Authors' default {TDD_SDXL.sampler.knobs['eta']:g}."),
                io.Int.Input("clip_x0_steps", default=TDD_SDXL.sampler.knobs["clip_x0_steps"], min=0, max=100,
                             tooltip="Limit extreme values of the predicted picture in this many first steps (x0 "
                                     "clipping, dynamic thresholding); 0 = off. Helps at high CFG."),
                io.Float.Input("clip_ratio", default=TDD_SDXL.sampler.knobs["clip_ratio"], min=0.5, max=1.0,
                               step=0.001,
                               tooltip="How much of the picture stays unclipped: the threshold is this quantile of "
                                       f"|x0| (TDD: {TDD_SDXL.sampler.knobs['clip_ratio']:g})."),
            ],
            outputs=[sampler_output()],
        )

    @classmethod
    def execute(cls, eta: float, clip_x0_steps: int, clip_ratio: float) -> io.NodeOutput:
        check_unit("eta", eta)
        return io.NodeOutput(stride_ksampler(tdd.sample_tdd, eta=eta, clip_x0_steps=clip_x0_steps,
                                             clip_ratio=clip_ratio))


# ------------------------------------------------------------------------------------------
# SIGMAS nodes
# ------------------------------------------------------------------------------------------
def require_discrete_timesteps(sampling: Any, method: str) -> None:
    """Refuse a model without discrete training timesteps for a schedule defined on them."""
    if not has_discrete_timesteps(sampling):
        raise StrideError(
            f"model: {method} schedules are defined on 1000 discrete training timesteps, but this model uses "
            f"{type(sampling).__name__} (continuous sigmas). Use a plain scheduler such as karras instead."
        )


def discrete_sigmas(model: Any, timesteps: list[int], method: str) -> torch.Tensor:
    """SIGMAS for training timesteps on this model, refusing models without discrete timesteps."""
    sampling = model_sampling_of_patcher(model)
    require_discrete_timesteps(sampling, method)
    return noise_space(sampling).sigmas_for_timesteps(timesteps).float()


def truncate_for_denoise(timesteps_for: Callable[[int], list[int]], steps: int, denoise: float) -> list[int]:
    """ComfyUI's denoise rule: schedule ``steps / denoise`` steps and keep the last ``steps``. When the steps fit the
    schedule but ``steps / denoise`` does not, denoise is named with the smallest value that fits."""
    if denoise <= 0 or denoise > 1:
        raise StrideError(f"denoise must be in (0, 1] (got {denoise}).")
    total = int(steps / denoise)
    try:
        return timesteps_for(total)[-steps:]
    except ValueError:
        longest = _longest_schedule(timesteps_for, steps, total)
        if longest is None:
            raise
    raise StrideError(f"denoise: at {denoise:g}, {steps} steps need a {total}-step schedule and this one has at most "
                      f"{longest}. Choose fewer steps, or raise denoise to at least "
                      f"{math.ceil(1000 * steps / longest) / 1000:g}.")


def _longest_schedule(timesteps_for: Callable[[int], list[int]], shortest: int, too_long: int) -> int | None:
    """The most steps ``timesteps_for`` accepts between ``shortest`` and ``too_long`` (bisection); None if even
    ``shortest`` is refused."""
    def fits(n: int) -> bool:
        try:
            timesteps_for(n)
        except ValueError:
            return False
        return True

    if not fits(shortest):
        return None
    low, high = shortest, too_long
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def schedule_error(exc: ValueError, denoise: float) -> StrideError:
    if isinstance(exc, schedules.StrengthTooLowError):
        return StrideError(f"denoise: {denoise:g} is less than one step of the schedule's grid; raise denoise to at "
                           f"least {exc.minimum:g}.")
    return StrideError(f"{str(exc).rstrip('.')}. Choose fewer steps or another schedule.")


def sigmas_output() -> io.Sigmas.Output:
    return io.Sigmas.Output(display_name="sigmas", tooltip="Sigmas for SamplerCustom / SamplerCustomAdvanced.")


class StrideLCMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideLCMScheduler", display_name="Stride LCM Scheduler", category=CATEGORY,
            description=("LCM's skipping-step schedule: picks steps from the 50-step distillation grid (999, 979 "
                         f"down to 19): {LCM_LORA.schedule.describe()}. Also TCD's schedule."),
            inputs=[
                io.Model.Input("model", tooltip="The model the sigmas are for (its noise schedule)."),
                io.Int.Input("steps", default=LCM_LORA.default_steps, min=1, max=50,
                             tooltip=f"Sampling steps (LCM-LoRA: {LCM_LORA.steps_text()}, default "
                                     f"{LCM_LORA.default_steps}; {LCM_LORA.notes})"),
                io.Int.Input("original_steps", default=LCM_GRID.original_steps, min=1, max=1000,
                             tooltip="Grid size the model was distilled on (LCM: "
                                     f"{LCM_GRID.original_steps})."),
                denoise_input("Below 1 for img2img: the grid stops at denoise x 1000 (LCM's strength)."),
            ],
            outputs=[sigmas_output()],
        )

    @classmethod
    def execute(cls, model: Any, steps: int, original_steps: int, denoise: float) -> io.NodeOutput:
        try:
            timesteps = schedules.lcm_timesteps(steps, original_steps, strength=denoise)
        except ValueError as exc:
            raise schedule_error(exc, denoise) from None
        return io.NodeOutput(discrete_sigmas(model, timesteps, "LCM"))


class StrideHyperSDScheduler(io.ComfyNode):
    MODES = ("trailing", "unet 1-step (t=800)", "tcd grid")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideHyperSDScheduler", display_name="Stride Hyper-SD Scheduler", category=CATEGORY,
            description=("Hyper-SD schedules: 'trailing' is DDIM's trailing spacing the N-step Hyper-SD LoRAs were "
                         "trained for (4 steps -> 999, 749, 499, 249); 'unet 1-step' is the Hyper-SDXL 1-step "
                         "UNet's single timestep 800; 'tcd grid' is the LCM/TCD grid for the unified LoRA."),
            inputs=[
                io.Model.Input("model", tooltip="The model the sigmas are for."),
                combo("mode", cls.MODES, "Which Hyper-SD schedule (see the node description)."),
                io.Int.Input("steps", default=METHODS["hyper-sd-4step"].default_steps, min=1, max=1000,
                             tooltip="Steps: the N of the N-step LoRA (ignored for the 1-step UNet)."),
                denoise_input("Below 1 for img2img (not possible with the 1-step UNet)."),
            ],
            outputs=[sigmas_output()],
        )

    @classmethod
    def execute(cls, model: Any, mode: str, steps: int, denoise: float) -> io.NodeOutput:
        if mode == cls.MODES[1] and denoise < 1.0:
            raise StrideError("denoise: the Hyper-SDXL 1-step schedule is a single step from pure noise; "
                              "set denoise to 1.0 or use 'trailing' for img2img.")
        try:
            if mode == cls.MODES[1]:
                timesteps = schedules.hyper_sdxl_one_step_timesteps()
            elif mode == cls.MODES[2]:
                timesteps = schedules.tcd_timesteps(steps, strength=denoise)
            else:
                timesteps = truncate_for_denoise(schedules.trailing_timesteps, steps, denoise)
        except ValueError as exc:
            raise schedule_error(exc, denoise) from None
        return io.NodeOutput(discrete_sigmas(model, timesteps, "Hyper-SD"))


class StrideTDDScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideTDDScheduler", display_name="Stride TDD Scheduler", category=CATEGORY,
            description=(f"TDD's schedule: the {TDD_SDXL.schedule.describe()}. 'special jump' uses "
                         "the authors' non-equidistant schedules for 5-7 steps (5 -> 999, 875, 751, 499, 251)."),
            inputs=[
                io.Model.Input("model", tooltip="The model the sigmas are for."),
                io.Int.Input("steps", default=TDD_SDXL.default_steps, min=1, max=250,
                             tooltip=f"Steps (TDD was trained for {TDD_SDXL.steps_text()}; {TDD_SDXL.default_steps} "
                                     "recommended)."),
                io.Boolean.Input("special_jump", default=TDD_GRID.special_jump,
                                 tooltip="Non-equidistant schedules for 5-7 steps."),
                denoise_input("Below 1 for img2img."),
            ],
            outputs=[sigmas_output()],
        )

    @classmethod
    def execute(cls, model: Any, steps: int, special_jump: bool, denoise: float) -> io.NodeOutput:
        try:
            timesteps = truncate_for_denoise(lambda n: schedules.tdd_timesteps(n, special_jump), steps, denoise)
        except ValueError as exc:
            raise schedule_error(exc, denoise) from None
        return io.NodeOutput(discrete_sigmas(model, timesteps, "TDD"))


def sample_with(model: Any, positive: list, negative: list, latent_image: dict, sampler: Any, sigmas: torch.Tensor,
                cfg: float, seed: int) -> dict:
    """ComfyUI's own custom-sampling path (noise, guider, progress bar, preview, Cancel)."""
    if not positive:
        raise StrideError("positive: the conditioning is empty; connect a prompt (e.g. CLIP Text Encode or "
                          "Stride Class Prompt).")
    check_prompt_input(model, positive, "positive")
    check_prompt_input(model, negative, "negative")
    latent = latent_image["samples"]
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, latent,
        noise_mask=latent_image.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed,
    )
    out = latent_image.copy()
    out["samples"] = samples
    return out


NODES: list[type[io.ComfyNode]] = [StrideLCMSampler, StrideTCDSampler, StrideTDDSampler, StrideLCMScheduler,
                                   StrideHyperSDScheduler, StrideTDDScheduler]
