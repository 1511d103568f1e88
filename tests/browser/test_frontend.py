"""Stride in the real ComfyUI frontend: shared workflows load, run and show their images;
Stride nodes are found by the node search; broken workflows get the frontend's normal messages."""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import comfy_host as host
from workflow_builder import Graph

WORKFLOW_FILES = sorted((host.ROOT / "workflows").glob("*.json"))
PACK = "stride"  # the pack's folder name under custom_nodes (prepare_base_dir links it so)
BLANK = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
         "extra": {}, "version": 0.4}


def _stride_nodes(server) -> dict[str, dict]:
    """Node type -> /object_info entry for every node the server loaded from the Stride pack."""
    return {kind: spec for kind, spec in server.object_info.items() if spec["python_module"] == f"custom_nodes.{PACK}"}


def test_page_starts_without_errors(frontend):
    assert frontend.first_run_templates_shown, "a fresh user sees the Templates dialog first (and the test closed it)"
    assert frontend.errors() == [], "console errors while the app started"
    assert frontend.page.evaluate("() => typeof window.app.queuePrompt") == "function"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_loads_runs_and_shows_its_images(frontend, comfy_server, path: Path):
    mark = frontend.mark()
    workflow = json.loads(path.read_text())
    frontend.drop_file(path.name, path.read_text(), expected_nodes=len(workflow["nodes"]))

    nodes = frontend.graph_nodes()
    assert [n["type"] for n in nodes if not n["registered"]] == [], "node types the frontend does not know"
    assert frontend.MISSING_NODES_DIALOG not in frontend.dialogs()
    assert frontend.page.evaluate("() => window.app.extensionManager.workflow.activeWorkflow.filename") == path.stem

    image_nodes = [n["id"] for n in nodes if n["type"] in frontend.IMAGE_OUTPUT_TYPES and n["mode"] == 0]
    assert image_nodes, "every shared workflow shows at least one image"
    frontend.fit_view()  # LiteGraph loads a node's images when it draws the node: keep every node in view
    answer = frontend.queue()
    assert answer["http_status"] == 200 and answer["node_errors"] == {}, answer
    started = time.time()
    shown = frontend.wait_for_images(answer["prompt_id"], image_nodes)
    print(f"{path.stem}: images shown {time.time() - started:.1f} s after queueing")

    history = comfy_server.get_json(f"/history/{answer['prompt_id']}")[answer["prompt_id"]]
    assert history["status"]["status_str"] == "success"
    for node_id, urls in shown.items():
        saved = [item["filename"] for item in history["outputs"][str(node_id)]["images"]]
        assert [parse_qs(urlparse(url).query)["filename"][0] for url in urls] == saved

    assert frontend.ERROR_DIALOG not in frontend.dialogs()
    frontend.fit_view()
    frontend.screenshot(path.stem, graph_box=True)
    assert [str(e) for e in frontend.errors(since=mark)] == []


