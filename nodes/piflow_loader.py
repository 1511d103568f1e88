"""Released pi-Flow adapters on ComfyUI models: the policy output head, its capture wrapper and
the loader node. The sampler side (policy stash, rollout, schedule) is in :mod:`.piflow`."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

import comfy.ldm.flux.layers
import comfy.lora
import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import folder_paths

from ..distill_core import lora, piflow, piflow_adapter
from .compat import StrideError
from .piflow import CATEGORY, PolicyOutput, deposit_policy

HEAD_PATCH = "diffusion_model.final_layer"
WRAPPER_KEY = "stride_piflow_policy"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# ------------------------------------------------------------------------------------------
# Released adapters on a ComfyUI FLUX.1 model
# ------------------------------------------------------------------------------------------
class FluxPolicyHead(nn.Module):
    """pi-FLUX.1's output head in place of ComfyUI Flux's ``final_layer``.

    Keeps the final norm and adaLN modulation, then applies the GM heads (means, log-weights
    per token; log-std from the conditioning vector ``vec``) or the DX grid head. Returns the
    policy's mean velocity tokens in the usual layout, so the rest of Flux is unchanged; while
    ``capture`` is a list, each call's raw head outputs are appended to it.
    """

    def __init__(self, head_state: dict[str, Tensor], adapter: piflow_adapter.PiFlowAdapter, hidden_size: int) -> None:
        super().__init__()
        ops = comfy.ops.manual_cast
        self.kind = "gm" if adapter.policy_type == piflow_adapter.GM_POLICY else "dx"
        self.components = adapter.num_components
        self.token_channels = adapter.latent_channels * adapter.patch_size**2
        self.patch_size = adapter.patch_size
        self.segment_size = float(adapter.policy_config.get("segment_size", 0.0))
        self.shift = float(adapter.policy_config.get("shift", piflow.DEFAULT_SHIFT))
        self.norm_final = ops.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(hidden_size, 2 * hidden_size))
        if self.kind == "gm":
            self.proj_out_means = ops.Linear(hidden_size, self.components * self.token_channels)
            self.proj_out_logweights = ops.Linear(hidden_size, self.components * self.patch_size**2)
            layers: list[nn.Module] = []
            for index in sorted({int(key.split(".")[1]) for key in head_state if key.startswith("proj_out_logstds.")}):
                weight = head_state[f"proj_out_logstds.{index}.weight"]
                layers += [nn.SiLU(), ops.Linear(weight.shape[1], weight.shape[0])]
            self.proj_out_logstds = nn.Sequential(*layers)
        else:
            self.linear = ops.Linear(hidden_size, self.components * self.token_channels)
        state = {key.removeprefix("final_layer."): value for key, value in head_state.items()}
        self.load_state_dict({key: value.float() for key, value in state.items()})
        self.capture: list[tuple[Tensor, ...]] | None = None

    def forward(self, x: Tensor, vec: Tensor, modulation_dims=None, **kwargs) -> Tensor:
        shift, scale = self.adaLN_modulation(vec[:, None, :] if vec.ndim == 2 else vec).chunk(2, dim=-1)
        hidden = comfy.ldm.flux.layers.apply_mod(self.norm_final(x), 1 + scale, shift, modulation_dims).float()
        batch, tokens, _ = hidden.shape
        positions = self.patch_size**2
        if self.kind == "gm":
            means = self.proj_out_means(hidden)
            logits = self.proj_out_logweights(hidden)
            # the first modulation row belongs to the noisy image tokens (later rows: reference latents at t = 0)
            logstds = self.proj_out_logstds((vec if vec.ndim == 2 else vec[:, 0]).float())
            weights = logits.view(batch, tokens, self.components, 1, positions).softmax(dim=2)
            per_component = means.view(batch, tokens, self.components, -1, positions)
            mean_velocity = (weights * per_component).sum(dim=2).reshape(batch, tokens, self.token_channels)
            outputs = (means, logits, logstds)
        else:
            grid = self.linear(hidden)
            mean_velocity = grid[..., -self.token_channels:]  # the last grid point is the source's x0
            outputs = (grid,)
        if self.capture is not None:
            self.capture.append(outputs)
        return mean_velocity.to(x.dtype)

    def policy_output(self, outputs: tuple[Tensor, ...], height: int, width: int) -> PolicyOutput:
        """Head outputs over all tokens -> the policy of the ``height`` x ``width`` latent (first tokens)."""
        p = self.patch_size
        rows, cols = (height + p // 2) // p, (width + p // 2) // p  # ComfyUI pads to whole patches
        image = [tensor[:, : rows * cols] if tensor.ndim == 3 else tensor for tensor in outputs]
        if self.kind == "gm":
            means, logweights, logstds = piflow_adapter.unpack_gm_tokens(*image, rows * p, cols * p, p)
            return PolicyOutput("gm", (means[..., :height, :width], logweights[..., :height, :width], logstds))
        velocities = piflow_adapter.unpack_dx_tokens(image[0], self.components, rows * p, cols * p, p)
        return PolicyOutput("dx", (velocities[..., :height, :width],), self.segment_size, self.shift)


class PolicyCapture:
    """DIFFUSION_MODEL wrapper: runs Flux with the head capturing, then deposits the policy in the
    stash of this call's ``transformer_options`` (the head itself never sees them)."""

    def __init__(self, head: FluxPolicyHead) -> None:
        self.head = head

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        captured: list[tuple[Tensor, ...]] = []
        self.head.capture = captured
        try:
            out = executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        finally:
            self.head.capture = None
        if captured:
            deposit_policy(transformer_options, self.head.policy_output(captured[-1], x.shape[-2], x.shape[-1]))
        return out


