"""Every shipped workflow converts from UI to API format and runs through the real host."""
import json
from pathlib import Path

import pytest

import comfy_host as host

WORKFLOW_FILES = sorted((host.ROOT / "workflows").glob("*.json"))


def test_there_are_workflows():
    assert len(WORKFLOW_FILES) >= 5


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_is_ui_format_with_notes(path: Path):
    data = json.loads(path.read_text())
    assert {"nodes", "links", "groups", "version"} <= set(data)
    assert all("pos" in node and "size" in node for node in data["nodes"])
    assert any(node["type"] in ("Note", "MarkdownNote") for node in data["nodes"]), "explain what to change"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_runs_headless(comfy_host, path: Path):
    info = comfy_host.object_info
    prompt = host.ui_to_api(host.load_workflow(path), info, name=path.name)
    core_or_stride = [node["class_type"] for node in prompt.values()]
    assert all(kind in info for kind in core_or_stride)
    result = comfy_host.run(prompt)
    assert result.success, result.error()
    images = [item for output in result.outputs.values() for item in output.get("images", [])]
    assert images, "every workflow saves at least one image"
    for item in images:
        assert comfy_host.output_path(item).stat().st_size > 0
    assert result.progress, "the samplers reported progress through ComfyUI's progress bar"