def test_stride_nodes_are_found_by_the_node_search(frontend, comfy_server):
    specs = _stride_nodes(comfy_server)
    assert specs, "the server loaded no Stride nodes"
    assert all(spec["display_name"].startswith("Stride ") for spec in specs.values())
    page = frontend.page
    mark = frontend.mark()
    frontend.load(BLANK, "node search")
    field = page.get_by_placeholder("Search Nodes...")

    def open_search() -> None:
        """Double-click an empty canvas, which opens the node search box (again if a busy page missed it)."""
        field.wait_for(state="hidden", timeout=10_000)  # the previous box has finished closing
        page.evaluate("() => { window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true); }")
        box = page.locator("#graph-canvas").bounding_box()
        for _ in range(3):
            page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            try:
                field.wait_for(state="visible", timeout=5_000)
                return
            except Exception:  # noqa: BLE001  (playwright's TimeoutError: try the double-click again)
                continue
        raise AssertionError("double-clicking the canvas does not open the node search box")

    def search(text: str, expected: str) -> list[str]:
        """Type into the open search box; wait until ``expected`` is listed (or 10 s); return the list."""
        field.fill(text)
        try:
            page.locator(f"li.p-autocomplete-option[aria-label='{expected}']").wait_for(state="visible", timeout=10_000)
        except Exception:  # noqa: BLE001  (playwright's TimeoutError; the callers' assertions say what was listed)
            pass
        return page.eval_on_selector_all("li.p-autocomplete-option", "os => os.map(o => o.getAttribute('aria-label'))")

    open_search()
    assert search("Stride LCM", "Stride LCM Scheduler")[:2] == ["Stride LCM Sampler", "Stride LCM Scheduler"]
    frontend.screenshot("node_search")
    for spec in specs.values():
        # What a user types: the name without its parenthesised remark. Typed in full, names longer
        # than about 36 characters find nothing in frontend 1.32.9's fuzzy search.
        query = spec["display_name"].split(" (")[0]
        results = search(query, spec["display_name"])
        assert spec["display_name"] in results, f"searching '{query}' lists {results[:8]}"
    page.keyboard.press("Escape")

    one_per_category = {spec["category"]: kind for kind, spec in specs.items()}
    for kind in one_per_category.values():
        open_search()
        name = specs[kind]["display_name"]
        search(name.split(" (")[0], name)
        page.locator(f"li.p-autocomplete-option[aria-label='{name}']").click()
        added = [n["type"] for n in frontend.graph_nodes()]
        assert added == [kind], f"picking '{name}' added {added}"
    assert frontend.errors(since=mark) == []


def test_unknown_node_type_shows_the_missing_nodes_message(frontend):
    mark = frontend.mark()
    workflow = json.loads(WORKFLOW_FILES[0].read_text())
    workflow["nodes"][0]["type"] = "OtherPackUpscaler"
    frontend.load(workflow, "missing node")
    frontend.page.wait_for_selector(f"[aria-labelledby='{frontend.MISSING_NODES_DIALOG}']", timeout=10_000)
    message = frontend.dialogs()[frontend.MISSING_NODES_DIALOG]
    assert "OtherPackUpscaler" in message
    nodes = frontend.graph_nodes()
    assert len(nodes) == len(workflow["nodes"]), "the graph still loads, with a placeholder for the missing node"
    assert [n["type"] for n in nodes if not n["registered"]] == ["OtherPackUpscaler"]
    frontend.fit_view()
    frontend.screenshot("missing_node")
    frontend.close_dialogs()
    assert frontend.errors(since=mark) == []


def test_missing_model_file_gives_the_validation_error_display(frontend, comfy_server):
    graph = Graph()
    loader = graph.add("CheckpointLoaderSimple", (0, 0), ckpt_name="stride_missing_model.safetensors")
    latent = graph.add("EmptyLatentImage", (0, 200), width=64, height=64, batch_size=1)
    decode = graph.add("VAEDecode", (400, 0), samples=(latent, 0), vae=(loader, 2))
    graph.add("SaveImage", (800, 0), images=(decode, 0), filename_prefix="never_written")
    mark = frontend.mark()
    frontend.load(graph.to_ui(comfy_server.object_info), "missing model")
    assert frontend.dialogs() == {}
    frontend.fit_view()
    answer = frontend.queue()
    assert answer["http_status"] == 400
    assert [e["type"] for e in answer["node_errors"][str(loader.id)]["errors"]] == ["value_not_in_list"]
    frontend.page.wait_for_selector(f"[aria-labelledby='{frontend.ERROR_DIALOG}']", timeout=10_000)
    message = frontend.dialogs()[frontend.ERROR_DIALOG]
    assert "Prompt outputs failed validation" in message and "stride_missing_model.safetensors" in message
    frontend.screenshot("missing_model")
    frontend.close_dialogs()
    # The rejected POST /prompt and the frontend's PromptExecutionError are how it reports a bad prompt.
    unexpected = [e for e in frontend.errors(since=mark)
                  if "status of 400 (Bad Request)" not in e.text and not e.text.startswith("PromptExecutionError")]
    assert unexpected == []


