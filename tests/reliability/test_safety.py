"""Safety: Stride never unpickles, never writes outside ComfyUI's folders, never reaches the network.

Pickle: loading a pickle (raw or torch.save zip) as LoRA, adapter, training checkpoint or demo
weights is refused while ``pickle`` and ``torch.load`` are booby-trapped, and no Stride module
imports pickle or calls a pickle-based loader. Files: training checkpoints and saved LoRAs land in
output/ and models/loras/ and nowhere else, for any name a user can type. Network: with sockets
to non-loopback addresses blocked in this process, representative graphs run without a single
attempt, and no Stride module imports an HTTP client or a model-hub downloader.
"""
from __future__ import annotations

import ast
import io
import pickle
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.reliability.support import (
    changed_files,
    class_prompt,
    empty_latent,
    hybrid_graph,
    reference_model,
    sampling_graph,
    snapshot,
    training_graph,
    with_sampled_latents,
)

ROOT = Path(__file__).resolve().parents[2]
STRIDE_SOURCES = sorted([ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py"), *(ROOT / "distill_core").glob("*.py")])
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}
PICKLE_CALLS = {"torch.load", "torch.serialization.load", "torch.jit.load", "np.load", "numpy.load", "load_torch_file",
                "pickle.load", "pickle.loads"}
NETWORK_MODULES = {"socket", "ssl", "urllib", "urllib3", "http", "requests", "httpx", "aiohttp", "websocket",
                   "websockets", "ftplib", "smtplib", "huggingface_hub"}
NETWORK_CALLS = {"hf_hub_download", "snapshot_download", "from_pretrained", "torch.hub.load",
                 "load_state_dict_from_url", "download_url_to_file", "urlopen"}


# ------------------------------------------------------------------------------------------
# Source checks (AST, so docstrings that mention pickle do not count)
# ------------------------------------------------------------------------------------------
def dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return ""


def imports_and_calls(path: Path) -> tuple[set[str], set[str]]:
    """Top-level module names imported by ``path`` and the dotted names it calls (also their last parts)."""
    tree = ast.parse(path.read_text(), str(path))
    imported, called = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
            called.update(alias.name for alias in node.names)  # `from x import load_torch_file` counts as using it
        elif isinstance(node, ast.Call):
            name = dotted_name(node.func)
            called.update({name, name.rsplit(".", 1)[-1]})
    return imported, called


def test_the_source_check_sees_pickle_and_network_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nfrom urllib.request import urlopen\nimport torch\n"
                      "x = torch.load('a.pt')\ny = urlopen('http://x')\n")
    imported, called = imports_and_calls(sample)
    assert {"pickle", "urllib"} <= imported and {"torch.load", "urlopen"} <= called


def test_stride_code_never_imports_pickle_or_calls_a_pickle_loader():
    assert len(STRIDE_SOURCES) > 10
    for path in STRIDE_SOURCES:
        imported, called = imports_and_calls(path)
        assert not imported & PICKLE_MODULES, f"{path.relative_to(ROOT)} imports {imported & PICKLE_MODULES}"
        assert not called & PICKLE_CALLS, f"{path.relative_to(ROOT)} calls {called & PICKLE_CALLS}"


def test_stride_code_never_imports_a_network_client_or_downloader():
    for path in STRIDE_SOURCES:
        imported, called = imports_and_calls(path)
        assert not imported & NETWORK_MODULES, f"{path.relative_to(ROOT)} imports {imported & NETWORK_MODULES}"
        assert not called & NETWORK_CALLS, f"{path.relative_to(ROOT)} calls {called & NETWORK_CALLS}"


# ------------------------------------------------------------------------------------------
# Pickle files are refused before anything is unpickled
# ------------------------------------------------------------------------------------------
def pickle_payloads() -> dict[str, bytes]:
    zipped = io.BytesIO()
    torch.save({"diffusion_model.x.lora_up.weight": torch.zeros(2, 2)}, zipped)
    return {"raw": pickle.dumps({"weights": [0.0] * 4}), "torch.save": zipped.getvalue()}


@pytest.fixture
def unpickling_trapped(monkeypatch):
    """Every way to unpickle raises and is recorded; the test asserts the record stays empty."""
    calls: list[str] = []

    def trap(name: str):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return refuse

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                        (torch.serialization, "load")):
        monkeypatch.setattr(owner, name, trap(f"{owner.__name__}.{name}"))
    return calls


def stride_module(host_, node: str, module_suffix: str):
    """A module of Stride as ComfyUI imported it, found through one of its nodes."""
    package = host_.nodes.NODE_CLASS_MAPPINGS[node].__module__.rsplit(".", 2)[0]
    return sys.modules[f"{package}.{module_suffix}"]


