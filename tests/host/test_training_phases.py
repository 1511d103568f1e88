"""The trainer node's long phases inside a real ComfyUI: progress on the node's bar, Cancel that writes nothing,
the teacher cache, and Stride Save LoRA's diffusers format. (A Cancel in the data-free pool through the real
server: tests/server/test_server.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.host.test_training_nodes import training_graph


def outputs(comfy_host) -> Path:
    return Path(comfy_host.folder_paths.get_output_directory())


def test_the_data_free_pool_shows_its_teacher_calls_on_the_progress_bar(comfy_host):
    result = comfy_host.run(training_graph("phases_bar", steps=2, save_every=0, resume=False))
    assert result.success, result.error()
    calls = 16 // 2 * 8  # data_free_samples / batch_size x data_free_steps
    pool = [value for value, total in result.progress if total == calls]
    assert pool == list(range(calls + 1)), "one update per teacher call, from 0"
    assert result.progress[len(pool):] == [(1, 2), (2, 2)], "then the steps"


def test_cancel_during_the_headless_export_writes_no_bundle(comfy_host):
    """The export's first progress update asks to stop; its files were going to a staging folder and are dropped."""
    comfy_host.progress_listener = lambda value, total: comfy_host.interrupt()
    try:
        cancelled = comfy_host.run(training_graph("phases_export", steps=2, export_headless=True, save_every=0))
    finally:
        comfy_host.progress_listener = None
    assert not cancelled.success and any(kind == "execution_interrupted" for kind, _ in cancelled.messages)
    headless = outputs(comfy_host) / "stride_headless"
    assert not (headless / "phases_export").exists() and not list(headless.glob(".*"))
    assert not list((outputs(comfy_host) / "stride_checkpoints").glob("*phases_export*"))


def test_image_encoding_stops_between_vae_calls(comfy_host):
    import comfy.model_management
    import comfy.utils

    package = comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideDistillLoRA"].__module__
    training = __import__(package, fromlist=["encode_images"])

    class CountingVae:
        calls = 0

        def encode(self, pixels: torch.Tensor) -> torch.Tensor:
            CountingVae.calls += 1
            if CountingVae.calls == 2:
                comfy.model_management.interrupt_current_processing(True)  # the user presses Cancel during the 2nd call
            return torch.zeros(len(pixels), 4, 2, 2)

    images = torch.zeros(3 * training.ENCODE_BATCH, 16, 16, 3)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            training.encode_images(CountingVae(), images, None)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert CountingVae.calls == 2, "no VAE call starts after the Cancel"
    CountingVae.calls = -10
    assert training.encode_images(CountingVae(), images, None).shape == (len(images), 4, 2, 2)


def train_directly(comfy_host, model, name: str, **overrides) -> dict:
    """Run Stride Distill LoRA as the executor does (data-free demo data, 2 steps); returns its JSON report."""
    stride = comfy_host.nodes.NODE_CLASS_MAPPINGS
    prompt, empty = (stride["StrideClassPrompt"].execute(text)[0] for text in ("disc", ""))
    data = stride["StrideDistillDataset"].execute(prompt, empty, width=64, height=64)[0]
    inputs = {"objective": "lcm", "steps": 2, "learning_rate": 1e-3, "rank": 4, "alpha": 0.0, "batch_size": 2,
              "guidance_min": 0.0, "guidance_max": 0.0, "loss": "huber", "gradient_checkpointing": False, "seed": 3,
              "save_every": 0, "lora_name": name, "resume": False, **overrides}
    output = stride["StrideDistillLoRA"].execute(model, data, **inputs)
    return {"report": json.loads(output[3]), "lora": output[1]}


