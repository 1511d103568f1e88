"""Training checkpoints: LoRA weights, optimizer, RNG and loss-scale state, step and settings in one safetensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..progress import CHECKPOINT, PhaseCallback, Progress
from ..safe_files import UnsafeFileError, read_safetensors, safetensors_bytes, write_atomically
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
    loss_scale: dict[str, float] | None = None  # None: written before loss scaling existed


def save_checkpoint(path: str, loraset: LoraSet, optimizer: torch.optim.Optimizer, step: int, config: DistillConfig,
                    loss_scale: dict[str, float] | None = None, on_phase: PhaseCallback | None = None) -> None:
    """Write LoRA weights, AdamW state, torch RNG state(s), loss scale, step and config atomically.

    ``on_phase`` hears the write's progress in MiB (:data:`~distill_core.progress.CHECKPOINT`); a checkpoint
    write is never cancelled (it is what a Cancel keeps).
    """
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
    if loss_scale is not None:
        metadata["loss_scale"] = json.dumps(loss_scale)
    payload = safetensors_bytes(tensors, metadata)
    phase = Progress(on_phase).write_phase(CHECKPOINT, len(payload), cancellable=False)
    write_atomically(path, payload, phase.bytes_written)


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
    return TrainingCheckpoint(step, config, lora, {"state": param_state, "param_groups": groups}, rng,
                              _loss_scale(path, metadata))


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


def _loss_scale(path: str, metadata: dict[str, str]) -> dict[str, float] | None:
    """The loss scaler's state (absent in checkpoints written before loss scaling: ``None``), checked: a JSON
    object with a positive ``scale`` and a whole ``good_steps`` >= 0."""
    if "loss_scale" not in metadata:
        return None
    try:
        state = json.loads(metadata["loss_scale"])
    except (ValueError, RecursionError):
        raise _damaged(path, "its 'loss_scale' metadata is not valid JSON") from None
    if not (isinstance(state, dict) and isinstance(state.get("scale"), (int, float)) and state["scale"] > 0
            and isinstance(state.get("good_steps"), int) and state["good_steps"] >= 0):
        raise _damaged(path, "its loss scale is not an object with a positive 'scale' and a whole 'good_steps'")
    return state
