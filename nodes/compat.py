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
  conditioning, LoRA application, architecture detection, FLUX.1's diffusers key table, websocket events,
  the nodes' progress text, the identity of a MODEL or GUIDER (what a saved result was computed by), the
  latent a sampler starts from, the per-step noise ComfyUI's own samplers draw, Stride's folders in
  ``folder_paths``.

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
import enum
import functools
import inspect
import math
import os
import types
import uuid
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

import comfy.k_diffusion.sampling
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths
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


FLUX2_SINGLE_BLOCK_NAMES = (".attn.to_qkv_mlp_proj.", ".attn.to_out.")
"""Single-block names of diffusers' Flux2Transformer2DModel (fused linear1 / linear2)."""


def flux1_diffusers_names(model: Any) -> dict[str, Any] | None:
    """ComfyUI's table from diffusers' FLUX.1 transformer keys to a FLUX.1 ``BaseModel``'s own keys
    (``comfy.utils.flux_to_diffusers``), or None when ``model`` is not FLUX.1 (FLUX.2 or another family).

    0.33 builds one table for FLUX.1 and FLUX.2 and adds to the single blocks FLUX.2's fused names
    (:data:`FLUX2_SINGLE_BLOCK_NAMES`, aliases of linear1 / linear2), which diffusers' FLUX.1 model does not have;
    they are left out. 0.3.75 has neither the names nor a Flux2 model class.
    """
    flux2 = getattr(comfy.model_base, "Flux2", None)
    if not isinstance(model, comfy.model_base.Flux) or (flux2 is not None and isinstance(model, flux2)):
        return None
    table = comfy.utils.flux_to_diffusers(model.model_config.unet_config, output_prefix="")
    return {key: target for key, target in table.items() if not (
        key.startswith("single_transformer_blocks.") and any(name in key for name in FLUX2_SINGLE_BLOCK_NAMES))}


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


def model_file(folder: str, name: str, input_name: str, label: str | None = None) -> str:
    """The path of a file ComfyUI lists in a models folder (shown as ``label``, default ``models/<folder>``), refusing
    one it cannot open (a broken link, a link to a device or a folder) by the input's name."""
    import folder_paths

    label = label or f"models/{folder}"
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except FileNotFoundError:
        raise StrideError(f"{input_name}: {label}/{name} is not a regular file (a broken link, or a link to a device "
                          f"or folder); point the link at the file again, or copy the file into {label}") from None


# ------------------------------------------------------------------------------------------
# Identities: what a saved result was computed by
# ------------------------------------------------------------------------------------------
IDENTITY_SAMPLES = 64
"""Values read (evenly strided) from each weight, patch or conditioning tensor for an identity: two different
weight files or LoRAs differ in almost every value, so a strided sample tells them apart without reading
gigabytes."""
IDENTITY_DEPTH = 3
"""How deep :func:`_identity_of` follows the attributes of plain objects (adapters, conds, a mixture)."""


