"""The few-step method registry: one declarative entry per distilled family and published variant.

Each :class:`Method` records what the authors' own inference code does with their weights: the model
kind and the architectures it fits, the trained timesteps or the rule that makes them and the step counts
it was published for, the sampler and its knobs, the recommended CFG / FLUX guidance / LoRA strength,
the Wan 2.2 expert hand-over boundary, and where each fact was read (repository + commit, or model card
+ date). A fact that could not be confirmed from a published source is listed in ``Method.unconfirmed``
and shown by :meth:`Method.tooltip`. Nodes read their defaults from here and nowhere else.

Conventions
-----------
* ``cfg`` is ComfyUI's CFG scale: 1 = one model call per step, no guidance. diffusers' ``guidance_scale``
  0 and 1 both mean that for SD/SDXL/SD3/Z-Image pipelines (CFG runs only above 1); Qwen-Image's
  ``true_cfg_scale`` 1 likewise.
* ``flux_guidance`` is FLUX's distilled guidance embedding (ComfyUI's FluxGuidance node, diffusers
  FluxPipeline's ``guidance_scale``): an input of the model, not CFG.
* ``lora_strength`` is the strength the authors load the LoRA with (diffusers ``fuse_lora(lora_scale)``,
  1 when not given; ComfyUI LoraLoader strength); ``None`` for a full model or a pi-Flow adapter.
* Sigmas are in the model's own convention (:mod:`~distill_core.spaces`): VE sigmas from the model's
  1000-step table for eps / v / x0 models, flow sigmas for flow models.

gamma and eta
-------------
Three different quantities are called ``eta`` by the tools users meet, which is why TCD users confuse
them. (1) TCD's *gamma* (paper symbol) is the fraction of the next timestep to denoise past before
re-noising back: ``s = floor((1 - gamma) t_next)``; 0 = deterministic (DDIM), 1 = LCM-like. diffusers'
``TCDScheduler`` and the TCD / Hyper-SD model cards call it ``eta``; ComfyUI-TCD's node too. (2) TDD's
official scheduler calls the same quantity ``eta`` (0.2 for TDD). (3) DDIM's ``eta`` (diffusers
``DDIMScheduler.step(eta)``, k-diffusion's ancestral ``eta``) is something else: the variance mix
between DDIM and DDPM. Stride names (1)/(2) ``gamma`` for TCD and keeps TDD's ``eta``; neither is (3).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from .sampling import lcm, piflow, tcd, tdd
from .sampling.schedules import (
    HYPER_SDXL_ONE_STEP_TIMESTEP,
    flow_sigmas,
    flux_mu,
    img2img_tail,
    lcm_timesteps,
    sd3_sigmas,
    tdd_timesteps,
    trailing_timesteps,
)
from .spaces import NoiseSpace

READ_ON = "2026-12-02"
"""The date the model cards below were read (commits pin the repositories)."""

MODEL_KINDS = ("eps", "v", "flow", "x0")
SPACE_KIND = {"eps": "ve", "v": "ve", "x0": "ve", "flow": "flow"}
"""The noise convention (:class:`~distill_core.spaces.NoiseSpace` kind) of each model kind."""

# Architectures (model families) an entry fits. The node layer maps ComfyUI's model classes onto these.
SD15 = "SD1.5"
SDXL = "SDXL"
FLUX1_DEV = "FLUX.1-dev"
FLUX1_SCHNELL = "FLUX.1-schnell"
FLUX2_DEV = "FLUX.2-dev"
SD35_LARGE = "SD3.5-Large"
QWEN_IMAGE = "Qwen-Image"
QWEN_IMAGE_EDIT = "Qwen-Image-Edit"
Z_IMAGE = "Z-Image"
WAN21_T2V_14B = "Wan2.1-T2V-14B"
WAN21_I2V_14B = "Wan2.1-I2V-14B"
WAN22_T2V_A14B = "Wan2.2-T2V-A14B"
WAN22_I2V_A14B = "Wan2.2-I2V-A14B"
PIFLOW_FAMILY = "pi-Flow"
"""The family whose entries need a pi-Flow adapter (a policy head) on the model."""


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where facts were read: a repository and path at a commit, or a model card on a date."""

    where: str
    version: str
    facts: str

    def cite(self) -> str:
        return f"{self.where} ({self.version}): {self.facts}"


def _repo(repository: str, commit: str, paths: str, facts: str) -> Source:
    return Source(f"github.com/{repository} {paths}", f"commit {commit[:10]}", facts)


def _card(name: str, facts: str, how: str = "") -> Source:
    return Source(f"huggingface.co/{name} model card", f"read {READ_ON}{how}", facts)


DIFFUSERS = Source("diffusers 0.42.1 (pip)", "installed version", "the reference schedulers used by the tests")
LCM_REPO = _repo(
    "luosiallen/latent-consistency-model", "a9ad79587cc8bd1e404ccd1a3056a3da969b2f62", "README.md",
    "LCM: 1-50 steps on the 50-step skipping grid, 1-8 recommended")
LCM_LORA_CARD = _card(
    "latent-consistency/lcm-lora-sdxl",
    "LCM-LoRA: 2-8 steps; 'disable guidance_scale or use values between 1.0 and 2.0'",
    " (wording read from a verbatim copy in another card)")
