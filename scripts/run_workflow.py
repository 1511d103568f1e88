"""Run a shared ComfyUI workflow (UI format) headless through the real host and write a report.

    python scripts/run_workflow.py workflows/stride_demo.json --out demo_out

The workflow is converted to the API format with the host's own node definitions, executed
in-process (ComfyUI's validation and executor, Stride loaded as a custom node), and every
image it saves is copied to ``--out`` together with ``report.md`` (timings per node, a plot,
the images and any text the Stride nodes reported).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host as host


class TerminalProgress:
    """A one-line progress bar fed by ComfyUI's progress hook."""

    def __init__(self) -> None:
        self.node = ""

    def __call__(self, value: int, total: int) -> None:
        width = 30
        filled = int(width * value / max(total, 1))
        sys.stderr.write(f"\r  {self.node:<28.28} [{'#' * filled}{'.' * (width - filled)}] {value}/{total}")
        sys.stderr.flush()
        if value >= total:
            sys.stderr.write("\n")


def save_grid(files: list[Path], target: Path, columns: int = 8) -> Path:
    """Tile a node's saved images into one picture (row-major, up to ``columns`` per row)."""
    from PIL import Image

    tiles = [Image.open(path).convert("RGB") for path in files]
    width, height = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (width * min(columns, len(tiles)), height * rows), "white")
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    grid.save(target)
    return target


def write_report(out: Path, workflow: Path, prompt: dict, result: host.RunResult, images: list[Path],
                 texts: list[str], timings: dict[str, float], wall: float, version: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"#{nid} {prompt[nid]['_meta']['title']}"[:34] for nid in timings]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, list(timings.values()), color="#4a7bd0")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"{workflow.name}: time per node (total {wall:.1f} s)")
    fig.tight_layout()
    plot = out / "timings.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)

    lines = [
        f"# Stride demo report: `{workflow.name}`",
        "",
        f"- host: ComfyUI {version} (in-process, CPU)",
        f"- status: {'success' if result.success else 'FAILED'}",
        f"- wall time: {wall:.1f} s for {len(prompt)} nodes",
        "",
        "![time per node](timings.png)",
        "",
    ]
    merged: dict[str, dict] = {}  # one row per label: a measuring node's report, or the rows of a comparison
    for text in texts:
        if text.startswith(("{", "[")):
            parsed = json.loads(text)
            for row in parsed if isinstance(parsed, list) else [parsed]:
                merged.setdefault(str(row.get("label", len(merged))), {}).update(row)
    rows = list(merged.values())
    if rows:
        keys = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["## Metrics reported by the nodes", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(key, "")) for key in keys) + " |" for row in rows] + [""]
    others = [text for text in texts if not text.startswith(("{", "["))]
    if others:
        lines += ["## Text reported by the nodes", ""] + [f"```\n{text}\n```" for text in others] + [""]
    if images:
        lines += ["## Images (one grid per output node)", ""] + [f"![{image.stem}]({image.name})" for image in images]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="UI-format workflow JSON (e.g. from workflows/)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for images and report.md")
    args = parser.parse_args(argv)

    try:
        workflow = host.load_workflow(args.workflow)
        args.out.mkdir(parents=True, exist_ok=True)
        comfy = host.InProcessHost(args.out / ".comfy")
        prompt = host.ui_to_api(workflow, comfy.object_info, name=str(args.workflow))
    except (host.HostError, host.WorkflowError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    progress = TerminalProgress()
    comfy.progress_listener = progress
    starts: dict[str, float] = {}

    def on_event(event: str, data) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node"):
            starts[data["node"]] = time.perf_counter()
            progress.node = prompt[data["node"]]["_meta"]["title"]

    original_send = comfy.server.send_sync
    comfy.server.send_sync = lambda event, data, sid=None: (on_event(event, data), original_send(event, data, sid))
    comfy.server.client_id = "cli"  # makes the executor emit per-node 'executing' events

    print(f"running {args.workflow} on ComfyUI {comfy.version} ({len(prompt)} nodes)")
    begin = time.perf_counter()
    try:
        result = comfy.run(prompt)
    except host.WorkflowError as exc:
        print(f"error: {args.workflow}: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - begin
    ends = [*sorted(starts.items(), key=lambda item: item[1]), ("_end", begin + wall)]
    timings = {nid: ends[i + 1][1] - start for i, (nid, start) in enumerate(ends[:-1])}

    if not result.success:
        error = result.error() or {}
        print(f"error: node #{error.get('node_id')} ({error.get('node_type')}): "
              f"{error.get('exception_message', '').strip()}", file=sys.stderr)
        return 1

    images, texts = [], []
    for node_id, output in result.outputs.items():
        files = [comfy.output_path(item) for item in output.get("images", [])]
        if files:
            title = prompt[node_id]["_meta"]["title"].replace(" ", "_")
            images.append(save_grid(files, args.out / f"{node_id}_{title}.png"))
        texts += [str(text) for text in output.get("text", [])]
    report = write_report(args.out, args.workflow, prompt, result, images, texts, timings, wall, comfy.version)
    print(f"done in {wall:.1f} s: {len(images)} images and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
