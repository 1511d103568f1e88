"""Generate the shipped UI-format workflows in ``workflows/`` from the host's node definitions.

    .venv/bin/python scripts/make_workflows.py

Each workflow runs on the models the project builds itself (the analytic reference teacher
and the demo UNet), so it works on a fresh install, and a note in it says what to change for
real models.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host as host
from workflow_builder import Graph, Node

sys.path.insert(0, str(host.ROOT))
from distill_core.methods import METHODS, PiFlowSchedule, schedule_as

WORKFLOWS = host.ROOT / "workflows"
TEMPLATE_INDEX = host.ROOT / "web" / "workflow_templates.json"
FLOW_MAP = "flow map (ideal distilled student)"
DENOISER = "denoiser (ideal many-step teacher)"
COL = 360  # sketch pitch: column c is sketched at x = c * COL (the builder spaces columns by their real widths)
ROW = 100  # sketch pitch of rows; the builder pushes nodes down as far as their real heights need
TDD_SDXL = METHODS["tdd-sdxl"]  # widgets left out of a node take the node's defaults, the registry's values
PIFLOW = METHODS["pi-flux1-gm-4step"]
HYPER_FLUX = METHODS["hyper-flux-8step"]
WAN22_T2V, WAN22_I2V = METHODS["wan22-lightning-t2v-a14b"], METHODS["wan22-lightning-i2v-a14b"]
SAMPLER_WORKFLOWS = {  # name with its abbreviation spelled out, template title, template description
    "lcm": ("LCM (Latent Consistency Model)", "LCM sampler, 4 steps",
            "Latent Consistency Model sampling on an ideal distilled model."),
    "tcd": ("TCD (Trajectory Consistency Distillation, Hyper-SD)", "TCD sampler, 4 steps",
            "Trajectory Consistency Distillation (Hyper-SD) sampling, gamma "
            f"{METHODS['tcd-lora'].sampler.knobs['gamma']:g}."),
    "hyper_sd": ("Hyper-SD N-step (DDIM: TCD with gamma 0)", "Hyper-SD N-step, 4 steps",
                 "DDIM on Hyper-SD's trailing schedule, for its N-step LoRAs."),
    "tdd": ("TDD (Target-Driven Distillation)", "TDD sampler, 4 steps",
            f"Target-Driven Distillation sampling with real guidance (CFG {TDD_SDXL.cfg:g})."),
}


def _prompts(g: Graph, row: float, prompt: str = "disc"):
    positive = g.add("StrideClassPrompt", (0, row * ROW), title="Positive prompt (a class name)", prompt=prompt)
    negative = g.add("StrideClassPrompt", (0, (row + 1) * ROW), title="Negative prompt (empty)", prompt="")
    return positive, negative


def _view(g: Graph, latent, col: int, row: float, prefix: str, label: str, positive, shown: int | None = None,
          decode_title: str = "Preview decode (latent to RGB)") -> list:
    """Decode and save the samples (only the first ``shown`` of a large batch) and score all of them: the nodes,
    for the caller's group; the metrics node is the second."""
    pictures, first = latent, []
    if shown is not None:
        first = [g.add("LatentFromBatch", (col * COL, (row + 2) * ROW), title=f"First {shown} for the pictures",
                       samples=latent, batch_index=0, length=shown)]
        pictures = (first[0], 0)
    image = g.add("StrideLatentToImage", (col * COL, row * ROW), title=decode_title, samples=pictures, scale=16)
    metrics = g.add("StrideReferenceMetrics", (col * COL, (row + 1) * ROW), samples=latent, conditioning=positive,
                    label=label)
    save = g.add("SaveImage", ((col + 1) * COL, row * ROW), images=(image, 0), filename_prefix=prefix)
    return [image, metrics, save, *first]


def _compare(g: Graph, reports: list, col: int, row: float):
    """Stride Compare Results on the reports of several measuring nodes: one table, a row per label."""
    return g.add("StrideCompareResults", (col * COL, row * ROW), title="Scores side by side",
                 **{f"report_{i}": (node, 0) for i, node in enumerate(reports, 1)})


def few_step_method(method: str) -> Graph:
    """SamplerCustomAdvanced with a Stride sampler + scheduler on the ideal distilled model."""
    name, title, description = SAMPLER_WORKFLOWS[method]
    short = name.split(" (")[0]
    g = Graph(title=title, description=description)
    model = g.add("StrideReferenceModel", (0, 0), title="Distilled model (analytic stand-in)",
                  variant="demo", prediction="eps", form=FLOW_MAP, flow_map_steps=48)
    positive, negative = _prompts(g, 2)
    latent = g.add("EmptyLatentImage", (0, 4 * ROW), title="16 samples", width=64, height=64, batch_size=16)
    guider = g.add("CFGGuider", (COL, 0), title="Guidance (CFG)", model=(model, 0), positive=(positive, 0),
                   negative=(negative, 0), cfg=TDD_SDXL.cfg if method == "tdd" else 1.0)
    noise = g.add("RandomNoise", (COL, 1 * ROW), noise_seed=7)
    if method == "lcm":
        sampler = g.add("StrideLCMSampler", (COL, 2 * ROW), s_noise=1.0, boundary_condition=True)
        sigmas = g.add("StrideLCMScheduler", (COL, 3 * ROW), model=(model, 0), steps=4, original_steps=50, denoise=1.0)
    elif method == "tcd":
        sampler = g.add("StrideTCDSampler", (COL, 2 * ROW))  # the node's default gamma is the registry's
        sigmas = g.add("StrideHyperSDScheduler", (COL, 3 * ROW), model=(model, 0), mode="tcd grid", steps=4,
                       denoise=1.0)
    elif method == "hyper_sd":
        sampler = g.add("StrideTCDSampler", (COL, 2 * ROW), title="DDIM (TCD sampler, gamma 0)", gamma=0.0)
        sigmas = g.add("StrideHyperSDScheduler", (COL, 3 * ROW), model=(model, 0), mode="trailing", steps=4,
                       denoise=1.0)
    else:
        sampler = g.add("StrideTDDSampler", (COL, 2 * ROW))  # eta and clipping: the registry's defaults
        sigmas = g.add("StrideTDDScheduler", (COL, 3 * ROW), model=(model, 0), steps=4, special_jump=False,
                       denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, 0), noise=(noise, 0), guider=(guider, 0), sampler=(sampler, 0),
                   sigmas=(sigmas, 0), latent_image=(latent, 0))
    g.group(f"{short}: 4 steps", [guider, noise, sampler, sigmas, sample])
    g.group("Result: pictures and exact scores",
            _view(g, (sample, 0), 3, 0, f"stride_{method}", f"{method} 4 steps", (positive, 0)))
    g.note(
        f"{name} sampling in SamplerCustomAdvanced.\n\nThe model here is Stride's analytic reference "
        "(the exact flow map of a known mixture = an ideal distilled model), so the metrics node can score the "
        "samples exactly. For real use: replace it with your checkpoint + the matching LoRA, the class prompts "
        "with CLIP Text Encode, and the preview decode with VAE Decode.",
        (0, 6 * ROW),
    )
    return g