def test_the_teacher_cache_serves_the_second_run_and_refuses_another_model(comfy_host):
    import comfy.sd

    from distill_core.training.lora import attach_lora, lora_state_dict

    stride = comfy_host.nodes.NODE_CLASS_MAPPINGS
    model = stride["StrideDemoModel"].execute()[0]
    comfy_host.progress = []
    first = train_directly(comfy_host, model, "phases_cache", cache_teacher=True)
    pool_calls = [update for update in comfy_host.progress if update[1] == 64]
    comfy_host.progress = []
    second = train_directly(comfy_host, model, "phases_cache", cache_teacher=True)
    assert first["report"]["teacher_cache"] == "miss" and second["report"]["teacher_cache"] == "hit"
    assert len(pool_calls) == 65 and not [update for update in comfy_host.progress if update[1] == 64], \
        "the second run makes no teacher call for its pool"
    assert first["report"]["final_loss"] == second["report"]["final_loss"], "the same data, the same run"
    (entry,) = (outputs(comfy_host) / "stride_cache").glob("pool-*.safetensors")

    adapters = attach_lora(model.model.diffusion_model, 4, init="random")  # a user's LoRA merged into the teacher
    user_lora = lora_state_dict(adapters)
    adapters.remove()
    changed = comfy.sd.load_lora_for_models(model, None, user_lora, 0.5, 0)[0]
    third = train_directly(comfy_host, changed, "phases_cache", cache_teacher=True)
    answer = third["report"]["teacher_cache"]
    assert answer.startswith("refused") and "another model" in answer, answer
    assert list((outputs(comfy_host) / "stride_cache").glob("pool-*.safetensors")) == [entry], "replaced in place"
    assert train_directly(comfy_host, changed, "phases_cache", cache_teacher=True)["report"]["teacher_cache"] == "hit"


def test_save_lora_in_the_diffusers_format(comfy_host):
    """An SD1.5-layout UNet's LoRA saved with format=diffusers holds kohya keys on diffusers' module names (what
    diffusers' loader converts, tests/host/test_diffusers_interop.py), and ComfyUI's loader takes every layer."""
    from bench import models

    stride = comfy_host.nodes.NODE_CLASS_MAPPINGS
    config = models.unet_config("sd15", reduced_depth=True, model_channels=32, context_dim=64)
    model = models.unet_model("sd15", config, torch.device("cpu"), torch.float32, seed=0)
    data = stride["StrideDistillDataset"].execute(models.unet_conditioning("sd15", config, seed=1),
                                                 models.unet_conditioning("sd15", config, seed=2), width=64,
                                                 height=64)[0]
    output = stride["StrideDistillLoRA"].execute(model, data, objective="lcm", steps=1, learning_rate=1e-3, rank=4,
                                                 alpha=0.0, batch_size=1, guidance_min=0.0, guidance_max=0.0, loss="l2",
                                                 gradient_checkpointing=False, seed=0, save_every=0,
                                                 lora_name="phases_diffusers", resume=False)
    saved = stride["StrideSaveLoRA"].execute(output[1], "phases_diffusers", True, "diffusers")
    path = Path(comfy_host.folder_paths.get_full_path_or_raise("loras", saved[0]))
    try:
        state = load_file(path)
        reloaded = json.loads(stride["StrideReloadLoRA"].execute(model, saved[0], 1.0)[1])
    finally:  # models/loras feeds other nodes' file lists (the node reference test reads them)
        path.unlink()
    assert state and all(key.startswith("lora_unet_") and not key.startswith("lora_unet_input_blocks") for key in state)
    assert len(state) == len(output[1]["state_dict"])
    assert reloaded["loaded"] == reloaded["layers"] == len(state) // 3, reloaded

    demo = stride["StrideDemoModel"].execute()[0]
    demo_lora = train_directly(comfy_host, demo, "phases_demo_format")["lora"]
    with pytest.raises(Exception, match=r"format: saving for diffusers is supported for SD1\.5/SDXL") as refused:
        stride["StrideSaveLoRA"].execute(demo_lora, "phases_demo_format", True, "diffusers")
    assert type(refused.value).__name__ == "StrideError"
