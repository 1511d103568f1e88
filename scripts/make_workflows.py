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
from workflow_builder import Graph

sys.path.insert(0, str(host.ROOT))
from distill_core.methods import METHODS, PiFlowSchedule, schedule_as

WORKFLOWS = host.ROOT / "workflows"
FLOW_MAP = "flow map (ideal distilled student)"
DENOISER = "denoiser (ideal many-step teacher)"
COL = 360
TDD_SDXL = METHODS["tdd-sdxl"]  # widgets left out of a node take the node's defaults, the registry's values
PIFLOW = METHODS["pi-flux1-gm-4step"]
HYPER_FLUX = METHODS["hyper-flux-8step"]
WAN22_T2V, WAN22_I2V = METHODS["wan22-lightning-t2v-a14b"], METHODS["wan22-lightning-i2v-a14b"]


def _prompts(g: Graph, x: float, y: float, prompt: str = "disc"):
    positive = g.add("StrideClassPrompt", (x, y), title="Positive prompt", prompt=prompt)
    negative = g.add("StrideClassPrompt", (x, y + 130), title="Negative prompt (empty)", prompt="")
    return positive, negative


def _view(g: Graph, latent, x: float, y: float, prefix: str, label: str, positive, shown: int | None = None):
    """Preview and save the samples (only the first ``shown`` of a large batch) and score all of them."""
    pictures = latent
    if shown is not None:
        pictures = (g.add("LatentFromBatch", (x, y + 300), title=f"First {shown} for the pictures", samples=latent,
                          batch_index=0, length=shown), 0)
    image = g.add("StrideLatentToImage", (x, y), samples=pictures, scale=16)
    g.add("SaveImage", (x + COL, y), images=(image, 0), filename_prefix=prefix)
    g.add("StrideReferenceMetrics", (x, y + 150), samples=latent, conditioning=positive, label=label)


def few_step_method(method: str) -> Graph:
    """SamplerCustomAdvanced with a Stride sampler + scheduler on the ideal distilled model."""
    g = Graph()
    model = g.add("StrideReferenceModel", (0, 0), title="Distilled model (analytic stand-in)",
                  variant="demo", prediction="eps", form=FLOW_MAP, flow_map_steps=48)
    positive, negative = _prompts(g, 0, 260)
    latent = g.add("EmptyLatentImage", (0, 560), width=64, height=64, batch_size=16)
    guider = g.add("CFGGuider", (COL, 0), model=(model, 0), positive=(positive, 0), negative=(negative, 0),
                   cfg=TDD_SDXL.cfg if method == "tdd" else 1.0)
    noise = g.add("RandomNoise", (COL, 200), noise_seed=7)
    if method == "lcm":
        sampler = g.add("StrideLCMSampler", (COL, 330), s_noise=1.0, boundary_condition=True)
        sigmas = g.add("StrideLCMScheduler", (COL, 480), model=(model, 0), steps=4, original_steps=50, denoise=1.0)
    elif method == "tcd":
        sampler = g.add("StrideTCDSampler", (COL, 330))  # the node's default gamma is the registry's
        sigmas = g.add("StrideHyperSDScheduler", (COL, 480), model=(model, 0), mode="tcd grid", steps=4, denoise=1.0)
    elif method == "hyper_sd":
        sampler = g.add("StrideTCDSampler", (COL, 330), title="DDIM (TCD gamma 0)", gamma=0.0)
        sigmas = g.add("StrideHyperSDScheduler", (COL, 480), model=(model, 0), mode="trailing", steps=4, denoise=1.0)
    else:
        sampler = g.add("StrideTDDSampler", (COL, 330))  # eta and clipping: the registry's defaults
        sigmas = g.add("StrideTDDScheduler", (COL, 480), model=(model, 0), steps=4, special_jump=False, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, 0), noise=(noise, 0), guider=(guider, 0), sampler=(sampler, 0),
                   sigmas=(sigmas, 0), latent_image=(latent, 0))
    _view(g, (sample, 0), 3 * COL, 0, f"stride_{method}", f"{method} 4 steps", (positive, 0))
    g.group("Few-step sampling", [guider, noise, sampler, sigmas, sample])
    g.note(
        f"Stride {method.upper()} sampling in SamplerCustomAdvanced.\n\nThe model here is Stride's analytic reference "
        "(the exact flow map of a known mixture = an ideal distilled model), so the metrics node can score the "
        "samples exactly. For real use: replace it with your checkpoint + the matching LoRA, the class prompts "
        "with CLIP Text Encode, and the preview decode with VAE Decode.",
        (0, 720), (700, 170),
    )
    return g