DEMO_SAMPLES = 1024  # per row: 8 metric repeats of 128, so the report's own comparisons hold within their intervals
DEMO_SHOWN = 16  # samples per row in the pictures


def demo(distill_steps: int = 200) -> Graph:
    """The main demo on the project's demo UNet: many-step base, few-step before/after distillation, hybrid."""
    g = Graph(title="Stride demo tour",
              description="Distil the demo model, then compare base, 4-step and hybrid samples.")
    base = g.add("StrideDemoModel", (0, 0), title="Demo model (trained UNet, the teacher)")
    prompts = [g.add("StrideClassPrompt", (0, (1 + i) * ROW), title=f"Prompt '{name}'", prompt=name)
               for i, name in enumerate(("disc", "square", "cross", "ring"))]
    empty = g.add("StrideClassPrompt", (0, 5 * ROW), title="Empty prompt", prompt="")
    latent = g.add("EmptyLatentImage", (0, 6 * ROW), title=f"{DEMO_SAMPLES} samples (the first {DEMO_SHOWN} shown)",
                   width=64, height=64, batch_size=DEMO_SAMPLES)
    shown = prompts[3]
    data = g.add("StrideDistillDataset", (COL, 0), title="Distillation data (prompts)", prompt_1=(prompts[0], 0),
                 prompt_2=(prompts[1], 0), prompt_3=(prompts[2], 0), prompt_4=(prompts[3], 0),
                 empty_prompt=(empty, 0), width=64, height=64)
    train = g.add("StrideDistillLoRA", (COL, 1 * ROW), title="Distil an LCM-LoRA (short run)", model=(base, 0),
                  data=(data, 0), objective="lcm", steps=distill_steps, learning_rate=1e-3, rank=16, alpha=0.0,
                  batch_size=16, guidance_min=0.0, guidance_max=0.0, loss="huber", gradient_checkpointing=False,
                  seed=0, save_every=50, lora_name="stride_demo", resume=True)
    plot = g.add("StrideLossPlot", (COL, 2 * ROW), loss=(train, 2), width=640, height=320)
    loss_image = g.add("SaveImage", (COL, 3 * ROW), title="Distillation loss", images=(plot, 0),
                       filename_prefix="stride_demo_loss")
    g.group("1. Distil an LCM-LoRA", [data, train, plot, loss_image])
    common = {"positive": (shown, 0), "negative": (empty, 0), "latent_image": (latent, 0)}
    rows = {
        "base_euler_25": ("2. Base model, 25 Euler steps", g.add(
            "KSampler", (2 * COL, 0), title="Base: euler, 25 steps", model=(base, 0), seed=3, steps=25, cfg=1.0,
            sampler_name="euler", scheduler="normal", denoise=1.0, **common)),
        "base_lcm_4": ("3. Before distillation: LCM, 4 steps", g.add(
            "StrideFewStepSample", (2 * COL, 10 * ROW), title="Base, LCM 4 steps (before distillation)",
            model=(base, 0), method="lcm", steps=4, cfg=1.0, seed=3, denoise=1.0, **common)),
        "distilled_lcm_4": ("4. After distillation: LCM, 4 steps", g.add(
            "StrideFewStepSample", (2 * COL, 20 * ROW), title="Distilled, LCM 4 steps (after)", model=(train, 0),
            method="lcm", steps=4, cfg=1.0, seed=3, denoise=1.0, **common)),
    }
    hybrid = g.add("StrideHybridSample", (2 * COL, 30 * ROW), title="Hybrid: 1 base step + 3 distilled steps",
                   base_model=(base, 0), base_positive=(shown, 0), base_negative=(empty, 0), base_cfg=1.0,
                   base_sampler="euler", distilled_model=(train, 0), distilled_positive=(shown, 0),
                   distilled_negative=(empty, 0), distilled_cfg=1.0, distilled_sampler="lcm",
                   schedule="lcm / tcd grid", steps=4, handover_steps=1, seed=3, latent_image=(latent, 0))
    rows["hybrid_1_plus_3"] = ("5. Hybrid: the base model's first step, then the distilled model", hybrid)
    reports = []
    for index, (name, (title, sample)) in enumerate(rows.items()):
        view = _view(g, (sample, 0), 3, 10 * index, f"stride_demo_{name}", name.replace("_", " "), (shown, 0),
                     DEMO_SHOWN)
        reports.append(view[1])
        members = [sample, *view]
        if sample is hybrid:
            grid = g.add("StrideTraceGrid", (5 * COL, 30 * ROW),
                         title="Diffusion-target view: x_t | predicted x0 per step", trace=(hybrid, 1),
                         samples=(hybrid, 0), max_images=4)
            members += [grid, g.add("SaveImage", (6 * COL, 30 * ROW), images=(grid, 0),
                                    filename_prefix="stride_demo_trace")]
        g.group(title, members)
    g.group("6. Compared", [_compare(g, reports, 2, 40)])
    g.note(
        "Stride demo on the project's own demo model (a small ComfyUI UNet trained on a known mixture of coloured "
        f"shapes; the metrics nodes score all {DEMO_SAMPLES} samples of a row exactly, with 95% intervals; the "
        f"pictures show the first {DEMO_SHOWN}). 1) A short in-graph LCM-LoRA distillation. 2) 25 Euler steps of the "
        "base model. 3) LCM (Latent Consistency Model) sampling with 4 steps on the undistilled base. 4) The same "
        "after distillation. 5) Hybrid: the base model's first step, then the distilled model (the method aims at "
        "the base model's diversity at distilled cost: compare the mode figures in the last table). The "
        "diffusion-target view shows, per step, the noisy latent x_t and the model's guess of the final picture "
        "(predicted x0). Change the prompt (disc, square, cross, ring) or the distillation steps.",
        (0, 8 * ROW),
    )
    return g


