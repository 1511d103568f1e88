"""In-graph LoRA distillation: dataset, trainer, save and loss-plot nodes.

The loop lives in ``distill_core.training``. This module turns ComfyUI objects into its inputs:
the MODEL becomes a denoiser ``(x, sigma, cond) -> x0`` on a private patcher clone (the MODEL
passed in is never changed for other nodes: the LoRA is attached by forward hooks for the run
and removed afterwards), CONDITIONING becomes the model's own conditioning tensors, images are
encoded with the graph's VAE. Progress, loss text, a live loss chart event, Cancel, checkpoints
and resume all go through the host. All nodes are V3 nodes (:mod:`.compat`); the live chart is a
websocket event of its own (``LOSS_EVENT``, drawn by ``web/stride_loss_chart.js``) addressed by the
node's hidden ``UNIQUE_ID``, which V3 provides.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..distill_core import methods
from ..distill_core.progress import CHECKPOINT, ENCODE, UNITS, Cancelled, PhaseCallback, Progress
from ..distill_core.safe_files import read_safetensors, write_safetensors
from ..distill_core.spaces import NoiseSpace, all_finite
from ..distill_core.training import dmd
from ..distill_core.training.config import OBJECTIVE_DEFAULTS, OBJECTIVES, DistillConfig, TrainingData
from ..distill_core.training.lora import (
    LoraTargetError,
    NoLoraLayersError,
    ensure_autograd_compatible,
    lora_state_dict,
    weights_fingerprint,
)
from ..distill_core.training.progress import TrainingProgress
from ..distill_core.training.teacher_cache import TeacherCache, tensor_fingerprint
from ..distill_core.training.trainer import STUDENT, DistillDivergedError, LoraTrainer, TrainResult, build_trainer
from .compat import (
    StrideError,
    apply_lora,
    combo,
    extra_conds,
    io,
    latent_spatial_downscale,
    lora_fit,
    model_file,
    model_sampling_of_patcher,
    node_unique_id,
    noise_space,
    sampling_kind,
    send_event,
    send_progress_text,
    ui,
    vae_spatial_downscale,
)
from .headless import export_bundle
from .lora_export import diffusers_layout, diffusers_lora
from .samplers import stride_ksampler

CATEGORY = "stride/training"
LOSS_EVENT = "stride.distill.loss"
LOSS_HISTORY = "stride_loss"  # the UI output the live chart rebuilds itself from (after the run, cached runs, reloads)
PHASE_EVENT = "stride.distill.phase"  # {node, phase, done, total, unit}: a long phase before or between steps
ENCODE_BATCH = 4  # images per VAE call while encoding training images (Cancel is checked between calls)
SAVE_FORMATS = ["ComfyUI", "diffusers"]
OBJECTIVE_METHODS = {"lcm": "lcm-lora", "tdd": "tdd-sdxl", "segmented": "tcd-lora"}
"""The registry entry (:mod:`distill_core.methods`) whose sampling each consistency objective's LoRA is made for
(segmented = Hyper-SD's stage 1, sampled with TCD); a dmd LoRA uses DMD2's sampler on its own trained timesteps
(:func:`recommended_sampling`)."""
SAMPLING_NODES = {"lcm": ("Stride LCM Sampler", "Stride LCM Scheduler"),
                  "tdd": ("Stride TDD Sampler", "Stride TDD Scheduler"),
                  "tcd": ("Stride TCD / Hyper-SD Sampler", "Stride LCM Scheduler")}
"""The sampler / scheduler nodes that build a consistency objective's sampling by hand (by registry sampler name)."""
DistillData = io.Custom("STRIDE_DISTILL_DATA")
Lora = io.Custom("STRIDE_LORA")
Loss = io.Custom("STRIDE_LOSS")
MAX_NAME_LENGTH = 120
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]*")
WINDOWS_DEVICE_NAMES = re.compile(r"(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(\..*)?", re.IGNORECASE)


def safe_file_name(name: str, input_name: str) -> str:
    """A bare file name (no folders, no '..', no control or reserved characters, at most ``MAX_NAME_LENGTH``
    characters before the suffix) with a .safetensors suffix; the whole name must match, surrounding spaces aside."""
    stem = name.strip(" ")
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if len(stem) > MAX_NAME_LENGTH:
        raise StrideError(f"{input_name}: the name is {len(stem)} characters long; use at most {MAX_NAME_LENGTH} "
                          "characters (without .safetensors)")
    if not SAFE_NAME.fullmatch(stem) or ".." in stem:
        raise StrideError(f"{input_name}: {name!r} is not a plain file name; use letters, digits, '.', '_', '-' or "
                          "spaces only (starting with a letter or digit, no line breaks), without folders ('/', "
                          "'\\\\') or '..'")
    if WINDOWS_DEVICE_NAMES.fullmatch(stem.strip()):
        raise StrideError(f"{input_name}: '{name}' is a reserved device name on Windows; choose another name")
    return stem + ".safetensors"


def checkpoint_path(name: str) -> Path:
    return Path(folder_paths.get_output_directory()) / "stride_checkpoints" / safe_file_name(name, "lora_name")


