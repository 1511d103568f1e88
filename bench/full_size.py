"""Full-size SD1.5 and SDXL: sampling own time, the distillation step against its passes and TrainLoraNode.

Every ratio in the other benchmarks comes from small networks, where fixed costs weigh more. Here the networks are
ComfyUI's own full SD1.5 UNet (860M parameters) and SDXL UNet (2.6B), random weights, through the same paths:

* **SD1.5 sampling at 512 px** (4x64x64 latent, batch 1, 4 steps, CFG 1): each Stride sampler's own time per step
  (outside the model call) against ComfyUI's euler and lcm, through ComfyUI's SamplerCustom path.
* **SD1.5 distillation at 32x32 latents**: our LCM step (``DistillTrainer.train_step``) against the sum of the
  passes it needs, each timed alone on the same batch (teacher cond+uncond in one call, target, student
  forward + backward); then Stride's node against ComfyUI's TrainLoraNode (plain LoRA: one forward + backward per
  step), step time and peak memory, with and without gradient checkpointing.
* **SDXL**: one sampling step (euler and Stride LCM) and one distillation step with its memory, in bfloat16 (its
  float32 weights alone take 10.3 GB, and a training step at 1024 px needs several times its weights' size in
  activations: more than a 24 GB card holds).

On CUDA: SD1.5 in float16 and SDXL in bfloat16, SDXL at 1024 px (4x128x128). On a CPU (``--full-size``): SD1.5 in
float32, SDXL with bfloat16 weights cast to float32 layer by layer (what ComfyUI does on a CPU) at 4x32x32, and
fewer samplers; ``--quick`` runs the SD1.5 rows without the node comparison. The smoke tier runs tiny variants.
Run time of the CPU tier: 16.5 minutes on 2 idle AMD EPYC cores, 1 torch thread, 12 GB of RAM at the peak
(2026-12-02).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import models, training
from .context import BenchContext
from .gpu import peak_memory, release_models
from .harness import Section, Table, check, cuda_sync_for, fmt_bytes, fmt_ratio, fmt_seconds, median, run_interleaved
from .samplers import (
    COMFY_EULER,
    COMFY_LCM,
    STRIDE_LCM,
    STRIDE_SAMPLERS,
    STRIDE_TCD,
    SamplerTiming,
    sample,
    timed_sampler,
)

NAME = "full_size"
TITLE = "Full-size SD1.5 and SDXL: sampler own time, distillation step vs its passes and vs TrainLoraNode"
SEED = 0
STEPS = 4
BATCH = 1


@dataclass(frozen=True)
class Setup:
    """What runs where: the networks, their dtypes (weights, manual cast) and latent sides."""

    sd15: dict
    sdxl: dict
    sd15_dtype: tuple[torch.dtype, torch.dtype | None]
    sdxl_dtype: tuple[torch.dtype, torch.dtype | None]
    sample_side: int
    distill_side: int
    sdxl_side: int
    samplers: tuple
    nodes: bool
    sdxl_rows: bool


def setup(ctx: BenchContext) -> Setup:
    cuda = ctx.device.type == "cuda"
    if ctx.tier == "smoke":
        tiny = {"reduced_depth": True, "model_channels": 32, "context_dim": 64}
        return Setup(models.unet_config("sd15", **tiny), models.unet_config("sdxl", **tiny), (torch.float32, None),
                     (torch.bfloat16, torch.float32), 8, 8, 8, (COMFY_EULER, COMFY_LCM, STRIDE_LCM), True, True)
    samplers = (COMFY_EULER, COMFY_LCM, *STRIDE_SAMPLERS) if cuda else (COMFY_EULER, COMFY_LCM, STRIDE_LCM, STRIDE_TCD)
    return Setup(models.unet_config("sd15"), models.unet_config("sdxl"),
                 (torch.float16, None) if cuda else (torch.float32, None),
                 (torch.bfloat16, None) if cuda else (torch.bfloat16, torch.float32),
                 64, 32, 128 if cuda else 32, samplers, ctx.tier == "full", ctx.tier == "full")


def where(device: torch.device, dtypes: tuple[torch.dtype, torch.dtype | None]) -> str:
    """``CPU, float32`` or ``<GPU name>, bfloat16 weights, float32 compute``."""
    weight, compute = (str(dtype).removeprefix("torch.") if dtype else None for dtype in dtypes)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{name}, {weight}" + (f" weights, {compute} compute" if compute else "")


def build(ctx: BenchContext, arch: str, config: dict, dtypes: tuple[torch.dtype, torch.dtype | None]) -> Any:
    """A ComfyUI MODEL of ``arch`` with seeded random weights in ``dtypes[0]``, manually cast to ``dtypes[1]``."""
    return models.unet_model(arch, config, ctx.device, dtypes[0], SEED, manual_cast=dtypes[1])


def run(ctx: BenchContext) -> Section:
    plan = setup(ctx)
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    if ctx.tier == "smoke":
        section.notes.append("Smoke tier: tiny SD1.5/SDXL-layout UNets (functional check; the numbers mean nothing).")
    section.tables.append(_sampling(ctx, section, plan))
    section.tables += _distillation(ctx, section, plan)
    if plan.sdxl_rows:
        section.tables.append(_sdxl(ctx, section, plan))
    return section


# -- SD1.5 sampling ----------------------------------------------------------------------------------------------
def _sampling(ctx: BenchContext, section: Section, plan: Setup) -> Table:
    repeats = ctx.pick(1, 1, 2)
    sync = cuda_sync_for(ctx.device)
    model = build(ctx, "sd15", plan.sd15, plan.sd15_dtype)
    description = models.describe_unet("sd15", plan.sd15, model.model.diffusion_model)
    place = where(ctx.device, plan.sd15_dtype)
    conditioning = models.unet_conditioning("sd15", plan.sd15, SEED)
    noise = torch.randn((BATCH, 4, plan.sample_side, plan.sample_side), generator=torch.Generator().manual_seed(SEED))
    built = {spec.label: spec.build(ctx, model, STEPS) for spec in plan.samplers}
    timings: dict[str, SamplerTiming] = {name: SamplerTiming() for name in built}

    def candidate(name: str):
        sampler, sigmas = built[name]

        def run_once() -> dict[str, float]:
            out = sample(model, timed_sampler(sampler, timings[name], sync), sigmas, noise, conditioning,
                         conditioning, seed=SEED)
            check(bool(torch.isfinite(out).all()), f"{name} on {description}: NaN or inf in the samples")
            check(timings[name].calls == STEPS, f"{name}: {timings[name].calls} model calls for {STEPS} steps")
            return {"own": timings[name].own, "model": timings[name].model}

        return run_once

    ctx.log(f"{NAME}: sampling {description} at {plan.sample_side}x{plan.sample_side} latents, {len(built)} samplers")
    measured = run_interleaved({name: candidate(name) for name in built}, repeats, warmup=0, sync=sync)
    own = {name: median(values["own"]) / STEPS for name, values in measured.items()}
    step = {name: median(values["wall"]) / STEPS for name, values in measured.items()}
    section.checks.append(f"SD1.5 sampling: every sampler finite with {STEPS} model calls for {STEPS} steps")
    table = Table(f"Sampling {description} at {8 * plan.sample_side} px ({plan.sample_side}x{plan.sample_side} "
                  f"latent), batch {BATCH}, {STEPS} steps, CFG 1, through ComfyUI's SamplerCustom path; own time = "
                  f"outside the model calls, median of {repeats}",
                  ["compared", "device, dtype", "own time vs ComfyUI euler", "own time vs ComfyUI lcm",
                   "step time vs euler", "own time / step", "step time", "euler / lcm own time per step"])
    euler, lcm = COMFY_EULER.label, COMFY_LCM.label
    for spec in plan.samplers:
        name = spec.label
        table.add(name if spec in (COMFY_EULER, COMFY_LCM) else f"{name} vs ComfyUI", place,
                  fmt_ratio(own[name] / own[euler]), fmt_ratio(own[name] / own[lcm]),
                  fmt_ratio(step[name] / step[euler]), fmt_seconds(own[name]), fmt_seconds(step[name]),
                  f"{fmt_seconds(own[euler])} / {fmt_seconds(own[lcm])}")
    release_models()
    return table


# -- SD1.5 distillation ------------------------------------------------------------------------------------------
def _trainer(ctx: BenchContext, rig: training.Rig, arch: str, config: dict, side: int, batch: int):
    from distill_core.training.config import DistillConfig, TrainingData
    from distill_core.training.trainer import DistillTrainer

    shape = (4, side, side)
    conds = ctx.stride_module("nodes.training").model_conds
    positive = models.unet_conditioning(arch, config, SEED)
    empty = [[torch.zeros_like(positive[0][0]), dict(positive[0][1])]]
    latents = torch.randn(max(4, 2 * batch), *shape, generator=torch.Generator().manual_seed(SEED))
    data = TrainingData(conds=[conds(rig.model, positive, shape)], uncond=conds(rig.model, empty, shape),
                        latents=latents.to(ctx.device))
    config_ = DistillConfig(objective="lcm", rank=training.RANK, batch=batch, skip_small_layers=True, seed=SEED)
    return DistillTrainer(rig.denoise, rig.loraset, training.noise_space(ctx, rig.model), config_, data), positive, \
        empty, latents


def _step_against_passes(ctx: BenchContext, section: Section, model: Any, arch: str, config: dict, side: int,
                         setting: str, where: str) -> tuple[list[str], training.Rig]:
    """Our step vs the sum of its passes on the same batch; returns the row and the rig (LoRA still attached)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    rig = training.attach(model)
    trainer, *_ = _trainer(ctx, rig, arch, config, side, BATCH)
    sync = cuda_sync_for(ctx.device)
    with training.training(rig):
        passes = training.Passes(rig, trainer, training.step_inputs(trainer, 0))
        from_passes = float(passes.student_pass())
        with torch.no_grad():
            from_trainer = float(trainer.batch_loss(0))
        difference = abs(from_passes - from_trainer) / abs(from_trainer)
        check(difference <= 1e-3, f"{setting}: the timed passes' loss is {difference:.1e} away from batch_loss")
        ctx.log(f"{NAME}: distillation step vs its passes on {setting}")
        timings = run_interleaved({"teacher": passes.teacher_pass, "target": passes.target_pass,
                                   "student": passes.student_pass, "ours": lambda: trainer.train_step(0)},
                                  ctx.pick(1, 1, 2), warmup=0, sync=sync)
    section.checks.append(f"{setting}: the separately timed passes compute DistillTrainer.batch_loss's loss (relative "
                          f"difference {difference:.1e})")
    seconds = {name: median(values["wall"]) for name, values in timings.items()}
    limit = seconds["teacher"] + seconds["target"] + seconds["student"]
    row = ["our step (DistillTrainer.train_step) vs sum of the passes", setting, where,
           fmt_ratio(seconds["ours"] / limit), fmt_seconds(seconds["ours"]), fmt_seconds(limit),
           fmt_seconds(seconds["teacher"]), fmt_seconds(seconds["target"]), fmt_seconds(seconds["student"])]
    return row, rig