DEMO_SAMPLES = 1024  # per row: 8 metric repeats of 128, so the report's own comparisons hold within their intervals
DEMO_SHOWN = 16  # samples per row in the pictures


def demo(distill_steps: int = 200) -> Graph:
    """The main demo on the project's demo UNet: many-step base, few-step before/after distillation, hybrid."""
    g = Graph()
    base = g.add("StrideDemoModel", (0, 0), title="Demo model (trained UNet, the teacher)")
    prompts = [g.add("StrideClassPrompt", (0, 120 + 100 * i), title=f"Prompt {name}", prompt=name)
               for i, name in enumerate(("disc", "square", "cross", "ring"))]
    empty = g.add("StrideClassPrompt", (0, 520), title="Empty prompt", prompt="")
    shown = prompts[3]
    data = g.add("StrideDistillDataset", (COL, 0), prompt_1=(prompts[0], 0), prompt_2=(prompts[1], 0),
                 prompt_3=(prompts[2], 0), prompt_4=(prompts[3], 0), empty_prompt=(empty, 0), width=64, height=64)
    train = g.add("StrideDistillLoRA", (COL, 330), title="Distil an LCM-LoRA (short run)", model=(base, 0),
                  data=(data, 0), objective="lcm", steps=distill_steps, learning_rate=1e-3, rank=16, alpha=0.0,
                  batch_size=16, guidance_min=0.0, guidance_max=0.0, loss="huber", gradient_checkpointing=False,
                  seed=0, save_every=50, lora_name="stride_demo", resume=True)
    plot = g.add("StrideLossPlot", (COL, 900), loss=(train, 2), width=640, height=320)
    g.add("SaveImage", (COL, 1080), title="Distillation loss", images=(plot, 0), filename_prefix="stride_demo_loss")
    latent = g.add("EmptyLatentImage", (0, 640), title=f"{DEMO_SAMPLES} samples (the first {DEMO_SHOWN} shown)",
                   width=64, height=64, batch_size=DEMO_SAMPLES)
    common = {"positive": (shown, 0), "negative": (empty, 0), "latent_image": (latent, 0)}
    rows = {
        "base_euler_25": g.add("KSampler", (2 * COL, 0), title="Base: euler, 25 steps", model=(base, 0), seed=3,
                               steps=25, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0, **common),
        "base_lcm_4": g.add("StrideFewStepSample", (2 * COL, 420), title="Base, LCM 4 steps (before distillation)",
                            model=(base, 0), method="lcm", steps=4, cfg=1.0, seed=3, denoise=1.0,
                            **common),
        "distilled_lcm_4": g.add("StrideFewStepSample", (2 * COL, 840), title="Distilled, LCM 4 steps (after)",
                                 model=(train, 0), method="lcm", steps=4, cfg=1.0, seed=3,
                                 denoise=1.0, **common),
    }
    hybrid = g.add("StrideHybridSample", (2 * COL, 1260), title="Hybrid: 1 base step + 3 distilled steps",
                   base_model=(base, 0), base_positive=(shown, 0), base_negative=(empty, 0), base_cfg=1.0,
                   base_sampler="euler", distilled_model=(train, 0), distilled_positive=(shown, 0),
                   distilled_negative=(empty, 0), distilled_cfg=1.0, distilled_sampler="lcm",
                   schedule="lcm / tcd grid", steps=4, handover_steps=1, seed=3, latent_image=(latent, 0))
    rows["hybrid_1_plus_3"] = hybrid
    for row, (name, sample) in enumerate(rows.items()):
        _view(g, (sample, 0), 3 * COL, 420 * row, f"stride_demo_{name}", name.replace("_", " "), (shown, 0),
              DEMO_SHOWN)
    grid = g.add("StrideTraceGrid", (5 * COL, 1260), title="Predicted x0 per step (hybrid)", trace=(hybrid, 1),
                 samples=(hybrid, 0), max_images=4)
    g.add("SaveImage", (6 * COL, 1260), images=(grid, 0), filename_prefix="stride_demo_trace")
    g.group("Distillation", [data, train, plot])
    g.group("Sampling", list(rows.values()))
    g.note(
        "Stride demo on the project's own demo model (a small ComfyUI UNet trained on a known mixture of coloured "
        f"shapes; the metrics nodes score all {DEMO_SAMPLES} samples of a row exactly, with 95% intervals). 1) 25 "
        "Euler steps of the base model. 2) LCM with 4 steps on the undistilled base. 3) The same after a short "
        "in-graph LCM-LoRA distillation. 4) Hybrid: the base model's first step, then the distilled model (the "
        "method aims at the base model's diversity at distilled cost: compare the mode figures). The trace grid shows "
        "x_t | predicted x0 per step. Change the prompt (disc, square, cross, ring) or the distillation steps.",
        (0, 800), (700, 170),
    )
    return g