def phase_reporter(node_id: str | None) -> PhaseCallback:
    """A long phase on the node: its progress bar (whose hook also raises on Cancel) and a ``PHASE_EVENT`` for the
    live chart's panel. A checkpoint write only sends the event: it is what a Cancel keeps, so it must not stop.

    Each phase (and each restart of one from 0) gets a bar of its own: newer ComfyUI's ProgressBar drops an update
    below the last value it sent, so a bar carried over from a longer phase would hide the next one."""
    current: dict[str, Any] = {}

    def on_phase(phase: str, done: int, total: int) -> None:
        send_event(PHASE_EVENT, {"node": node_id, "phase": phase, "done": done, "total": total,
                                 "unit": UNITS.get(phase, "")})
        if phase == CHECKPOINT:
            return
        if current.get("phase") != phase or done < current["done"]:
            current.update(phase=phase, bar=comfy.utils.ProgressBar(total))
        current["done"] = done
        current["bar"].update_absolute(done, total)
    return on_phase


def cancellable(on_phase: PhaseCallback) -> Progress:
    """Progress of a phase the user's Cancel stops (within one unit: a model call, a VAE call, a file chunk)."""
    return Progress(on_phase, comfy.model_management.processing_interrupted)


def encode_images(vae: Any, images: torch.Tensor, node_id: str | None) -> torch.Tensor:
    """VAE-encode training images ``ENCODE_BATCH`` at a time, with progress and Cancel between calls."""
    phase = cancellable(phase_reporter(node_id)).phase(ENCODE, len(images))
    encoded = []
    try:
        for start in range(0, len(images), ENCODE_BATCH):
            phase.check()
            encoded.append(vae.encode(images[start:start + ENCODE_BATCH, :, :, :3]))
            phase.advance(len(encoded[-1]))
    except Cancelled:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
    return torch.cat(encoded)


class StrideDistillDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        prompt = "A prompt the distilled model should handle (more prompts = more general LoRA)."
        pixels = "Data-free training resolution in pixels (ignored with images/latents)."
        return io.Schema(
            node_id="StrideDistillDataset", display_name="Stride Distillation Data", category=CATEGORY,
            description=("Prompts (and optionally images) for LoRA distillation. Without images the run is data-free: "
                         "training latents come from the teacher's own sampling trajectories. With images they are "
                         "encoded by the VAE."),
            inputs=[
                io.Conditioning.Input("prompt_1", tooltip=prompt),
                io.Conditioning.Input("empty_prompt", tooltip="The empty/negative prompt: the teacher's unconditional "
                                                              "branch for guidance (encode an empty string)."),
                io.Conditioning.Input("prompt_2", optional=True, tooltip=prompt),
                io.Conditioning.Input("prompt_3", optional=True, tooltip=prompt),
                io.Conditioning.Input("prompt_4", optional=True, tooltip=prompt),
                io.Image.Input("images", optional=True,
                               tooltip="Optional training images (size a multiple of the VAE's 8-pixel grid)."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE that encodes the images (required with images)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Optional already-encoded training latents (instead of images)."),
                io.Int.Input("width", optional=True, default=512, min=8, max=4096, step=8, tooltip=pixels),
                io.Int.Input("height", optional=True, default=512, min=8, max=4096, step=8, tooltip=pixels),
            ],
            outputs=[DistillData.Output(display_name="data", tooltip="Training data for Stride Distill LoRA.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, prompt_1: list, empty_prompt: list, prompt_2: list | None = None, prompt_3: list | None = None,
                prompt_4: list | None = None, images: torch.Tensor | None = None, vae: Any = None,
                latents: dict | None = None, width: int = 512, height: int = 512) -> io.NodeOutput:
        named = {"prompt_1": prompt_1, "prompt_2": prompt_2, "prompt_3": prompt_3, "prompt_4": prompt_4,
                 "empty_prompt": empty_prompt}
        for name, conditioning in named.items():
            if conditioning is None:
                continue
            if not conditioning or not torch.is_tensor(conditioning[0][0]):
                raise StrideError(f"{name}: empty or malformed conditioning; connect a text encoder output")
            if not all(all_finite(entry[0]) for entry in conditioning):
                raise StrideError(f"{name}: the conditioning contains NaN or inf values; check the text encoder output "
                                  f"connected to {name}")
        prompts = [p for p in (prompt_1, prompt_2, prompt_3, prompt_4) if p is not None]
        samples = None
        if images is not None:
            if vae is None:
                raise StrideError("vae: images were given but no VAE to encode them; connect the checkpoint's VAE")
            ratio = vae_spatial_downscale(vae)
            height, width = images.shape[1:3]
            if height % ratio or width % ratio:
                raise StrideError(f"images: size {width}x{height} is not a multiple of the VAE's {ratio}-pixel grid; "
                                  "resize or crop them (e.g. ImageScale) first")
            samples = encode_images(vae, images, node_unique_id(cls))
        elif latents is not None:
            samples = latents["samples"]
        if samples is not None and not torch.isfinite(samples).all():
            source = "images" if images is not None else "latents"
            raise StrideError(f"{source}: the training latents contain NaN or inf values; check the node that "
                              "produced them")
        return io.NodeOutput({"prompts": prompts, "empty": empty_prompt, "latents": samples, "pixels": (height, width)})


def model_conds(model: Any, conditioning: list, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The network keyword arguments (c_crossattn, y, ...) ComfyUI derives from one CONDITIONING."""
    tensor, options = conditioning[0][0], conditioning[0][1]
    return extra_conds(model, tensor, options.get("pooled_output"), latent_shape)


def _check_teacher(model: Any, objective: str) -> None:
    kind = sampling_kind(model_sampling_of_patcher(model))
    if objective == "dmd" and kind not in ("eps", "v", "flow"):
        raise StrideError(f"model: dmd distillation needs an EPS, V-prediction or flow teacher; this model predicts "
                          f"'{kind}'")
    if objective != "dmd" and kind not in ("eps", "v"):
        raise StrideError(f"model: LCM/TDD/segmented distillation needs an EPS or V-prediction teacher on a 1000-step "
                          f"discrete schedule (SD1.5, SDXL); this model predicts '{kind}': connect an EPS or "
                          "V-prediction model (the dmd objective also trains flow models)")


# ------------------------------------------------------------------------------------------
# The trainer node: prepare -> run -> report
# ------------------------------------------------------------------------------------------
@dataclass
class DistillRun:
    """A distillation run prepared from the node's inputs: the teacher clone, the trainer's data and settings,
    and where the run writes (checkpoint, optional headless bundle)."""

    student: Any  # a loaded clone of the MODEL; its network carries the LoRA during the run
    config: DistillConfig
    data: TrainingData
    space: NoiseSpace
    checkpoint: Path
    headless_folder: Path | None
    notes: list[str]  # what the run did differently from what was asked (stated in the report)
    cache: TeacherCache | None = None  # keeps the data-free pool across runs (cache_teacher)


@dataclass
class DistillOutcome:
    """What a run produced: the trainer's result, the LoRA weights, the loss per step and the headless bundle."""

    result: TrainResult
    state_dict: dict[str, torch.Tensor]
    losses: dict[str, list[float]]  # series -> value per step of the whole run (NaN: none that step)
    headless: dict | None
    fake_score: Path | None  # dmd with keep_fake_score: the kept fake score's file
    history: dict | None  # the loss history for the live chart (TrainingProgress.history); None if no step ran


def distill_config(objective: str, steps: int, learning_rate: float, rank: int, alpha: float, batch_size: int,
                   guidance_min: float, guidance_max: float, loss: str, gradient_checkpointing: bool, seed: int,
                   save_every: int, dmd_guidance: float = 1.75, ttur: int = 5,
                   generator_steps: int = 4, dmd_regression: float = 0.0) -> DistillConfig:
    """The trainer's settings from the node's inputs: guidance 0/0 is the objective's default range, alpha 0 is rank;
    the dmd inputs reach the config whatever the objective (their checks hold for every config)."""
    if guidance_min == 0 and guidance_max == 0:
        defaults = OBJECTIVE_DEFAULTS[objective]
        guidance_min, guidance_max = defaults["guidance_min"], defaults["guidance_max"]
    if guidance_min > guidance_max:
        raise StrideError(f"guidance_min ({guidance_min}) is above guidance_max ({guidance_max}); lower guidance_min "
                          "or raise guidance_max (0 and 0 = the objective's default range)")
    try:
        return DistillConfig(objective=objective, steps=steps, lr=learning_rate, rank=rank, alpha=alpha or None,
                             batch=batch_size, guidance_min=guidance_min, guidance_max=guidance_max, loss=loss,
                             seed=seed, gradient_checkpointing=gradient_checkpointing, save_every=save_every,
                             skip_small_layers=True, guidance_scale=dmd_guidance, ttur=ttur,
                             generator_steps=generator_steps, regression_weight=dmd_regression)
    except ValueError as exc:
        raise StrideError(f"settings: {exc}") from None


def prepare_run(model: Any, data: dict, config: DistillConfig, lora_name: str, export_headless: bool,
                cache_teacher: bool = False) -> DistillRun:
    """Check the teacher and the data against each other and derive the trainer's inputs on a loaded clone."""
    _check_teacher(model, config.objective)
    path = checkpoint_path(lora_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    student = model.clone()
    comfy.model_management.load_models_gpu([student], force_full_load=True)
    latent_format = student.model.latent_format
    latents = data["latents"]
    ratio = latent_spatial_downscale(latent_format)
    pixel_height, pixel_width = data["pixels"]
    latent_shape = ((latent_format.latent_channels, pixel_height // ratio, pixel_width // ratio) if latents is None
                    else tuple(latents.shape[1:]))
    notes = []
    if latents is None and (pixel_height % ratio or pixel_width % ratio):
        notes.append(f"data: width {pixel_width} x height {pixel_height} is not a multiple of the model's "
                     f"{ratio}-pixel latent grid; trained at {latent_shape[2] * ratio}x{latent_shape[1] * ratio}")
    if latents is not None and latent_shape[0] != latent_format.latent_channels:
        raise StrideError(f"data: the training latents have {latent_shape[0]} channels, this model's latents have "
                          f"{latent_format.latent_channels}; encode the images with this model's own VAE")
    if latents is not None:
        latents = latent_format.process_in(latents.to(comfy.model_management.get_torch_device(), torch.float32))
    conds = [model_conds(student, prompt, latent_shape) for prompt in data["prompts"]]
    uncond = model_conds(student, data["empty"], latent_shape)
    if any(c.keys() != uncond.keys() or any(c[k].shape != uncond[k].shape for k in c) for c in conds):
        raise StrideError("data: the prompts and the empty prompt have different conditioning shapes; encode them "
                          "with the same text encoder")
    try:
        training_data = TrainingData(conds=conds, uncond=uncond, latents=latents,
                                     latent_shape=None if latents is not None else latent_shape)
    except ValueError as exc:
        raise StrideError(f"data: {exc}; check the nodes connected to Stride Distillation Data") from None
    cache = None
    if cache_teacher and latents is not None:
        notes.append("cache_teacher: the run trains on the given latents; there is no teacher data pool to cache")
    if cache_teacher and latents is None:  # the weights as the graph runs them (a user's LoRAs merged in)
        fingerprint = tensor_fingerprint(student.model.diffusion_model.state_dict().items())
        cache = TeacherCache(path.parent.parent / "stride_cache", fingerprint)
    return DistillRun(student, config, training_data, noise_space(model_sampling_of_patcher(student)), path,
                      path.parent.parent / "stride_headless" / path.stem if export_headless else None, notes, cache)


def run_distillation(run: DistillRun, resume: bool, node_id: str | None,
                     keep_fake_score: bool = False) -> DistillOutcome:
    """Train the LoRA(s) on the run's clone (progress bar, loss events, Cancel, checkpoints); the LoRAs are
    detached again whatever happens, so the MODEL the graph passed in is never changed."""
    network = run.student.model.diffusion_model
    ensure_autograd_compatible(network)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return run.student.model.apply_model(x, sigma, **cond)

    try:  # like diffusers' LCM-LoRA, layers narrower than the rank (the 4-channel in/out convs) get no adapter
        trainer = build_trainer(denoiser, network, run.space, run.config, run.data)
    except NoLoraLayersError as exc:
        raise StrideError(f"model: {exc}; distil a network model (a UNet or DiT checkpoint): the analytic reference "
                          "teacher has no weights") from None
    except LoraTargetError as exc:
        raise StrideError(f"rank: {exc}") from None
    except ValueError as exc:
        raise StrideError(f"settings: {exc}") from None
    steps = run.config.steps
    bar = comfy.utils.ProgressBar(steps)  # the training steps' own bar (see phase_reporter)
    on_phase = phase_reporter(node_id)
    progress: TrainingProgress | None = None

    def on_step(step: int, losses: dict[str, float]) -> None:
        """Each loss series (dmd: generator and fake) into the progress text and the live chart's panels."""
        nonlocal progress
        if progress is None:  # a resumed run starts after its checkpoint's step
            progress = TrainingProgress(steps, first_step=step)
        progress.update(step, losses)
        bar.update_absolute(step, steps)
        event: dict[str, Any] = {"node": node_id, **progress.event()}
        if step == progress.first_step > 1:  # the first step after a resume: the chart gets the steps before it too
            event["history"] = [{name: values[k] for name, values in trainer.history.items()
                                 if math.isfinite(values[k])} for k in range(step - 1)]
        send_event(LOSS_EVENT, event)
        send_progress_text(progress.text(), node_id)

    headless, fake_score = None, None
    try:
        if run.headless_folder is not None:
            command = export_bundle(run.headless_folder, run.student, run.config, run.data, run.checkpoint.stem,
                                    cancellable(on_phase))
            headless = {"bundle": str(run.headless_folder), "command": command}
        result = _train(trainer, run, on_step, on_phase, resume)
        if keep_fake_score and dmd.FAKE in trainer.adapters:
            fake_score = run.checkpoint.with_name(f"{run.checkpoint.stem}_fake_score.safetensors")
            write_safetensors(fake_score, lora_state_dict(trainer.adapters[dmd.FAKE]),
                              dmd.fake_score_metadata(weights_fingerprint(network), run.config))
    except Cancelled:  # the export stopped before its files were moved into place: nothing was written
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
    finally:
        state = lora_state_dict(trainer.adapters[STUDENT])
        trainer.detach()
    if result.cancelled:
        comfy.model_management.throw_exception_if_processing_interrupted()
    return DistillOutcome(result, state, result.losses, headless, fake_score,
                          progress.history() if progress is not None else None)


def _train(trainer: LoraTrainer, run: DistillRun, on_step: Callable[[int, dict[str, float]], None],
           on_phase: PhaseCallback, resume: bool) -> TrainResult:
    """The trainer's loop on the run's clone, its refusals worded for the node's inputs; a Cancel in the data-free
    pool ends it with nothing written (the pool is not cached, no checkpoint is written)."""
    try:
        return trainer.train(on_step, comfy.model_management.processing_interrupted, str(run.checkpoint), resume,
                             on_phase, run.cache)
    except DistillDivergedError as exc:
        raise StrideError(str(exc)) from None
    except ValueError as exc:
        raise StrideError(f"resume: {exc}; set resume off or choose another lora_name") from None


def training_report(model: Any, run: DistillRun, outcome: DistillOutcome) -> io.NodeOutput:
    """The node's outputs: the MODEL with the new LoRA, the LoRA with its metadata, the losses and a JSON summary."""
    config = run.config
    trained = apply_lora(model, outcome.state_dict, 1.0)
    layout: dict[str, Any]
    try:  # the diffusers names of the LoRA's modules, for Stride Save LoRA's diffusers format
        modules, form = diffusers_layout(model.model)
        layout = {"modules": modules, "form": form}
    except StrideError as exc:
        layout = {"error": str(exc)}
    metadata = lora_metadata(model, config, outcome.result.steps_done, run.space)
    lora = {"state_dict": outcome.state_dict, "metadata": metadata, "diffusers": layout}
    final = {name: next((v for v in reversed(values) if math.isfinite(v)), None)
             for name, values in outcome.losses.items()}
    resumed = outcome.result.resume_note(config.steps)
    notes = [*run.notes, *([f"resume: {resumed}"] if resumed else [])]
    report = {"objective": config.objective, "steps": outcome.result.steps_done, "notes": notes, "final_loss": final,
              "checkpoint": str(run.checkpoint), "recommended_sampling": json.loads(metadata["stride.recommended"]),
              "settings": config.to_dict(), "headless": outcome.headless,
              "fake_score": str(outcome.fake_score) if outcome.fake_score else None,
              "teacher_cache": run.cache.last if run.cache is not None else None}
    history = {LOSS_HISTORY: [outcome.history]} if outcome.history is not None else None
    return io.NodeOutput(trained, lora, outcome.losses, json.dumps(report), ui=history)


def recommended_sampling(config: DistillConfig, space: NoiseSpace) -> dict[str, Any]:
    """How the LoRA is sampled, from the method registry: the consistency objectives' published methods; for dmd
    DMD2's sampler (predict x0, re-noise; unit-noise input when the first step is below the top timestep) on the
    run's own generator timesteps. ``nodes``: the nodes that build it (Stride Distilled Sampling builds every
    objective's from the LoRA alone)."""
    timesteps = None
    if config.objective == "dmd":
        trained = dmd.dmd_timesteps(config, space.num_timesteps)
        entry = methods.method("dmd2-sdxl-4step" if int(trained[0]) == space.num_timesteps - 1 else "dmd2-sdxl-1step")
        timesteps, steps = trained.tolist(), len(trained)
        nodes = ["Stride Distilled Sampling"]
    else:
        entry = methods.method(OBJECTIVE_METHODS[config.objective])
        steps = entry.default_steps
        nodes = ["Stride Distilled Sampling", *SAMPLING_NODES[entry.sampler.name]]
    return {"method": entry.key, "family": entry.family, "sampler": entry.sampler.name,
            "knobs": dict(entry.sampler.knobs), "steps": steps, "timesteps": timesteps, "cfg": entry.cfg,
            "nodes": nodes, "source": entry.sources[0].cite()}


class StrideDistillLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideDistillLoRA", display_name="Stride Distill LoRA", category=CATEGORY,
            description=("Distils the MODEL's many-step sampling into a LoRA for 1-8 step sampling (LCM, TDD or "
                         "segmented consistency objectives, or DMD2 distribution matching). The teacher is the same "
                         "network with the LoRA switched off; the MODEL passed in is not changed. While it trains, the "
                         "node shows the step, each loss (raw and smoothed) and the time left, as text and in a live "
                         "chart, and the long phases before the steps (the data-free teacher pool, the headless "
                         "export) with their own progress. Cancel stops a phase within one model call, writing "
                         "nothing, and the steps at the next step, keeping a checkpoint; resume continues it."),
            inputs=[
                io.Model.Input("model", tooltip="The teacher: a model that predicts noise or velocity (EPS/V, e.g. "
                                                "SD1.5, SDXL; dmd also flow models), with any LoRAs you want kept "
                                                "applied."),
                DistillData.Input("data", tooltip="Prompts / images from Stride Distillation Data."),
                combo("objective", OBJECTIVES, "lcm: LCM-LoRA (skipping-step DDIM teacher, w ~ U[3,15]); tdd: "
                                               "Target-Driven Distillation (4-8 step targets, 20% empty prompts, "
                                               "w 3.5, real CFG works); segmented: Hyper-SD stage-1 consistency "
                                               "within time segments; dmd: DMD2 distribution matching (a generator "
                                               "LoRA and a fake-score LoRA on the one network; 1-4 step students, "
                                               "EPS/V and flow models; see dmd_guidance, ttur, generator_steps)."),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5,
                               tooltip="AdamW learning rate (LCM-LoRA: 1e-4)."),
                io.Int.Input("rank", default=64, min=1, max=1024, tooltip="LoRA rank (LCM-LoRA: 64)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=4096.0, step=1.0,
                               tooltip="Scales the LoRA's effect (LoRA alpha); 0 = equal to rank (scale 1)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Samples per step."),
                io.Float.Input("guidance_min", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Lowest strength of the teacher's guidance during training; 0 and 0 = the "
                                       "objective's default (LCM 3-15, TDD 3.5). The paper's w: the teacher predicts "
                                       "x0_c + w (x0_c - x0_u), ComfyUI cfg = w + 1."),
                io.Float.Input("guidance_max", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Upper end of the guidance range (see guidance_min)."),
                combo("loss", ["huber", "l2"], "How errors are penalised: huber is gentle on outliers (pseudo-Huber, "
                                       "c = 0.001, LCM's default), l2 is the squared error."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Trade compute for memory."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of all training randomness (deterministic on CPU)."),
                io.Int.Input("save_every", default=100, min=0, max=100000,
                             tooltip="Write a resumable checkpoint every N steps (0 = only at the end/cancel)."),
                io.String.Input("lora_name", default="stride_distill", tooltip="Name of the run: its checkpoint is "
                                "output/stride_checkpoints/<name>.safetensors."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this run's checkpoint if one exists."),
                io.Boolean.Input("export_headless", optional=True, default=False,
                                 tooltip="Also save what it takes to run this distillation headless or on several GPUs "
                                         "with torchrun (the teacher's weights as the graph runs them, the training "
                                         "data, the settings) to output/stride_headless/<name>/; the report gives the "
                                         "command."),
                io.Boolean.Input("cache_teacher", optional=True, default=False,
                                 tooltip="Data-free runs: keep the teacher's data pool (dmd: its regression "
                                         "pairs) in output/stride_cache/ and "
                                         "reuse it when the same model, prompts and settings run again (the model's "
                                         "weights are hashed; a pool made by another model is not used). The report "
                                         "says hit, miss or refused."),
                io.Float.Input("dmd_guidance", optional=True, default=1.75, min=0.01, max=30.0, step=0.05,
                               tooltip="dmd: CFG scale of the real score (ComfyUI cfg; 1 = no guidance). DMD2 used "
                                       "1.75 for SD1.5 and 8 for SDXL; the student samples at CFG 1."),
                io.Int.Input("ttur", optional=True, default=5, min=1, max=100,
                             tooltip="dmd: fake-score updates per generator update (DMD2: 5 for SDXL, 10 for SD1.5)."),
                io.Int.Input("generator_steps", optional=True, default=4, min=1, max=50,
                             tooltip="dmd: sampling steps of the student; DMD2's timesteps 999 - k (1000 // steps) "
                                     "(4 -> 999, 749, 499, 249; 1 -> 999)."),
                io.Boolean.Input("keep_fake_score", optional=True, default=False,
                                 tooltip="dmd: also write the fake score's LoRA next to the checkpoint "
                                         "(output/stride_checkpoints/<name>_fake_score.safetensors)."),
                io.Float.Input("dmd_regression", optional=True, default=0.0, min=0.0, max=100.0, step=0.05,
                               tooltip="dmd: weight of the first DMD's paired regression (0 = off, as in DMD2; DMD "
                                       f"used 0.25). Before training, the teacher runs its ODE from "
                                       f"{DistillConfig.regression_pairs} noises (real-score CFG, {dmd.ODE_SUBSTEPS} "
                                       "DDIM steps per generator step); each generator update also pulls the "
                                       "student's output from those noises (and from their trajectories at its later "
                                       "steps) towards the teacher's results (latent MSE). On the demo model it "
                                       "made short runs beat the undistilled teacher (bench/RESULTS.md, dmd)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the trained LoRA applied (sample right "
                                                              "away)."),
                Lora.Output(display_name="lora", tooltip="The trained LoRA (connect Stride Save LoRA)."),
                Loss.Output(display_name="loss", tooltip="Loss per step of the whole run, resumed part included, per "
                                                         "series (dmd: generator and fake; connect Stride Loss Plot)."),
                io.String.Output(display_name="report",
                                 tooltip="A JSON summary: steps, notes (what differed from what was asked: a "
                                         "floored size, a resume with nothing left to train), final loss, "
                                         "checkpoint, recommended sampler settings, settings, the teacher cache's "
                                         "answer (cache_teacher), and (with export_headless) the bundle folder and "
                                         "the torchrun command that runs it headless."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # so that a cached run still sends its UI output (the loss history) to the chart
        )

    @classmethod
    def execute(cls, model: Any, data: dict, objective: str, steps: int, learning_rate: float, rank: int, alpha: float,
                batch_size: int, guidance_min: float, guidance_max: float, loss: str, gradient_checkpointing: bool,
                seed: int, save_every: int, lora_name: str, resume: bool, export_headless: bool = False,
                cache_teacher: bool = False, dmd_guidance: float = 1.75, ttur: int = 5, generator_steps: int = 4,
                keep_fake_score: bool = False, dmd_regression: float = 0.0) -> io.NodeOutput:
        config = distill_config(objective, steps, learning_rate, rank, alpha, batch_size, guidance_min, guidance_max,
                                loss, gradient_checkpointing, seed, save_every, dmd_guidance, ttur, generator_steps,
                                dmd_regression)
        run = prepare_run(model, data, config, lora_name, export_headless, cache_teacher)
        return training_report(model, run, run_distillation(run, resume, node_unique_id(cls), keep_fake_score))


def model_fingerprint(model: Any) -> str:
    """A short hash of the base network's weights, so a LoRA records what it was distilled from."""
    return weights_fingerprint(model.model.diffusion_model)


def lora_metadata(model: Any, config: DistillConfig, steps_done: int, space: NoiseSpace) -> dict[str, str]:
    recommended = recommended_sampling(config, space)
    return {
        "stride.format": "stride-distill-lora-1",
        "stride.base_fingerprint": model_fingerprint(model),
        "stride.objective": config.objective,
        "stride.family": recommended["family"],
        "stride.steps": str(steps_done),
        "stride.rank": str(config.rank),
        "stride.alpha": str(config.alpha),
        "stride.config": json.dumps(config.to_dict()),
        "stride.recommended": json.dumps(recommended),
    }


class StrideSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideSaveLoRA", display_name="Stride Save LoRA", category=CATEGORY,
            description=("Saves a trained distillation LoRA into models/loras as safetensors, written atomically; "
                         "never overwrites an existing file unless told to. ComfyUI format: the keys ComfyUI's "
                         "LoraLoader maps. diffusers format: keys diffusers' load_lora_weights converts (kohya "
                         "lora_unet_* for SD1.5/SDXL, peft lora_A/lora_B for FLUX.1), which ComfyUI loads too."),
            inputs=[
                Lora.Input("lora", tooltip="The LoRA from Stride Distill LoRA."),
                io.String.Input("file_name", default="stride_distill_lora",
                                tooltip="File name (no folders); .safetensors is added."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                combo("format", SAVE_FORMATS, "Which program the file is laid out for. ComfyUI: its own LoRA "
                                              "format (diffusion_model.* keys). diffusers: for sharing with "
                                              "diffusers users (StableDiffusionPipeline / FluxPipeline "
                                              "load_lora_weights); ComfyUI loads it as well.",
                      default="ComfyUI", optional=True),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The file name inside models/loras (for LoraLoader).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora: dict, file_name: str, overwrite: bool, format: str = "ComfyUI") -> io.NodeOutput:
        name = safe_file_name(file_name, "file_name")
        state_dict, metadata = lora["state_dict"], dict(lora["metadata"])
        if format == "diffusers":
            layout = lora.get("diffusers") or {"error": "format: this LoRA carries no diffusers names; train it again"}
            if "error" in layout:
                raise StrideError(layout["error"])
            state_dict = diffusers_lora(state_dict, layout["modules"], layout["form"])
            metadata["stride.key_format"] = f"diffusers-{layout['form']}"
        folder = Path(folder_paths.get_folder_paths("loras")[0])
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if target.exists() and not overwrite:
            raise StrideError(f"file_name: models/loras/{name} already exists; choose another name or turn on "
                              "overwrite")
        write_safetensors(target, state_dict, metadata)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved models/loras/{name}" + (" (diffusers keys)" if
                                                                                      format == "diffusers" else "")))


class StrideReloadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideReloadLoRA", display_name="Stride Reload Saved LoRA", category=CATEGORY,
            description=("Loads a LoRA file saved earlier in the same graph onto a MODEL with ComfyUI's own LoraLoader "
                         "(a combo box cannot list a file that does not exist yet when the graph is queued)."),
            inputs=[
                io.Model.Input("model", tooltip="The base model (the teacher the LoRA was distilled from)."),
                io.String.Input("lora_name", force_input=True,
                                tooltip="File name in models/loras (Stride Save LoRA's output)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="LoRA strength."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the LoRA file applied, as "
                                                              "LoraLoaderModelOnly would."),
                io.String.Output(display_name="report",
                                 tooltip="JSON: how many LoRA layers the model took, the ones it left out (another "
                                         "model's layers, other shapes), and whether the LoRA was distilled from "
                                         "this base model (Stride's fingerprint)."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, lora_name: str, strength: float) -> io.NodeOutput:
        if lora_name not in folder_paths.get_filename_list("loras"):
            raise StrideError(f"lora_name: models/loras/{lora_name} does not exist; save the LoRA first")
        try:  # ComfyUI's loader would unpickle .pt/.ckpt files; Stride loads safetensors only
            state_dict, metadata = read_safetensors(model_file("loras", lora_name, "lora_name"))
        except ValueError as exc:
            raise StrideError(f"lora_name: {exc}; use a .safetensors LoRA (Stride Save LoRA writes one)") from None
        report = lora_fit_report(model, lora_name, state_dict, metadata)
        return io.NodeOutput(apply_lora(model, state_dict, strength), json.dumps(report))


def lora_fit_report(model: Any, lora_name: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Refuse a LoRA none of whose layers this model takes (no LoRA weights, another model's layers, other shapes);
    otherwise report what was loaded, what was left out and whether Stride's base-model fingerprint matches."""
    fit = lora_fit(model, state_dict)
    if fit.layers == 0:
        raise StrideError(f"lora_name: '{lora_name}' holds no LoRA weights (no lora_up/lora_down or lora_A/lora_B "
                          "keys); choose a LoRA file")
    if fit.loaded == 0 and fit.misshaped:
        raise StrideError(f"lora_name: the layers of '{lora_name}' have other shapes than this model's weights (e.g. "
                          f"{fit.misshaped[0]}): it is a LoRA for a model of another size; load it onto the model it "
                          "was made for")
    if fit.loaded == 0:
        raise StrideError(f"lora_name: none of the {fit.layers} LoRA layers of '{lora_name}' matches a layer of this "
                          f"model (e.g. {fit.left_out[0]}): it is a LoRA for another model; load it onto the model "
                          "it was made for")
    notes = []
    if fit.loaded < fit.layers:
        notes.append(f"loaded {fit.loaded} of {fit.layers} LoRA layers; the others match no layer of this model or "
                     "have other shapes (see left_out, misshaped)")
    recorded = metadata.get("stride.base_fingerprint")
    if recorded is not None and recorded != model_fingerprint(model):
        notes.append(f"the LoRA was distilled from another base model (fingerprint {recorded}, this model's is "
                     f"{model_fingerprint(model)}); load it onto the model it was distilled from")
    return {"lora": lora_name, "layers": fit.layers, "loaded": fit.loaded, "left_out": fit.left_out[:10],
            "misshaped": fit.misshaped[:10], "notes": notes}


SERIES_COLOURS = [(30, 80, 200), (220, 120, 20), (40, 150, 60), (200, 40, 90)]


class StrideLossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideLossPlot", display_name="Stride Loss Plot", category=CATEGORY,
            description=("Draws the distillation loss per step (raw and smoothed, one colour per series: dmd has a "
                         "generator and a fake-score loss) as an image."),
            inputs=[
                Loss.Input("loss", tooltip="The loss output of Stride Distill LoRA."),
                io.Int.Input("width", default=640, min=160, max=2048, tooltip="Image width in pixels."),
                io.Int.Input("height", default=320, min=120, max=2048, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(display_name="plot", tooltip="The loss curves (log scale).")],
        )

    @classmethod
    def execute(cls, loss: dict[str, list[float]] | list[float], width: int, height: int) -> io.NodeOutput:
        from PIL import Image, ImageDraw

        if isinstance(loss, (list, tuple)):  # one unnamed series (the form before losses were named per series)
            loss = {"loss": list(loss)}

        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        margin = 40
        draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
        steps = max((len(values) for values in loss.values()), default=0)
        points = {name: [(i, math.log10(v)) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
                  for name, values in sorted(loss.items())}
        logs = [value for series in points.values() for _, value in series]
        if steps >= 2 and len(logs) >= 2:
            low, high = min(logs), max(logs)
            span = (high - low) or 1.0

            def point(i: int, value: float) -> tuple[float, float]:
                x = margin + (width - 10 - margin) * i / (steps - 1)
                y = 10 + (height - margin - 10) * (high - value) / span
                return x, y

            legend = []
            for index, (name, series) in enumerate(points.items()):
                if len(series) < 2:
                    continue
                colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
                window = max(1, len(series) // 20)
                windows = [[v for _, v in series[max(0, k - window + 1): k + 1]] for k in range(len(series))]
                smooth = [sum(values) / len(values) for values in windows]
                faint = tuple(int(c + (255 - c) * 0.65) for c in colour)
                draw.line([point(i, v) for i, v in series], fill=faint, width=1)
                draw.line([point(i, v) for (i, _), v in zip(series, smooth, strict=True)], fill=colour, width=2)
                legend.append((f"{name} {10 ** series[-1][1]:.4g}", colour))
            x = margin + 4
            for text, colour in legend:
                draw.text((x, 12), text, fill=colour)
                x += 8 * len(text) + 12
            draw.text((x, 12), f"(max {10 ** high:.3g}, min {10 ** low:.3g}, log scale)", fill="black")
        draw.text((margin, height - margin + 8), f"step 1 .. {steps}", fill="black")
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        array = pixels.float() / 255.0
        return io.NodeOutput(array.unsqueeze(0))


class StrideDistilledSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideDistilledSampling", display_name="Stride Distilled Sampling", category=CATEGORY,
            description=("The SAMPLER and SIGMAS a LoRA from Stride Distill LoRA is made for (its recommended "
                         "sampling, from the method registry; a dmd LoRA: DMD2's sampler on its own trained "
                         "timesteps). Connect them to SamplerCustomAdvanced (or a Stride Hybrid Guider run) with "
                         "CFG 1."),
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRA belongs to (base or base + LoRA: same schedule)."),
                Lora.Input("lora", tooltip="The LoRA from Stride Distill LoRA."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="The sampler with the method's knobs."),
                     io.Sigmas.Output(display_name="sigmas", tooltip="The trained timesteps as this model's sigmas.")],
        )

    @classmethod
    def execute(cls, model: Any, lora: dict) -> io.NodeOutput:
        recommended = json.loads(lora["metadata"]["stride.recommended"])
        entry = methods.method(recommended["method"])
        space = noise_space(model_sampling_of_patcher(model))
        try:
            if recommended["timesteps"] is not None:
                sigmas = space.sigmas_for_timesteps(dmd.check_generator_timesteps(recommended["timesteps"],
                                                                                  space.num_timesteps))
            else:
                sigmas = methods.method_sigmas(entry, space, recommended["steps"])
            function = methods.build_sampler(entry, space)
        except ValueError as exc:
            raise StrideError(f"model: {exc}. Connect the model this LoRA was distilled from (the MODEL given to "
                              "Stride Distill LoRA).") from None
        options = {name: value for name, value in function.keywords.items() if name != "space"}
        return io.NodeOutput(stride_ksampler(function.func, **options), sigmas.float())


NODES: list[type[io.ComfyNode]] = [StrideDistillDataset, StrideDistillLoRA, StrideSaveLoRA, StrideReloadLoRA,
                                   StrideLossPlot, StrideDistilledSampling]