def test_stride_templates_open_from_the_templates_dialog(frontend):
    page = frontend.page
    mark = frontend.mark()
    frontend.run_command("Comfy.BrowseTemplates")
    dialog = page.locator(f"[aria-labelledby='{frontend.TEMPLATES_DIALOG}']")
    dialog.wait_for(state="visible", timeout=15_000)
    dialog.locator("nav").get_by_text(PACK, exact=True).click()
    cards = {path.stem: dialog.get_by_test_id(f"template-workflow-{path.stem}") for path in WORKFLOW_FILES}
    for card in cards.values():
        card.wait_for(state="visible", timeout=10_000)
    # The card shows the fetched thumbnail as a blob: URL, or the frontend's default picture if it failed.
    loaded = """names => names.filter(n => {
                  const img = document.querySelector(`[data-testid='template-workflow-${n}'] img`);
                  return img && img.complete && img.naturalWidth > 0 && !img.src.includes('default-template'); })"""
    deadline = time.time() + 20
    while len(page.evaluate(loaded, list(cards))) < len(cards) and time.time() < deadline:
        time.sleep(0.5)
    without_thumbnail = sorted(set(cards) - set(page.evaluate(loaded, list(cards))))
    frontend.screenshot("templates")
    assert without_thumbnail == [], "template cards whose thumbnail does not load"
    first = WORKFLOW_FILES[0]
    with page.expect_response(lambda r: r.url.endswith(f"/workflow_templates/{PACK}/{first.name}")) as response:
        cards[first.stem].click()
    assert response.value.status == 200
    page.wait_for_function("n => window.app.graph._nodes.length === n",
                           arg=len(json.loads(first.read_text())["nodes"]), timeout=15_000)
    assert frontend.dialogs() == {}
    assert frontend.errors(since=mark) == []


def test_live_loss_chart_follows_a_training_run(frontend, comfy_server):
    """The training node's chart (web/stride_loss_chart.js) draws one point per websocket loss event and shows the
    data-free pool's phase events (stride.distill.phase) on its panel."""
    path = WORKFLOW_FILES[0].parent / "distill_lcm_lora.json"
    workflow = json.loads(path.read_text())
    frontend.load(workflow, "loss_chart_check")
    steps = 12
    trainer_id = frontend.page.evaluate(
        """steps => {
             const node = window.app.graph._nodes.find(n => n.type === 'StrideDistillLoRA');
             for (const [name, value] of [['steps', steps], ['lora_name', 'browser_loss_chart'], ['resume', false]])
               node.widgets.find(w => w.name === name).value = value;
             return node.id;
           }""",
        steps,
    )
    assert frontend.page.locator("canvas.stride-loss-chart").count() == 1
    nodes = frontend.graph_nodes()
    image_nodes = [n["id"] for n in nodes if n["type"] in frontend.IMAGE_OUTPUT_TYPES and n["mode"] == 0]
    frontend.fit_view()
    answer = frontend.queue()
    assert answer["http_status"] == 200 and answer["node_errors"] == {}, answer
    frontend.wait_for_images(answer["prompt_id"], image_nodes)
    points = frontend.page.evaluate(
        """id => window.app.graph.getNodeById(id).strideLossChart.canvas.dataset.points""", trainer_id
    )
    assert points == str(steps), f"the chart shows {points} loss points for a {steps}-step run"
    phases = json.loads(frontend.page.evaluate(
        """id => window.app.graph.getNodeById(id).strideLossChart.canvas.dataset.phases""", trainer_id
    ))
    assert phases.get("teacher data pool") == "8/8", f"the panel followed the data-free pool (16 samples / batch " \
                                                     f"16 x 8 teacher calls): {phases}"
