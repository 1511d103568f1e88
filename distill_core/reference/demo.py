"""The demo model: a small ComfyUI ``UNetModel`` trained on the demo Gaussian mixture.

The network is an SD1.5-style EPS model (``x = x0 + sigma * eps``, scaled-linear 1000-step
schedule) on ``4 x 8 x 8`` latents, conditioned by cross-attention on a one-token "prompt":
a one-hot vector over the demo classes plus one last slot meaning "unconditional / empty
prompt", so classifier-free guidance works. ``scripts/build_demo_model.py`` trains it on the
exact denoiser of :func:`demo_mixture` and ships the weights at
:data:`DEMO_WEIGHTS_PATH`.

This module holds the host-independent facts: the ``UNetModel`` keyword arguments, the
context encoding, the noise space, the weight file, and the EPS wrapper that turns the raw
network into a denoiser exactly as ComfyUI's EPS ``model_sampling`` does. Nothing here
imports ComfyUI; the caller builds the network from :data:`DEMO_UNET_CONFIG`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..safe_files import read_safetensors
from ..spaces import NoiseSpace, require_finite, scaled_linear_alphas_cumprod
from .mixture import FactorizedMixture, GaussianMixture

# ComfyUI's SD1.5 latent -> RGB preview factors (rows: latent channels; columns: R, G, B).
# The preview is ``rgb = (latent @ factors + 1) / 2`` clamped to [0, 1].
SD15_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_to_rgb(latents: Tensor) -> Tensor:
    """Decode SD1.5-format latents ``(n, 4, H, W)`` to ``(n, H, W, 3)`` RGB in [0, 1] with ComfyUI's
    latent preview factors (a linear map, then ``(value + 1) / 2`` clamped). NaN/inf latents are refused
    (``ValueError``): clamping would show them as a plausible black or white picture."""
    require_finite(latents, "the latents")
    factors = torch.tensor(SD15_LATENT_RGB_FACTORS, dtype=torch.float64, device=latents.device)
    rgb = latents.to(torch.float64).movedim(1, -1) @ factors
    return ((rgb + 1) / 2).clamp(0, 1).to(latents.dtype if latents.is_floating_point() else torch.float32)


def rgb_to_latent(rgb: Tensor) -> Tensor:
    """The minimum-norm SD1.5 latent ``(n, 4, H, W)`` whose preview (before clamping) is ``rgb`` ``(n, H, W, 3)``."""
    factors = torch.tensor(SD15_LATENT_RGB_FACTORS, dtype=torch.float64, device=rgb.device)
    preview_values = rgb.to(torch.float64) * 2 - 1
    return (preview_values @ torch.linalg.pinv(factors)).movedim(-1, 1)


DEMO_CLASS_NAMES = ("disc", "square", "cross", "ring")
DEMO_COMPONENTS = (  # (shape, colour RGB) per component; classes are shapes, two colours each
    ("disc", (0.95, 0.15, 0.1)),
    ("disc", (0.1, 0.85, 0.9)),
    ("square", (0.15, 0.25, 0.95)),
    ("square", (0.95, 0.6, 0.1)),
    ("cross", (0.15, 0.9, 0.2)),
    ("cross", (0.9, 0.15, 0.9)),
    ("ring", (0.95, 0.9, 0.1)),
    ("ring", (0.95, 0.95, 0.95)),
)


def _shape_coverage(shape: str, size: int, supersample: int = 4) -> Tensor:
    """Anti-aliased coverage ``(size, size)`` in [0, 1] of a centred shape on a ``size`` x ``size`` grid."""
    fine = (torch.arange(size * supersample, dtype=torch.float64) + 0.5) / supersample - size / 2
    y, x = torch.meshgrid(fine, fine, indexing="ij")
    radius = (x**2 + y**2).sqrt()
    scale = size / 8
    if shape == "disc":
        inside = radius <= 2.9 * scale
    elif shape == "square":
        inside = (x.abs() <= 2.6 * scale) & (y.abs() <= 2.6 * scale)
    elif shape == "cross":
        inside = (((x.abs() <= 1.0 * scale) | (y.abs() <= 1.0 * scale))
                  & (x.abs() <= 3.6 * scale) & (y.abs() <= 3.6 * scale))
    elif shape == "ring":
        inside = (radius >= 1.9 * scale) & (radius <= 3.5 * scale)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")
    return inside.to(torch.float64).reshape(size, supersample, size, supersample).mean(dim=(1, 3))


def demo_mixture(size: int = 8, std: float = 0.25, latent_rms: float = 1.0) -> GaussianMixture:
    """The demo teacher: 8 components in 4 classes (disc, square, cross, ring; two colours each) on
    ``4 x size x size`` SD1.5-format latents, equal weights, isotropic ``std``.

    Each mean is the minimum-norm latent whose ComfyUI preview shows the coloured shape on a
    mid-grey background (latent 0), scaled by one common factor so the means' root-mean-square
    element is ``latent_rms`` (SD latents after their scale factor have roughly unit variance).
    """
    grey = 0.5
    images = []
    for shape, colour in DEMO_COMPONENTS:
        coverage = _shape_coverage(shape, size).unsqueeze(-1)
        images.append(grey + coverage * (torch.tensor(colour, dtype=torch.float64) - grey))
    means = rgb_to_latent(torch.stack(images))
    means = means * (latent_rms / means.pow(2).mean().sqrt())
    classes = torch.tensor([DEMO_CLASS_NAMES.index(shape) for shape, _ in DEMO_COMPONENTS])
    return GaussianMixture(means, std, classes=classes)


PIFLOW_DEMO_GLYPH = (  # the letter pi on the 8 x 8 latent grid ('#': the letter)
    "........",
    ".######.",
    "..#..#..",
    "..#..#..",
    "..#..#..",
    "..#..#.#",
    ".##...##",
    "........",
)
PIFLOW_DEMO_COLOURS = (  # (in the letter, around it) preview RGB of the four components at each location
    ((0.98, 0.85, 0.15), (0.50, 0.50, 0.50)),
    ((0.98, 0.55, 0.10), (0.44, 0.45, 0.47)),
    ((0.90, 0.20, 0.15), (0.56, 0.56, 0.57)),
    ((0.95, 0.30, 0.60), (0.47, 0.50, 0.56)),
)
PIFLOW_DEMO_STD = 0.1


def piflow_demo_glyph() -> Tensor:
    """``(8, 8)`` mask of :data:`PIFLOW_DEMO_GLYPH` (1 in the letter)."""
    return torch.tensor([[c == "#" for c in row] for row in PIFLOW_DEMO_GLYPH], dtype=torch.float64)


def piflow_demo_mixture(std: float = PIFLOW_DEMO_STD) -> FactorizedMixture:
    """The pi-Flow reference data: a letter pi in warm colours on grey, each latent location on its own.

    Every location of the ``4 x 8 x 8`` SD1.5-format latent takes one of four components with equal
    weights and one shared ``std``, as a :class:`FactorizedMixture` must (its exact x0-posterior is then
    a pi-Flow GM policy). In the letter the components are four warm colours, around it four greys, so
    every sample's preview shows the letter, in confetti colours that differ from sample to sample. Each
    mean is the minimum-norm latent whose ComfyUI preview is the colour.
    """
    inside = piflow_demo_glyph().unsqueeze(-1)
    images = torch.stack([inside * torch.tensor(letter, dtype=torch.float64)
                          + (1 - inside) * torch.tensor(around, dtype=torch.float64)
                          for letter, around in PIFLOW_DEMO_COLOURS])
    return FactorizedMixture(rgb_to_latent(images), std)


NUM_DEMO_CLASSES = len(DEMO_CLASS_NAMES)
UNCONDITIONAL_SLOT = NUM_DEMO_CLASSES
"""Index of the context slot that marks the unconditional (empty-prompt) branch."""
CONTEXT_DIM = NUM_DEMO_CLASSES + 1

DEMO_UNET_CONFIG: dict = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 32,
    "use_spatial_transformer": True,
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": -1,
    "context_dim": CONTEXT_DIM,
    "use_linear_in_transformer": True,
    "legacy": False,
}
"""Keyword arguments of ComfyUI's ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``
(add ``operations``, ``device`` and ``dtype`` as the host needs; copy it before a host edits it).
Channels 32 -> 64 over two levels (8x8, 4x4); one spatial transformer (self-attention plus
cross-attention to the prompt) in the 4x4 input block and in both 4x4 output blocks; the
middle block is a single ResBlock. About 0.8M parameters, ~0.1 CPU-s per training step of 64."""



def check_demo_latent_size(height: int, width: int) -> None:
    """Refuse a latent the demo UNet cannot run (``ValueError``, in plain words).

    The UNet's second level opens with a 32-group normalisation of 32 channels, after a stride-2
    downsample to ``ceil(h / 2) x ceil(w / 2)``: each group needs more than one value, so at least
    one side must be 3 or longer (2x2 and smaller fail inside the network with a library message).
    """
    if math.ceil(height / 2) * math.ceil(width / 2) <= 1:
        raise ValueError(f"the demo model needs a latent of at least 3 in height or width (got {height}x{width}); "
                         "it was trained on 8x8 latents (Empty Latent Image 64x64)")


REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS_PATH = REPO_ROOT / "assets" / "demo" / "stride_demo_unet.safetensors"
DEMO_REPORT_PATH = DEMO_WEIGHTS_PATH.with_suffix(".json")
METADATA_PREFIX = "stride."


def demo_noise_space() -> NoiseSpace:
    """The demo model's noise space: VE with SD1.5's scaled-linear 1000-step sigma table."""
    return NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())


def encode_classes(
    class_ids: Tensor | list[int] | None, batch: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The cross-attention context ``(batch, 1, CONTEXT_DIM)`` for demo class ids.

    ``class_ids`` has ``batch`` entries in ``[-1, NUM_DEMO_CLASSES)``; ``-1`` (or ``None`` for the
    whole batch) is the unconditional / empty prompt, encoded in the last slot.
    """
    if class_ids is None:
        slots = torch.full((batch,), UNCONDITIONAL_SLOT, dtype=torch.long)
    else:
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1).cpu()
        if class_ids.numel() != batch:
            raise ValueError(f"class_ids has {class_ids.numel()} entries for a batch of {batch}")
        if ((class_ids < -1) | (class_ids >= NUM_DEMO_CLASSES)).any():
            raise ValueError(f"demo class ids must lie in [-1, {NUM_DEMO_CLASSES}), got {class_ids.tolist()}")
        slots = torch.where(class_ids < 0, torch.full_like(class_ids, UNCONDITIONAL_SLOT), class_ids)
    return nn.functional.one_hot(slots, CONTEXT_DIM).to(dtype).unsqueeze(1)


