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
  conditioning, LoRA application, architecture detection, websocket events.

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

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.supported_models_base
from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..distill_core import methods
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


def combo(id: str, options: Iterable[str], tooltip: str, default: str | None = None,
          optional: bool = False) -> io.Combo.Input:
    """A dropdown input whose unknown values every host refuses before the run ("Value not in list").

    ``optional``: a dropdown added to an existing node, which prompts saved before it must not need.
    """
    kind = io.Combo.Input if _HOST_CHECKS_V3_COMBOS else _ListTypedCombo
    return kind(id, options=list(options), default=default, tooltip=tooltip, optional=optional)


def node_unique_id(node: type[io.ComfyNode]) -> str | None:
    """The graph node id of a running V3 node (hidden ``UNIQUE_ID``); None when called outside a graph."""
    return getattr(node.hidden, "unique_id", None)


# ------------------------------------------------------------------------------------------
# The node boundary: every input checked against its declaration before a node runs
# ------------------------------------------------------------------------------------------
def _is_conditioning(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, (list, tuple)) and len(item) == 2
                                           and torch.is_tensor(item[0]) and isinstance(item[1], dict) for item in value)


_LINKED: dict[str, Callable[[Any], bool]] = {  # what a linked value of each host type must look like
    "MODEL": lambda value: hasattr(value, "model") and callable(getattr(value, "clone", None)),
    "LATENT": lambda value: isinstance(value, dict) and torch.is_tensor(value.get("samples")),
    "CONDITIONING": _is_conditioning,
    "IMAGE": torch.is_tensor,
    "SIGMAS": torch.is_tensor,
    "SAMPLER": lambda value: callable(getattr(value, "sample", None)),
    "GUIDER": lambda value: callable(getattr(value, "sample", None)),
    "VAE": lambda value: callable(getattr(value, "decode", None)),
}
_WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
_LITERAL_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "text",
                  dict: "an object", list: "a list"}


def _json_literal(value: Any) -> bool:
    """A value an API client can type (null, a boolean, number, text or an object of them), as opposed to a node's
    output. Lists pass: a loss history is a list of numbers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, dict) and all(isinstance(key, str) and _json_literal(item) for key, item in value.items())


def input_problem(node_input: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for a declared input, in words that name it and say what to do; None if nothing.

    ComfyUI's own validation lets NaN through min/max checks (NaN compares false) and hands a typed literal
    to a linked input unchanged (an API client can send ``"latent_image": "abc"``); both are refused here.
    """
    kind, name = str(node_input.io_type), node_input.id
    if kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
            low, high = getattr(node_input, "min", None), getattr(node_input, "max", None)
            limits = f" from {low:g} to {high:g}" if low is not None and high is not None else ""
            return f"{name}: {shown} is not a finite number; type a number{limits}"
        return None
    valid = _LINKED.get(kind)
    if (valid is not None and not valid(value)) or (valid is None and kind not in _WIDGETS and _json_literal(value)):
        article = "an" if kind[:1] in "AEIOU" else "a"
        got = _LITERAL_KINDS.get(type(value), type(value).__name__)
        return (f"{name}: expected {article} {kind} from another node's output, got {got} {value!r:.40}; connect "
                f"{article} {kind} output (API clients send a link as [node_id, output_index])")
    return None