def distill_training(steps: int = 300) -> Graph:
    """Distil the demo UNet into an LCM-LoRA, save it, reload it with LoraLoader, sample 4 steps."""
    g = Graph(title="Distil an LCM-LoRA",
              description="Train a LoRA in the graph with a live loss chart, then sample in 4 steps.")
    base = g.add("StrideDemoModel", (0, 0), title="Teacher: demo model")
    prompts = [g.add("StrideClassPrompt", (0, (1 + i) * ROW), title=f"Prompt '{name}'", prompt=name)
               for i, name in enumerate(("disc", "square", "cross", "ring"))]
    empty = g.add("StrideClassPrompt", (0, 5 * ROW), title="Empty prompt", prompt="")
    latent = g.add("EmptyLatentImage", (0, 6 * ROW), title="16 samples", width=64, height=64, batch_size=16)
    data = g.add("StrideDistillDataset", (COL, 0), title="Distillation data (prompts)", prompt_1=(prompts[0], 0),
                 prompt_2=(prompts[1], 0), prompt_3=(prompts[2], 0), prompt_4=(prompts[3], 0),
                 empty_prompt=(empty, 0), width=64, height=64)
    train = g.add("StrideDistillLoRA", (2 * COL, 0), model=(base, 0), data=(data, 0), objective="lcm", steps=steps,
                  learning_rate=1e-3, rank=16, alpha=0.0, batch_size=16, guidance_min=0.0, guidance_max=0.0,
                  loss="huber", gradient_checkpointing=False, seed=0, save_every=100, lora_name="stride_demo_lcm",
                  resume=True)
    save = g.add("StrideSaveLoRA", (3 * COL, 0), lora=(train, 1), file_name="stride_demo_lcm", overwrite=True)
    plot = g.add("StrideLossPlot", (3 * COL, ROW), loss=(train, 2), width=640, height=320)
    loss_image = g.add("SaveImage", (4 * COL, 0), title="Distillation loss", images=(plot, 0),
                       filename_prefix="stride_distill_loss")
    g.group("1. Distil the teacher into an LCM-LoRA and save it", [data, train, save, plot, loss_image])
    before = g.add("StrideFewStepSample", (2 * COL, 10 * ROW), title="Teacher, LCM 4 steps (before)", model=(base, 0),
                   positive=(prompts[3], 0), negative=(empty, 0), latent_image=(latent, 0), method="lcm", steps=4,
                   cfg=0.0, seed=5, denoise=1.0)
    before_view = _view(g, (before, 0), 3, 10, "stride_distill_before", "before", (prompts[3], 0))
    g.group("2. Before: the teacher sampled with LCM in 4 steps", [before, *before_view])
    reload = g.add("StrideReloadLoRA", (COL, 20 * ROW), model=(base, 0), lora_name=(save, 0), strength=1.0)
    after = g.add("StrideFewStepSample", (2 * COL, 20 * ROW), title="Distilled LoRA, LCM 4 steps (after)",
                  model=(reload, 0), positive=(prompts[3], 0), negative=(empty, 0), latent_image=(latent, 0),
                  method="lcm", steps=4, cfg=0.0, seed=5, denoise=1.0)
    after_view = _view(g, (after, 0), 3, 20, "stride_distill_after", "after", (prompts[3], 0))
    g.group("3. After: the saved LoRA reloaded, LCM in 4 steps", [reload, after, *after_view])
    g.group("4. Compared", [_compare(g, [before_view[1], after_view[1]], 2, 30)])
    g.note(
        "LCM-LoRA (Latent Consistency Model LoRA) distillation inside ComfyUI. The teacher is the demo UNet; the LoRA "
        "is trained data-free from its own trajectories (add images + VAE to the data node to train on images), "
        "saved to models/loras, reloaded with ComfyUI's LoraLoader and sampled in 4 steps. The trainer draws the "
        "loss live. For SD1.5/SDXL: Load Checkpoint as teacher, CLIP Text Encode prompts, rank 64, 1000+ steps, "
        "batch 4-8, learning rate 1e-4.",
        (0, 8 * ROW),
    )
    return g


DMD_WORKFLOW = {"steps": 300, "learning_rate": 1e-3, "rank": 16, "batch_size": 16, "dmd_guidance": 1.0, "ttur": 5}
"""Settings of the dmd workflow's two runs (the demo model, its data distribution as the target: CFG 1): the rate and
length of bench/dmd.py's quality run, where the 4-step student measurably loses mode entropy and the hybrid restores
it (tests/host/test_dmd_quality.py)."""


