"""The harness itself: ComfyUI loads Stride and runs graphs in-process and over HTTP."""
from safetensors.torch import load_file

import comfy_host as host


def _empty_latent_prompt(prefix: str) -> dict:
    return {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 32, "batch_size": 2}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": prefix}},
    }


def test_inprocess_host_loads_stride_and_runs_a_graph(comfy_host):
    assert any(kind.startswith("Stride") for kind in comfy_host.nodes.NODE_CLASS_MAPPINGS)
    result = comfy_host.run(_empty_latent_prompt("harness"))
    assert result.success
    item = result.outputs["2"]["latents"][0]
    latent = load_file(str(comfy_host.output_path(item)))["latent_tensor"]
    assert tuple(latent.shape) == (2, 4, 4, 8)


def test_inprocess_validation_rejects_unknown_node(comfy_host):
    valid, error, _, _ = comfy_host.validate({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert not valid and "NoSuchNode" in error["message"]


def test_ui_to_api_reports_unknown_node_by_name(comfy_host):
    workflow = {"nodes": [{"id": 7, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}
    try:
        host.ui_to_api(workflow, comfy_host.object_info, name="broken.json")
    except host.WorkflowError as exc:
        assert "broken.json" in str(exc) and "#7" in str(exc) and "NoSuchNode" in str(exc)
    else:
        raise AssertionError("unknown node type was accepted")


def test_load_workflow_reports_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    try:
        host.load_workflow(bad)
    except host.WorkflowError as exc:
        assert "bad.json" in str(exc) and "not valid JSON" in str(exc)
    else:
        raise AssertionError("invalid JSON was accepted")
