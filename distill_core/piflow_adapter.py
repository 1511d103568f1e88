"""The released pi-Flow adapters (pi-FLUX.1, pi-Qwen-Image, pi-FLUX.2) and their mapping onto
ComfyUI's FLUX.1, Qwen-Image and FLUX.2 transformers.

Facts, checked against the official code (Lakonik/piFlow: the export script, the GM/DX
model classes and their configs; Lakonik/ComfyUI-piFlow up to v1.3: its loaders):

* File: one safetensors file, written by the official export from the EMA student's
  trainable parameters under diffusers module names (the loaders also accept a
  ``transformer.`` prefix). Keys containing ``lora`` are LoRA, everything else overwrites
  the base model (the output head). Metadata ``policy_config`` (JSON) holds the policy's
  type and settings: ``{"type": "GMFlow"}`` or ``{"type": "DX", "segment_size": 1/3.5,
  "shift": 3.2}`` (grid mode); the experimental ``{"type": "DX", "mode": "polynomial",
  "shift": 3.2}`` (dxqwen_p10 config) has no segment size and no released file.
* LoRA: peft layout ``<module>.lora_A.weight`` (rank, in) and ``<module>.lora_B.weight``
  (out, rank), no alpha tensor; trained with alpha = rank and loaded by diffusers as
  alpha = rank, so the scale is 1. Rank 256 in all published configs. Targets (peft suffix
  match over the diffusers module names):

  - pi-FLUX.1 (GM and DX): ``ff.net.{0.proj,2}`` and ``ff_context.net.{0.proj,2}`` of the 19
    double blocks, ``proj_mlp`` and ``proj_out`` of the 38 single blocks,
    ``time_text_embed.timestep_embedder.linear_{1,2}`` (154 modules).
  - pi-Qwen-Image (GM and DX): ``img_mlp.net.{0.proj,2}`` of all 60 blocks,
    ``txt_mlp.net.{0.proj,2}`` of blocks 0-58 (the last block's text stream is unused),
    ``time_text_embed.timestep_embedder.linear_{1,2}`` (240 modules).
  - pi-FLUX.2 (GM only): the official repository has no FLUX.2 training config, so its
    targets are NOT confirmed; every Linear layer of diffusers' ``Flux2Transformer2DModel``
    is mapped (the official diffusers pipeline applies any of them; the official ComfyUI
    node only those ComfyUI's own FLUX key map names).

* Output head (replaces the base model's ``norm_out`` + ``proj_out``), hidden size h, patch p=2,
  C latent channels of the policy's latent (16 for FLUX.1 and Qwen-Image, 32 for FLUX.2):
  ``norm_out.linear`` (2h, h), diffusers order scale|shift, with a bias except on FLUX.2;
  GM: ``proj_out_means`` (K C p p, h) rows ordered (k, c, p_y, p_x), ``proj_out_logweights``
  (K p p, h) rows (k, p_y, p_x), softmax over k per sub-position, and the log-std MLP
  ``proj_out_logstds.{1,3}`` (h -> 1024 -> 1, SiLU before each Linear) fed the timestep
  conditioning vector (FLUX: time + guidance (+ pooled text) embedding; Qwen: time
  embedding); all with biases, K = 8 released. DX: ``proj_out`` (N C p p, h) with bias,
  rows (n, c, p_y, p_x), N = 10 released; grid entry N-1 belongs to the source time
  (polynomial mode: term 0, the constant).
* Tokens: row-major over the (H/p, W/p) patch grid. FLUX.1 and Qwen-Image patchify their
  16-channel latents with p = 2 themselves. ComfyUI's FLUX.2 latent has 128 channels at
  patch 1: it is the 32-channel latent with each 2x2 patch folded into channels in
  (c, p_y, p_x) order, and the official pipeline runs the policy on the unfolded 32-channel
  latent (:func:`packing_factor` recognises the folding; ``distill_core.sampling.piflow.PackedLatentPolicy``
  runs such a policy on the folded latent).

Nothing here imports ComfyUI; which ComfyUI weight each diffusers layer lives in is ComfyUI knowledge and
lives in the node layer (``nodes/piflow_families.py``).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .sampling.piflow import DX_GRID, DX_MODES

GM_POLICY = "GMFlow"
DX_POLICY = "DX"
_PREFIX = "transformer."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_GM_HEAD = ("proj_out_means.weight", "proj_out_logweights.weight")
_HEAD_MODULE = re.compile(r"norm_out\.linear|proj_out|proj_out_means|proj_out_logweights|proj_out_logstds\.\d+")
_FOREIGN_PREFIXES = ("diffusion_model.", "lora_unet_", "lora_te", "model.diffusion_model.", "base_model.model.")


@dataclass(frozen=True)
class PiFlowAdapter:
    """A parsed adapter: policy settings, LoRA pairs and output-head tensors (diffusers names)."""

    policy_type: str  # GM_POLICY or DX_POLICY
    policy_config: dict  # DX: segment_size, shift
    lora: dict[str, tuple[Tensor, Tensor]]  # module -> (down = lora_A, up = lora_B)
    head: dict[str, Tensor]  # e.g. "proj_out_means.weight" -> tensor
    num_components: int  # K mixture components (GM) or N grid points (DX)
    latent_channels: int  # channels of the latent the policy lives on
    patch_size: int

    @property
    def hidden_size(self) -> int:
        return self.head["norm_out.linear.weight"].shape[1]

    @property
    def token_channels(self) -> int:
        """Values per token of one component's (or grid point's) output."""
        return self.latent_channels * self.patch_size**2


def split_adapter_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(lora, head)`` key groups by the official rule (``lora`` in the key), ``transformer.`` removed."""
    lora: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
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

    ``latent_channels`` and ``patch_size`` describe the latent the policy lives on (16 and 2
    for FLUX.1 and Qwen-Image, 32 and 2 for FLUX.2, see :class:`ModelFamily`): the heads
    have one row per component (or grid point), latent channel and sub-patch position.
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
    unexpected = [key for key in head if not _HEAD_MODULE.fullmatch(key.rsplit(".", 1)[0])
                  or (policy_type == GM_POLICY and key.startswith("proj_out."))]
    if unexpected:
        raise ValueError(f"unexpected non-LoRA key {sorted(unexpected)[0]!r} in the adapter: a pi-Flow head has "
                         "only norm_out.linear, proj_out_means, proj_out_logweights, proj_out_logstds (GM) "
                         "or proj_out (DX)")
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
    if config.get("mode", DX_GRID) not in DX_MODES:
        raise ValueError(f"DX policy mode {config['mode']!r} is not supported (only {', '.join(DX_MODES)})")
    if config.get("mode", DX_GRID) == DX_GRID and "segment_size" not in config:
        raise ValueError("DX adapter without its policy settings: the safetensors metadata "
                         "'policy_config' must give 'segment_size' (and 'shift'), as the official "
                         "export writes them")
    weight = head["proj_out.weight"]
    if weight.ndim != 2 or weight.shape[1] != hidden or weight.shape[0] % token_channels:
        raise ValueError(f"DX head 'proj_out.weight' has shape {tuple(weight.shape)}; expected "
                         f"(N * {token_channels}, {hidden}) for {token_channels} latent channels per token")
    return weight.shape[0] // token_channels


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


# -- the policy latent inside the sampler's latent (FLUX.2) ----------------------------------------
def packing_factor(policy_latent: Sequence[int], latent: Sequence[int]) -> int:
    """``r`` if the image latent ``latent`` (C r r, H, W) is ``policy_latent`` (C, H r, W r) with each r x r
    patch folded into channels (``pixel_unshuffle``), 1 if they are equal, 0 if they are unrelated."""
    policy_latent, latent = tuple(policy_latent), tuple(latent)
    if policy_latent == latent:
        return 1
    if len(policy_latent) != 3 or len(latent) != 3 or latent[-1] == 0 or policy_latent[-1] % latent[-1]:
        return 0
    factor = policy_latent[-1] // latent[-1]
    folded = (policy_latent[0] * factor * factor, policy_latent[1] // factor, latent[-1])
    return factor if factor > 1 and policy_latent[1] % factor == 0 and folded == latent else 0
