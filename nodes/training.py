"""In-graph LoRA distillation: dataset, trainer, save and loss-plot nodes.

The loop lives in ``distill_core.training``. This module turns ComfyUI objects into its inputs:
the MODEL becomes a denoiser ``(x, sigma, cond) -> x0`` on a private patcher clone (the MODEL
passed in is never changed for other nodes: the LoRA is attached by forward hooks for the run
and removed afterwards), CONDITIONING becomes the model's own conditioning tensors, images are
encoded with the graph's VAE. Progress, loss text, a live loss chart event, Cancel, checkpoints
and resume all go through the host.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..distill_core.safe_files import check_safetensors_file, write_safetensors
from ..distill_core.training.config import OBJECTIVE_DEFAULTS, OBJECTIVES, DistillConfig, TrainingData
from ..distill_core.training.lora import ensure_autograd_compatible, lora_state_dict
from ..distill_core.training.trainer import DistillDivergedError, DistillTrainer, attach_student_lora
from .compat import (
    StrideError,
    latent_spatial_downscale,
    model_sampling_of_patcher,
    noise_space,
    sampling_kind,
    send_event,
    vae_spatial_downscale,
)
from .headless import export_bundle

CATEGORY = "stride/training"
LOSS_EVENT = "stride.distill.loss"
RECOMMENDED_SAMPLING = {  # what each objective's LoRA is sampled with (the authors' settings)
    "lcm": {"sampler": "Stride LCM Sampler", "scheduler": "Stride LCM Scheduler", "steps": 4, "cfg": 1.0},
    "tdd": {"sampler": "Stride TDD Sampler", "scheduler": "Stride TDD Scheduler", "steps": 4, "cfg": 1.7, "eta": 0.2},
    "segmented": {"sampler": "Stride TCD / Hyper-SD Sampler", "scheduler": "Stride LCM Scheduler", "steps": 4,
                  "cfg": 1.0, "gamma": 0.3},
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")
WINDOWS_DEVICE_NAMES = re.compile(r"^(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(\..*)?$", re.IGNORECASE)


def safe_file_name(name: str, input_name: str) -> str:
    """A bare file name (no folders, no '..', no reserved characters) with a .safetensors suffix."""
    stem = name.strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not SAFE_NAME.match(stem) or ".." in stem:
        raise StrideError(f"{input_name}: '{name}' is not a plain file name; use letters, digits, '.', '_', '-' or "
                          "spaces only, without folders ('/', '\\\\') or '..'")
    if WINDOWS_DEVICE_NAMES.match(stem.strip()):
        raise StrideError(f"{input_name}: '{name}' is a reserved device name on Windows; choose another name")
    return stem + ".safetensors"


def checkpoint_path(name: str) -> Path:
    return Path(folder_paths.get_output_directory()) / "stride_checkpoints" / safe_file_name(name, "lora_name")


class StrideDistillDataset:
    DESCRIPTION = ("Prompts (and optionally images) for LoRA distillation. Without images the run is data-free: training "
                   "latents come from the teacher's own sampling trajectories. With images they are encoded by the VAE.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRIDE_DISTILL_DATA",)
    RETURN_NAMES = ("data",)
    OUTPUT_TOOLTIPS = ("Training data for Stride Distill LoRA.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        prompt = {"tooltip": "A prompt the distilled model should handle (more prompts = more general LoRA)."}
        return {
            "required": {
                "prompt_1": ("CONDITIONING", prompt),
                "empty_prompt": ("CONDITIONING", {"tooltip": "The empty/negative prompt: the teacher's unconditional branch "
                                                              "for guidance (encode an empty string)."}),
            },
            "optional": {
                "prompt_2": ("CONDITIONING", prompt),
                "prompt_3": ("CONDITIONING", prompt),
                "prompt_4": ("CONDITIONING", prompt),
                "images": ("IMAGE", {"tooltip": "Optional training images (size a multiple of the VAE's 8-pixel grid)."}),
                "vae": ("VAE", {"tooltip": "The VAE that encodes the images (required with images)."}),
                "latents": ("LATENT", {"tooltip": "Optional already-encoded training latents (instead of images)."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8,
                                  "tooltip": "Data-free training resolution in pixels (ignored with images/latents)."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8,
                                   "tooltip": "Data-free training resolution in pixels (ignored with images/latents)."}),
            },
        }

    def build(self, prompt_1, empty_prompt, prompt_2=None, prompt_3=None, prompt_4=None, images=None, vae=None,
              latents=None, width=512, height=512):
        prompts = [p for p in (prompt_1, prompt_2, prompt_3, prompt_4) if p is not None]
        for index, conditioning in enumerate([*prompts, empty_prompt]):
            if not conditioning or not torch.is_tensor(conditioning[0][0]):
                raise StrideError(f"prompt {index + 1}: empty or malformed conditioning; connect a text encoder output")
        samples = None
        if images is not None:
            if vae is None:
                raise StrideError("vae: images were given but no VAE to encode them; connect the checkpoint's VAE")
            ratio = vae_spatial_downscale(vae)
            height, width = images.shape[1:3]
            if height % ratio or width % ratio:
                raise StrideError(f"images: size {width}x{height} is not a multiple of the VAE's {ratio}-pixel grid; "
                                  "resize or crop them (e.g. ImageScale) first")
            samples = vae.encode(images[:, :, :, :3])
        elif latents is not None:
            samples = latents["samples"]
        if samples is not None and not torch.isfinite(samples).all():
            raise StrideError(f"{'images' if images is not None else 'latents'}: the training latents contain NaN or inf "
                              "values; check the node that produced them")
        return ({"prompts": prompts, "empty": empty_prompt, "latents": samples, "pixels": (height, width)},)


def _model_conds(model, conditioning, latent_shape: tuple[int, ...]) -> dict:
    """The network keyword arguments (c_crossattn, y, ...) ComfyUI derives from one CONDITIONING."""
    tensor, options = conditioning[0][0], conditioning[0][1]
    ratio = latent_spatial_downscale(model.model.latent_format)
    height, width = latent_shape[-2] * ratio, latent_shape[-1] * ratio
    conds = model.model.extra_conds(cross_attn=tensor, pooled_output=options.get("pooled_output"),
                                    width=width, height=height, device=torch.device("cpu"),
                                    noise=torch.zeros((1, *latent_shape)))
    return {name: value.cond for name, value in conds.items() if torch.is_tensor(getattr(value, "cond", None))}


def _check_teacher(model) -> None:
    kind = sampling_kind(model_sampling_of_patcher(model))
    if kind not in ("eps", "v"):
        raise StrideError(f"model: LCM/TDD/segmented distillation needs an EPS or V-prediction teacher on a 1000-step "
                          f"discrete schedule (SD1.5, SDXL); this model predicts '{kind}'")


class StrideDistillLoRA:
    DESCRIPTION = ("Distils the MODEL's many-step sampling into a LoRA for 2-8 step sampling (LCM, TDD or segmented "
                   "consistency objectives). The teacher is the same network with the LoRA switched off; the MODEL passed "
                   "in is not changed. Shows the loss in the progress bar and a live chart; Cancel stops at the next step "
                   "and keeps a checkpoint; resume continues it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRIDE_LORA", "STRIDE_LOSS", "STRING")
    RETURN_NAMES = ("model", "lora", "loss", "report")
    OUTPUT_TOOLTIPS = ("The MODEL with the trained LoRA applied (sample right away).",
                       "The trained LoRA (connect Stride Save LoRA).",
                       "Loss per step (connect Stride Loss Plot).",
                       "A JSON summary: steps, final loss, checkpoint, recommended sampler settings, settings, and "
                       "(with export_headless) the bundle folder and the torchrun command that runs it headless.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The teacher (an EPS/V model, with any LoRAs you want kept applied)."}),
            "data": ("STRIDE_DISTILL_DATA", {"tooltip": "Prompts / images from Stride Distillation Data."}),
            "objective": (list(OBJECTIVES), {"tooltip": "lcm: LCM-LoRA (skipping-step DDIM teacher, w ~ U[3,15]); tdd: "
                                                        "Target-Driven Distillation (4-8 step targets, 20% empty prompts, "
                                                        "w 3.5, real CFG works); segmented: Hyper-SD stage-1 consistency "
                                                        "within time segments."}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-1, "step": 1e-5,
                                        "tooltip": "AdamW learning rate (LCM-LoRA: 1e-4)."}),
            "rank": ("INT", {"default": 64, "min": 1, "max": 1024, "tooltip": "LoRA rank (LCM-LoRA: 64)."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 1.0,
                                "tooltip": "LoRA alpha; 0 = equal to rank (scale 1)."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Samples per step."}),
            "guidance_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                       "tooltip": "Teacher guidance w range (x0_c + w (x0_c - x0_u), ComfyUI cfg = w+1); "
                                                  "0/0 = the objective's default (LCM 3-15, TDD 3.5)."}),
            "guidance_max": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                       "tooltip": "Upper end of the guidance range (see guidance_min)."}),
            "loss": (["huber", "l2"], {"tooltip": "Pseudo-Huber (c = 0.001, LCM default) or L2."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Trade compute for memory."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of all training randomness (deterministic on CPU)."}),
            "save_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                   "tooltip": "Write a resumable checkpoint every N steps (0 = only at the end/cancel)."}),
            "lora_name": ("STRING", {"default": "stride_distill", "tooltip": "Name of the run: its checkpoint is "
                                     "output/stride_checkpoints/<name>.safetensors."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from this run's checkpoint if one exists."}),
        }, "optional": {
            "export_headless": ("BOOLEAN", {"default": False, "tooltip": "Also write output/stride_headless/<name>/ "
                                            "(teacher weights as the graph runs them, training data, config) to run the "
                                            "same distillation headless or on several GPUs with torchrun; the report "
                                            "gives the command."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, data, objective, steps, learning_rate, rank, alpha, batch_size, guidance_min, guidance_max,
              loss, gradient_checkpointing, seed, save_every, lora_name, resume, export_headless=False, unique_id=None):
        _check_teacher(model)
        defaults = OBJECTIVE_DEFAULTS[objective]
        if guidance_min == 0 and guidance_max == 0:
            guidance_min, guidance_max = defaults["guidance_min"], defaults["guidance_max"]
        if guidance_min > guidance_max:
            raise StrideError(f"guidance_min ({guidance_min}) is above guidance_max ({guidance_max}); lower guidance_min or "
                              "raise guidance_max (0 and 0 = the objective's default range)")
        try:
            config = DistillConfig(objective=objective, steps=steps, lr=learning_rate, rank=rank, alpha=alpha or None,
                                   batch=batch_size, guidance_min=guidance_min, guidance_max=guidance_max, loss=loss,
                                   seed=seed, gradient_checkpointing=gradient_checkpointing, save_every=save_every,
                                   skip_small_layers=True)
        except ValueError as exc:
            raise StrideError(f"settings: {exc}") from None
        path = checkpoint_path(lora_name)
        path.parent.mkdir(parents=True, exist_ok=True)

        student = model.clone()
        comfy.model_management.load_models_gpu([student], force_full_load=True)
        base = student.model
        network = base.diffusion_model
        device = comfy.model_management.get_torch_device()
        latent_format = base.latent_format
        latents = data["latents"]
        ratio = latent_spatial_downscale(latent_format)
        pixel_height, pixel_width = data["pixels"]
        latent_shape = ((latent_format.latent_channels, pixel_height // ratio, pixel_width // ratio) if latents is None
                        else tuple(latents.shape[1:]))
        if latents is not None and latent_shape[0] != latent_format.latent_channels:
            raise StrideError(f"data: the training latents have {latent_shape[0]} channels, this model's latents have "
                              f"{latent_format.latent_channels}; encode the images with this model's own VAE")
        if latents is not None:
            latents = latent_format.process_in(latents.to(device, torch.float32))
        conds = [_model_conds(student, prompt, latent_shape) for prompt in data["prompts"]]
        uncond = _model_conds(student, data["empty"], latent_shape)
        if any(c.keys() != uncond.keys() or any(c[k].shape != uncond[k].shape for k in c) for c in conds):
            raise StrideError("data: the prompts and the empty prompt have different conditioning shapes; encode them "
                              "with the same text encoder")
        ensure_autograd_compatible(network)
        try:  # like diffusers' LCM-LoRA, layers narrower than the rank (the 4-channel in/out convs) get no adapter
            loraset = attach_student_lora(network, config)
        except ValueError as exc:
            raise StrideError(f"rank: {exc} (rank {rank} may exceed the width of this model's layers; lower it)") from None

        def denoiser(x, sigma, cond):
            return base.apply_model(x, sigma, **cond)

        bar = comfy.utils.ProgressBar(steps)
        losses: list[float] = []

        def on_step(step: int, value: float) -> None:
            losses.append(value)
            bar.update_absolute(step, steps)
            send_event(LOSS_EVENT, {"node": unique_id, "step": step, "steps": steps, "loss": value})

        space = noise_space(model_sampling_of_patcher(student))
        training_data = TrainingData(conds=conds, uncond=uncond, latents=latents,
                                     latent_shape=None if latents is not None else latent_shape)
        headless = None
        if export_headless:
            folder = path.parent.parent / "stride_headless" / path.stem
            headless = {"bundle": str(folder), "command": export_bundle(folder, student, config, training_data, path.stem)}
        try:
            trainer = DistillTrainer(denoiser, loraset, space, config, training_data)
            result = trainer.train(on_step, comfy.model_management.processing_interrupted, str(path), resume)
        except DistillDivergedError as exc:
            raise StrideError(str(exc)) from None
        except StrideError:  # a clear message from the model (e.g. a wrong input shape): not a resume problem
            raise
        except ValueError as exc:
            raise StrideError(f"resume: {exc}; set resume off or choose another lora_name") from None
        finally:
            state = lora_state_dict(loraset)
            loraset.remove()
        if result.cancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
        metadata = lora_metadata(model, config, result.steps_done)
        trained, _ = comfy.sd.load_lora_for_models(model, None, state, 1.0, 0)
        report = {"objective": objective, "steps": result.steps_done, "final_loss": losses[-1] if losses else None,
                  "checkpoint": str(path), "recommended_sampling": RECOMMENDED_SAMPLING[objective],
                  "settings": config.to_dict(), "headless": headless}
        return (trained, {"state_dict": state, "metadata": metadata}, losses, json.dumps(report))


def model_fingerprint(model) -> str:
    """A short hash of the base network's weights, so a LoRA records what it was distilled from."""
    digest = torch.zeros((), dtype=torch.float64)
    for index, (_, tensor) in enumerate(sorted(model.model.diffusion_model.state_dict().items())):
        digest += (index + 1) * tensor.detach().double().sum()
    return f"{float(digest):.10e}"


