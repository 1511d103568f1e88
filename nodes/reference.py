"""The reference setup as ComfyUI nodes: the analytic teacher and the trained demo model as
real MODELs, class prompts as CONDITIONING, a cheap latent->RGB decoder and exact metrics."""
from __future__ import annotations

import json

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..distill_core.reference import demo, metrics
from ..distill_core.reference.demo import DEMO_CLASS_NAMES, demo_mixture, latent_to_rgb
from ..distill_core.reference.mixture import GaussianMixture
from ..distill_core.spaces import NoiseSpace, prediction_target
from .compat import StrideError, noise_space

CATEGORY = "stride/reference"
PREDICTIONS = ["eps", "v", "flow"]
VARIANTS = ["demo", "demo collapsed (2 of 8 modes)"]
FORMS = ["denoiser (ideal many-step teacher)", "flow map (ideal distilled student)"]
_MODEL_TYPES = {
    "eps": comfy.model_base.ModelType.EPS,
    "v": comfy.model_base.ModelType.V_PREDICTION,
    "flow": comfy.model_base.ModelType.FLOW,
}


def mixture_for(variant: str) -> GaussianMixture:
    """The demo mixture or its mode-collapsed partner: 90% of the mass on the first component of two classes,
    10% spread over the rest (a distilled model that under-samples modes, as CFG and mode-seeking distillation do)."""
    mixture = demo_mixture()
    if variant == VARIANTS[1]:
        return mixture.sharpened(keep=[0, 2], residual_weight=0.1)
    return mixture


def class_ids_of(context: torch.Tensor) -> torch.Tensor:
    """Demo class ids of a Stride Class Prompt context; any other conditioning is refused by name."""
    try:
        return demo.decode_context(context)
    except ValueError:
        raise StrideError(f"conditioning: the reference teacher and the demo model take Stride Class Prompt "
                          f"conditioning (context width {demo.CONTEXT_DIM}), got a context of shape "
                          f"{tuple(context.shape)}; connect Stride Class Prompt instead of a text encoder.") from None


def check_latent_shape(latents: torch.Tensor, expected: tuple[int, ...], model_name: str) -> None:
    """Refuse latents of another channel count or size than the model was built for."""
    if tuple(latents.shape[1:]) != tuple(expected):
        channels, height, width = expected
        raise StrideError(f"latent_image: {model_name} works on {'x'.join(map(str, expected))} latents "
                          f"(Empty Latent Image {width * 8}x{height * 8}, {channels}-channel SD1.5 format); "
                          f"got {'x'.join(map(str, latents.shape[1:]))}.")


class StrideLatentFormat(comfy.latent_formats.SD15):
    """SD1.5 latents as the reference mixture defines them: no scale factor (the mixture lives in the
    model's latent space), previews through the SD1.5 latent->RGB factors (no TAESD download)."""

    def __init__(self) -> None:
        super().__init__(scale_factor=1.0)
        self.taesd_decoder_name = None


def _config(latent_channels: int, prediction: str) -> comfy.supported_models_base.BASE:
    class StrideConfig(comfy.supported_models_base.BASE):
        unet_config = {"disable_unet_model_creation": True, "in_channels": latent_channels}
        unet_extra_config = {}
        latent_format = StrideLatentFormat
        sampling_settings = {"shift": 1.0, "multiplier": 1000} if prediction == "flow" else {}
        supported_inference_dtypes = [torch.float32]

    return StrideConfig({"disable_unet_model_creation": True, "in_channels": latent_channels})


def wrap_as_model(diffusion_model: torch.nn.Module, prediction: str, latent_channels: int = 4):
    """A ComfyUI MODEL (ModelPatcher around a BaseModel) whose network is ``diffusion_model``."""
    config = _config(latent_channels, prediction)
    base = comfy.model_base.BaseModel(config, model_type=_MODEL_TYPES[prediction], device="cpu")
    base.diffusion_model = diffusion_model
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)