TCD_REPO = _repo(
    "jabir-zheng/TCD", "847b2a266cde1537acb96587e6cc101f7a42db75", "README.md",
    "TCDScheduler, 4 steps, guidance_scale 0, eta (= gamma) 0.3; 'higher eta when increasing steps'")
HYPER_CARD = _card(
    "ByteDance/Hyper-SD",
    "N-step LoRAs: DDIMScheduler timestep_spacing='trailing', guidance_scale 0, fuse_lora() (README diff "
    "831b863); unified 1-step LoRA: TCDScheduler, eta 1.0 at 1 step, 1-8 steps; CFG LoRAs: guidance 5-8; "
    "FLUX LoRAs: LoRA scale 0.125, guidance 3.5")
HYPER_COMFY_NODE = Source(
    "huggingface.co/ByteDance/Hyper-SD comfyui/ComfyUI-HyperSDXL1StepUnetScheduler/node.py", "commit c9d3150",
    "1-step UNet: SIGMAS [sigma(800), 0] with the host's noise scaling")
COMFY_TCD = _repo(
    "JettHu/ComfyUI-TCD", "888a8403b791333ce98c910a3b76f1842e1adee8", "README.md",
    "the node Hyper-SD's unified-LoRA workflows use: eta (= gamma) default 0.3")
TDD_REPO = _repo(
    "RedAIGC/Target-Driven-Distillation", "89cc1e8e685009a04a90fad0839ca7dffc3b333c", "README.md, tdd_scheduler.py",
    "SDXL: TDDScheduler, 4 steps, guidance 1.7, eta 0.2, fuse_lora(); FLUX: FluxPipeline (Euler, resolution "
    "shift), 8 steps, guidance 2.0, fuse_lora(0.125)")
PIFLOW_REPO = _repo(
    "Lakonik/piFlow", "422954182a10f27eb05458bb5a43f1518817cf70", "demo/example_*_pipeline.py, lakonlab/pipelines",
    "FlowMapSDEScheduler shift 3.2, final_step_size_scale 0.5; 128 substeps, temperature 'auto'; 4-NFE GM/DX "
    "adapters, 8-NFE GM-FLUX; GM-Qwen and GM-FLUX.2 elastic (>= 4 NFE); guidance 3.5 (FLUX.1), 4.0 (FLUX.2)")
LIGHTNING_CARD = _card(
    "ByteDance/SDXL-Lightning",
    "EulerDiscreteScheduler timestep_spacing='trailing', guidance_scale 0, the N-step checkpoint for N steps; "
    "1-step UNet only, prediction_type='sample'; ComfyUI: euler + sgm_uniform",
    " (read from a verbatim copy of its README)")
DMD2_REPO = _repo(
    "tianweiy/DMD2", "8d8fa55633d47cfb81bbc7a892e7248f9518763f", "README.md, demo/text_to_image_sdxl.py",
    "4-step: timesteps 999, 749, 499, 249 (README: LCMScheduler; own demo: x0, then add_noise at the next "
    "timestep); 1-step: timestep 399; guidance_scale 0; LoRA fuse_lora(1.0); unit noise input")
FLUX_REPO = _repo(
    "black-forest-labs/flux", "802fb4713906133fcbd0d8dc5351620ca4773036", "src/flux/sampling.py, cli.py",
    "get_schedule: linspace(1, 0, N + 1), resolution shift mu(256 -> 0.5, 4096 -> 1.15) except schnell "
    "(shift=False); schnell 4 steps; Euler")
SD35_REPO = _repo(
    "Stability-AI/sd3.5", "fbf8f483f992d8d6ad4eaaeb23b1dc5f523c3b3a", "sd3_infer.py",
    "sd3.5_large_turbo: shift 3.0, cfg 1.0, 4 steps, euler; get_sigmas: linspace(sigma_max, sigma_min)")
QWEN_LIGHTNING_REPO = _repo(
    "ModelTC/Qwen-Image-Lightning", "25d1e9935ba97e1f60503f8c000201e08b1fe8f4",
    "generate_with_diffusers.py, README.md, workflows/qwen-image-4steps.json",
    "FlowMatchEulerDiscrete, exponential shift with base_shift = max_shift = ln 3 ('shift=3 in distillation'), "
    "4 / 8 steps, true_cfg 1.0; ComfyUI: ModelSamplingAuraFlow 3, euler simple, LoRA 1.0")
ZIMAGE_REPO = _repo(
    "Tongyi-MAI/Z-Image", "c7ec13578cc27b01d547e1b3c62bc8b95bc6cb6e",
    "src/config/{inference,model}.py, src/zimage/{scheduler,pipeline}.py",
    "8 steps, guidance 0, FlowMatchEuler shift 3.0 without dynamic shifting, raw times linspace(1, 0, N + 1)[:-1]; "
    "README: diffusers num_inference_steps=9 'results in 8 DiT forwards'")
LIGHTX2V_REPO = _repo(
    "ModelTC/LightX2V", "f8aee98b5462cca8d7288888146ebd95592bf266",
    "configs/distill/wan21/*lora_4step_cfg.json, lightx2v/models/schedulers/wan/step_distill/scheduler.py",
    "denoising_step_list [1000, 750, 500, 250], sample_shift 5, enable_cfg false, LoRA strength 1.0; Euler steps "
    "(x0 = x - sigma v, then x0 + sigma_next v)")
