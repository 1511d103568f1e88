"""The host boundary: the one module of Stride that knows ComfyUI's versions and internals.

Supported hosts: ComfyUI 0.3.75 (the default, CI) to 0.33 (``make test-newest-host``). What lives here:

- the node API, pinned: ``comfy_api.v0_0_2`` (``io``, ``ui``, ``ComfyExtension``). Both hosts ship that
  module with every feature Stride uses (io types and ``io.Custom``, hidden inputs, ``ui.PreviewText``,
  ``is_output_node``, ``validate_inputs`` / ``fingerprint_inputs``, tooltips, descriptions, display names,
  categories), whereas ``comfy_api.latest`` is the moving target. Node modules import ``io`` and ``ui``
  from here, so changing the pin is one line. :func:`combo` covers the one V3 feature the hosts treat
  differently (validating dropdown values);
- :class:`StrideError`, the user-facing error;
- everything that differs between the hosts or reaches into objects ComfyUI builds for itself:
  ``model_sampling`` and its classification, the sampler-side wrappers (KSAMPLER's model, guiders,
  the inpainting wrapper), latent/VAE downscale factors, a MODEL around a bare network, model
  conditioning, LoRA application, architecture detection, websocket events and the nodes' progress text.

Used in place, because they are public, module-level and identical on both hosts: ``comfy.samplers``
(``KSAMPLER``, ``Sampler``, ``CFGGuider``, ``sampler_object``, ``KSampler.SAMPLERS``), ``comfy.sample``
(``prepare_noise``, ``fix_empty_latent_channels`` with two arguments, ``sample_custom``),
``latent_preview.prepare_callback``, ``comfy.model_management`` (devices, ``load_models_gpu``, the interrupt
helpers), ``comfy.utils`` (``ProgressBar``, ``PROGRESS_BAR_ENABLED``), ``folder_paths``, ``comfy.lora.load_lora``,
``comfy.ops``, ``comfy.ldm.flux.layers.apply_mod``, the ``comfy.model_base`` / ``comfy.latent_formats``
classes, the ModelPatcher methods (``clone``, ``get_model_object``, ``add_patches``, ``add_object_patch``,
``add_wrapper_with_key``) and BaseModel's ``diffusion_model``, ``latent_format`` and ``apply_model``.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.supported_models_base
from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..distill_core.spaces import NoiseSpace

__all__ = ["ComfyExtension", "StrideError", "io", "ui"]


class StrideError(Exception):
    """A user-facing error: the message says which input is wrong and what to do.

    Deliberately not a ValueError: nodes turn the library's ValueErrors into StrideErrors with broad
    ``except ValueError`` handlers, which must never catch (and re-word) a StrideError raised below them.
    ComfyUI reports any exception of a node the same way: the frontend shows ``str(error)``, the
    ``execution_error`` message carries it as ``exception_message`` with ``exception_type``
    ``<package>.nodes.compat.StrideError``.
    """


# ------------------------------------------------------------------------------------------
# Node API
# ------------------------------------------------------------------------------------------
class _ListTypedCombo(io.Combo.Input):
    """A V3 dropdown whose V1 type is its option list (the classic ComfyUI dropdown)."""

    def get_io_type(self) -> Any:
        return list(self.options)


# 0.3.75 checks dropdown values only when the input's type is the option list, and lets any value through
# a V3 "COMBO" input. Hosts with V3 dynamic inputs (io.DynamicCombo; 0.33) check "COMBO" against its
# options themselves and look input types up in a dict, where a list type fails: probed, not version-compared.
_HOST_CHECKS_V3_COMBOS = hasattr(io, "DynamicCombo")


def combo(id: str, options: Iterable[str], tooltip: str, default: str | None = None) -> io.Combo.Input:
    """A dropdown input whose unknown values every host refuses before the run ("Value not in list")."""
    kind = io.Combo.Input if _HOST_CHECKS_V3_COMBOS else _ListTypedCombo
    return kind(id, options=list(options), default=default, tooltip=tooltip)


def node_unique_id(node: type[io.ComfyNode]) -> str | None:
    """The graph node id of a running V3 node (hidden ``UNIQUE_ID``); None when called outside a graph."""
    return getattr(node.hidden, "unique_id", None)


# ------------------------------------------------------------------------------------------
# Model sampling
# ------------------------------------------------------------------------------------------
_DISCRETE_SAMPLINGS = (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.ModelSamplingDiscreteFlow,
                       comfy.model_sampling.ModelSamplingFlux)
_MODEL_TYPES = {
    "eps": comfy.model_base.ModelType.EPS,
    "v": comfy.model_base.ModelType.V_PREDICTION,
    "flow": comfy.model_base.ModelType.FLOW,
}


def model_sampling_of_patcher(model: Any) -> Any:
    """The ``model_sampling`` object of a MODEL (ModelPatcher), honouring patched overrides."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.model.model_sampling


def guider_model_sampling(guider: Any) -> Any:
    """``model_sampling`` of a guider while it samples (the guider ComfyUI hands a ``Sampler.sample``).

    Newer ComfyUI reads it through the guider's patcher; 0.3.75 through the BaseModel.
    """
    patcher = getattr(guider, "model_patcher", None)
    if patcher is not None and hasattr(patcher, "get_model_object"):
        return patcher.get_model_object("model_sampling")
    return guider.inner_model.model_sampling


