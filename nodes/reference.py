"""The reference setup as ComfyUI nodes: the analytic teacher and the trained demo model as
real MODELs, class prompts as CONDITIONING, a cheap latent->RGB decoder and exact metrics.
All nodes are V3 nodes (:mod:`.compat`)."""
from __future__ import annotations

import re
from typing import Any

import torch

import comfy.latent_formats
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..distill_core.reference import demo, metrics
from ..distill_core.reference.demo import DEMO_CLASS_NAMES, demo_mixture, latent_to_rgb
from ..distill_core.reference.mixture import GaussianMixture
from ..distill_core.spaces import NoiseSpace, prediction_target
from .compat import StrideError, combo, io, model_from_network, model_sampling_of_patcher, noise_space
from .results import METRIC_HELP, report_output

CATEGORY = "stride/reference"
PREDICTIONS = ["eps", "v", "flow"]
VARIANTS = ["demo", "demo collapsed (2 of 8 modes)"]
FORMS = ["denoiser (ideal many-step teacher)", "flow map (ideal distilled student)"]
LATENTS = ["image (B, 4, 8, 8)", "video (B, 4, T, 8, 8): independent frames"]


def mixture_for(variant: str) -> GaussianMixture:
    """The demo mixture or its mode-collapsed partner: 90% of the mass on the first component of two classes,
    10% spread over the rest (a distilled model that under-samples modes, as CFG and mode-seeking distillation do)."""
    mixture = demo_mixture()
    if variant == VARIANTS[1]:
        return mixture.sharpened(keep=[0, 2], residual_weight=0.1)
    return mixture


def class_ids_of(context: torch.Tensor, input_name: str = "conditioning") -> torch.Tensor:
    """Demo class ids of a Stride Class Prompt context; any other conditioning is refused, naming ``input_name``."""
    try:
        return demo.decode_context(context)
    except ValueError:
        raise StrideError(f"{input_name}: the reference teacher and the demo model take Stride Class Prompt "
                          f"conditioning (context width {demo.CONTEXT_DIM}), got a context of shape "
                          f"{tuple(context.shape)}; connect Stride Class Prompt instead of a text encoder.") from None


def frames_as_batch(latents: torch.Tensor) -> torch.Tensor:
    """Video latents ``[B, C, T, H, W]`` as ``B * T`` image latents (item-major); image latents unchanged."""
    return latents.movedim(2, 1).flatten(0, 1) if latents.ndim == 5 else latents


def check_prompt_input(model: Any, conditioning: list, input_name: str) -> None:
    """Before sampling Stride's reference teacher or demo model, refuse a CONDITIONING input that is not Stride
    Class Prompt's by the input's own name (inside the network only "conditioning" is known)."""
    if getattr(model.model.diffusion_model, "takes_class_prompts", False):
        for context, _ in conditioning:
            class_ids_of(context, input_name)


def check_latent_shape(latents: torch.Tensor, expected: tuple[int, ...], model_name: str) -> None:
    """Refuse latents of another channel count or size than the model was built for (video: per frame)."""
    if tuple(frames_as_batch(latents).shape[1:]) != tuple(expected):
        channels, height, width = expected
        got = "x".join(map(str, latents.shape[1:]))
        raise StrideError(f"latent_image: {model_name} works on {'x'.join(map(str, expected))} latents, got {got}; "
                          f"use Empty Latent Image {width * 8}x{height * 8} ({channels}-channel SD1.5 format).")


class StrideLatentFormat(comfy.latent_formats.SD15):
    """SD1.5 latents as the reference mixture defines them: no scale factor (the mixture lives in the
    model's latent space), previews through the SD1.5 latent->RGB factors (no TAESD download)."""

    def __init__(self) -> None:
        super().__init__(scale_factor=1.0)
        self.taesd_decoder_name = None


class StrideVideoLatentFormat(StrideLatentFormat):
    """The same latents as videos ``[B, 4, T, H, W]``: ComfyUI adds the frame axis to an empty image latent and
    keeps the first 4 channels of an empty video latent (e.g. EmptyHunyuanLatentVideo, Wan's)."""

    latent_dimensions = 3


def wrap_as_model(diffusion_model: torch.nn.Module, prediction: str, latent_channels: int = 4,
                  video: bool = False) -> Any:
    """A ComfyUI MODEL of SD1.5-format latents (:class:`StrideLatentFormat`, or :class:`StrideVideoLatentFormat`)
    whose network is ``diffusion_model``."""
    latent_format = StrideVideoLatentFormat if video else StrideLatentFormat
    return model_from_network(diffusion_model, prediction, latent_format, latent_channels)