@pytest.mark.parametrize("kind", ["raw", "torch.save"])
def test_pickles_offered_as_lora_adapter_checkpoint_or_weights_are_refused_unread(fault_host, unpickling_trapped,
                                                                                  kind, tmp_path):
    payload = pickle_payloads()[kind]
    loras = Path(fault_host.folder_paths.get_folder_paths("loras")[0])
    for name in (f"safety_{kind}.pt", f"safety_{kind}.ckpt", f"safety_{kind}_renamed.safetensors"):
        (loras / name).write_bytes(payload)
    fault_host.folder_paths.filename_list_cache.clear()
    refusals = []

    for name in (f"safety_{kind}.pt", f"safety_{kind}.ckpt", f"safety_{kind}_renamed.safetensors"):
        graph = sampling_graph(prefix="safety")
        graph["base"] = reference_model()
        graph["name"] = {"class_type": "PrimitiveString", "inputs": {"value": name}}
        graph["model"] = {"class_type": "StrideReloadLoRA", "inputs": {"model": ["base", 0], "lora_name": ["name", 0],
                                                                       "strength": 1.0}}
        result = fault_host.run(graph)
        assert not result.success
        refusals.append(result.error()["exception_message"])

    piflow_nodes = stride_module(fault_host, "StridePiFlowAdapterLoader", "nodes.piflow_loader")
    for name in (f"safety_{kind}.pt", f"safety_{kind}_renamed.safetensors"):
        with pytest.raises(piflow_nodes.StrideError) as refused:
            piflow_nodes.read_adapter_file(name)
        refusals.append(str(refused.value))

    distill = stride_module(fault_host, "StrideDistillLoRA", "distill_core.training.checkpoint")
    demo = stride_module(fault_host, "StrideDemoModel", "distill_core.reference.demo")
    pickled = tmp_path / "checkpoint.safetensors"
    pickled.write_bytes(payload)
    for load in (distill.load_checkpoint, demo.load_demo_weights):
        with pytest.raises(Exception) as refused:
            load(pickled)
        refusals.append(str(refused.value))

    assert not unpickling_trapped, f"unpickling was attempted: {unpickling_trapped}"
    assert all("pickle" in message or "safetensors" in message or "header" in message for message in refusals), refusals


def test_resuming_from_a_pickled_checkpoint_is_refused_unread(fault_host, demo_weights, unpickling_trapped):
    folder = Path(fault_host.folder_paths.get_output_directory()) / "stride_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "safety_pickled_run.safetensors").write_bytes(pickle_payloads()["torch.save"])
    result = fault_host.run(training_graph("safety_pickled_run", steps=1))
    assert not result.success and "resume" in result.error()["exception_message"]
    assert not unpickling_trapped, f"unpickling was attempted: {unpickling_trapped}"


# ------------------------------------------------------------------------------------------
# Files stay inside output/, models/ and temp/
# ------------------------------------------------------------------------------------------
TRICKY_NAMES = ["lora", "my lora v2", "a.b.c", "x" * 120, "x" * 121, "..", "a/../b", "../../etc/passwd", "/etc/passwd",
                "\\\\server\\share\\x", "C:\\Windows\\x", "C:x", "~/x", "$HOME", "%APPDATA%", "a\x00b", "a\nb",
                "\uff0e\uff0e\uff0fx", "nul", "Com1.safetensors", "lpt9.txt", ".hidden", "-rf", "name.", "name ",
                " name", "a:b", "a*b", "a?b", "a<b>", "a|b", 'a"b', "é", "名前"]


def test_any_accepted_name_stays_a_direct_child_of_its_folder(fault_host):
    training = stride_module(fault_host, "StrideDistillLoRA", "nodes.training")
    output = Path(fault_host.folder_paths.get_output_directory()).resolve()
    accepted = []
    for name in TRICKY_NAMES:
        try:
            file_name = training.safe_file_name(name, "file_name")
        except training.StrideError as refused:
            assert str(refused).startswith("file_name: "), refused
            continue
        accepted.append(name)
        checkpoint = training.checkpoint_path(name).resolve()
        assert checkpoint.parent == output / "stride_checkpoints" and checkpoint.name == file_name, name
        assert Path(file_name).name == file_name and "\\" not in file_name and "\x00" not in file_name
    assert sorted(accepted) == sorted(["lora", "my lora v2", "a.b.c", "x" * 120, "name.", "name ", " name"]), accepted


