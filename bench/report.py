"""RESULTS.md: a header about the latest run, then one marked block per benchmark.

Each block carries its own provenance line (date, tier, device, threads, load), so a run of a
single benchmark (``--only NAME``) replaces that block and keeps the others as they were.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .harness import Section

_BLOCK = re.compile(r"<!-- section:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /section:(?P=name) -->\n", re.S)
_GOAL_MARK = {"met": "MET", "missed": "MISSED", "undecided": "UNDECIDED"}


def render_section(section: Section, provenance: str, results_path: Path) -> str:
    """The markdown block of one successful benchmark."""
    lines = [f"## {section.title}", "", f"_{provenance}_", "", section.summary, ""]
    if section.checks:
        lines += ["Sanity checks (passed before any number below was recorded):", ""]
        lines += [f"- {item}" for item in section.checks] + [""]
    if section.goals:
        lines += ["Goals:", ""]
        lines += [f"- **{_GOAL_MARK[goal.status]}** {goal.text}: {goal.evidence}" for goal in section.goals] + [""]
    for table in section.tables:
        lines += [table.to_markdown(), ""]
    for plot in section.plots:
        link = os.path.relpath(plot, results_path.parent)
        lines += [f"![{plot.stem}]({link})", ""]
    if section.notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in section.notes] + [""]
    return "\n".join(lines)


def render_failure(title: str, provenance: str, error: str) -> str:
    """The markdown block of a benchmark whose sanity check (or run) failed: no numbers at all."""
    return "\n".join([f"## {title}", "", f"_{provenance}_", "", f"**FAILED**: {error}", "",
                      "No measurements are reported for a benchmark whose own checks failed.", ""])


def existing_blocks(text: str) -> dict[str, str]:
    """``{name: markdown}`` of the benchmark blocks in an existing RESULTS.md."""
    return {match["name"]: match["body"] for match in _BLOCK.finditer(text)}


def merge(header: str, previous_text: str, new_blocks: dict[str, str], order: list[str]) -> str:
    """A full RESULTS.md: ``header``, then blocks in ``order`` (new ones replace previous ones;
    previous blocks of benchmarks not in ``order`` follow at the end)."""
    blocks = existing_blocks(previous_text) | new_blocks
    names = [name for name in order if name in blocks] + [name for name in blocks if name not in order]
    parts = [header.rstrip() + "\n"]
    for name in names:
        parts.append(f"<!-- section:{name} -->\n{blocks[name].rstrip()}\n<!-- /section:{name} -->\n")
    return "\n".join(parts)


def render_header(facts: dict[str, str], command: str) -> str:
    lines = [
        "# Stride benchmark results",
        "",
        f"Written by `{command}` (`python -m bench.run [--quick] [--only NAME] [--gpu]`). Ratios are measured "
        "side by side in one process on the same inputs, with interleaved repeats, and reported as medians; "
        "absolute times depend on the machine and its load, ratios much less. Every section states its own run.",
        "",
        "Machine of the latest run:",
        "",
        "| fact | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in facts.items()]
    return "\n".join(lines) + "\n"