def dmd_distillation() -> Graph:
    """Distil the demo UNet with dmd into a 4-step and a 1-step LoRA; sample before/after; hybrid; metrics."""
    g = Graph(title="Distil a DMD2 LoRA",
              description="Train 4-step and 1-step DMD2 LoRAs, then score them against the teacher.")
    base = g.add("StrideDemoModel", (0, 0), title="Teacher: demo model")
    prompts = [g.add("StrideClassPrompt", (0, (1 + i) * ROW), title=f"Prompt '{name}'", prompt=name)
               for i, name in enumerate(("disc", "square", "cross", "ring"))]
    empty = g.add("StrideClassPrompt", (0, 5 * ROW), title="Empty prompt", prompt="")
    latent = g.add("EmptyLatentImage", (0, 6 * ROW), title="32 samples (one noise draw each)", width=64, height=64,
                   batch_size=32)
    noise = g.add("RandomNoise", (0, 7 * ROW), noise_seed=5)
    shown = prompts[0]
    data = g.add("StrideDistillDataset", (COL, 0), title="Distillation data (prompts)", prompt_1=(prompts[0], 0),
                 prompt_2=(prompts[1], 0), prompt_3=(prompts[2], 0), prompt_4=(prompts[3], 0),
                 empty_prompt=(empty, 0), width=64, height=64)
    common = {"model": (base, 0), "data": (data, 0), "objective": "dmd", "steps": DMD_WORKFLOW["steps"],
              "learning_rate": DMD_WORKFLOW["learning_rate"], "rank": DMD_WORKFLOW["rank"], "alpha": 0.0,
              "batch_size": DMD_WORKFLOW["batch_size"], "guidance_min": 0.0, "guidance_max": 0.0, "loss": "huber",
              "gradient_checkpointing": False, "seed": 0, "save_every": 100, "resume": True,
              "export_headless": False, "dmd_guidance": DMD_WORKFLOW["dmd_guidance"], "ttur": DMD_WORKFLOW["ttur"],
              "keep_fake_score": False}
    trains = []
    for index, (steps, name) in enumerate(((4, "dmd4"), (1, "dmd1"))):
        row = 10 * index
        train = g.add("StrideDistillLoRA", (2 * COL, row * ROW), title=f"DMD2: {steps}-step generator",
                      generator_steps=steps, lora_name=f"stride_demo_{name}", **common)
        save = g.add("StrideSaveLoRA", (3 * COL, row * ROW), lora=(train, 1), file_name=f"stride_demo_{name}",
                     overwrite=True)
        plot = g.add("StrideLossPlot", (3 * COL, (row + 1) * ROW), loss=(train, 2), width=640, height=320)
        loss_image = g.add("SaveImage", (4 * COL, row * ROW), title="Distillation losses", images=(plot, 0),
                           filename_prefix=f"stride_{name}_loss")
        members = [data, train, save, plot, loss_image] if index == 0 else [train, save, plot, loss_image]
        g.group(f"{index + 1}. Distil a {steps}-step DMD2 LoRA and save it", members)
        trains.append(train)
    train4, train1 = trains
    reports = []

    def scored(number: int, title: str, name: str, sample: Node, helpers: list[Node]) -> None:
        """One sampling row: its helpers in column 1, the sampler in column 2, pictures and metrics after it."""
        view = _view(g, (sample, 0), 3, 10 * number, f"stride_dmd_{name}", name.replace("_", " "), (shown, 0))
        reports.append(view[1])
        g.group(f"{number + 1}. {title}", [*helpers, sample, *view])

    def custom(title: str, number: int, guider: Node, sampling: Node) -> Node:
        return g.add("SamplerCustomAdvanced", (2 * COL, 10 * number * ROW), title=title, noise=(noise, 0),
                     guider=(guider, 0), sampler=(sampling, 0), sigmas=(sampling, 1), latent_image=(latent, 0))

    teacher = g.add("KSampler", (2 * COL, 20 * ROW), title="Teacher: euler, 50 steps", model=(base, 0),
                    positive=(shown, 0), negative=(empty, 0), latent_image=(latent, 0), seed=5, steps=50, cfg=1.0,
                    sampler_name="euler", scheduler="normal", denoise=1.0)
    scored(2, "Teacher, 50 Euler steps", "teacher_50_steps", teacher, [])
    sampling4 = g.add("StrideDistilledSampling", (COL, 30 * ROW), title="The 4-step LoRA's sampling (DMD2 steps)",
                      model=(base, 0), lora=(train4, 1))
    base_guider = g.add("BasicGuider", (COL, 32 * ROW), title="Teacher guider (CFG 1)", model=(base, 0),
                        conditioning=(shown, 0))
    scored(3, "Before: the teacher on the 4 DMD steps", "teacher_4_steps",
           custom("Teacher, 4 DMD steps (before)", 3, base_guider, sampling4), [sampling4, base_guider])
    guider4 = g.add("BasicGuider", (COL, 40 * ROW), title="4-step student", model=(train4, 0), conditioning=(shown, 0))
    scored(4, "After: the 4-step student", "dmd_4_steps", custom("DMD student, 4 steps (after)", 4, guider4, sampling4),
           [guider4])
    sampling1 = g.add("StrideDistilledSampling", (COL, 50 * ROW), title="The 1-step LoRA's sampling",
                      model=(base, 0), lora=(train1, 1))
    guider1 = g.add("BasicGuider", (COL, 52 * ROW), title="1-step student", model=(train1, 0), conditioning=(shown, 0))
    scored(5, "After: the 1-step student", "dmd_1_step", custom("DMD student, 1 step (after)", 5, guider1, sampling1),
           [sampling1, guider1])
    euler = g.add("KSamplerSelect", (COL, 60 * ROW), sampler_name="euler")
    hybrid = g.add("StrideHybridGuider", (COL, 61 * ROW), title="Hybrid: 1 teacher step, then the 4-step student",
                   base_guider=(base_guider, 0), distilled_guider=(guider4, 0), base_sampler=(euler, 0),
                   handover_steps=1)
    scored(6, "Hybrid: 1 teacher step + 3 student steps", "hybrid_1_plus_3",
           custom("Hybrid: 1 teacher step + 3 student steps", 6, hybrid, sampling4), [euler, hybrid])
    g.group("8. Compared", [_compare(g, reports, 2, 70)])
    g.note(
        "Distribution-matching distillation (DMD2) inside ComfyUI. Each Stride Distill LoRA run trains two LoRAs on "
        "the one demo UNet: the generator (what you load) and a fake score that learns the generator's samples; the "
        "real score is the teacher with its LoRAs switched off. 1) A 4-step generator on DMD2's timesteps 999, 749, "
        "499, 249; 2) a 1-step one; the live chart draws the generator's and the fake score's losses in panels of "
        "their own. Stride Distilled Sampling gives each LoRA's sampler and sigmas (predict x0, re-noise). 3) The "
        "teacher with 50 euler steps; 4) the undistilled teacher on the 4 DMD steps; 5, 6) the 4-step and 1-step "
        "students; 7) the hybrid (the teacher takes the first step, the student the rest) to recover what the "
        "mode-seeking student loses. Stride Reference Metrics scores each row against the demo's known data "
        "distribution (SWD, NLL gap, mode recall and entropy, with intervals); 8) compares them.\n\nReal models: "
        "Load Checkpoint (SD1.5/SDXL) as the teacher, CLIP Text Encode prompts, dmd_guidance 1.75 (SD1.5) or 8 "
        "(SDXL) as DMD2 used, ttur 5-10, rank 64, thousands of steps; VAE Decode instead of the preview decode.",
        (0, 9 * ROW),
    )
    return g


def piflow() -> Graph:
    """pi-Flow policy sampling on the exact reference pi-Flow teacher (no downloads)."""
    g = Graph(title="pi-Flow sampler, 4 steps",
              description="Policy sampling: one model call per step, then "
                          f"{PIFLOW.sampler.knobs['substeps']} cheap substeps.")
    model = g.add("StridePiFlowReferenceModel", (0, 0), title="pi-Flow model (exact reference teacher)")
    positive = g.add("StrideClassPrompt", (0, ROW), title="Prompt (the reference is unconditional)", prompt="")
    latent = g.add("EmptyLatentImage", (0, 2 * ROW), title="16 samples", width=64, height=64, batch_size=16)
    guider = g.add("BasicGuider", (COL, 0), title="Guidance is distilled in: BasicGuider", model=(model, 0),
                   conditioning=(positive, 0))
    noise = g.add("RandomNoise", (COL, ROW), noise_seed=7)
    knobs, schedule = PIFLOW.sampler.knobs, schedule_as(PIFLOW, PiFlowSchedule)
    sampler = g.add("StridePiFlowSampler", (COL, 2 * ROW), substeps=knobs["substeps"],
                    diffusion_coefficient=knobs["h"], temperature=knobs["temperature"], manual_temperature=1.0,
                    shift=knobs["shift"])
    sigmas = g.add("StridePiFlowScheduler", (COL, 3 * ROW), model=(model, 0), steps=PIFLOW.default_steps,
                   shift=schedule.shift, final_step_size_scale=schedule.final_step_size_scale, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, 0), noise=(noise, 0), guider=(guider, 0), sampler=(sampler, 0),
                   sigmas=(sigmas, 0), latent_image=(latent, 0))
    g.group(f"pi-Flow sampling ({PIFLOW.default_steps} network steps, {knobs['substeps']} policy substeps)",
            [guider, noise, sampler, sigmas, sample])
    image = g.add("StrideLatentToImage", (3 * COL, 0), title="Preview decode (latent to RGB)", samples=(sample, 0),
                  scale=16)
    save = g.add("SaveImage", (4 * COL, 0), images=(image, 0), filename_prefix="stride_piflow")
    g.group("Result", [image, save])
    g.note(
        "pi-Flow (policy-based flow models): once per step the model predicts a policy (here the exact "
        f"Gaussian-mixture posterior of a known mixture), which the sampler integrates with {knobs['substeps']} cheap "
        "substeps. "
        "Right result: every picture shows the letter pi in warm colours (yellow, orange, red, pink, mixed pixel by "
        "pixel and different in every sample) on a grey background. "
        "Guidance is distilled in: BasicGuider.\n\n"
        "With a released adapter (pi-FLUX.1): Load Diffusion Model flux1-dev -> Stride pi-Flow Adapter Loader "
        "(gmflux_k8_piid_4step.safetensors in models/loras) -> this MODEL input; DualCLIPLoader (clip_l, t5xxl) + "
        f"CLIP Text Encode -> FluxGuidance {PIFLOW.flux_guidance:g} (exactly {PIFLOW.flux_guidance:g}) -> "
        "BasicGuider; EmptySD3LatentImage; 4 steps "
        "(8 with the 8-step adapter); VAE Decode (ae.safetensors) instead of the preview decode. "
        "Stride pi-Flow Sample does the same in one node.",
        (0, 4 * ROW),
    )
    return g


