"""Shared pytest fixtures: a real ComfyUI host in-process and as a server.

Both are session-scoped (starting ComfyUI costs seconds); the server is always stopped at
teardown, also when a test fails. Unit tests of ``distill_core`` never touch either.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import comfy_host as host  # noqa: E402


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory) -> host.InProcessHost:
    """ComfyUI imported into the test process, with Stride loaded as a custom node."""
    return host.InProcessHost(tmp_path_factory.mktemp("comfy-inprocess"))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """``main.py --cpu`` on a free loopback port, stopped at the end of the session."""
    server = host.ServerHost(tmp_path_factory.mktemp("comfy-server"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def pytest_collection_modifyitems(config, items):
    """Mark tests by folder so `-m unit` / `-m host` / `-m server` / `-m browser` select them."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "host", "server", "browser", "workflows", "benchmarks", "reliability", "distribution"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))