def distill_training(steps: int = 300) -> Graph:
    """Distil the demo UNet into an LCM-LoRA, save it, reload it with LoraLoader, sample 4 steps."""
    g = Graph()
    base = g.add("StrideDemoModel", (0, 0), title="Teacher: demo model")
    prompts = [g.add("StrideClassPrompt", (0, 140 + 110 * i), title=f"Prompt {name}", prompt=name)
               for i, name in enumerate(("disc", "square", "cross", "ring"))]
    empty = g.add("StrideClassPrompt", (0, 600), title="Empty prompt", prompt="")
    data = g.add("StrideDistillDataset", (COL, 0), prompt_1=(prompts[0], 0), prompt_2=(prompts[1], 0),
                 prompt_3=(prompts[2], 0), prompt_4=(prompts[3], 0), empty_prompt=(empty, 0), width=64, height=64)
    train = g.add("StrideDistillLoRA", (2 * COL, 0), model=(base, 0), data=(data, 0), objective="lcm", steps=steps,
                  learning_rate=1e-3, rank=16, alpha=0.0, batch_size=16, guidance_min=0.0, guidance_max=0.0,
                  loss="huber", gradient_checkpointing=False, seed=0, save_every=100, lora_name="stride_demo_lcm",
                  resume=True)
    save = g.add("StrideSaveLoRA", (3 * COL, 0), lora=(train, 1), file_name="stride_demo_lcm", overwrite=True)
    plot = g.add("StrideLossPlot", (3 * COL, 200), loss=(train, 2), width=640, height=320)
    g.add("SaveImage", (4 * COL, 200), images=(plot, 0), filename_prefix="stride_distill_loss")
    reload = g.add("StrideReloadLoRA", (3 * COL, 420), model=(base, 0), lora_name=(save, 0), strength=1.0)
    latent = g.add("EmptyLatentImage", (2 * COL, 600), width=64, height=64, batch_size=16)
    before = g.add("StrideFewStepSample", (4 * COL, 420), title="Teacher, LCM 4 steps (before)", model=(base, 0),
                   positive=(prompts[3], 0), negative=(empty, 0), latent_image=(latent, 0), method="lcm", steps=4,
                   cfg=0.0, seed=5, denoise=1.0)
    after = g.add("StrideFewStepSample", (4 * COL, 800), title="Distilled LoRA, LCM 4 steps (after)", model=(reload, 0),
                  positive=(prompts[3], 0), negative=(empty, 0), latent_image=(latent, 0), method="lcm", steps=4,
                  cfg=0.0, seed=5, denoise=1.0)
    _view(g, (before, 0), 5 * COL, 420, "stride_distill_before", "teacher lcm 4 steps (before)", (prompts[3], 0))
    _view(g, (after, 0), 5 * COL, 800, "stride_distill_after", "distilled lora lcm 4 steps (after)", (prompts[3], 0))
    g.group("Distillation", [data, train, save, plot])
    g.note(
        "LCM-LoRA distillation inside ComfyUI. The teacher is the demo UNet; the LoRA is trained data-free from its "
        "own trajectories (add images + VAE to the data node to train on images), saved to models/loras, reloaded with "
        "ComfyUI's LoraLoader and sampled in 4 steps. For SD1.5/SDXL: Load Checkpoint as teacher, CLIP Text Encode "
        "prompts, rank 64, 1000+ steps, batch 4-8, lr 1e-4.",
        (0, 760), (700, 170),
    )
    return g


