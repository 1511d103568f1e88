"""Training checkpoints: every LoRA, optimizer and extra trainable module of a run, its RNG state, step,
settings and loss history, in one safetensors file (never pickle).

A run trains one LoRA per *role* (``"student"``; the ``dmd`` objective adds ``"fake"``), each with its own
AdamW. Keys: ``lora.<role>.<module>.lora_{up,down}.weight`` / ``.alpha``,
``optimizer.<role>.state.<index>.<name>``, ``module.<name>.<key>`` (e.g. the GAN head),
``history.<series>.steps`` / ``.values`` (the 0-based steps that have a value of the series, and the float64
values; files hold no NaN), ``rng.torch`` / ``rng.cuda.<device>``; metadata ``loss_scale`` holds each role's
:class:`~distill_core.training.loss_scale.DynamicLossScale` state.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..progress import CHECKPOINT, PhaseCallback, Progress
from ..safe_files import UnsafeFileError, read_safetensors, safetensors_bytes, write_atomically
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
    loss_scale: dict[str, dict[str, float]] | None = None  # role -> scaler state; None: written before it existed


def _split(path: str, tensors: Mapping[str, Tensor], prefix: str) -> dict[str, dict[str, Tensor]]:
    """``{"<prefix><group>.<rest>": t}`` -> ``{group: {rest: t}}``."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            group, dot, rest = key[len(prefix):].partition(".")
            if not (group and dot and rest):
                raise _damaged(path, f"its tensor {key!r} names no group after {prefix!r}")
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
    loss_scales: Mapping[str, dict[str, float]] | None = None,
    on_phase: PhaseCallback | None = None,
) -> None:
    """Write LoRAs, AdamW states, extra modules, loss history, loss scales (per role), torch RNG state(s), step
    and config atomically.

    ``on_phase`` hears the write's progress in MiB (:data:`~distill_core.progress.CHECKPOINT`); a checkpoint
    write is never cancelled (it is what a Cancel keeps).
    """
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
    if loss_scales is not None:
        metadata["loss_scale"] = json.dumps(dict(loss_scales))
    payload = safetensors_bytes(tensors, metadata)
    phase = Progress(on_phase).write_phase(CHECKPOINT, len(payload), cancellable=False)
    write_atomically(path, payload, phase.bytes_written)


