"""The dmd objective of Stride Distill LoRA inside a real ComfyUI: round trip with the recommended sampling, both
losses, the kept fake score, Cancel and resume, flow teachers, bad input.

Runs are tiny (a few iterations, rank 4) on the demo UNet: these tests check mechanics and exactness; the quality
of dmd is measured in bench/dmd.py and tests/host/test_dmd_quality.py.
"""
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.host.test_training_nodes import training_graph

STEPS = 6


def dmd_graph(name: str, steps: int = STEPS, **overrides) -> dict:
    settings = {"objective": "dmd", "ttur": 2, "generator_steps": 4, "dmd_guidance": 1.5, "keep_fake_score": False}
    return training_graph(name, steps=steps, **{**settings, **overrides})


def sampling_graph(graph: dict, model: list, lora: list, prefix: str) -> dict:
    """The LoRA's recommended sampling (Stride Distilled Sampling) through SamplerCustomAdvanced, CFG 1."""
    graph.update({
        f"{prefix}_sampling": {"class_type": "StrideDistilledSampling", "inputs": {"model": model, "lora": lora}},
        f"{prefix}_latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        f"{prefix}_noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        f"{prefix}_guider": {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": ["disc", 0]}},
        f"{prefix}_run": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"{prefix}_noise", 0], "guider": [f"{prefix}_guider", 0], "sampler": [f"{prefix}_sampling", 0],
            "sigmas": [f"{prefix}_sampling", 1], "latent_image": [f"{prefix}_latent", 0]}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_run", 0],
                                                                  "filename_prefix": prefix}},
    })
    return graph


def test_dmd_round_trip_records_family_sampling_and_both_losses(comfy_host):
    import folder_paths

    graph = sampling_graph(dmd_graph("dmd_roundtrip", save_as="stride_dmd_roundtrip", keep_fake_score=True),
                           ["train", 0], ["train", 1], "student")
    graph["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}}
    result = comfy_host.run(graph)
    assert result.success, result.error()
    assert (STEPS, STEPS) in result.progress
    _, metadata = _read(folder_paths.get_full_path_or_raise("loras", "stride_dmd_roundtrip.safetensors"))
    assert metadata["stride.objective"] == "dmd" and metadata["stride.family"] == "DMD2"
    recommended = json.loads(metadata["stride.recommended"])
    assert recommended["method"] == "dmd2-sdxl-4step" and recommended["timesteps"] == [999, 749, 499, 249]
    assert recommended["sampler"] == "lcm" and recommended["knobs"] == {"boundary": False} and recommended["cfg"] == 1.0
    report = json.loads(result.outputs["report"]["text"][0])
    assert set(report["final_loss"]) == {"generator", "fake"}
    assert report["fake_score"].endswith("stride_checkpoints/dmd_roundtrip_fake_score.safetensors")
    fake, fake_metadata = _read(report["fake_score"])
    assert fake_metadata["stride.format"] == "stride-dmd-fake-score-1"
    lora = load_file(folder_paths.get_full_path_or_raise("loras", "stride_dmd_roundtrip.safetensors"))
    assert fake.keys() == lora.keys() and any(float(t.abs().max()) > 0 for k, t in fake.items() if "lora_up" in k)
    latent = load_file(str(comfy_host.output_path(result.outputs["student_save"]["latents"][0])))["latent_tensor"]
    assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()


def _read(path):
    from distill_core.safe_files import read_safetensors

    return read_safetensors(path)


def stride_nodes(comfy_host, node: str):
    """The module of the loaded Stride package that defines ``node``."""
    return sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS[node].__module__]


def test_distilled_sampling_gives_the_trained_timesteps_as_sigmas(comfy_host):
    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    model = nodes["StrideDemoModel"].execute()[0]
    state = {"diffusion_model.out.2.lora_up.weight": torch.zeros(4, 1)}  # a STRIDE_LORA carries tensors (not a literal)
    lora = {"state_dict": state, "metadata": {"stride.recommended": json.dumps({
        "method": "dmd2-sdxl-1step", "family": "DMD2", "sampler": "lcm", "knobs": {}, "steps": 1, "timesteps": [399],
        "cfg": 1.0})}}
    _sampler, sigmas = nodes["StrideDistilledSampling"].execute(model, lora)
    space = stride_nodes(comfy_host, "StrideDistillLoRA").noise_space(model.get_model_object("model_sampling"))
    assert torch.allclose(sigmas.double(), space.sigmas_for_timesteps([399]), rtol=1e-6)
    recommended = json.loads(lora["metadata"]["stride.recommended"])
    bad = {"state_dict": state, "metadata": {"stride.recommended": json.dumps({**recommended,
                                                          "timesteps": [1000]})}}
    with pytest.raises(Exception, match=r"model: generator timesteps must lie in 1\.\.999"):
        nodes["StrideDistilledSampling"].execute(model, bad)


