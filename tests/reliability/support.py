"""Helpers of the reliability suite: test-only fault nodes, graph builders, file snapshots.

The fault nodes exist only inside the test process (conftest.py registers them into the
in-process host for the session): they make inputs that ComfyUI's core nodes cannot make
without real weights (non-zero latents of any shape, NaN/inf latents, conditioning of any
width, a model whose output is NaN).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch

REFERENCE_DENOISER = "denoiser (ideal many-step teacher)"
# Text of library errors that must never reach a user (Stride's messages translate them).
RAW_MESSAGES = ("Traceback", 'File "', "mat1 and mat2", "Given groups", "size of tensor", "shapes cannot",
                "Error while deserializing", "Weights only load failed", "KeyError", "NoneType", "SafetensorError",
                "Expected more than 1 value per channel", "RecursionError", "has no attribute", "not subscriptable",
                "unsupported operand", "invalid literal for", "Errno", "cannot convert float NaN", "out of bounds",
                "index out of range", "object is not")
ROOT = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = ROOT / "assets" / "demo" / "stride_demo_unet.safetensors"


# ------------------------------------------------------------------------------------------
# Test-only nodes
# ------------------------------------------------------------------------------------------
class FaultLatent:
    """A LATENT of any shape: seeded random values, zeros, huge values, or filled with NaN / inf."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"
    FILLS: ClassVar[dict[str, float]] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "zeros": 0.0,
                                         "huge": 1e30}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"channels": ("INT", {"default": 4, "min": 1, "max": 64}),
                             "height": ("INT", {"default": 8, "min": 1, "max": 256}),
                             "width": ("INT", {"default": 8, "min": 1, "max": 256}),
                             "batch": ("INT", {"default": 1, "min": 0, "max": 64}),
                             "fill": (["random", *cls.FILLS],)},
                "optional": {"frames": ("INT", {"default": 0, "min": 0, "max": 16,
                                                "tooltip": "0: an image latent (4-D); n: a video latent of n frames"})}}

    def make(self, channels, height, width, batch, fill, frames=0):
        shape = (batch, channels, *((frames,) if frames else ()), height, width)
        if fill == "random":
            samples = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        else:
            samples = torch.full(shape, self.FILLS[fill])
        return ({"samples": samples},)


class FaultImage:
    """An IMAGE batch (b, h, w, 3): seeded random values in [0, 1], a constant, or NaN / inf."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"
    FILLS: ClassVar[dict[str, float]] = {"nan": float("nan"), "inf": float("inf"), "zeros": 0.0, "huge": 1e30}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"height": ("INT", {"default": 64, "min": 1, "max": 1024}),
                             "width": ("INT", {"default": 64, "min": 1, "max": 1024}),
                             "batch": ("INT", {"default": 4, "min": 0, "max": 64}),
                             "fill": (["random", *cls.FILLS],)}}

    def make(self, height, width, batch, fill):
        shape = (batch, height, width, 3)
        if fill == "random":
            return (torch.rand(shape, generator=torch.Generator().manual_seed(0)),)
        return (torch.full(shape, self.FILLS[fill]),)


class FaultLoss:
    """A loss history (what Stride Distill LoRA hands to Stride Loss Plot) with any values."""

    RETURN_TYPES = ("STRIDE_LOSS",)
    FUNCTION = "make"
    CATEGORY = "testing"
    VALUES: ClassVar[dict[str, list[float]]] = {
        "decreasing": [1.0, 0.5, 0.25, 0.125], "empty": [], "one": [0.5], "nan": [1.0, float("nan"), 0.5],
        "inf": [float("inf"), 1.0], "negative": [-1.0, -2.0], "zeros": [0.0, 0.0], "huge": [1e308, 1e-308],
        "long": [1.0 / (1 + i) for i in range(100000)]}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": (list(cls.VALUES),)}}

    def make(self, values):
        return (list(self.VALUES[values]),)


class FaultSigmas:
    """SIGMAS that no scheduler makes: empty, one value, increasing, negative, NaN, huge."""

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "make"
    CATEGORY = "testing"
    VALUES: ClassVar[dict[str, list[float]]] = {
        "empty": [], "one": [14.6], "increasing": [0.0, 1.0, 14.6], "negative": [14.6, -1.0, 0.0],
        "nan": [14.6, float("nan"), 0.0], "huge": [1e30, 1.0, 0.0], "flat": [1.0, 1.0, 1.0]}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": (list(cls.VALUES),)}}

    def make(self, values):
        return (torch.tensor(self.VALUES[values], dtype=torch.float32),)


class FaultConditioning:
    """A CONDITIONING whose context has any width and token count (optionally NaN), or an empty list."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 768, "min": 1, "max": 4096}),
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "empty": ("BOOLEAN", {"default": False})},
                "optional": {"nan": ("BOOLEAN", {"default": False})}}

    def make(self, width, tokens, empty, nan=False):
        if empty:
            return ([],)
        context = torch.full((1, tokens, width), float("nan")) if nan else torch.zeros((1, tokens, width))
        context[:, :, 0] = float("nan") if nan else 1.0
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


