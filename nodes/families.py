"""Few-step families by name: Stride Few-Step Sample and Stride Few-Step Scheduler (V3 nodes, :mod:`.compat`).

A family is an entry of the method registry (``distill_core.methods``): its model kind and architectures, its
trained schedule and step counts, its sampler with the authors' knobs, CFG and FLUX guidance. These nodes read
everything from there. ``auto`` asks the registry which entry the MODEL's architecture, kind and adapter leave
(``methods.detect_method``); a family chosen by name is checked against the model (kind, architecture, pi-Flow
adapter) and the step count against the counts the family was published for, each refusal naming the choices.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

import comfy.samplers

from ..distill_core import methods
from ..distill_core.methods import METHODS, FluxResolutionShift, Method
from ..distill_core.sampling.schedules import flux_image_seq_len
from .compat import (
    StrideError,
    combo,
    io,
    latent_spatial_downscale,
    model_architectures,
    model_sampling_of_patcher,
    noise_space,
    sampling_kind,
)
from .piflow import piflow_ksampler
from .piflow_loader import has_policy_head
from .samplers import (
    CATEGORY,
    check_unit,
    denoise_input,
    require_discrete_timesteps,
    sample_with,
    schedule_error,
    seed_input,
    sigmas_output,
    stride_ksampler,
)

AUTO = "auto"
# Few-Step Sample's method names before the registry (kept so saved workflows and API prompts run): the entry each
# stands for; "{steps}" is filled with the node's step count.
LEGACY_METHODS = {
    "lcm": "lcm-lora",
    "tcd / hyper-sd unified": "tcd-lora",
    "hyper-sd n-step (ddim trailing)": "hyper-sd-{steps}step",
    "tdd": "tdd-sdxl",
}
HYPER_NSTEP = re.compile(r"hyper-sd-\d+step")
TCD_FAMILIES = [m for m in METHODS.values() if m.sampler.name == "tcd"]
TDD_FAMILIES = [m for m in METHODS.values() if m.sampler.name == "tdd"]


COMMON_STEPS = Counter(m.default_steps for m in METHODS.values()).most_common(1)[0][0]
"""The most common published default step count (Few-Step Sample's steps widget starts there)."""


def default_steps_text() -> str:
    """The registry's default step counts: the common one, then the families that differ."""
    others: dict[int, list[str]] = {}
    for entry in METHODS.values():
        if entry.default_steps != COMMON_STEPS:
            others.setdefault(entry.default_steps, []).append(entry.key)
    return f"{COMMON_STEPS} for most; " + "; ".join(f"{n}: {', '.join(keys)}" for n, keys in sorted(others.items()))


def family_tooltip(with_legacy: bool) -> str:
    """The family dropdown's tooltip: auto, then one line per registry entry; * marks facts not confirmed."""
    lines = [f"{AUTO}: the family the MODEL's architecture and kind leave (FLUX.1 schnell, SD3.5 Large, Z-Image, "
             "Qwen-Image, Wan 14B, pi-Flow adapters); where several fit (SD1.5, SDXL, FLUX.1 dev) choose one."]
    for entry in METHODS.values():
        star = " *" if entry.unconfirmed else ""
        lines.append(f"{entry.key}: {entry.label}, {entry.steps_text()} steps, {entry.sampler.describe()}, "
                     f"{entry.guidance_text()}{star}")
    unconfirmed = [f"{m.key}: {fact}" for m in METHODS.values() for fact in m.unconfirmed]
    lines.append("* not confirmed from a published source: " + "; ".join(unconfirmed) + ".")
    if with_legacy:
        lines.append("Older names, kept for saved workflows: "
                     + "; ".join(f"{old} = {new.format(steps='N')}" for old, new in LEGACY_METHODS.items()) + ".")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Which family, and does it fit the model
# ------------------------------------------------------------------------------------------
def registry_entry(choice: str, steps: int, input_name: str) -> Method:
    """The registry entry a dropdown value names (a key or an older method name)."""
    key = LEGACY_METHODS.get(choice, choice).format(steps=steps)
    if key not in METHODS:
        published = ", ".join(k for k in METHODS if HYPER_NSTEP.fullmatch(k))
        raise StrideError(f"steps: {choice} LoRAs were published as {published}, not for {steps} steps; choose one of "
                          f"those step counts, or the family by name in {input_name}.")
    return METHODS[key]


def check_fits(model: Any, entry: Method, choice: str, input_name: str) -> None:
    """Refuse a family the MODEL cannot run: continuous sigmas for a timestep schedule, another model kind,
    another architecture, a pi-Flow family without its adapter (or the reverse)."""
    sampling = model_sampling_of_patcher(model)
    if entry.schedule.space_kind == "ve":
        require_discrete_timesteps(sampling, choice)
    architectures = model_architectures(model)
    try:
        methods.check_model_kind(entry, sampling_kind(sampling))
        methods.check_architecture(entry, architectures)
    except ValueError as exc:
        hint = (" For the 1-step x0 UNet put ModelSamplingDiscrete (sampling x0) before this node."
                if entry.model_kind == "x0" else "")
        raise StrideError(f"{input_name}: {exc}. Choose one of those for this model.{hint}") from None
    adapter = has_policy_head(model)
    if entry.family == methods.PIFLOW_FAMILY and architectures and not adapter:
        raise StrideError(f"model: {entry.label} needs its pi-Flow adapter on the model; load it with Stride pi-Flow "
                          "Adapter Loader.")
    if entry.family != methods.PIFLOW_FAMILY and adapter:
        fitting = ", ".join(m.key for m in METHODS.values()
                            if m.family == methods.PIFLOW_FAMILY and set(architectures) & set(m.architectures))
        raise StrideError(f"{input_name}: this model carries a pi-Flow adapter; choose its pi-Flow family: {fitting}.")


def resolve_family(model: Any, choice: str, steps: int | None, input_name: str) -> Method:
    """The entry ``choice`` names (``auto``: the one the model leaves), checked against the model."""
    if choice == AUTO:
        try:
            entry = methods.detect_method(model_architectures(model), sampling_kind(model_sampling_of_patcher(model)),
                                          steps, has_policy_head(model))
        except ValueError as exc:
            raise StrideError(f"{input_name}: {exc}.") from None
    else:
        entry = registry_entry(choice, steps or 0, input_name)
    check_fits(model, entry, entry.key if choice == AUTO else choice, input_name)
    return entry


def check_family_steps(entry: Method, steps: int) -> None:
    try:
        methods.check_steps(entry, steps)
    except ValueError as exc:
        raise StrideError(f"steps: {exc}.") from None


# ------------------------------------------------------------------------------------------
# The family's SIGMAS and SAMPLER
# ------------------------------------------------------------------------------------------
def family_sigmas(model: Any, entry: Method, steps: int, denoise: float, latent_size: tuple[int, int]) -> torch.Tensor:
    """The family's SIGMAS on this model; ``latent_size`` (height, width) sets FLUX.1-dev's resolution shift."""
    image_seq_len = flux_image_seq_len(*latent_size) if isinstance(entry.schedule, FluxResolutionShift) else None
    try:
        sigmas = methods.method_sigmas(entry, noise_space(model_sampling_of_patcher(model)), steps, denoise=denoise,
                                       image_seq_len=image_seq_len)
    except ValueError as exc:
        if str(exc).startswith("denoise "):  # img2img keeps no trained step
            raise StrideError(f"denoise: {exc}; raise denoise.") from None
        raise schedule_error(exc, denoise) from None
    return sigmas.float()


def family_sampler(entry: Method, **overrides: Any) -> comfy.samplers.KSAMPLER:
    """The family's SAMPLER with the registry's knobs (``overrides`` replace some, e.g. gamma)."""
    if entry.sampler.name == "piflow":
        knobs = entry.sampler.knobs
        return piflow_ksampler(knobs["substeps"], knobs["temperature"], knobs["h"], knobs["shift"])
    return stride_ksampler(methods.sampler_function(entry), **methods.sampler_options(entry, **overrides))


def with_flux_guidance(conditioning: list, guidance: float) -> list:
    """The conditioning with FLUX's guidance input set where it has none (FluxGuidance's value wins)."""
    return [[tensor, options if "guidance" in options else {**options, "guidance": guidance}]
            for tensor, options in conditioning]


# ------------------------------------------------------------------------------------------
# Nodes
# ------------------------------------------------------------------------------------------
class StrideFewStepSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        tdd, tcd = METHODS["tdd-sdxl"], METHODS["tcd-lora"]
        return io.Schema(
            node_id="StrideFewStepSample", display_name="Stride Few-Step Sample", category=CATEGORY,
            description=("One node for few-step sampling with a distilled model: the family (method) picks the "
                         "schedule, sampler and knobs its authors trained and sample with (LCM, TCD, Hyper-SD, TDD, "
                         "SDXL-Lightning, DMD2, FLUX.1 schnell, Hyper-FLUX, SD3.5 Large Turbo, Qwen-Image-Lightning, "
                         "Z-Image-Turbo, Wan 2.1 lightx2v, Wan2.2-Lightning, pi-Flow); 'auto' reads it from the "
                         "model where that leaves one choice. cfg 0 uses the family's recommendation."),
            inputs=[
                io.Model.Input("model", tooltip="A distilled model: base + the family's LoRA / adapter, or a distilled "
                                                "checkpoint (FLUX.1 schnell, SD3.5 Large Turbo, Z-Image-Turbo, "
                                                "SDXL-Lightning / DMD2 UNets)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning. FLUX families: its FLUX guidance is "
                                                          "set to the family's unless FluxGuidance set one."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="Empty latent (image or video), or an encoded one with "
                                                        "denoise < 1."),
                combo("method", [AUTO, *METHODS, *LEGACY_METHODS], "Which few-step distillation the model has (its "
                      "family; the registry key).\n"
                      + family_tooltip(with_legacy=True), default=AUTO),
                io.Int.Input("steps", default=COMMON_STEPS, min=1, max=50,
                             tooltip="Steps; must be one the family was published for (its default: "
                                     f"{default_steps_text()})."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance; 0 = the family's recommendation (1 for most, "
                                       f"TDD {tdd.cfg:g}, Hyper-SD CFG LoRAs {METHODS['hyper-sd-8step-cfg'].cfg:g})."),
                io.Float.Input("gamma", default=tcd.sampler.knobs["gamma"], min=0.0, max=1.0, step=0.01,
                               tooltip="How much fresh noise each step adds, for TCD-sampled families only "
                                       f"({', '.join(m.key for m in TCD_FAMILIES)}): TCD's gamma, called 'eta' by "
                                       "diffusers' TCDScheduler and the model cards (not DDIM's eta); 0 = DDIM, 1 = "
                                       "LCM-like. Authors' default "
                                       f"{tcd.sampler.knobs['gamma']:g}. "
                                       "Not confirmed: " + METHODS["hyper-sd-unified"].unconfirmed[0] + "."),
                io.Float.Input("eta", default=tdd.sampler.knobs["eta"], min=0.0, max=1.0, step=0.01,
                               tooltip="How much fresh noise each step adds, for TDD only "
                                       f"({', '.join(m.key for m in TDD_FAMILIES)}): TDD's name for TCD's gamma (not "
                                       f"DDIM's eta). Authors' default {tdd.sampler.knobs['eta']:g}."),
                seed_input("Seed of the initial and per-step noise."),
                denoise_input("Below 1 for img2img: keeps the family's last trained steps."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent.")],
        )

    @classmethod
    def execute(cls, model: Any, positive: list, negative: list, latent_image: dict, method: str, steps: int,
                cfg: float, gamma: float, eta: float, seed: int, denoise: float) -> io.NodeOutput:
        check_unit("gamma", gamma)
        check_unit("eta", eta)
        entry = resolve_family(model, method, steps, "method")
        check_family_steps(entry, steps)
        overrides = {name: value for name, value in (("gamma", gamma), ("eta", eta)) if name in entry.sampler.knobs}
        sigmas = family_sigmas(model, entry, steps, denoise, tuple(latent_image["samples"].shape[-2:]))
        if entry.flux_guidance is not None:
            positive = with_flux_guidance(positive, entry.flux_guidance)
        return io.NodeOutput(sample_with(model, positive, negative, latent_image, family_sampler(entry, **overrides),
                                         sigmas, cfg or entry.cfg, seed))


class StrideFewStepScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideFewStepScheduler", display_name="Stride Few-Step Scheduler", category=CATEGORY,
            description=("The SIGMAS of any few-step family on this model, exactly as its authors sample (and the "
                         "family's SAMPLER with their knobs), for SamplerCustomAdvanced. Set the guider's CFG / FLUX "
                         "guidance as the family's tooltip says."),
            inputs=[
                io.Model.Input("model", tooltip="The model the sigmas are for (its kind and noise schedule)."),
                combo("family", [AUTO, *METHODS], family_tooltip(with_legacy=False), default=AUTO),
                io.Int.Input("steps", default=0, min=0, max=1000,
                             tooltip="How many steps to take; 0 = the family's published default "
                                     f"({default_steps_text()})."),
                denoise_input("Below 1 for img2img: keeps the family's last trained steps."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8,
                             tooltip="Image width in pixels: FLUX.1-dev families shift their schedule by image size "
                                     "(others ignore it)."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8,
                             tooltip="Image height in pixels (see width)."),
            ],
            outputs=[sigmas_output(),
                     io.Sampler.Output(display_name="sampler", tooltip="The family's sampler with its authors' knobs "
                                                                       "(plug into SamplerCustomAdvanced).")],
        )

    @classmethod
    def execute(cls, model: Any, family: str, steps: int, denoise: float, width: int, height: int) -> io.NodeOutput:
        entry = resolve_family(model, family, steps or None, "family")
        steps = steps or entry.default_steps
        check_family_steps(entry, steps)
        ratio = latent_spatial_downscale(model.get_model_object("latent_format"))
        sigmas = family_sigmas(model, entry, steps, denoise, (height // ratio, width // ratio))
        return io.NodeOutput(sigmas, family_sampler(entry))


NODES: list[type[io.ComfyNode]] = [StrideFewStepSample, StrideFewStepScheduler]