def checked_at_the_boundary(node: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Wrap ``node.execute`` so that each input is checked by :func:`input_problem` before the node runs (one check
    for every Stride node: ``nodes/__init__.py`` applies it to all of them)."""
    execute = node.__dict__["execute"].__func__
    signature = inspect.signature(execute)
    declared = {node_input.id: node_input for node_input in node.define_schema().inputs}

    @functools.wraps(execute)
    def guarded(cls: type[io.ComfyNode], *args: Any, **kwargs: Any) -> Any:
        for name, value in signature.bind(cls, *args, **kwargs).arguments.items():
            node_input = declared.get(name)
            if node_input is None or (value is None and node_input.optional):  # hidden, or optional and unconnected
                continue
            problem = input_problem(node_input, value)
            if problem is not None:
                raise StrideError(problem)
        return execute(cls, *args, **kwargs)

    node.execute = classmethod(guarded)
    return node


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
    """"eps", "v", "flow" or "x0": the parameterisation a model predicts (ComfyUI's X0 subclasses EPS)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.X0):
        return "x0"
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


# ComfyUI's model config classes (exact class, not subclasses: SSD-1B, FLUX Fill or Wan VACE are others) -> the
# registry's architectures; a function of the detected config where one class covers several sizes.
_ARCHITECTURES: dict[str, Callable[[dict], tuple[str, ...]]] = {
    "SD15": lambda config: (methods.SD15,),
    "SDXL": lambda config: (methods.SDXL,),
    "Flux": lambda config: (methods.FLUX1_DEV,),
    "FluxSchnell": lambda config: (methods.FLUX1_SCHNELL,),
    "Flux2": lambda config: (methods.FLUX2_DEV,),
    "SD3": lambda config: (methods.SD35_LARGE,) if config.get("depth") == SD35_LARGE_DEPTH else (),
    "QwenImage": lambda config: (methods.QWEN_IMAGE, methods.QWEN_IMAGE_EDIT),  # one class for both
    "ZImage": lambda config: (methods.Z_IMAGE,),
    # Wan 2.2 A14B's experts have Wan 2.1 14B's architecture, so a 14B model is either
    "WAN21_T2V": lambda config: (methods.WAN21_T2V_14B, methods.WAN22_T2V_A14B)
    if config.get("dim") == WAN_14B_DIM else (),
    "WAN21_I2V": lambda config: (methods.WAN21_I2V_14B, methods.WAN22_I2V_A14B)
    if config.get("dim") == WAN_14B_DIM else (),
}
SD35_LARGE_DEPTH = 38
WAN_14B_DIM = 5120


def model_architectures(model: Any) -> tuple[str, ...]:
    """The registry architectures (:mod:`distill_core.methods`) a MODEL can be, from the config class ComfyUI's model
    detection chose and its detected sizes; empty when it is none of them (or a custom model such as the reference)."""
    config = getattr(model.model, "model_config", None)
    architectures = _ARCHITECTURES.get(type(config).__name__)
    return architectures(getattr(config, "unet_config", None) or {}) if architectures else ()


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


_LORA_UP_SUFFIXES = (".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight",
                     ".lora_linear_layer.up.weight", ".lora_B.default.weight", ".lora_B")


@dataclasses.dataclass
class LoraFit:
    """How a LoRA state dict lands on a MODEL under ComfyUI's own key mapping (``comfy.lora``)."""

    layers: int  # LoRA layers in the file (one "up" weight each, in any format ComfyUI reads)
    loaded: int  # layers that land on a weight of the model with fitting shapes
    left_out: list[str]  # LoRA weight keys no weight of the model takes
    misshaped: list[str]  # weights of the model whose LoRA has other shapes


def lora_fit(model: Any, state_dict: dict[str, torch.Tensor]) -> LoraFit:
    """Which layers of a LoRA ComfyUI's LoraLoader would apply to ``model``, and which it would skip (it only logs
    them): unmatched keys, and patches whose shapes do not fit the weight (skipped when the weights are patched)."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.weight_adapter

    converted = comfy.lora_convert.convert_lora(dict(state_dict))
    patches = comfy.lora.load_lora(converted, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    used: set[str] = set()
    shapes = {key: tuple(value.shape) for key, value in model.model.state_dict().items()}
    misshaped = []
    for key, patch in patches.items():
        used |= set(getattr(patch, "loaded_keys", ()))
        if isinstance(patch, comfy.weight_adapter.LoRAAdapter) and key in shapes:
            up, down = patch.weights[0], patch.weights[1]
            if up.shape[0] != shapes[key][0] or down.numel() // down.shape[0] != math.prod(shapes[key][1:]):
                misshaped.append(key)
    lora_keys = sorted(key for key in converted if "lora" in key.lower() and not key.endswith(".alpha"))
    layers = sum(key.endswith(_LORA_UP_SUFFIXES) for key in converted)
    return LoraFit(layers, len(patches) - len(misshaped), [key for key in lora_keys if key not in used], misshaped)


def model_file(folder: str, name: str, input_name: str) -> str:
    """The path of a file ComfyUI lists in a models folder, refusing one it cannot open (a broken link, a link to a
    device or a folder) by the input's name."""
    import folder_paths

    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except FileNotFoundError:
        raise StrideError(f"{input_name}: models/{folder}/{name} is not a regular file (a broken link, or a link to a "
                          f"device or folder); point the link at the file again, or copy the file into models/{folder}"
                          ) from None


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


def send_event(event: str, data: dict) -> None:
    """Send a websocket event to the frontend when a server runs (no-op in-process)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))
