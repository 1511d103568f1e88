"""The released pi-Flow adapter files (pi-FLUX.1, pi-Qwen-Image, pi-FLUX.2) and their mapping
onto ComfyUI's Flux modules.

A released adapter is one safetensors file written by the official export script: the
student's trainable parameters under diffusers module names (an optional ``transformer.``
prefix is tolerated), in two groups, split by the official rule "the key contains ``lora``":

* LoRA: ``<module>.lora_A.weight`` (rank, in) and ``<module>.lora_B.weight`` (out, rank),
  peft layout, no alpha (trained with alpha = rank, so the scale is 1). pi-FLUX.1 targets
  ``transformer_blocks.*.ff{,_context}.net.{0.proj,2}``, ``single_transformer_blocks.*.proj_mlp``,
  ``single_transformer_blocks.*.proj_out`` and ``time_text_embed.timestep_embedder.linear_{1,2}``.
* The output head, replacing the base model's final layer: ``norm_out.linear.*`` (adaLN
  modulation, diffusers order scale|shift) and either the GM heads ``proj_out_means``
  (K * C * p * p, hidden), ``proj_out_logweights`` (K * p * p, hidden) and the MLP
  ``proj_out_logstds.{1,3}`` (hidden -> 1024 -> 1, fed the conditioning vector), or the DX
  head ``proj_out`` (N * C * p * p, hidden).

The safetensors metadata ``policy_config`` (JSON) names the policy: ``{"type": "GMFlow"}``
or ``{"type": "DX", "segment_size": 1/3.5, "shift": 3.2}``. Nothing here imports ComfyUI:
the mapping to ComfyUI names is written out for the FLUX.1 architecture.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

GM_POLICY = "GMFlow"
DX_POLICY = "DX"
_PREFIX = "transformer."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_GM_HEAD = ("proj_out_means.weight", "proj_out_logweights.weight")
_FOREIGN_PREFIXES = ("diffusion_model.", "lora_unet_", "lora_te", "model.diffusion_model.", "base_model.model.")


@dataclass(frozen=True)
class PiFlowAdapter:
    """A parsed adapter: policy settings, LoRA pairs and output-head tensors (diffusers names)."""

    policy_type: str  # GM_POLICY or DX_POLICY
    policy_config: dict  # DX: segment_size, shift
    lora: dict[str, tuple[Tensor, Tensor]]  # module -> (down = lora_A, up = lora_B)
    head: dict[str, Tensor]  # e.g. "proj_out_means.weight" -> tensor
    num_components: int  # K mixture components (GM) or N grid points (DX)
    latent_channels: int
    patch_size: int


def split_adapter_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(lora, head)`` key groups by the official rule (``lora`` in the key), ``transformer.`` removed."""
    lora, head = {}, {}
    for key, value in state_dict.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        (lora if "lora" in name else head)[name] = value
    return lora, head


def _lora_pairs(lora: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in lora.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"unexpected LoRA key {key!r}: pi-Flow adapters store '<module>.lora_A.weight' "
                             "and '<module>.lora_B.weight' (peft layout)")
        modules.setdefault(key[: -len(suffix)], {})[suffix] = value
    pairs = {}
    for module, parts in sorted(modules.items()):
        if len(parts) != 2:
            missing = next(s for s in _LORA_SUFFIXES if s not in parts)
            raise ValueError(f"LoRA for {module!r} is incomplete: {module}{missing} is missing")
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"LoRA for {module!r} has mismatched shapes: lora_A {tuple(down.shape)}, "
                             f"lora_B {tuple(up.shape)} (expected (rank, in) and (out, rank))")
        pairs[module] = (down, up)
    return pairs