WAN22_LIGHTNING_REPO = _repo(
    "ModelTC/Wan2.2-Lightning", "92efeb4442a90d8f1985a486a0f33afd12dfeacf",
    "wan/configs/wan_{t2v,i2v}_A14B.py, wan/text2video.py, wan/utils/fm_solvers_euler.py",
    "4 steps, shift 5.0, guide scale (1.0, 1.0), Euler on linspace(1000, 0, N + 1) shifted; high-noise expert "
    "while t >= boundary * 1000 (T2V 0.875, I2V 0.900); LoRA on both experts")
WAN22_REPO = _repo(
    "Wan-Video/Wan2.2", "42bf4cfaa384bc21833865abc2f9e6c0e67233dc", "wan/configs/wan_{t2v,i2v}_A14B.py",
    "expert boundary 0.875 (T2V A14B), 0.900 (I2V A14B)")


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------
def _require_space(space: NoiseSpace, kind: str, what: str) -> None:
    if space.kind != kind:
        raise ValueError(f"{what} is defined for {kind.upper()} models, but the model is a {space.kind.upper()} model")


@dataclass(frozen=True)
class _TimestepSchedule:
    """A schedule on the model's discrete training timesteps (VE models); img2img keeps the last steps."""

    space_kind: ClassVar[str] = "ve"

    def timesteps(self, steps: int, denoise: float = 1.0) -> list[int]:
        return img2img_tail(self._full(steps), steps, denoise)

    def _full(self, steps: int) -> list[int]:
        raise NotImplementedError

    def sigmas(self, space: NoiseSpace, steps: int, denoise: float = 1.0, image_seq_len: int | None = None) -> Tensor:
        _require_space(space, "ve", f"the {self.describe()}")
        return space.sigmas_for_timesteps(self.timesteps(steps, denoise))

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class LCMGrid(_TimestepSchedule):
    """LCM's / TCD's skipping grid (:func:`.schedules.lcm_timesteps`); img2img is LCM's strength."""

    original_steps: int = 50

    def timesteps(self, steps: int, denoise: float = 1.0) -> list[int]:
        return lcm_timesteps(steps, self.original_steps, strength=denoise)

    def describe(self) -> str:
        return f"LCM grid ({self.original_steps} original steps; 4 steps -> 999, 759, 499, 259)"


@dataclass(frozen=True)
class Trailing(_TimestepSchedule):
    """DDIM / Euler ``timestep_spacing="trailing"`` (:func:`.schedules.trailing_timesteps`)."""

    def _full(self, steps: int) -> list[int]:
        return trailing_timesteps(steps)

    def describe(self) -> str:
        return "trailing timesteps (4 steps -> 999, 749, 499, 249)"


@dataclass(frozen=True)
class TDDGrid(_TimestepSchedule):
    """TDD's 250-target grid (:func:`.schedules.tdd_timesteps`)."""

    special_jump: bool = False

    def _full(self, steps: int) -> list[int]:
        return tdd_timesteps(steps, self.special_jump)

    def describe(self) -> str:
        return "TDD 250-target grid (4 steps -> 999, 751, 499, 251)"


@dataclass(frozen=True)
class FixedTimesteps(_TimestepSchedule):
    """A published list of timesteps per step count (DMD2, the Hyper-SDXL 1-step UNet)."""

    by_steps: tuple[tuple[int, tuple[int, ...]], ...]

    def _full(self, steps: int) -> list[int]:
        table = dict(self.by_steps)
        if steps not in table:
            raise ValueError(f"no published timesteps for {steps} steps (published: {sorted(table)})")
        return list(table[steps])

    def describe(self) -> str:
        return "timesteps " + "; ".join(", ".join(map(str, t)) for _, t in self.by_steps)


@dataclass(frozen=True)
class _FlowSchedule:
    """A schedule given directly as flow sigmas (flow models); img2img keeps the last steps."""

    space_kind: ClassVar[str] = "flow"

    def full_sigmas(self, steps: int, image_seq_len: int | None) -> Tensor:
        raise NotImplementedError

    def sigmas(self, space: NoiseSpace, steps: int, denoise: float = 1.0, image_seq_len: int | None = None) -> Tensor:
        _require_space(space, "flow", f"the {self.describe()}")
        return img2img_tail(self.full_sigmas(steps, image_seq_len), steps, denoise)

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class FlowShift(_FlowSchedule):
    """Uniform raw times ``linspace(1, 0, N + 1)[:-1]`` at a fixed shift (:func:`.schedules.flow_sigmas`)."""

    shift: float

    def full_sigmas(self, steps: int, image_seq_len: int | None) -> Tensor:
        return flow_sigmas(steps, self.shift)

    def describe(self) -> str:
        return f"uniform flow times, shift {self.shift:g}"


@dataclass(frozen=True)
class SD3Shift(_FlowSchedule):
    """SD3.5's raw times from 1 to the table's smallest sigma, fixed shift (:func:`.schedules.sd3_sigmas`)."""

    shift: float

    def full_sigmas(self, steps: int, image_seq_len: int | None) -> Tensor:
        return sd3_sigmas(steps, self.shift)

    def describe(self) -> str:
        return f"SD3 flow times to sigma_min, shift {self.shift:g}"