def model_sampling_in_sampler(model_k: Any) -> Any:
    """``model_sampling`` seen from inside a KSAMPLER function (the inpainting wrapper around the guider)."""
    return guider_model_sampling(model_k.inner_model)


def guider_latent_format(guider: Any) -> Any:
    """The latent format of the model a guider samples (patched overrides included)."""
    return guider.model_patcher.get_model_object("latent_format")


def is_flow(model_sampling: Any) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def has_discrete_timesteps(model_sampling: Any) -> bool:
    """Whether a model samples on a table of training timesteps (SD's 1000, a flow model's shifted table)."""
    return isinstance(model_sampling, _DISCRETE_SAMPLINGS)


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


# ------------------------------------------------------------------------------------------
# Sampler-side wrappers
# ------------------------------------------------------------------------------------------
def inpainting_latent(model_k: Any) -> torch.Tensor:
    """The kept latent of an inpainting run, as ComfyUI's inpainting wrapper (KSAMPLER's model) holds it."""
    return model_k.latent_image


def mask_function_options(model_k: Any) -> dict:
    """The ``extra_options`` ComfyUI's inpainting wrapper passes to a model's ``denoise_mask_function``."""
    return {"model": model_k.inner_model, "sigmas": model_k.sigmas}


def wrapped_call_arguments(executor: Any, args: tuple, kwargs: dict) -> dict:
    """The named arguments of the call a model wrapper (``add_wrapper_with_key``) intercepts."""
    return inspect.signature(executor.original).bind(*args, **kwargs).arguments


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
def model_from_network(diffusion_model: torch.nn.Module, prediction: str, latent_format: type,
                       latent_channels: int = 4) -> Any:
    """A ComfyUI MODEL (ModelPatcher around a BaseModel) whose network is ``diffusion_model``.

    ``prediction`` is "eps", "v" or "flow" (rectified flow, shift 1); ``latent_format`` a class of
    ``comfy.latent_formats``. The model config creates no network of its own.
    """

    class StrideConfig(comfy.supported_models_base.BASE):
        unet_config: ClassVar[dict] = {"disable_unet_model_creation": True, "in_channels": latent_channels}
        unet_extra_config: ClassVar[dict] = {}
        sampling_settings: ClassVar[dict] = {"shift": 1.0, "multiplier": 1000} if prediction == "flow" else {}
        supported_inference_dtypes: ClassVar[list] = [torch.float32]

    StrideConfig.latent_format = latent_format
    config = StrideConfig({"disable_unet_model_creation": True, "in_channels": latent_channels})
    base = comfy.model_base.BaseModel(config, model_type=_MODEL_TYPES[prediction], device="cpu")
    base.diffusion_model = diffusion_model
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def image_model(model: Any) -> str | None:
    """The architecture ComfyUI's model detection recorded for a MODEL (e.g. "flux", "flux2", "qwen_image")."""
    return (getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}).get("image_model")


def extra_conds(model: Any, cross_attn: torch.Tensor, pooled_output: torch.Tensor | None,
                latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The network keyword arguments (c_crossattn, y, ...) a MODEL derives from one prompt encoding."""
    ratio = latent_spatial_downscale(model.model.latent_format)
    conds = model.model.extra_conds(cross_attn=cross_attn, pooled_output=pooled_output,
                                    width=latent_shape[-1] * ratio, height=latent_shape[-2] * ratio,
                                    device=torch.device("cpu"), noise=torch.zeros((1, *latent_shape)))
    return {name: value.cond for name, value in conds.items() if torch.is_tensor(getattr(value, "cond", None))}


def apply_lora(model: Any, state_dict: dict[str, torch.Tensor], strength: float) -> Any:
    """A clone of ``model`` with a LoRA state dict patched in (keys as ComfyUI's LoraLoader maps them)."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, state_dict, strength, 0)
    return patched


def load_lora_file(model: Any, lora_name: str, strength: float) -> Any:
    """``model`` with a LoRA file of ``models/loras`` applied, exactly as core LoraLoaderModelOnly does."""
    import nodes  # ComfyUI's nodes.py, imported once the host has loaded

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, strength)[0]


# ------------------------------------------------------------------------------------------
# Latents, VAEs, frontend
# ------------------------------------------------------------------------------------------
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


def _prompt_server() -> Any:
    """ComfyUI's running PromptServer, or None (in-process, e.g. tests and the headless runner)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """Send a websocket event to the frontend when a server runs (no-op in-process)."""
    instance = _prompt_server()
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


def send_progress_text(text: str, node_id: str | None) -> None:
    """Show ``text`` on the node as the frontend's progress text (both hosts' ``PromptServer.send_progress_text``;
    the frontend adds a text box below the node's widgets). No-op in-process or without a node id."""
    instance = _prompt_server()
    if instance is not None and node_id is not None:
        instance.send_progress_text(text, node_id, getattr(instance, "client_id", None))