"""Networks and ComfyUI MODELs the benchmarks run on, all built from ComfyUI's own classes.

* Stride's reference setup as the user gets it: the analytic teacher (``StrideReferenceModel``),
  the demo UNet (``StrideDemoModel``; random weights of the same architecture when the trained
  weights have not been built, which changes no timing) and class prompts.
* A zero-cost network (predicts zero noise) to isolate the time a sampler spends outside the model.
* Real architectures with random weights: SD1.5 and SDXL ``UNetModel`` configurations (the full
  ones from ComfyUI's model tables, or reduced/tiny variants that say so) and FLUX.1's ``Flux``.

ComfyUI modules are imported inside the functions: they exist only once the host has started.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from distill_core.reference import demo

from .context import BenchContext

SD15_ARCHITECTURE = {
    # ComfyUI's SD1.5 UNet (comfy/model_detection.py) minus what comfy.supported_models.SD15 states.
    "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "use_checkpoint": False, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_resblock": False,
}
SDXL_ARCHITECTURE = {
    # ComfyUI's SDXL UNet (comfy/model_detection.py) minus what comfy.supported_models.SDXL states.
    "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "use_checkpoint": False, "num_classes": "sequential", "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_resblock": False,
}
SDXL_POOLED_DIM = 1280
FLUX_DEV_ARCHITECTURE = {
    # FLUX.1-dev as ComfyUI's model detection reads it from the released weights.
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
FLUX_HEAD_DIM = 128
FLUX_TEXT_TOKENS = 256  # T5 tokens of a short prompt (FLUX.1-schnell's length; dev allows 512)


# ------------------------------------------------------------------------------------------
# Random weights
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def init_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place (ComfyUI builds networks with uninitialised weights):
    matrices and kernels ~ N(0, 1 / fan_in), biases 0, norm scales 1. Activations stay O(1)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, parameter in module.named_parameters():
        generator = generators.setdefault(parameter.device, torch.Generator(device=parameter.device).manual_seed(seed))
        if parameter.ndim >= 2:
            parameter.normal_(0.0, 1.0 / math.sqrt(parameter[0].numel()), generator=generator)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)
    return module


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# ------------------------------------------------------------------------------------------
# Stride's reference setup
# ------------------------------------------------------------------------------------------
DENOISER_FORM = "denoiser (ideal many-step teacher)"
FLOW_MAP_FORM = "flow map (ideal distilled student)"


def reference_model(ctx: BenchContext, form: str, flow_map_steps: int = 64) -> Any:
    """The analytic teacher (demo mixture, EPS) in the given form, as ``StrideReferenceModel`` builds it."""
    return ctx.node("StrideReferenceModel").execute("demo", "eps", form, flow_map_steps)[0]


def demo_unet_model(ctx: BenchContext) -> tuple[Any, bool]:
    """``(MODEL, trained)``: the demo UNet with its shipped weights, or the same architecture with
    random weights when they have not been built (timings do not depend on weight values)."""
    if demo.DEMO_WEIGHTS_PATH.is_file():
        return ctx.node("StrideDemoModel").execute()[0], True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    network = init_random_(UNetModel(**demo.DEMO_UNET_CONFIG, operations=comfy.ops.disable_weight_init)).eval()
    return ctx.stride_module("nodes.reference").wrap_as_model(network, "eps"), False


def class_prompt(ctx: BenchContext, prompt: str) -> list:
    """CONDITIONING of a demo class name (empty = unconditional), from ``StrideClassPrompt``."""
    return ctx.node("StrideClassPrompt").execute(prompt)[0]


class ZeroCostNetwork(torch.nn.Module):
    """Predicts zero noise: the cheapest network ComfyUI's EPS model can call (one allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(x)


def zero_cost_model(ctx: BenchContext) -> Any:
    return ctx.stride_module("nodes.reference").wrap_as_model(ZeroCostNetwork(), "eps")


# ------------------------------------------------------------------------------------------
# Real architectures with random weights
# ------------------------------------------------------------------------------------------
def _depth_lists(per_level: list[int], res_blocks: int) -> tuple[list[int], list[int]]:
    """``transformer_depth`` (one entry per input block) and ``transformer_depth_output`` (per output block)."""
    inputs = [depth for depth in per_level for _ in range(res_blocks)]
    outputs = [depth for depth in per_level for _ in range(res_blocks + 1)]
    return inputs, outputs