def _identity_of(value: Any, depth: int = IDENTITY_DEPTH) -> Any:
    """A JSON-able description of ``value`` for :func:`model_identity`: a tensor by dtype, shape and a strided
    sample of its values; containers walked (ComfyUI's random per-cond uuids dropped, sets sorted); numbers,
    strings and enums as they are; a torch module, dtype, device or function by its type name (a module's tensors
    are in the state dict); any other object by its type and public attributes (LoRA adapters, CONDRegular, the
    analytic networks' mixture), following objects at most :data:`IDENTITY_DEPTH` deep."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // IDENTITY_SAMPLES)][:IDENTITY_SAMPLES].to("cpu", torch.float64)
        return {"dtype": str(value.dtype), "shape": list(value.shape), "values": sample}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [_identity_of(item, depth) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(repr(_identity_of(item, depth)) for item in value)
    if isinstance(value, dict):
        return {str(key): _identity_of(item, depth) for key, item in value.items() if not isinstance(item, uuid.UUID)}
    if depth == 0 or isinstance(value, (torch.nn.Module, torch.dtype, torch.device, types.FunctionType,
                                        types.MethodType, types.BuiltinFunctionType)):
        return type(value).__name__
    return {"type": type(value).__name__, "attributes": _identity_of(_public_attributes(value), depth - 1)}


def _public_attributes(value: Any) -> dict[str, Any]:
    return {name: item for name, item in getattr(value, "__dict__", {}).items()
            if not name.startswith("_") and name != "training"}


def model_identity(model: Any) -> dict[str, Any]:
    """What decides a MODEL's outputs, for keying saved results; the same model gives the same identity in every
    session. It holds the model and network classes, what a network of Stride's own says its outputs depend on
    besides its weights (``stride_identity()``: the reference teachers' mixture and form), the model sampling (its
    classes and sigma table), every weight as loaded (ComfyUI's backup of a weight that a loaded clone patched in
    place; clones share the backup), every weight patch with its strengths (LoRAs), and the names of object patches
    and model options (patch functions count by name only)."""
    base = model.model
    weights = {}
    for name, tensor in base.state_dict().items():
        original = model.backup.get(name)
        weights[name] = _identity_of(original.weight if original is not None else tensor)
    network = base.diffusion_model
    own = getattr(network, "stride_identity", None)
    sampling = model_sampling_of_patcher(model)
    options = model.model_options
    return {"model": type(base).__name__, "network": type(network).__name__,
            "network_identity": _identity_of(own()) if callable(own) else None,
            "sampling": {"classes": [kind.__name__ for kind in type(sampling).__mro__],
                         "sigmas": _identity_of(getattr(sampling, "sigmas", None))},
            "weights": weights,
            "patches": {key: _identity_of(patches) for key, patches in model.patches.items()},
            "object_patches": sorted(model.object_patches),
            "model_options": sorted(options),
            "transformer_options": sorted(options.get("transformer_options", {}))}


def guider_identity(guider: Any) -> dict[str, Any]:
    """What decides a GUIDER's outputs: its class, its model's :func:`model_identity`, its conditioning and its
    plain settings (CFGGuider's cfg, DualCFGGuider's two scales, ...)."""
    settings = {name: value for name, value in _public_attributes(guider).items()
                if isinstance(value, (bool, int, float, str))}
    return {"guider": type(guider).__name__, "model": model_identity(guider.model_patcher),
            "conds": _identity_of(getattr(guider, "original_conds", {})), "settings": settings}


def start_latent(model_sampling: Any, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The latent a ComfyUI sampler starts from on ``sigmas`` with an empty latent: the model sampling's noise
    scaling, at full noise when ``sigmas[0]`` reaches its top sigma (``Sampler.max_denoise``; EPS then scales by
    ``sqrt(1 + s^2)``)."""
    wrapper = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=model_sampling))
    full = comfy.samplers.Sampler().max_denoise(wrapper, sigmas)
    return model_sampling.noise_scaling(sigmas[:1].to(noise), noise, torch.zeros_like(noise), full)


def step_noise_sampler(x: torch.Tensor, seed: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-step noise ComfyUI's own stochastic samplers (``lcm``, ``euler_ancestral``, ...) draw for ``x`` and
    ``seed``: ``comfy.k_diffusion.sampling.default_noise_sampler``. Stride's samplers draw theirs from it, so a
    Stride run equals the core sampler's run on every host. The hosts differ: 0.3.75 seeds the generator with
    ``seed``, which on CPU repeats the initial noise (``prepare_noise`` draws it from the same seed) as the first
    step's noise; 0.33 seeds a CPU generator with ``seed + 1``."""
    return comfy.k_diffusion.sampling.default_noise_sampler(x, seed=seed)


# ------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------
def register_model_folder(name: str, *parts: str) -> None:
    """Make ``models/<parts>`` a folder_paths folder ``name`` listing .safetensors files, after any folders an
    ``extra_model_paths.yaml`` gave that name (the first folder is where Stride writes)."""
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, *parts))
    folder_paths.folder_names_and_paths[name][1].add(".safetensors")


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
