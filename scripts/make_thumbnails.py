"""Write each shared workflow's template thumbnail (``workflows/<name>.jpg``) from its browser screenshot.

    STRIDE_WRITE_DOCS=1 .venv/bin/python -m pytest -q tests/browser     # writes docs/screenshots/<name>.png
    .venv/bin/python scripts/make_thumbnails.py

The browser test saves a full-page screenshot of the loaded, executed graph with a
``graph-box`` PNG text entry (the page pixels the graph covers, clear of toolbars). This script
crops to that box, centres it on a landscape card of the canvas colour (the shape of the
frontend's template cards) and saves a small JPEG. ComfyUI's frontend (1.32.9) asks for exactly ``<name>.jpg`` next
to an extension's workflow template.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 400
ASPECT = 4 / 3  # width / height of the thumbnail
MARGIN = 12  # page pixels around the graph


def crop_box(graph_box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The graph's box plus a margin, inside the page."""
    left, top, right, bottom = graph_box
    return (max(0, left - MARGIN), max(0, top - MARGIN), min(size[0], right + MARGIN), min(size[1], bottom + MARGIN))


def make_thumbnail(screenshot: Path, target: Path) -> None:
    """Crop the graph, centre it on a ``ASPECT`` card of the canvas's own colour, save a small JPEG."""
    with Image.open(screenshot) as page:
        text = page.info.get("graph-box")
        if text is None:
            raise ValueError(f"{screenshot}: no 'graph-box' entry; take it with the browser tests")
        graph_box = tuple(int(v) for v in text.split(","))
        graph = page.convert("RGB").crop(crop_box(graph_box, page.size))
    background = graph.getpixel((1, 1))  # the margin is empty canvas
    width = max(graph.width, round(graph.height * ASPECT))
    card = Image.new("RGB", (width, round(width / ASPECT)), background)
    card.paste(graph, ((card.width - graph.width) // 2, (card.height - graph.height) // 2))
    card.resize((WIDTH, round(WIDTH / ASPECT)), Image.LANCZOS).save(target, "JPEG", quality=82, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshots", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--workflows", type=Path, default=ROOT / "workflows")
    args = parser.parse_args(argv)
    missing = []
    for workflow in sorted(args.workflows.glob("*.json")):
        screenshot = args.screenshots / f"{workflow.stem}.png"
        if not screenshot.is_file():
            missing.append(workflow.stem)
            continue
        target = workflow.with_suffix(".jpg")
        make_thumbnail(screenshot, target)
        print(f"wrote {target}")
    if missing:
        print(f"no screenshot for: {', '.join(missing)} (run the browser tests first)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
