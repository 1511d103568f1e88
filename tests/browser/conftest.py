"""Fixtures for the browser tests: the real ComfyUI frontend in Debian's headless Chromium.

One ComfyUI server (the session fixture ``comfy_server`` of tests/conftest.py, always stopped
at teardown) and one browser page serve the whole session. Playwright drives the system
``chromium`` binary; no browser is ever downloaded. Without that binary the browser tests
skip and say why.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import comfy_host as host
from tests.artifacts import docs_path

VIEWPORT = {"width": 1440, "height": 900}
# Page pixels (left, top, right, bottom) of that viewport that frontend 1.32.9 leaves free of
# overlays: below the tab bar, workflow menu, Run toolbar and queue toast, right of the side bar,
# above the canvas statistics and zoom controls. Screenshots fit the graph into it.
FREE_AREA = (90, 140, 1420, 790)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]


@dataclass(frozen=True)
class ConsoleEntry:
    """One console error or uncaught page error, with the URL it came from (if any)."""

    kind: str
    text: str
    url: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text[:400]}" + (f" ({self.url})" if self.url else "")


# Known benign console errors, each with the reason it says nothing about Stride or its workflows.
OPTIONAL_USER_FILES = re.compile(
    r"/(api/userdata/user\.css|user\.css|favicon\.ico|api/userdata/comfy\.templates\.json"
    r"|api/userdata\?dir=(workflows|subgraphs))"
)
BENIGN: list[tuple[Callable[[ConsoleEntry], bool], str]] = [
    (lambda e: "status of 404" in e.text and bool(OPTIONAL_USER_FILES.search(e.url)),
     "a fresh user directory has no user.css, favicon, saved workflows, subgraphs or template "
     "settings; the frontend probes for each and the server answers 404"),
    (lambda e: "Content Security Policy" in e.text and "https://api.comfy.org/" in e.text,
     "the host runs with --disable-api-nodes, which makes the server send CSP connect-src 'self'; "
     "the frontend's look-ups of node packs in the online registry are blocked (the test machine is offline anyway)"),
    (lambda e: e.text.startswith("TypeError: Cannot read properties of undefined (reading 'id')")
     and "at onChange" in e.text and "at Proxy.set" in e.text,
     "frontend 1.32.9 bug at start-up: its render-mode watcher stores LiteGraph.Canvas.MinFontSizeForLOD "
     "before that setting is registered; it happens on every fresh page, with or without any custom node"),
    (lambda e: e.text == "Attempted to cleanup event listeners for graph that was never set up"
     and "/assets/GraphView-" in e.url,
     "frontend 1.32.9 (GraphView's cleanupEventListeners) logs this when the start-up graph is swapped before its "
     "listeners were registered; it appears with Stride's web extension removed too, so it is not ours"),
    (lambda e: e.text.startswith("TypeError: Cannot set properties of null (setting 'value')")
     and "primevue/autocomplete" in e.text,
     "frontend 1.32.9 (PrimeVue AutoComplete): closing the node search box after typing fires the input's "
     "change handler while the input is being removed; seen the same with core queries such as 'KSampler'"),
]


def is_benign(entry: ConsoleEntry) -> bool:
    return any(matches(entry) for matches, _ in BENIGN)


class Frontend:
    """One page of the ComfyUI frontend and the console errors it produced."""

    # Dialog keys (the dialog's aria-labelledby) of frontend 1.32.9.
    TEMPLATES_DIALOG = "global-workflow-template-selector"
    MISSING_NODES_DIALOG = "global-missing-nodes"
    ERROR_DIALOG = "global-error"
    IMAGE_OUTPUT_TYPES = ("SaveImage", "PreviewImage")

    def __init__(self, page: Any, server: host.ServerHost) -> None:
        self.page = page
        self.server = server
        self.console: list[ConsoleEntry] = []
        self.first_run_templates_shown = False
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console.append(ConsoleEntry("pageerror", str(error))))

    def _on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console.append(ConsoleEntry("console", message.text, message.location.get("url", "")))

    # -- page state ----------------------------------------------------------------------------
    def open(self) -> None:
        """Load the app; close the Templates dialog that a first visit opens, as a user would."""
        self.page.goto(self.server.url)
        self.page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        templates = self.page.locator(f"[aria-labelledby='{self.TEMPLATES_DIALOG}']")
        try:
            templates.wait_for(state="visible", timeout=15_000)
        except Exception:  # noqa: BLE001  (playwright's TimeoutError: the dialog did not come)
            return
        self.first_run_templates_shown = True
        self.close_dialogs()

    def tidy_for_screenshots(self) -> None:
        """Close the Nodes 2.0 announcement, hide the minimap and keep node text drawn when zoomed out
        (the default drops it below 8 px), so screenshots show a readable graph."""
        banner = self.page.locator("div.h-10:has(> div > span:text('Introducing Nodes 2.0'))")
        if banner.count():
            banner.locator("> button:has(i.icon-\\[lucide--x\\])").click()
            banner.wait_for(state="detached", timeout=5_000)
        self.page.evaluate(
            """async () => {
                 const settings = window.app.extensionManager.setting;
                 await settings.set('Comfy.Minimap.Visible', false);
                 await settings.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
               }"""
        )

    def mark(self) -> int:
        """Position in the console log; ``errors(since=mark)`` reports what came after it."""
        return len(self.console)

    def errors(self, since: int = 0) -> list[ConsoleEntry]:
        return [entry for entry in self.console[since:] if not is_benign(entry)]

    def dialogs(self) -> dict[str, str]:
        """Open dialogs: their key (aria-labelledby) -> visible text."""
        return self.page.evaluate(
            """() => Object.fromEntries(Array.from(document.querySelectorAll('.p-dialog[role=dialog]'))
                 .filter(d => d.getAttribute('aria-labelledby'))
                 .map(d => [d.getAttribute('aria-labelledby'), d.innerText]))"""
        )

    def close_dialogs(self) -> None:
        """Close open dialogs with their close button (the x), as a user would."""
        for _ in range(5):
            open_keys = list(self.dialogs())
            if not open_keys:
                return
            dialog = self.page.locator(f"[aria-labelledby='{open_keys[-1]}']")
            close = dialog.locator(".p-dialog-close-button, button:has(i.pi-times)").filter(visible=True)
            if close.count():
                close.first.click()
            else:
                self.page.keyboard.press("Escape")
            with contextlib.suppress(Exception):  # playwright's TimeoutError: the next round tries again
                dialog.wait_for(state="hidden", timeout=5_000)
        raise AssertionError(f"dialogs do not close: {list(self.dialogs())}")

    def graph_nodes(self) -> list[dict]:
        """Nodes of the current graph: id, type, whether the frontend has that type registered."""
        return self.page.evaluate(
            """() => window.app.graph._nodes.map(n => ({
                 id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
                 mode: n.mode}))"""
        )

    def run_command(self, command_id: str) -> None:
        self.page.evaluate("id => window.app.extensionManager.command.execute(id)", command_id)

    # -- loading and running -------------------------------------------------------------------
    def drop_file(self, name: str, text: str, expected_nodes: int) -> None:
        """Drop a workflow file on the canvas, as a user does from the file manager."""
        self.page.evaluate(
            """([name, text]) => {
                 const files = new DataTransfer();
                 files.items.add(new File([text], name, {type: 'application/json'}));
                 const canvas = document.querySelector('#graph-canvas');
                 const box = canvas.getBoundingClientRect();
                 const at = {clientX: box.x + box.width / 2, clientY: box.y + box.height / 2};
                 for (const type of ['dragenter', 'dragover', 'drop'])
                   canvas.dispatchEvent(new DragEvent(type, {dataTransfer: files, bubbles: true, cancelable: true,
                                                             ...at}));
               }""",
            [name, text],
        )
        self.page.wait_for_function(
            "n => window.app.graph._nodes.length === n", arg=expected_nodes, timeout=30_000
        )

    def load(self, workflow: dict, name: str) -> None:
        """Load a workflow through the app's own API (what the frontend does for a file)."""
        self.page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, name])

    def queue(self) -> dict:
        """Queue the current graph with ``app.queuePrompt(0, 1)``; return the server's answer to POST /prompt."""
        with self.page.expect_response(
            lambda r: r.url.endswith("/prompt") and r.request.method == "POST", timeout=60_000
        ) as response:
            self.page.evaluate("() => window.app.queuePrompt(0, 1)")
        return {"http_status": response.value.status, **response.value.json()}

    def shown_images(self, node_ids: list[int]) -> dict[int, list[str]]:
        """Image URLs the given nodes display, once every one of them has loaded in the page."""
        return self.page.evaluate(
            """ids => Object.fromEntries(ids.map(id => {
                 const node = window.app.graph.getNodeById(id);
                 const imgs = (node && node.imgs) || [];
                 return [id, imgs.filter(i => i.complete && i.naturalWidth > 0).map(i => i.src)];
               }))""",
            node_ids,
        )

    def wait_for_images(self, prompt_id: str, node_ids: list[int], timeout: float = 240.0) -> dict[int, list[str]]:
        """Wait until every image node shows its images; fail at once if the prompt errors."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            shown = {int(k): v for k, v in self.shown_images(node_ids).items()}
            if all(shown.values()):
                return shown
            entry = self.server.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") == "error":
                errors = [f"{data.get('node_type')} #{data.get('node_id')}: {data.get('exception_message', '').strip()}"
                          for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]
                raise AssertionError(f"the prompt failed on the server: {'; '.join(errors)}")
            time.sleep(0.5)
        raise AssertionError(f"no images shown by nodes {node_ids} within {timeout:.0f} s")

    def _view(self, node_ids: list[int] | None = None) -> dict:
        """The extent of the graph (or of some nodes) in graph units, the canvas's place on the page, the zoom."""
        return self.page.evaluate(
            """ids => {
                 const canvas = window.app.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
                 const nodes = window.app.graph._nodes.filter(n => !ids || ids.includes(n.id));
                 const boxes = nodes.map(n => [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title])
                   .concat(ids ? [] : window.app.graph._groups.map(g => Array.from(g._bounding)));
                 const rect = canvas.canvas.getBoundingClientRect();
                 return {
                   extent: [Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1])),
                            Math.max(...boxes.map(b => b[0] + b[2])), Math.max(...boxes.map(b => b[1] + b[3]))],
                   canvas: [rect.x, rect.y], scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset)};
               }""",
            node_ids,
        )

    def fit_view(self, node_ids: list[int] | None = None, max_scale: float = 1.0) -> None:
        """Zoom and pan so the whole graph (or the given nodes) fills ``FREE_AREA``, the part of the page no
        toolbar covers, at most at ``max_scale``.

        LiteGraph draws graph point p at page ``canvas + (p + offset) * scale``.
        """
        view = self._view(node_ids)
        x0, y0, x1, y1 = view["extent"]
        left, top, right, bottom = FREE_AREA
        scale = min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0), max_scale)
        offset = [
            (left - view["canvas"][0] + (right - left - (x1 - x0) * scale) / 2) / scale - x0,
            (top - view["canvas"][1] + (bottom - top - (y1 - y0) * scale) / 2) / scale - y0,
        ]
        self.page.evaluate(
            """([scale, offset]) => {
                 const canvas = window.app.canvas;
                 canvas.ds.scale = scale;
                 canvas.ds.offset[0] = offset[0];
                 canvas.ds.offset[1] = offset[1];
                 canvas.setDirty(true, true);
               }""",
            [scale, offset],
        )
        self.page.wait_for_timeout(300)  # the canvas redraws on the next animation frames

    def page_box(self, node_ids: list[int]) -> tuple[int, int, int, int]:
        """Page pixels (left, top, right, bottom) that the given nodes cover, title bars included."""
        view = self._view(node_ids)
        (cx, cy), scale, (ox, oy) = view["canvas"], view["scale"], view["offset"]
        x0, y0, x1, y1 = view["extent"]
        return (round(cx + (x0 + ox) * scale), round(cy + (y0 + oy) * scale),
                round(cx + (x1 + ox) * scale), round(cy + (y1 + oy) * scale))

    def wait_for_run(self, prompt_id: str, timeout: float = 240.0) -> dict:
        """The prompt's history entry once it has finished; fail if it failed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.server.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed"):
                assert entry["status"]["status_str"] == "success", entry["status"]
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def screenshot(self, name: str) -> Path:
        """Save the page to docs/screenshots/<name>.png (see tests/artifacts.py), the mouse parked off the graph."""
        self.page.mouse.move(20, VIEWPORT["height"] // 2 + 100)  # the empty part of the side bar: no hover
        self.page.wait_for_timeout(400)  # let dialog fade-ins and hover effects finish
        path = docs_path(f"screenshots/{name}.png")
        path.write_bytes(self.page.screenshot())
        return path


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium); "
                    "no browser is downloaded")
    return found


@pytest.fixture(scope="session")
def browser(chromium_executable: str):
    """Headless Chromium, non-persistent (a fresh profile), closed at the end of the session."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def frontend_session(browser, comfy_server) -> Iterator[Frontend]:
    context = browser.new_context(viewport=VIEWPORT)
    frontend = Frontend(context.new_page(), comfy_server)
    try:
        frontend.open()
        frontend.tidy_for_screenshots()
        yield frontend
    finally:
        context.close()


@pytest.fixture
def frontend(frontend_session: Frontend) -> Frontend:
    """The session's page with no dialog open, as each test expects to find it."""
    frontend_session.close_dialogs()
    return frontend_session