def hybrid_diversity() -> Graph:
    """Diversity distillation on the reference models: base, collapsed distilled and hybrid side by side."""
    g = Graph(title="Hybrid sampling",
              description="The base model's first step, then a distilled model: variety in 4 steps.")
    base = g.add("StrideReferenceModel", (0, 0), title="Base model (exact teacher)",
                 variant="demo", prediction="eps", form=DENOISER, flow_map_steps=48)
    distilled = g.add("StrideReferenceModel", (0, ROW), title="Distilled model (mode-collapsed student)",
                      variant="demo collapsed (2 of 8 modes)", prediction="eps", form=FLOW_MAP, flow_map_steps=48)
    positive, negative = _prompts(g, 2, "disc")
    latent = g.add("EmptyLatentImage", (0, 4 * ROW), title="32 samples (one noise draw each)", width=64, height=64,
                   batch_size=32)
    common = {"positive": (positive, 0), "negative": (negative, 0), "latent_image": (latent, 0)}
    rows = {
        "base": ("1. Base model alone: 20 Euler steps, guidance (CFG) 3", g.add(
            "KSampler", (COL, 0), title="Base alone: euler, 20 steps, CFG 3", model=(base, 0), seed=3, steps=20,
            cfg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0, **common)),
        "distilled": ("2. Distilled model alone: LCM, 4 steps", g.add(
            "StrideFewStepSample", (COL, 10 * ROW), title="Distilled alone: LCM, 4 steps", model=(distilled, 0),
            method="lcm", steps=4, cfg=1.0, seed=3, denoise=1.0, **common)),
    }
    hybrid = g.add("StrideHybridSample", (COL, 20 * ROW), title="Hybrid: 1 base step + 3 distilled steps",
                   base_model=(base, 0), base_positive=(positive, 0), base_negative=(negative, 0),
                   base_cfg=3.0, base_sampler="euler", distilled_model=(distilled, 0),
                   distilled_positive=(positive, 0), distilled_negative=(negative, 0), distilled_cfg=1.0,
                   distilled_sampler="lcm", schedule="lcm / tcd grid", steps=4, handover_steps=1, seed=3,
                   latent_image=(latent, 0))
    rows["hybrid"] = ("3. Hybrid: 1 base step, then 3 distilled steps", hybrid)
    reports = []
    for index, (name, (title, sample)) in enumerate(rows.items()):
        y = 10 * index
        image = g.add("StrideLatentToImage", (2 * COL, y * ROW), title="Preview decode (latent to RGB)",
                      samples=(sample, 0), scale=8)
        scores = [g.add("StrideReferenceMetrics", (2 * COL, (y + 1) * ROW), samples=(sample, 0),
                        conditioning=(positive, 0), label=name),
                  g.add("StrideImageDiversity", (2 * COL, (y + 2) * ROW), images=(image, 0), label=name)]
        reports += scores
        members = [sample, image, *scores,
                   g.add("SaveImage", (3 * COL, y * ROW), images=(image, 0), filename_prefix=f"stride_hybrid_{name}")]
        if sample is hybrid:
            grid = g.add("StrideTraceGrid", (4 * COL, y * ROW),
                         title="Diffusion-target (DT) view: x_t | predicted x0 per step",
                         trace=(hybrid, 1), samples=(hybrid, 0), max_images=4)
            members += [grid, g.add("SaveImage", (5 * COL, y * ROW), images=(grid, 0),
                                    filename_prefix="stride_hybrid_trace")]
        g.group(title, members)
    g.group("4. Compared", [_compare(g, reports, 1, 30)])
    g.note(
        "Diversity distillation (Gandikota & Bau). Row 1: the base model alone (many steps). Row 2: a distilled model "
        "that lost modes (here the exact flow map of a mixture that keeps one of the two 'disc' colours): 4 fast "
        "steps, mostly one colour. Row 3: the hybrid: the base model takes the first step of the 4-step LCM "
        "schedule (t=999), the distilled model the rest (759, 499, 259). Compare mode entropy / recall / TV (Stride "
        "Reference Metrics) and Stride Image Diversity, side by side in the last table: the method aims at the base "
        "model's variety at 1 base + 3 distilled model calls. The metrics come with 95% intervals (value ± "
        "half-width), wide at 32 samples: raise the batch to a few hundred to tell the rows apart. The "
        "diffusion-target (DT) view shows, per step, the noisy latent x_t beside the model's guess of the final "
        "picture (predicted x0): the first row is the base model's blurry guess, then the distilled model commits "
        "to a picture. Base CFG (classifier-free guidance) is 3 here: on the exact reference teacher one big base "
        "step at the paper's CFG 7 overshoots for some classes.\n\n"
        "Real models: Load Checkpoint (SDXL base) -> base_model; the same checkpoint + LoraLoader with an LCM / "
        "Hyper-SD / TDD LoRA -> distilled_model (both must share the VAE); CLIP Text Encode for the prompts; base cfg "
        f"7 (the paper's), distilled cfg 1 (TDD {TDD_SDXL.cfg:g}); distilled_sampler and schedule as the LoRA was "
        "trained (LCM: lcm "
        "+ lcm grid, Hyper-SD unified: tcd + lcm grid, Hyper-SD N-step: euler + trailing, TDD: tdd + tdd); VAE Decode "
        "instead of the preview decode, and connect the VAE to Stride Trace Grid. Stride Reference Metrics only "
        "scores the reference models; Stride Image Diversity works on any images. For other sampler settings use "
        "Stride Hybrid Guider in SamplerCustomAdvanced.",
        (0, 6 * ROW),
    )
    return g


OSS_SAMPLES = 256  # per row: enough for the metrics' intervals to separate the rows that differ most
OSS_SHOWN = 16  # samples per row in the pictures
OSS_STEPS = 5


