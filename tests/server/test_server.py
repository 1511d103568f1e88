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


def test_cancel_during_the_teacher_pool_stops_it_and_writes_nothing(comfy_server):
    """A data-free run starts with the teacher's data pool (each teacher call a phase event); a Cancel (POST
    /interrupt) there stops the run: interrupted, the pool not finished, no checkpoint, no cache entry, no temp file."""
    import websocket  # websocket-client

    prompt = {
        "model": {"class_type": "StrideDemoModel", "inputs": {}},
        "disc": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "disc"}},
        "empty": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "data": {"class_type": "StrideDistillDataset", "inputs": {
            "prompt_1": ["disc", 0], "empty_prompt": ["empty", 0], "width": 256, "height": 256}},
        "train": {"class_type": "StrideDistillLoRA", "inputs": {
            "model": ["model", 0], "data": ["data", 0], "objective": "lcm", "steps": 4, "learning_rate": 1e-3,
            "rank": 4, "alpha": 0.0, "batch_size": 1, "guidance_min": 0.0, "guidance_max": 0.0, "loss": "huber",
            "gradient_checkpointing": False, "seed": 1, "save_every": 1, "lora_name": "server_pool_cancel",
            "resume": False, "cache_teacher": True}},
        "plot": {"class_type": "StrideLossPlot", "inputs": {"loss": ["train", 2], "width": 320, "height": 160}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["plot", 0]}},  # the prompt's output
    }
    ws = websocket.create_connection(f"ws://127.0.0.1:{comfy_server.port}/ws?clientId={comfy_server.client_id}",
                                     timeout=300)
    phases, interrupted_at, outcome = [], None, None
    try:
        answer = comfy_server.queue(prompt)
        assert "prompt_id" in answer, answer
        while outcome is None:
            frame = ws.recv()
            if not isinstance(frame, str):
                continue
            message = json.loads(frame)
            kind, data = message.get("type"), message.get("data", {})
            if kind == "stride.distill.phase":
                phases.append(data)
                if interrupted_at is None and data["phase"] == "teacher data pool" and data["done"] >= 2:
                    interrupted_at = data["done"]
                    comfy_server.post_json("/interrupt", {})
            elif kind == "stride.distill.loss":
                outcome = "trained a step"
            elif kind in ("execution_interrupted", "execution_success", "execution_error"):
                outcome = kind
    finally:
        ws.close()
    assert outcome == "execution_interrupted", (outcome, phases[-3:])
    pool = [event for event in phases if event["phase"] == "teacher data pool"]
    assert pool[0]["total"] == 16 * 8, "16 samples x 8 teacher calls (batch 1)"
    assert interrupted_at is not None and pool[-1]["done"] < pool[-1]["total"], "the pool stopped before its end"
    output = comfy_server.base_dir / "output"
    written = [*(output / "stride_checkpoints").glob("*server_pool_cancel*"),
               *(output / "stride_checkpoints").glob(".*"), *(output / "stride_cache").glob("*")]
    assert written == [], f"a cancelled pool writes nothing, found {written}"
