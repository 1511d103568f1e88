"""Training checkpoints: LoRA weights, optimizer, RNG and loss-scale state, step and settings in one safetensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..progress import CHECKPOINT, PhaseCallback, Progress
from ..safe_files import read_safetensors, safetensors_bytes, write_atomically
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
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle)."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Stride distillation checkpoint (format {metadata.get('format')!r})")
    lora = {key[len(CHECKPOINT_LORA_PREFIX):]: value for key, value in tensors.items() if key.startswith(CHECKPOINT_LORA_PREFIX)}
    param_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            index, name = key[len("optimizer.state."):].split(".", 1)
            param_state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata["optimizer.scalars"]).items():
        param_state.setdefault(int(index), {}).update(values)
    groups = json.loads(metadata["optimizer.param_groups"])
    for group in groups:  # JSON turns tuples (AdamW betas) into lists
        for name, value in group.items():
            if name != "params" and isinstance(value, list):
                group[name] = tuple(value)
    rng = {key[len("rng."):]: value for key, value in tensors.items() if key.startswith("rng.")}
    loss_scale = json.loads(metadata["loss_scale"]) if "loss_scale" in metadata else None
    return TrainingCheckpoint(int(metadata["step"]), json.loads(metadata["config"]), lora,
                              {"state": param_state, "param_groups": groups}, rng, loss_scale)
