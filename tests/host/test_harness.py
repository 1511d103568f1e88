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


def _run_cli(*args, env_extra=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(host.ROOT / "scripts" / "run_workflow.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_reports_a_missing_host_in_one_line(tmp_path):
    done = _run_cli(str(host.ROOT / "workflows" / "sampler_lcm.json"), "--out", str(tmp_path),
                    env_extra={"COMFYUI_PATH": str(tmp_path / "no-comfyui-here")})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "No ComfyUI host" in done.stderr and "provision.sh" in done.stderr


def test_cli_reports_a_broken_workflow_by_name(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"nodes": [}')
    done = _run_cli(str(bad), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "broken.json" in done.stderr and "not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr
