"""``torch.distributed`` helpers of the training loop (a no-op world of one without a process group)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One flat vector of ``tensors`` (one collective call instead of one per tensor)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy a :func:`flatten` vector back into ``tensors`` in place."""
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def _staged(tensor: Tensor) -> Tensor:
    """``tensor`` where the backend can reduce it: gloo works on CPU tensors, other backends on the tensor's device."""
    return tensor.cpu() if dist.get_backend() == "gloo" else tensor


def all_reduce_mean(tensor: Tensor, world_size: int) -> Tensor:
    """Mean of ``tensor`` over ranks, on ``tensor``'s device."""
    if world_size == 1:
        return tensor
    staged = _staged(tensor)
    dist.all_reduce(staged)
    return (staged / world_size).to(tensor.device)


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop together); ``device`` is the rank's own."""
    if world_size == 1:
        return flag
    value = _staged(torch.tensor([1.0 if flag else 0.0], device=device))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def broadcast_from_rank0(tensors: Sequence[Tensor], world_size: int) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (one broadcast)."""
    if world_size == 1:
        return
    with torch.no_grad():
        flat = flatten([t.detach() for t in tensors])
        staged = _staged(flat)
        dist.broadcast(staged, src=0)
        unflatten_into(staged.to(flat.device), tensors)


def barrier(world_size: int) -> None:
    """Wait for every rank (e.g. until rank 0's checkpoint is on disk)."""
    if world_size > 1:
        dist.barrier()