def lora_metadata(model, config: DistillConfig, steps_done: int) -> dict[str, str]:
    recommended = RECOMMENDED_SAMPLING[config.objective]
    return {
        "stride.format": "stride-distill-lora-1",
        "stride.base_fingerprint": model_fingerprint(model),
        "stride.objective": config.objective,
        "stride.steps": str(steps_done),
        "stride.rank": str(config.rank),
        "stride.alpha": str(config.alpha),
        "stride.config": json.dumps(config.to_dict()),
        "stride.recommended": json.dumps(recommended),
    }


class StrideSaveLoRA:
    DESCRIPTION = ("Saves a trained distillation LoRA into models/loras as safetensors (keys any LoraLoader maps), written "
                   "atomically; never overwrites an existing file unless told to.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The file name inside models/loras (for LoraLoader).",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("STRIDE_LORA", {"tooltip": "The LoRA from Stride Distill LoRA."}),
            "file_name": ("STRING", {"default": "stride_distill_lora", "tooltip": "File name (no folders); "
                                                                                   ".safetensors is added."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }}

    def save(self, lora, file_name, overwrite):
        name = safe_file_name(file_name, "file_name")
        folder = Path(folder_paths.get_folder_paths("loras")[0])
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if target.exists() and not overwrite:
            raise StrideError(f"file_name: models/loras/{name} already exists; choose another name or turn on overwrite")
        write_safetensors(target, lora["state_dict"], lora["metadata"])
        return {"ui": {"text": [f"saved models/loras/{name}"]}, "result": (name,)}


class StrideReloadLoRA:
    DESCRIPTION = ("Loads a LoRA file saved earlier in the same graph onto a MODEL with ComfyUI's own LoraLoader "
                   "(a combo box cannot list a file that does not exist yet when the graph is queued).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA file applied, exactly as LoraLoaderModelOnly would.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (the teacher the LoRA was distilled from)."}),
            "lora_name": ("STRING", {"forceInput": True, "tooltip": "File name in models/loras (Stride Save LoRA's output)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "LoRA strength."}),
        }}

    def load(self, model, lora_name, strength):
        import nodes

        if lora_name not in folder_paths.get_filename_list("loras"):
            raise StrideError(f"lora_name: models/loras/{lora_name} does not exist; save the LoRA first")
        try:  # ComfyUI's loader would unpickle .pt/.ckpt files; Stride loads safetensors only
            check_safetensors_file(folder_paths.get_full_path_or_raise("loras", lora_name))
        except ValueError as exc:
            raise StrideError(f"lora_name: {exc}; use a .safetensors LoRA (Stride Save LoRA writes one)") from None
        return nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, strength)


class StrideLossPlot:
    DESCRIPTION = "Draws the distillation loss per step (raw and smoothed) as an image."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The loss curve (log scale).",)
    FUNCTION = "plot"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loss": ("STRIDE_LOSS", {"tooltip": "The loss output of Stride Distill LoRA."}),
            "width": ("INT", {"default": 640, "min": 160, "max": 2048, "tooltip": "Image width in pixels."}),
            "height": ("INT", {"default": 320, "min": 120, "max": 2048, "tooltip": "Image height in pixels."}),
        }}

    def plot(self, loss, width, height):
        from PIL import Image, ImageDraw

        values = [v for v in loss if math.isfinite(v) and v > 0]
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        margin = 40
        draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
        if len(values) >= 2:
            logs = [math.log10(v) for v in values]
            low, high = min(logs), max(logs)
            span = (high - low) or 1.0
            window = max(1, len(logs) // 20)
            smooth = [sum(logs[max(0, i - window + 1): i + 1]) / len(logs[max(0, i - window + 1): i + 1]) for i in range(len(logs))]

            def point(i: int, value: float) -> tuple[float, float]:
                x = margin + (width - 10 - margin) * i / (len(logs) - 1)
                y = 10 + (height - margin - 10) * (high - value) / span
                return x, y

            draw.line([point(i, v) for i, v in enumerate(logs)], fill=(170, 190, 230), width=1)
            draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
            draw.text((margin + 4, 12), f"loss {values[-1]:.4g} (max {10 ** high:.3g}, min {10 ** low:.3g}), log scale", fill="black")
        draw.text((margin, height - margin + 8), f"step 1 .. {len(loss)}", fill="black")
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3).float() / 255.0
        return (array.unsqueeze(0),)


NODE_CLASS_MAPPINGS = {
    "StrideDistillDataset": StrideDistillDataset,
    "StrideDistillLoRA": StrideDistillLoRA,
    "StrideSaveLoRA": StrideSaveLoRA,
    "StrideReloadLoRA": StrideReloadLoRA,
    "StrideLossPlot": StrideLossPlot,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StrideDistillDataset": "Stride Distillation Data",
    "StrideDistillLoRA": "Stride Distill LoRA",
    "StrideSaveLoRA": "Stride Save LoRA",
    "StrideReloadLoRA": "Stride Reload Saved LoRA",
    "StrideLossPlot": "Stride Loss Plot",
}