def load_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle).

    The file's structure is checked by :func:`read_safetensors`, its declared metadata and tensor names here (format,
    step, settings, optimizer states, history) before any of it is used: a damaged checkpoint raises
    :class:`~distill_core.safe_files.UnsafeFileError` in plain words.
    """
    tensors, metadata = read_safetensors(path)
    found = metadata.get("format")
    if found in OLDER_FORMATS:
        raise ValueError(f"{path} was written by an older Stride version ({found}) that kept neither the loss history "
                         "nor several LoRAs; start a new run (resume off, or another name)")
    if found != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Stride distillation checkpoint (format {found!r})")
    step, config, roles = _declared_metadata(path, metadata)
    optimizers: dict[str, dict[str, Any]] = {}
    states = _split(path, tensors, "optimizer.")
    for role in roles:
        scalars, groups = _optimizer_metadata(path, metadata, role)
        param_state: dict[int, dict[str, Any]] = {}
        for key, value in states.get(role, {}).items():
            index, _, name = key[len("state."):].partition(".")
            if not (key.startswith("state.") and index.isdigit() and name):
                raise _damaged(path, f"its tensor 'optimizer.{role}.{key}' is not an optimizer state of a numbered "
                                     "parameter")
            param_state.setdefault(int(index), {})[name] = value
        for index, values in scalars.items():
            param_state.setdefault(int(index), {}).update(values)
        for group in groups:  # JSON turns tuples (AdamW betas) into lists
            for name, value in group.items():
                if name != "params" and isinstance(value, list):
                    group[name] = tuple(value)
        optimizers[role] = {"state": param_state, "param_groups": groups}
    history: dict[str, list[float]] = {}
    for series, parts in _split(path, tensors, "history.").items():
        if parts.keys() != {"steps", "values"} or parts["steps"].dtype != torch.int64 or \
                parts["steps"].shape != parts["values"].shape or parts["steps"].dim() != 1:
            raise _damaged(path, f"its loss history {series!r} is not a list of steps with one value each")
        indices = parts["steps"].tolist()
        if any(not 0 <= index < step for index in indices):
            raise _damaged(path, f"its loss history {series!r} names steps outside 0..{step - 1}")
        per_step = [math.nan] * step
        for index, value in zip(indices, parts["values"].tolist(), strict=True):
            per_step[index] = value
        history[series] = per_step
    rng = {key[len("rng."):]: value for key, value in tensors.items() if key.startswith("rng.")}
    if "torch" not in rng:
        raise _damaged(path, "it holds no random-number state ('rng.torch')")
    return TrainingCheckpoint(step, config, _split(path, tensors, "lora."), optimizers,
                              _split(path, tensors, "module."), history, rng,
                              _loss_scales(path, metadata, roles))


def _damaged(path: str, problem: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path} is a damaged Stride checkpoint: {problem}; delete it (or train without resuming)")


def _json(path: str, metadata: Mapping[str, str], key: str) -> Any:
    if key not in metadata:
        raise _damaged(path, f"its metadata lacks [{key!r}]")
    try:
        return json.loads(metadata[key])
    except (ValueError, RecursionError):
        raise _damaged(path, f"its {key!r} metadata is not valid JSON") from None


def _declared_metadata(path: str, metadata: Mapping[str, str]) -> tuple[int, dict[str, Any], list[str]]:
    """``step``, ``config`` and the ``optimizers`` roles of a checkpoint, each checked against what
    :func:`save_checkpoint` declares: a non-negative integer, a JSON object, a JSON list of role names."""
    missing = [key for key in ("step", "config", "optimizers") if key not in metadata]
    if missing:
        raise _damaged(path, f"its metadata lacks {missing}")
    if not metadata["step"].isdigit():
        raise _damaged(path, f"its step {metadata['step']!r} is not a whole number")
    config, roles = _json(path, metadata, "config"), _json(path, metadata, "optimizers")
    if not isinstance(config, dict):
        raise _damaged(path, "its settings ('config') are not a JSON object")
    if not (isinstance(roles, list) and all(isinstance(role, str) and role for role in roles)):
        raise _damaged(path, "its 'optimizers' metadata is not a list of role names")
    return int(metadata["step"]), config, roles


def _optimizer_metadata(path: str, metadata: Mapping[str, str], role: str) -> tuple[dict[str, dict], list[dict]]:
    """``optimizer.<role>.scalars`` (a JSON object of objects keyed by parameter number) and
    ``optimizer.<role>.param_groups`` (a JSON list of objects that each hold a ``params`` list), checked."""
    scalars = _json(path, metadata, f"optimizer.{role}.scalars")
    groups = _json(path, metadata, f"optimizer.{role}.param_groups")
    if not (isinstance(scalars, dict)
            and all(key.isdigit() and isinstance(value, dict) for key, value in scalars.items())):
        raise _damaged(path, f"its {role} optimizer scalars are not objects keyed by parameter number")
    if not (isinstance(groups, list) and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                                             for group in groups)):
        raise _damaged(path, f"its {role} optimizer's parameter groups are not a list of objects with 'params'")
    return scalars, groups


def _loss_scales(path: str, metadata: Mapping[str, str], roles: list[str]) -> dict[str, dict[str, float]] | None:
    """Each role's loss-scaler state (absent in checkpoints written before loss scaling: ``None``), checked: a JSON
    object keyed by the checkpoint's roles, each an object with a positive ``scale`` and a whole ``good_steps`` >= 0."""
    if "loss_scale" not in metadata:
        return None
    states = _json(path, metadata, "loss_scale")
    if not (isinstance(states, dict) and set(states) == set(roles)):
        raise _damaged(path, f"its 'loss_scale' metadata is not an object with one entry per role {roles}")
    for role, state in states.items():
        if not (isinstance(state, dict) and isinstance(state.get("scale"), (int, float)) and state["scale"] > 0
                and isinstance(state.get("good_steps"), int) and state["good_steps"] >= 0):
            raise _damaged(path, f"its {role} loss scale is not an object with a positive 'scale' and a whole "
                                 "'good_steps'")
    return states
