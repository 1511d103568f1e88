"""Every Stride node is self-explanatory in ComfyUI, and the node reference is current."""
import make_node_reference


def _stride(comfy_host):
    return {kind: info for kind, info in comfy_host.object_info.items() if kind.startswith("Stride")}


def test_every_node_has_name_category_description_and_tooltips(comfy_host):
    nodes = _stride(comfy_host)
    assert len(nodes) >= 10
    for kind, info in nodes.items():
        assert info["display_name"].startswith("Stride "), kind
        assert info["category"].startswith("stride/"), kind
        assert len(info["description"]) > 40, kind
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert options.get("tooltip"), f"{kind}.{name} has no tooltip"
        assert all(name for name in info["output_name"]), kind


def test_node_reference_is_current(comfy_host):
    readme, doc, families = make_node_reference.render(comfy_host.object_info)
    assert readme == make_node_reference.README.read_text(), "run scripts/make_node_reference.py"
    assert doc == make_node_reference.NODES_DOC.read_text(), "run scripts/make_node_reference.py"
    assert families == make_node_reference.FAMILIES_DOC.read_text(), "run scripts/make_node_reference.py"
