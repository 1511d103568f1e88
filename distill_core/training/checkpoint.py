"""Training checkpoints: every LoRA, optimizer and extra trainable module of a run, its RNG state, step,
settings and loss history, in one safetensors file (never pickle).

A run trains one LoRA per *role* (``"student"``; the ``dmd`` objective adds ``"fake"``), each with its own
AdamW. Keys: ``lora.<role>.<module>.lora_{up,down}.weight`` / ``.alpha``,
``optimizer.<role>.state.<index>.<name>``, ``module.<name>.<key>`` (e.g. the GAN head),
``history.<series>.steps`` / ``.values`` (the 0-based steps that have a value of the series, and the float64
values; files hold no NaN), ``rng.torch`` / ``rng.cuda.<device>``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..safe_files import read_safetensors, write_safetensors
from .config import DistillConfig
from .lora import LoraSet, lora_state_dict

CHECKPOINT_FORMAT = "stride-distill-checkpoint-2"
OLDER_FORMATS = ("stride-distill-checkpoint-1",)


@dataclass
class TrainingCheckpoint:
    step: int
    config: dict[str, Any]
    loras: dict[str, dict[str, Tensor]]  # role -> lora_state_dict(prefix="")
    optimizers: dict[str, dict[str, Any]]  # role -> optimizer state dict
    modules: dict[str, dict[str, Tensor]]  # name -> state dict of an extra trainable module
    history: dict[str, list[float]]  # series -> one value per step (NaN: none that step)
    rng: dict[str, Tensor]


def _split(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, dict[str, Tensor]]:
    """``{"<prefix><group>.<rest>": t}`` -> ``{group: {rest: t}}``."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            group, rest = key[len(prefix):].split(".", 1)
            grouped.setdefault(group, {})[rest] = value
    return grouped


def save_checkpoint(
    path: str,
    step: int,
    config: DistillConfig,
    loras: Mapping[str, LoraSet],
    optimizers: Mapping[str, torch.optim.Optimizer],
    history: Mapping[str, list[float]],
    modules: Mapping[str, nn.Module] | None = None,
) -> None:
    """Write LoRAs, AdamW states, extra modules, loss history, torch RNG state(s), step and config atomically."""
    tensors: dict[str, Tensor] = {}
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step), "config": json.dumps(config.to_dict())}
    for role, loraset in loras.items():
        tensors.update({f"lora.{role}.{key}": value for key, value in lora_state_dict(loraset, prefix="").items()})
    for role, optimizer in optimizers.items():
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, param_state in state["state"].items():
            for name, value in param_state.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{role}.state.{index}.{name}"] = value
                else:
                    scalars.setdefault(str(index), {})[name] = value
        metadata[f"optimizer.{role}.param_groups"] = json.dumps(state["param_groups"])
        metadata[f"optimizer.{role}.scalars"] = json.dumps(scalars)
    metadata["optimizers"] = json.dumps(list(optimizers))
    for name, module in (modules or {}).items():
        tensors.update({f"module.{name}.{key}": value.detach() for key, value in module.state_dict().items()})
    for series, values in history.items():
        steps = [step for step, value in enumerate(values) if not math.isnan(value)]
        tensors[f"history.{series}.steps"] = torch.tensor(steps, dtype=torch.int64)
        tensors[f"history.{series}.values"] = torch.tensor([values[step] for step in steps], dtype=torch.float64)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device_index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device_index}"] = cuda_state
    write_safetensors(path, tensors, metadata)


def load_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle)."""
    tensors, metadata = read_safetensors(path)
    found = metadata.get("format")
    if found in OLDER_FORMATS:
        raise ValueError(f"{path} was written by an older Stride version ({found}) that kept neither the loss history "
                         "nor several LoRAs; start a new run (resume off, or another name)")
    if found != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Stride distillation checkpoint (format {found!r})")
    optimizers: dict[str, dict[str, Any]] = {}
    states = _split(tensors, "optimizer.")
    for role in json.loads(metadata["optimizers"]):
        param_state: dict[int, dict[str, Any]] = {}
        for key, value in states.get(role, {}).items():
            index, name = key[len("state."):].split(".", 1)
            param_state.setdefault(int(index), {})[name] = value
        for index, values in json.loads(metadata[f"optimizer.{role}.scalars"]).items():
            param_state.setdefault(int(index), {}).update(values)
        groups = json.loads(metadata[f"optimizer.{role}.param_groups"])
        for group in groups:  # JSON turns tuples (AdamW betas) into lists
            for name, value in group.items():
                if name != "params" and isinstance(value, list):
                    group[name] = tuple(value)
        optimizers[role] = {"state": param_state, "param_groups": groups}
    step = int(metadata["step"])
    history = {}
    for series, parts in _split(tensors, "history.").items():
        values = [math.nan] * step
        for index, value in zip(parts["steps"].tolist(), parts["values"].tolist(), strict=True):
            values[index] = value
        history[series] = values
    rng = {key[len("rng."):]: value for key, value in tensors.items() if key.startswith("rng.")}
    return TrainingCheckpoint(step, json.loads(metadata["config"]), _split(tensors, "lora."),
                              optimizers, _split(tensors, "module."), history, rng)

