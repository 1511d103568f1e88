"""Load: 100 few-step prompts from several websocket clients against one real ComfyUI server.

Every prompt completes, every output equals the reference computed once for its method and
seed (different seeds differ), and the server's memory after the run is within 50 MB of its
memory after warm-up (the curve, sampled every ~10 prompts, goes to docs/load_memory.csv with STRIDE_WRITE_DOCS=1). A
training run queued together with sampling prompts finishes with the same LoRA as alone.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_host as host
from distill_core.training.checkpoint import load_checkpoint
from tests.artifacts import docs_path
from tests.reliability.support import hybrid_graph, sampling_graph, training_graph, with_sampled_latents

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 4
PROMPTS = 100
SEEDS = (11, 12, 13, 14, 15)
METHODS = ("lcm", "tcd / hyper-sd unified", "hyper-sd n-step (ddim trailing)", "tdd", "hybrid")
MEMORY_BUDGET_MB = 50.0
TIMEOUT = 240.0


def method_graph(method: str, seed: int, variant: int, prefix: str) -> dict:
    """One few-step prompt of the analytic teacher (hybrid: its denoiser, then its flow map).

    The negative prompt is ``variant`` spaces: the same (empty) class to the model, but another
    input to ComfyUI's cache, so every prompt really samples while its output must stay that of
    (method, seed)."""
    if method == "hybrid":
        graph = hybrid_graph(seed=seed, prefix=prefix, batch=2)
    else:
        graph = sampling_graph(method=method, seed=seed, prefix=prefix, batch=2, steps=4)
    graph["neg"]["inputs"]["prompt"] = " " * variant
    return graph


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def saved_latent(server: host.ServerHost, outputs: dict) -> torch.Tensor:
    item = outputs["save"]["latents"][0]
    return load_file(str(server.base_dir / "output" / item.get("subfolder", "") / item["filename"]))["latent_tensor"]


def sampled_outputs(server: host.ServerHost, prompt_id: str) -> dict:
    """The outputs of a finished prompt whose sampling node really ran (was not served from the cache)."""
    entry = server.get_json(f"/history/{prompt_id}")[prompt_id]
    cached = [data.get("nodes", []) for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
    assert not any("run" in nodes for nodes in cached), f"prompt {prompt_id} was served from the cache"
    return entry["outputs"]


class Client:
    """A websocket client with its own client_id: queues its prompts, waits until each one ends."""

    def __init__(self, server: host.ServerHost, prompts: list[tuple[str, dict]], on_done) -> None:
        self.server, self.prompts, self.on_done = server, prompts, on_done
        self.client_id = uuid.uuid4().hex
        self.prompt_ids: dict[str, str] = {}  # prompt_id -> our label
        self.finished: dict[str, str] = {}  # prompt_id -> "success" / "error"

    def run(self) -> None:
        import websocket

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.client_id}",
                                         timeout=TIMEOUT)
        try:
            for label, prompt in self.prompts:
                answer = self.server.queue(prompt, self.client_id)
                assert "prompt_id" in answer, answer
                self.prompt_ids[answer["prompt_id"]] = label
            deadline = time.time() + TIMEOUT
            while len(self.finished) < len(self.prompts) and time.time() < deadline:
                frame = ws.recv()
                if not isinstance(frame, str):
                    continue
                message = json.loads(frame)
                prompt_id = message.get("data", {}).get("prompt_id")
                if prompt_id not in self.prompt_ids or prompt_id in self.finished:
                    continue
                if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    self.finished[prompt_id] = "success" if message["type"] == "execution_success" else "error"
                    self.on_done()
        finally:
            ws.close()


def run_clients(server: host.ServerHost, batches: list[list[tuple[str, dict]]], on_done=lambda: None) -> list[Client]:
    clients = [Client(server, batch, on_done) for batch in batches]
    pool = concurrent.futures.ThreadPoolExecutor(len(clients))
    runs = [pool.submit(client.run) for client in clients]
    _, unfinished = concurrent.futures.wait(runs, TIMEOUT + 30)
    pool.shutdown(wait=False)
    assert not unfinished, "a client did not finish in time"
    for client, finished_run in zip(clients, runs, strict=True):
        finished_run.result()  # a client's failure, raised in the test thread
        assert len(client.finished) == len(client.prompts), "a prompt never finished"
    return clients


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = host.ServerHost(tmp_path_factory.mktemp("comfy-load"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def references(server) -> dict[tuple[str, int], torch.Tensor]:
    """Each (method, seed) sampled once, one prompt at a time: the expected outputs (and the warm-up)."""
    found = {}
    for method in METHODS:
        for seed in SEEDS:
            result = server.run(method_graph(method, seed, 0, "reference"))
            assert result.success, (method, seed, result.messages[-3:])
            found[method, seed] = saved_latent(server, result.outputs)
    return found


def test_references_differ_between_seeds(references):
    for method in METHODS:
        latents = [references[method, seed] for seed in SEEDS]
        assert all(torch.isfinite(latent).all() for latent in latents)
        for i in range(len(latents)):
            for j in range(i + 1, len(latents)):
                assert not torch.equal(latents[i], latents[j]), (method, SEEDS[i], SEEDS[j])


def test_hundred_prompts_from_several_clients(server, references):
    jobs = [(METHODS[i % len(METHODS)], SEEDS[(i // len(METHODS)) % len(SEEDS)], i) for i in range(PROMPTS)]
    batches = [[(f"{method}|{seed}|{i}", method_graph(method, seed, 1 + i, f"load_{i}"))
                for method, seed, i in jobs[c::CLIENTS]] for c in range(CLIENTS)]

    pid = server.process.pid
    start_mb = rss_mb(pid)
    curve = [(0, 0.0, start_mb)]
    done = Counter()
    lock = threading.Lock()
    started = time.time()

    def on_done() -> None:
        with lock:
            done["prompts"] += 1
            if done["prompts"] % 10 == 0:
                curve.append((done["prompts"], time.time() - started, rss_mb(pid)))

    clients = run_clients(server, batches, on_done)
    elapsed = time.time() - started
    end_mb = rss_mb(pid)

    checked = 0
    for client in clients:
        for prompt_id, label in client.prompt_ids.items():
            assert client.finished[prompt_id] == "success", label
            method, seed, _ = label.split("|")
            got = saved_latent(server, sampled_outputs(server, prompt_id))
            assert torch.equal(got, references[method, int(seed)]), f"{label}: output differs from its reference"
            checked += 1
    assert checked == PROMPTS

    lines = ["prompts_done,seconds,rss_mb"] + [f"{n},{t:.2f},{mb:.1f}" for n, t, mb in curve]
    docs_path("load_memory.csv").write_text("\n".join(lines) + "\n")
    print(f"\n{PROMPTS} prompts from {CLIENTS} clients in {elapsed:.1f} s = {PROMPTS / elapsed:.2f} prompts/s; "
          f"server RSS {start_mb:.1f} MB after warm-up -> {end_mb:.1f} MB after the run")
    print("\n".join(lines))
    assert end_mb - start_mb <= MEMORY_BUDGET_MB, f"server memory grew by {end_mb - start_mb:.1f} MB under load"


def test_training_and_sampling_queued_together(server, references, demo_weights):
    alone = server.run(with_sampled_latents(training_graph("load_alone", steps=4, save_every=0, resume=False)))
    assert alone.success, alone.messages[-3:]

    training = [("train", with_sampled_latents(training_graph("load_together", steps=4, save_every=0, resume=False)))]
    sampling = [(f"{method}|{seed}|x", method_graph(method, seed, 500 + i, f"together_{i}"))
                for i, (method, seed) in enumerate((m, s) for m in METHODS for s in SEEDS[:2])]
    clients = run_clients(server, [training, sampling[::2], sampling[1::2]])
    for client in clients:
        for prompt_id, label in client.prompt_ids.items():
            assert client.finished[prompt_id] == "success", label
            if label != "train":
                method, seed, _ = label.split("|")
                got = saved_latent(server, sampled_outputs(server, prompt_id))
                assert torch.equal(got, references[method, int(seed)]), label

    folder = server.base_dir / "output" / "stride_checkpoints"
    together = load_checkpoint(str(folder / "load_together.safetensors"))
    solo = load_checkpoint(str(folder / "load_alone.safetensors"))
    assert together.step == solo.step == 4
    assert all(torch.equal(together.loras["student"][key], solo.loras["student"][key])
               for key in solo.loras["student"])