def unet_config(arch: str, reduced_depth: bool = False, model_channels: int | None = None,
                context_dim: int | None = None) -> dict:
    """A ComfyUI ``UNetModel`` configuration of SD1.5 (``"sd15"``) or SDXL (``"sdxl"``).

    The full configuration is ComfyUI's (its model tables merged with ``comfy.supported_models``'s
    ``unet_config`` and ``unet_extra_config``), so it also builds a ``UNetModel`` directly.
    ``reduced_depth`` keeps one res block per level and at most one transformer block per level
    and in the middle; ``model_channels`` / ``context_dim`` shrink the width (tiny test models).
    """
    import comfy.supported_models

    supported = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]
    architecture = SD15_ARCHITECTURE if arch == "sd15" else SDXL_ARCHITECTURE
    config = {**architecture, **supported.unet_config, **supported.unet_extra_config}
    if reduced_depth:
        per_level = [min(1, depth) for depth in config["transformer_depth"][::config["num_res_blocks"][0]]]
        config["num_res_blocks"] = [1] * len(config["channel_mult"])
        config["transformer_depth"], config["transformer_depth_output"] = _depth_lists(per_level, 1)
        config["transformer_depth_middle"] = 1
    if model_channels is not None:
        config["model_channels"] = model_channels
    if context_dim is not None:
        config["context_dim"] = context_dim
    return config


def describe_unet(arch: str, config: dict, network: torch.nn.Module) -> str:
    """E.g. ``SD1.5 UNet, full (860M params)`` or ``SD1.5 UNet, reduced: 1 res block/level, 160 ch (...)``."""
    name = {"sd15": "SD1.5", "sdxl": "SDXL"}[arch]
    full = unet_config(arch)
    changes = []
    if config["num_res_blocks"] != full["num_res_blocks"]:
        changes.append(f"{config['num_res_blocks'][0]} res block/level, transformer depth <= 1")
    if config["model_channels"] != full["model_channels"]:
        changes.append(f"{config['model_channels']} base channels (full: {full['model_channels']})")
    if config["context_dim"] != full["context_dim"]:
        changes.append(f"context {config['context_dim']}")
    size = ", ".join(changes) if changes else "full size"
    return f"{name} UNet, {size} ({parameter_count(network) / 1e6:.0f}M params, random weights)"


def unet_model(arch: str, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0,
               manual_cast: torch.dtype | None = None) -> Any:
    """A ComfyUI MODEL (ModelPatcher around ComfyUI's BaseModel / SDXL class) with random weights,
    loading onto ``device`` in ``dtype`` (cast layer by layer to ``manual_cast`` when given, as ComfyUI does for
    low-precision weights on a device that cannot compute in them)."""
    import comfy.model_patcher
    import comfy.supported_models

    supported = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]
    model_config = supported(config)
    model_config.set_inference_dtype(dtype, manual_cast)
    base = model_config.get_model({}, device=device)
    init_random_(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))


def unet_conditioning(arch: str, config: dict, seed: int = 0) -> list:
    """Random prompt CONDITIONING of the right shape (77 tokens; SDXL also a pooled vector)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 77, config["context_dim"], generator=generator)
    extras = {"pooled_output": torch.randn(1, SDXL_POOLED_DIM, generator=generator)} if arch == "sdxl" else {}
    return [[context, extras]]


def flux_network(depth: int, single_depth: int, hidden_size: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> tuple[torch.nn.Module, str]:
    """ComfyUI's ``Flux`` network (FLUX.1-dev layout) with random weights and its description.

    Width and depth may be reduced; the head dimension stays 128 (RoPE axes 16/56/56)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    if hidden_size % FLUX_HEAD_DIM:
        raise ValueError(f"Flux hidden size must be a multiple of {FLUX_HEAD_DIM}, got {hidden_size}")
    params = {**FLUX_DEV_ARCHITECTURE, "depth": depth, "depth_single_blocks": single_depth,
              "hidden_size": hidden_size, "num_heads": hidden_size // FLUX_HEAD_DIM}
    network = Flux(**params, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    init_random_(network, seed).eval()
    full = FLUX_DEV_ARCHITECTURE
    changes = []
    if (depth, single_depth) != (full["depth"], full["depth_single_blocks"]):
        changes.append(f"{depth} double + {single_depth} single blocks (full: {full['depth']} + "
                       f"{full['depth_single_blocks']})")
    if hidden_size != full["hidden_size"]:
        changes.append(f"hidden {hidden_size} (full: {full['hidden_size']})")
    size = "reduced: " + ", ".join(changes) if changes else "full size"
    return network, f"FLUX.1 Flux, {size} ({parameter_count(network) / 1e6:.0f}M params, random weights)"
