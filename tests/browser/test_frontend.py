"""Stride in the real ComfyUI frontend: shared workflows load, run and show their images;
Stride nodes are found by the node search; broken workflows get the frontend's normal messages."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import comfy_host as host
from tests.artifacts import docs_path
from tests.browser import hygiene
from workflow_builder import Graph, is_measuring

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
    # Results on the canvas: every measuring node shows its rows as a table (web/stride_results.js).
    tables = frontend.page.evaluate(
        """() => Object.fromEntries(window.app.graph._nodes.filter(n => n.strideResults).map(n => [n.id, {
             rows: n.strideResults.rows,
             cells: Array.from(n.strideResults.element.querySelectorAll('td')).length,
             visible: n.strideResults.element.getBoundingClientRect().height > 0}]))""")
    for node_id, table in tables.items():
        rows = history["outputs"][node_id]["stride_table"]
        assert table["rows"] == rows and table["cells"] > len(rows) and table["visible"], f"node #{node_id}'s table"
    info = comfy_server.object_info
    measuring = [n["id"] for n in nodes if n["type"] in info and is_measuring(info[n["type"]])]
    assert sorted(int(k) for k in tables) == sorted(measuring), "a table on every measuring node"
    layout = hygiene.measure(frontend.page)
    assert sorted(hygiene.previews(layout)) == sorted(image_nodes), "every image node shows its preview"
    assert hygiene.problems(layout) == [], "after the run (previews shown, nodes grown to fit them)"
    frontend.fit_view()
    frontend.screenshot(path.stem)
    compared = [n["id"] for n in nodes if n["type"] == "StrideCompareResults"]
    if compared:  # the workflow's comparison rows, side by side on the canvas
        frontend.fit_view(compared, max_scale=2.0)
        frontend.screenshot(f"{path.stem}_compared")
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
        with contextlib.suppress(Exception):  # playwright's TimeoutError; the callers' assertions say what was listed
            page.locator(f"li.p-autocomplete-option[aria-label='{expected}']").wait_for(state="visible", timeout=10_000)
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
    shown_pictures: set[str] = set()
    for name, card in cards.items():  # the dialog draws a card's picture only while the card is in view
        card.scroll_into_view_if_needed()
        deadline = time.time() + 20
        while name not in shown_pictures and time.time() < deadline:
            shown_pictures |= set(page.evaluate(loaded, [name]))
            time.sleep(0.25)
    without_thumbnail = sorted(set(cards) - shown_pictures)
    page.evaluate("() => document.querySelector(\"[data-testid^='template-workflow-']\").scrollIntoView()")
    frontend.screenshot("templates")
    assert without_thumbnail == [], "template cards whose thumbnail does not load"
    # web/stride_templates.js gives each card its title and description from web/workflow_templates.json.
    (category,) = json.loads((host.ROOT / "web" / "workflow_templates.json").read_text())
    index = {template["name"]: template for template in category["templates"]}
    shown = page.evaluate(
        """names => Object.fromEntries(names.map(n => {
             const card = document.querySelector(`[data-testid='template-workflow-${n}']`);
             return [n, [card.querySelector('h3').textContent, card.querySelector('p').textContent]]; }))""",
        list(cards),
    )
    assert shown == {name: [index[name]["title"], index[name]["description"]] for name in cards}
    first = WORKFLOW_FILES[0]
    with page.expect_response(lambda r: r.url.endswith(f"/workflow_templates/{PACK}/{first.name}")) as response:
        cards[first.stem].click()
    assert response.value.status == 200
    page.wait_for_function("n => window.app.graph._nodes.length === n",
                           arg=len(json.loads(first.read_text())["nodes"]), timeout=15_000)
    assert frontend.dialogs() == {}
    assert frontend.errors(since=mark) == []


def test_live_loss_chart_follows_a_training_run(frontend, comfy_server):
    """The trainer node (web/stride_loss_chart.js and the frontend's progress text) follows a real run: one point
    per step, axes, the step, raw and smoothed loss and time left as text, the data-free pool's phase events
    (stride.distill.phase); the chart is rebuilt after a page reload (from /history) and on a cached run (from the
    node's cached UI output)."""
    path = WORKFLOW_FILES[0].parent / "distill_lcm_lora.json"
    workflow = json.loads(path.read_text())
    page = frontend.page
    frontend.load(workflow, "loss_chart_check")
    steps = 12
    trainer_id = page.evaluate(
        """steps => {
             const node = window.app.graph._nodes.find(n => n.type === 'StrideDistillLoRA');
             for (const [name, value] of [['steps', steps], ['lora_name', 'browser_loss_chart'], ['resume', false]])
               node.widgets.find(w => w.name === name).value = value;
             return node.id;
           }""",
        steps,
    )
    assert page.locator(".stride-loss-chart canvas").count() == 1
    nodes = frontend.graph_nodes()
    image_nodes = [n["id"] for n in nodes if n["type"] in frontend.IMAGE_OUTPUT_TYPES and n["mode"] == 0]
    frontend.fit_view()
    page.evaluate("""id => { window.strideTexts = [];
                             window.comfyAPI.api.api.addEventListener('progress_text', ({detail}) => {
                               if (String(detail.nodeId) === String(id)) window.strideTexts.push(detail.text); }); }""",
                  trainer_id)
    answer = frontend.queue()
    assert answer["http_status"] == 200 and answer["node_errors"] == {}, answer
    frontend.wait_for_images(answer["prompt_id"], image_nodes)
    chart = """id => { const c = window.app.graph.getNodeById(id).strideLossChart;
                       return {panels: c.drawn, caption: c.caption.textContent}; }"""
    shown = page.evaluate(chart, trainer_id)
    (panel,) = shown["panels"]
    assert panel["points"] == steps, f"the chart shows {panel['points']} loss points for a {steps}-step run"
    assert panel["xTicks"] and panel["yTicks"], "both axes carry ticks"
    assert shown["caption"].startswith(f"done: {steps} steps in ")
    phases = json.loads(page.evaluate("id => window.app.graph.getNodeById(id).strideLossChart.canvas.dataset.phases",
                                      trainer_id))
    assert phases.get("teacher data pool") == "8/8", ("the chart followed the data-free pool (16 samples / batch 16 x "
                                                      f"8 teacher calls): {phases}")
    # The node's own progress text (the frontend's text box on the node): step, loss raw and smoothed, time left.
    texts = page.evaluate("() => window.strideTexts")
    assert [t.split(" · ")[0] for t in texts] == [f"step {k}/{steps}" for k in range(1, steps + 1)]
    assert " (smoothed " in texts[0] and " · ETA " in texts[0] and " · done in " in texts[-1]
    shown_text = page.evaluate("""id => window.app.graph.getNodeById(id).widgets
                                    .find(w => w.name === '$$node-text-preview')?.value""", trainer_id)
    assert shown_text == texts[-1], "the last progress text stays on the node"
    frontend.fit_view([trainer_id], max_scale=2.0)
    frontend.screenshot("loss_chart_run")

    page.reload()
    page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
    page.wait_for_function(
        """([id, steps]) => { const c = window.app.graph.getNodeById(id)?.strideLossChart;
                              return c && c.drawn.length && c.drawn[0].points === steps; }""",
        arg=[trainer_id, steps], timeout=30_000)
    page.evaluate("id => window.app.graph.getNodeById(id).strideLossChart.load([])", trainer_id)
    answer = frontend.queue()  # nothing changed: every node is cached and sends its cached UI output
    assert answer["http_status"] == 200, answer
    page.wait_for_function(
        """([id, steps]) => window.app.graph.getNodeById(id).strideLossChart.drawn[0].points === steps""",
        arg=[trainer_id, steps], timeout=60_000)


def test_loss_chart_draws_axes_both_series_and_one_panel_per_phase(frontend):
    """web/stride_loss_chart.js on the trainer node, fed the messages the node sends (live steps, then the
    history in its UI output): axes with ticks, raw and EMA series, the log-scale toggle, a panel per phase."""
    workflow = json.loads((host.ROOT / "workflows" / "distill_lcm_lora.json").read_text())
    frontend.load(workflow, "loss_chart_drawing")
    page = frontend.page
    page.wait_for_function("() => window.app.graph._nodes.some(n => n.strideLossChart)")
    state = """id => { const c = window.app.graph.getNodeById(id).strideLossChart;
                       return {panels: c.drawn, caption: c.caption.textContent}; }"""
    node_id = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'StrideDistillLoRA').id")
    assert page.evaluate(state, node_id)["caption"].startswith("no run yet")
    steps = 40
    page.evaluate(
        """([id, steps]) => {
             const api = window.comfyAPI.api.api;
             let ema = 0;
             for (let step = 1; step <= steps - 10; step++) {
               const loss = 0.3 * Math.exp(-step / 10) + 0.01;
               ema = step === 1 ? loss : 0.9 * ema + 0.1 * loss;
               api.dispatchCustomEvent('stride.distill.loss', {node: String(id), step, steps,
                 losses: {loss}, ema: {loss: ema}, eta_s: 65 * (steps - step), elapsed_s: step});
             }
           }""",
        [node_id, steps],
    )
    running = page.evaluate(state, node_id)
    assert running["caption"] == "step 30/40  ·  ETA 10m 50s"
    (panel,) = running["panels"]
    assert panel["points"] == steps - 10 and panel["log"] is True
    assert len(panel["xTicks"]) >= 2 and len(panel["yTicks"]) >= 2, "both axes carry ticks"
    assert all(0.01 <= t <= 1 for t in panel["yTicks"]) and panel["xTicks"][-1] <= steps
    frontend.fit_view([node_id], max_scale=2.0)
    frontend.screenshot("loss_chart_live")

    page.locator("input.stride-loss-log").click()
    linear = page.evaluate(state, node_id)["panels"][0]
    assert linear["log"] is False and linear["yTicks"] != panel["yTicks"]
    assert page.evaluate("id => window.app.graph.getNodeById(id).properties.stride_loss_log_scale", node_id) is False
    page.locator("input.stride-loss-log").click()

    # The node's UI output after the run (also what a cached run sends): the whole history of a run with two
    # loss series (phases), one of them without a value on every step (null).
    generator = [1.0 / k if k % 2 else None for k in range(1, steps + 1)]
    history = [{"steps": steps, "first_step": 1, "elapsed_s": 125.0,
                "losses": {"generator": generator, "fake score": [0.5] * steps},
                "ema": {"generator": generator, "fake score": [0.5] * steps}}]
    page.evaluate("([id, h]) => window.app.graph.getNodeById(id).onExecuted({stride_loss: h})", [node_id, history])
    done = page.evaluate(state, node_id)
    assert [(p["phase"], p["points"]) for p in done["panels"]] == [("generator", steps // 2), ("fake score", steps)]
    assert done["caption"] == "done: 40 steps in 2m 05s"
    frontend.screenshot("loss_chart_phases")
    assert page.evaluate("id => window.app.graph.getNodeById(id).strideLossChart.canvas.dataset.points",
                         node_id) == str(steps // 2 + steps)


def test_measured_results_show_on_the_canvas_before_and_after(browser, frontend, comfy_server):
    """Stride Reference Metrics and Stride Image Diversity after a run of the hybrid workflow, as a page without
    Stride's results extension shows them (how every frontend showed them before: nothing) and with it (a table).
    Writes the README's before/after picture."""
    from PIL import Image, ImageDraw

    path = host.ROOT / "workflows" / "hybrid_diversity.json"
    workflow = json.loads(path.read_text())
    scores = [n["id"] for n in workflow["nodes"] if n["type"] in ("StrideReferenceMetrics", "StrideImageDiversity")
              and n["widgets_values"][-1] == "hybrid"]
    assert len(scores) == 2

    def run_and_capture(page_frontend) -> Image.Image:
        page_frontend.load(workflow, path.stem)
        page_frontend.fit_view()
        answer = page_frontend.queue()
        assert answer["http_status"] == 200, answer
        page_frontend.wait_for_run(answer["prompt_id"])
        page_frontend.fit_view(scores, max_scale=2.0)
        page_frontend.page.mouse.move(20, 550)
        page_frontend.page.wait_for_timeout(500)
        picture = Image.open(io.BytesIO(page_frontend.page.screenshot()))
        return picture.crop(page_frontend.page_box(scores))

    after = run_and_capture(frontend)
    shown = "ids => ids.every(id => window.app.graph.getNodeById(id).strideResults.rows.length)"
    assert frontend.page.evaluate(shown, scores)
    context = browser.new_context(viewport=frontend.page.viewport_size)
    try:
        context.route("**/extensions/stride/stride_results.js",
                      lambda route: route.fulfill(status=200, content_type="text/javascript", body=""))
        plain = type(frontend)(context.new_page(), comfy_server)
        plain.open()
        before = run_and_capture(plain)
        assert plain.page.evaluate("ids => ids.every(id => !window.app.graph.getNodeById(id).strideResults)", scores)
    finally:
        context.close()
    label = 28
    card = Image.new("RGB", (before.width + after.width + 30, max(before.height, after.height) + label), (24, 24, 24))
    draw = ImageDraw.Draw(card)
    card.paste(before, (0, label))
    card.paste(after, (before.width + 30, label))
    draw.text((6, 8), "before: the scores are computed, nothing shows", fill=(230, 230, 230))
    draw.text((before.width + 36, 8), "after: the scores as a table on the node", fill=(230, 230, 230))
    card.save(docs_path("screenshots/metrics_before_after.png"))
