"""Drive a real ComfyUI host: in-process or as a server over HTTP/websocket.

Used by the tests, the demo runner and the benchmarks. The host is the checkout that
``scripts/provision.sh`` prepared (``.cache/host-path``) or ``$COMFYUI_PATH``. Each host run
gets a *base directory* (ComfyUI's ``--base-directory``) holding its own ``models``, ``input``,
``output``, ``temp`` and ``custom_nodes/stride`` (a link to this repository).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "diffusion_models", "stride")


class HostError(RuntimeError):
    """The ComfyUI host is missing or broken; the message says what to do."""


def host_dir() -> Path:
    """The ComfyUI checkout to use: ``$COMFYUI_PATH``, else the one provisioned in ``.cache``."""
    env = os.environ.get("COMFYUI_PATH")
    recorded = ROOT / ".cache" / "host-path"
    if env:
        path = Path(env)
    elif recorded.exists():
        path = Path(recorded.read_text().strip())
    else:
        path = ROOT / ".cache" / "ComfyUI"
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise HostError(
            f"No ComfyUI host at {path}. Run `bash scripts/provision.sh` (or `make setup`), "
            "or set COMFYUI_PATH to a ComfyUI checkout."
        )
    return path


def prepare_base_dir(base: Path) -> Path:
    """Create a ComfyUI base directory with Stride linked into its ``custom_nodes``."""
    base = Path(base).resolve()
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for folder in MODEL_FOLDERS:
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "stride"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    return base


def host_version(path: Path | None = None) -> str:
    text = ((path or host_dir()) / "comfyui_version.py").read_text()
    return text.split("__version__")[1].split('"')[1]


# ------------------------------------------------------------------------------------------
# Workflows: UI format (what the frontend saves) -> API format (what /prompt executes)
# ------------------------------------------------------------------------------------------
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class WorkflowError(ValueError):
    """A workflow file that cannot run on this host; the message names the file and node."""


def load_workflow(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict) or "nodes" not in data or "links" not in data:
        raise WorkflowError(f"{path}: not a ComfyUI UI-format workflow (no 'nodes'/'links')")
    return data


def combo_options(spec: Any) -> list | None:
    """The choices of a dropdown input spec, else None. V1 nodes type a dropdown by its option list, V3
    nodes as "COMBO" with the list under "options" (Stride's V3 nodes give the list type on 0.3.75)."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return list(options.get("options", []))
    return None


def _widget_inputs(info: dict) -> list[tuple[str, Any]]:
    """Inputs that the frontend shows as widgets, in widget order: (name, spec)."""
    found = []
    for section in ("required", "optional"):
        for name, spec in info.get("input", {}).get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if options.get("forceInput"):
                    continue
                found.append((name, spec))
    return found


def _has_seed_control(name: str, spec: Any) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and bool(options.get("control_after_generate"))


def ui_to_api(workflow: dict, object_info: dict, name: str = "workflow") -> dict:
    """Convert a UI-format workflow to an API prompt using the host's node definitions."""
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(link_id: int) -> tuple[Any, int] | None:
        """Follow Reroutes and bypassed nodes to the real output feeding a link."""
        link = links.get(link_id)
        while link is not None:
            node = nodes_by_id[link[1]]
            if node["type"] == "Reroute" or node.get("mode") == 4:
                wanted = link[5]
                upstream = [i for i in node.get("inputs", []) if i.get("link") is not None]
                match = [i for i in upstream if i.get("type") in (wanted, "*")] or upstream
                link = links.get(match[0]["link"]) if match else None
                continue
            if node.get("mode") == 2:
                return None
            return str(node["id"]), link[2]
        return None

    primitive_values: dict[int, Any] = {}
    for node in workflow["nodes"]:
        if node["type"] == "PrimitiveNode" and node.get("widgets_values"):
            for out in node.get("outputs", []):
                for link_id in out.get("links") or []:
                    primitive_values[link_id] = node["widgets_values"][0]

    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (2, 4):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(
                f"{name}: node #{node['id']} has type '{kind}', which this ComfyUI host does not have "
                "(a missing custom node pack, or a node from a newer ComfyUI)"
            )
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        widgets = _widget_inputs(info)
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in dict(widgets)})
        else:
            position = 0
            for input_name, spec in widgets:
                if position >= len(values):
                    break
                inputs[input_name] = values[position]
                position += 1
                if (_has_seed_control(input_name, spec) and position < len(values)
                        and values[position] in SEED_CONTROL_VALUES):
                    position += 1
                if combo_options(spec) is not None:
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if options.get("image_upload") and position < len(values) and values[position] == "image":
                        position += 1
        for socket_ in node.get("inputs", []):
            link_id = socket_.get("link")
            if link_id is None:
                continue
            if link_id in primitive_values:
                inputs[socket_["name"]] = primitive_values[link_id]
                continue
            source = source_of(link_id)
            if source is not None:
                inputs[socket_["name"]] = [source[0], source[1]]
            else:
                inputs.pop(socket_["name"], None)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt


