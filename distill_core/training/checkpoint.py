"""Training checkpoints: LoRA weights, optimizer state, RNG state, step and settings in one safetensors file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..safe_files import UnsafeFileError, read_safetensors, write_safetensors
from .config import DistillConfig
from .lora import LoraSet, lora_state_dict

CHECKPOINT_FORMAT = "stride-distill-checkpoint-1"
CHECKPOINT_LORA_PREFIX = "lora."


@dataclass
class TrainingCheckpoint:
    step: int
    config: dict[str, Any]
    lora: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Tensor]


def save_checkpoint(path: str, loraset: LoraSet, optimizer: torch.optim.Optimizer, step: int, config: DistillConfig) -> None:
    """Write LoRA weights, AdamW state, torch RNG state(s), step and config atomically."""
    tensors = {CHECKPOINT_LORA_PREFIX + key: value for key, value in lora_state_dict(loraset, prefix="").items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device_index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device_index}"] = cuda_state
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "config": json.dumps(config.to_dict()),
        "optimizer.param_groups": json.dumps(state["param_groups"]),
        "optimizer.scalars": json.dumps(scalars),
    }
    write_safetensors(path, tensors, metadata)


def load_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle).

    The file's structure is checked by :func:`read_safetensors`, its declared metadata here (format, step,
    settings, optimizer state), before any of it is used: a damaged checkpoint raises
    :class:`~distill_core.safe_files.UnsafeFileError` in plain words.
    """
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Stride distillation checkpoint (format {metadata.get('format')!r})")
    step, config, scalars, groups = _declared_metadata(path, metadata)
    lora = {key[len(CHECKPOINT_LORA_PREFIX):]: value for key, value in tensors.items() if key.startswith(CHECKPOINT_LORA_PREFIX)}
    param_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            index, _, name = key[len("optimizer.state."):].partition(".")
            if not index.isdigit() or not name:
                raise _damaged(path, f"its tensor {key!r} is not an optimizer state of a numbered parameter")
            param_state.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        param_state.setdefault(int(index), {}).update(values)
    for group in groups:  # JSON turns tuples (AdamW betas) into lists
        for name, value in group.items():
            if name != "params" and isinstance(value, list):
                group[name] = tuple(value)
    rng = {key[len("rng."):]: value for key, value in tensors.items() if key.startswith("rng.")}
    return TrainingCheckpoint(step, config, lora, {"state": param_state, "param_groups": groups}, rng)


def _damaged(path: str, problem: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path} is a damaged Stride checkpoint: {problem}; delete it (or train without resuming)")


def _declared_metadata(path: str, metadata: dict[str, str]) -> tuple[int, dict, dict[str, dict], list[dict]]:
    """``step``, ``config``, ``optimizer.scalars`` and ``optimizer.param_groups`` of a checkpoint, each checked
    against what :func:`save_checkpoint` declares: a non-negative integer, a JSON object, a JSON object of
    objects keyed by parameter number, a JSON list of objects that each hold a ``params`` list."""
    missing = [key for key in ("step", "config", "optimizer.scalars", "optimizer.param_groups") if key not in metadata]
    if missing:
        raise _damaged(path, f"its metadata lacks {missing}")
    if not metadata["step"].isdigit():
        raise _damaged(path, f"its step {metadata['step']!r} is not a whole number")
    decoded = {}
    for key in ("config", "optimizer.scalars", "optimizer.param_groups"):
        try:
            decoded[key] = json.loads(metadata[key])
        except (ValueError, RecursionError):
            raise _damaged(path, f"its {key!r} metadata is not valid JSON") from None
    config, scalars, groups = decoded["config"], decoded["optimizer.scalars"], decoded["optimizer.param_groups"]
    if not isinstance(config, dict):
        raise _damaged(path, "its settings ('config') are not a JSON object")
    if not (isinstance(scalars, dict) and all(key.isdigit() and isinstance(value, dict) for key, value in scalars.items())):
        raise _damaged(path, "its optimizer scalars are not objects keyed by parameter number")
    if not (isinstance(groups, list) and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                                             for group in groups)):
        raise _damaged(path, "its optimizer parameter groups are not a list of objects with 'params'")
    return int(metadata["step"]), config, scalars, groups
