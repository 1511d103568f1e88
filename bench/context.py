"""What every benchmark receives: the size tier, the device, where plots go, and one ComfyUI host.

The host is ComfyUI imported into this process (``scripts/comfy_host.InProcessHost``) with Stride
loaded as a custom node, created on first use and shared by all benchmarks of a run. Stride's
nodes and helpers are reached through it (``node``, ``stride_module``), exactly as ComfyUI loaded
them, so a benchmark measures the code a user runs.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from scripts import comfy_host

from .harness import TIERS


@dataclass
class BenchContext:
    """Settings of one benchmark run plus the lazily started ComfyUI host."""

    tier: str
    device: torch.device
    plots_dir: Path
    verbose: bool = True
    _host: comfy_host.InProcessHost | None = field(default=None, repr=False)
    _base_dir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {self.tier!r}")

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """The value for this run's size tier."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.tier]

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    @property
    def host(self) -> comfy_host.InProcessHost:
        """ComfyUI in this process (``--cpu``; CUDA work passes its device explicitly)."""
        if self._host is None:
            if self.device.type == "cuda":
                self._prefer_pytorch_attention()
            self._base_dir = tempfile.TemporaryDirectory(prefix="stride-bench-")
            self.log("starting ComfyUI in-process")
            self._host = comfy_host.InProcessHost(Path(self._base_dir.name))
        return self._host

    def start_host(self) -> None:
        """Start ComfyUI now (the runner does, before any benchmark): benchmarks import ComfyUI's
        modules directly, which needs its checkout on sys.path and its arguments set."""
        _ = self.host

    @staticmethod
    def _prefer_pytorch_attention() -> None:
        """ComfyUI runs in ``--cpu`` mode in-process, where it would pick sub-quadratic attention;
        on CUDA it picks PyTorch's SDPA. Ask for that explicitly (ComfyUI's own
        ``--use-pytorch-cross-attention`` flag) before ComfyUI is imported."""
        path = str(comfy_host.host_dir())
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.options  # noqa: F401  (must precede cli_args)
        from comfy.cli_args import args

        args.use_pytorch_cross_attention = True

    @property
    def comfyui_version(self) -> str:
        return comfy_host.host_version()

    def node(self, class_name: str) -> Any:
        """An instance of a node class as the host registered it."""
        return self.host.nodes.NODE_CLASS_MAPPINGS[class_name]()

    def stride_module(self, dotted: str) -> ModuleType:
        """A module of the Stride package as ComfyUI loaded it, e.g. ``"nodes.reference"``."""
        anchor = self.host.nodes.NODE_CLASS_MAPPINGS["StrideReferenceModel"]
        package = anchor.__module__.rsplit(".nodes.", 1)[0]
        return sys.modules[f"{package}.{dotted}"]

    def close(self) -> None:
        if self._base_dir is not None:
            self._base_dir.cleanup()
            self._base_dir = None