def test_training_and_saving_write_only_the_checkpoint_and_the_lora(fault_host, demo_weights):
    base = Path(fault_host.base_dir)
    before = snapshot(base, skip=("temp",))
    graph = with_sampled_latents(training_graph("safety_paths", steps=2, save_every=1))
    graph["save"] = {"class_type": "StrideSaveLoRA", "inputs": {"lora": ["train", 1], "file_name": "safety_paths_lora",
                                                                "overwrite": False}}
    result = fault_host.run(graph)
    assert result.success, result.error()
    new = set(changed_files(before, snapshot(base, skip=("temp",))))
    assert new == {"output/stride_checkpoints/safety_paths.safetensors",
                   "models/loras/safety_paths_lora.safetensors"}, new
    for path in new:
        with safe_open(str(base / path), framework="pt") as reader:
            assert list(reader.keys())


# ------------------------------------------------------------------------------------------
# No network
# ------------------------------------------------------------------------------------------
def is_local(address) -> bool:
    """A Unix socket path, no host (a passive lookup), or a loopback host."""
    if isinstance(address, (str, bytes)):
        return True
    host_ = address[0]
    if isinstance(host_, bytes):
        host_ = host_.decode()
    return host_ is None or host_ in ("localhost", "::1", "0:0:0:0:0:0:0:1") or host_.startswith("127.")


@pytest.fixture
def network_blocked(monkeypatch):
    """Connections and name lookups for anything but loopback (and Unix sockets) raise and are recorded."""
    attempts: list[str] = []

    def guard(name: str, original, address_of):
        def guarded(*args, **kwargs):
            address = address_of(*args, **kwargs)
            if not is_local(address):
                attempts.append(f"{name}{address!r}")
                raise OSError(f"network access blocked by the safety test: {name} {address!r}")
            return original(*args, **kwargs)
        return guarded

    monkeypatch.setattr(socket.socket, "connect",
                        guard("connect", socket.socket.connect, lambda self, address: address))
    monkeypatch.setattr(socket.socket, "connect_ex",
                        guard("connect_ex", socket.socket.connect_ex, lambda self, address: address))
    monkeypatch.setattr(socket, "create_connection",
                        guard("create_connection", socket.create_connection, lambda address, *a, **k: address))
    monkeypatch.setattr(socket, "getaddrinfo",
                        guard("getaddrinfo", socket.getaddrinfo, lambda host_, *a, **k: (host_,)))
    return attempts


def test_the_network_guard_blocks_outside_addresses(network_blocked):
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("198.51.100.7", 443), timeout=1)
    assert network_blocked == ["create_connection('198.51.100.7', 443)"]


def representative_graphs() -> dict[str, dict]:
    sampling = sampling_graph(method="tdd", prefix="safety_net", batch=4, steps=4)
    sampling["metrics"] = {"class_type": "StrideReferenceMetrics",
                           "inputs": {"samples": ["run", 0], "conditioning": ["pos", 0], "label": "safety"}}
    sampling["image"] = {"class_type": "StrideLatentToImage", "inputs": {"samples": ["run", 0], "scale": 2}}
    sampling["diversity"] = {"class_type": "StrideImageDiversity", "inputs": {"images": ["image", 0],
                                                                                "label": "safety"}}
    demo = sampling_graph(method="lcm", prefix="safety_demo", batch=2, steps=4)
    demo["model"] = {"class_type": "StrideDemoModel", "inputs": {}}
    hybrid = hybrid_graph(prefix="safety_hybrid", batch=2)
    piflow = {"model": {"class_type": "StridePiFlowReferenceModel", "inputs": {}}, "pos": class_prompt(""),
              "latent": empty_latent(2),
              "run": {"class_type": "StridePiFlowSample", "inputs": {
                  "model": ["model", 0], "positive": ["pos", 0], "latent_image": ["latent", 0], "steps": 2,
                  "substeps": 8, "diffusion_coefficient": 0.0, "shift": 3.2, "final_step_size_scale": 0.5,
                  "temperature": "auto", "manual_temperature": 1.0, "seed": 0, "denoise": 1.0}},
              "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "safety_pi"}}}
    training = training_graph("safety_network", steps=2)
    return {"sampling + metrics + diversity": sampling, "demo model": demo, "hybrid": hybrid, "pi-flow": piflow,
            "training": training}


def test_representative_graphs_never_reach_the_network(fault_host, demo_weights, network_blocked):
    for name, graph in representative_graphs().items():
        result = fault_host.run(graph)
        assert result.success, (name, result.error())
    assert not network_blocked, f"network access attempted: {network_blocked}"
