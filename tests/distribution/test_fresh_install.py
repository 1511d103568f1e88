"""Install Stride the way the README tells a user: clone it into the custom_nodes folder of a host that has
only ComfyUI's own requirements, `pip install -r requirements.txt`, start ComfyUI. Stride must import, keep
the host's torch, register all its nodes and run a graph over HTTP.

Costs about two minutes (a new virtual environment; pip reuses its cache)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_host

ROOT = Path(__file__).resolve().parents[2]
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
HOST_TORCH = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$")
# ComfyUI 0.3.75 imports requests at start-up (app/frontend_management.py) but does not list it in its
# requirements.txt (0.33 does): the host cannot start without it. Stride does not import it.
HOST_UNLISTED = ["requests"]


def run(command: list, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def pip(python: Path, *arguments: str) -> str:
    return run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *arguments])


def torch_version(python: Path) -> str:
    return run([str(python), "-c", "import torch; print(torch.__version__)"]).strip()


@pytest.fixture(scope="module")
def bare_host(tmp_path_factory):
    """A virtual environment with torch and what ComfyUI needs to start only, and an empty custom_nodes folder."""
    work = tmp_path_factory.mktemp("fresh-install")
    run([sys._base_executable, "-m", "venv", str(work / "venv")])
    python = work / "venv" / "bin" / "python"
    host = comfy_host.host_dir()
    host_requirements = work / "host-requirements.txt"
    lines = (host / "requirements.txt").read_text(encoding="utf-8").splitlines()
    host_requirements.write_text("\n".join(line for line in lines if not HOST_TORCH.match(line)) + "\n")
    pip(python, *TORCH_PINS, *HOST_UNLISTED, "-r", str(host_requirements))
    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True)
    return python, base


def test_clone_into_custom_nodes_and_pip_install_requirements_works(bare_host):
    python, base = bare_host
    torch_before = torch_version(python)

    clone = base / "custom_nodes" / "stride"
    run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone)])
    pip(python, "-r", str(clone / "requirements.txt"))
    assert torch_version(python) == torch_before, "installing Stride must keep the host's torch"
    test_only = run([str(python), "-c", "import importlib.util as u; print([m for m in ('diffusers', 'peft') "
                                        "if u.find_spec(m)])"]).strip()
    assert test_only == "[]", "the test-only reference implementations must stay out of a user's install"

    server = comfy_host.ServerHost(base, python=python)
    try:
        server.wait_ready(timeout=240)
        imports = [line for line in server.log_path.read_text().splitlines() if line.rstrip().endswith(str(clone))]
        assert imports and not any("IMPORT FAILED" in line for line in imports), server.log_tail()
        documented = set(re.findall(r"^## .*\(`(Stride\w+)`\)$", (clone / "docs" / "NODES.md").read_text(), re.M))
        assert len(documented) > 20 and documented <= set(server.object_info), \
            "every documented Stride node is registered"

        result = server.run({
            "model": {"class_type": "StrideDemoModel", "inputs": {}},
            "disc": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "disc"}},
            "empty": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "run": {"class_type": "StrideFewStepSample", "inputs": {
                "model": ["model", 0], "positive": ["disc", 0], "negative": ["empty", 0], "latent_image": ["latent", 0],
                "method": "lcm", "steps": 4, "cfg": 1.0, "gamma": 0.3, "eta": 0.2, "seed": 1, "denoise": 1.0}},
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "fresh"}},
        }, timeout=120)
        assert result.success, result.error()
        assert list((base / "output").rglob("fresh*.latent"))
    finally:
        server.stop()
