"""Where tests put the pictures and curves the docs show.

They go to ``docs/`` (tracked, linked from the README) only when ``STRIDE_WRITE_DOCS=1``; an
ordinary test run writes them under ``.cache/test-docs/`` so that it leaves the work tree clean.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def docs_path(relative: str) -> Path:
    """``docs/<relative>`` when refreshing the docs, else the same path under ``.cache/test-docs``."""
    base = ROOT / "docs" if os.environ.get("STRIDE_WRITE_DOCS") else ROOT / ".cache" / "test-docs"
    path = base / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