@dataclass(frozen=True)
class FluxResolutionShift(_FlowSchedule):
    """FLUX.1-dev's schedule: uniform raw times at shift ``exp(mu)``, ``mu`` linear in the image's token count."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def full_sigmas(self, steps: int, image_seq_len: int | None) -> Tensor:
        if image_seq_len is None:
            raise ValueError("this schedule depends on the image size: give image_seq_len (latent height / 2 x "
                             "latent width / 2 for FLUX.1)")
        mu = flux_mu(image_seq_len, self.base_shift, self.max_shift, self.base_seq_len, self.max_seq_len)
        return flow_sigmas(steps, float(torch.tensor(mu, dtype=torch.float64).exp()))

    def describe(self) -> str:
        return f"uniform flow times, FLUX resolution shift (mu {self.base_shift}-{self.max_shift})"


@dataclass(frozen=True)
class PiFlowSchedule(_FlowSchedule):
    """pi-Flow's schedule (:func:`.piflow.piflow_sigmas`); img2img scales the raw times (official rule)."""

    shift: float = piflow.DEFAULT_SHIFT
    final_step_size_scale: float = piflow.DEFAULT_FINAL_STEP_SIZE_SCALE

    def full_sigmas(self, steps: int, image_seq_len: int | None) -> Tensor:
        return piflow.piflow_sigmas(steps, self.shift, self.final_step_size_scale)

    def sigmas(self, space: NoiseSpace, steps: int, denoise: float = 1.0, image_seq_len: int | None = None) -> Tensor:
        _require_space(space, "flow", f"the {self.describe()}")
        return piflow.piflow_sigmas(steps, self.shift, self.final_step_size_scale, denoise)

    def describe(self) -> str:
        return f"pi-Flow times, shift {self.shift:g}, final step x{self.final_step_size_scale:g}"


Schedule = LCMGrid | Trailing | TDDGrid | FixedTimesteps | FlowShift | SD3Shift | FluxResolutionShift | PiFlowSchedule
ScheduleKind = TypeVar("ScheduleKind", LCMGrid, Trailing, TDDGrid, FixedTimesteps, FlowShift, SD3Shift,
                       FluxResolutionShift, PiFlowSchedule)


# ------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------
SAMPLER_NAMES = ("lcm", "tcd", "tdd", "euler", "piflow")


@dataclass(frozen=True)
class Sampler:
    """A Stride sampler by name with its knobs at the authors' values (the keyword arguments it gets).

    ``euler`` is Stride's DDIM step (TCD with gamma 0), which is exactly the Euler step of diffusers'
    EulerDiscreteScheduler / FlowMatchEulerDiscreteScheduler, DDIMScheduler (eta 0) and ComfyUI's
    ``euler``: ``x0 + sigma_next (x - x0) / sigma`` in VE, the same straight-line move in flow.
    """

    name: str
    knobs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        object.__setattr__(self, "knobs", MappingProxyType(dict(self.knobs)))

    def describe(self) -> str:
        knobs = ", ".join(f"{k} {v}" for k, v in self.knobs.items())
        return f"{self.name} ({knobs})" if knobs else self.name


_SAMPLER_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "lcm": lcm.sample_lcm, "tcd": tcd.sample_tcd, "tdd": tdd.sample_tdd, "euler": tcd.sample_tcd,
    "piflow": piflow.sample_piflow}