class AnalyticModule(torch.nn.Module):
    """Base of the analytic networks: ComfyUI's network interface around a closed-form answer.

    ComfyUI hands a network the scaled input and a (rounded) timestep; an exact answer needs the
    true sigma, which ComfyUI's samplers pass in ``transformer_options["sigmas"]``.
    """

    anchor: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))  # gives the module a device and dtype
        self.model_sampling: Any = None  # ComfyUI's (untyped) model_sampling, set once a MODEL wraps the network

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def stride_identity(self) -> dict[str, Any]:
        """What the outputs depend on besides the (empty) state dict: the mixture, the prediction type and form
        (for saved results keyed by the model: ``compat.model_identity``)."""
        return {name: value for name, value in vars(self).items()
                if not name.startswith("_") and name not in ("training", "model_sampling", "space")}

    def true_sigmas(self, xc: torch.Tensor, timesteps: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        """Per-row float64 sigmas of this call (cond and uncond chunks share the sampler's sigmas)."""
        sigma = transformer_options.get("sigmas")
        if sigma is None:
            sigma = self.model_sampling.sigma(timesteps)
        sigma = sigma.to(torch.float64).reshape(-1)
        return sigma.repeat(xc.shape[0] // sigma.numel())


class AnalyticNetwork(AnalyticModule):
    """The exact Gaussian-mixture denoiser (or flow map) as an EPS, V or flow network: it returns what
    the model type predicts, so ComfyUI's own ``calculate_denoised`` recovers the exact x0.

    Video latents ``[B, C, T, H, W]`` hold T independent draws of the item's class (the data of a video whose
    frames share only the prompt), so the exact answer is the image answer per frame.
    """

    takes_class_prompts = True  # conditioned by Stride Class Prompt (see check_prompt_input)

    def __init__(self, mixture: GaussianMixture, prediction: str, flow_map_steps: int = 0) -> None:
        super().__init__()
        self.mixture = mixture
        self.prediction = prediction
        self.flow_map_steps = flow_map_steps
        self.space: NoiseSpace | None = None

    def forward(self, xc, timesteps, context=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        space = self.space
        if space is None:
            raise StrideError("the reference teacher runs only inside the MODEL Stride Reference Teacher builds")
        check_latent_shape(xc, self.mixture.latent_shape, "the reference teacher")
        frames = xc.shape[2] if xc.ndim == 5 else 1
        sigma = self.true_sigmas(xc, timesteps, transformer_options).repeat_interleave(frames)
        x64 = frames_as_batch(xc).to(torch.float64)
        if self.prediction != "flow":
            x64 = x64 * (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
        class_ids = class_ids_of(context).repeat_interleave(frames)
        if self.flow_map_steps:
            x0 = self.mixture.flow_map(x64, sigma, space, class_ids, steps=self.flow_map_steps)
        else:
            x0 = self.mixture.denoise(x64, sigma, space, class_ids)
        kind = {"eps": "eps", "v": "v", "flow": "velocity"}[self.prediction]
        target = prediction_target(x64, x0, sigma, space, kind).to(xc.dtype)
        return target.unflatten(0, (-1, frames)).movedim(1, 2) if xc.ndim == 5 else target


class StrideReferenceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideReferenceModel", display_name="Stride Reference Teacher", category=CATEGORY,
            description=(
                "The analytic reference teacher: a Gaussian mixture in SD1.5 latent space (4x8x8, 8 shapes in "
                "4 classes) whose exact denoiser is known in closed form. Use it to score samplers exactly "
                "(Stride Reference Metrics) without downloading weights."
            ),
            inputs=[
                combo("variant", VARIANTS, "demo: the 8-mode mixture. collapsed: the same data with only 2 modes "
                                           "kept, a stand-in for a mode-collapsed distilled model."),
                combo("prediction", PREDICTIONS, "What the MODEL predicts: eps and v use SD's 1000-step schedule; "
                                                 "flow is rectified flow (x = (1-s) x0 + s noise)."),
                combo("form", FORMS, "denoiser: the ideal many-step teacher, the exact posterior mean (judge plain "
                                     "solvers on it). flow map: the ideal distilled student, the exact ODE solution to "
                                     "sigma 0 (what a consistency-distilled model learns; judge LCM/TCD/TDD on it)."),
                io.Int.Input("flow_map_steps", default=64, min=8, max=1000,
                             tooltip="ODE steps per flow-map evaluation (only for the flow map form)."),
                combo("latents", LATENTS, "image: 4x8x8 latents (Empty Latent Image 64x64). video: the same per frame, "
                                          "frames drawn independently for the prompt's class; takes the first 4 "
                                          "channels of an empty video latent (e.g. EmptyHunyuanLatentVideo 64x64), "
                                          "a stand-in for Wan models.", default=LATENTS[0], optional=True),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A real ComfyUI MODEL; use Stride Class Prompt for its conditioning.")],
        )

    @classmethod
    def execute(cls, variant: str, prediction: str, form: str, flow_map_steps: int,
                latents: str = LATENTS[0]) -> io.NodeOutput:
        network = AnalyticNetwork(mixture_for(variant), prediction, flow_map_steps if form == FORMS[1] else 0)
        model = wrap_as_model(network, prediction, video=latents == LATENTS[1])
        network.model_sampling = model_sampling_of_patcher(model)
        network.space = noise_space(network.model_sampling)
        return io.NodeOutput(model)


class StrideDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideDemoModel", display_name="Stride Demo Model", category=CATEGORY,
            description=(
                "Loads Stride's demo model: a small ComfyUI UNet (EPS, SD1.5 latent format) trained by the "
                "project on the reference mixture. It is the teacher for distillation and the base model for "
                "the demos; its weights ship with the pack (assets/demo)."
            ),
            inputs=[],
            outputs=[io.Model.Output(display_name="model", tooltip="The demo UNet as a MODEL; use Stride Class Prompt "
                                                                   "for its conditioning.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        try:
            state_dict, _ = demo.load_demo_weights()
        except FileNotFoundError as exc:
            raise StrideError(f"{exc} (reinstall Stride: the weights ship in assets/demo)") from None
        network = UNetModel(**demo.DEMO_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
        network.load_state_dict(state_dict)
        network.eval()
        network.stride_unet_config = dict(demo.DEMO_UNET_CONFIG)  # lets a headless distillation rebuild it
        network.takes_class_prompts = True
        network.register_forward_pre_hook(_check_demo_inputs, with_kwargs=True)
        return io.NodeOutput(wrap_as_model(network, "eps"))


def _check_demo_inputs(_network, args: tuple, kwargs: dict) -> None:
    """Name the wrong input (latent channels, conditioning width) before the UNet fails on a shape."""
    x = args[0] if args else kwargs["x"]
    channels = demo.DEMO_UNET_CONFIG["in_channels"]
    if x.shape[1] != channels:
        raise StrideError(f"latent_image: the demo model works on {channels}-channel SD1.5-format latents "
                          f"(Empty Latent Image); got {x.shape[1]} channels.")
    try:
        demo.check_demo_latent_size(*x.shape[-2:])
    except ValueError as exc:
        raise StrideError(f"latent_image: {exc}; use Empty Latent Image 64x64") from None
    context = kwargs.get("context")
    if context is not None:
        class_ids_of(context)


def class_of_prompt(prompt: str) -> int | None:
    """The one demo class a prompt names as a whole word (case ignored), None for an empty prompt; a prompt that
    names no class, or more than one, is refused."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    named = [index for index, name in enumerate(DEMO_CLASS_NAMES) if name in words]
    if not prompt.strip():
        return None
    if len(named) == 1:
        return named[0]
    classes = ", ".join(DEMO_CLASS_NAMES)
    if not named:
        raise StrideError(f"prompt {prompt!r}: no such class; use one of {classes} or leave it empty")
    both = ", ".join(DEMO_CLASS_NAMES[index] for index in named)
    raise StrideError(f"prompt {prompt!r}: names more than one class ({both}); name exactly one class ({classes}) or "
                      "leave it empty")


class StrideClassPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideClassPrompt", display_name="Stride Class Prompt", category=CATEGORY,
            description=("Conditioning for the reference teacher and the demo model: name a class ("
                         + ", ".join(DEMO_CLASS_NAMES) + "); an empty prompt is the unconditional (negative) "
                         "prompt."),
            inputs=[io.String.Input("prompt", default=DEMO_CLASS_NAMES[0], multiline=False,
                                    tooltip="A class name, or empty for unconditional.")],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="Conditioning for that class (a "
                                                                                 "one-hot context), usable as "
                                                                                 "positive or negative.")],
        )

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        class_id = class_of_prompt(prompt)
        context = demo.encode_classes(None if class_id is None else torch.tensor([class_id]), 1)
        return io.NodeOutput([[context.float(), {}]])


class StrideLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideLatentToImage", display_name="Stride Latent Preview Decode", category=CATEGORY,
            description="Decodes SD1.5-format latents to RGB with ComfyUI's preview factors (no VAE needed), upscaled "
                        "for viewing. Video latents give every frame as an image, in order (as VAE Decode does).",
            inputs=[
                io.Latent.Input("samples", tooltip="Latents to view."),
                io.Int.Input("scale", default=16, min=1, max=64,
                             tooltip="How many times to enlarge the small preview (nearest-neighbour)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="RGB images, one per latent.")],
        )

    @classmethod
    def execute(cls, samples: dict, scale: int) -> io.NodeOutput:
        latents = samples["samples"]
        if latents.ndim not in (4, 5) or latents.shape[1] != 4:
            raise StrideError(f"samples: expected 4-channel image or video latents, got shape {tuple(latents.shape)}")
        try:
            rgb = latent_to_rgb(frames_as_batch(latents).float())
        except ValueError as exc:  # NaN/inf would decode to a plausible black or white picture
            raise StrideError(f"samples: {exc}; check the sampler and model that produced them") from None
        rgb = rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        return io.NodeOutput(rgb.float().cpu())


class StrideReferenceMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideReferenceMetrics", display_name="Stride Reference Metrics", category=CATEGORY,
            description=(
                "Scores samples from the reference setup exactly and shows the scores as a table on the node, each "
                "with its 95% interval (value ± half-width). The figures: how far the samples are from the data "
                "(sliced Wasserstein distance, swd; swd_data: the same for fresh data, its floor), whether the modes "
                "appear as often as they should (mode total variation to the true weights, mode_tv), how many appear "
                "(mode recall) and how evenly (mode entropy, 1 = all equally often), how far each mode's mean and "
                "covariance are off (0 for data), and whether the samples are too concentrated (NLL gap to the data: "
                "negative = over-concentrated). The intervals are over up to 8 independent repeats (disjoint groups "
                "of the samples, each scored against its own fresh data; <name>_pm in the report). Needs at least 4 "
                "samples; rows are told apart only where intervals do not overlap, which takes hundreds of samples "
                "per row."
            ),
            inputs=[
                io.Latent.Input("samples", tooltip="Samples to score (4x8x8 latents; video latents: every frame is a "
                                                   "sample)."),
                io.Conditioning.Input("conditioning", tooltip="The class the samples were drawn for (empty prompt = "
                                                              "all)."),
                io.String.Input("label", default="samples", tooltip="Name of this row in the report."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="The metrics as JSON text: each figure's "
                                                                       "value and <name>_pm (95% half-width), n and "
                                                                       "repeats.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples: dict, conditioning: list, label: str) -> io.NodeOutput:
        latents = frames_as_batch(samples["samples"]).to(torch.float64)
        mixture = demo_mixture()
        if tuple(latents.shape[1:]) != mixture.latent_shape:
            raise StrideError(f"samples: expected latents of shape {mixture.latent_shape}, "
                              f"got {tuple(latents.shape[1:])}; use samples of the reference teacher or the demo model "
                              "(Empty Latent Image 64x64)")
        if not torch.isfinite(latents).all():
            raise StrideError("samples: the latents contain NaN or inf values; check the sampler and model that "
                              "produced them.")
        if not conditioning:
            raise StrideError("conditioning: the conditioning is empty; connect the Stride Class Prompt the samples "
                              "were drawn for.")
        class_id = int(class_ids_of(conditioning[0][0], "conditioning")[0])
        if latents.shape[0] < metrics.MIN_SAMPLES:
            raise StrideError(f"samples: {latents.shape[0]} samples give no interval; score a batch of at least "
                              f"{metrics.MIN_SAMPLES} (a few hundred to tell rows apart).")
        class_ids = None if class_id < 0 else torch.full((latents.shape[0],), class_id)
        report = {"label": label, "n": latents.shape[0],
                  **metrics.evaluate_samples(latents, mixture, class_ids, torch.Generator().manual_seed(0))}
        return report_output({key: round(value, 4) if isinstance(value, float) else value
                              for key, value in report.items()}, METRIC_HELP)


NODES: list[type[io.ComfyNode]] = [StrideReferenceModel, StrideDemoModel, StrideClassPrompt, StrideLatentToImage,
                                   StrideReferenceMetrics]
