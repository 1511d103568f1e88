"""Conditioning trees: a tensor, or a dict / list / tuple of tensors (batch first), as hosts pass them."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
"""``denoiser(x, sigma, cond) -> x0`` (ComfyUI's ``BaseModel.apply_model`` has this shape)."""
Cond = Any  # a tensor, or a dict / list / tuple of tensors, batch first (other leaves pass through)


def _cond_map(fn: Callable[..., Tensor], *conds: Cond) -> Cond:
    """Apply ``fn`` to the tensors at the same place in each tree; other leaves come from the first tree."""
    first = conds[0]
    if isinstance(first, Tensor):
        return fn(*conds)
    if isinstance(first, dict):
        return {key: _cond_map(fn, *(cond[key] for cond in conds)) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cond_map(fn, *items) for items in zip(*conds, strict=True))
    return first


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension (shapes must agree beyond it)."""
    def cat(*tensors: Tensor) -> Tensor:
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            raise ValueError("conditionings must share their shape beyond the batch to be batched together, got "
                             f"{sorted(shapes)}")
        return torch.cat(tensors)
    return _cond_map(cat, *conds)


def cond_where(mask: Tensor, replacement: Cond, cond: Cond) -> Cond:
    """Per sample, ``replacement`` where ``mask`` is true, else ``cond`` (the empty-prompt substitution)."""
    def where(new: Tensor, old: Tensor) -> Tensor:
        if new.shape != old.shape:
            raise ValueError(f"empty-prompt substitution needs cond and uncond of equal shape, got "
                             f"{tuple(old.shape)} and {tuple(new.shape)}")
        return torch.where(mask.to(old.device).reshape(-1, *([1] * (old.ndim - 1))), new, old)
    return _cond_map(where, replacement, cond)


def cond_tensors(cond: Cond) -> list[Tensor]:
    """The tensors of a conditioning tree, depth first (dict keys sorted)."""
    return [tensor for _, tensor in named_cond_tensors(cond)]


def named_cond_tensors(cond: Cond, path: str = "") -> list[tuple[str, Tensor]]:
    """The tensors of a conditioning tree with their paths (``.key`` / ``.index``), in a fixed order."""
    if isinstance(cond, Tensor):
        return [(path, cond)]
    if isinstance(cond, dict):
        return [item for key in sorted(cond) for item in named_cond_tensors(cond[key], f"{path}.{key}")]
    if isinstance(cond, (list, tuple)):
        return [item for index, value in enumerate(cond) for item in named_cond_tensors(value, f"{path}.{index}")]
    return []


def cond_to(cond: Cond, device: torch.device) -> Cond:
    """A private copy on ``device``: host tensors may be inference tensors autograd cannot save."""
    with torch.inference_mode(False):
        return _cond_map(lambda t: t.to(device, copy=True), cond)