# ------------------------------------------------------------------------------------------
# Entries
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One family + published variant, as its authors sample it (see the module docstring)."""

    key: str
    family: str
    variant: str
    model_kind: str
    architectures: tuple[str, ...]
    schedule: Schedule
    steps: tuple[int, ...]
    default_steps: int
    sampler: Sampler
    cfg: float
    flux_guidance: float | None = None
    lora_strength: float | None = None
    expert_boundary: float | None = None
    notes: str = ""
    unconfirmed: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"{self.key}: model kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        if SPACE_KIND[self.model_kind] != self.schedule.space_kind:
            raise ValueError(f"{self.key}: a {self.model_kind} model cannot use the {self.schedule.describe()}")
        if self.default_steps not in self.steps:
            raise ValueError(f"{self.key}: default steps {self.default_steps} not among {self.steps}")

    @property
    def label(self) -> str:
        return f"{self.family} {self.variant}"

    def steps_text(self) -> str:
        """The supported step counts, compactly: ``4``, ``4, 8`` or ``1-50``."""
        values = sorted(self.steps)
        if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
            return f"{values[0]}-{values[-1]}"
        return ", ".join(map(str, values))

    def guidance_text(self) -> str:
        text = f"CFG {self.cfg:g}"
        if self.flux_guidance is not None:
            text += f", FLUX guidance {self.flux_guidance:g}"
        return text

    def tooltip(self) -> str:
        """One paragraph for a node tooltip: settings, notes and the facts that are not confirmed."""
        parts = [f"{self.label}: {self.schedule.describe()}, {self.steps_text()} steps (default {self.default_steps}), "
                 f"sampler {self.sampler.describe()}, {self.guidance_text()}"]
        if self.lora_strength is not None:
            parts.append(f"LoRA strength {self.lora_strength:g}")
        if self.expert_boundary is not None:
            parts.append(f"high-noise expert while sigma >= {self.expert_boundary:g} (hybrid hand-over, "
                         "distill_core.sampling.hybrid.handover_steps_at)")
        text = "; ".join(parts) + "."
        if self.notes:
            text += " " + self.notes
        if self.unconfirmed:
            text += " Not confirmed from a published source: " + "; ".join(self.unconfirmed) + "."
        return text


def _fixed(*pairs: tuple[int, tuple[int, ...]]) -> FixedTimesteps:
    return FixedTimesteps(tuple(pairs))


EULER = Sampler("euler")
TCD_GAMMA = 0.3
TDD_ETA = 0.2
DMD2_4STEP_TIMESTEPS = (999, 749, 499, 249)
DMD2_1STEP_TIMESTEP = 399
WAN22_T2V_BOUNDARY = 0.875
WAN22_I2V_BOUNDARY = 0.900
ELASTIC_PIFLOW_STEPS = tuple(range(4, 51))

_GAMMA_NOTE = ("gamma is TCD's stochasticity, called 'eta' by diffusers' TCDScheduler and the model cards (not "
               "DDIM's eta): 0 = deterministic DDIM, 1 = LCM-like.")
_ELASTIC = "Its GM adapters are elastic: any step count from 4 works (the authors: 'any value above 4')."
_PIFLOW = "Load with Stride pi-Flow Adapter Loader; the network outputs a policy integrated over substeps."
_DX = " DX grid segment 1 / 3.5 = 4 NFE."
_SD = (SD15, SDXL)


def _entries() -> list[Method]:
    lcm_lora = Method(
        "lcm-lora", "LCM", "LoRA (SD1.5 / SDXL / SSD-1B)", "eps", _SD, LCMGrid(), tuple(range(1, 51)), 4,
        Sampler("lcm", {"boundary": True}), cfg=1.0, lora_strength=1.0,
        notes="Authors recommend 2-8 steps and CFG 1-2 (higher CFG needs a negative prompt).",
        sources=(LCM_REPO, LCM_LORA_CARD, DIFFUSERS))
    tcd_lora = Method(
        "tcd-lora", "TCD", "LoRA (SD1.5 / SDXL)", "eps", _SD, LCMGrid(), tuple(range(1, 51)), 4,
        Sampler("tcd", {"gamma": TCD_GAMMA}), cfg=1.0, lora_strength=1.0,
        notes=_GAMMA_NOTE + " The TCD authors recommend a higher gamma at more steps.",
        sources=(TCD_REPO, DIFFUSERS))
    hyper_nstep = [
        Method(f"hyper-sd-{n}step", "Hyper-SD", f"{n}-step LoRA (SD1.5 / SDXL)", "eps", _SD, Trailing(), (n,), n,
               EULER, cfg=1.0, lora_strength=1.0, notes="DDIM on trailing timesteps (eta 0), which is the Euler step.",
               sources=(HYPER_CARD, DIFFUSERS))
        for n in (2, 4, 8)]
    hyper_cfg = [
        Method(f"hyper-sd-{n}step-cfg", "Hyper-SD", f"{n}-step CFG-preserved LoRA (SD1.5 / SDXL)", "eps", _SD,
               Trailing(), (n,), n, EULER, cfg=5.0, lora_strength=1.0,
               notes="Trained to keep real CFG: guidance 5-8 and negative prompts work.",
               unconfirmed=("the sampler and timesteps (taken to be the N-step LoRAs' DDIM trailing; the card's "
                            "code for the CFG LoRAs could not be read here)",),
               sources=(HYPER_CARD,))
        for n in (8, 12)]
    hyper_unified = Method(
        "hyper-sd-unified", "Hyper-SD", "unified 1-step LoRA with TCD, 1-8 steps (SD1.5 / SDXL)", "eps", _SD,
        LCMGrid(), tuple(range(1, 9)), 1, Sampler("tcd", {"gamma": TCD_GAMMA}), cfg=1.0, lora_strength=1.0,
        notes=_GAMMA_NOTE + " At 1 step gamma has no effect; per the Hyper-SD card lower gamma gives more detail.",
        unconfirmed=("gamma for 2-8 steps (the card's example is 1 step with eta 1.0; 0.3 is the default of "
                     "ComfyUI-TCD, the node the authors' workflows use)",),
        sources=(HYPER_CARD, COMFY_TCD, DIFFUSERS))
    hyper_unet = Method(
        "hyper-sdxl-1step-unet", "Hyper-SD", "SDXL 1-step UNet", "eps", (SDXL,),
        _fixed((1, (HYPER_SDXL_ONE_STEP_TIMESTEP,))), (1,), 1, Sampler("lcm", {"boundary": True}), cfg=1.0,
        notes="One step at timestep 800, as the authors' ComfyUI scheduler node.",
        unconfirmed=("the starting noise: the authors' ComfyUI node leaves ComfyUI's sigma(800)-scaled noise "
                     "(network input std 0.981), their diffusers example (LCMScheduler, timesteps=[800]) starts "
                     "from unit noise",),
        sources=(HYPER_COMFY_NODE, HYPER_CARD, DIFFUSERS))
    hyper_flux = [
        Method(f"hyper-flux-{n}step", "Hyper-SD", f"FLUX.1-dev {n}-step LoRA", "flow", (FLUX1_DEV,),
               FluxResolutionShift(), (n,), n, EULER, cfg=1.0, flux_guidance=3.5, lora_strength=0.125,
               notes="FluxPipeline's own schedule (resolution-dependent shift) and Euler.",
               unconfirmed=("the sampler and schedule (the card names only steps, LoRA scale and guidance; "
                            "FluxPipeline's defaults are assumed)",),
               sources=(HYPER_CARD, FLUX_REPO, DIFFUSERS))
        for n in (8, 16)]
    tdd_sdxl = Method(
        "tdd-sdxl", "TDD", "SDXL LoRA", "eps", (SDXL,), TDDGrid(), (4, 5, 6, 7, 8), 4,
        Sampler("tdd", {"eta": TDD_ETA, "clip_x0_steps": 0, "clip_ratio": tdd.CLIP_RATIO}), cfg=1.7, lora_strength=1.0,
        notes="Trained with 20% empty prompts, so real CFG works. eta is TDD's name for TCD's gamma (not DDIM's eta).",
        sources=(TDD_REPO,))
    tdd_flux = Method(
        "tdd-flux", "TDD", "FLUX.1-dev LoRA", "flow", (FLUX1_DEV,), FluxResolutionShift(), (4, 5, 6, 7, 8), 8,
        EULER, cfg=1.0, flux_guidance=2.0, lora_strength=0.125,
        notes="Sampled with FluxPipeline's Euler and schedule (TDD with eta 0).",
        sources=(TDD_REPO, FLUX_REPO, DIFFUSERS))

    piflow_sampler = Sampler("piflow", {"substeps": piflow.DEFAULT_SUBSTEPS, "temperature": piflow.AUTO_TEMPERATURE,
                                        "h": 0.0, "shift": piflow.DEFAULT_SHIFT})  # DX policies have no temperature
    piflow_entries = [
        Method(f"pi-flux1-{policy.lower()}-{n}step", PIFLOW_FAMILY, f"pi-FLUX.1 {policy} {n}-NFE adapter", "flow",
               (FLUX1_DEV,), PiFlowSchedule(), (n,), n, piflow_sampler, cfg=1.0, flux_guidance=3.5,
               notes=_PIFLOW + (_DX if policy == "DX" else ""), sources=(PIFLOW_REPO,))
        for policy, n in (("GM", 4), ("GM", 8), ("DX", 4))]
    piflow_entries += [
        Method("pi-qwen-gm", PIFLOW_FAMILY, "pi-Qwen-Image GM adapter", "flow", (QWEN_IMAGE,), PiFlowSchedule(),
               ELASTIC_PIFLOW_STEPS, 4, piflow_sampler, cfg=1.0, notes=_PIFLOW + " " + _ELASTIC,
               sources=(PIFLOW_REPO,)),
        Method("pi-qwen-dx-4step", PIFLOW_FAMILY, "pi-Qwen-Image DX 4-NFE adapter", "flow", (QWEN_IMAGE,),
               PiFlowSchedule(), (4,), 4, piflow_sampler, cfg=1.0, notes=_PIFLOW + _DX, sources=(PIFLOW_REPO,)),
        Method("pi-flux2-gm", PIFLOW_FAMILY, "pi-FLUX.2 GM adapter", "flow", (FLUX2_DEV,), PiFlowSchedule(),
               ELASTIC_PIFLOW_STEPS, 4, piflow_sampler, cfg=1.0, flux_guidance=4.0, notes=_PIFLOW + " " + _ELASTIC,
               sources=(PIFLOW_REPO,)),
    ]

    lightning = [
        Method(f"sdxl-lightning-{n}step", "SDXL-Lightning", f"{n}-step UNet / LoRA", "eps", (SDXL,), Trailing(),
               (n,), n, EULER, cfg=1.0, lora_strength=1.0, notes="Use the checkpoint made for this step count.",
               sources=(LIGHTNING_CARD, DIFFUSERS))
        for n in (2, 4, 8)]
    lightning_x0 = Method(
        "sdxl-lightning-1step-x0", "SDXL-Lightning", "1-step UNet (x0 prediction)", "x0", (SDXL,), Trailing(), (1,), 1,
        EULER, cfg=1.0,
        notes="Predicts x0 ('sample'): set the model's sampling to x0 (ComfyUI ModelSamplingDiscrete x0). The authors "
              "call it experimental; the 2-step model is better.",
        sources=(LIGHTNING_CARD, DIFFUSERS))
    dmd2 = [
        Method("dmd2-sdxl-4step", "DMD2", "SDXL 4-step UNet / LoRA", "eps", (SDXL,), _fixed((4, DMD2_4STEP_TIMESTEPS)),
               (4,), 4, Sampler("lcm", {"boundary": False}), cfg=1.0, lora_strength=1.0,
               notes="Predict x0, re-noise to the next trained timestep (ComfyUI's lcm + sgm_uniform lands on "
                     "fractional timesteps instead). The README's LCMScheduler adds LCM's boundary scalings, a "
                     "change below 1e-7 at these timesteps.",
               sources=(DMD2_REPO, DIFFUSERS)),
        Method("dmd2-sdxl-1step", "DMD2", "SDXL 1-step UNet", "eps", (SDXL,), _fixed((1, (DMD2_1STEP_TIMESTEP,))),
               (1,), 1, Sampler("lcm", {"boundary": False, "unit_noise_input": True}), cfg=1.0,
               notes="One step at timestep 399 on pure unit noise (the generator's training input); ComfyUI alone "
                     "would hand it noise of std 0.76. txt2img only.",
               sources=(DMD2_REPO, DIFFUSERS)),
    ]
    schnell = Method(
        "flux1-schnell", "FLUX.1 schnell", "full model", "flow", (FLUX1_SCHNELL,), FlowShift(1.0), (1, 2, 3, 4), 4,
        EULER, cfg=1.0, notes="No guidance input and no resolution shift (timestep-distilled).",
        sources=(FLUX_REPO, DIFFUSERS))
    sd35_turbo = Method(
        "sd35-large-turbo", "SD3.5 Large Turbo", "full model", "flow", (SD35_LARGE,), SD3Shift(3.0), (4,), 4, EULER,
        cfg=1.0, notes="ComfyUI's 'normal' scheduler on the SD3 model gives the same sigmas; 'simple' does not.",
        unconfirmed=("step counts other than 4",), sources=(SD35_REPO, DIFFUSERS))
    qwen = [
        Method(f"qwen-image-lightning-{n}step", "Qwen-Image-Lightning", f"{n}-step LoRA", "flow",
               (QWEN_IMAGE, QWEN_IMAGE_EDIT), FlowShift(3.0), (n,), n, EULER, cfg=1.0, lora_strength=1.0,
               notes="Shift 3 at every resolution (diffusers: exponential shift with base = max = ln 3).",
               sources=(QWEN_LIGHTNING_REPO, DIFFUSERS))
        for n in (4, 8)]
    zimage = Method(
        "z-image-turbo", "Z-Image-Turbo", "full model", "flow", (Z_IMAGE,), FlowShift(3.0), (8,), 8, EULER, cfg=1.0,
        notes="8 network calls: the README's diffusers 'num_inference_steps=9' ends on a skipped sigma-0 step.",
        unconfirmed=("shift 3.0 is the official code's default; the released scheduler_config.json could not be "
                     "read here",),
        sources=(ZIMAGE_REPO, DIFFUSERS))
    wan21 = Method(
        "wan21-lightx2v-4step", "Wan2.1 lightx2v", "step/CFG-distilled 4-step LoRA (T2V / I2V 14B)", "flow",
        (WAN21_T2V_14B, WAN21_I2V_14B), FlowShift(5.0), (4,), 4, EULER, cfg=1.0, lora_strength=1.0,
        notes="Sigmas 1, 0.9375, 0.8333, 0.625 (timesteps 1000, 750, 500, 250 at shift 5).", sources=(LIGHTX2V_REPO,))
    wan22 = [
        Method(f"wan22-lightning-{task.lower()}-a14b", "Wan2.2-Lightning", f"{task} A14B 4-step LoRAs (both experts)",
               "flow", (architecture,), FlowShift(5.0), (4,), 4, EULER, cfg=1.0, lora_strength=1.0,
               expert_boundary=boundary,
               notes=f"Wan 2.2's own expert boundary {boundary:g}: the high-noise expert runs the steps with sigma >= "
                     f"{boundary:g} (here the first 2), the low-noise expert the rest; each with its Lightning LoRA.",
               sources=(WAN22_LIGHTNING_REPO, WAN22_REPO))
        for task, architecture, boundary in (("T2V", WAN22_T2V_A14B, WAN22_T2V_BOUNDARY),
                                             ("I2V", WAN22_I2V_A14B, WAN22_I2V_BOUNDARY))]
    return [lcm_lora, tcd_lora, *hyper_nstep, *hyper_cfg, hyper_unified, hyper_unet, *hyper_flux, tdd_sdxl, tdd_flux,
            *piflow_entries, *lightning, lightning_x0, *dmd2, schnell, sd35_turbo, *qwen, zimage, wan21, *wan22]


METHODS: Mapping[str, Method] = MappingProxyType({entry.key: entry for entry in _entries()})
"""Every registered method by key, in display order."""


# ------------------------------------------------------------------------------------------
# Look-ups and checks
# ------------------------------------------------------------------------------------------
def method(key: str) -> Method:
    """The entry ``key``; an unknown key is refused with the list of valid ones."""
    if key not in METHODS:
        raise KeyError(f"unknown few-step method {key!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[key]


def schedule_as(entry: Method, kind: type[ScheduleKind]) -> ScheduleKind:
    """``entry``'s schedule as the schedule class ``kind`` (to read its parameters); another class is refused."""
    if not isinstance(entry.schedule, kind):
        raise TypeError(f"{entry.key}'s schedule is a {type(entry.schedule).__name__}, not a {kind.__name__}")
    return entry.schedule


