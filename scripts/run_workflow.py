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


INTERVAL_SUFFIX = "_pm"
DATA_SUFFIX = "_data"


def _cell(row: dict, key: str) -> str:
    """A value with its 95% half-width (``key`` and ``key_pm``), or the plain value."""
    value = row.get(key, "")
    if f"{key}{INTERVAL_SUFFIX}" in row and isinstance(value, (int, float)):
        return f"{value:.4g} ± {row[key + INTERVAL_SUFFIX]:.2g}"
    return str(value)


def _interval(row: dict, key: str) -> tuple[float, float] | None:
    if key not in row or f"{key}{INTERVAL_SUFFIX}" not in row:
        return None
    return row[key] - row[key + INTERVAL_SUFFIX], row[key] + row[key + INTERVAL_SUFFIX]


def _data_row(rows: list[dict]) -> dict | None:
    """The data reference (``*_data`` figures) as a row of its own, when every row has the same one (same class,
    size and seed, as the metrics node draws it)."""
    keys = [key for key in rows[0] if key.endswith(DATA_SUFFIX)]
    if not keys or any(row.get(key) != rows[0][key] for row in rows for key in keys):
        return None
    data = {"label": "data (fresh, same size)", "n": rows[0].get("n", ""), "repeats": rows[0].get("repeats", "")}
    for key in keys:
        name = key[: -len(DATA_SUFFIX)]
        data[name] = rows[0][key]
        if key + INTERVAL_SUFFIX in rows[0]:
            data[name + INTERVAL_SUFFIX] = rows[0][key + INTERVAL_SUFFIX]
    return data


def metrics_section(rows: list[dict]) -> list[str]:
    """The metrics table (value ± 95% half-width) and the only comparisons its numbers support: the pairs of rows
    whose intervals do not overlap, per figure (the shared data reference included as a row)."""
    data = _data_row(rows)
    if data is not None:
        rows = [{key: value for key, value in row.items() if DATA_SUFFIX not in key} for row in rows] + [data]
    keys = [key for key in dict.fromkeys(key for row in rows for key in row) if not key.endswith(INTERVAL_SUFFIX)]
    lines = ["## Metrics reported by the nodes", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row, key) for key in keys) + " |" for row in rows] + [""]
    named = {str(row.get("label", f"row {index + 1}")): row for index, row in enumerate(rows)}
    statements = []
    for key in (key for key in keys if _interval(rows[0], key) is not None):
        separated = []
        for i, first in enumerate(named):
            for second in list(named)[i + 1:]:
                a, b = _interval(named[first], key), _interval(named[second], key)
                if a is not None and b is not None and (a[1] < b[0] or b[1] < a[0]):
                    low, high = (first, second) if a[1] < b[0] else (second, first)
                    separated.append(f"{low} < {high}")
        statements.append(f"- **{key}**: " + ("; ".join(separated) if separated else "no two rows differ"))
    lines += ["## What these numbers show", "",
              f"Every figure is a mean with its 95% interval: SWD and the mode figures over {rows[0].get('repeats')} "
              "independent repeats (disjoint groups of the samples, each scored against its own fresh data), the "
              "NLL gap over all samples. Two rows are called different below only where their intervals do not "
              "overlap; a pair not listed is not distinguishable at these sample sizes.", "", *statements, ""]
    return lines


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
        lines += metrics_section(rows)
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