PASSES_COLUMNS = ["compared", "model, latent, batch", "device, dtype", "ratio (wall time)", "our step", "sum of passes",
                  "teacher (cond+uncond, 1 call)", "target", "student fwd+bwd"]


def _distillation(ctx: BenchContext, section: Section, plan: Setup) -> list[Table]:
    model = build(ctx, "sd15", plan.sd15, plan.sd15_dtype)
    side = plan.distill_side
    setting = (f"{models.describe_unet('sd15', plan.sd15, model.model.diffusion_model)}, 4x{side}x{side} latent, "
               f"batch {BATCH}, LoRA rank {training.RANK}")
    row, rig = _step_against_passes(ctx, section, model, "sd15", plan.sd15, side, setting, where(ctx.device,
                                                                                                  plan.sd15_dtype))
    rig.loraset.remove()
    release_models()
    passes = Table(f"SD1.5 LCM distillation step vs the passes it needs, each timed alone on the same batch (wall "
                   f"time, median of {ctx.pick(1, 1, 2)})", PASSES_COLUMNS)
    passes.add(*row)
    tables = [passes]
    if plan.nodes:
        tables.append(_nodes(ctx, section, plan, setting))
    return tables


def _nodes(ctx: BenchContext, section: Section, plan: Setup, setting: str) -> Table:
    side, steps = plan.distill_side, ctx.pick(2, 2, 3)
    positive = models.unet_conditioning("sd15", plan.sd15, SEED)
    empty = [[torch.zeros_like(positive[0][0]), {}]]
    latents = torch.randn(2 * BATCH, 4, side, side, generator=torch.Generator().manual_seed(SEED))
    training_dtype = "fp32" if plan.sd15_dtype[0] == torch.float32 else "bf16"
    table = Table(f"StrideDistillLoRA (LCM distillation: teacher + target + student per step) vs ComfyUI TrainLoraNode "
                  f"(plain LoRA: one forward + backward per step) on {setting}, each node called as the executor calls "
                  f"it; step time = median wall time between progress updates over {steps} steps, memory = peak of a "
                  f"whole node call ({'max_memory_allocated' if ctx.device.type == 'cuda' else 'RSS growth'})",
                  ["compared", "gradient checkpointing", "device, dtype", "step time ratio", "memory ratio", "our step",
                   "TrainLoraNode step", "peak memory (ours / TrainLoraNode)"])
    for checkpointing in (False, True):
        compared = training.compare_nodes(
            ctx, section, lambda: build(ctx, "sd15", plan.sd15, plan.sd15_dtype), positive, empty, latents, BATCH,
            steps, 1, checkpointing, training_dtype, lambda fn: peak_memory(ctx.device, fn))
        ours, theirs = compared.peak("ours"), compared.peak("comfy")
        table.add("StrideDistillLoRA vs TrainLoraNode", "on" if checkpointing else "off",
                  where(ctx.device, plan.sd15_dtype), fmt_ratio(compared.ratio("wall")), fmt_ratio(ours / theirs),
                  fmt_seconds(compared.step("ours", "wall")), fmt_seconds(compared.step("comfy", "wall")),
                  f"{fmt_bytes(ours)} / {fmt_bytes(theirs)}")
        release_models()
    section.notes.append(training.TRAIN_LORA_NOTE + f" TrainLoraNode trains in {training_dtype}, its LoRA in fp32.")
    return table