def methods_for(architecture: str | None = None, model_kind: str | None = None) -> list[Method]:
    """The entries that fit an architecture and / or a model kind (``None`` = any)."""
    return [m for m in METHODS.values()
            if (architecture is None or architecture in m.architectures)
            and (model_kind is None or m.model_kind == model_kind)]


def check_model_kind(entry: Method, model_kind: str) -> None:
    """Refuse a model of another kind, naming the kinds and the methods that fit it."""
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {model_kind!r}")
    if model_kind != entry.model_kind:
        fitting = ", ".join(m.key for m in methods_for(model_kind=model_kind)) or "none"
        raise ValueError(f"{entry.label} needs a model of kind {entry.model_kind}, but this model is {model_kind}; "
                         f"methods for {model_kind} models: {fitting}")


def check_steps(entry: Method, steps: int) -> None:
    """Refuse a step count the method was not published for, listing the valid ones."""
    if steps not in entry.steps:
        raise ValueError(f"{entry.label} was trained for {entry.steps_text()} steps, not {steps}; "
                         f"choose {entry.steps_text()} (default {entry.default_steps})")


def method_sigmas(entry: Method, space: NoiseSpace, steps: int | None = None, *, denoise: float = 1.0,
                  image_seq_len: int | None = None) -> Tensor:
    """The SIGMAS (float64, ending in 0) of ``entry`` at ``steps`` (default: the entry's) on ``space``.

    ``denoise < 1`` (img2img) keeps the last ``int(steps * denoise)`` trained steps (LCM / TCD grids: LCM's
    strength; pi-Flow: its raw-time scaling). ``image_seq_len`` is needed by FLUX.1-dev's resolution shift.
    Refuses an unsupported step count or a space of the wrong kind with the valid choices.
    """
    steps = entry.default_steps if steps is None else steps
    check_steps(entry, steps)
    if space.kind != entry.schedule.space_kind:
        raise ValueError(f"{entry.label} is for {entry.model_kind} models ({entry.schedule.space_kind.upper()} "
                         f"sigmas), but this model is a {space.kind.upper()} model; methods for it: "
                         + ", ".join(m.key for m in METHODS.values() if m.schedule.space_kind == space.kind))
    return entry.schedule.sigmas(space, steps, denoise, image_seq_len)