def piflow() -> Graph:
    """pi-Flow policy sampling on the exact reference pi-Flow teacher (no downloads)."""
    g = Graph()
    model = g.add("StridePiFlowReferenceModel", (0, 0), title="pi-Flow model (exact reference teacher)")
    positive = g.add("StrideClassPrompt", (0, 120), title="Prompt (the reference is unconditional)", prompt="")
    latent = g.add("EmptyLatentImage", (0, 300), width=64, height=64, batch_size=16)
    guider = g.add("BasicGuider", (COL, 0), model=(model, 0), conditioning=(positive, 0))
    noise = g.add("RandomNoise", (COL, 120), noise_seed=7)
    knobs, schedule = PIFLOW.sampler.knobs, schedule_as(PIFLOW, PiFlowSchedule)
    sampler = g.add("StridePiFlowSampler", (COL, 250), substeps=knobs["substeps"], diffusion_coefficient=knobs["h"],
                    temperature=knobs["temperature"], manual_temperature=1.0, shift=knobs["shift"])
    sigmas = g.add("StridePiFlowScheduler", (COL, 500), model=(model, 0), steps=PIFLOW.default_steps,
                   shift=schedule.shift, final_step_size_scale=schedule.final_step_size_scale, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, 0), noise=(noise, 0), guider=(guider, 0), sampler=(sampler, 0),
                   sigmas=(sigmas, 0), latent_image=(latent, 0))
    image = g.add("StrideLatentToImage", (3 * COL, 0), samples=(sample, 0), scale=16)
    g.add("SaveImage", (4 * COL, 0), images=(image, 0), filename_prefix="stride_piflow")
    g.group("pi-Flow sampling (4 network steps, 128 policy substeps)", [guider, noise, sampler, sigmas, sample])
    g.note(
        "pi-Flow: once per step the model predicts a policy (here the exact Gaussian-mixture posterior of a known "
        "mixture), which the sampler integrates with 128 cheap substeps. Guidance is distilled in: BasicGuider.\n\n"
        "With a released adapter (pi-FLUX.1): Load Diffusion Model flux1-dev -> Stride pi-Flow Adapter Loader "
        "(gmflux_k8_piid_4step.safetensors in models/loras) -> this MODEL input; DualCLIPLoader (clip_l, t5xxl) + "
        f"CLIP Text Encode -> FluxGuidance {PIFLOW.flux_guidance:g} (exactly {PIFLOW.flux_guidance:g}) -> "
        "BasicGuider; EmptySD3LatentImage; 4 steps "
        "(8 with the 8-step adapter); VAE Decode (ae.safetensors) instead of the preview decode. "
        "Stride pi-Flow Sample does the same in one node.",
        (0, 720), (760, 200),
    )
    return g


