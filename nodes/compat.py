"""The one place that knows how ComfyUI versions differ (0.3.75 ... ~0.38).

Every other module in ``nodes/`` reaches the host through these helpers, so a change in
ComfyUI's internals is fixed here once.
"""
from __future__ import annotations

from typing import Any

import comfy.model_sampling

from ..distill_core.spaces import NoiseSpace


class StrideError(ValueError):
    """A user-facing error: the message says which input is wrong and what to do."""


def model_sampling_of_patcher(model: Any) -> Any:
    """The ``model_sampling`` object of a MODEL (ModelPatcher), honouring patched overrides."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.model.model_sampling


def model_sampling_in_sampler(model_k: Any) -> Any:
    """``model_sampling`` seen from inside a KSAMPLER function (the wrapped denoiser).

    Newer ComfyUI reads it through the guider's patcher; 0.3.75 through the BaseModel.
    """
    guider = getattr(model_k, "inner_model", None)
    patcher = getattr(guider, "model_patcher", None)
    if patcher is not None and hasattr(patcher, "get_model_object"):
        return patcher.get_model_object("model_sampling")
    return guider.inner_model.model_sampling


def is_flow(model_sampling: Any) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def sampling_kind(model_sampling: Any) -> str:
    """"eps", "v", "flow" or "x0": the parameterisation a model predicts."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "eps"
    return "x0"


def noise_space(model_sampling: Any) -> NoiseSpace:
    """Stride's NoiseSpace for a ComfyUI model_sampling: VE or flow, with a 1000-step table."""
    return NoiseSpace.from_sigma_table("flow" if is_flow(model_sampling) else "ve", model_sampling.sigmas)


def send_event(event: str, data: dict) -> None:
    """Send a websocket event to the frontend when a server runs (no-op in-process)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


def latent_spatial_downscale(latent_format: Any) -> int:
    """Image pixels per latent element along each spatial axis.

    Newer ComfyUI records it on the latent format (``spacial_downscale_ratio``); in 0.3.75 every
    image latent format is 8x (SD1.5, SDXL, SD3, Flux).
    """
    return int(getattr(latent_format, "spacial_downscale_ratio", 8))


def vae_spatial_downscale(vae: Any) -> int:
    """Image pixels per latent element along each spatial axis when this VAE encodes.

    Both 0.3.75 and newer ComfyUI answer through ``VAE.spacial_compression_encode()``; the attribute
    under it, ``downscale_ratio``, is an int for image VAEs and ``(temporal_formula, h, w)`` for
    video VAEs, so a VAE-like object without the method is read the same way.
    """
    compression = getattr(vae, "spacial_compression_encode", None)
    ratio = compression() if callable(compression) else getattr(vae, "downscale_ratio", 8)
    if isinstance(ratio, (tuple, list)):
        ratio = ratio[-1]
    return int(ratio)