class AnalyticModule(torch.nn.Module):
    """Base of the analytic networks: ComfyUI's network interface around a closed-form answer.

    ComfyUI hands a network the scaled input and a (rounded) timestep; an exact answer needs the
    true sigma, which ComfyUI's samplers pass in ``transformer_options["sigmas"]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))  # gives the module a device and dtype
        self.model_sampling = None

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def true_sigmas(self, xc: torch.Tensor, timesteps: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        """Per-row float64 sigmas of this call (cond and uncond chunks share the sampler's sigmas)."""
        sigma = transformer_options.get("sigmas")
        if sigma is None:
            sigma = self.model_sampling.sigma(timesteps)
        sigma = sigma.to(torch.float64).reshape(-1)
        return sigma.repeat(xc.shape[0] // sigma.numel())


class AnalyticNetwork(AnalyticModule):
    """The exact Gaussian-mixture denoiser (or flow map) as an EPS, V or flow network: it returns what
    the model type predicts, so ComfyUI's own ``calculate_denoised`` recovers the exact x0."""

    def __init__(self, mixture: GaussianMixture, prediction: str, flow_map_steps: int = 0) -> None:
        super().__init__()
        self.mixture = mixture
        self.prediction = prediction
        self.flow_map_steps = flow_map_steps
        self.space: NoiseSpace | None = None

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        check_latent_shape(xc, self.mixture.latent_shape, "the reference teacher")
        sigma = self.true_sigmas(xc, timesteps, transformer_options)
        x64 = xc.to(torch.float64)
        if self.prediction != "flow":
            x64 = x64 * (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
        class_ids = class_ids_of(context)
        if self.flow_map_steps:
            x0 = self.mixture.flow_map(x64, sigma, self.space, class_ids, steps=self.flow_map_steps)
        else:
            x0 = self.mixture.denoise(x64, sigma, self.space, class_ids)
        kind = {"eps": "eps", "v": "v", "flow": "velocity"}[self.prediction]
        return prediction_target(x64, x0, sigma, self.space, kind).to(xc.dtype)


class StrideReferenceModel:
    DESCRIPTION = (
        "The analytic reference teacher: a Gaussian mixture in SD1.5 latent space (4x8x8, 8 shapes in "
        "4 classes) whose exact denoiser is known in closed form. Use it to score samplers exactly "
        "(Stride Reference Metrics) without downloading weights."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A real ComfyUI MODEL; use Stride Class Prompt for its conditioning.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "variant": (VARIANTS, {"tooltip": "demo: the 8-mode mixture. collapsed: the same data with only 2 modes "
                                              "kept, a stand-in for a mode-collapsed distilled model."}),
            "prediction": (PREDICTIONS, {"tooltip": "What the MODEL predicts: eps and v use SD's 1000-step "
                                                    "schedule; flow is rectified flow (x = (1-s) x0 + s noise)."}),
            "form": (FORMS, {"tooltip": "denoiser: the exact posterior mean (judge plain solvers). flow map: the "
                                        "exact ODE solution to sigma 0 (what a consistency-distilled model "
                                        "learns; judge LCM/TCD/TDD on it)."}),
            "flow_map_steps": ("INT", {"default": 64, "min": 8, "max": 1000,
                                       "tooltip": "ODE steps per flow-map evaluation (only for the flow map form)."}),
        }}

    def build(self, variant, prediction, form, flow_map_steps):
        network = AnalyticNetwork(mixture_for(variant), prediction, flow_map_steps if form == FORMS[1] else 0)
        model = wrap_as_model(network, prediction)
        network.model_sampling = model.model.model_sampling
        network.space = noise_space(model.model.model_sampling)
        return (model,)


class StrideDemoModel:
    DESCRIPTION = (
        "Loads Stride's demo model: a small ComfyUI UNet (EPS, SD1.5 latent format) trained by the "
        "project on the reference mixture. It is the teacher for distillation and the base model for "
        "the demos; its weights ship with the pack (assets/demo)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The demo UNet as a MODEL; use Stride Class Prompt for its conditioning.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        try:
            state_dict, _ = demo.load_demo_weights()
        except FileNotFoundError as exc:
            raise StrideError(f"{exc} (reinstall Stride: the weights ship in assets/demo)") from None
        network = UNetModel(**demo.DEMO_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
        network.load_state_dict(state_dict)
        network.eval()
        network.stride_unet_config = dict(demo.DEMO_UNET_CONFIG)  # lets a headless distillation rebuild it
        network.register_forward_pre_hook(_check_demo_inputs, with_kwargs=True)
        return (wrap_as_model(network, "eps"),)


def _check_demo_inputs(_network, args: tuple, kwargs: dict) -> None:
    """Name the wrong input (latent channels, conditioning width) before the UNet fails on a shape."""
    x = args[0] if args else kwargs["x"]
    channels = demo.DEMO_UNET_CONFIG["in_channels"]
    if x.shape[1] != channels:
        raise StrideError(f"latent_image: the demo model works on {channels}-channel SD1.5-format latents "
                          f"(Empty Latent Image); got {x.shape[1]} channels.")
    context = kwargs.get("context")
    if context is not None:
        class_ids_of(context)


class StrideClassPrompt:
    DESCRIPTION = (
        "Conditioning for the reference teacher and the demo model: name a class (" + ", ".join(DEMO_CLASS_NAMES)
        + "); an empty prompt is the unconditional (negative) prompt."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Class conditioning (one-hot context) usable as positive or negative.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"default": DEMO_CLASS_NAMES[0], "multiline": False,
                                                   "tooltip": "A class name, or empty for unconditional."})}}

    def encode(self, prompt):
        text = prompt.strip().lower()
        if not text:
            class_id = None
        else:
            matches = [i for i, name in enumerate(DEMO_CLASS_NAMES) if name in text or text in name]
            if not matches:
                raise StrideError(f"prompt '{prompt}': no such class; use one of {', '.join(DEMO_CLASS_NAMES)} or leave it empty")
            class_id = matches[0]
        context = demo.encode_classes(None if class_id is None else torch.tensor([class_id]), 1)
        return ([[context.float(), {}]],)


class StrideLatentToImage:
    DESCRIPTION = "Decodes SD1.5-format latents to RGB with ComfyUI's preview factors (no VAE needed), upscaled for viewing."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("RGB images, one per latent.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Latents to view."}),
            "scale": ("INT", {"default": 16, "min": 1, "max": 64, "tooltip": "Nearest-neighbour upscale factor."}),
        }}

    def decode(self, samples, scale):
        latents = samples["samples"]
        if latents.ndim != 4 or latents.shape[1] != 4:
            raise StrideError(f"samples: expected 4-channel image latents, got shape {tuple(latents.shape)}")
        rgb = latent_to_rgb(latents.float())
        rgb = rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        return (rgb.float().cpu(),)