def hybrid_diversity() -> Graph:
    """Diversity distillation on the reference models: base, collapsed distilled and hybrid side by side."""
    g = Graph()
    base = g.add("StrideReferenceModel", (0, 0), title="Base model (exact teacher)",
                 variant="demo", prediction="eps", form=DENOISER, flow_map_steps=48)
    distilled = g.add("StrideReferenceModel", (0, 200), title="Distilled model (mode-collapsed student)",
                      variant="demo collapsed (2 of 8 modes)", prediction="eps", form=FLOW_MAP, flow_map_steps=48)
    positive, negative = _prompts(g, 0, 400, "disc")
    latent = g.add("EmptyLatentImage", (0, 700), title="32 samples (one noise draw each)", width=64, height=64,
                   batch_size=32)
    rows = {}
    rows["base"] = g.add("KSampler", (COL, 0), title="Base alone: euler, 20 steps, CFG 3", model=(base, 0),
                         positive=(positive, 0), negative=(negative, 0), latent_image=(latent, 0), seed=3, steps=20,
                         cfg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    rows["distilled"] = g.add("StrideFewStepSample", (COL, 420), title="Distilled alone: LCM, 4 steps",
                              model=(distilled, 0), positive=(positive, 0), negative=(negative, 0),
                              latent_image=(latent, 0), method="lcm", steps=4, cfg=1.0, seed=3,
                              denoise=1.0)
    rows["hybrid"] = g.add("StrideHybridSample", (COL, 840), title="Hybrid: 1 base step + 3 distilled steps",
                           base_model=(base, 0), base_positive=(positive, 0), base_negative=(negative, 0),
                           base_cfg=3.0, base_sampler="euler", distilled_model=(distilled, 0),
                           distilled_positive=(positive, 0), distilled_negative=(negative, 0), distilled_cfg=1.0,
                           distilled_sampler="lcm", schedule="lcm / tcd grid", steps=4, handover_steps=1, seed=3,
                           latent_image=(latent, 0))
    for row, (name, sample) in enumerate(rows.items()):
        y = 420 * row
        image = g.add("StrideLatentToImage", (2 * COL, y), samples=(sample, 0), scale=8)
        g.add("SaveImage", (3 * COL, y), images=(image, 0), filename_prefix=f"stride_hybrid_{name}")
        g.add("StrideReferenceMetrics", (2 * COL, y + 150), samples=(sample, 0), conditioning=(positive, 0), label=name)
        g.add("StrideImageDiversity", (2 * COL, y + 300), images=(image, 0), label=name)
    grid = g.add("StrideTraceGrid", (4 * COL, 840), title="DT visualisation of the hybrid run",
                 trace=(rows["hybrid"], 1), samples=(rows["hybrid"], 0), max_images=4)
    g.add("SaveImage", (5 * COL, 840), images=(grid, 0), filename_prefix="stride_hybrid_trace")
    g.group("Diversity distillation (hybrid sampling)", [rows["hybrid"], grid])
    g.note(
        "Diversity distillation (Gandikota & Bau). Row 1: the base model alone (many steps). Row 2: a distilled model "
        "that lost modes (here the exact flow map of a mixture that keeps one of the two 'disc' colours): 4 fast "
        "steps, mostly one colour. Row 3: the hybrid: the base model takes the first step of the 4-step LCM "
        "schedule (t=999), the distilled model the rest (759, 499, 259). Compare mode entropy / recall / TV (Stride "
        "Reference Metrics) and Stride Image Diversity: the method aims at the base model's variety at 1 base + 3 "
        "distilled model calls. The metrics come with 95% intervals, wide at 32 samples: raise the batch to a few "
        "hundred to tell the rows apart. The trace grid shows x_t | predicted x0 per step: the first row is the base "
        "model's blurry guess, then the distilled model commits to a picture. Base CFG is 3 here: on the exact "
        "reference teacher one big base step at the paper's CFG 7 overshoots for some classes.\n\n"
        "Real models: Load Checkpoint (SDXL base) -> base_model; the same checkpoint + LoraLoader with an LCM / "
        "Hyper-SD / TDD LoRA -> distilled_model (both must share the VAE); CLIP Text Encode for the prompts; base cfg "
        f"7 (the paper's), distilled cfg 1 (TDD {TDD_SDXL.cfg:g}); distilled_sampler and schedule as the LoRA was "
        "trained (LCM: lcm "
        "+ lcm grid, Hyper-SD unified: tcd + lcm grid, Hyper-SD N-step: euler + trailing, TDD: tdd + tdd); VAE Decode "
        "instead of the preview decode, and connect the VAE to Stride Trace Grid. Stride Reference Metrics only "
        "scores the reference models; Stride Image Diversity works on any images. For other sampler settings use "
        "Stride Hybrid Guider in SamplerCustomAdvanced.",
        (0, 1280), (1100, 260),
    )
    return g


# ------------------------------------------------------------------------------------------
# Few-step families (issue 13): one workflow per family group, on the reference models
# ------------------------------------------------------------------------------------------
VIDEO = "video (B, 4, T, 8, 8): independent frames"
ROW_PITCH = 600  # a Few-Step Sample node is ~500 px tall
FAMILY_WORKFLOWS = {  # name: (title, description) for the templates' index
    "families_sdxl": ("Few-step SDXL families: Lightning, DMD2, Hyper-SD",
                      "Stride Few-Step Sample with SDXL-Lightning, DMD2 and Hyper-SD on an ideal distilled model, and "
                      "the same family's schedule as SIGMAS for SamplerCustomAdvanced."),
    "families_flux": ("Few-step FLUX families: schnell, Hyper-FLUX",
                      "FLUX.1 schnell and Hyper-FLUX (with its image-size shift and FLUX guidance) on an ideal "
                      "distilled flow model."),
    "families_qwen_zimage": ("Few-step Qwen-Image-Lightning and Z-Image-Turbo",
                             "Shift-3 flow families (Qwen-Image-Lightning 4 steps, Z-Image-Turbo 8 steps) on an ideal "
                             "distilled flow model."),
    "families_wan_video": ("Few-step Wan video: lightx2v and the Wan 2.2 two-expert hand-over",
                           "Video latents: Wan 2.1 lightx2v in one node, and Wan 2.2's high-noise then low-noise "
                           "expert handing over at the registry's sigma boundary, with the trace of who ran each "
                           "step."),
}


def _family_inputs(g: Graph, prediction: str, latents: str | None = None, form: str = FLOW_MAP, row: int = 0,
                   title: str = "Distilled model (analytic stand-in)"):
    """The reference model, a class prompt and an empty prompt in column 0 (``latents``: the video variant)."""
    extra = {} if latents is None else {"latents": latents}
    model = g.add("StrideReferenceModel", (0, row), title=title, variant="demo", prediction=prediction, form=form,
                  flow_map_steps=48, **extra)
    positive = g.add("StrideClassPrompt", (0, row + 260), title="Prompt (a class name)", prompt="ring")
    negative = g.add("StrideClassPrompt", (0, row + 390), title="Empty prompt", prompt="")
    return model, positive, negative


def _family_result(g: Graph, latent, x: float, y: float, prefix: str, label: str, positive) -> list:
    """Preview decode, save and exact scores of one row's samples: the nodes, for the row's group."""
    image = g.add("StrideLatentToImage", (x, y), title="Preview decode (use VAE Decode for real models)",
                  samples=latent, scale=16)
    save = g.add("SaveImage", (x + COL, y), images=(image, 0), filename_prefix=prefix)
    scores = g.add("StrideReferenceMetrics", (x, y + 150), samples=latent, conditioning=positive, label=label)
    return [image, save, scores]


def _family_rows(g: Graph, model, positive, negative, latent, rows: list[tuple[str, int, str]], prefix: str) -> None:
    """One Stride Few-Step Sample per (family, steps, title), each with its result, one group per row."""
    for index, (family, steps, title) in enumerate(rows):
        y = ROW_PITCH * index
        sample = g.add("StrideFewStepSample", (COL, y), title=title, model=(model, 0), positive=(positive, 0),
                       negative=(negative, 0), latent_image=(latent, 0), method=family, steps=steps, cfg=0.0, seed=7,
                       denoise=1.0)
        g.group(title, [sample, *_family_result(g, (sample, 0), 2 * COL, y, f"{prefix}_{family}", family,
                                                (positive, 0))])


def families_sdxl() -> Graph:
    """SDXL-class families (eps): SDXL-Lightning, DMD2, Hyper-SD, one node each; Lightning 8-step as SIGMAS."""
    g = Graph()
    model, positive, negative = _family_inputs(g, "eps")
    latent = g.add("EmptyLatentImage", (0, 520), title="16 samples", width=64, height=64, batch_size=16)
    _family_rows(g, model, positive, negative, latent, [
        ("sdxl-lightning-4step", 4, "SDXL-Lightning 4-step: Euler on trailing timesteps"),
        ("dmd2-sdxl-4step", 4, "DMD2 4-step: x0, re-noise at 999, 749, 499, 249"),
        ("hyper-sd-4step", 4, "Hyper-SD 4-step LoRA: DDIM trailing")], "stride_sdxl")
    y = 3 * ROW_PITCH
    schedule = g.add("StrideFewStepScheduler", (COL, y), title="Lightning 8-step SIGMAS + sampler", model=(model, 0),
                     family="sdxl-lightning-8step", steps=0, denoise=1.0, width=64, height=64)
    guider = g.add("CFGGuider", (COL, y + 260), model=(model, 0), positive=(positive, 0), negative=(negative, 0),
                   cfg=1.0)
    noise = g.add("RandomNoise", (COL, y + 400), noise_seed=7)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, y), noise=(noise, 0), guider=(guider, 0),
                   sampler=(schedule, 1), sigmas=(schedule, 0), latent_image=(latent, 0))
    g.group("The same as a graph: Stride Few-Step Scheduler in SamplerCustomAdvanced",
            [schedule, guider, noise, sample, *_family_result(g, (sample, 0), 3 * COL, y, "stride_sdxl_graph",
                                                             "sdxl-lightning-8step (graph)", (positive, 0))])
    g.note(
        "Few-step SDXL families. Each Stride Few-Step Sample uses the schedule, sampler, CFG and knobs its authors "
        "use (method = the family; 'auto' cannot tell SDXL LoRAs apart, so name it). The model here is Stride's "
        "analytic stand-in for a distilled SDXL (the exact flow map of a known mixture), scored exactly by Stride "
        "Reference Metrics.\n\nReal models: Load Checkpoint sd_xl_base_1.0.safetensors -> LoraLoaderModelOnly "
        "(strength 1.0) with sdxl_lightning_4step_lora.safetensors (ByteDance/SDXL-Lightning), "
        "dmd2_sdxl_4step_lora.safetensors (tianweiy/DMD2) or Hyper-SDXL-4steps-lora.safetensors (ByteDance/Hyper-SD) "
        "-> MODEL; CLIP Text Encode for the prompts; Empty Latent Image 1024 x 1024; VAE Decode instead of the "
        "preview decode. The full UNets (sdxl_lightning_4step_unet.safetensors, DMD2's 4-step UNet) load with Load "
        "Diffusion Model. The 1-step Lightning UNet predicts x0: put ModelSamplingDiscrete (x0) before the sampler.",
        (0, 780), (700, 260),
    )
    return g


