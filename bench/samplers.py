"""The samplers under comparison and the one ComfyUI sampling path they all run through.

Stride's samplers are built by their nodes (``StrideLCMSampler`` & co. plus the matching
scheduler node); ComfyUI's built-ins by ``comfy.samplers.sampler_object`` with sigmas from
``comfy.samplers.KSampler`` (the KSampler node's own rules, e.g. uni_pc's dropped penultimate
sigma). Every sample is drawn with ``comfy.sample.sample_custom`` (the SamplerCustom path: CFG
guider, noise scaling, latent format), so both sides pay the same host costs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distill_core.methods import METHODS, LCMGrid, TDDGrid, sampler_options, schedule_as

from .context import BenchContext
from .harness import CallTimer

BuildSampler = Callable[[BenchContext, Any, int], tuple[Any, torch.Tensor]]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler as a user would set it up: ``build(ctx, model, steps) -> (SAMPLER, SIGMAS)``."""

    label: str
    origin: str  # "Stride" or "ComfyUI"
    few_step: bool  # made for distilled models, so judged on the flow-map form of the teacher
    deterministic: bool  # no fresh noise after the start: its endpoint can be compared with the exact ODE's
    schedule: str
    build: BuildSampler


def _stride(label: str, sampler_node: str, sampler_inputs: dict, scheduler_node: str, scheduler_inputs: dict,
            schedule: str, deterministic: bool = False) -> SamplerSpec:
    def build(ctx: BenchContext, model: Any, steps: int) -> tuple[Any, torch.Tensor]:
        sampler = ctx.node(sampler_node).execute(**sampler_inputs)[0]
        sigmas = ctx.node(scheduler_node).execute(model, steps=steps, **scheduler_inputs)[0]
        return sampler, sigmas

    return SamplerSpec(label, "Stride", True, deterministic, schedule, build)


def _builtin(name: str, scheduler: str, few_step: bool = False, deterministic: bool = True) -> SamplerSpec:
    def build(ctx: BenchContext, model: Any, steps: int) -> tuple[Any, torch.Tensor]:
        import comfy.samplers

        sigmas = comfy.samplers.KSampler(model, steps, "cpu", sampler=name, scheduler=scheduler).sigmas
        return comfy.samplers.sampler_object(name), sigmas.cpu()

    return SamplerSpec(f"ComfyUI {name}", "ComfyUI", few_step, deterministic, scheduler, build)


# the authors' settings, from the method registry
LCM, TCD, TDD = METHODS["lcm-lora"], METHODS["tcd-lora"], METHODS["tdd-sdxl"]
STRIDE_LCM = _stride("Stride LCM", "StrideLCMSampler",
                     {"s_noise": 1.0, "boundary_condition": LCM.sampler.knobs["boundary"]}, "StrideLCMScheduler",
                     {"original_steps": schedule_as(LCM, LCMGrid).original_steps, "denoise": 1.0}, "Stride LCM")
STRIDE_TCD = _stride(f"Stride TCD (gamma {TCD.sampler.knobs['gamma']:g})", "StrideTCDSampler",
                     {"gamma": TCD.sampler.knobs["gamma"]}, "StrideHyperSDScheduler",
                     {"mode": "tcd grid", "denoise": 1.0}, "Stride TCD grid")
STRIDE_TDD = _stride(f"Stride TDD (eta {TDD.sampler.knobs['eta']:g})", "StrideTDDSampler",
                     {name: TDD.sampler.knobs[name] for name in ("eta", "clip_x0_steps", "clip_ratio")},
                     "StrideTDDScheduler", {"special_jump": schedule_as(TDD, TDDGrid).special_jump, "denoise": 1.0},
                     "Stride TDD")
STRIDE_HYPER = _stride("Stride Hyper-SD (DDIM trailing)", "StrideTCDSampler",
                       sampler_options(METHODS["hyper-sd-4step"]),
                       "StrideHyperSDScheduler", {"mode": "trailing", "denoise": 1.0}, "Stride Hyper-SD trailing",
                       deterministic=True)
STRIDE_SAMPLERS = [STRIDE_LCM, STRIDE_TCD, STRIDE_TDD, STRIDE_HYPER]

COMFY_EULER = _builtin("euler", "simple")
COMFY_EULER_ANCESTRAL = _builtin("euler_ancestral", "simple", deterministic=False)
COMFY_DPMPP_2M = _builtin("dpmpp_2m", "karras")
COMFY_LCM = _builtin("lcm", "sgm_uniform", few_step=True, deterministic=False)
COMFY_UNI_PC = _builtin("uni_pc", "simple")
QUALITY_BUILTINS = [COMFY_EULER, COMFY_DPMPP_2M, COMFY_LCM, COMFY_UNI_PC]
OVERHEAD_BUILTINS = [COMFY_EULER, COMFY_EULER_ANCESTRAL, COMFY_LCM]


def sample(model: Any, sampler: Any, sigmas: torch.Tensor, noise: torch.Tensor, positive: list, negative: list,
           seed: int = 0, cfg: float = 1.0) -> torch.Tensor:
    """Sample from pure noise through ComfyUI's SamplerCustom path; returns the latent on the CPU.

    Runs under ``torch.inference_mode()`` as ComfyUI's executor runs every node (without it, samplers that do
    not disable autograd themselves, e.g. uni_pc, keep every step's graph: 4.5 GB at 512 demo-UNet samples).
    ``sigmas`` is cloned because some built-ins (uni_pc) write into the tensor they get.
    """
    import comfy.sample

    latent = torch.zeros_like(noise)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas.clone(), positive, negative, latent,
                                          disable_pbar=True, seed=seed)


def start_recording(sampler: Any, start: list) -> Any:
    """The same SAMPLER; each call leaves the latent and sigma its function starts from (after ComfyUI's noise
    scaling) in ``start`` as ``[x, sigma]``, so the exact ODE solution from that very point can be computed."""
    import comfy.samplers

    def recording_function(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Any = None, disable: Any = None, **options: Any) -> torch.Tensor:
        start[:] = [x.detach().clone(), sigmas[0].detach().clone()]
        return sampler.sampler_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                        **options)

    return comfy.samplers.KSAMPLER(recording_function, sampler.extra_options, sampler.inpaint_options)


def counting_model(model: Any) -> tuple[Any, list[int]]:
    """A clone of ``model`` whose network calls are counted (one per NFE at CFG 1)."""
    calls = [0]

    def wrapper(apply_model: Callable, args: dict) -> torch.Tensor:
        calls[0] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


@dataclass
class SamplerTiming:
    """Seconds inside one sampler function call, split into model calls and everything else."""

    total: float = 0.0
    model: float = 0.0
    calls: int = 0

    @property
    def own(self) -> float:
        """Time the sampler spent outside model calls (its own per-step work)."""
        return self.total - self.model


def timed_sampler(sampler: Any, timing: SamplerTiming, sync: Callable[[], None] = lambda: None) -> Any:
    """The same SAMPLER with its function timed: the model it receives is wrapped in a
    :class:`~bench.harness.CallTimer`, so ``timing`` ends up with total, model-call and own time."""
    import comfy.samplers

    def timed_function(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                       callback: Any = None, disable: Any = None, **options: Any) -> torch.Tensor:
        timer = CallTimer(model, sync)
        sync()
        start = time.perf_counter()
        out = sampler.sampler_function(timer, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                       **options)
        sync()
        timing.total, timing.model, timing.calls = time.perf_counter() - start, timer.seconds, timer.calls
        return out

    return comfy.samplers.KSAMPLER(timed_function, sampler.extra_options, sampler.inpaint_options)
