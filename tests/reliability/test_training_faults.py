"""Faults during Stride Distill LoRA: Cancel, an exception, a failing disk, SIGKILL of the server.

After each fault the latest checkpoint loads and resumes, no file under its final name is
half-written (every .safetensors parses, no temporary files are left once the run resumed), the
MODEL that went in is unchanged, and the resumed run ends with the same LoRA as an uninterrupted
run of the same settings (CPU, within 1e-6). The fault steps are drawn at random; every assertion
message names the draw and its seed (``STRIDE_FAULT_SEED=<seed>`` replays it).
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_host as host
from distill_core.training.checkpoint import load_checkpoint
from tests.reliability.support import sampling_graph, training_graph, with_sampled_latents

STEPS = 8
SAVE_EVERY = 2
FAULT_SEED = int(os.environ.get("STRIDE_FAULT_SEED", time.time_ns() % 2**32))  # set it to replay a failure
DRAW = random.Random(FAULT_SEED)


def faulty_run_graph(name: str, steps: int = STEPS) -> dict:
    """A run of ``steps`` steps on 8 latents sampled from the analytic teacher in the same graph."""
    return with_sampled_latents(training_graph(name, steps=steps, save_every=SAVE_EVERY))


def checkpoint_folder(host_) -> Path:
    return Path(host_.folder_paths.get_output_directory()) / "stride_checkpoints"


def assert_files_whole(folder: Path, name: str, context: str, temp_files_allowed: bool = False) -> None:
    """The run's checkpoint (if any) parses completely; no temporary files of it unless allowed."""
    final = folder / f"{name}.safetensors"
    if final.exists():
        load_file(str(final))
    leftovers = sorted(path.name for path in folder.glob(f".{name}.safetensors.*"))
    assert temp_files_allowed or not leftovers, f"{context}: temporary files left behind: {leftovers}"


def assert_same_lora(got: Path, want: Path, context: str, steps: int = STEPS) -> None:
    a, b = load_checkpoint(str(got)), load_checkpoint(str(want))
    assert a.step == b.step == steps, (context, a.step, b.step)
    a_lora, b_lora = a.loras["student"], b.loras["student"]
    assert a_lora.keys() == b_lora.keys()
    worst = max(float((a_lora[key] - b_lora[key]).abs().max()) for key in b_lora)
    assert worst <= 1e-6, f"{context}: resumed LoRA differs from the uninterrupted one by {worst:.3g}"


def demo_sample_graph() -> dict:
    graph = sampling_graph(method="lcm", seed=4, prefix="reliability_demo", batch=2, steps=4)
    graph["model"] = {"class_type": "StrideDemoModel", "inputs": {}}
    return graph