def optimal_steps() -> Graph:
    """Search a 5-step schedule for the demo model (Stride Optimal Steps), then Euler on it next to Euler on ComfyUI's
    normal / karras schedulers and the AYS / GITS presets (made for SD1.5-type models, as the demo model is), scored
    exactly; the search's 100-step teacher as the reference row."""
    g = Graph(title=f"Optimal {OSS_STEPS}-step schedule",
              description="Search the best 5-step schedule for a model; compare it with ComfyUI's.")
    model = g.add("StrideDemoModel", (0, 0), title="Demo model (trained UNet, SD1.5 latent format)")
    positive, negative = _prompts(g, 1, "ring")
    search_latent = g.add("EmptyLatentImage", (0, 3 * ROW), title="Search latent: size, and latents per model call",
                          width=64, height=64, batch_size=16)
    latent = g.add("EmptyLatentImage", (0, 4 * ROW), title=f"{OSS_SAMPLES} samples per row (the first 16 shown)",
                   width=64, height=64, batch_size=OSS_SAMPLES)
    search = g.add("StrideOptimalSteps", (COL, 0), title=f"Search the {OSS_STEPS}-step schedule (saved, then reused)",
                   latent_image=(search_latent, 0), steps=OSS_STEPS, teacher_steps=100, noise_samples=8,
                   solver="euler", teacher_solver="euler", teacher_scheduler="normal", mode="paper", seed=0, cfg=1.0,
                   schedule_name="stride_demo_model", model=(model, 0), positive=(positive, 0),
                   negative=(negative, 0))
    guider = g.add("CFGGuider", (COL, 3 * ROW), model=(model, 0), positive=(positive, 0), negative=(negative, 0),
                   cfg=1.0)
    noise = g.add("RandomNoise", (COL, 4 * ROW), noise_seed=3)
    euler = g.add("KSamplerSelect", (COL, 5 * ROW), sampler_name="euler")
    g.group("1. Search the schedule", [search, guider, noise, euler])
    schedules = {
        "searched": ("Stride Optimal Steps (searched for this model)", search),
        "normal": ("normal", g.add("BasicScheduler", (2 * COL, 10 * ROW), model=(model, 0), scheduler="normal",
                                   steps=OSS_STEPS, denoise=1.0)),
        "karras": ("karras", g.add("BasicScheduler", (2 * COL, 20 * ROW), model=(model, 0), scheduler="karras",
                                   steps=OSS_STEPS, denoise=1.0)),
        "ays": ("Align Your Steps preset (SD1)", g.add("AlignYourStepsScheduler", (2 * COL, 30 * ROW),
                                                        model_type="SD1", steps=OSS_STEPS, denoise=1.0)),
        "gits": ("GITS preset (coeff 1.2)", g.add("GITSScheduler", (2 * COL, 40 * ROW), coeff=1.2, steps=OSS_STEPS,
                                                  denoise=1.0)),
        "teacher": ("the search's teacher: normal, 100 steps", g.add("BasicScheduler", (2 * COL, 50 * ROW),
                                                                      model=(model, 0), scheduler="normal", steps=100,
                                                                      denoise=1.0)),
    }
    reports = []
    for index, (name, (title, sigmas)) in enumerate(schedules.items()):
        steps = "100 steps" if name == "teacher" else f"{OSS_STEPS} steps"
        sample = g.add("SamplerCustomAdvanced", (3 * COL, 10 * index * ROW), title=f"Euler, {steps}: {title}",
                       noise=(noise, 0), guider=(guider, 0), sampler=(euler, 0), sigmas=(sigmas, 0),
                       latent_image=(latent, 0))
        view = _view(g, (sample, 0), 4, 10 * index, f"stride_oss_{name}", f"euler {steps}, {name}", (positive, 0),
                     OSS_SHOWN)
        reports.append(view[1])
        members = [sample, *view] if sigmas is search else [sigmas, sample, *view]
        g.group(f"{index + 2}. Euler {steps}: {name}", members)
    g.group(f"{len(schedules) + 2}. Compared", [_compare(g, reports, 3, 10 * len(schedules))])
    g.note(
        "Schedule distillation (Optimal Stepsize, Pei et al.): Stride Optimal Steps runs the model's own 100-step "
        "Euler trajectory from 8 noises and picks, by dynamic programming, the 5 of its sigmas on which Euler lands "
        "closest to it. Its report compares that schedule with ComfyUI's normal/simple/karras/beta at the same 5 steps "
        "on those noises. The result is saved in models/stride/schedules under a fingerprint of the model and the "
        "settings: queue again and it is reused without a model call (Stride Saved Schedule loads it by name). The "
        f"rows below sample {OSS_SAMPLES} fresh noises with Euler on each schedule; Stride Reference Metrics scores "
        "them exactly (95% intervals); the last row is the search's 100-step teacher.\n\n"
        "AYS (SD1) and GITS are presets for SD1.5-type models, like the demo model. ComfyUI's OptimalStepsScheduler "
        "presets are for FLUX, Wan and Chroma (flow models), so they do not apply here: with such a model add it as "
        "another row. Real models: Load Checkpoint -> model, CLIP Text Encode -> prompts, your sampling cfg, VAE "
        "Decode instead of the preview decode; the search latent sets the size searched at (use the size you sample "
        "at) and its batch the latents per model call (lower it if memory runs out).",
        (0, 6 * ROW),
    )
    return g


# ------------------------------------------------------------------------------------------
# Few-step families (issue 13): one workflow per family group, on the reference models
# ------------------------------------------------------------------------------------------
VIDEO = "video (B, 4, T, 8, 8): independent frames"
REAL_DECODE = "Preview decode (VAE Decode for real models)"


def _family_inputs(g: Graph, prediction: str, latents: str | None = None, form: str = FLOW_MAP,
                   title: str = "Distilled model (analytic stand-in)"):
    """The reference model, a class prompt and an empty prompt in column 0 (``latents``: the video variant)."""
    extra = {} if latents is None else {"latents": latents}
    model = g.add("StrideReferenceModel", (0, 0), title=title, variant="demo", prediction=prediction, form=form,
                  flow_map_steps=48, **extra)
    positive = g.add("StrideClassPrompt", (0, ROW), title="Prompt (a class name)", prompt="ring")
    negative = g.add("StrideClassPrompt", (0, 2 * ROW), title="Empty prompt", prompt="")
    return model, positive, negative


def _family_rows(g: Graph, model, positive, negative, latent, rows: list[tuple[str, int, str]], prefix: str) -> list:
    """One Stride Few-Step Sample per (family, steps, title), each with its result, one numbered group per row;
    the rows' metrics nodes."""
    reports = []
    for index, (family, steps, title) in enumerate(rows):
        sample = g.add("StrideFewStepSample", (COL, 10 * index * ROW), title=title, model=(model, 0),
                       positive=(positive, 0), negative=(negative, 0), latent_image=(latent, 0), method=family,
                       steps=steps, cfg=0.0, seed=7, denoise=1.0)
        view = _view(g, (sample, 0), 2, 10 * index, f"{prefix}_{family}", family, (positive, 0),
                     decode_title=REAL_DECODE)
        reports.append(view[1])
        g.group(f"{index + 1}. {title}", [sample, *view])
    return reports


