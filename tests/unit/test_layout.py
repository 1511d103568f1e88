"""The architecture of ``distill_core``: no host imports, and dependencies that run one way.

training -> sampling -> spaces; reference -> spaces; training, sampling and reference may use ``safe_files``, training
and sampling ``progress``; ``safe_files``, ``progress`` and ``spaces`` depend on nothing of the package; nothing
imports ``nodes`` or ComfyUI. Checked on the import statements of every module, and by importing the whole library
in a fresh interpreter that has no ComfyUI on its path.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "distill_core"
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "latent_preview", "nodes", "server", "execution")
# package -> the packages of distill_core it may import (besides itself)
ALLOWED = {
    "spaces": set(),
    "safe_files": set(),
    "progress": set(),
    "piflow_adapter": {"sampling"},
    "methods": {"sampling", "spaces"},
    "sampling": {"spaces", "safe_files", "progress"},  # safe_files: saved optimal-steps schedules
    "training": {"sampling", "spaces", "safe_files", "progress"},
    "reference": {"spaces", "safe_files"},
}


def _group(path: Path) -> str:
    relative = path.relative_to(CORE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(level, absolute-or-relative module)`` of every import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


MODULES = sorted(path for path in CORE.rglob("*.py") if path.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(CORE)))
def test_imports_run_one_way_and_never_reach_the_host(path: Path) -> None:
    group = _group(path)
    for level, module in _imports(path):
        if level == 0:
            assert module.split(".")[0] not in HOST_MODULES, f"{path.name} imports the host module {module}"
            assert not module.startswith("distill_core"), f"{path.name}: use a relative import for {module}"
            continue
        inside = path.parent.relative_to(CORE).parts
        target = (list(inside[: len(inside) - (level - 1)]) if level > 1 else list(inside)) + module.split(".")
        target_group = target[0] if target and target[0] else group
        if target_group != group:
            assert target_group in ALLOWED[group], f"{path.relative_to(CORE)} imports {target_group} ({module})"


def test_library_imports_without_comfyui() -> None:
    code = ("import sys, importlib, pkgutil, distill_core\n"
            "for info in pkgutil.walk_packages(distill_core.__path__, 'distill_core.'):\n"
            "    importlib.import_module(info.name)\n"
            f"bad = sorted(name for name in sys.modules if name.split('.')[0] in {HOST_MODULES!r})\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=CORE.parent, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