def families_flux() -> Graph:
    """FLUX-class families (flow): FLUX.1 schnell in one node, Hyper-FLUX 8-step as SIGMAS with FLUX guidance."""
    g = Graph()
    model, positive, negative = _family_inputs(g, "flow")
    latent = g.add("EmptySD3LatentImage", (0, 520), title="16 samples (64 x 64)", width=64, height=64, batch_size=16)
    _family_rows(g, model, positive, negative, latent,
                 [("flux1-schnell", 4, "FLUX.1 schnell: 4 Euler steps, no shift, no guidance")], "stride_flux")
    y = ROW_PITCH
    schedule = g.add("StrideFewStepScheduler", (COL, y), title="Hyper-FLUX 8-step SIGMAS (image-size shift)",
                     model=(model, 0), family="hyper-flux-8step", steps=0, denoise=1.0, width=64, height=64)
    guidance = g.add("FluxGuidance", (COL, y + 260), title=f"FLUX guidance {HYPER_FLUX.flux_guidance:g} (Hyper-FLUX)",
                     conditioning=(positive, 0), guidance=HYPER_FLUX.flux_guidance)
    guider = g.add("CFGGuider", (COL, y + 400), model=(model, 0), positive=(guidance, 0), negative=(negative, 0),
                   cfg=1.0)
    noise = g.add("RandomNoise", (COL, y + 540), noise_seed=7)
    sample = g.add("SamplerCustomAdvanced", (2 * COL, y), noise=(noise, 0), guider=(guider, 0),
                   sampler=(schedule, 1), sigmas=(schedule, 0), latent_image=(latent, 0))
    g.group("Hyper-FLUX 8-step as a graph: the scheduler's SIGMAS and sampler",
            [schedule, guidance, guider, noise, sample,
             *_family_result(g, (sample, 0), 3 * COL, y, "stride_flux_hyper", "hyper-flux-8step", (positive, 0))])
    g.note(
        "Few-step FLUX families on Stride's analytic stand-in for a distilled flow model. FLUX.1 schnell: 1-4 Euler "
        "steps without a time shift or guidance. Hyper-FLUX and TDD-FLUX keep FLUX.1-dev's image-size shift (width "
        "and height on the scheduler = the image's) and their FLUX guidance (Few-Step Sample sets it when no "
        "FluxGuidance did).\n\nReal models: Load Diffusion Model flux1-schnell.safetensors (or flux1-dev.safetensors "
        f"-> LoraLoaderModelOnly Hyper-FLUX.1-dev-8steps-lora.safetensors at strength {HYPER_FLUX.lora_strength:g}, "
        "ByteDance/Hyper-SD); "
        "DualCLIPLoader clip_l.safetensors + t5xxl_fp16.safetensors (type flux) -> CLIP Text Encode; "
        "EmptySD3LatentImage 1024 x 1024 (scheduler width/height 1024); VAE Loader ae.safetensors -> VAE Decode.",
        (0, 780), (700, 230),
    )
    return g