def families_sdxl() -> Graph:
    """SDXL-class families (eps): SDXL-Lightning, DMD2, Hyper-SD, one node each; Lightning 8-step as SIGMAS."""
    g = Graph(title="SDXL few-step families",
              description="SDXL-Lightning, DMD2 and Hyper-SD in one node each, and as SIGMAS.")
    model, positive, negative = _family_inputs(g, "eps")
    latent = g.add("EmptyLatentImage", (0, 3 * ROW), title="16 samples", width=64, height=64, batch_size=16)
    reports = _family_rows(g, model, positive, negative, latent, [
        ("sdxl-lightning-4step", 4, "SDXL-Lightning 4-step: Euler, trailing"),
        ("dmd2-sdxl-4step", 4, "DMD2 4-step: x0, re-noise"),
        ("hyper-sd-4step", 4, "Hyper-SD 4-step LoRA: DDIM trailing")], "stride_sdxl")
    y = 30
    schedule = g.add("StrideFewStepScheduler", (COL, y * ROW), title="Lightning 8-step SIGMAS + sampler",
                     model=(model, 0), family="sdxl-lightning-8step", steps=0, denoise=1.0, width=64, height=64)
    guider = g.add("CFGGuider", (COL, (y + 1) * ROW), title="Guidance (CFG 1)", model=(model, 0),
                   positive=(positive, 0), negative=(negative, 0), cfg=1.0)
    noise = g.add("RandomNoise", (COL, (y + 2) * ROW), noise_seed=7)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, y * ROW), noise=(noise, 0), guider=(guider, 0),
                   sampler=(schedule, 1), sigmas=(schedule, 0), latent_image=(latent, 0))
    view = _view(g, (sample, 0), 3, y, "stride_sdxl_graph", "sdxl-lightning-8step (graph)", (positive, 0),
                 decode_title=REAL_DECODE)
    reports.append(view[1])
    g.group("4. Lightning 8-step as a graph: Few-Step Scheduler", [schedule, guider, noise, sample, *view])
    g.group("5. Compared", [_compare(g, reports, 1, 40)])
    g.note(
        "Few-step SDXL families. Each Stride Few-Step Sample uses the schedule, sampler, CFG and knobs its authors "
        "use (method = the family; 'auto' cannot tell SDXL LoRAs apart, so name it). Row 4 builds the same from "
        "Stride Few-Step Scheduler (its SIGMAS and SAMPLER) in SamplerCustomAdvanced. The model here is Stride's "
        "analytic stand-in for a distilled SDXL (the exact flow map of a known mixture), scored exactly by Stride "
        "Reference Metrics; the last table puts the rows side by side.\n\nReal models: Load Checkpoint "
        "sd_xl_base_1.0.safetensors -> LoraLoaderModelOnly (strength 1.0) with sdxl_lightning_4step_lora.safetensors "
        "(ByteDance/SDXL-Lightning), dmd2_sdxl_4step_lora.safetensors (tianweiy/DMD2) or "
        "Hyper-SDXL-4steps-lora.safetensors (ByteDance/Hyper-SD) -> MODEL; CLIP Text Encode for the prompts; Empty "
        "Latent Image 1024 x 1024; VAE Decode instead of the preview decode. The full UNets "
        "(sdxl_lightning_4step_unet.safetensors, DMD2's 4-step UNet) load with Load Diffusion Model. The 1-step "
        "Lightning UNet predicts x0: put ModelSamplingDiscrete (x0) before the sampler.",
        (0, 5 * ROW),
    )
    return g


def families_flux() -> Graph:
    """FLUX-class families (flow): FLUX.1 schnell in one node, Hyper-FLUX 8-step as SIGMAS with FLUX guidance."""
    g = Graph(title="FLUX few-step families",
              description="FLUX.1 schnell, and Hyper-FLUX with its image-size shift and guidance.")
    model, positive, negative = _family_inputs(g, "flow")
    latent = g.add("EmptySD3LatentImage", (0, 3 * ROW), title="16 samples (64 x 64)", width=64, height=64,
                   batch_size=16)
    reports = _family_rows(g, model, positive, negative, latent,
                           [("flux1-schnell", 4, "FLUX.1 schnell: 4 Euler steps")], "stride_flux")
    y = 10
    schedule = g.add("StrideFewStepScheduler", (COL, y * ROW), title="Hyper-FLUX 8-step SIGMAS (image-size shift)",
                     model=(model, 0), family="hyper-flux-8step", steps=0, denoise=1.0, width=64, height=64)
    guidance = g.add("FluxGuidance", (COL, (y + 1) * ROW),
                     title=f"FLUX guidance {HYPER_FLUX.flux_guidance:g} (Hyper-FLUX)", conditioning=(positive, 0),
                     guidance=HYPER_FLUX.flux_guidance)
    guider = g.add("CFGGuider", (COL, (y + 2) * ROW), title="Guidance (CFG 1)", model=(model, 0),
                   positive=(guidance, 0), negative=(negative, 0), cfg=1.0)
    noise = g.add("RandomNoise", (COL, (y + 3) * ROW), noise_seed=7)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, y * ROW), noise=(noise, 0), guider=(guider, 0),
                   sampler=(schedule, 1), sigmas=(schedule, 0), latent_image=(latent, 0))
    view = _view(g, (sample, 0), 3, y, "stride_flux_hyper", "hyper-flux-8step", (positive, 0),
                 decode_title=REAL_DECODE)
    reports.append(view[1])
    g.group("2. Hyper-FLUX 8-step as a graph: SIGMAS and sampler", [schedule, guidance, guider, noise, sample, *view])
    g.group("3. Compared", [_compare(g, reports, 1, 20)])
    g.note(
        "Few-step FLUX families on Stride's analytic stand-in for a distilled flow model. FLUX.1 schnell: 1-4 Euler "
        "steps without a time shift or guidance. Hyper-FLUX and TDD-FLUX keep FLUX.1-dev's image-size shift (width "
        "and height on the scheduler = the image's) and their FLUX guidance (Few-Step Sample sets it when no "
        "FluxGuidance did). The last table puts the rows' exact scores side by side.\n\nReal models: Load "
        "Diffusion Model flux1-schnell.safetensors (or flux1-dev.safetensors -> LoraLoaderModelOnly "
        f"Hyper-FLUX.1-dev-8steps-lora.safetensors at strength {HYPER_FLUX.lora_strength:g}, ByteDance/Hyper-SD); "
        "DualCLIPLoader "
        "clip_l.safetensors + t5xxl_fp16.safetensors (type flux) -> CLIP Text Encode; EmptySD3LatentImage 1024 x "
        "1024 (scheduler width/height 1024); VAE Loader ae.safetensors -> VAE Decode.",
        (0, 5 * ROW),
    )
    return g


def families_qwen_zimage() -> Graph:
    """Qwen-Image-Lightning (4 steps) and Z-Image-Turbo (8 steps): shift-3 flow families, one node each."""
    g = Graph(title="Qwen-Image and Z-Image",
              description="Qwen-Image-Lightning (4 steps) and Z-Image-Turbo (8 steps), shift 3.")
    model, positive, negative = _family_inputs(g, "flow")
    latent = g.add("EmptySD3LatentImage", (0, 3 * ROW), title="16 samples", width=64, height=64, batch_size=16)
    reports = _family_rows(g, model, positive, negative, latent, [
        ("qwen-image-lightning-4step", 4, "Qwen-Image-Lightning 4-step: shift 3"),
        ("z-image-turbo", 8, "Z-Image-Turbo: 8 Euler steps, shift 3")], "stride_qwen_zimage")
    g.group("3. Compared", [_compare(g, reports, 1, 20)])
    g.note(
        "Qwen-Image-Lightning and Z-Image-Turbo on Stride's analytic stand-in for a distilled flow model: uniform "
        "Euler steps at shift 3 at every resolution, CFG 1. 'auto' picks the family on the real models (ComfyUI's "
        "model detection names them). The last table puts the rows' exact scores side by side.\n\nReal models: "
        "Qwen-Image: Load Diffusion Model qwen_image_fp8_e4m3fn.safetensors -> LoraLoaderModelOnly "
        "Qwen-Image-Lightning-4steps-V1.0.safetensors (strength 1.0, lightx2v/Qwen-Image-Lightning); Load CLIP "
        "qwen_2.5_vl_7b_fp8_scaled.safetensors (type qwen_image); Load VAE qwen_image_vae.safetensors. "
        "Z-Image-Turbo: Load Diffusion Model z_image_turbo_bf16.safetensors; Load CLIP qwen_3_4b.safetensors (type "
        "lumina2); Load VAE ae.safetensors. Both: EmptySD3LatentImage, CLIP Text Encode, VAE Decode instead of the "
        "preview decode.",
        (0, 5 * ROW),
    )
    return g


