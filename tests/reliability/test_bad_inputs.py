"""Bad-input catalogue: every wrong input a user can give Stride's nodes, in one table.

Each case is a graph (or a prepared file plus a graph) with one thing wrong. It must end in
ComfyUI's normal validation error or execution error whose message names the input and says
what to do (never a raw torch/safetensors message), the host must run the next good prompt, and
nothing may be written outside ComfyUI's output/models/temp folders. A handful run through the
real server as well. ``docs/TROUBLESHOOTING.md`` is this table with the messages the cases
produce; ``STRIDE_WRITE_DOCS=1`` rewrites it, a test keeps it current.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from tests.reliability.support import (
    RAW_MESSAGES,
    changed_files,
    class_prompt,
    empty_latent,
    fault_conditioning,
    fault_image,
    fault_latent,
    few_step,
    hybrid_graph,
    reference_model,
    repo_outputs,
    sampling_graph,
    snapshot,
    tiny_flux_installed,
    training_graph,
    validation_message,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "TROUBLESHOOTING.md"
STAYS_INSIDE = ("output", "models", "temp")  # the folders ComfyUI lets nodes write


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
    outcome: str  # "validation", "execution", or "report" (the run succeeds and its report text says what happened)
    words: tuple[str, ...]  # the message must contain all of these
    hint: str  # what to do, for the table
    setup: Callable[[Context], None] | None = None
    verify: Callable[[Context], None] | None = None
    needs: tuple[str, ...] = ()  # "demo" (demo weights), "flux" (tiny FLUX.1 node)
    server: bool = False  # also run through the real server
    absent: tuple[str, ...] = ()  # the message must contain none of these (misleading advice)
    xfail: str = ""  # why the case fails today (the fix is pending); such cases stay out of the doc


# ------------------------------------------------------------------------------------------
# Graph pieces
# ------------------------------------------------------------------------------------------
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
                        "decode": {"class_type": "StrideLatentToImage",
                                   "inputs": {"samples": ["latent", 0], "scale": 2}},
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


def link_in_schedules(name: str, target: str) -> Callable[[Context], None]:
    """A symbolic link ``name`` in models/stride/schedules pointing at ``target``."""
    def setup(ctx: Context) -> None:
        schedules_folder(ctx).mkdir(parents=True, exist_ok=True)
        link = schedules_folder(ctx) / name
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
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
        graph["save"] = {"class_type": "SaveLatent",
                         "inputs": {"samples": ["run", 0], "filename_prefix": "reliability"}}
        return graph

    return build


def piflow_sample(**overrides) -> Callable[[Context], dict]:
    """Stride pi-Flow Sample on the exact pi-Flow reference with its inputs overridden."""
    def build(ctx: Context) -> dict:
        graph = piflow_on(PIFLOW_REFERENCE)(ctx)
        graph["run"]["inputs"].update(overrides)
        return graph

    return build


def piflow_custom(sampler: dict | None = None, scheduler: dict | None = None) -> Callable[[Context], dict]:
    """SamplerCustomAdvanced with the Stride pi-Flow sampler and scheduler (inputs overridden) on the pi-Flow
    reference."""
    def build(ctx: Context) -> dict:
        return {
            "model": PIFLOW_REFERENCE, "pos": class_prompt(""), "latent": empty_latent(),
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
            "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["pos", 0]}},
            "sampler": {"class_type": "StridePiFlowSampler", "inputs": {
                "substeps": 8, "diffusion_coefficient": 0.0, "temperature": "auto", "manual_temperature": 1.0,
                "shift": 3.2, **(sampler or {})}},
            "sigmas": {"class_type": "StridePiFlowScheduler", "inputs": {
                "model": ["model", 0], "steps": 2, "shift": 3.2, "final_step_size_scale": 0.5, "denoise": 1.0,
                **(scheduler or {})}},
            "run": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0]}},
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "reliability"}},
        }

    return build


def with_sigmas(values: str) -> Callable[[Context], dict]:
    """Custom sampling with the Stride TCD sampler on SIGMAS no scheduler makes (see support.FaultSigmas)."""
    return changed(custom_sampling(TCD_SAMPLER, LCM_SCHEDULER),
                   sigmas={"class_type": "ReliabilityFaultSigmas", "inputs": {"values": values}})


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


def _train_dmd_first(ctx: Context, name: str) -> None:
    result = ctx.host.run(train(name, TRAINING_LATENTS, objective="dmd", ttur=2)(ctx))
    assert result.success, result.error()


def train_first(name: str) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        result = ctx.host.run(train(name, TRAINING_LATENTS)(ctx))
        assert result.success, result.error()

    return setup


PICKLE_BYTES = pickle.dumps({"lora_up.weight": [0.0] * 16}, protocol=4)
RANDOM_BYTES = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0),
                             dtype=torch.uint8).numpy().tobytes()
GOOD_SAFETENSORS = safetensors_bytes({"diffusion_model.x.lora_up.weight": torch.zeros(64, 64)})
TRUNCATED_SAFETENSORS = GOOD_SAFETENSORS[: len(GOOD_SAFETENSORS) // 2]
EXISTING = b"an existing LoRA the user wants to keep"


def stride_lora_variant(name: str, transform: Callable[[dict, dict], tuple[dict, dict]]) -> Callable[[Context], None]:
    """A Stride LoRA of the demo model (trained and saved once per host), changed by ``transform(state, metadata)``
    and written to models/loras as ``name``."""
    from safetensors.torch import load_file, save_file

    def setup(ctx: Context) -> None:
        base = ctx.loras / "reliability_base_lora.safetensors"
        if not base.is_file():
            graph = train("reliability_base", TRAINING_LATENTS)(ctx)
            graph["save"] = {"class_type": "StrideSaveLoRA",
                             "inputs": {"lora": ["train", 1], "file_name": base.stem, "overwrite": True}}
            result = ctx.host.run(graph)
            assert result.success, result.error()
        from safetensors import safe_open

        with safe_open(str(base), "pt") as reader:
            metadata = dict(reader.metadata())
        state, metadata = transform(load_file(str(base)), metadata)
        save_file(state, str(ctx.loras / name), metadata)
        ctx.rescan()

    return setup


def renamed_modules(share: float) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Move a share of the LoRA's layers (by module name order) to modules the demo model does not have."""
    def transform(state: dict, metadata: dict) -> tuple[dict, dict]:
        modules = sorted({key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state})
        moved = set(modules[: round(len(modules) * share)])
        renamed = {}
        for key, value in state.items():
            module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
            new_key = key.replace("diffusion_model.", "diffusion_model.other_net.", 1) if module in moved else key
            renamed[new_key] = value
        return renamed, metadata

    return transform


