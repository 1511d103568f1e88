"""Write each shared workflow's template thumbnail (``workflows/<name>.jpg``) from the images it makes.

    .venv/bin/python scripts/make_thumbnails.py                 # runs every workflow, then composes
    .venv/bin/python scripts/make_thumbnails.py sampler_tdd     # only some

Each workflow runs headless in one in-process host (as ``scripts/run_workflow.py`` does); the images
of its image-saving nodes are laid out on a square card: one labelled row per node (sample batches
as a strip of their first pictures, single pictures such as a loss plot or a trace grid scaled to
the width; a workflow with one batch shows it as a grid). The label is the title of the group the
node sits in. ComfyUI's frontend (1.32.9 and 1.49.6) asks for exactly ``<name>.jpg`` next to an
extension's workflow template and shows it in a square card.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host as host

ROOT = Path(__file__).resolve().parents[1]
SIZE = 400  # the card is SIZE x SIZE pixels
TOP = 40  # pixels kept free at the top of a card of rows: frontend 1.49.6 puts a "Node graph" tag there
STRIP = 8  # pictures per row of a sample batch
LABEL = 15  # pixels of a row's label
SINGLE_MAX_HEIGHT = 120  # a single picture (plot, grid) is scaled to the width, at most this high
BACKGROUND = (32, 32, 32)
IMAGE_NODES = ("SaveImage", "PreviewImage")
FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/liberation/"
              "LiberationSans-Regular.ttf")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for path in FONT_FILES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def image_rows(workflow: dict) -> list[tuple[int, str]]:
    """(node id, label) of every image-saving node, group by group (top to bottom, then left to right), then by
    place. The label is the title of the node's group, or, for a second image node in the same group, the title
    of the node it saves."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    source_of = {link[0]: by_id[link[1]] for link in workflow["links"]}

    def group_of(node: dict) -> dict | None:
        x, y = node["pos"]
        for group in workflow.get("groups", []):
            gx, gy, gw, gh = group["bounding"]
            if gx <= x <= gx + gw and gy <= y <= gy + gh:
                return group
        return None

    def place(node: dict) -> tuple[float, ...]:
        group = group_of(node)
        corner = (group["bounding"][1], group["bounding"][0]) if group else (node["pos"][1], node["pos"][0])
        return (*corner, node["pos"][1], node["pos"][0])

    nodes = sorted((n for n in workflow["nodes"] if n["type"] in IMAGE_NODES and n.get("mode", 0) == 0), key=place)
    rows: list[tuple[int, str]] = []
    for node in nodes:
        group = group_of(node)
        label = re.sub(r"^\d+\.\s*", "", group["title"]) if group else node.get("title", node["type"])
        if any(label == used for _, used in rows):
            source = source_of.get(next((i["link"] for i in node["inputs"] if i["name"] == "images"), None))
            label = (source or node).get("title") or (source or node)["type"]
        rows.append((node["id"], label))
    return rows


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def compose(rows: list[tuple[str, list[Path]]]) -> Image.Image:
    """The card: one labelled row per output (or a grid for a lone batch), fitted into SIZE x SIZE."""
    font = _font(11)
    if len(rows) == 1 and len(rows[0][1]) > 1:
        files = rows[0][1][:16]
        columns = 4 if len(files) > 4 else len(files)
        tile = SIZE // columns
        card = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        for index, path in enumerate(files):
            with Image.open(path) as picture:
                place = ((index % columns) * tile, (index // columns) * tile)
                card.paste(_fit(picture.convert("RGB"), tile, tile), place)
        return card
    parts: list[tuple[str, Image.Image]] = []
    for label, files in rows:
        if len(files) > 1:
            tile = SIZE // STRIP
            strip = Image.new("RGB", (SIZE, tile), BACKGROUND)
            for index, path in enumerate(files[:STRIP]):
                with Image.open(path) as picture:
                    strip.paste(_fit(picture.convert("RGB"), tile, tile), (index * tile, 0))
            parts.append((label, strip))
        else:
            with Image.open(files[0]) as picture:
                parts.append((label, _fit(picture.convert("RGB"), SIZE, SINGLE_MAX_HEIGHT)))
    height = sum(LABEL + part.height for _, part in parts)
    sheet = Image.new("RGB", (SIZE, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, part in parts:
        draw.text((3, y + 1), label, fill=(220, 220, 220), font=font)
        sheet.paste(part, ((SIZE - part.width) // 2, y + LABEL))
        y += LABEL + part.height
    card = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    fitted = _fit(sheet, SIZE, SIZE - TOP) if sheet.height > SIZE - TOP else sheet
    card.paste(fitted, ((SIZE - fitted.width) // 2, TOP + (SIZE - TOP - fitted.height) // 2))
    return card


def run_and_collect(comfy: host.InProcessHost, path: Path) -> list[tuple[str, list[Path]]]:
    """Run one workflow; the files each image node saved, with its row label."""
    workflow = host.load_workflow(path)
    prompt = host.ui_to_api(workflow, comfy.object_info, name=path.name)
    result = comfy.run(prompt)
    if not result.success:
        raise host.WorkflowError(f"{path.name} failed: {result.error()}")
    rows = []
    for node_id, label in image_rows(workflow):
        files = [comfy.output_path(item) for item in result.outputs.get(str(node_id), {}).get("images", [])]
        if files:
            rows.append((label, files))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all in workflows/)")
    parser.add_argument("--workflows", type=Path, default=ROOT / "workflows")
    args = parser.parse_args(argv)
    paths = [args.workflows / f"{name}.json" for name in args.names] or sorted(args.workflows.glob("*.json"))
    comfy = host.InProcessHost(Path(tempfile.mkdtemp(prefix="stride-thumbnails-")))
    for path in paths:
        print(f"running {path.name}", flush=True)
        rows = run_and_collect(comfy, path)
        if not rows:
            print(f"{path.name}: no images", file=sys.stderr)
            return 1
        target = path.with_suffix(".jpg")
        compose(rows).save(target, "JPEG", quality=85, optimize=True)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