def decode_context(context: Tensor) -> Tensor:
    """Class ids ``(B,)`` of a context made by :func:`encode_classes` (``-1`` = unconditional).

    Reads the first token's largest slot, so slightly perturbed or rescaled contexts decode too.
    """
    if context.ndim != 3 or context.shape[-1] != CONTEXT_DIM:
        raise ValueError(f"demo context must have shape (B, T, {CONTEXT_DIM}), got {tuple(context.shape)}")
    slots = context[:, 0].argmax(dim=-1)
    return torch.where(slots == UNCONDITIONAL_SLOT, torch.full_like(slots, -1), slots)


def nearest_timestep(space: NoiseSpace, sigma: Tensor) -> Tensor:
    """The table index nearest to ``sigma`` in log-sigma (ComfyUI ``ModelSamplingDiscrete.timestep``)."""
    log_table = space.sigma_table.to(sigma.device).log()
    distances = sigma.to(torch.float64).log().reshape(-1, 1) - log_table.reshape(1, -1)
    return distances.abs().argmin(dim=1).reshape(sigma.shape)


def unet_eps(unet: nn.Module, x: Tensor, sigma: Tensor, context: Tensor, space: NoiseSpace) -> Tensor:
    """The network's noise prediction at ``(x, sigma)``, called the way ComfyUI's EPS model calls it:
    input scaled by ``1 / sqrt(sigma^2 + 1)``, timestep = nearest table index (as float)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
    scaled = x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1)
    timesteps = nearest_timestep(space, sigma).to(x.dtype)
    return unet(scaled, timesteps, context=context.to(x.dtype))


def unet_denoiser(unet: nn.Module, space: NoiseSpace) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """A k-diffusion-style denoiser ``(x, sigma_batch, class_ids) -> x0 = x - sigma * eps`` for the net."""

    def denoise(x: Tensor, sigma: Tensor, class_ids: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        context = encode_classes(class_ids, x.shape[0], x.dtype).to(x.device)
        return x - sigma.reshape(-1, 1, 1, 1) * unet_eps(unet, x, sigma, context, space)

    return denoise


def load_demo_weights(path: Path | str = DEMO_WEIGHTS_PATH) -> tuple[dict[str, Tensor], dict]:
    """The shipped ``UNetModel`` state dict and its metadata (``stride.*`` keys, JSON-decoded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo weights not found at {path}; run scripts/build_demo_model.py")
    tensors, raw = read_safetensors(path)
    metadata = {
        key[len(METADATA_PREFIX):]: json.loads(value) for key, value in raw.items() if key.startswith(METADATA_PREFIX)
    }
    return tensors, metadata
