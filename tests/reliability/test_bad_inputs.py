"""Bad-input catalogue: every wrong input a user can give Stride's nodes, in one table.

Each case is a graph (or a prepared file plus a graph) with one thing wrong. It must end in
ComfyUI's normal validation error or execution error whose message names the input and says
what to do (never a raw torch/safetensors message), the host must run the next good prompt, and
nothing may be written outside ComfyUI's output/models/temp folders. A handful run through the
real server as well. ``docs/TROUBLESHOOTING.md`` is this table with the messages the cases
produce; ``STRIDE_WRITE_DOCS=1`` rewrites it, a test keeps it current.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from tests.reliability.support import (changed_files, class_prompt, empty_latent, few_step, hybrid_graph,
                                       reference_model, sampling_graph, snapshot, training_graph)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "TROUBLESHOOTING.md"
STAYS_INSIDE = ("output", "models", "temp")  # the folders ComfyUI lets nodes write
OUTPUT_SUFFIXES = (".safetensors", ".latent", ".tmp", ".pt", ".ckpt", ".png")
RAW_MESSAGES = ("Traceback", 'File "', "mat1 and mat2", "Given groups", "size of tensor", "shapes cannot",
                "Error while deserializing", "Weights only load failed", "KeyError", "NoneType")


@dataclass
class Context:
    """What a case may need: the host, its folders, and a folder outside them that must stay empty."""

    host: Any  # InProcessHost or ServerHost
    loras: Path
    checkpoints: Path
    outside: Path
    rescan: Callable[[], None]  # make the host see new files in models/


@dataclass(frozen=True)
class Case:
    id: str
    node: str  # display name of the node whose input is wrong
    wrong: str  # the wrong input, for the table
    graph: Callable[[Context], dict]
    outcome: str  # "validation" or "execution"
    words: tuple[str, ...]  # the message must contain all of these
    hint: str  # what to do, for the table
    setup: Callable[[Context], None] | None = None
    verify: Callable[[Context], None] | None = None
    needs: tuple[str, ...] = ()  # "demo" (demo weights), "flux" (tiny FLUX.1 node)
    server: bool = False  # also run through the real server


# ------------------------------------------------------------------------------------------
# Graph pieces
# ------------------------------------------------------------------------------------------
def fault_latent(channels: int = 4, height: int = 8, width: int = 8, batch: int = 1, fill: str = "random") -> dict:
    return {"class_type": "ReliabilityFaultLatent",
            "inputs": {"channels": channels, "height": height, "width": width, "batch": batch, "fill": fill}}


def fault_conditioning(width: int = 768, tokens: int = 77, empty: bool = False) -> dict:
    return {"class_type": "ReliabilityFaultConditioning", "inputs": {"width": width, "tokens": tokens, "empty": empty}}


def sample(**overrides) -> Callable[[Context], dict]:
    """Few-step sampling of the analytic teacher with StrideFewStepSample inputs overridden."""
    return lambda ctx: sampling_graph(**overrides)


def changed(graph: Callable[[Context], dict], **nodes: dict) -> Callable[[Context], dict]:
    """``graph`` with nodes replaced or added."""

    def build(ctx: Context) -> dict:
        result = graph(ctx)
        result.update(nodes)
        return result

    return build


def without(graph: Callable[[Context], dict], node: str, input_name: str) -> Callable[[Context], dict]:
    def build(ctx: Context) -> dict:
        result = graph(ctx)
        del result[node]["inputs"][input_name]
        return result

    return build


def custom_sampling(sampler: dict, scheduler: dict, latent: dict | None = None, model: dict | None = None) -> Callable:
    """SamplerCustomAdvanced with a Stride SAMPLER and SIGMAS node on the analytic teacher."""

    def build(ctx: Context) -> dict:
        return {
            "base": reference_model(),
            "model": model or reference_model(),
            "pos": class_prompt("square"),
            "neg": class_prompt(""),
            "latent": latent or empty_latent(),
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
            "guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                              "negative": ["neg", 0], "cfg": 1.0}},
            "sampler": sampler,
            "sigmas": {**scheduler, "inputs": {"model": ["model", 0], **scheduler["inputs"]}},
            "run": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0]}},
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "reliability"}},
        }

    return build


LCM_SAMPLER = {"class_type": "StrideLCMSampler", "inputs": {"s_noise": 1.0, "boundary_condition": True}}
TCD_SAMPLER = {"class_type": "StrideTCDSampler", "inputs": {"gamma": 0.3}}
TDD_SAMPLER = {"class_type": "StrideTDDSampler", "inputs": {"eta": 0.2, "clip_x0_steps": 0, "clip_ratio": 0.995}}
LCM_SCHEDULER = {"class_type": "StrideLCMScheduler", "inputs": {"steps": 4, "original_steps": 50, "denoise": 1.0}}
TDD_SCHEDULER = {"class_type": "StrideTDDScheduler", "inputs": {"steps": 4, "special_jump": False, "denoise": 1.0}}
HYPER_SCHEDULER = {"class_type": "StrideHyperSDScheduler", "inputs": {"mode": "trailing", "steps": 4, "denoise": 1.0}}


def with_inputs(node: dict, **inputs) -> dict:
    return {**node, "inputs": {**node["inputs"], **inputs}}


def continuous(sampling: str) -> dict:
    if sampling == "edm":
        return {"class_type": "ModelSamplingContinuousEDM",
                "inputs": {"model": ["base", 0], "sampling": "eps", "sigma_max": 120.0, "sigma_min": 0.002}}
    return {"class_type": "ModelSamplingContinuousV",
            "inputs": {"model": ["base", 0], "sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03}}


def metrics(samples: str = "run", conditioning: str = "pos") -> dict:
    return {"class_type": "StrideReferenceMetrics",
            "inputs": {"samples": [samples, 0], "conditioning": [conditioning, 0], "label": "reliability"}}


def metrics_graph(latent: dict, conditioning: dict | None = None) -> Callable[[Context], dict]:
    return lambda ctx: {"pos": conditioning or class_prompt("disc"), "latent": latent,
                        "metrics": metrics("latent", "pos")}


def decode_graph(latent: dict) -> Callable[[Context], dict]:
    return lambda ctx: {"latent": latent,
                        "decode": {"class_type": "StrideLatentToImage", "inputs": {"samples": ["latent", 0], "scale": 2}},
                        "show": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}}


def demo_sampling(**nodes: dict) -> Callable[[Context], dict]:
    return changed(sample(), model={"class_type": "StrideDemoModel", "inputs": {}}, **nodes)


def train(name: str, latents: dict | None = None, **overrides) -> Callable[[Context], dict]:
    """A one-step distillation of the demo model; ``latents`` (a node) replaces the data-free pool."""

    def build(ctx: Context) -> dict:
        graph = training_graph(name, **overrides)
        if latents is not None:
            graph["lat"] = latents
            graph["data"]["inputs"]["latents"] = ["lat", 0]
        return graph

    return build


TRAINING_LATENTS = fault_latent(batch=2)


def train_with_nodes(name: str, **nodes: dict) -> Callable[[Context], dict]:
    return changed(train(name, TRAINING_LATENTS), **nodes)


def save_as(file_name: str | Callable[[Context], str], overwrite: bool = False) -> Callable[[Context], dict]:
    """Train one step on given latents, then Stride Save LoRA with ``file_name``."""

    def build(ctx: Context) -> dict:
        graph = train("reliability_save", TRAINING_LATENTS)(ctx)
        name = file_name(ctx) if callable(file_name) else file_name
        graph["save"] = {"class_type": "StrideSaveLoRA",
                         "inputs": {"lora": ["train", 1], "file_name": name, "overwrite": overwrite}}
        return graph

    return build


def reload(lora_name: str) -> Callable[[Context], dict]:
    """Stride Reload Saved LoRA of ``lora_name`` onto the analytic teacher, then sampling."""
    return changed(sample(), name={"class_type": "PrimitiveString", "inputs": {"value": lora_name}},
                   base=reference_model(),
                   model={"class_type": "StrideReloadLoRA",
                          "inputs": {"model": ["base", 0], "lora_name": ["name", 0], "strength": 1.0}})


def optimal_steps(latent: dict | None = None, unlinked: tuple[str, ...] = (), **overrides
                  ) -> Callable[[Context], dict]:
    """Stride Optimal Steps on the analytic teacher (a 2-step search in 8 teacher steps) with inputs overridden
    and the ``unlinked`` ones left unconnected."""
    inputs = {"latent_image": ["latent", 0], "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0],
              "steps": 2, "teacher_steps": 8, "noise_samples": 2, "solver": "euler", "teacher_solver": "euler",
              "teacher_scheduler": "normal", "mode": "paper", "seed": 0, "cfg": 1.0, "schedule_name": "reliability",
              **overrides}
    inputs = {name: value for name, value in inputs.items() if name not in unlinked}
    return lambda ctx: {"model": reference_model(), "pos": class_prompt("ring"), "neg": class_prompt(""),
                        "empty": empty_latent(), "latent": latent or empty_latent(),
                        "search": {"class_type": "StrideOptimalSteps", "inputs": inputs}}


def schedules_folder(ctx: Context) -> Path:
    return Path(ctx.host.base_dir) / "models" / "stride" / "schedules"


def saved_schedule(name: str, variant: str = "demo") -> Callable[[Context], dict]:
    """Stride Saved Schedule of ``name`` for the analytic teacher (``variant``), its sigmas fed to Euler."""
    model = {**reference_model(), "inputs": {**reference_model()["inputs"], "variant": variant}}
    return changed(custom_sampling({"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
                                   LCM_SCHEDULER, model=model),
                   sigmas={"class_type": "StrideSavedSchedule", "inputs": {"model": ["model", 0], "schedule": name}})


def write_schedule_file(name: str, payload: bytes) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        schedules_folder(ctx).mkdir(parents=True, exist_ok=True)
        (schedules_folder(ctx) / name).write_bytes(payload)
        ctx.rescan()

    return setup


SEARCHED_FIRST = "reliability_saved"


def search_first(ctx: Context) -> None:
    """Save a schedule of the analytic teacher as models/stride/schedules/reliability_saved.safetensors."""
    result = ctx.host.run(optimal_steps(schedule_name=SEARCHED_FIRST)(ctx))
    assert result.success, result.error()
    for path in schedules_folder(ctx).glob(f"{SEARCHED_FIRST}-*.safetensors"):
        path.replace(schedules_folder(ctx) / f"{SEARCHED_FIRST}.safetensors")
    ctx.rescan()


def no_schedule_written(ctx: Context) -> None:
    """The optimal-steps cases save under the prefix 'reliability-': nothing may be there."""
    written = sorted(path.name for path in schedules_folder(ctx).glob("reliability-*"))
    assert not written, f"a bad input wrote schedule files: {written}"


def hybrid(**overrides) -> Callable[[Context], dict]:
    return lambda ctx: hybrid_graph(**overrides)


def piflow_on(model: dict, adapter: str | None = None, latent: dict | None = None) -> Callable[[Context], dict]:
    """Stride pi-Flow Sample (optionally after the adapter loader) on ``model``."""

    def build(ctx: Context) -> dict:
        graph = {"base": model, "pos": class_prompt(""), "latent": latent or empty_latent()}
        source = "base"
        if adapter is not None:
            graph["adapter"] = {"class_type": "StridePiFlowAdapterLoader",
                                "inputs": {"model": ["base", 0], "adapter_name": adapter, "strength": 1.0}}
            source = "adapter"
        positive = ["base", 1] if model["class_type"] == "ReliabilityTinyFlux" else ["pos", 0]
        graph["run"] = {"class_type": "StridePiFlowSample", "inputs": {
            "model": [source, 0], "positive": positive, "latent_image": ["latent", 0], "steps": 2, "substeps": 8,
            "diffusion_coefficient": 0.0, "shift": 3.2, "final_step_size_scale": 0.5, "temperature": "auto",
            "manual_temperature": 1.0, "seed": 0, "denoise": 1.0}}
        graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "reliability"}}
        return graph

    return build


TINY_FLUX = {"class_type": "ReliabilityTinyFlux", "inputs": {}}
PIFLOW_REFERENCE = {"class_type": "StridePiFlowReferenceModel", "inputs": {}}


# ------------------------------------------------------------------------------------------
# Files the cases prepare
# ------------------------------------------------------------------------------------------
def write_lora_file(name: str, payload: bytes) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        (ctx.loras / name).write_bytes(payload)
        ctx.rescan()

    return setup


def write_checkpoint(name: str, payload: bytes) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        ctx.checkpoints.mkdir(parents=True, exist_ok=True)
        (ctx.checkpoints / name).write_bytes(payload)

    return setup


def train_first(name: str) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        result = ctx.host.run(train(name, TRAINING_LATENTS)(ctx))
        assert result.success, result.error()

    return setup


PICKLE_BYTES = pickle.dumps({"lora_up.weight": [0.0] * 16}, protocol=4)
RANDOM_BYTES = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
GOOD_SAFETENSORS = safetensors_bytes({"diffusion_model.x.lora_up.weight": torch.zeros(64, 64)})
TRUNCATED_SAFETENSORS = GOOD_SAFETENSORS[: len(GOOD_SAFETENSORS) // 2]
EXISTING = b"an existing LoRA the user wants to keep"


def existing_file_kept(ctx: Context) -> None:
    assert (ctx.loras / "reliability_existing.safetensors").read_bytes() == EXISTING


def outside_stays_empty(ctx: Context) -> None:
    assert not any(ctx.outside.iterdir()), list(ctx.outside.iterdir())


# ------------------------------------------------------------------------------------------
# The catalogue
# ------------------------------------------------------------------------------------------
FEW = "Stride Few-Step Sample"
CASES = [
    # --- knobs out of range: ComfyUI's validation, before anything runs -----------------------------
    Case("steps_zero", FEW, "steps = 0", sample(steps=0), "validation", ("steps", "Value 0 smaller than min"),
         "Use 1-50 steps (4 is the usual choice; TDD 4-8).", server=True),
    Case("steps_above_max", FEW, "steps = 51", sample(steps=51), "validation", ("steps",),
         "Few-step models are sampled with 1-8 steps; the node allows up to 50."),
    Case("unknown_method", FEW, "method = 'dpm++ 2m'", sample(method="dpm++ 2m"), "validation", ("method",),
         "Pick one of lcm, tcd / hyper-sd unified, hyper-sd n-step (ddim trailing), tdd."),
    Case("missing_latent", FEW, "latent_image not connected", without(sample(), "run", "latent_image"), "validation",
         ("latent_image",), "Connect an Empty Latent Image (or a VAE Encode for img2img)."),
    Case("wrong_link_type", FEW, "a MODEL output linked to latent_image",
         changed(sample(), run=few_step(latent="model")), "validation", ("latent_image", "MODEL"),
         "Link a LATENT output (Empty Latent Image, VAE Encode) to latent_image."),
    Case("gamma_above_one", "Stride TCD / Hyper-SD Sampler", "gamma = 1.5",
         custom_sampling(with_inputs(TCD_SAMPLER, gamma=1.5), LCM_SCHEDULER), "validation", ("gamma",),
         "gamma is a fraction: 0 (DDIM) to 1 (LCM); the authors use 0.3."),
    Case("eta_negative", "Stride TDD Sampler", "eta = -0.1",
         custom_sampling(with_inputs(TDD_SAMPLER, eta=-0.1), TDD_SCHEDULER), "validation", ("eta",),
         "eta is a fraction from 0 to 1; the authors use 0.2."),
    Case("clip_ratio_below_min", "Stride TDD Sampler", "clip_ratio = 0.3",
         custom_sampling(with_inputs(TDD_SAMPLER, clip_ratio=0.3), TDD_SCHEDULER), "validation", ("clip_ratio",),
         "clip_ratio is a quantile between 0.5 and 1 (TDD: 0.995)."),
    Case("scheduler_denoise_zero", "Stride LCM Scheduler", "denoise = 0",
         custom_sampling(LCM_SAMPLER, with_inputs(LCM_SCHEDULER, denoise=0.0)), "validation", ("denoise",),
         "denoise is in (0, 1]: 1 for text-to-image, lower for img2img."),
    Case("hybrid_unknown_distilled_sampler", "Stride Hybrid Sample", "distilled_sampler 'dpmpp_2m'",
         hybrid(distilled_sampler="dpmpp_2m"), "validation", ("distilled_sampler",),
         "Pick the sampler the distillation was trained for (lcm, tcd, tdd, euler)."),
    Case("train_rank_zero", "Stride Distill LoRA", "rank = 0", train("reliability_rank0", rank=0), "validation",
         ("rank",), "LoRA rank is at least 1 (LCM-LoRA: 64; small models: 4-16)."),
    Case("train_learning_rate_zero", "Stride Distill LoRA", "learning_rate = 0",
         train("reliability_lr0", learning_rate=0.0), "validation", ("learning_rate",),
         "Use a learning rate between 1e-7 and 0.1 (LCM-LoRA: 1e-4)."),
    # --- method on the wrong kind of model --------------------------------------------------------------
    Case("lcm_schedule_on_continuous_edm", "Stride LCM Scheduler", "a model patched to continuous EDM sigmas",
         changed(custom_sampling(LCM_SAMPLER, LCM_SCHEDULER), base=reference_model(), model=continuous("edm")),
         "execution", ("model", "1000 discrete training timesteps", "continuous sigmas", "karras"),
         "LCM/TCD/TDD/Hyper-SD schedules need a model with SD's 1000 discrete timesteps; for continuous-sigma models "
         "use a plain scheduler (karras) with the Stride sampler.", server=True),
    Case("tdd_on_continuous_v", FEW, "method tdd on a model patched to continuous V sigmas",
         changed(sample(method="tdd"), base=reference_model(), model=continuous("v")), "execution",
         ("model", "tdd schedules", "continuous sigmas"), "As above: use a discrete-timestep model, or a plain scheduler."),
    Case("train_flow_teacher", "Stride Distill LoRA", "a flow-matching teacher",
         changed(train("reliability_flow"), model=reference_model("flow")), "execution",
         ("model", "EPS or V-prediction teacher"),
         "LCM/TDD/segmented distillation needs an EPS or V-prediction model (SD1.5, SDXL); flow models are not "
         "supported as teachers.", server=True),
    Case("piflow_schedule_on_eps", "Stride pi-Flow Scheduler", "an EPS model",
         piflow_on(reference_model("eps")), "execution", ("model", "flow-matching", "EPS model"),
         "pi-Flow needs a flow-matching pi-Flow model: load one with Stride pi-Flow Adapter Loader."),
    Case("piflow_sample_on_plain_flow_model", "Stride pi-Flow Sample", "a flow model without a pi-Flow adapter",
         piflow_on(reference_model("flow")), "execution", ("model", "did not output a pi-Flow policy"),
         "Load the model through Stride pi-Flow Adapter Loader; plain models need a plain sampler."),
    Case("piflow_adapter_on_non_flux", "Stride pi-Flow Adapter Loader",
         "a model of no pi-Flow family (the reference teacher)",
         piflow_on(PIFLOW_REFERENCE, adapter="reliability_tiny_gm.safetensors"), "execution",
         ("model", "FLUX.1", "FLUX.2", "Qwen-Image"),
         "pi-Flow adapters load onto their base model: pi-FLUX.1 onto FLUX.1 dev, pi-FLUX.2 onto FLUX.2 dev, "
         "pi-Qwen-Image onto Qwen-Image (Load Diffusion Model).", needs=("flux",)),
    Case("piflow_adapter_for_other_width", "Stride pi-Flow Adapter Loader", "an adapter made for a wider FLUX.1 model",
         piflow_on(TINY_FLUX, adapter="reliability_wide_gm.safetensors"), "execution",
         ("adapter_name", "reliability_wide_gm.safetensors"),
         "Use the adapter released for this base model (gmflux / dxflux for FLUX.1 dev, gmflux2 for FLUX.2 dev, "
         "gmqwen / dxqwen for Qwen-Image).", needs=("flux",)),
    Case("hybrid_pair_with_different_latents", "Stride Hybrid Sample",
         "a distilled model with another latent format (FLUX.1 with an SD1.5-format base)",
         changed(hybrid(), distilled=TINY_FLUX), "execution", ("distilled_model", "latent format", "share one VAE"),
         "Pair a base model with a distillation of the same family (SDXL base + SDXL LCM/Hyper-SD/TDD LoRA).",
         needs=("flux",)),
    Case("hybrid_base_on_continuous_edm", "Stride Hybrid Sample", "a base model patched to continuous EDM sigmas",
         changed(hybrid(base_model=["edm", 0]), base=reference_model(), edm=continuous("edm")), "execution",
         ("continuous sigmas", "karras"), "The shared few-step schedule needs a base model with 1000 discrete "
         "timesteps."),
    # --- step counts the method's grid cannot give ---------------------------------------------------
    Case("lcm_img2img_steps_above_grid", FEW, "lcm, 40 steps at denoise 0.5 (the grid has 25)",
         sample(method="lcm", steps=40, denoise=0.5), "execution", ("steps", "Choose fewer steps"),
         "At denoise d the LCM grid has 50 x d entries: use fewer steps or a higher denoise."),
    Case("tdd_scheduler_steps_above_grid", "Stride TDD Scheduler", "250 steps at denoise 0.5 (needs 500 targets)",
         custom_sampling(TDD_SAMPLER, with_inputs(TDD_SCHEDULER, steps=250, denoise=0.5)), "execution",
         ("steps", "Choose fewer steps"), "TDD's grid has 250 targets: steps / denoise must not exceed 250."),
    Case("one_step_schedule_partial_denoise", "Stride Hyper-SD Scheduler", "unet 1-step mode with denoise 0.5",
         custom_sampling(TCD_SAMPLER, with_inputs(HYPER_SCHEDULER, mode="unet 1-step (t=800)", denoise=0.5)),
         "execution", ("denoise", "set denoise to 1.0"), "The 1-step UNet only starts from pure noise: denoise 1.0, or "
         "the 'trailing' mode for img2img."),
    Case("hybrid_handover_not_below_steps", "Stride Hybrid Sample", "handover_steps 4 of 4 steps",
         hybrid(handover_steps=4), "execution", ("handover_steps", "must be below steps"),
         "Hand over after 1 step (the paper's setting); the distilled model needs at least one step."),
    # --- schedule search and saved schedules ----------------------------------------------------------------
    Case("optimal_steps_not_below_teacher", "Stride Optimal Steps", "steps 8 with teacher_steps 8 (N >= M)",
         optimal_steps(steps=8), "execution", ("steps", "must be smaller than the teacher's step count"),
         "The schedule picks N of the teacher's M steps: use M of at least 2 N (the paper: 100-200 for 5-10 steps).",
         verify=no_schedule_written),
    Case("optimal_steps_teacher_too_short", "Stride Optimal Steps", "steps 5 with teacher_steps 8 (M < 2 N)",
         optimal_steps(steps=5), "execution", ("teacher_steps", "too small", "M >= 2 * N"),
         "Raise teacher_steps to at least 2 N.", verify=no_schedule_written),
    Case("optimal_steps_unsupported_solver", "Stride Optimal Steps", "solver 'dpmpp_2m'",
         optimal_steps(solver="dpmpp_2m"), "validation", ("solver",),
         "The search needs a one-call, history-free step: euler (ComfyUI's ddim is the same update).",
         verify=no_schedule_written),
    Case("optimal_steps_nan_latent", "Stride Optimal Steps", "a latent full of NaN (Latent Multiply by NaN)",
         optimal_steps(latent={"class_type": "LatentMultiply", "inputs": {"samples": ["empty", 0],
                                                                          "multiplier": float("nan")}}),
         "execution", ("latent_image", "NaN or inf"), "Find the node that produced NaN; the search only needs the "
         "latent's size (Empty Latent Image).", verify=no_schedule_written),
    Case("optimal_steps_no_model", "Stride Optimal Steps", "neither model/positive/negative nor a guider connected",
         optimal_steps(unlinked=("model", "positive", "negative")), "execution", ("model", "GUIDER"),
         "Connect the MODEL with its prompts (and cfg), or a GUIDER.",
         verify=no_schedule_written),
    Case("saved_schedule_other_model", "Stride Saved Schedule", "a schedule searched for another model",
         saved_schedule(f"{SEARCHED_FIRST}.safetensors", "demo collapsed (2 of 8 modes)"), "execution",
         ("schedule", "searched for another model"),
         "Load the schedule with the model it was searched for, or search one for this model.", setup=search_first),
    Case("saved_schedule_random_bytes", "Stride Saved Schedule", "random bytes named .safetensors",
         saved_schedule("reliability_random.safetensors"), "execution", ("schedule", "not a safetensors file"),
         "Delete the file and search again.",
         setup=write_schedule_file("reliability_random.safetensors", RANDOM_BYTES)),
    Case("saved_schedule_not_a_schedule", "Stride Saved Schedule", "a LoRA file in models/stride/schedules",
         saved_schedule("reliability_lora.safetensors"), "execution",
         ("schedule", "not a Stride optimal-steps schedule"), "Keep only Stride Optimal Steps' files in that folder.",
         setup=write_schedule_file("reliability_lora.safetensors", GOOD_SAFETENSORS)),
    # --- latents: NaN/inf, channels, sizes -----------------------------------------------------------------
    Case("nan_latent", FEW, "a latent full of NaN (Latent Multiply by NaN)",
         changed(sample(), scaled={"class_type": "LatentMultiply", "inputs": {"samples": ["empty", 0],
                                                                             "multiplier": float("nan")}},
                 empty=empty_latent(), run=few_step(latent="scaled")),
         "execution", ("latent_image", "NaN or inf"), "Find the node that produced NaN (a broken VAE encode, a "
         "division by zero in latent math) and fix its input.", server=True),
    Case("piflow_nan_latent", "Stride pi-Flow Sample", "a latent full of NaN",
         piflow_on(PIFLOW_REFERENCE, latent=fault_latent(fill="nan")), "execution", ("NaN or inf", "check the nodes"),
         "As above."),
    Case("inf_latent_custom_sampler", "Stride TCD / Hyper-SD Sampler", "a latent full of inf through SamplerCustomAdvanced",
         custom_sampling(TCD_SAMPLER, LCM_SCHEDULER, latent=fault_latent(fill="inf")), "execution",
         ("latent_image", "NaN or inf"), "As above."),
    Case("latent_16_channels", "Stride Reference Teacher", "a 16-channel (SD3/Flux-format) latent",
         changed(sample(), latent=fault_latent(channels=16)), "execution", ("latent_image", "4x8x8", "got 16x8x8"),
         "Use Empty Latent Image (4 channels, SD1.5 format) at 64x64."),
    Case("latent_wrong_size", "Stride Reference Teacher", "a 128x128 image latent (16x16)",
         changed(sample(), latent=empty_latent(width=128, height=128)), "execution",
         ("latent_image", "Empty Latent Image 64x64", "got 4x16x16"), "The reference teacher models 64x64 images only."),
    Case("demo_latent_16_channels", "Stride Demo Model", "a 16-channel latent",
         demo_sampling(latent=fault_latent(channels=16)), "execution", ("latent_image", "4-channel", "got 16 channels"),
         "Use Empty Latent Image (SD1.5 format).", needs=("demo",)),
    Case("metrics_16_channels", "Stride Reference Metrics", "16-channel latents (Empty SD3 Latent Image)",
         metrics_graph({"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}),
         "execution", ("samples", "(4, 8, 8)", "(16, 8, 8)"),
         "Score samples of the reference teacher or demo model (4x8x8 latents).", server=True),
    Case("metrics_wrong_size", "Stride Reference Metrics", "64x128-pixel latents",
         metrics_graph(empty_latent(2, width=128, height=64)), "execution", ("samples", "(4, 8, 16)"),
         "As above: 64x64 images only."),
    Case("metrics_nan_samples", "Stride Reference Metrics", "samples containing NaN",
         metrics_graph(fault_latent(batch=2, fill="nan")), "execution", ("samples", "NaN or inf"),
         "Check the sampler and model that produced the samples (see 'model returned NaN')."),
    Case("metrics_too_few_samples", "Stride Reference Metrics", "a batch of 3 samples",
         metrics_graph(empty_latent(3)), "execution", ("samples", "at least 4"),
         "Score a batch of at least 4 samples; a few hundred per row to compare rows."),
    Case("preview_decode_16_channels", "Stride Latent Preview Decode", "a 16-channel latent",
         decode_graph({"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}),
         "execution", ("samples", "4-channel"), "This preview decodes SD1.5-format (4-channel) latents; use VAE Decode "
         "for other models."),
    # --- model output and conditioning -------------------------------------------------------------------
    Case("nan_model_output", FEW, "a model whose output is NaN (broken weights)",
         changed(sample(), base=reference_model(), model={"class_type": "ReliabilityFaultModel",
                                                          "inputs": {"model": ["base", 0], "fill": "nan"}}),
         "execution", ("model", "returned NaN or inf", "fp32"),
         "Re-download the model, or run it in fp32/bf16 (fp16 overflow gives inf/NaN)."),
    Case("inf_model_output_tdd", "Stride TDD Sampler", "a model whose output is inf, through SamplerCustomAdvanced",
         custom_sampling(TDD_SAMPLER, TDD_SCHEDULER, model={"class_type": "ReliabilityFaultModel",
                                                            "inputs": {"model": ["base", 0], "fill": "inf"}}),
         "execution", ("model", "returned NaN or inf"), "As above."),
    Case("text_encoder_conditioning_on_reference", "Stride Reference Teacher",
         "a 77x768 text-encoder CONDITIONING", changed(sample(), pos=fault_conditioning()), "execution",
         ("conditioning", "Stride Class Prompt", "(1, 77, 768)"),
         "The reference teacher and demo model are conditioned by Stride Class Prompt, not a text encoder."),
    Case("text_encoder_conditioning_on_demo", "Stride Demo Model", "a 77x768 text-encoder CONDITIONING",
         demo_sampling(pos=fault_conditioning()), "execution", ("conditioning", "Stride Class Prompt"),
         "As above.", needs=("demo",)),
    Case("empty_conditioning", FEW, "an empty CONDITIONING list as positive",
         changed(sample(), pos=fault_conditioning(empty=True)), "execution", ("positive", "empty"),
         "Connect a prompt (CLIP Text Encode, Stride Class Prompt)."),
    Case("hybrid_empty_base_positive", "Stride Hybrid Sample", "an empty CONDITIONING as base_positive",
         changed(hybrid(), pos=fault_conditioning(empty=True)), "execution", ("base_positive", "empty"),
         "Connect the encoded prompt for the base model's steps."),
    Case("metrics_text_encoder_conditioning", "Stride Reference Metrics", "a text-encoder CONDITIONING",
         metrics_graph(fault_latent(batch=2), fault_conditioning()), "execution", ("conditioning", "Stride Class Prompt"),
         "Connect the Stride Class Prompt the samples were drawn for."),
    Case("unknown_class", "Stride Class Prompt", "prompt 'a dog'", changed(sample(), pos=class_prompt("a dog")),
         "execution", ("prompt", "no such class", "disc, square, cross, ring"),
         "Name one of the four classes, or leave it empty for the unconditional prompt."),
    # --- training data -----------------------------------------------------------------------------------
    Case("train_rank_above_layer_width", "Stride Distill LoRA", "rank 200 on a model whose layers are 64 wide",
         train("reliability_rank200", TRAINING_LATENTS, rank=200), "execution", ("rank", "lower it"),
         "Lower the rank below the narrowest layer's width.", needs=("demo",)),
    Case("train_guidance_inverted", "Stride Distill LoRA", "guidance_min 5 above guidance_max 2",
         train("reliability_guidance", TRAINING_LATENTS, guidance_min=5.0, guidance_max=2.0), "execution",
         ("guidance_min", "guidance_max"), "Set guidance_min <= guidance_max (0/0 = the objective's default).",
         needs=("demo",)),
    Case("train_latents_16_channels", "Stride Distill LoRA", "16-channel training latents for a 4-channel model",
         train("reliability_lat16", fault_latent(channels=16, batch=2)), "execution",
         ("latents", "16 channels", "4"), "Encode the training images with this model's own VAE.", needs=("demo",)),
    Case("train_latents_nan", "Stride Distillation Data", "training latents containing NaN",
         train("reliability_latnan", fault_latent(batch=2, fill="nan")), "execution", ("latents", "NaN or inf"),
         "Check the node that produced the latents (VAE Encode of the images).", needs=("demo",)),
    Case("dataset_images_without_vae", "Stride Distillation Data", "images connected without a VAE",
         changed(train("reliability_novae"), img={"class_type": "EmptyImage", "inputs": {
             "width": 64, "height": 64, "batch_size": 1, "color": 0}},
                 data={"class_type": "StrideDistillDataset", "inputs": {
                     "prompt_1": ["disc", 0], "empty_prompt": ["empty", 0], "images": ["img", 0]}}),
         "execution", ("vae", "connect the checkpoint's VAE"), "Connect the checkpoint's VAE next to the images.",
         needs=("demo",)),
    Case("dataset_empty_conditioning", "Stride Distillation Data", "an empty CONDITIONING as prompt_1",
         train_with_nodes("reliability_emptycond", disc=fault_conditioning(empty=True)), "execution",
         ("prompt 1", "empty or malformed"), "Connect a text encoder output (or Stride Class Prompt).", needs=("demo",)),
    Case("dataset_mixed_encoders", "Stride Distill LoRA", "a prompt and the empty prompt from different encoders",
         train_with_nodes("reliability_mixed", disc=fault_conditioning()), "execution",
         ("data", "different conditioning shapes"), "Encode all prompts, the empty one included, with the same "
         "text encoder.", needs=("demo",)),
    Case("train_text_encoder_conditioning", "Stride Distill LoRA", "text-encoder conditioning for the demo model",
         train_with_nodes("reliability_textenc", disc=fault_conditioning(), ring=fault_conditioning(),
                          empty=fault_conditioning()), "execution", ("conditioning", "Stride Class Prompt"),
         "Use the conditioning the teacher understands (Stride Class Prompt for the demo model).", needs=("demo",)),
    # --- names and files ---------------------------------------------------------------------------------
    Case("checkpoint_name_parent", "Stride Distill LoRA", "lora_name '../escape'",
         train("../escape", TRAINING_LATENTS), "execution", ("lora_name", "not a plain file name"),
         "Use a bare name: letters, digits, '.', '_', '-', spaces.", needs=("demo",)),
    Case("save_name_slash", "Stride Save LoRA", "file_name 'sub/lora'", save_as("sub/lora"), "execution",
         ("file_name", "not a plain file name"), "Use a bare file name; the file always goes to models/loras.",
         needs=("demo",)),
    Case("save_name_backslash", "Stride Save LoRA", "file_name 'sub\\lora'", save_as("sub\\lora"), "execution",
         ("file_name", "not a plain file name"), "As above.", needs=("demo",)),
    Case("save_name_parent", "Stride Save LoRA", "file_name '../../escape'", save_as("../../escape"), "execution",
         ("file_name", "'..'"), "As above.", needs=("demo",)),
    Case("save_name_absolute", "Stride Save LoRA", "an absolute file_name (/tmp/.../lora)",
         save_as(lambda ctx: str(ctx.outside / "lora")), "execution", ("file_name", "not a plain file name"),
         "As above.", verify=outside_stays_empty, needs=("demo",)),
    Case("save_name_reserved_characters", "Stride Save LoRA", "file_name 'lora:v2*?'", save_as("lora:v2*?"),
         "execution", ("file_name", "not a plain file name"), "As above (':', '*', '?', '<', '>', '|' are not "
         "allowed on Windows).", needs=("demo",)),
    Case("save_name_windows_device", "Stride Save LoRA", "file_name 'CON' (a Windows device name)", save_as("CON"),
         "execution", ("file_name", "reserved"), "Choose another name (CON, PRN, AUX, NUL, COM1-9, LPT1-9 are "
         "devices on Windows).", needs=("demo",)),
    Case("save_name_empty", "Stride Save LoRA", "an empty file_name", save_as("  "), "execution",
         ("file_name", "not a plain file name"), "Type a name.", needs=("demo",)),
    Case("save_existing_file", "Stride Save LoRA", "a file_name that exists in models/loras (overwrite off)",
         save_as("reliability_existing"), "execution", ("file_name", "already exists", "overwrite"),
         "Choose another name, or turn on overwrite.",
         setup=write_lora_file("reliability_existing.safetensors", EXISTING), verify=existing_file_kept,
         needs=("demo",)),
    Case("resume_changed_settings", "Stride Distill LoRA", "resume a checkpoint with another rank",
         train("reliability_resume", TRAINING_LATENTS, rank=2), "execution", ("resume", "different settings", "rank"),
         "Set resume off (or use a new lora_name) when changing settings other than steps/save_every.",
         setup=train_first("reliability_resume"), needs=("demo",)),
    Case("resume_pickle_checkpoint", "Stride Distill LoRA", "a pickle file under the checkpoint's name",
         train("reliability_pickled", TRAINING_LATENTS), "execution", ("resume", "pickle", "resume off"),
         "Delete the file or choose another lora_name; Stride never unpickles.",
         setup=write_checkpoint("reliability_pickled.safetensors", PICKLE_BYTES), needs=("demo",)),
    Case("reload_missing_file", "Stride Reload Saved LoRA", "a name not in models/loras",
         reload("reliability_missing.safetensors"), "execution", ("lora_name", "does not exist"),
         "Save the LoRA first (Stride Save LoRA's output feeds this input).", server=True),
    Case("reload_pickle_file", "Stride Reload Saved LoRA", "a pickle .pt file in models/loras",
         reload("reliability_pickle.pt"), "execution", ("lora_name", "pickle"),
         "Convert the file to safetensors with a trusted tool, or use the original safetensors release.",
         setup=write_lora_file("reliability_pickle.pt", PICKLE_BYTES), server=True),
    Case("reload_pickle_renamed", "Stride Reload Saved LoRA", "a pickle renamed to .safetensors",
         reload("reliability_renamed.safetensors"), "execution", ("lora_name", "pickle"), "As above.",
         setup=write_lora_file("reliability_renamed.safetensors", PICKLE_BYTES)),
    Case("reload_random_bytes", "Stride Reload Saved LoRA", "random bytes named .safetensors",
         reload("reliability_random.safetensors"), "execution", ("lora_name", "not a safetensors file"),
         "The file is not a LoRA: download or save it again.",
         setup=write_lora_file("reliability_random.safetensors", RANDOM_BYTES)),
    Case("reload_truncated", "Stride Reload Saved LoRA", "a truncated safetensors file",
         reload("reliability_truncated.safetensors"), "execution", ("lora_name", "truncated", "download it again"),
         "The copy is incomplete: copy or download it again.",
         setup=write_lora_file("reliability_truncated.safetensors", TRUNCATED_SAFETENSORS)),
    Case("adapter_pickle_file", "Stride pi-Flow Adapter Loader", "a pickle .pt file",
         piflow_on(TINY_FLUX, adapter="reliability_pickle.pt"), "execution", ("adapter_name", "pickle"),
         "Use the released .safetensors adapter.", setup=write_lora_file("reliability_pickle.pt", PICKLE_BYTES),
         needs=("flux",)),
    Case("adapter_truncated", "Stride pi-Flow Adapter Loader", "a truncated safetensors adapter",
         piflow_on(TINY_FLUX, adapter="reliability_truncated.safetensors"), "execution",
         ("adapter_name", "truncated", "download it again"), "Download the adapter again.",
         setup=write_lora_file("reliability_truncated.safetensors", TRUNCATED_SAFETENSORS), needs=("flux",)),
    Case("adapter_plain_lora", "Stride pi-Flow Adapter Loader", "an ordinary LoRA (no policy head) as adapter",
         piflow_on(TINY_FLUX, adapter="reliability_plain_lora.safetensors"), "execution",
         ("adapter_name", "not a pi-Flow adapter"), "Load ordinary LoRAs with LoraLoader; pi-Flow needs an adapter "
         "with a policy head.", needs=("flux",)),
]


# ------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # "validation", "execution" or "success"
    message: str
    exception_type: str = ""


def outcome_in_process(host, graph: dict) -> Outcome:
    valid, error, _, node_errors = host.validate(graph)
    if not valid:
        return Outcome("validation", validation_message(error, node_errors))
    result = host.run(graph)
    if result.success:
        return Outcome("success", "")
    error = result.error()
    assert error is not None, result.messages
    return Outcome("execution", error["exception_message"].strip(), error["exception_type"])


def validation_message(error: dict, node_errors: dict) -> str:
    """The text ComfyUI's frontend shows for a rejected prompt: the error and each input's details."""
    parts = [error.get("message", "")]
    for node in node_errors.values():
        for item in node.get("errors", []):
            parts.append(f"{item.get('message', '')}: {item.get('details', '')}")
    return " | ".join(part for part in parts if part)


def good_prompt(index: int) -> dict:
    return sampling_graph(seed=1000 + index, prefix="reliability_after")


def check_message(case: Case, outcome: Outcome) -> None:
    assert outcome.kind == case.outcome, f"{case.id}: expected a {case.outcome} error, got {outcome}"
    for word in case.words:
        assert word in outcome.message, f"{case.id}: {word!r} missing from: {outcome.message}"
    raw = [marker for marker in RAW_MESSAGES if marker in outcome.message]
    assert not raw, f"{case.id}: raw error text {raw} in: {outcome.message}"
    if case.outcome == "execution":
        assert outcome.exception_type.endswith("StrideError"), f"{case.id}: {outcome.exception_type}: {outcome.message}"


def repo_outputs() -> set[str]:
    """Files in the repository that look like something a node writes (outputs, LoRAs, temp files)."""
    found = set()
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", ".cache", "__pycache__", "node_modules")]
        found.update(os.path.join(folder, name) for name in names
                     if name.endswith(OUTPUT_SUFFIXES) or "reliability" in name and not name.endswith(".py"))
    return found


MESSAGES: dict[str, str] = {}


@pytest.fixture(scope="module")
def context(fault_host, tmp_path_factory) -> Context:
    folder_paths = fault_host.folder_paths
    return Context(host=fault_host, loras=Path(folder_paths.get_folder_paths("loras")[0]),
                   checkpoints=Path(folder_paths.get_output_directory()) / "stride_checkpoints",
                   outside=tmp_path_factory.mktemp("outside"), rescan=folder_paths.filename_list_cache.clear)


def piflow_test_module():
    """tests/host/test_piflow_loader.py: its tiny FLUX.1 builder and adapter files (one definition of them)."""
    spec = importlib.util.spec_from_file_location("piflow_loader_tests", ROOT / "tests/host/test_piflow_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_flux(context):
    """A tiny FLUX.1 MODEL node and adapters (one matching it, one for a wider model, a plain LoRA)."""
    from safetensors.torch import save_file

    piflow_tests = piflow_test_module()
    model, conditioning = piflow_tests.tiny_model("FLUX.1")

    class ReliabilityTinyFlux:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL", "CONDITIONING")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return model, conditioning

    for ours, theirs in (("reliability_tiny_gm", piflow_tests.adapter_file("FLUX.1", piflow_tests.GM)),
                         ("reliability_wide_gm", piflow_tests.WIDE_ADAPTER),
                         ("reliability_plain_lora", piflow_tests.PLAIN_LORA)):
        state, metadata = piflow_tests.ADAPTERS[theirs]
        save_file({k: v.contiguous() for k, v in state.items()}, str(context.loras / f"{ours}.safetensors"), metadata)
    context.rescan()
    nodes = context.host.nodes.NODE_CLASS_MAPPINGS
    nodes["ReliabilityTinyFlux"] = ReliabilityTinyFlux
    yield
    del nodes["ReliabilityTinyFlux"]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_a_clear_error_and_the_host_carries_on(case, context, request):
    for need in case.needs:
        request.getfixturevalue({"demo": "demo_weights", "flux": "tiny_flux"}[need])
    if case.setup is not None:
        case.setup(context)
    base_before = snapshot(context.host.base_dir, skip=STAYS_INSIDE)
    repo_before = repo_outputs()

    outcome = outcome_in_process(context.host, case.graph(context))
    MESSAGES[case.id] = outcome.message
    check_message(case, outcome)

    assert not changed_files(base_before, snapshot(context.host.base_dir, skip=STAYS_INSIDE)), \
        "a bad input wrote outside ComfyUI's output/models/temp folders"
    assert not repo_outputs() - repo_before, "a bad input wrote into the repository"
    outside_stays_empty(context)
    if case.verify is not None:
        case.verify(context)
    after = context.host.run(good_prompt(CASES.index(case)))
    assert after.success, f"the host failed the next good prompt after {case.id}: {after.error()}"


def test_catalogue_is_broad():
    assert len({case.id for case in CASES}) == len(CASES)
    assert len(CASES) >= 25
    nodes = {case.node for case in CASES}
    assert len(nodes) >= 15, nodes


# ------------------------------------------------------------------------------------------
# The same through the real server: HTTP 400 for validation, execution_error over the websocket
# ------------------------------------------------------------------------------------------
SERVER_CASES = [case for case in CASES if case.server]


@pytest.mark.parametrize("case", SERVER_CASES, ids=[case.id for case in SERVER_CASES])
def test_bad_input_through_the_server(case, comfy_server, tmp_path):
    context = Context(host=comfy_server, loras=comfy_server.base_dir / "models" / "loras",
                      checkpoints=comfy_server.base_dir / "output" / "stride_checkpoints", outside=tmp_path,
                      rescan=lambda: None)  # the server rescans a folder whose modification time changed
    if case.setup is not None:
        case.setup(context)
    before = snapshot(comfy_server.base_dir, skip=STAYS_INSIDE + ("server.log", "user"))
    graph = case.graph(context)
    answer = comfy_server.queue(graph)
    if "prompt_id" not in answer:
        assert answer.get("http_status") == 400, answer
        outcome = Outcome("validation", validation_message(answer.get("error", {}), answer.get("node_errors", {})))
    else:
        result = comfy_server.run(graph)
        error = result.error() or {}
        outcome = Outcome("success" if result.success else "execution", error.get("exception_message", "").strip(),
                          error.get("exception_type", ""))
    check_message(case, outcome)
    assert not changed_files(before, snapshot(comfy_server.base_dir, skip=STAYS_INSIDE + ("server.log", "user")))
    after = comfy_server.run(good_prompt(CASES.index(case)))
    assert after.success, after.messages[-3:]


# ------------------------------------------------------------------------------------------
# docs/TROUBLESHOOTING.md: the catalogue with the messages users see
# ------------------------------------------------------------------------------------------
def troubleshooting_markdown(messages: dict[str, str], base_dir: str) -> str:
    def cell(text: str) -> str:
        text = text.replace(base_dir, "<ComfyUI>")
        text = re.sub(r"/tmp/\S*?/outside\d*", "/tmp/...", text)
        return text.replace("|", "\\|").replace("\n", " ").strip()

    lines = [
        "# Troubleshooting: what Stride says when an input is wrong",
        "",
        "Every row is a case of `tests/reliability/test_bad_inputs.py`: the test feeds exactly this wrong input",
        "to a real ComfyUI, checks that the message below appears (as a validation error before the run, or as",
        "the node's execution error), that the host then runs the next prompt normally, and that nothing was",
        "written outside ComfyUI's `output`, `models` and `temp` folders. Regenerate with",
        "`STRIDE_WRITE_DOCS=1 .venv/bin/python -m pytest tests/reliability/test_bad_inputs.py`.",
        "",
        "| node | wrong input | when | message you see | what to do |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        lines.append(f"| {case.node} | {cell(case.wrong)} | {case.outcome} | {cell(messages[case.id])} | "
                     f"{cell(case.hint)} |")
    return "\n".join(lines) + "\n"


def test_troubleshooting_doc_is_current(context):
    missing = [case.id for case in CASES if case.id not in MESSAGES]
    if missing:
        pytest.skip(f"run the whole catalogue to compare the doc ({len(missing)} cases not run)")
    text = troubleshooting_markdown(MESSAGES, str(context.host.base_dir))
    if os.environ.get("STRIDE_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, \
        "docs/TROUBLESHOOTING.md is out of date: rerun with STRIDE_WRITE_DOCS=1"