def _policy_config(metadata: Mapping[str, str] | None) -> dict:
    if not metadata or "policy_config" not in metadata:
        return {}
    try:
        config = json.loads(metadata["policy_config"])
    except json.JSONDecodeError as error:
        raise ValueError(f"the adapter's 'policy_config' metadata is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"the adapter's 'policy_config' metadata must be a JSON object, got {config!r}")
    return config


def parse_piflow_adapter(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
                         latent_channels: int = 16, patch_size: int = 2) -> PiFlowAdapter:
    """Check that a state dict is a pi-Flow adapter and parse it; ``ValueError`` explains what is wrong.

    ``latent_channels`` and ``patch_size`` describe the base model's latents and tokens
    (16 and 2 for FLUX.1 and Qwen-Image): the heads have one row per component (or grid
    point), latent channel and sub-patch position.
    """
    if not state_dict:
        raise ValueError("the file is empty: a pi-Flow adapter holds LoRA weights and an output head")
    foreign = [key for key in state_dict if key.startswith(_FOREIGN_PREFIXES)]
    if foreign:
        raise ValueError(f"this is not a pi-Flow adapter: key {foreign[0]!r} uses a ComfyUI/kohya/peft "
                         "model layout; pi-Flow adapters use diffusers module names such as "
                         "'proj_out_means.weight' and 'transformer_blocks.0.ff.net.2.lora_A.weight'")
    lora_keys, head = split_adapter_state_dict(state_dict)
    config = _policy_config(metadata)
    if all(name in head for name in _GM_HEAD):
        inferred = GM_POLICY
    elif "proj_out.weight" in head:
        inferred = DX_POLICY
    elif not head:
        raise ValueError("this is a plain LoRA, not a pi-Flow adapter: it has no output-head weights "
                         "(proj_out_means / proj_out_logweights or proj_out); load it with a LoRA loader")
    else:
        raise ValueError("this is not a pi-Flow adapter: no GM head (proj_out_means.weight and "
                         "proj_out_logweights.weight) and no DX head (proj_out.weight); "
                         f"non-LoRA keys found: {sorted(head)[:5]}")
    policy_type = config.pop("type", inferred)
    if policy_type != inferred:
        raise ValueError(f"the adapter's metadata says policy {policy_type!r} but its weights hold a "
                         f"{inferred!r} head")
    if "norm_out.linear.weight" not in head:
        raise ValueError("the adapter's output head is incomplete: 'norm_out.linear.weight' is missing")
    hidden = head["norm_out.linear.weight"].shape[1]
    token_channels = latent_channels * patch_size * patch_size
    if policy_type == GM_POLICY:
        num_components = _check_gm_head(head, hidden, token_channels, patch_size)
    else:
        num_components = _check_dx_head(head, hidden, token_channels, config)
    return PiFlowAdapter(policy_type, config, _lora_pairs(lora_keys), head, num_components,
                         latent_channels, patch_size)


def _check_gm_head(head: Mapping[str, Tensor], hidden: int, token_channels: int, patch_size: int) -> int:
    logweights = head["proj_out_logweights.weight"]
    means = head["proj_out_means.weight"]
    positions = patch_size * patch_size
    if logweights.ndim != 2 or logweights.shape[1] != hidden or logweights.shape[0] % positions:
        raise ValueError(f"GM head 'proj_out_logweights.weight' has shape {tuple(logweights.shape)}; expected "
                         f"(K * {positions}, {hidden}) for patch size {patch_size}")
    num_components = logweights.shape[0] // positions
    if tuple(means.shape) != (num_components * token_channels, hidden):
        raise ValueError(f"GM head 'proj_out_means.weight' has shape {tuple(means.shape)}; expected "
                         f"({num_components * token_channels}, {hidden}) for K = {num_components} and "
                         f"{token_channels} latent channels per token")
    layers = sorted((key for key in head if re.fullmatch(r"proj_out_logstds\.\d+\.weight", key)),
                    key=lambda key: int(key.split(".")[1]))
    if not layers:
        raise ValueError("GM head has no log-std layers ('proj_out_logstds.<i>.weight')")
    width = hidden
    for key in layers:
        if head[key].ndim != 2 or head[key].shape[1] != width:
            raise ValueError(f"GM head {key!r} has shape {tuple(head[key].shape)}; expected (*, {width})")
        width = head[key].shape[0]
    if width != 1:
        raise ValueError(f"GM head's last log-std layer {layers[-1]!r} must output 1 value, got {width}")
    return num_components


def _check_dx_head(head: Mapping[str, Tensor], hidden: int, token_channels: int, config: Mapping) -> int:
    if "segment_size" not in config:
        raise ValueError("DX adapter without its policy settings: the safetensors metadata "
                         "'policy_config' must give 'segment_size' (and 'shift'), as the official "
                         "export writes them")
    if config.get("mode", "grid") != "grid":
        raise ValueError(f"DX policy mode {config['mode']!r} is not supported (only 'grid')")
    weight = head["proj_out.weight"]
    if weight.ndim != 2 or weight.shape[1] != hidden or weight.shape[0] % token_channels:
        raise ValueError(f"DX head 'proj_out.weight' has shape {tuple(weight.shape)}; expected "
                         f"(N * {token_channels}, {hidden}) for {token_channels} latent channels per token")
    return weight.shape[0] // token_channels


# -- FLUX.1 layout in ComfyUI -------------------------------------------------------------------
@dataclass(frozen=True)
class FluxShape:
    """Dimensions of a FLUX.1-family transformer (defaults: FLUX.1-dev)."""

    hidden_size: int = 3072
    depth: int = 19
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    latent_channels: int = 16
    patch_size: int = 2
    context_in_dim: int = 4096
    vec_in_dim: int = 768

    @classmethod
    def from_unet_config(cls, config: Mapping) -> "FluxShape":
        """From a ComfyUI Flux ``unet_config`` (the keyword arguments of ``comfy.ldm.flux.model.Flux``)."""
        return cls(config["hidden_size"], config["depth"], config["depth_single_blocks"], config["mlp_ratio"],
                   config["out_channels"], config["patch_size"], config["context_in_dim"], config["vec_in_dim"])

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class ComfyTarget:
    """Where a diffusers Linear lives in ComfyUI's Flux: weight key, fused row slice, in/out sizes.

    ``rows`` is ``(offset, size)`` inside a fused weight (ComfyUI's q|k|v and q|k|v|mlp
    projections); ``swap_halves`` marks ``norm_out.linear`` whose two output halves are in
    the opposite order (diffusers scale|shift, ComfyUI shift|scale).
    """

    key: str
    in_features: int
    out_features: int
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def flux_comfy_target(module: str, shape: FluxShape = FluxShape()) -> ComfyTarget:
    """The ComfyUI Flux weight a diffusers ``FluxTransformer2DModel`` Linear maps to.

    Raises ``ValueError`` for module names that are not Linear layers of that architecture.
    """
    size, mlp = shape.hidden_size, shape.mlp_hidden
    tokens_out = shape.latent_channels * shape.patch_size**2
    qkv = {"to_q": 0, "to_k": 1, "to_v": 2}
    double = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if double and int(double.group(1)) < shape.depth:
        block, rest = f"double_blocks.{double.group(1)}.", double.group(2)
        fused = {f"attn.{name}": ("img_attn.qkv", i) for name, i in qkv.items()}
        fused.update({f"attn.add_{name[3:]}_proj": ("txt_attn.qkv", i) for name, i in qkv.items()})
        if rest in fused:
            target, index = fused[rest]
            return ComfyTarget(f"{block}{target}.weight", size, size, (index * size, size))
        simple = {"attn.to_out.0": ("img_attn.proj", size, size), "attn.to_add_out": ("txt_attn.proj", size, size),
                  "norm1.linear": ("img_mod.lin", size, 6 * size), "norm1_context.linear": ("txt_mod.lin", size, 6 * size),
                  "ff.net.0.proj": ("img_mlp.0", size, mlp), "ff.net.2": ("img_mlp.2", mlp, size),
                  "ff_context.net.0.proj": ("txt_mlp.0", size, mlp), "ff_context.net.2": ("txt_mlp.2", mlp, size)}
        if rest in simple:
            target, fan_in, fan_out = simple[rest]
            return ComfyTarget(f"{block}{target}.weight", fan_in, fan_out)
    single = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if single and int(single.group(1)) < shape.depth_single_blocks:
        block, rest = f"single_blocks.{single.group(1)}.", single.group(2)
        if rest.startswith("attn.") and rest[5:] in qkv:
            return ComfyTarget(f"{block}linear1.weight", size, size, (qkv[rest[5:]] * size, size))
        simple = {"proj_mlp": ("linear1", size, mlp, (3 * size, mlp)), "proj_out": ("linear2", size + mlp, size, None),
                  "norm.linear": ("modulation.lin", size, 3 * size, None)}
        if rest in simple:
            target, fan_in, fan_out, rows = simple[rest]
            return ComfyTarget(f"{block}{target}.weight", fan_in, fan_out, rows)
    root = {"x_embedder": ("img_in", tokens_out, size), "context_embedder": ("txt_in", shape.context_in_dim, size),
            "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 256, size),
            "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", size, size),
            "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 256, size),
            "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", size, size),
            "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", shape.vec_in_dim, size),
            "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", size, size),
            "proj_out": ("final_layer.linear", size, tokens_out)}
    if module in root:
        target, fan_in, fan_out = root[module]
        return ComfyTarget(f"{target}.weight", fan_in, fan_out)
    if module == "norm_out.linear":
        return ComfyTarget("final_layer.adaLN_modulation.1.weight", size, 2 * size, swap_halves=True)
    raise ValueError(f"{module!r} is not a Linear layer of a FLUX.1 transformer with {shape.depth} double "
                     f"and {shape.depth_single_blocks} single blocks")