def families_wan_video() -> Graph:
    """Wan video latents: Wan 2.1 lightx2v in one node; Wan 2.2's two experts handing over at the sigma boundary."""
    g = Graph(title="Wan video few-step",
              description="Wan 2.1 lightx2v, and Wan 2.2's two experts handing over at sigma "
                          f"{WAN22_T2V.expert_boundary:g}.")
    model, positive, negative = _family_inputs(g, "flow", VIDEO, title="Distilled video model (stand-in)")
    latent = g.add("EmptyHunyuanLatentVideo", (0, 3 * ROW), title="4 videos of 9 frames (3 latent frames)",
                   width=64, height=64, length=9, batch_size=4)
    reports = _family_rows(g, model, positive, negative, latent,
                           [("wan21-lightx2v-4step", 4, "Wan 2.1 lightx2v: 4 Euler steps, shift 5")], "stride_wan21")
    y = 10
    high = g.add("StrideReferenceModel", (COL, y * ROW), title="High-noise expert (stand-in)", variant="demo",
                 prediction="flow", form=DENOISER, flow_map_steps=48, latents=VIDEO)
    hybrid = g.add("StrideHybridSample", (COL, (y + 1) * ROW), title="Wan 2.2: high-noise, then low-noise expert",
                   base_model=(high, 0), base_positive=(positive, 0), base_negative=(negative, 0), base_cfg=1.0,
                   base_sampler="euler", distilled_model=(model, 0), distilled_positive=(positive, 0),
                   distilled_negative=(negative, 0), distilled_cfg=1.0, distilled_sampler="lcm",
                   schedule="lcm / tcd grid", steps=4, handover_steps=1, seed=7, latent_image=(latent, 0),
                   family="wan22-lightning-t2v-a14b", handover_boundary=0.0)
    view = _view(g, (hybrid, 0), 2, y, "stride_wan22", "wan22 two experts", (positive, 0), decode_title=REAL_DECODE)
    reports.append(view[1])
    grid = g.add("StrideTraceGrid", (4 * COL, y * ROW), title="Who ran each step (blue: high-noise expert)",
                 trace=(hybrid, 1), samples=(hybrid, 0), max_images=2)
    trace_image = g.add("SaveImage", (5 * COL, y * ROW), images=(grid, 0), filename_prefix="stride_wan22_trace")
    g.group(f"2. Wan 2.2 A14B: two experts hand over at sigma {WAN22_T2V.expert_boundary:g}",
            [high, hybrid, *view, grid, trace_image])
    g.group("3. Compared", [_compare(g, reports, 1, 20)])
    g.note(
        "Wan video families on Stride's analytic stand-ins (each latent frame an exact draw of the prompt's class, so "
        "the scores are exact). Row 1: Wan 2.1 lightx2v, 4 Euler steps at shift 5 (sigmas 1, 0.9375, 0.8333, 0.625). "
        "Row 2: Wan 2.2 A14B's two experts: Stride Hybrid Sample with the Wan2.2-Lightning family runs the "
        f"high-noise expert while sigma >= {WAN22_T2V.expert_boundary:g} (the first 2 steps; I2V: "
        f"{WAN22_I2V.expert_boundary:g}), the low-noise expert after, as two "
        "core KSamplerAdvanced (steps 0-2 with leftover noise, 2-4) do. The trace grid marks which expert ran each "
        "step; the last table puts the rows' exact scores side by side.\n\nReal models: Load Diffusion Model "
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors -> LoraLoaderModelOnly "
        "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors (lightx2v/Wan2.2-Lightning, "
        "strength 1.0) -> base_model; wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors + its "
        "low_noise_model.safetensors -> distilled_model; Load CLIP umt5_xxl_fp8_e4m3fn_scaled.safetensors (type wan) "
        "-> CLIP Text Encode; EmptyHunyuanLatentVideo 832 x 480, 81 frames; Load VAE wan_2.1_vae.safetensors -> VAE "
        "Decode -> Create Video -> Save Video. Wan 2.1: wan2.1_t2v_14B_fp8_scaled.safetensors + the lightx2v 4-step "
        "LoRA in row 1.",
        (0, 5 * ROW),
    )
    return g


def family_workflows() -> dict[str, Graph]:
    return {"families_sdxl": families_sdxl(), "families_flux": families_flux(),
            "families_qwen_zimage": families_qwen_zimage(), "families_wan_video": families_wan_video()}


def build_all() -> dict[str, Graph]:
    graphs = {"stride_demo": demo(), "distill_lcm_lora": distill_training(), "distill_dmd_lora": dmd_distillation(),
              "piflow": piflow(), "hybrid_diversity": hybrid_diversity(), "optimal_steps": optimal_steps()}
    for method in ("lcm", "tcd", "hyper_sd", "tdd"):
        graphs[f"sampler_{method}"] = few_step_method(method)
    graphs.update(family_workflows())
    return graphs


def template_index(graphs: dict[str, Graph]) -> list[dict]:
    """The templates' titles and descriptions in the core templates' index.json form (one category).

    Neither frontend of the supported hosts (1.32.9, 1.49.6) reads metadata for a pack's templates: they
    list the file names. web/stride_templates.js puts these titles and descriptions on the pack's cards.
    """
    return [{
        "moduleName": "stride", "title": "Stride few-step diffusion", "type": "image",
        "templates": [{"name": name, "title": graph.title, "description": graph.description, "mediaType": "image",
                       "mediaSubtype": "jpg"} for name, graph in sorted(graphs.items())],
    }]


def main() -> None:
    comfy = host.InProcessHost(Path(tempfile.mkdtemp(prefix="stride-workflows-")))
    info = comfy.object_info
    WORKFLOWS.mkdir(exist_ok=True)
    graphs = build_all()
    for name, graph in graphs.items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(graph.to_ui(info), indent=1) + "\n")
        print(f"wrote {path}")
    TEMPLATE_INDEX.write_text(json.dumps(template_index(graphs), indent=1) + "\n")
    print(f"wrote {TEMPLATE_INDEX}")


if __name__ == "__main__":
    main()