def sampler_function(entry: Method) -> Callable[..., Tensor]:
    """The Stride sampler function that runs ``entry`` (``euler`` is TCD with gamma 0)."""
    return _SAMPLER_FUNCTIONS[entry.sampler.name]


def sampler_options(entry: Method, **overrides: Any) -> dict[str, Any]:
    """The keyword options of ``entry``'s sampler besides ``space``: its knobs with ``overrides`` replacing some.

    A name that is not one of the sampler's knobs is refused with the list of knobs.
    """
    unknown = set(overrides) - set(entry.sampler.knobs)
    if unknown:
        raise ValueError(f"{entry.label}'s {entry.sampler.name} sampler has no knob {', '.join(sorted(unknown))}; "
                         f"its knobs: {', '.join(entry.sampler.knobs) or 'none'}")
    options = {**entry.sampler.knobs, **overrides}
    if entry.sampler.name == "euler":
        options["gamma"] = 0.0
    return options


def build_sampler(entry: Method, space: NoiseSpace, **overrides: Any) -> functools.partial[Tensor]:
    """The entry's sampler in k-diffusion shape ``fn(model, x, sigmas, extra_args, callback, disable)``.

    ``overrides`` replace knobs (e.g. ``gamma=0.5``, see :func:`sampler_options`).
    """
    options = sampler_options(entry, **overrides)
    if entry.sampler.name != "piflow":
        options["space"] = space
    return functools.partial(sampler_function(entry), **options)