def sample_latent(host_, graph: dict) -> torch.Tensor:
    result = host_.run(graph)
    assert result.success, result.error()
    return load_file(str(host_.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]


@pytest.fixture(scope="module")
def straight(fault_host, demo_weights) -> Path:
    """The uninterrupted run every resumed run must match; also a baseline sample of the demo model."""
    result = fault_host.run(faulty_run_graph("reliability_straight"))
    assert result.success, result.error()
    return checkpoint_folder(fault_host) / "reliability_straight.safetensors"


@pytest.fixture(scope="module")
def demo_baseline(fault_host, demo_weights) -> torch.Tensor:
    return sample_latent(fault_host, demo_sample_graph())


def training_module(host_):
    """nodes/training.py as ComfyUI imported it (the package name is ComfyUI's choice)."""
    return sys.modules[host_.nodes.NODE_CLASS_MAPPINGS["StrideDistillLoRA"].__module__]


def resume_and_compare(host_, name: str, straight: Path, demo_baseline: torch.Tensor, context: str) -> None:
    folder = checkpoint_folder(host_)
    assert torch.equal(sample_latent(host_, demo_sample_graph()), demo_baseline), \
        f"{context}: the demo MODEL changed after the fault (LoRA hooks left behind?)"
    resumed = host_.run(faulty_run_graph(name))
    assert resumed.success, (context, resumed.error())
    assert_files_whole(folder, name, context)
    assert_same_lora(folder / f"{name}.safetensors", straight, context)


def test_cancel_at_a_random_step_then_resume(fault_host, straight, demo_baseline):
    cancel_at = DRAW.randint(1, STEPS - 1)
    context = f"cancel after step {cancel_at} (STRIDE_FAULT_SEED={FAULT_SEED})"
    def cancel(value: int, total: int) -> None:
        if (value, total) == (cancel_at, STEPS):  # the training's progress, not the latent sampling's
            fault_host.interrupt()

    fault_host.progress_listener = cancel
    try:
        cancelled = fault_host.run(faulty_run_graph("reliability_cancel"))
    finally:
        fault_host.progress_listener = None
    assert not cancelled.success and any(kind == "execution_interrupted" for kind, _ in cancelled.messages), context
    folder = checkpoint_folder(fault_host)
    assert_files_whole(folder, "reliability_cancel", context)
    saved = load_checkpoint(str(folder / "reliability_cancel.safetensors"))
    assert saved.step == cancel_at, f"{context}: Cancel keeps a checkpoint of the last finished step, got {saved.step}"
    resume_and_compare(fault_host, "reliability_cancel", straight, demo_baseline, context)


def test_exception_at_a_random_step_then_resume(fault_host, straight, demo_baseline, monkeypatch):
    fail_at = DRAW.randint(1, STEPS)
    context = f"exception in step {fail_at} (STRIDE_FAULT_SEED={FAULT_SEED})"
    # the consistency trainer the node builds, as the host loaded it (build_trainer's own module)
    trainer = sys.modules[training_module(fault_host).build_trainer.__module__].DistillTrainer
    original = trainer.train_step

    def failing_step(self, step: int) -> dict[str, float]:
        if step + 1 == fail_at:
            raise RuntimeError("injected fault in the training step")
        return original(self, step)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    failed = fault_host.run(faulty_run_graph("reliability_exception"))
    monkeypatch.undo()
    assert not failed.success, context
    assert "injected fault" in failed.error()["exception_message"], failed.error()
    folder = checkpoint_folder(fault_host)
    assert_files_whole(folder, "reliability_exception", context)
    last_saved = (fail_at - 1) // SAVE_EVERY * SAVE_EVERY
    path = folder / "reliability_exception.safetensors"
    if last_saved:
        assert load_checkpoint(str(path)).step == last_saved, context
    else:
        assert not path.exists(), f"{context}: no checkpoint was due yet"
    resume_and_compare(fault_host, "reliability_exception", straight, demo_baseline, context)


def test_disk_failure_while_writing_a_checkpoint_keeps_the_previous_one(fault_host, straight, demo_baseline,
                                                                         monkeypatch):
    failing_save = DRAW.randint(2, STEPS // SAVE_EVERY)
    context = f"write error in checkpoint save {failing_save} (STRIDE_FAULT_SEED={FAULT_SEED})"
    real_fsync = os.fsync
    file_syncs = []

    def fsync(descriptor: int) -> None:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            file_syncs.append(descriptor)
            if len(file_syncs) == failing_save:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    failed = fault_host.run(faulty_run_graph("reliability_disk_full"))
    monkeypatch.undo()
    assert not failed.success and "No space left on device" in failed.error()["exception_message"], context
    folder = checkpoint_folder(fault_host)
    assert_files_whole(folder, "reliability_disk_full", context)  # temp file removed, last checkpoint whole
    kept = load_checkpoint(str(folder / "reliability_disk_full.safetensors"))
    assert kept.step == (failing_save - 1) * SAVE_EVERY, context
    resume_and_compare(fault_host, "reliability_disk_full", straight, demo_baseline, context)


# ------------------------------------------------------------------------------------------
# SIGKILL of the server process in the middle of a run
# ------------------------------------------------------------------------------------------
KILL_STEPS = 16


def queue_and_kill(server: host.ServerHost, prompt: dict, kill_at: int, timeout: float = 240.0) -> None:
    """Queue ``prompt``, watch its progress on the websocket, SIGKILL the server at step ``kill_at``."""
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=timeout)
    try:
        answer = server.queue(prompt)
        assert "prompt_id" in answer, answer
        deadline = time.time() + timeout
        while time.time() < deadline:
            frame = ws.recv()
            if not isinstance(frame, str):
                continue
            message = json.loads(frame)
            data = message.get("data", {})
            if message.get("type") == "progress" and data.get("max") == KILL_STEPS and data["value"] >= kill_at:
                os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait(timeout=30)
                return
            assert message.get("type") not in ("execution_error", "execution_success"), message
        raise TimeoutError(f"step {kill_at} not reached within {timeout:.0f} s")
    finally:
        ws.close()


def test_sigkill_of_the_server_mid_run_then_resume_on_a_new_server(fault_host, demo_weights, tmp_path):
    kill_at = DRAW.randint(SAVE_EVERY + 1, KILL_STEPS - 6)  # a checkpoint is on disk before progress passes it
    context = f"SIGKILL at step {kill_at} (STRIDE_FAULT_SEED={FAULT_SEED})"
    prompt = faulty_run_graph("reliability_killed", KILL_STEPS)

    first = host.ServerHost(tmp_path)
    try:
        first.wait_ready()
        queue_and_kill(first, prompt, kill_at)
    finally:
        first.stop()
    assert first.process.returncode == -signal.SIGKILL, context
    folder = tmp_path / "output" / "stride_checkpoints"
    assert_files_whole(folder, "reliability_killed", context, temp_files_allowed=True)  # the final name is whole
    saved = load_checkpoint(str(folder / "reliability_killed.safetensors"))
    assert kill_at - SAVE_EVERY <= saved.step < KILL_STEPS, (context, saved.step)

    second = host.ServerHost(tmp_path, log_path=tmp_path / "server2.log")
    try:
        second.wait_ready()
        resumed = second.run(prompt)
    finally:
        second.stop()
    assert resumed.success, (context, resumed.messages[-3:])
    assert min(value for value, total in resumed.progress if total == KILL_STEPS) > saved.step, \
        f"{context}: the new server resumed from step {saved.step} instead of starting over"
    assert_files_whole(folder, "reliability_killed", context)  # the resumed run's saves removed any temp file

    reference = fault_host.run(faulty_run_graph("reliability_not_killed", KILL_STEPS))
    assert reference.success, reference.error()
    assert_same_lora(folder / "reliability_killed.safetensors",
                     checkpoint_folder(fault_host) / "reliability_not_killed.safetensors", context, KILL_STEPS)
    print(f"\n{context}: checkpoint of step {saved.step} survived, the new server resumed from it and matched the "
          f"uninterrupted run")