class StrideReferenceMetrics:
    DESCRIPTION = (
        "Exact quality and diversity of samples from the reference setup: sliced Wasserstein distance to "
        "fresh mixture samples, NLL gap to the data (negative = over-concentrated), mode recall and mode "
        "entropy (1 = all modes equally often)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The metrics as JSON text.",)
    OUTPUT_NODE = True
    FUNCTION = "measure"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Samples to score (4x8x8 latents)."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The class the samples were drawn for (empty prompt = all)."}),
            "label": ("STRING", {"default": "samples", "tooltip": "Name of this row in the report."}),
        }}

    def measure(self, samples, conditioning, label):
        latents = samples["samples"].to(torch.float64)
        mixture = demo_mixture()
        if tuple(latents.shape[1:]) != mixture.latent_shape:
            raise StrideError(f"samples: expected latents of shape {mixture.latent_shape}, got {tuple(latents.shape[1:])}")
        if not torch.isfinite(latents).all():
            raise StrideError("samples: the latents contain NaN or inf values; check the sampler and model that "
                              "produced them.")
        if not conditioning:
            raise StrideError("conditioning: the conditioning is empty; connect the Stride Class Prompt the samples "
                              "were drawn for.")
        class_id = int(class_ids_of(conditioning[0][0])[0])
        class_ids = None if class_id < 0 else torch.full((latents.shape[0],), class_id)
        report = {"label": label, "n": latents.shape[0],
                  **metrics.evaluate_samples(latents, mixture, class_ids, torch.Generator().manual_seed(0))}
        text = json.dumps({key: round(value, 4) if isinstance(value, float) else value for key, value in report.items()})
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "StrideReferenceModel": StrideReferenceModel,
    "StrideDemoModel": StrideDemoModel,
    "StrideClassPrompt": StrideClassPrompt,
    "StrideLatentToImage": StrideLatentToImage,
    "StrideReferenceMetrics": StrideReferenceMetrics,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StrideReferenceModel": "Stride Reference Teacher",
    "StrideDemoModel": "Stride Demo Model",
    "StrideClassPrompt": "Stride Class Prompt",
    "StrideLatentToImage": "Stride Latent Preview Decode",
    "StrideReferenceMetrics": "Stride Reference Metrics",
}