def flux_shape_of(model: Any) -> piflow_adapter.FluxShape:
    """The FLUX.1 dimensions of a MODEL; anything else is refused."""
    base = model.model
    config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    # the shared Flux module may carry another patcher's head right now; the object patches say what this MODEL has
    final_layer = getattr(getattr(base, "diffusion_model", None), "final_layer", None)
    if not isinstance(base, comfy.model_base.Flux) or config.get("image_model") != "flux" or \
            not isinstance(final_layer, (comfy.ldm.flux.layers.LastLayer, FluxPolicyHead)):
        raise StrideError(f"model: pi-FLUX.1 adapters need a FLUX.1 model (e.g. flux1-dev in Load Diffusion Model); "
                          f"this is {type(base).__name__}.")
    if isinstance(model.object_patches.get(HEAD_PATCH), FluxPolicyHead):
        raise StrideError("model: this model already has a pi-Flow adapter; load the adapter onto the base model.")
    try:
        return piflow_adapter.FluxShape.from_unet_config(config)
    except KeyError as missing:
        raise StrideError(f"model: not a FLUX.1 model (its configuration has no {missing})") from None


def read_adapter_file(name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file in ``models/loras``; other files are refused unread."""
    if not name.lower().endswith(SAFETENSORS_SUFFIXES):
        raise StrideError(f"adapter_name: '{name}' is not a .safetensors file. pi-Flow adapters are released as "
                          "safetensors; Stride never loads pickle files (.pt, .ckpt, .bin) because they can run code.")
    path = folder_paths.get_full_path_or_raise("loras", name)
    try:
        return lora.load_lora_state(path)
    except (ValueError, OSError) as exc:
        raise StrideError(f"adapter_name: cannot read '{name}': {exc}") from None


def lora_patches(model: Any, adapter: piflow_adapter.PiFlowAdapter, shape: piflow_adapter.FluxShape,
                 name: str) -> dict:
    """ComfyUI weight patches for the adapter's LoRA, through ComfyUI's own Flux key map (every key used)."""
    try:
        piflow_adapter.flux_lora_targets(adapter, shape)  # shapes against this model
    except ValueError as exc:
        raise StrideError(f"adapter_name: '{name}': {exc}") from None
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    to_load, tensors = {}, {}
    for module, (down, up) in adapter.lora.items():
        key = f"transformer.{module}"
        if key not in key_map:
            raise StrideError(f"adapter_name: this ComfyUI version does not map the LoRA target '{module}' of '{name}' "
                              "onto its Flux weights; update ComfyUI.")
        to_load[key] = key_map[key]
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    patches = comfy.lora.load_lora(tensors, to_load)
    if len(patches) != len(adapter.lora):
        raise StrideError(f"adapter_name: ComfyUI loaded {len(patches)} of the {len(adapter.lora)} LoRA layers of '{name}'.")
    return patches


class StridePiFlowAdapterLoader:
    DESCRIPTION = ("Loads a released pi-Flow adapter (e.g. pi-FLUX.1 gmflux / dxflux safetensors from models/loras) onto a "
                   "FLUX.1 model: applies its LoRA and swaps the output layer for the policy head. Sample with Stride "
                   "pi-Flow Sample (or the pi-Flow sampler + scheduler), 4 steps, Flux guidance 3.5.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The pi-Flow model (a patched copy; the input MODEL is not changed).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 dev model (Load Diffusion Model)."}),
            "adapter_name": (folder_paths.get_filename_list("loras"),
                             {"tooltip": "The adapter safetensors in models/loras (LoRA + policy head in one file)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                   "tooltip": "Strength of the adapter's LoRA (1.0 as trained; the authors suggest "
                                              "slightly higher for customised base models). The head is always swapped."}),
        }}

    def load(self, model, adapter_name, strength):
        shape = flux_shape_of(model)
        state_dict, metadata = read_adapter_file(adapter_name)
        try:
            adapter = piflow_adapter.parse_piflow_adapter(state_dict, metadata, shape.latent_channels, shape.patch_size)
            head_state = piflow_adapter.flux_head_state_dict(adapter, shape)
        except ValueError as exc:
            raise StrideError(f"adapter_name: '{adapter_name}': {exc}") from None
        patches = lora_patches(model, adapter, shape, adapter_name)
        head = FluxPolicyHead(head_state, adapter, shape.hidden_size)
        patched = model.clone()
        patched.add_patches(patches, strength)
        patched.add_object_patch(HEAD_PATCH, head)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, PolicyCapture(head))
        return (patched,)


NODE_CLASS_MAPPINGS = {"StridePiFlowAdapterLoader": StridePiFlowAdapterLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"StridePiFlowAdapterLoader": "Stride pi-Flow Adapter Loader"}