class FuzzSink:
    """An output node that takes anything and reports (as its UI output) where it holds NaN or inf: the
    fuzzer's check that a run which "succeeded" made finite outputs."""

    RETURN_TYPES = ()
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        from comfy.comfy_types.node_typing import IO  # ANY: a type string equal to every type

        return {"required": {"value": (IO.ANY, {})}}

    def inspect(self, value):
        return {"ui": {"nonfinite": non_finite_parts(value)}}


def non_finite_parts(value, path: str = "value", depth: int = 0) -> list[str]:
    """Paths of the NaN / inf parts of a node output (tensors, numbers, JSON text, dicts, lists, tuples)."""
    import json
    import math

    if depth > 6:
        return []
    if torch.is_tensor(value):
        if value.is_floating_point() or value.is_complex():
            return [] if bool(torch.isfinite(value).all()) else [f"{path} {tuple(value.shape)}"]
        return []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{path} = {value}"]
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return []
        return non_finite_parts(parsed, f"{path} (JSON)", depth + 1)
    if isinstance(value, dict):
        return [part for key, item in value.items() for part in non_finite_parts(item, f"{path}[{key!r}]", depth + 1)]
    if isinstance(value, (list, tuple)):
        if len(value) > 1000 and all(isinstance(item, float) for item in value):
            return [] if all(math.isfinite(item) for item in value) else [f"{path} (list of {len(value)} floats)"]
        return [part for index, item in enumerate(value[:1000])
                for part in non_finite_parts(item, f"{path}[{index}]", depth + 1)]
    return []


FAULT_NODES = {"ReliabilityFaultLatent": FaultLatent, "ReliabilityFaultConditioning": FaultConditioning,
               "ReliabilityFaultModel": FaultModel, "ReliabilityFaultImage": FaultImage,
               "ReliabilityFaultLoss": FaultLoss, "ReliabilityFaultSigmas": FaultSigmas,
               "ReliabilityFuzzSink": FuzzSink}


@contextlib.contextmanager
def tiny_flux_installed(host, loras: Path) -> Iterator[None]:
    """A tiny FLUX.1 MODEL node (ReliabilityTinyFlux: MODEL and its CONDITIONING) and adapter files in ``loras``
    (reliability_tiny_gm fits it, reliability_wide_gm is for a wider model, reliability_plain_lora has no policy
    head), built by tests/host/test_piflow_loader.py (one definition of them)."""
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("piflow_loader_tests", ROOT / "tests/host/test_piflow_loader.py")
    piflow_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(piflow_tests)
    model, conditioning = piflow_tests.tiny_model("FLUX.1")

    class ReliabilityTinyFlux:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL", "CONDITIONING")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return model, conditioning

    for ours, theirs in (("reliability_tiny_gm", piflow_tests.adapter_file("FLUX.1", piflow_tests.GM)),
                         ("reliability_wide_gm", piflow_tests.WIDE_ADAPTER),
                         ("reliability_plain_lora", piflow_tests.PLAIN_LORA)):
        state, metadata = piflow_tests.ADAPTERS[theirs]
        save_file({k: v.contiguous() for k, v in state.items()}, str(loras / f"{ours}.safetensors"), metadata)
    host.folder_paths.filename_list_cache.clear()
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    nodes["ReliabilityTinyFlux"] = ReliabilityTinyFlux
    try:
        yield
    finally:
        del nodes["ReliabilityTinyFlux"]


# ------------------------------------------------------------------------------------------
# Graph builders
# ------------------------------------------------------------------------------------------
def fault_latent(channels: int = 4, height: int = 8, width: int = 8, batch: int = 1, fill: str = "random",
                 frames: int = 0) -> dict:
    return {"class_type": "ReliabilityFaultLatent", "inputs": {
        "channels": channels, "height": height, "width": width, "batch": batch, "fill": fill,
        **({"frames": frames} if frames else {})}}


def fault_conditioning(width: int = 768, tokens: int = 77, empty: bool = False, nan: bool = False) -> dict:
    return {"class_type": "ReliabilityFaultConditioning",
            "inputs": {"width": width, "tokens": tokens, "empty": empty, **({"nan": True} if nan else {})}}


def fault_image(height: int = 64, width: int = 64, batch: int = 4, fill: str = "random") -> dict:
    return {"class_type": "ReliabilityFaultImage",
            "inputs": {"height": height, "width": width, "batch": batch, "fill": fill}}


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
              "schedule": "lcm / tcd grid", "steps": 4, "handover_steps": 1, "seed": seed,
              "latent_image": ["latent", 0]}
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


def repo_outputs() -> set[str]:
    """Files in the repository that look like something a node writes (outputs, LoRAs, temp files)."""
    found = set()
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", ".cache", "__pycache__", "node_modules")]
        found.update(os.path.join(folder, name) for name in names
                     if name.endswith((".safetensors", ".latent", ".tmp", ".pt", ".ckpt", ".png"))
                     or (("reliability" in name or name.startswith("fuzz")) and not name.endswith(".py")))
    return found


def validation_message(error: dict, node_errors: dict) -> str:
    """The text ComfyUI's frontend shows for a rejected prompt: the error and each input's details."""
    parts = [error.get("message", "")]
    for node in node_errors.values():
        for item in node.get("errors", []):
            parts.append(f"{item.get('message', '')}: {item.get('details', '')}")
    return " | ".join(part for part in parts if part)
