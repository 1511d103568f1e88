"""Shared workflows are well-formed UI files, use only core and Stride nodes, carry a thumbnail,
and the host serves them as the pack's templates (no browser needed: plain HTTP to the server)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

import comfy_host as host
import make_workflows
from tests.browser import hygiene

WORKFLOWS = host.ROOT / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
PACK = "stride"  # the pack's folder name under custom_nodes (prepare_base_dir links it so)
CORE_MODULES = ("nodes", "comfy_extras")  # python_module of ComfyUI's own nodes in /object_info
THUMBNAIL_WIDTH = 400


def _thumbnail(path: Path) -> Path:
    """Frontend 1.32.9 asks for ``<name>.jpg`` next to an extension's template (mediaSubtype is fixed to jpg)."""
    return path.with_suffix(".jpg")


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_is_ui_format_with_positions_groups_and_a_note(path: Path):
    workflow = host.load_workflow(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert len(node["pos"]) == 2 and len(node["size"]) == 2, f"node #{node['id']} has no position/size"
    notes = [node for node in nodes.values() if node["type"] in ("Note", "MarkdownNote")]
    assert notes and all(str(note["widgets_values"][0]).strip() for note in notes), "a note says what to change"

    assert workflow["groups"], "related nodes are grouped"
    for group in workflow["groups"]:
        x, y, width, height = group["bounding"]
        inside = [n for n in nodes.values() if x <= n["pos"][0] <= x + width and y <= n["pos"][1] <= y + height]
        assert group["title"] and inside, f"group '{group['title']}' frames no node"

    for link_id, source, source_slot, target, target_slot, _kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"], f"link {link_id} missing at its source"
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, f"link {link_id} missing at its target"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_uses_only_core_and_stride_nodes(path: Path, object_info: dict):
    for node in host.load_workflow(path)["nodes"]:
        kind = node["type"]
        if kind in host.FRONTEND_ONLY:
            continue
        assert kind in object_info, f"node #{node['id']}: the host has no node type '{kind}'"
        module = object_info[kind]["python_module"]
        if module.split(".")[0] in CORE_MODULES:
            continue
        assert module == f"custom_nodes.{PACK}", f"node #{node['id']} '{kind}' comes from {module}, not core or Stride"
        assert kind.startswith("Stride"), f"Stride node type '{kind}' lacks the Stride prefix"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_has_a_small_jpeg_thumbnail(path: Path):
    thumbnail = _thumbnail(path)
    assert thumbnail.is_file(), f"missing {thumbnail.name}: run scripts/make_thumbnails.py {path.stem}"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG"
        assert image.width == THUMBNAIL_WIDTH and image.height <= THUMBNAIL_WIDTH
    assert thumbnail.stat().st_size < 80_000


def test_host_lists_the_workflows_as_the_packs_templates(comfy_server):
    listed = comfy_server.get_json("/api/workflow_templates")
    assert sorted(listed.get(PACK, [])) == [path.stem for path in WORKFLOW_FILES]


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_host_serves_each_template_and_its_thumbnail(comfy_server, path: Path):
    served = comfy_server.get(f"/api/workflow_templates/{PACK}/{path.name}")
    assert json.loads(served) == json.loads(path.read_text())
    thumbnail = _thumbnail(path)
    if thumbnail.is_file():  # a missing thumbnail is reported by test_workflow_has_a_small_jpeg_thumbnail
        served_image = comfy_server.get(f"/api/workflow_templates/{PACK}/{thumbnail.name}")
        assert served_image == thumbnail.read_bytes()
        assert Image.open(io.BytesIO(served_image)).format == "JPEG"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_layout_is_tidy_in_the_frontend(frontend, path: Path):
    """No overlapping nodes, no node smaller than the frontend needs (with room for the image preview a run
    adds), no group title covered or clipped: measured in the real frontend after loading the file."""
    workflow = json.loads(path.read_text())
    frontend.load(workflow, path.stem)
    frontend.page.wait_for_function("n => window.app.graph._nodes.length === n", arg=len(workflow["nodes"]))
    layout = hygiene.measure(frontend.page)
    shown = {str(n["id"]): [n["x"], n["y"], n["width"], n["height"]] for n in layout["nodes"]}
    written = {str(n["id"]): [*n["pos"], *n["size"]] for n in workflow["nodes"]}
    assert shown == written, "the frontend moved or resized nodes"
    assert hygiene.problems(layout) == []


def test_shipped_files_are_what_the_generator_writes(object_info: dict):
    """workflows/*.json and web/workflow_templates.json come from scripts/make_workflows.py (its layout is
    the one the frontend checks above); a hand edit or a stale file fails here."""
    graphs = make_workflows.build_all()
    assert sorted(graphs) == [path.stem for path in WORKFLOW_FILES]
    for name, graph in graphs.items():
        assert graph.to_ui(object_info) == json.loads((WORKFLOWS / f"{name}.json").read_text()), (
            f"{name}.json differs from what scripts/make_workflows.py writes; run it")
    assert make_workflows.template_index(graphs) == json.loads(make_workflows.TEMPLATE_INDEX.read_text())
    for template in make_workflows.template_index(graphs)[0]["templates"]:
        # What a template card shows in full (frontend 1.32.9: one line of title, two of description).
        assert 0 < len(template["title"]) <= 26, f"{template['name']}: a title of at most 26 characters"
        assert 0 < len(template["description"]) <= 75, f"{template['name']}: a description of at most 75 characters"
