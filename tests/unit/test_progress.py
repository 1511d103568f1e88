"""Progress and Cancel in long phases: the protocol, cancellable atomic writes, the trainer's data-free pool."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from distill_core.progress import CHECKPOINT, MIB, POOL, Cancelled, Phase, Progress
from distill_core.safe_files import WRITE_CHUNK_BYTES, write_atomically
from distill_core.training.checkpoint import load_checkpoint
from distill_core.training.cli import demo_network
from distill_core.training.config import DistillConfig
from distill_core.training.lora import attach_lora
from distill_core.training.trainer import train


def test_a_phase_reports_every_unit_and_stops_before_the_next_one():
    heard: list[tuple[str, int, int]] = []
    done: list[int] = []
    phase = Phase("work", 5, lambda *event: heard.append(event), lambda: len(done) >= 2)
    with pytest.raises(Cancelled) as cancelled:
        for unit in phase.each(range(5)):
            done.append(unit)
    assert done == [0, 1], "no unit starts after the stop"
    assert heard == [("work", 0, 5), ("work", 1, 5), ("work", 2, 5)]
    assert (cancelled.value.phase, cancelled.value.done, cancelled.value.total) == ("work", 2, 5)


def test_a_phase_that_cannot_be_cancelled_ignores_the_stop():
    phase = Progress(None, lambda: True).phase("checkpoint", 3, cancellable=False)
    assert list(phase.each("abc")) == ["a", "b", "c"] and phase.done == 3


def test_a_cancelled_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    payload = bytes(2 * WRITE_CHUNK_BYTES + 5)
    heard: list[tuple[str, int, int]] = []
    phase = Progress(lambda *event: heard.append(event), lambda: heard[-1][1] >= 16).write_phase("write", len(payload))
    with pytest.raises(Cancelled):
        write_atomically(target, payload, phase.bytes_written)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]
    assert heard[0] == ("write", 0, math.ceil(len(payload) / MIB)) and heard[-1][1] == 16

    heard.clear()
    phase = Progress(lambda *event: heard.append(event)).write_phase("write", len(payload))
    write_atomically(target, payload, phase.bytes_written)
    assert target.read_bytes() == payload
    assert [done for _, done, _ in heard] == [0, 16, 32, 33], "whole MiB after each 16 MiB chunk"


def demo_run(tmp_path, **overrides):
    settings = {"objective": "lcm", "steps": 3, "rank": 2, "batch": 2, "lr": 1e-3, "data_free_samples": 5,
                "data_free_steps": 3}
    config = DistillConfig(**{**settings, **overrides})
    network = demo_network({"dtype": "float64", "num_latents": 0, "hidden": 8}, config)
    torch.manual_seed(5)
    return network, attach_lora(network.module, config.rank, config.alpha), config


def test_the_pool_reports_each_teacher_call_and_checkpoint_writes_report_their_size(tmp_path):
    network, loraset, config = demo_run(tmp_path)
    events: list[tuple[str, int, int]] = []
    checkpoint = str(tmp_path / "run.safetensors")
    result = train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint,
                   on_phase=lambda *event: events.append(event))
    calls = math.ceil(config.data_free_samples / config.batch) * config.data_free_steps
    assert [event for event in events if event[0] == POOL] == [(POOL, done, calls) for done in range(calls + 1)]
    writes = [event for event in events if event[0] == CHECKPOINT]
    assert writes[0][1] == 0 and writes[-1][1] == writes[-1][2] >= 1 and result.steps_done == 3


@pytest.mark.parametrize("stop_at_call", [1, 4])
def test_cancel_during_the_pool_stops_within_one_teacher_call_and_writes_nothing(tmp_path, stop_at_call):
    network, loraset, config = demo_run(tmp_path)
    calls: list[int] = []

    def counting(x, sigma, cond):
        calls.append(1)
        return network.denoiser(x, sigma, cond)

    before = [param.detach().clone() for param in loraset.parameters()]
    result = train(counting, loraset, network.space, config, network.data,
                   should_stop=lambda: len(calls) >= stop_at_call, checkpoint_path=str(tmp_path / "run.safetensors"))
    assert len(calls) == stop_at_call, "the stop is seen before the next teacher call"
    assert result.cancelled and result.steps_done == 0 and result.checkpoint is None and result.losses == {}
    assert os.listdir(tmp_path) == [], "nothing written"
    assert all(torch.equal(a, b) for a, b in zip(before, loraset.parameters(), strict=True))


def test_cancel_in_the_pool_of_a_resumed_run_keeps_its_checkpoint(tmp_path):
    checkpoint = str(tmp_path / "run.safetensors")
    network, loraset, config = demo_run(tmp_path, steps=2)
    train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint)
    written = os.path.getmtime(checkpoint), Path(checkpoint).read_bytes()
    network, loraset, config = demo_run(tmp_path, steps=4)
    result = train(network.denoiser, loraset, network.space, config, network.data, should_stop=lambda: True,
                   checkpoint_path=checkpoint, resume=True)
    assert result.cancelled and result.steps_done == 2 and load_checkpoint(checkpoint).step == 2
    assert (os.path.getmtime(checkpoint), Path(checkpoint).read_bytes()) == written