def no_lora_keys(state: dict, metadata: dict) -> tuple[dict, dict]:
    return {"diffusion_model.input_blocks.0.0.weight": torch.zeros(64, 4, 3, 3)}, {}


def wrong_shapes(state: dict, metadata: dict) -> tuple[dict, dict]:
    return {key: torch.zeros(value.shape[0] + 3, *value.shape[1:]) if key.endswith("lora_up.weight") else value
            for key, value in state.items()}, metadata


def other_fingerprint(state: dict, metadata: dict) -> tuple[dict, dict]:
    return state, {**metadata, "stride.base_fingerprint": "1.2345678900e+00"}


def reload_onto_demo(lora_name: str, report: bool = False) -> Callable[[Context], dict]:
    """Stride Reload Saved LoRA of ``lora_name`` onto the demo model, then sampling (and its report shown)."""
    nodes = {"name": {"class_type": "PrimitiveString", "inputs": {"value": lora_name}},
             "base": {"class_type": "StrideDemoModel", "inputs": {}},
             "model": {"class_type": "StrideReloadLoRA",
                       "inputs": {"model": ["base", 0], "lora_name": ["name", 0], "strength": 1.0}}}
    if report:
        nodes["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["model", 1]}}
    return changed(sample(), **nodes)


def train_first_steps(name: str, steps: int) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        result = ctx.host.run(train(name, TRAINING_LATENTS, steps=steps)(ctx))
        assert result.success, result.error()

    return setup


def no_file_named(name: str) -> Callable[[Context], None]:
    def verify(ctx: Context) -> None:
        assert not (ctx.loras / name).exists(), f"{name!r} was written"

    return verify


def link_in_loras(name: str, target: str) -> Callable[[Context], None]:
    """A symbolic link ``name`` in models/loras pointing at ``target`` (a missing file, a device, ...)."""
    def setup(ctx: Context) -> None:
        link = ctx.loras / name
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
        ctx.rescan()

    return setup


def adapter_variant(name: str, metadata_changes: dict[str, str]) -> Callable[[Context], None]:
    """The tiny FLUX.1 GM adapter with its metadata changed, written to models/loras as ``name``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def setup(ctx: Context) -> None:
        source = str(ctx.loras / "reliability_tiny_gm.safetensors")
        with safe_open(source, "pt") as reader:
            metadata = dict(reader.metadata() or {})
        save_file(load_file(source), str(ctx.loras / name), {**metadata, **metadata_changes})
        ctx.rescan()

    return setup


def nan_weight(state: dict, metadata: dict) -> tuple[dict, dict]:
    key = sorted(key for key in state if key.endswith("lora_down.weight"))[0]
    broken = state[key].clone()
    broken.view(-1)[0] = float("nan")
    return {**state, key: broken}, metadata


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
         "Pick the model's few-step family (its tooltip and docs/FAMILIES.md list them), or auto."),
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
    Case("train_dmd_ttur_zero", "Stride Distill LoRA", "dmd with ttur = 0",
         train("reliability_ttur0", objective="dmd", ttur=0), "validation", ("ttur",),
         "ttur counts fake-score updates per generator update: at least 1 (DMD2: 5 for SDXL, 10 for SD1.5)."),
    Case("train_dmd_guidance_zero", "Stride Distill LoRA", "dmd with dmd_guidance = 0",
         train("reliability_dmd_guidance0", objective="dmd", dmd_guidance=0.0), "validation", ("dmd_guidance",),
         "The real score's CFG scale is above 0 (1 = no guidance; DMD2: 1.75 for SD1.5, 8 for SDXL)."),
    Case("train_dmd_generator_steps_zero", "Stride Distill LoRA", "dmd with generator_steps = 0",
         train("reliability_generator0", objective="dmd", generator_steps=0), "validation", ("generator_steps",),
         "The student takes at least 1 step (DMD2: 1 or 4)."),
    Case("resume_dmd_as_lcm", "Stride Distill LoRA", "resume a dmd checkpoint with objective lcm",
         train("reliability_dmd_as_lcm", TRAINING_LATENTS), "execution",
         ("resume", "different settings", "objective 'dmd'"),
         "Resume a run with the objective it was trained with, or set resume off / use a new lora_name.",
         setup=lambda ctx: _train_dmd_first(ctx, "reliability_dmd_as_lcm"), needs=("demo",)),
    # --- method on the wrong kind of model --------------------------------------------------------------
    Case("lcm_schedule_on_continuous_edm", "Stride LCM Scheduler", "a model patched to continuous EDM sigmas",
         changed(custom_sampling(LCM_SAMPLER, LCM_SCHEDULER), base=reference_model(), model=continuous("edm")),
         "execution", ("model", "1000 discrete training timesteps", "continuous sigmas", "karras"),
         "LCM/TCD/TDD/Hyper-SD schedules need a model with SD's 1000 discrete timesteps; for continuous-sigma models "
         "use a plain scheduler (karras) with the Stride sampler.", server=True),
    Case("tdd_on_continuous_v", FEW, "method tdd on a model patched to continuous V sigmas",
         changed(sample(method="tdd"), base=reference_model(), model=continuous("v")), "execution",
         ("model", "tdd schedules", "continuous sigmas"),
         "As above: use a discrete-timestep model, or a plain scheduler."),
    Case("family_on_the_wrong_kind_of_model", FEW, "family sdxl-lightning-4step on a flow model",
         changed(sample(method="sdxl-lightning-4step", steps=4), model=reference_model("flow")), "execution",
         ("method", "needs a model of kind eps, but this model is flow", "flux1-schnell"),
         "Choose a family for the model's kind (the message lists them), or auto on a model ComfyUI names."),
    Case("family_at_unpublished_steps", FEW, "family qwen-image-lightning-4step with 6 steps",
         changed(sample(method="qwen-image-lightning-4step", steps=6), model=reference_model("flow")), "execution",
         ("steps", "trained for 4 steps, not 6; choose 4"),
         "Use a step count the family was published for (the message lists them) or its other variant."),
    Case("auto_family_on_an_unnamed_model", FEW, "family auto on a model no registry architecture fits",
         sample(method="auto", steps=4), "execution", ("method", "cannot tell the few-step family", "lcm-lora"),
         "Name the family: auto only decides where the model's architecture leaves one choice."),
    Case("train_flow_teacher", "Stride Distill LoRA", "a flow-matching teacher",
         changed(train("reliability_flow"), model=reference_model("flow")), "execution",
         ("model", "EPS or V-prediction teacher"),
         "LCM/TDD/segmented distillation needs an EPS or V-prediction model (SD1.5, SDXL); for a flow model use "
         "the dmd objective.", server=True),
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
         ("steps", "denoise", "Choose fewer steps"),
         "TDD's grid has 250 targets: steps / denoise must not exceed 250."),
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
    Case("optimal_steps_empty_positive", "Stride Optimal Steps", "an empty CONDITIONING list as positive",
         changed(optimal_steps(), pos=fault_conditioning(empty=True)), "execution", ("positive", "empty"),
         "Connect a prompt (CLIP Text Encode, Stride Class Prompt).", verify=no_schedule_written),
    Case("optimal_steps_text_encoder_conditioning", "Stride Optimal Steps",
         "a 77x768 text-encoder CONDITIONING as negative for the reference teacher",
         changed(optimal_steps(), neg=fault_conditioning()), "execution", ("negative", "Stride Class Prompt"),
         "Connect Stride Class Prompt (the empty prompt for negative).", verify=no_schedule_written),
    Case("optimal_steps_empty_latent_batch", "Stride Optimal Steps", "a latent batch of 0 latents",
         optimal_steps(latent=fault_latent(batch=0)), "execution", ("latent_image", "empty", "batch size"),
         "Use Empty Latent Image with a batch size of 1 or more (the latents per model call).",
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
    Case("saved_schedule_broken_link", "Stride Saved Schedule", "a schedule name that is a broken link",
         saved_schedule("reliability_broken_link.safetensors"), "execution", ("schedule", "not a regular file"),
         "Point the link at the schedule file again, or copy the file into models/stride/schedules.",
         setup=link_in_schedules("reliability_broken_link.safetensors", "/nonexistent/stride.safetensors")),
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
    Case("inf_latent_custom_sampler", "Stride TCD / Hyper-SD Sampler",
         "a latent full of inf through SamplerCustomAdvanced",
         custom_sampling(TCD_SAMPLER, LCM_SCHEDULER, latent=fault_latent(fill="inf")), "execution",
         ("latent_image", "NaN or inf"), "As above."),
    Case("latent_16_channels", "Stride Reference Teacher", "a 16-channel (SD3/Flux-format) latent",
         changed(sample(), latent=fault_latent(channels=16)), "execution", ("latent_image", "4x8x8", "got 16x8x8"),
         "Use Empty Latent Image (4 channels, SD1.5 format) at 64x64."),
    Case("latent_wrong_size", "Stride Reference Teacher", "a 128x128 image latent (16x16)",
         changed(sample(), latent=empty_latent(width=128, height=128)), "execution",
         ("latent_image", "Empty Latent Image 64x64", "got 4x16x16"),
         "The reference teacher models 64x64 images only."),
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
         metrics_graph(fault_latent(batch=2), fault_conditioning()), "execution",
         ("conditioning", "Stride Class Prompt"),
         "Connect the Stride Class Prompt the samples were drawn for."),
    Case("unknown_class", "Stride Class Prompt", "prompt 'a dog'", changed(sample(), pos=class_prompt("a dog")),
         "execution", ("prompt", "no such class", "disc, square, cross, ring"),
         "Name one of the four classes, or leave it empty for the unconditional prompt."),
    # --- training data -----------------------------------------------------------------------------------
    Case("train_rank_above_layer_width", "Stride Distill LoRA", "rank 200 on a model whose layers are 64 wide",
         train("reliability_rank200", TRAINING_LATENTS, rank=200), "execution", ("rank", "lower the rank"),
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
         ("prompt_1", "empty or malformed"), "Connect a text encoder output (or Stride Class Prompt).",
         needs=("demo",)),
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
    # --- what the fuzzer found (tests/reliability/test_fuzz.py: KNOWN maps its findings to these) --------
    Case("tdd_clip_ratio_nan", "Stride TDD Sampler", "clip_ratio = NaN",
         custom_sampling(with_inputs(TDD_SAMPLER, clip_ratio=float("nan")), TDD_SCHEDULER), "execution",
         ("clip_ratio", "NaN"), "Type a number between 0.5 and 1 (TDD: 0.995)."),
    Case("piflow_sampler_shift_nan", "Stride pi-Flow Sampler", "shift = NaN",
         piflow_custom(sampler={"shift": float("nan")}), "execution", ("shift", "NaN"),
         "Type a number for shift (pi-Flow: 3.2)."),
    Case("piflow_scheduler_shift_nan", "Stride pi-Flow Scheduler", "shift = NaN",
         piflow_custom(scheduler={"shift": float("nan")}), "execution", ("shift", "NaN"),
         "Type a number for shift (pi-Flow: 3.2)."),
    Case("piflow_sample_denoise_nan", "Stride pi-Flow Sample", "denoise = NaN", piflow_sample(denoise=float("nan")),
         "execution", ("denoise", "NaN"), "Type a number between 0.01 and 1 for denoise."),
    Case("scheduler_denoise_nan", "Stride TDD Scheduler", "denoise = NaN",
         custom_sampling(TDD_SAMPLER, with_inputs(TDD_SCHEDULER, denoise=float("nan"))), "execution",
         ("denoise", "NaN"), "Type a number between 0.01 and 1 for denoise."),
    Case("lcm_scheduler_denoise_below_grid", "Stride LCM Scheduler", "4 steps at denoise 0.01",
         custom_sampling(LCM_SAMPLER, with_inputs(LCM_SCHEDULER, denoise=0.01)), "execution", ("denoise", "0.02"),
         "Raise denoise to at least 0.02 (one step of the 50-step grid).", absent=("fewer steps",)),
    Case("tdd_scheduler_denoise_too_small", "Stride TDD Scheduler", "4 steps at denoise 0.01 (needs 400 targets)",
         custom_sampling(TDD_SAMPLER, with_inputs(TDD_SCHEDULER, denoise=0.01)), "execution", ("denoise", "at least"),
         "Raise denoise (TDD's grid has 250 targets: steps / denoise must not exceed 250)."),
    Case("sampler_with_nan_sigmas", "Stride TCD / Hyper-SD Sampler", "SIGMAS containing NaN (a broken sigma node)",
         with_sigmas("nan"), "execution", ("sigmas", "NaN"), "Check the node that made the sigmas."),
    Case("sampler_with_increasing_sigmas", "Stride TCD / Hyper-SD Sampler", "increasing SIGMAS",
         with_sigmas("increasing"), "execution", ("sigmas", "decreas"), "Sigmas must fall from the start to 0: "
         "check the scheduler (or remove a Flip Sigmas)."),
    Case("reload_strength_nan", "Stride Reload Saved LoRA", "strength = NaN",
         changed(reload_onto_demo("reliability_copy.safetensors"), model={"class_type": "StrideReloadLoRA", "inputs": {
             "model": ["base", 0], "lora_name": ["name", 0], "strength": float("nan")}}), "execution",
         ("strength", "NaN"), "Type a number for strength (1.0 as trained).",
         setup=stride_lora_variant("reliability_copy.safetensors", lambda state, metadata: (state, metadata)),
         needs=("demo",)),
    Case("adapter_strength_nan", "Stride pi-Flow Adapter Loader", "strength = NaN",
         changed(piflow_on(TINY_FLUX, adapter="reliability_tiny_gm.safetensors"), adapter={
             "class_type": "StridePiFlowAdapterLoader", "inputs": {
                 "model": ["base", 0], "adapter_name": "reliability_tiny_gm.safetensors", "strength": float("nan")}}),
         "execution", ("strength", "NaN"), "Type a number for strength (1.0 as trained).", needs=("flux",)),
    Case("train_guidance_nan", "Stride Distill LoRA", "guidance_min = NaN",
         train("reliability_guidance_nan", TRAINING_LATENTS, guidance_min=float("nan")), "execution",
         ("guidance_min", "NaN"), "Type a number for guidance_min (0 and 0 = the objective's default).",
         needs=("demo",)),
    Case("hybrid_distilled_model_nan", "Stride Hybrid Sample", "a distilled model whose output is NaN",
         changed(hybrid(distilled_model=["broken", 0]),
                 broken={"class_type": "ReliabilityFaultModel", "inputs": {"model": ["distilled", 0], "fill": "nan"}}),
         "execution", ("distilled_model", "returned NaN or inf"), "Re-download the distilled model (or LoRA), or run "
         "it in fp32/bf16."),
    Case("reference_conditioning_named_by_input", FEW, "a 1x1 CONDITIONING as positive for the reference teacher",
         changed(sample(), pos=fault_conditioning(width=1, tokens=1)), "execution", ("positive", "Stride Class Prompt"),
         "Connect Stride Class Prompt to positive."),
    Case("dataset_prompt_named_by_input", "Stride Distillation Data", "an empty CONDITIONING as prompt_2",
         train_with_nodes("reliability_emptycond2", ring=fault_conditioning(empty=True)), "execution",
         ("prompt_2", "empty"), "Connect a text encoder output to prompt_2, or leave it unconnected.",
         needs=("demo",)),
    Case("train_piflow_teacher", "Stride Distill LoRA", "a pi-Flow model as teacher",
         changed(train("reliability_piflow_teacher", TRAINING_LATENTS), model=PIFLOW_REFERENCE), "execution",
         ("model", "connect"), "Connect an EPS or V-prediction model (SD1.5, SDXL).", needs=("demo",)),
    Case("hybrid_latent_1x1", "Stride Hybrid Sample", "a 1x1 latent for the reference teacher",
         changed(hybrid(), latent=fault_latent(height=1, width=1)), "execution", ("latent_image", "use Empty Latent"),
         "Use Empty Latent Image 64x64."),
    Case("metrics_latent_1x1", "Stride Reference Metrics", "1x1 latents",
         metrics_graph(fault_latent(height=1, width=1, batch=2)),
         "execution", ("samples", "use"), "Score samples of the reference teacher or demo model (4x8x8 latents)."),
    Case("reload_broken_link", "Stride Reload Saved LoRA", "a LoRA name that is a broken link (or a link to a device)",
         reload("reliability_broken_link.safetensors"), "execution", ("lora_name", "not a regular file"),
         "Point the link at the LoRA file again, or copy the file into models/loras.",
         setup=link_in_loras("reliability_broken_link.safetensors", "/nonexistent/stride.safetensors")),
    Case("adapter_broken_link", "Stride pi-Flow Adapter Loader", "an adapter name that links to a device",
         piflow_on(TINY_FLUX, adapter="reliability_device_link.safetensors"), "execution",
         ("adapter_name", "not a regular file"), "Point the link at the adapter file again, or copy the file.",
         setup=link_in_loras("reliability_device_link.safetensors", "/dev/zero"), needs=("flux",)),
    Case("reload_lora_nan_weights", "Stride Reload Saved LoRA", "a LoRA file holding NaN weights",
         reload_onto_demo("reliability_nan_lora.safetensors"), "execution", ("lora_name", "NaN"),
         "The file is broken: train and save the LoRA again.",
         setup=stride_lora_variant("reliability_nan_lora.safetensors", nan_weight), needs=("demo",)),
    Case("adapter_garbled_metadata", "Stride pi-Flow Adapter Loader", "an adapter whose policy_config metadata is '[]'",
         piflow_on(TINY_FLUX, adapter="reliability_garbled_gm.safetensors"), "execution",
         ("adapter_name", "policy_config", "download"), "Download the adapter again (its metadata is damaged).",
         setup=adapter_variant("reliability_garbled_gm.safetensors", {"policy_config": "[]"}), needs=("flux",)),
    # --- hostile values (issue #18 and the fuzzer, tests/reliability/test_fuzz.py) ----------------------
    Case("cfg_nan", FEW, "cfg = NaN (passes ComfyUI's min/max check)", sample(cfg=float("nan")), "execution",
         ("cfg", "NaN"), "Type a number for cfg (0 = the method's recommendation).", absent=("weights",)),
    Case("denoise_nan", FEW, "denoise = NaN", sample(denoise=float("nan")), "execution", ("denoise", "NaN"),
         "Type a number between 0.01 and 1 for denoise.", absent=("fewer steps",)),
    Case("lcm_s_noise_nan", "Stride LCM Sampler", "s_noise = NaN",
         custom_sampling(with_inputs(LCM_SAMPLER, s_noise=float("nan")), LCM_SCHEDULER), "execution",
         ("s_noise", "NaN"),
         "Type a number for s_noise (1.0 = LCM as trained).", absent=("weights",)),
    Case("tcd_gamma_nan", "Stride TCD / Hyper-SD Sampler", "gamma = NaN",
         custom_sampling(with_inputs(TCD_SAMPLER, gamma=float("nan")), LCM_SCHEDULER), "execution", ("gamma", "NaN"),
         "Type a number between 0 and 1 for gamma (the authors use 0.3)."),
    Case("tdd_eta_nan", "Stride TDD Sampler", "eta = NaN",
         custom_sampling(with_inputs(TDD_SAMPLER, eta=float("nan")), TDD_SCHEDULER), "execution", ("eta", "NaN"),
         "Type a number between 0 and 1 for eta (the authors use 0.2)."),
    Case("lcm_denoise_below_grid", FEW, "lcm, 1 step at denoise 0.01 (below one step of the 50-step grid)",
         sample(method="lcm", steps=1, denoise=0.01), "execution", ("denoise", "0.02"),
         "Raise denoise to at least 1/50 = 0.02 (one step of LCM's grid).", absent=("fewer steps",)),
    Case("hybrid_base_model_nan", "Stride Hybrid Sample", "a base model whose output is NaN",
         changed(hybrid(base_model=["broken", 0]), broken={"class_type": "ReliabilityFaultModel",
                                                            "inputs": {"model": ["model", 0], "fill": "nan"}}),
         "execution", ("base_model", "returned NaN or inf"), "Re-download the base model, or run it in fp32/bf16."),
    Case("decode_nan_latent", "Stride Latent Preview Decode", "a latent full of NaN (decoded to a black picture)",
         decode_graph(fault_latent(fill="nan")), "execution", ("samples", "NaN or inf"),
         "Check the sampler and model that produced the latent (see 'model returned NaN')."),
    Case("diversity_nan_images", "Stride Image Diversity", "images containing NaN",
         lambda ctx: {"img": fault_image(fill="nan"),
                      "div": {"class_type": "StrideImageDiversity", "inputs": {"images": ["img", 0], "label": "x"}}},
         "execution", ("images", "NaN or inf"), "Check the decode that produced the images."),
    Case("literal_value_on_a_link_input", FEW, "a number sent (by API) where a LATENT link belongs",
         lambda ctx: {**sampling_graph(), "run": few_step(latent_image="abc")}, "execution", ("latent_image", "LATENT"),
         "Connect a node's LATENT output; API clients send [node_id, output_index] for links."),
    Case("class_prompt_two_classes", "Stride Class Prompt", "prompt 'disc ring' (two class names)",
         changed(sample(), pos=class_prompt("disc ring")), "execution", ("prompt", "disc", "ring", "one class"),
         "Name exactly one class (disc, square, cross, ring), or leave it empty."),
    Case("class_prompt_part_of_a_name", "Stride Class Prompt", "prompt 'is' (part of 'disc')",
         changed(sample(), pos=class_prompt("is")), "execution", ("prompt", "no such class"),
         "Type the whole class name."),
    Case("demo_latent_too_small", "Stride Demo Model", "a 1x1 latent for the demo UNet",
         demo_sampling(latent=fault_latent(height=1, width=1)), "execution", ("latent_image", "at least"),
         "Use Empty Latent Image 64x64 (the demo model's size).", absent=("Expected more than",), needs=("demo",)),
    Case("train_model_without_layers", "Stride Distill LoRA", "a teacher without layers a LoRA can train (analytic)",
         changed(train("reliability_nolayers", TRAINING_LATENTS), model=reference_model()), "execution",
         ("model", "no layer a LoRA can train"), "Distil a network model (a UNet or DiT checkpoint); the analytic "
         "reference teacher has no weights.", absent=("lower",), needs=("demo",)),
    Case("train_nan_conditioning", "Stride Distillation Data", "a prompt's conditioning containing NaN",
         train_with_nodes("reliability_nancond", disc=fault_conditioning(width=5, tokens=1, nan=True)), "execution",
         ("prompt_1", "NaN or inf"), "Check the text encoder output connected to prompt_1.", needs=("demo",)),
    Case("dataset_size_floored", "Stride Distillation Data", "width 100 (not a multiple of the 8-pixel latent grid)",
         changed(train("reliability_floored"), data={"class_type": "StrideDistillDataset", "inputs": {
             "prompt_1": ["disc", 0], "empty_prompt": ["empty", 0], "width": 100, "height": 64}}), "report",
         ("width", "100", "96"), "Use multiples of 8 pixels; the report says the size it trained at.",
         needs=("demo",)),
    Case("resume_with_fewer_steps", "Stride Distill LoRA", "resume a 2-step checkpoint with steps = 1",
         train("reliability_noop", TRAINING_LATENTS, steps=1), "report", ("resume", "already had 2 steps", "nothing"),
         "Raise steps to train further, or set resume off to start again.",
         setup=train_first_steps("reliability_noop", 2), needs=("demo",)),
    Case("save_name_trailing_newline", "Stride Save LoRA", "file_name 'lora\\n.safetensors' (a newline before the "
         "suffix)", save_as("reliability_newline\n.safetensors"), "execution", ("file_name", "not a plain file name"),
         "Type the name without line breaks.", verify=no_file_named("reliability_newline\n.safetensors"),
         needs=("demo",)),
    Case("save_name_too_long", "Stride Save LoRA", "a 200-character file_name", save_as("a" * 200), "execution",
         ("file_name", "at most", "characters"), "Shorten the name (the limit is stated in the message).",
         needs=("demo",)),
    Case("reload_lora_of_another_model", "Stride Reload Saved LoRA", "a LoRA none of whose layers the model has",
         reload_onto_demo("reliability_other_model.safetensors"), "execution", ("lora_name", "matches a layer"),
         "Load the LoRA onto the model it was made for.",
         setup=stride_lora_variant("reliability_other_model.safetensors", renamed_modules(1.0)), needs=("demo",)),
    Case("reload_lora_without_lora_keys", "Stride Reload Saved LoRA", "a safetensors file without LoRA weights",
         reload_onto_demo("reliability_not_lora.safetensors"), "execution", ("lora_name", "no LoRA weights"),
         "Choose a LoRA file (lora_up/lora_down or lora_A/lora_B weights).",
         setup=stride_lora_variant("reliability_not_lora.safetensors", no_lora_keys), needs=("demo",)),
    Case("reload_lora_wrong_shapes", "Stride Reload Saved LoRA", "a LoRA whose weights have other shapes",
         reload_onto_demo("reliability_wrong_shapes.safetensors"), "execution", ("lora_name", "shape"),
         "The LoRA is for a model of another size: load it onto the model it was made for.",
         setup=stride_lora_variant("reliability_wrong_shapes.safetensors", wrong_shapes), needs=("demo",)),
    Case("reload_lora_partly_matching", "Stride Reload Saved LoRA", "a LoRA half of whose layers the model has",
         reload_onto_demo("reliability_half.safetensors", report=True), "report", ("loaded", "of", "layers"),
         "Check that the LoRA was made for this model; the report lists what was left out.",
         setup=stride_lora_variant("reliability_half.safetensors", renamed_modules(0.5)), needs=("demo",)),
    Case("reload_lora_of_another_base", "Stride Reload Saved LoRA", "a Stride LoRA distilled from another base model",
         reload_onto_demo("reliability_other_base.safetensors", report=True), "report", ("fingerprint",),
         "Load the LoRA onto the base model it was distilled from (the report says it differs).",
         setup=stride_lora_variant("reliability_other_base.safetensors", other_fingerprint), needs=("demo",)),
]


# ------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # "validation", "execution" or "report" (success)
    message: str
    exception_type: str = ""


def outcome_in_process(host, graph: dict) -> Outcome:
    valid, error, _, node_errors = host.validate(graph)
    if not valid:
        return Outcome("validation", validation_message(error, node_errors))
    result = host.run(graph)
    if result.success:  # the text output nodes showed (Preview as Text, report outputs)
        texts = [text for ui in result.outputs.values() for text in ui.get("text", []) if isinstance(text, str)]
        return Outcome("report", " | ".join(texts))
    error = result.error()
    assert error is not None, result.messages
    return Outcome("execution", error["exception_message"].strip(), error["exception_type"])


def good_prompt(index: int) -> dict:
    return sampling_graph(seed=1000 + index, prefix="reliability_after")


def check_message(case: Case, outcome: Outcome) -> None:
    assert outcome.kind == case.outcome, f"{case.id}: expected a {case.outcome} error, got {outcome}"
    for word in case.words:
        assert word in outcome.message, f"{case.id}: {word!r} missing from: {outcome.message}"
    for word in case.absent:
        assert word not in outcome.message, f"{case.id}: misleading {word!r} in: {outcome.message}"
    raw = [marker for marker in RAW_MESSAGES if marker in outcome.message]
    assert not raw, f"{case.id}: raw error text {raw} in: {outcome.message}"
    if case.outcome == "execution":
        assert outcome.exception_type.endswith("StrideError"), f"{case.id}: {outcome.exception_type}: {outcome.message}"


MESSAGES: dict[str, str] = {}


@pytest.fixture(scope="module")
def context(fault_host, tmp_path_factory) -> Context:
    folder_paths = fault_host.folder_paths
    return Context(host=fault_host, loras=Path(folder_paths.get_folder_paths("loras")[0]),
                   checkpoints=Path(folder_paths.get_output_directory()) / "stride_checkpoints",
                   outside=tmp_path_factory.mktemp("outside"), rescan=folder_paths.filename_list_cache.clear)


@pytest.fixture(scope="module")
def tiny_flux(context):
    """A tiny FLUX.1 MODEL node and adapters (one matching it, one for a wider model, a plain LoRA)."""
    with tiny_flux_installed(context.host, context.loras):
        yield


def params(cases: list[Case]) -> list:
    """Cases as pytest parameters; a case whose fix is pending is a strict xfail (it fails the suite once it passes)."""
    return [pytest.param(case, id=case.id,
                         marks=[pytest.mark.xfail(reason=case.xfail, strict=True)] if case.xfail else [])
            for case in cases]


@pytest.mark.parametrize("case", params(CASES))
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


@pytest.mark.parametrize("case", params(SERVER_CASES))
def test_bad_input_through_the_server(case, comfy_server, tmp_path):
    context = Context(host=comfy_server, loras=comfy_server.base_dir / "models" / "loras",
                      checkpoints=comfy_server.base_dir / "output" / "stride_checkpoints", outside=tmp_path,
                      rescan=lambda: None)  # the server rescans a folder whose modification time changed
    if case.setup is not None:
        case.setup(context)
    before = snapshot(comfy_server.base_dir, skip=(*STAYS_INSIDE, "server.log", "user"))
    graph = case.graph(context)
    answer = comfy_server.queue(graph)
    if "prompt_id" not in answer:
        assert answer.get("http_status") == 400, answer
        outcome = Outcome("validation", validation_message(answer.get("error", {}), answer.get("node_errors", {})))
    else:  # queued once: follow it in the history
        entry = comfy_server._history_entry(answer["prompt_id"], timeout=300)
        if entry.get("status", {}).get("status_str") == "success":
            texts = [text for ui in entry.get("outputs", {}).values() for text in ui.get("text", [])
                     if isinstance(text, str)]
            outcome = Outcome("report", " | ".join(texts))
        else:
            messages = entry["status"].get("messages", [])
            error = next((data for event, data in messages if event == "execution_error"), {})
            outcome = Outcome("execution", error.get("exception_message", "").strip(), error.get("exception_type", ""))
    check_message(case, outcome)
    assert not changed_files(before, snapshot(comfy_server.base_dir, skip=(*STAYS_INSIDE, "server.log", "user")))
    after = comfy_server.run(good_prompt(CASES.index(case)))
    assert after.success, after.messages[-3:]


# ------------------------------------------------------------------------------------------
# docs/TROUBLESHOOTING.md: the catalogue with the messages users see
# ------------------------------------------------------------------------------------------
DOC_CASES = [case for case in CASES if not case.xfail]


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
    for case in DOC_CASES:
        lines.append(f"| {case.node} | {cell(case.wrong)} | {case.outcome} | {cell(messages[case.id])} | "
                     f"{cell(case.hint)} |")
    return "\n".join(lines) + "\n"


def test_troubleshooting_doc_is_current(context):
    missing = [case.id for case in DOC_CASES if case.id not in MESSAGES]
    if missing:
        pytest.skip(f"run the whole catalogue to compare the doc ({len(missing)} cases not run)")
    text = troubleshooting_markdown(MESSAGES, str(context.host.base_dir))
    if os.environ.get("STRIDE_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, \
        "docs/TROUBLESHOOTING.md is out of date: rerun with STRIDE_WRITE_DOCS=1"
