"""Released pi-Flow adapters on ComfyUI's FLUX.1, FLUX.2 and Qwen-Image models: the policy output
head, its capture wrapper and the loader node (a V3 node, :mod:`.compat`). The sampler side (policy
stash, rollout, schedule) is in :mod:`.piflow`; the adapter format in ``distill_core.piflow_adapter``,
its layer mapping in :mod:`.piflow_families`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import comfy.ldm.flux.layers
import comfy.lora
import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import folder_paths

from ..distill_core import piflow_adapter
from ..distill_core.piflow_adapter import PiFlowAdapter
from ..distill_core.safe_files import read_safetensors
from ..distill_core.sampling import piflow
from . import piflow_families
from .compat import StrideError, combo, image_model, io, model_file, wrapped_call_arguments
from .piflow import (
    CATEGORY,
    FLUX_GUIDANCE_TEXT,
    PIFLOW_FLUX1,
    PIFLOW_FLUX2,
    PIFLOW_SCHEDULE,
    PolicyOutput,
    deposit_policy,
)
from .piflow_families import FLUX1, FLUX2, QWEN_IMAGE, ModelFamily

WRAPPER_KEY = "stride_piflow_policy"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# ------------------------------------------------------------------------------------------
# The model families in ComfyUI
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComfyFamily:
    """Where a family's pieces sit in ComfyUI.

    ``head_module`` is the diffusion model's final layer the policy head takes the place of
    (called as ``head(tokens, conditioning)`` by both Flux and Qwen-Image); ``retired`` are
    modules the head makes redundant (replaced by identities); ``projection`` is the final
    linear whose output width is the values per token; ``packing`` the factor by which
    ComfyUI's latent folds the policy's latent into channels (FLUX.2: 2).
    """

    spec: ModelFamily
    base_class: type
    image_model: str
    head_module: str
    projection: str
    example: str  # what to load, for messages
    retired: tuple[str, ...] = ()
    packing: int = 1


COMFY_FAMILIES = (  # FLUX.2's BaseModel subclasses FLUX.1's: test it first
    ComfyFamily(FLUX2, comfy.model_base.Flux2, "flux2", "final_layer", "final_layer.linear",
                f"e.g. flux2_dev_fp8mixed in Load Diffusion Model, Flux guidance {PIFLOW_FLUX2.flux_guidance:g}",
                packing=2),
    ComfyFamily(FLUX1, comfy.model_base.Flux, "flux", "final_layer", "final_layer.linear",
                f"e.g. flux1-dev in Load Diffusion Model, Flux guidance {PIFLOW_FLUX1.flux_guidance:g}"),
    ComfyFamily(QWEN_IMAGE, comfy.model_base.QwenImage, "qwen_image", "norm_out", "proj_out",
                "e.g. qwen_image_fp8_e4m3fn in Load Diffusion Model", retired=("proj_out",)),
)
SUPPORTED = "a FLUX.1 model, a FLUX.2 model or a Qwen-Image model"


def model_family(model: Any) -> ComfyFamily:
    """The family of a MODEL, from its BaseModel class and ComfyUI's model detection; others are refused."""
    base = model.model
    architecture = image_model(model)
    for family in COMFY_FAMILIES:
        if isinstance(base, family.base_class) and architecture == family.image_model:
            return family
    raise StrideError(f"model: pi-Flow adapters load onto {SUPPORTED} (Load Diffusion Model); "
                      f"this is {type(base).__name__}" + (f" ({architecture})." if architecture else "."))


def has_policy_head(model: Any) -> bool:
    """Whether a MODEL carries a pi-Flow adapter loaded by :class:`StridePiFlowAdapterLoader` (its policy head)."""
    return any(isinstance(model.model, family.base_class) and image_model(model) == family.image_model
               and isinstance(model.get_model_object(f"diffusion_model.{family.head_module}"), PolicyHead)
               for family in COMFY_FAMILIES)


# ------------------------------------------------------------------------------------------
# The policy head
# ------------------------------------------------------------------------------------------
class AdaptiveNorm(nn.Module):
    """Parameter-free LayerNorm modulated by the conditioning: diffusers' ``norm_out`` (scale | shift)."""

    def __init__(self, hidden_size: int, bias: bool) -> None:
        super().__init__()
        self.linear = comfy.ops.manual_cast.Linear(hidden_size, 2 * hidden_size, bias=bias)

    def forward(self, x: Tensor, conditioning: Tensor, modulation_dims=None) -> Tensor:
        scale, shift = self.linear(F.silu(conditioning)).chunk(2, dim=-1)
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        return comfy.ldm.flux.layers.apply_mod(normed, 1 + scale, shift, modulation_dims)


