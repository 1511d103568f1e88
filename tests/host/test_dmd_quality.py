"""A short in-graph dmd run on the demo model, judged against the exact reference with 95% intervals.

The 4-step student (Stride Distill LoRA, objective dmd with DMD2's SD1.5 update ratio ttur 10 and the first DMD's
paired regression at weight 1.0, then its own sampling through Stride Distilled Sampling), the undistilled
teacher on the same 4 DMD2 steps and the hybrid (Stride Hybrid Guider: one teacher step, then the student) sample
from the same noises; every comparison is paired (16 repeats of 512 samples, each against its own fresh data set).
Asserted (issue #14): the teacher's few-step samples are over-concentrated (NLL gap below -0.3); the student is
measurably closer to the data than that teacher in both SWD (the whole paired interval below 0) and NLL gap (its
gap measurably above the teacher's and still below the teacher's distance from 0); it keeps every mode; the hybrid
keeps the teacher's mode entropy within 5% (the issue's goal) because the teacher's first step picks the mode.
"""
import json

import torch
from safetensors.torch import load_file

from distill_core.reference import metrics
from distill_core.reference.demo import DEMO_CLASS_NAMES, demo_mixture
from distill_core.reference.statistics import paired_difference

ITERATIONS = 1200
PER_CLASS = 2048
REPEATS = 16  # of 512 samples each
SETTINGS = {"objective": "dmd", "steps": ITERATIONS, "learning_rate": 1e-3, "rank": 16, "alpha": 0.0, "batch_size": 16,
            "guidance_min": 0.0, "guidance_max": 0.0, "loss": "huber", "gradient_checkpointing": False, "seed": 0,
            "save_every": 0, "lora_name": "dmd_quality", "resume": False, "dmd_guidance": 1.0, "ttur": 10,
            "generator_steps": 4, "dmd_regression": 1.0}
ROWS = ("teacher", "student", "hybrid")


def quality_graph() -> dict:
    graph = {
        "model": {"class_type": "StrideDemoModel", "inputs": {}},
        "empty": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": PER_CLASS}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
    }
    for name in DEMO_CLASS_NAMES:
        graph[name] = {"class_type": "StrideClassPrompt", "inputs": {"prompt": name}}
    graph["data"] = {"class_type": "StrideDistillDataset", "inputs": {
        "prompt_1": ["disc", 0], "prompt_2": ["square", 0], "prompt_3": ["cross", 0], "prompt_4": ["ring", 0],
        "empty_prompt": ["empty", 0], "width": 64, "height": 64}}
    graph["train"] = {"class_type": "StrideDistillLoRA", "inputs": {"model": ["model", 0], "data": ["data", 0],
                                                                    **SETTINGS}}
    graph["sampling"] = {"class_type": "StrideDistilledSampling", "inputs": {"model": ["model", 0],
                                                                             "lora": ["train", 1]}}
    for name in DEMO_CLASS_NAMES:
        for who, model in (("teacher", ["model", 0]), ("student", ["train", 0])):
            graph[f"{who}_{name}_guider"] = {"class_type": "BasicGuider", "inputs": {"model": model,
                                                                                     "conditioning": [name, 0]}}
        graph[f"hybrid_{name}_guider"] = {"class_type": "StrideHybridGuider", "inputs": {
            "base_guider": [f"teacher_{name}_guider", 0], "distilled_guider": [f"student_{name}_guider", 0],
            "base_sampler": ["euler", 0], "handover_steps": 1}}
        for who in ROWS:
            key = f"{who}_{name}"
            graph[f"{key}_run"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": [f"{key}_guider", 0], "sampler": ["sampling", 0],
                "sigmas": ["sampling", 1], "latent_image": ["latent", 0]}}
            graph[f"{key}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{key}_run", 0],
                                                                           "filename_prefix": f"dmd_quality_{key}"}}
    return graph


def test_short_dmd_run_and_the_hybrid_keeping_the_teachers_diversity(comfy_host):
    result = comfy_host.run(quality_graph())
    assert result.success, result.error()

    def samples(who: str) -> torch.Tensor:
        return torch.cat([load_file(str(comfy_host.output_path(result.outputs[f"{who}_{name}_save"]["latents"][0])))
                          ["latent_tensor"] for name in DEMO_CLASS_NAMES])

    labels = torch.arange(len(DEMO_CLASS_NAMES)).repeat_interleave(PER_CLASS)
    mixture = demo_mixture()
    teacher, student, hybrid = (metrics.evaluate(samples(who).double(), mixture, labels,
                                                 torch.Generator().manual_seed(5), REPEATS) for who in ROWS)
    swd = paired_difference(student["swd"], teacher["swd"])
    nll = paired_difference(student["nll_gap"], teacher["nll_gap"])
    lost = paired_difference(student["mode_entropy"], teacher["mode_entropy"])
    restored = paired_difference(hybrid["mode_entropy"], student["mode_entropy"])
    left = paired_difference(hybrid["mode_entropy"], teacher["mode_entropy"], scale=0.95)  # the 5% goal
    report = json.dumps({row: {figure: scores[figure].format() for figure in ("swd", "nll_gap", "mode_entropy",
                                                                               "mode_tv")}
                         for row, scores in zip(ROWS, (teacher, student, hybrid), strict=True)}
                        | {"student - teacher swd": swd.format(), "student - teacher nll_gap": nll.format(),
                           "student - teacher entropy": lost.format(),
                           "hybrid - student entropy": restored.format(),
                           "hybrid - 0.95 teacher entropy": left.format()})
    print(f"dmd quality (in-graph, {ITERATIONS} iterations): {report}")
    assert teacher["nll_gap"].value < -0.3, report  # undistilled few-step samples are over-concentrated
    assert swd.high < 0, report  # the student is measurably closer to the data in SWD ...
    assert nll.low > 0 and student["nll_gap"].high < -teacher["nll_gap"].high, report  # ... and in NLL gap
    # no mode lost: a collapsed student recalls half of them or fewer; a group of 32 samples of an exact sampler
    # can miss a small mode by chance
    assert student["mode_recall"].value >= 0.9, report
    assert left.low > 0, report
