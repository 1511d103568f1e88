"""Memory helpers for training on a shared host model: frozen base weights, gradient checkpointing."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Stop gradients into the base weights inside the block; the flags are restored after."""
    flags = [(param, param.requires_grad) for param in module.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def checkpoint_blocks(module: nn.Module) -> list[nn.Module]:
    """The highest submodules with their own ``forward`` below ``module`` (containers are opened)."""
    blocks = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or type(child) is nn.Sequential:
            blocks.extend(checkpoint_blocks(child))
        else:
            blocks.append(child)
    return blocks


@contextlib.contextmanager
def gradient_checkpointing(module: nn.Module) -> Iterator[None]:
    """Recompute each top-level block in backward instead of storing its activations.

    Each block's ``forward`` is wrapped while the block is active and restored on exit; under
    ``no_grad`` (teacher and target passes) blocks run unwrapped.
    """
    patched = []
    for block in checkpoint_blocks(module):
        original = block.forward
        had_instance_forward = "forward" in block.__dict__

        def checkpointed(*args: Any, _forward: Callable = original, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        patched.append((block, original, had_instance_forward))
    try:
        yield
    finally:
        for block, original, had_instance_forward in patched:
            if had_instance_forward:
                block.forward = original
            else:
                del block.forward