# ------------------------------------------------------------------------------------------
# Which entry fits a model
# ------------------------------------------------------------------------------------------
def samples_alike(a: Method, b: Method) -> bool:
    """Whether two entries sample the same way: model kind, schedule, sampler with its knobs, CFG, FLUX guidance."""
    return (a.model_kind, a.schedule, a.sampler, a.cfg, a.flux_guidance) == (
        b.model_kind, b.schedule, b.sampler, b.cfg, b.flux_guidance)


def _listing(entries: list[Method]) -> str:
    return "; ".join(f"{m.key} ({m.steps_text()} steps)" for m in entries)


def check_architecture(entry: Method, architectures: tuple[str, ...]) -> None:
    """Refuse a model of a known architecture the entry was not published for, naming the entries that fit it.

    An empty ``architectures`` (a model the host cannot name, e.g. a custom or reference model) passes.
    """
    if architectures and not set(architectures) & set(entry.architectures):
        fitting = [m for m in METHODS.values() if set(architectures) & set(m.architectures)]
        raise ValueError(f"{entry.label} is for {' / '.join(entry.architectures)} models, but this model is "
                         f"{' / '.join(architectures)}; methods for it: {_listing(fitting) or 'none registered'}")


def detect_method(architectures: tuple[str, ...], model_kind: str, steps: int | None,
                  piflow_model: bool = False) -> Method:
    """The entry a model must be sampled with, where its architecture and kind leave one choice.

    Candidates: the entries for one of ``architectures`` and of ``model_kind``; pi-Flow entries exactly when the
    model carries a pi-Flow adapter (``piflow_model``); then those published for ``steps`` (``None``: any).
    Candidates that :func:`samples_alike` count as one (e.g. Wan 2.1 lightx2v and Wan2.2-Lightning on a Wan 14B
    model, which the two share). Otherwise a ``ValueError`` lists the choices.
    """
    named = " / ".join(architectures) or "an architecture the registry does not know"
    candidates = [m for m in methods_for(model_kind=model_kind)
                  if set(architectures) & set(m.architectures) and (m.family == PIFLOW_FAMILY) == piflow_model]
    if not candidates:
        kind_fits = [m for m in methods_for(model_kind=model_kind) if (m.family == PIFLOW_FAMILY) == piflow_model]
        raise ValueError(f"cannot tell the few-step family of this model ({model_kind}, {named}); choose one of: "
                         f"{_listing(kind_fits) or 'none registered'}")
    fitting = [m for m in candidates if steps is None or steps in m.steps]
    if not fitting:
        raise ValueError(f"no few-step family for {named} was published for {steps} steps; choose one of: "
                         f"{_listing(candidates)}")
    if all(samples_alike(fitting[0], m) for m in fitting[1:]):
        return fitting[0]
    raise ValueError(f"several few-step families fit {named} at {steps} steps and sample differently; choose one "
                     f"of: {_listing(fitting)}")