def output_node_ids(prompt: dict, object_info: dict) -> list[str]:
    return [nid for nid, node in prompt.items() if object_info.get(node["class_type"], {}).get("output_node")]


# ------------------------------------------------------------------------------------------
# In-process host
# ------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one prompt produced: success flag, UI outputs per node, status messages, progress."""

    success: bool
    outputs: dict
    messages: list
    progress: list = field(default_factory=list)

    def error(self) -> dict | None:
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None


class _ServerStub:
    """The few attributes of PromptServer that PromptExecutor uses."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


def in_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` in a fresh thread, as ComfyUI's own prompt worker does.

    ComfyUI's executor and node loading use ``asyncio.run``, which refuses to start inside a thread
    that already runs an event loop (e.g. a test session that also drives Playwright's sync API).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="comfy-host")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _rebase_folder_paths(folder_paths: Any, base: Path) -> None:
    """Point an already imported ``folder_paths`` at ``base`` (what --base-directory does at import)."""
    old = folder_paths.base_path
    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        moved = [str(base / os.path.relpath(p, old)) if p.startswith(old) else p for p in paths]
        folder_paths.folder_names_and_paths[name] = (moved, extensions)
    folder_paths.base_path = str(base)
    folder_paths.models_dir = str(base / "models")
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.filename_list_cache.clear()


def _report_every_progress_step(comfy_utils: Any) -> None:
    """Make ProgressBar call the hook on every step, so tests see the exact step sequence.

    Newer ComfyUI throttles progress updates (at most one per 0.1 s and 0.5 % of the run, first and
    last always sent); 0.3.75 sends every update and has no throttle to lift.
    """
    if hasattr(comfy_utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):
        comfy_utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0
        comfy_utils.PROGRESS_THROTTLE_MIN_PERCENT = 0.0


def flux_unet_config(config: dict, text_position_axes: tuple[int, ...] = ()) -> dict:
    """A hand-written Flux ``unet_config`` completed with the fields this host's Flux model requires.

    Newer ComfyUI's FluxParams requires ``txt_ids_dims``, the axes on which text tokens get
    position ids: none for FLUX.1 (as its model detection records), axis 3 for FLUX.2; 0.3.75's
    FluxParams has no such field and rejects it. Call after the host is imported.
    """
    import dataclasses

    import comfy.ldm.flux.model

    fields = {field_.name for field_ in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        return {"txt_ids_dims": list(text_position_axes), **config}
    return dict(config)


class InProcessHost:
    """ComfyUI imported into this process: its own node loading, validation and executor."""

    def __init__(self, base_dir: Path) -> None:
        self.path = host_dir()
        self.base_dir = prepare_base_dir(base_dir)
        # ComfyUI's top-level modules (nodes, server, utils) must win over same-named packages
        # elsewhere on sys.path, e.g. Stride's own ``nodes`` package when the repo root is there.
        while str(self.path) in sys.path:
            sys.path.remove(str(self.path))
        sys.path.insert(0, str(self.path))
        import comfy.options  # must precede cli_args
        from comfy.cli_args import args

        args.cpu = True
        args.base_directory = str(self.base_dir)
        args.disable_api_nodes = True
        import folder_paths

        if Path(folder_paths.base_path) != self.base_dir:
            _rebase_folder_paths(folder_paths, self.base_dir)
        import utils.extra_config  # noqa: F401  (as main.py: ComfyUI's utils package before nodes.py shadows it)
        # isort: split
        import comfy.utils
        import execution
        import nodes

        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.version = host_version(self.path)
        in_own_thread(asyncio.run, nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.server = _ServerStub()
        self.progress: list[tuple[int, int]] = []
        self.progress_listener: Callable[[int, int], None] | None = None
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        _report_every_progress_step(comfy.utils)
        # Newer ComfyUI also reads "ram_inactive" (the RAM-pressure cache's second threshold); older ones ignore it.
        cache_args = {"lru": 0, "ram": 0, "ram_inactive": 0}
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args=cache_args)

    def _progress_hook(self, value, total, preview_image=None, prompt_id=None, node_id=None) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.progress.append((value, total))
        if self.progress_listener is not None:
            self.progress_listener(value, total)

    @property
    def object_info(self) -> dict:
        """The fields of ``/object_info`` that workflow conversion and tests read."""
        info = {}
        for kind, cls in self.nodes.NODE_CLASS_MAPPINGS.items():
            if hasattr(cls, "GET_NODE_INFO_V1"):
                info[kind] = cls.GET_NODE_INFO_V1()
                continue
            info[kind] = {
                "input": cls.INPUT_TYPES(),
                "output": cls.RETURN_TYPES,
                "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                "name": kind,
                "display_name": self.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(kind, kind),
                "description": getattr(cls, "DESCRIPTION", ""),
                "category": getattr(cls, "CATEGORY", "sd"),
            }
        return info

    def interrupt(self) -> None:
        self.nodes.interrupt_processing(True)

    def step_noise(self, like: Any, seed: int | None) -> Callable[[Any, Any], Any]:
        """The host's own per-step noise sampler for a float32 CPU latent shaped like ``like`` and ``seed``
        (``comfy.k_diffusion.sampling.default_noise_sampler``; its seeding differs between hosts): the noise
        ``noise(sigma, sigma_next)`` its stochastic samplers, and Stride's inside it, draw at each step."""
        import torch

        import comfy.k_diffusion.sampling

        return comfy.k_diffusion.sampling.default_noise_sampler(torch.zeros(like.shape), seed=seed)

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        return in_own_thread(asyncio.run, self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> RunResult:
        """Validate and execute an API-format prompt; raise on validation errors."""
        valid, error, outputs, node_errors = self.validate(prompt)
        if not valid:
            raise WorkflowError(f"prompt rejected by validation: {error.get('message')} "
                                f"{json.dumps(node_errors)[:2000]}")
        self.progress = []
        prompt_id = str(uuid.uuid4())
        in_own_thread(self.executor.execute, prompt, prompt_id, {}, outputs)
        history = self.executor.history_result or {}
        return RunResult(self.executor.success, history.get("outputs", {}), list(self.executor.status_messages),
                         list(self.progress))

    def output_path(self, item: dict) -> Path:
        """File of one UI output entry ({filename, subfolder, type})."""
        root = self.folder_paths.get_directory_by_type(item.get("type", "output"))
        return Path(root) / item.get("subfolder", "") / item["filename"]


# ------------------------------------------------------------------------------------------
# Real server over HTTP / websocket
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerHost:
    """``main.py --cpu`` on a free loopback port; always stop() it (the fixtures do)."""

    def __init__(self, base_dir: Path, extra_args: list[str] | None = None, log_path: Path | None = None,
                 python: str | Path = sys.executable) -> None:
        """``python`` runs the server (another environment's interpreter, e.g. a bare host's); Stride is
        linked into ``custom_nodes`` unless the base directory already has it there."""
        self.path = host_dir()
        self.base_dir = prepare_base_dir(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = log_path or (self.base_dir / "server.log")
        command = [
            str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-api-nodes",
            "--database-url", "sqlite:///:memory:", *(extra_args or []),
        ]
        self._log = open(self.log_path, "w")  # noqa: SIM115 (the server writes to it until stop() closes it)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=self.path, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI server exited with code {self.process.returncode}; log: {self.log_path}\n"
                                f"{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise HostError(f"ComfyUI server did not answer within {timeout:.0f} s; log: {self.log_path}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()

    # -- HTTP ----------------------------------------------------------------------------------
    def get(self, route: str, params: dict | None = None) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{route}{query}", timeout=60) as response:
            return response.read()

    def get_json(self, route: str, params: dict | None = None) -> Any:
        return json.loads(self.get(route, params))

    def post_json(self, route: str, payload: dict) -> Any:
        request = urllib.request.Request(
            f"{self.url}{route}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            return {"http_status": exc.code, **json.loads(exc.read() or b"{}")}
        return json.loads(body) if body else {}

    @property
    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue(self, prompt: dict, client_id: str | None = None) -> dict:
        return self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or self.client_id})

    def view(self, item: dict) -> bytes:
        return self.get("/view", {"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                  "type": item.get("type", "output")})

    def run(self, prompt: dict, timeout: float = 300.0) -> RunResult:
        """Queue a prompt, follow it on the websocket until done, return its history entry."""
        import websocket  # websocket-client

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            answer = self.queue(prompt)
            if "prompt_id" not in answer:
                raise WorkflowError(f"prompt rejected: {json.dumps(answer)[:2000]}")
            prompt_id = answer["prompt_id"]
            messages, progress = [], []
            deadline = time.time() + timeout
            while time.time() < deadline:
                frame = ws.recv()
                if not isinstance(frame, str):
                    continue  # binary preview images
                message = json.loads(frame)
                kind, data = message.get("type"), message.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append((kind, data))
                if kind == "progress":
                    progress.append((data["value"], data["max"]))
                if kind in ("execution_error", "execution_interrupted"):
                    break
                if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
                if kind == "execution_success":
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
        finally:
            ws.close()
        entry = self._history_entry(prompt_id)
        success = entry.get("status", {}).get("status_str") == "success"
        return RunResult(success, entry.get("outputs", {}), messages, progress)

    def _history_entry(self, prompt_id: str, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} missing from /history")