# -- SDXL --------------------------------------------------------------------------------------------------------
def _sdxl(ctx: BenchContext, section: Section, plan: Setup) -> Table:
    sync = cuda_sync_for(ctx.device)
    side = plan.sdxl_side
    model = build(ctx, "sdxl", plan.sdxl, plan.sdxl_dtype)
    description = models.describe_unet("sdxl", plan.sdxl, model.model.diffusion_model)
    place = where(ctx.device, plan.sdxl_dtype)
    conditioning = models.unet_conditioning("sdxl", plan.sdxl, SEED)
    noise = torch.randn((BATCH, 4, side, side), generator=torch.Generator().manual_seed(SEED))
    table = Table(f"{description}: one sampling step and one LCM distillation step at {8 * side} px "
                  f"({side}x{side} latent), batch {BATCH}",
                  ["compared", "device, dtype", "time", "own time", "peak memory"])
    ctx.log(f"{NAME}: SDXL sampling step and distillation step at {side}x{side}")
    for spec in (COMFY_EULER, STRIDE_LCM):
        sampler, sigmas = spec.build(ctx, model, 1)
        timing = SamplerTiming()

        def one_step(sampler: Any = sampler, sigmas: torch.Tensor = sigmas, timing: SamplerTiming = timing) -> None:
            out = sample(model, timed_sampler(sampler, timing, sync), sigmas, noise, conditioning, conditioning,
                         seed=SEED)
            check(bool(torch.isfinite(out).all()), "SDXL sampling step: NaN or inf")

        memory = peak_memory(ctx.device, one_step)
        table.add(f"one sampling step, {spec.label}", place, fmt_seconds(timing.total), fmt_seconds(timing.own),
                  fmt_bytes(memory))
    setting = f"{description}, 4x{side}x{side} latent, batch {BATCH}"
    row, rig = _step_against_passes(ctx, section, model, "sdxl", plan.sdxl, side, setting, place)
    trainer, *_ = _trainer(ctx, rig, "sdxl", plan.sdxl, side, BATCH)
    with training.training(rig):
        trainer.train_step(0)  # AdamW's state exists before the measured step
        memory = peak_memory(ctx.device, lambda: trainer.train_step(1))
    rig.loraset.remove()
    table.add("one distillation step (teacher + target + student fwd+bwd + AdamW)", place, row[4], "",
              fmt_bytes(memory))
    table.add("  vs the sum of its passes", place, f"{row[3]} ({row[5]})", "", "")
    section.checks.append(f"SDXL: both samplers finite after one step; {setting}: the step's passes reproduce its loss")
    release_models()
    return table
