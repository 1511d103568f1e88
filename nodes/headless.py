"""The in-graph distillation run, exported to run headless (``torchrun``, several GPUs).

The trainer node writes a bundle folder: ``teacher.safetensors`` (the network's weights as the
graph ran them, a user's LoRAs merged in, plus how to rebuild the ComfyUI model around them),
``data.safetensors`` (the conditionings and latents the node derived) and ``config.json`` for
``distill_core.training.cli``, whose network factory is ``scripts/headless_teacher.py``. The same
seed and settings then give the same LoRA as the node (tested on CPU). The export reports its progress
(MiB of the teacher written) and stops at a Cancel: the files are written to a staging folder first and
moved into the bundle folder only when all three are complete, so a cancelled export changes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.supported_models

from ..distill_core.progress import EXPORT, Progress
from ..distill_core.safe_files import safetensors_bytes, write_atomically
from ..distill_core.training.cli import CONFIG_FILE, DATA_FILE, TEACHER_FILE, TEACHER_FORMAT, save_training_data
from ..distill_core.training.config import DistillConfig, TrainingData
from .compat import StrideError

STRIDE_ROOT = Path(__file__).resolve().parents[1]
HEADLESS_NETWORK = "nodes/headless_teacher.py:comfy_teacher"  # relative to STRIDE_ROOT, the run's working directory


def _json_safe(config: dict) -> dict:
    """The entries of a unet_config that JSON can carry (dtypes/devices are chosen again when loading)."""
    def safe(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(safe(item) for item in value)
        return value is None or isinstance(value, (bool, int, float, str))
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items() if safe(value)}


def export_bundle(folder: Path, patcher: Any, config: DistillConfig, data: TrainingData, lora_name: str,
                  progress: Progress | None = None) -> str:
    """Write the headless bundle for a loaded teacher ``patcher``; returns the command that runs it.

    ``progress`` hears the teacher's write (:data:`~distill_core.progress.EXPORT`, in MiB) and may stop it
    (:class:`~distill_core.progress.Cancelled`); files a headless run left in ``folder`` (its LoRA, its
    checkpoint) are kept.
    """
    base = patcher.model
    network = base.diffusion_model
    model_config = base.model_config
    unet_config = getattr(network, "stride_unet_config", None) or model_config.unet_config
    if unet_config.get("disable_unet_model_creation"):
        raise StrideError("export_headless: this model's network was not built from a ComfyUI model config, so a "
                          "headless run cannot rebuild it; turn export_headless off")
    config_class = type(model_config).__name__
    metadata = {
        "format": TEACHER_FORMAT,
        "config_class": config_class if hasattr(comfy.supported_models, config_class) else "",
        "model_class": type(base).__name__,
        "model_type": base.model_type.name,
        "unet_config": json.dumps(_json_safe(unet_config)),
    }
    settings = {"distill": config.to_dict(), "network": HEADLESS_NETWORK,
                "network_options": {"teacher": TEACHER_FILE, "data": DATA_FILE},
                "output": f"{lora_name}.safetensors", "checkpoint": f"{lora_name}.checkpoint.safetensors",
                "resume": True}
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # what an earlier, killed export left
    staging.mkdir(parents=True)
    try:
        payload = safetensors_bytes(network.state_dict(), metadata)
        phase = (progress or Progress()).write_phase(EXPORT, len(payload))
        write_atomically(staging / TEACHER_FILE, payload, phase.bytes_written)
        del payload
        save_training_data(staging / DATA_FILE, data)
        write_atomically(staging / CONFIG_FILE, json.dumps(settings, indent=2).encode("utf-8"))
        folder.mkdir(parents=True, exist_ok=True)
        for name in (TEACHER_FILE, DATA_FILE, CONFIG_FILE):  # complete files, each replaced in one rename
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    host = Path(comfy.model_base.__file__).resolve().parents[1]
    return (f"cd {STRIDE_ROOT} && PYTHONPATH={host} torchrun --nproc_per_node=<GPUs> "
            f"-m distill_core.training.cli --config {folder / CONFIG_FILE}")
