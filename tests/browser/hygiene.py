"""Layout checks of a graph as the real frontend draws it: node boxes, image previews, group titles.

``measure(page)`` reads the geometry from the page (LiteGraph's own numbers: node.pos/size, the size
``computeSize()`` asks for, each widget's place, group frames and the width of their title text);
``problems(layout)`` lists what a user would see as untidy, in words.
"""
from __future__ import annotations

from typing import Any

IMAGE_PREVIEW_WIDGET = "$$canvas-image-preview"  # frontend 1.32.9's canvas image preview widget
IMAGE_PREVIEW_MIN_HEIGHT = 220  # ImagePreviewWidget.computeLayoutSize().minHeight
TOLERANCE = 0.5  # graph units

MEASURE = """() => {
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const ctx = document.createElement('canvas').getContext('2d');
  return {
    nodes: window.app.graph._nodes.map(n => ({
      id: n.id, type: n.type, title: n.title, x: n.pos[0], y: n.pos[1], width: n.size[0], height: n.size[1],
      top: n.pos[1] - title - Math.max(0, ...(n.badges || []).map(b => typeof b === 'function' ? b() : b)
             .filter(b => b.visible).map(b => b.height + 2)),
      collapsed: !!(n.flags && n.flags.collapsed),
      needs: Array.from(n.computeSize()),
      widgets: (n.widgets || []).map(w => ({name: w.name, y: w.y ?? 0,
        height: w.computedHeight ?? (w.computeSize ? w.computeSize(n.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT)})),
    })),
    groups: window.app.graph._groups.map(g => {
      ctx.font = `${g.font_size}px ${LiteGraph.GROUP_FONT}`;
      const [x, y, width, height] = Array.from(g._bounding);
      return {title: g.title, x, y, width, height, title_height: g.titleHeight,
              title_text_width: ctx.measureText(g.title).width + 2 * LGraphGroup.padding};
    }),
  };
}"""


def measure(page: Any) -> dict:
    """The current graph's geometry, read from the page."""
    return page.evaluate(MEASURE)


def _box(node: dict) -> tuple[float, float, float, float]:
    """left, top, right, bottom of a node, title bar and badges included."""
    return node["x"], node["top"], node["x"] + node["width"], node["y"] + node["height"]


def _intersect(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] - TOLERANCE and b[0] < a[2] - TOLERANCE and a[1] < b[3] - TOLERANCE and b[1] < a[3] - TOLERANCE


def _inside(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(a[k] >= b[k] - TOLERANCE for k in (0, 1)) and all(a[k] <= b[k] + TOLERANCE for k in (2, 3))


def _name(node: dict) -> str:
    return f"#{node['id']} '{node['title']}'"


def previews(layout: dict) -> dict[int, tuple[float, float, float, float]]:
    """Node id -> the box of the image preview it shows (only nodes that show one)."""
    found = {}
    for node in layout["nodes"]:
        for widget in node["widgets"]:
            if widget["name"] == IMAGE_PREVIEW_WIDGET:
                top = node["y"] + widget["y"]
                found[node["id"]] = (node["x"], top, node["x"] + node["width"], top + widget["height"])
    return found


def problems(layout: dict) -> list[str]:
    """Everything untidy: nodes smaller than the frontend needs, overlapping boxes, covered or squeezed
    image previews, group frames cutting through nodes, covered or clipped group titles."""
    found: list[str] = []
    nodes = [n for n in layout["nodes"] if not n["collapsed"]]
    for node in nodes:
        width, height = node["needs"]
        if node["width"] + TOLERANCE < width or node["height"] + TOLERANCE < height:
            found.append(f"node {_name(node)} is {node['width']:.0f}x{node['height']:.0f} but the frontend needs "
                         f"{width:.0f}x{height:.0f}")
    for index, a in enumerate(nodes):
        for b in nodes[index + 1:]:
            if _intersect(_box(a), _box(b)):
                found.append(f"nodes {_name(a)} and {_name(b)} overlap")
    shown = previews(layout)
    for node_id, area in shown.items():
        node = next(n for n in nodes if n["id"] == node_id)
        if area[3] - area[1] + TOLERANCE < IMAGE_PREVIEW_MIN_HEIGHT:
            found.append(f"the image preview of {_name(node)} is squeezed to {area[3] - area[1]:.0f} px")
        if not _inside(area, _box(node)):
            found.append(f"the image preview of {_name(node)} runs out of its node")
        for other in nodes:
            if other["id"] != node_id and _intersect(area, _box(other)):
                found.append(f"the image preview of {_name(node)} is covered by {_name(other)}")
    frames = [(g["x"], g["y"], g["x"] + g["width"], g["y"] + g["height"]) for g in layout["groups"]]
    for index, a in enumerate(frames):
        for j, b in enumerate(frames[index + 1:], index + 1):
            if _intersect(a, b) and not (_inside(a, b) or _inside(b, a)):
                titles = layout["groups"][index]["title"], layout["groups"][j]["title"]
                found.append(f"groups '{titles[0]}' and '{titles[1]}' overlap")
    for group, frame in zip(layout["groups"], frames, strict=True):
        title_bar = (frame[0], frame[1], frame[2], frame[1] + group["title_height"])
        if group["title_text_width"] > group["width"] + TOLERANCE:
            found.append(f"the title of group '{group['title']}' is wider than the group")
        for node in nodes:
            box = _box(node)
            if _intersect(title_bar, box):
                found.append(f"node {_name(node)} covers the title of group '{group['title']}'")
            elif _intersect(frame, box) and not _inside(box, frame):
                found.append(f"the frame of group '{group['title']}' cuts through node {_name(node)}")
    return found