class PolicyHead(nn.Module):
    """A released adapter's output head in place of a ComfyUI model's final layer.

    Holds the adapter's head under its own (diffusers) names: ``norm_out``, then the GM heads
    (means and log-weights per token, log-std from the conditioning vector) or the DX grid
    head. Returns the policy's mean velocity per token in the final layer's layout, so the
    rest of the model is unchanged; while ``capture`` is a list, each call's raw head outputs
    are appended to it.
    """

    def __init__(self, adapter: PiFlowAdapter, packing: int = 1) -> None:
        super().__init__()
        linear = comfy.ops.manual_cast.Linear
        head = adapter.head
        hidden = adapter.hidden_size
        self.kind = "gm" if adapter.policy_type == piflow_adapter.GM_POLICY else "dx"
        self.components = adapter.num_components
        self.token_channels = adapter.token_channels
        self.patch_size = adapter.patch_size
        self.packing = packing
        self.segment_size = float(adapter.policy_config.get("segment_size", 0.0))
        self.shift = float(adapter.policy_config.get("shift", piflow.DEFAULT_SHIFT))
        self.mode = adapter.policy_config.get("mode", piflow.DX_GRID)
        self.norm_out = AdaptiveNorm(hidden, "norm_out.linear.bias" in head)
        if self.kind == "gm":
            self.proj_out_means = linear(hidden, self.components * self.token_channels,
                                         bias="proj_out_means.bias" in head)
            self.proj_out_logweights = linear(hidden, self.components * self.patch_size**2,
                                              bias="proj_out_logweights.bias" in head)
            layers: list[nn.Module] = []
            for index in sorted({int(key.split(".")[1]) for key in head if key.startswith("proj_out_logstds.")}):
                weight = head[f"proj_out_logstds.{index}.weight"]
                layers += [nn.SiLU(), linear(weight.shape[1], weight.shape[0],
                                             bias=f"proj_out_logstds.{index}.bias" in head)]
            self.proj_out_logstds = nn.Sequential(*layers)
        else:
            self.proj_out = linear(hidden, self.components * self.token_channels, bias="proj_out.bias" in head)
        self.load_state_dict({key: value.float() for key, value in head.items()})
        self.capture: list[tuple[Tensor, ...]] | None = None

    def forward(self, x: Tensor, conditioning: Tensor, modulation_dims=None) -> Tensor:
        # FLUX passes vec (B, D), or (B, 2, D) when reference latents sit at t = 0; Qwen-Image temb (B, D)
        per_token = conditioning if conditioning.ndim == 3 else conditioning[:, None]
        hidden = self.norm_out(x.float(), per_token.float(), modulation_dims)
        batch, tokens, _ = hidden.shape
        positions = self.patch_size**2
        if self.kind == "gm":
            means = self.proj_out_means(hidden)
            logits = self.proj_out_logweights(hidden)
            logstds = self.proj_out_logstds(per_token[:, 0].float())  # the noisy image tokens' conditioning
            weights = logits.view(batch, tokens, self.components, 1, positions).softmax(dim=2)
            per_component = means.view(batch, tokens, self.components, -1, positions)
            mean_velocity = (weights * per_component).sum(dim=2).reshape(batch, tokens, self.token_channels)
            outputs: tuple[Tensor, ...] = (means, logits, logstds)
        else:
            terms = self.proj_out(hidden)
            # the source's x0: the polynomial's constant term, or the last grid point
            polynomial = self.mode == piflow.DX_POLYNOMIAL
            mean_velocity = terms[..., : self.token_channels] if polynomial else terms[..., -self.token_channels:]
            outputs = (terms,)
        if self.capture is not None:
            self.capture.append(outputs)
        return mean_velocity.to(x.dtype)

    def policy_output(self, outputs: tuple[Tensor, ...], latent_shape: torch.Size) -> PolicyOutput:
        """Head outputs over all tokens -> the policy of a latent of ``latent_shape`` (its tokens come first).

        The policy lives on the unfolded latent (FLUX.2: 32 channels at twice the resolution of
        ComfyUI's 128-channel latent) and keeps a single-frame axis (Qwen-Image: (B, C, 1, H, W)).
        """
        if len(latent_shape) == 5 and latent_shape[2] != 1:
            raise StrideError(f"latent_image: pi-Flow adapters make single images, but this latent has "
                              f"{latent_shape[2]} frames; use an image latent (e.g. EmptySD3LatentImage).")
        p = self.patch_size
        height, width = latent_shape[-2] * self.packing, latent_shape[-1] * self.packing
        rows, cols = (height + p // 2) // p, (width + p // 2) // p  # ComfyUI pads to whole patches
        image = [tensor[:, : rows * cols] if tensor.ndim == 3 else tensor for tensor in outputs]
        if self.kind == "gm":
            head_means, head_logweights, head_logstds = image
            means, logweights, logstds = piflow_adapter.unpack_gm_tokens(head_means, head_logweights, head_logstds,
                                                                         rows * p, cols * p, p)
            tensors: tuple[Tensor, ...] = (means[..., :height, :width], logweights[..., :height, :width], logstds)
        else:
            velocities = piflow_adapter.unpack_dx_tokens(image[0], self.components, rows * p, cols * p, p)
            tensors = (velocities[..., :height, :width],)
        if len(latent_shape) == 5:
            tensors = tuple(tensor.unsqueeze(3) for tensor in tensors)
        return PolicyOutput(self.kind, tensors, self.segment_size, self.shift, self.mode)


class PolicyCapture:
    """DIFFUSION_MODEL wrapper: runs the model with the head capturing, then deposits the policy in the
    stash of this call's ``transformer_options`` (the head itself never sees them)."""

    def __init__(self, head: PolicyHead) -> None:
        self.head = head

    def __call__(self, executor, *args, **kwargs):
        captured: list[tuple[Tensor, ...]] = []
        self.head.capture = captured
        try:
            out = executor(*args, **kwargs)
        finally:
            self.head.capture = None
        if captured:
            call = wrapped_call_arguments(executor, args, kwargs)
            deposit_policy(call.get("transformer_options", {}), self.head.policy_output(captured[-1], call["x"].shape))
        return out


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def read_adapter_file(name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file in ``models/loras``; other files are refused unread."""
    if not name.lower().endswith(SAFETENSORS_SUFFIXES):
        raise StrideError(f"adapter_name: '{name}' is not a .safetensors file. pi-Flow adapters are released as "
                          "safetensors; Stride never loads pickle files (.pt, .ckpt, .bin) because they can run code.")
    path = model_file("loras", name, "adapter_name")
    try:
        return read_safetensors(path)
    except (ValueError, OSError) as exc:
        raise StrideError(f"adapter_name: cannot read '{name}': {exc}") from None


def check_adapter_family(modules: set[str], family: ComfyFamily, name: str) -> None:
    """Refuse an adapter whose LoRA layers belong to another family than the model's."""
    candidates = piflow_families.families_of(modules)
    if not modules or family.spec in candidates:
        return
    if not candidates:
        example = sorted(modules)[0]
        raise StrideError(f"adapter_name: '{name}' is not a pi-Flow adapter for FLUX.1, FLUX.2 or Qwen-Image: its "
                          f"LoRA layer '{example}' is in none of them.")
    found = " or ".join(f"pi-{other.name}" for other in candidates)
    home = next(other for other in COMFY_FAMILIES if other.spec.name == candidates[0].name)
    raise StrideError(f"adapter_name: '{name}' is a {found} adapter, but the model is {family.spec.name}. Load it "
                      f"onto a {home.spec.name} model ({home.example}), or pick a pi-{family.spec.name} adapter "
                      f"({family.spec.adapters}).")


def parse_for_model(state_dict: dict[str, Tensor], metadata: dict[str, str], family: ComfyFamily,
                    name: str) -> PiFlowAdapter:
    """Parse an adapter for this model's family; family mismatches are named as such."""
    lora_keys, _ = piflow_adapter.split_adapter_state_dict(state_dict)
    modules = {key.rsplit(".lora_", 1)[0] for key in lora_keys}
    try:
        adapter = piflow_adapter.parse_piflow_adapter(state_dict, metadata, family.spec.latent_channels,
                                                      family.spec.patch_size)
    except ValueError as exc:
        check_adapter_family(modules, family, name)
        raise StrideError(f"adapter_name: '{name}': {exc}; use the adapter file as released (download it again)"
                          ) from None
    check_adapter_family(modules, family, name)
    return adapter


def lora_patches(adapter: PiFlowAdapter, family: ComfyFamily, weight_shapes: dict[str, tuple[int, ...]],
                 name: str) -> dict:
    """ComfyUI weight patches for the adapter's LoRA (ComfyUI's own LoRA loading; every key used)."""
    try:
        targets = piflow_families.lora_targets(adapter, family.spec, weight_shapes)
    except ValueError as exc:
        raise StrideError(f"adapter_name: '{name}': {exc}") from None
    to_load, tensors = {}, {}
    for module, (target, down, up) in targets.items():
        key = f"diffusion_model.{target.key}"
        to_load[module] = (key, (0, *target.rows)) if target.rows else key
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = down, up
    patches = comfy.lora.load_lora(tensors, to_load)
    if len(patches) != len(adapter.lora):
        raise StrideError(f"adapter_name: ComfyUI loaded {len(patches)} of the {len(adapter.lora)} LoRA layers of "
                          f"'{name}'.")
    return patches


def final_width(model: Any, family: ComfyFamily) -> int:
    """Values per token of the model's own final projection (never another adapter's head)."""
    owner, _, attribute = family.projection.partition(".")
    module = model.get_model_object(f"diffusion_model.{owner}")
    return (getattr(module, attribute) if attribute else module).weight.shape[0]


class StridePiFlowAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StridePiFlowAdapterLoader", display_name="Stride pi-Flow Adapter Loader", category=CATEGORY,
            description=("Loads a released pi-Flow adapter (safetensors in models/loras: LoRA + policy head in one "
                         "file) onto its base model: pi-FLUX.1 (gmflux / dxflux) onto FLUX.1 dev, pi-FLUX.2 (gmflux2) "
                         "onto FLUX.2 dev, pi-Qwen-Image (gmqwen / dxqwen) onto Qwen-Image. Applies the LoRA and swaps "
                         "the output layer for the policy head. Sample with Stride pi-Flow Sample (or the pi-Flow "
                         f"sampler + scheduler), {PIFLOW_FLUX1.default_steps} steps, shift {PIFLOW_SCHEDULE.shift:g}; "
                         f"{FLUX_GUIDANCE_TEXT}."),
            inputs=[
                io.Model.Input("model", tooltip="The adapter's base model (Load Diffusion Model): FLUX.1 dev, FLUX.2 "
                                                "dev or Qwen-Image."),
                combo("adapter_name", folder_paths.get_filename_list("loras"),
                      "The adapter safetensors in models/loras (LoRA + policy head in one file), e.g. "
                      "gmflux_k8_piid_4step, gmflux2_k8_piid_4step, gmqwen_k8_piid_4step, dxqwen_n10_piid_4step."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the adapter's LoRA (1.0 as trained; the authors suggest slightly "
                                       "higher for customised base models). The head is always swapped."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The pi-Flow model (a patched copy; the input "
                                                                   "MODEL is not changed).")],
        )

    @classmethod
    def execute(cls, model: Any, adapter_name: str, strength: float) -> io.NodeOutput:
        family = model_family(model)
        if isinstance(model.get_model_object(f"diffusion_model.{family.head_module}"), PolicyHead):
            raise StrideError("model: this model already has a pi-Flow adapter; load the adapter onto the base model.")
        state_dict, metadata = read_adapter_file(adapter_name)
        adapter = parse_for_model(state_dict, metadata, family, adapter_name)
        diffusion_model = model.model.diffusion_model
        weight_shapes = {key: tuple(value.shape) for key, value in diffusion_model.named_parameters()}
        try:
            piflow_families.check_head(adapter, family.spec, weight_shapes["img_in.weight"][0],
                                       final_width(model, family))
        except ValueError as exc:
            raise StrideError(f"adapter_name: '{adapter_name}': {exc}") from None
        patches = lora_patches(adapter, family, weight_shapes, adapter_name)
        head = PolicyHead(adapter, family.packing)
        patched = model.clone()
        patched.add_patches(patches, strength)
        patched.add_object_patch(f"diffusion_model.{family.head_module}", head)
        for module in family.retired:
            patched.add_object_patch(f"diffusion_model.{module}", nn.Identity())
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     PolicyCapture(head))
        return io.NodeOutput(patched)


NODES: list[type[io.ComfyNode]] = [StridePiFlowAdapterLoader]
