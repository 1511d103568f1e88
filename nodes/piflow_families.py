"""Where the LoRA layers of released pi-Flow adapters live in ComfyUI's FLUX.1, FLUX.2 and Qwen-Image models.

The adapters name diffusers modules (:mod:`distill_core.piflow_adapter` parses them); ComfyUI fuses some of
those layers (FLUX's q|k|v, single blocks' q|k|v|mlp) and renames others. One :class:`ModelFamily` per base
model maps every diffusers Linear onto a ComfyUI weight key and row slice; the tests check the maps against
ComfyUI's own ``flux_to_diffusers`` key map and diffusers' official converters, full size on the meta device.

This module is plain data and regular expressions: it imports neither ComfyUI nor the rest of the package at
run time (type names only), so the unit tests load it by its file path without a host.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

if TYPE_CHECKING:
    from ..distill_core.piflow_adapter import PiFlowAdapter

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class LoraRule:
    """A diffusers Linear (regex over module names) and the ComfyUI weight it lives in.

    ``target`` is a ``re`` expansion template for the ComfyUI module; ``rows`` selects the
    part of a fused ComfyUI weight: ``None`` (all of it), ``0``/``1``/``2`` (q, k or v of a
    q|k|v fusion, each ``in_features`` rows) or ``"mlp"`` (what follows q|k|v).
    """

    pattern: str
    target: str
    rows: int | Literal["mlp"] | None = None


def _qkv(pattern: str, target: str, names: Sequence[str] = QKV) -> tuple[LoraRule, ...]:
    """Rules for q, k and v projections fused in one ComfyUI weight (``{}`` in ``pattern`` = the name)."""
    return tuple(LoraRule(pattern.format(name), target, index) for index, name in enumerate(names))


@dataclass(frozen=True)
class ComfyTarget:
    """Where a diffusers Linear lives in a ComfyUI model: weight key and row slice ``(offset, size)``."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """A base-model family with released pi-Flow adapters: its policy latent and LoRA layer names."""

    name: str
    adapters: str  # the official release, for messages
    latent_channels: int  # channels of the latent the policy lives on
    rules: tuple[LoraRule, ...]
    patch_size: int = 2

    def rule_for(self, module: str) -> tuple[LoraRule, re.Match] | None:
        for rule in self.rules:
            match = re.fullmatch(rule.pattern, module)
            if match:
                return rule, match
        return None

    def comfy_target(self, module: str, weight_shapes: Mapping[str, Sequence[int]]) -> ComfyTarget:
        """The ComfyUI weight (and rows) of the diffusers Linear ``module``; ``ValueError`` if there is none."""
        found = self.rule_for(module)
        if found is None:
            raise ValueError(f"{module!r} is not a Linear layer of a {self.name} transformer")
        rule, match = found
        key = match.expand(rule.target) + ".weight"
        if key not in weight_shapes:
            raise ValueError(f"{module!r} has no counterpart in this {self.name} model (no {key!r}; fewer blocks?)")
        out_features, in_features = weight_shapes[key][:2]
        if rule.rows is None:
            return ComfyTarget(key)
        if rule.rows == "mlp":
            return ComfyTarget(key, (3 * in_features, out_features - 3 * in_features))
        return ComfyTarget(key, (rule.rows * in_features, in_features))


_FLUX_COMMON = (
    *_qkv(r"transformer_blocks\.(\d+)\.attn\.to_{}", r"double_blocks.\1.img_attn.qkv"),
    *_qkv(r"transformer_blocks\.(\d+)\.attn\.add_{}_proj", r"double_blocks.\1.txt_attn.qkv"),
    LoraRule(r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    LoraRule(r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    LoraRule(r"x_embedder", "img_in"),
    LoraRule(r"context_embedder", "txt_in"),
)
FLUX1 = ModelFamily("FLUX.1", "Lakonik/pi-FLUX.1: gmflux_k8_piid_4step, gmflux_k8_piid_8step, dxflux_n10_piid_4step",
                    16, (
    *_FLUX_COMMON,
    LoraRule(r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin"),
    LoraRule(r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2"),
    *_qkv(r"single_transformer_blocks\.(\d+)\.attn\.to_{}", r"single_blocks.\1.linear1"),
    LoraRule(r"single_transformer_blocks\.(\d+)\.proj_mlp", r"single_blocks.\1.linear1", "mlp"),
    LoraRule(r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2"),
    LoraRule(r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin"),
    LoraRule(r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    LoraRule(r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    LoraRule(r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    LoraRule(r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
    LoraRule(r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
    LoraRule(r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
))
FLUX2 = ModelFamily("FLUX.2", "Lakonik/pi-FLUX.2: gmflux2_k8_piid_4step", 32, (
    *_FLUX_COMMON,
    LoraRule(r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0"),
    LoraRule(r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2"),
    LoraRule(r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1"),
    LoraRule(r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2"),
    LoraRule(r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear",
             r"\1.lin"),
    LoraRule(r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    LoraRule(r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    LoraRule(r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    LoraRule(r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
))
# ComfyUI's Qwen-Image keeps diffusers' module names.
QWEN_IMAGE = ModelFamily("Qwen-Image", "Lakonik/pi-Qwen-Image: gmqwen_k8_piid_4step, dxqwen_n10_piid_4step", 16, (
    LoraRule(r"(transformer_blocks\.\d+\.(?:img_mod\.1|txt_mod\.1|(?:img|txt)_mlp\.net\.(?:0\.proj|2)|"
             r"attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)))", r"\1"),
    LoraRule(r"(img_in|txt_in|time_text_embed\.timestep_embedder\.linear_[12])", r"\1"),
))
FAMILIES = (FLUX1, FLUX2, QWEN_IMAGE)


def families_of(modules: Iterable[str]) -> list[ModelFamily]:
    """The families whose architecture has every one of these LoRA layers (all families for none)."""
    modules = list(modules)
    return [family for family in FAMILIES if all(family.rule_for(module) for module in modules)]


def lora_targets(adapter: PiFlowAdapter, family: ModelFamily,
                 weight_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[ComfyTarget, Tensor, Tensor]]:
    """Each LoRA module -> (its ComfyUI target, down, up), shapes checked against ``weight_shapes``
    (ComfyUI weight key of the diffusion model -> shape). Layers the head replaces are refused."""
    targets, problems = {}, []
    for module, (down, up) in adapter.lora.items():
        try:
            target = family.comfy_target(module, weight_shapes)
        except ValueError as error:
            problems.append(str(error))
            continue
        out_features, in_features = weight_shapes[target.key][:2]
        rows = target.rows[1] if target.rows else out_features
        if down.shape[1] != in_features or up.shape[0] != rows:
            problems.append(f"LoRA {module!r}: lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} do not fit "
                            f"its ({rows} x {in_features}) layer in this model, so the adapter is for another model")
        else:
            targets[module] = (target, down, up)
    if problems:
        raise ValueError(f"the adapter does not fit this {family.name} model: " + "; ".join(problems[:3])
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return targets


def check_head(adapter: PiFlowAdapter, family: ModelFamily, hidden_size: int, token_width: int) -> None:
    """The head must match the model's hidden size and its final layer's values per token."""
    modulation = adapter.head["norm_out.linear.weight"]
    if tuple(modulation.shape) != (2 * hidden_size, hidden_size):
        raise ValueError(f"the adapter's 'norm_out.linear.weight' is {tuple(modulation.shape)}, but this {family.name} "
                         f"model needs ({2 * hidden_size}, {hidden_size}): the adapter is for another model")
    if adapter.token_channels != token_width:
        raise ValueError(f"the adapter's head makes {adapter.token_channels} values per token, this {family.name} "
                         f"model's final layer {token_width}: the adapter is for another model")