def families_qwen_zimage() -> Graph:
    """Qwen-Image-Lightning (4 steps) and Z-Image-Turbo (8 steps): shift-3 flow families, one node each."""
    g = Graph()
    model, positive, negative = _family_inputs(g, "flow")
    latent = g.add("EmptySD3LatentImage", (0, 520), title="16 samples", width=64, height=64, batch_size=16)
    _family_rows(g, model, positive, negative, latent, [
        ("qwen-image-lightning-4step", 4, "Qwen-Image-Lightning 4-step: Euler at shift 3"),
        ("z-image-turbo", 8, "Z-Image-Turbo: 8 Euler steps at shift 3")], "stride_qwen_zimage")
    g.note(
        "Qwen-Image-Lightning and Z-Image-Turbo on Stride's analytic stand-in for a distilled flow model: uniform "
        "Euler steps at shift 3 at every resolution, CFG 1. 'auto' picks the family on the real models (ComfyUI's "
        "model detection names them).\n\nReal models: Qwen-Image: Load Diffusion Model qwen_image_fp8_e4m3fn"
        ".safetensors -> LoraLoaderModelOnly Qwen-Image-Lightning-4steps-V1.0.safetensors (strength 1.0, "
        "lightx2v/Qwen-Image-Lightning); Load CLIP qwen_2.5_vl_7b_fp8_scaled.safetensors (type qwen_image); Load "
        "VAE qwen_image_vae.safetensors. Z-Image-Turbo: Load Diffusion Model z_image_turbo_bf16.safetensors; Load "
        "CLIP qwen_3_4b.safetensors (type lumina2); Load VAE ae.safetensors. Both: EmptySD3LatentImage, CLIP Text "
        "Encode, VAE Decode instead of the preview decode.",
        (0, 780), (700, 230),
    )
    return g


