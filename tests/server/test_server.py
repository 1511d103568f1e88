"""A real ComfyUI server (main.py --cpu) running Stride graphs over HTTP and websocket."""
import json


def _empty_latent_prompt(prefix: str) -> dict:
    return {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 32, "batch_size": 2}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": prefix}},
    }


def test_server_runs_prompt_over_http_and_websocket(comfy_server):
    info = comfy_server.object_info
    assert any(kind.startswith("Stride") for kind in info)
    result = comfy_server.run(_empty_latent_prompt("server"))
    assert result.success, result.messages
    kinds = [kind for kind, _ in result.messages]
    assert "execution_start" in kinds
    item = result.outputs["2"]["latents"][0]
    payload = comfy_server.view(item)
    header_len = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_len])
    assert header["latent_tensor"]["shape"] == [2, 4, 4, 8]


def test_server_runs_a_stride_sampler_with_progress_and_images(comfy_server):
    prompt = {
        "model": {"class_type": "StrideReferenceModel", "inputs": {
            "variant": "demo", "prediction": "eps", "form": "denoiser (ideal many-step teacher)", "flow_map_steps": 8}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "ring"}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "run": {"class_type": "StrideFewStepSample", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "method": "tdd", "steps": 4, "cfg": 0.0, "gamma": 0.3, "eta": 0.2, "seed": 5, "denoise": 1.0}},
        "image": {"class_type": "StrideLatentToImage", "inputs": {"samples": ["run", 0], "scale": 4}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["image", 0], "filename_prefix": "server"}},
    }
    result = comfy_server.run(prompt)
    assert result.success, result.messages[-3:]
    assert (4, 4) in result.progress, "websocket progress events for each of the 4 steps"
    images = result.outputs["save"]["images"]
    assert len(images) == 4
    assert comfy_server.view(images[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_reports_a_bad_prompt_and_keeps_serving(comfy_server):
    answer = comfy_server.queue({"1": {"class_type": "StrideTCDSampler", "inputs": {"gamma": 3.0}}})
    assert answer.get("http_status") == 400
    assert comfy_server.run(_empty_latent_prompt("after_error")).success
