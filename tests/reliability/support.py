"""Helpers of the reliability suite: test-only fault nodes, graph builders, file snapshots.

The fault nodes exist only inside the test process (conftest.py registers them into the
in-process host for the session): they make inputs that ComfyUI's core nodes cannot make
without real weights (non-zero latents of any shape, NaN/inf latents, conditioning of any
width, a model whose output is NaN).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

REFERENCE_DENOISER = "denoiser (ideal many-step teacher)"
DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "demo" / "stride_demo_unet.safetensors"


# ------------------------------------------------------------------------------------------
# Test-only nodes
# ------------------------------------------------------------------------------------------
class FaultLatent:
    """A LATENT of any shape: seeded random values, or filled with NaN / inf."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"channels": ("INT", {"default": 4, "min": 1, "max": 64}),
                             "height": ("INT", {"default": 8, "min": 1, "max": 256}),
                             "width": ("INT", {"default": 8, "min": 1, "max": 256}),
                             "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "fill": (["random", "nan", "inf"],)}}

    def make(self, channels, height, width, batch, fill):
        shape = (batch, channels, height, width)
        if fill == "random":
            samples = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        else:
            samples = torch.full(shape, float(fill))
        return ({"samples": samples},)


class FaultConditioning:
    """A CONDITIONING whose context has any width and token count, or an empty list."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 768, "min": 1, "max": 4096}),
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "empty": ("BOOLEAN", {"default": False})}}

    def make(self, width, tokens, empty):
        if empty:
            return ([],)
        context = torch.zeros((1, tokens, width))
        context[:, :, 0] = 1.0
        return ([[context, {}]],)


class FaultModel:
    """A clone of a MODEL whose network output is replaced by NaN or inf (a broken weight file)."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "fill": (["nan", "inf"],)}}

    def make(self, model, fill):
        broken = model.clone()

        def unet(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            return torch.full_like(out, float(fill))

        broken.set_model_unet_function_wrapper(unet)
        return (broken,)


FAULT_NODES = {"ReliabilityFaultLatent": FaultLatent, "ReliabilityFaultConditioning": FaultConditioning,
               "ReliabilityFaultModel": FaultModel}


# ------------------------------------------------------------------------------------------
# Graph builders
# ------------------------------------------------------------------------------------------
def reference_model(prediction: str = "eps") -> dict:
    return {"class_type": "StrideReferenceModel", "inputs": {"variant": "demo", "prediction": prediction,
                                                              "form": REFERENCE_DENOISER, "flow_map_steps": 8}}


def class_prompt(text: str) -> dict:
    return {"class_type": "StrideClassPrompt", "inputs": {"prompt": text}}


def empty_latent(batch: int = 1, width: int = 64, height: int = 64) -> dict:
    return {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}}


def few_step(method: str = "lcm", seed: int = 0, steps: int = 2, model: str = "model", latent: str = "latent",
             positive: str = "pos", negative: str = "neg", **overrides) -> dict:
    inputs = {"model": [model, 0], "positive": [positive, 0], "negative": [negative, 0], "latent_image": [latent, 0],
              "method": method, "steps": steps, "cfg": 0.0, "gamma": 0.3, "eta": 0.2, "seed": seed, "denoise": 1.0}
    inputs.update(overrides)
    return {"class_type": "StrideFewStepSample", "inputs": inputs}


def sampling_graph(method: str = "lcm", seed: int = 0, prefix: str = "reliability", batch: int = 1,
                   prompt: str = "disc", steps: int = 2, **overrides) -> dict:
    """Few-step sampling of the analytic teacher, saved with SaveLatent (node id "save")."""
    return {
        "model": reference_model(),
        "pos": class_prompt(prompt),
        "neg": class_prompt(""),
        "latent": empty_latent(batch),
        "run": few_step(method, seed, steps, **overrides),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": prefix}},
    }


def hybrid_graph(seed: int = 0, prefix: str = "reliability", batch: int = 1, **overrides) -> dict:
    """Stride Hybrid Sample: the analytic teacher's denoiser (base, CFG 2, Euler) hands over after one
    step to its exact flow map (distilled, Stride LCM sampler) on the 4-step LCM grid."""
    graph = sampling_graph(seed=seed, prefix=prefix, batch=batch)
    graph["distilled"] = {"class_type": "StrideReferenceModel", "inputs": {
        "variant": "demo", "prediction": "eps", "form": "flow map (ideal distilled student)", "flow_map_steps": 8}}
    inputs = {"base_model": ["model", 0], "base_positive": ["pos", 0], "base_negative": ["neg", 0], "base_cfg": 2.0,
              "base_sampler": "euler", "distilled_model": ["distilled", 0], "distilled_positive": ["pos", 0],
              "distilled_negative": ["neg", 0], "distilled_cfg": 1.0, "distilled_sampler": "lcm",
              "schedule": "lcm / tcd grid", "steps": 4, "handover_steps": 1, "seed": seed, "latent_image": ["latent", 0]}
    inputs.update(overrides)
    graph["run"] = {"class_type": "StrideHybridSample", "inputs": inputs}
    return graph


def training_graph(name: str, steps: int = 1, save_every: int = 1, **overrides) -> dict:
    """A tiny distillation of the demo UNet (rank 4, batch 2, 8x8 latents; data-free unless latents are added)."""
    train_inputs = {
        "model": ["model", 0], "data": ["data", 0], "objective": "lcm", "steps": steps, "learning_rate": 1e-3,
        "rank": 4, "alpha": 0.0, "batch_size": 2, "guidance_min": 0.0, "guidance_max": 0.0, "loss": "huber",
        "gradient_checkpointing": False, "seed": 3, "save_every": save_every, "lora_name": name, "resume": True,
    }
    train_inputs.update(overrides)
    return {
        "model": {"class_type": "StrideDemoModel", "inputs": {}},
        "disc": class_prompt("disc"),
        "ring": class_prompt("ring"),
        "empty": class_prompt(""),
        "data": {"class_type": "StrideDistillDataset", "inputs": {
            "prompt_1": ["disc", 0], "prompt_2": ["ring", 0], "empty_prompt": ["empty", 0], "width": 64, "height": 64}},
        "train": {"class_type": "StrideDistillLoRA", "inputs": train_inputs},
        "report": {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}},
    }


def with_sampled_latents(graph: dict, count: int = 8) -> dict:
    """Train on ``count`` latents sampled from the analytic teacher in the same graph (instead of the
    data-free pool, which costs many teacher trajectories per run)."""
    graph.update({
        "lat_teacher": reference_model(),
        "lat_latent": empty_latent(count),
        "lat_run": few_step("lcm", seed=0, steps=2, model="lat_teacher", latent="lat_latent", positive="disc",
                            negative="empty"),
    })
    graph["data"]["inputs"]["latents"] = ["lat_run", 0]
    return graph


# ------------------------------------------------------------------------------------------
# File snapshots
# ------------------------------------------------------------------------------------------
def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file below ``root`` (links not followed;
    top-level entries named in ``skip`` left out)."""
    root = Path(root)
    files: dict[str, tuple[int, int]] = {}
    for folder, dirs, names in os.walk(root):
        relative = os.path.relpath(folder, root)
        if relative == ".":
            dirs[:] = [d for d in dirs if d not in skip]
            names = [n for n in names if n not in skip]
        for name in names:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            files[os.path.normpath(os.path.join(relative, name))] = (stat.st_size, stat.st_mtime_ns)
    return files


def changed_files(before: dict, after: dict) -> list[str]:
    return sorted(path for path in after.keys() | before.keys() if before.get(path) != after.get(path))