def families_wan_video() -> Graph:
    """Wan video latents: Wan 2.1 lightx2v in one node; Wan 2.2's two experts handing over at the sigma boundary."""
    g = Graph()
    model, positive, negative = _family_inputs(g, "flow", VIDEO, title="Distilled video model (stand-in)")
    latent = g.add("EmptyHunyuanLatentVideo", (0, 520), title="4 videos of 9 frames (3 latent frames)", width=64,
                   height=64, length=9, batch_size=4)
    _family_rows(g, model, positive, negative, latent,
                 [("wan21-lightx2v-4step", 4, "Wan 2.1 lightx2v: 4 Euler steps at shift 5")], "stride_wan21")
    high = g.add("StrideReferenceModel", (0, 760), title="High-noise expert (stand-in)", variant="demo",
                 prediction="flow", form=DENOISER, flow_map_steps=48, latents=VIDEO)
    y = ROW_PITCH
    hybrid = g.add("StrideHybridSample", (COL, y), title="Wan 2.2: high-noise expert, then low-noise expert",
                   base_model=(high, 0), base_positive=(positive, 0), base_negative=(negative, 0), base_cfg=1.0,
                   base_sampler="euler", distilled_model=(model, 0), distilled_positive=(positive, 0),
                   distilled_negative=(negative, 0), distilled_cfg=1.0, distilled_sampler="lcm",
                   schedule="lcm / tcd grid", steps=4, handover_steps=1, seed=7, latent_image=(latent, 0),
                   family="wan22-lightning-t2v-a14b", handover_boundary=0.0)
    grid = g.add("StrideTraceGrid", (3 * COL, y + 300), title="Who ran each step (blue: high-noise expert)",
                 trace=(hybrid, 1), samples=(hybrid, 0), max_images=2)
    trace_image = g.add("SaveImage", (4 * COL, y + 300), images=(grid, 0), filename_prefix="stride_wan22_trace")
    g.group(f"Wan 2.2 A14B: two experts hand over at sigma {WAN22_T2V.expert_boundary:g}", [
        high, hybrid, grid, trace_image,
        *_family_result(g, (hybrid, 0), 2 * COL, y, "stride_wan22", "wan22 two experts", (positive, 0))])
    g.note(
        "Wan video families on Stride's analytic stand-ins (each latent frame an exact draw of the prompt's class, so "
        "the scores are exact). Row 1: Wan 2.1 lightx2v, 4 Euler steps at shift 5 (sigmas 1, 0.9375, 0.8333, 0.625). "
        "Row 2: Wan 2.2 A14B's two experts: Stride Hybrid Sample with the Wan2.2-Lightning family runs the "
        f"high-noise expert while sigma >= {WAN22_T2V.expert_boundary:g} (the first 2 steps; I2V: "
        f"{WAN22_I2V.expert_boundary:g}), the low-noise expert after, as two "
        "core KSamplerAdvanced (steps 0-2 with leftover noise, 2-4) do. The trace grid marks which expert ran each "
        "step.\n\nReal models: Load Diffusion Model wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors -> "
        "LoraLoaderModelOnly Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors "
        "(lightx2v/Wan2.2-Lightning, strength 1.0) -> base_model; wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors + "
        "its low_noise_model.safetensors -> distilled_model; Load CLIP umt5_xxl_fp8_e4m3fn_scaled.safetensors (type "
        "wan) -> CLIP Text Encode; EmptyHunyuanLatentVideo 832 x 480, 81 frames; Load VAE wan_2.1_vae.safetensors "
        "-> VAE Decode -> Create Video -> Save Video. Wan 2.1: wan2.1_t2v_14B_fp8_scaled.safetensors + the lightx2v "
        "4-step LoRA in row 1.",
        (0, 1000), (760, 300),
    )
    return g


def family_workflows() -> dict[str, Graph]:
    return {"families_sdxl": families_sdxl(), "families_flux": families_flux(),
            "families_qwen_zimage": families_qwen_zimage(), "families_wan_video": families_wan_video()}


def build_all() -> dict[str, Graph]:
    graphs = {"stride_demo": demo(), "distill_lcm_lora": distill_training(), "piflow": piflow(),
              "hybrid_diversity": hybrid_diversity()}
    for method in ("lcm", "tcd", "hyper_sd", "tdd"):
        graphs[f"sampler_{method}"] = few_step_method(method)
    graphs.update(family_workflows())
    return graphs


def main() -> None:
    comfy = host.InProcessHost(Path(tempfile.mkdtemp(prefix="stride-workflows-")))
    info = comfy.object_info
    WORKFLOWS.mkdir(exist_ok=True)
    for name, graph in build_all().items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(graph.to_ui(info), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