def flux_lora_targets(adapter: PiFlowAdapter, shape: FluxShape = FluxShape()) -> dict[str, tuple[ComfyTarget, Tensor, Tensor]]:
    """Each LoRA module -> (its ComfyUI target, down, up), shapes checked against ``shape``.

    ``norm_out.linear`` is part of the head, never a LoRA target here.
    """
    targets, problems = {}, []
    for module, (down, up) in adapter.lora.items():
        try:
            target = flux_comfy_target(module, shape)
        except ValueError as error:
            problems.append(str(error))
            continue
        if module == "norm_out.linear":
            problems.append("a LoRA on 'norm_out.linear' is not supported (the head replaces that layer)")
        elif down.shape[1] != target.in_features or up.shape[0] != target.out_features:
            problems.append(f"LoRA {module!r}: lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} do not fit "
                            f"a ({target.out_features} x {target.in_features}) layer")
        else:
            targets[module] = (target, down, up)
    if problems:
        raise ValueError("the adapter does not fit this FLUX model: " + "; ".join(problems[:3])
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return targets


def flux_head_state_dict(adapter: PiFlowAdapter, shape: FluxShape = FluxShape()) -> dict[str, Tensor]:
    """The output head in ComfyUI naming, checked against ``shape``.

    ``norm_out.linear`` becomes ``final_layer.adaLN_modulation.1`` (halves swapped to
    shift|scale); a DX ``proj_out`` becomes ``final_layer.linear``; the GM heads keep their
    names (``proj_out_means``, ``proj_out_logweights``, ``proj_out_logstds.<i>``), as in the
    official ComfyUI-piFlow model, where they sit on the diffusion model's root.
    """
    size = shape.hidden_size
    modulation = adapter.head["norm_out.linear.weight"]
    if tuple(modulation.shape) != (2 * size, size):
        raise ValueError(f"the adapter's 'norm_out.linear.weight' is {tuple(modulation.shape)}, but this FLUX "
                         f"model needs ({2 * size}, {size}): the adapter is for another model")
    if (adapter.latent_channels, adapter.patch_size) != (shape.latent_channels, shape.patch_size):
        raise ValueError(f"the adapter was parsed for {adapter.latent_channels} latent channels and patch "
                         f"{adapter.patch_size}, this FLUX model has {shape.latent_channels} and {shape.patch_size}")
    converted = {}
    for key, value in adapter.head.items():
        module, parameter = key.rsplit(".", 1)
        if module == "norm_out.linear":
            half = value.shape[0] // 2
            converted[f"final_layer.adaLN_modulation.1.{parameter}"] = torch.cat([value[half:], value[:half]])
        elif module == "proj_out":
            converted[f"final_layer.linear.{parameter}"] = value
        elif re.fullmatch(r"proj_out_(means|logweights|logstds\.\d+)", module):
            converted[key] = value
        else:
            raise ValueError(f"unexpected non-LoRA key {key!r} in the adapter: a pi-FLUX.1 head has only "
                             "norm_out.linear, proj_out_means, proj_out_logweights, proj_out_logstds (GM) "
                             "or proj_out (DX)")
    return converted


# -- head output -> policy tensors ------------------------------------------------------------
def unpack_gm_tokens(means: Tensor, logweights: Tensor, logstds: Tensor, height: int, width: int,
                     patch_size: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Token outputs of the GM heads -> ``(means, logweights, logstds)`` in the policy layout.

    ``means`` (B, h*w, K*C*p*p) rows ordered (K, C, p_y, p_x); ``logweights`` (B, h*w, K*p*p)
    ordered (K, p_y, p_x); ``logstds`` (B, 1) or (B,). Tokens are row-major over the
    (height/p, width/p) patch grid, as ComfyUI's and diffusers' Flux pack them. Returns
    velocity means (B, K, C, H, W), normalised log-weights (B, K, 1, H, W), logstds (B, 1, 1, 1, 1).
    """
    batch, tokens, _ = means.shape
    rows, cols = height // patch_size, width // patch_size
    if tokens != rows * cols:
        raise ValueError(f"{tokens} tokens do not tile a {height}x{width} latent with patch {patch_size}")
    components = logweights.shape[-1] // (patch_size * patch_size)

    def to_image(tokens_out: Tensor, channels: int) -> Tensor:
        grid = tokens_out.reshape(batch, rows, cols, components, channels, patch_size, patch_size)
        return grid.permute(0, 3, 4, 1, 5, 2, 6).reshape(batch, components, channels, height, width)

    channels = means.shape[-1] // (components * patch_size * patch_size)
    return (to_image(means, channels), to_image(logweights, 1).log_softmax(dim=1),
            logstds.reshape(batch, 1, 1, 1, 1))


def unpack_dx_tokens(tokens_out: Tensor, grid_size: int, height: int, width: int,
                     patch_size: int = 2) -> Tensor:
    """Token outputs of the DX head (B, h*w, N*C*p*p), rows ordered (N, C, p_y, p_x) ->
    velocities (B, N, C, H, W) for :meth:`DXPolicy.from_velocity`."""
    batch, tokens, features = tokens_out.shape
    rows, cols = height // patch_size, width // patch_size
    if tokens != rows * cols:
        raise ValueError(f"{tokens} tokens do not tile a {height}x{width} latent with patch {patch_size}")
    channels = features // (grid_size * patch_size * patch_size)
    grid = tokens_out.reshape(batch, rows, cols, grid_size, channels, patch_size, patch_size)
    return grid.permute(0, 3, 4, 1, 5, 2, 6).reshape(batch, grid_size, channels, height, width)