def test_dmd_cancel_keeps_a_checkpoint_and_resume_matches_uninterrupted(comfy_host):
    import folder_paths

    from distill_core.training.checkpoint import load_checkpoint

    comfy_host.progress_listener = lambda value, total: comfy_host.interrupt() if value == 3 else None
    try:
        cancelled = comfy_host.run(dmd_graph("dmd_resume"))
    finally:
        comfy_host.progress_listener = None
    assert not cancelled.success
    checkpoints = folder_paths.get_output_directory() + "/stride_checkpoints"
    assert 3 <= load_checkpoint(f"{checkpoints}/dmd_resume.safetensors").step < STEPS
    resumed = comfy_host.run(dmd_graph("dmd_resume"))
    assert resumed.success, resumed.error()
    straight = comfy_host.run(dmd_graph("dmd_straight"))
    assert straight.success, straight.error()
    a = load_checkpoint(f"{checkpoints}/dmd_resume.safetensors")
    b = load_checkpoint(f"{checkpoints}/dmd_straight.safetensors")
    assert a.step == b.step == STEPS and set(a.loras) == {"student", "fake"}
    for role in ("student", "fake"):
        for key in b.loras[role]:
            assert torch.allclose(a.loras[role][key], b.loras[role][key], atol=1e-6, rtol=0), (role, key)
    for series in ("generator", "fake"):  # the loss history covers the whole resumed run
        assert len(a.history[series]) == STEPS
        assert all(math.isclose(x, y, rel_tol=1e-5) or (math.isnan(x) and math.isnan(y))
                   for x, y in zip(a.history[series], b.history[series], strict=True))


def test_resuming_a_dmd_run_as_lcm_is_refused(comfy_host):
    assert comfy_host.run(dmd_graph("dmd_as_lcm", steps=2)).success
    result = comfy_host.run(training_graph("dmd_as_lcm", steps=4))
    assert not result.success
    message = result.error()["exception_message"]
    assert "resume" in message and "different settings (objective 'dmd' there, 'lcm' here)" in message


@pytest.mark.parametrize("overrides, words", [
    ({"ttur": 0}, "ttur"),
    ({"dmd_guidance": 0.0}, "dmd_guidance"),
    ({"generator_steps": 0}, "generator_steps"),
])
def test_bad_dmd_inputs_are_refused_naming_the_input(comfy_host, overrides, words):
    with pytest.raises(Exception, match=f"validation.*{words}"):
        comfy_host.run(dmd_graph("dmd_bad_input", steps=1, **overrides))


def test_dmd_trains_a_flow_teacher(comfy_host):
    """The demo UNet wrapped as a CONST (rectified flow) model: dmd trains it in flow units, lcm refuses it."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from distill_core.reference import demo

    reference = stride_nodes(comfy_host, "StrideDemoModel")

    class TestFlowDemoModel:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            network = UNetModel(**demo.DEMO_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
            network.load_state_dict(demo.load_demo_weights()[0])
            return (reference.wrap_as_model(network.eval(), "flow"),)

    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    nodes["TestFlowDemoModel"] = TestFlowDemoModel
    try:
        graph = sampling_graph(dmd_graph("dmd_flow", steps=4), ["train", 0], ["train", 1], "flow")
        graph["model"] = {"class_type": "TestFlowDemoModel", "inputs": {}}
        result = comfy_host.run(graph)
        assert result.success, result.error()
        latent = load_file(str(comfy_host.output_path(result.outputs["flow_save"]["latents"][0])))["latent_tensor"]
        assert torch.isfinite(latent).all()
        lcm = training_graph("lcm_flow", steps=1)
        lcm["model"] = {"class_type": "TestFlowDemoModel", "inputs": {}}
        refused = comfy_host.run(lcm)
        assert not refused.success and "dmd objective also trains flow models" in refused.error()["exception_message"]
    finally:
        del nodes["TestFlowDemoModel"]
    import folder_paths

    checkpoints = os.path.join(folder_paths.get_output_directory(), "stride_checkpoints")
    assert not [name for name in os.listdir(checkpoints) if name.endswith(".tmp")]
