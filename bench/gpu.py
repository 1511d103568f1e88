"""Full-size architectures on CUDA: sampler step time, overhead and VRAM; pi-Flow rollout overhead.

The sampler benchmark of ``sampler_overhead`` on real architectures: ComfyUI's SD1.5 UNet on a
4x64x64 latent and SDXL UNet on a 4x128x128 latent (the full configurations of ComfyUI's model
tables, random weights) in float16 and bfloat16, each sampler through ComfyUI's SamplerCustom
path at 4 steps. Per sampler: whole step time and own time (outside the model call) as ratios
to ComfyUI euler's, and the peak memory of a sampling call (``torch.cuda.max_memory_allocated``).
Then the pi-Flow rollout of ``piflow_overhead`` against full-size SD1.5 and FLUX.1 forwards.
Without CUDA (``--device cpu``) the same code runs tiny float32 variants of every network: a
functional check that keeps this benchmark working, whose numbers say nothing about GPUs.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from . import models, piflow_overhead
from .context import BenchContext
from .harness import (
    Goal,
    Section,
    Table,
    check,
    cuda_sync_for,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    median,
    peak_rss_growth,
    run_interleaved,
)
from .samplers import (
    COMFY_EULER,
    OVERHEAD_BUILTINS,
    STRIDE_HYPER,
    STRIDE_SAMPLERS,
    SamplerTiming,
    sample,
    timed_sampler,
)

NAME = "gpu"
TITLE = "Full-size SD1.5 / SDXL / FLUX.1 on CUDA: sampler step time, overhead, VRAM; pi-Flow rollout"
STEPS = 4
SEED = 0
SAMPLERS = OVERHEAD_BUILTINS + STRIDE_SAMPLERS
GOAL_RATIO = 1.1
# Stride DDIM vs ComfyUI euler on the same sigmas, relative to the samples' scale.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def configurations(device: torch.device) -> list[tuple[str, dict, tuple[int, ...], torch.dtype]]:
    """``(arch, unet config, latent shape, dtype)`` for this device."""
    if device.type == "cuda":
        return [(arch, models.unet_config(arch), shape, dtype)
                for arch, shape in (("sd15", (1, 4, 64, 64)), ("sdxl", (1, 4, 128, 128)))
                for dtype in (torch.float16, torch.bfloat16)]
    tiny = {"reduced_depth": True, "model_channels": 32, "context_dim": 64}
    return [(arch, models.unet_config(arch, **tiny), (1, 4, 8, 8), torch.float32) for arch in ("sd15", "sdxl")]


def device_text(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{name}, {str(dtype).removeprefix('torch.')}"


def peak_memory(device: torch.device, fn) -> int:
    """Peak bytes of one call: CUDA allocator peak on GPU, peak RSS growth on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_growth(fn)[1]


def release_models() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(ctx: BenchContext) -> Section:
    device = ctx.device
    repeats = ctx.pick(2, 5, 10)
    sync = cuda_sync_for(device)
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    if device.type != "cuda":
        section.notes.append("No CUDA device: this run used the tiny float32 CPU variants (functional check only).")
    memory_kind = "VRAM peak (max_memory_allocated)" if device.type == "cuda" else "peak RSS growth"
    table = Table(f"Sampler step through ComfyUI at {STEPS} steps, batch 1, median of {repeats} interleaved repeats",
                  ["compared", "model", "device, dtype", "step ratio vs euler", "own-time ratio vs euler",
                   "step time", "own time / step", "euler step / own", memory_kind])
    worst: dict[str, float] = {spec.label: 0.0 for spec in STRIDE_SAMPLERS}
    for arch, config, shape, dtype in configurations(device):
        model = models.unet_model(arch, config, device, dtype, SEED)
        description = models.describe_unet(arch, config, model.model.diffusion_model)
        ctx.log(f"{NAME}: {description}, {device_text(device, dtype)}")
        conditioning = models.unet_conditioning(arch, config, SEED)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
        built = {spec.label: spec.build(ctx, model, STEPS) for spec in SAMPLERS}
        section.checks.append(_check(ctx, description, dtype, model, built, noise, conditioning))
        memory = {name: peak_memory(device, functools.partial(sample, model, sampler, sigmas, noise, conditioning,
                                                              conditioning, seed=SEED))
                  for name, (sampler, sigmas) in built.items()}
        candidates = {name: _candidate(model, sampler, sigmas, noise, conditioning, sync)
                      for name, (sampler, sigmas) in built.items()}
        timings = run_interleaved(candidates, repeats, sync=sync)
        own = {name: median(values["own"]) / STEPS for name, values in timings.items()}
        step = {name: median(values["wall"]) / STEPS for name, values in timings.items()}
        euler = COMFY_EULER.label
        for spec in SAMPLERS:
            name = spec.label
            if spec in STRIDE_SAMPLERS:
                worst[name] = max(worst[name], own[name] / own[euler])
            compared = f"{name} (baseline)" if spec is COMFY_EULER else f"{name} vs {euler}"
            table.add(compared, description, device_text(device, dtype), fmt_ratio(step[name] / step[euler]),
                      fmt_ratio(own[name] / own[euler]), fmt_seconds(step[name]), fmt_seconds(own[name]),
                      f"{fmt_seconds(step[euler])} / {fmt_seconds(own[euler])}", fmt_bytes(memory[name]))
        del model, built, candidates
        release_models()
    section.tables.append(table)
    if device.type == "cuda":
        section.goals += [Goal(f"{name}: own time per step <= {GOAL_RATIO}x ComfyUI euler's (full-size UNets)",
                               "met" if ratio <= GOAL_RATIO else "missed", f"worst {fmt_ratio(ratio)}")
                          for name, ratio in worst.items()]
    _piflow(ctx, section, device, repeats)
    return section


def _candidate(model, sampler, sigmas, noise, conditioning, sync):
    timing = SamplerTiming()
    timed = timed_sampler(sampler, timing, sync)

    def run_once() -> dict[str, float]:
        sample(model, timed, sigmas, noise, conditioning, conditioning, seed=SEED)
        return {"own": timing.own}

    return run_once


def _check(ctx: BenchContext, description: str, dtype: torch.dtype, model: Any, built, noise, conditioning) -> str:
    tolerance = RELATIVE_TOLERANCE[dtype]
    for name, (sampler, sigmas) in built.items():
        timing = SamplerTiming()
        plain = sample(model, sampler, sigmas, noise, conditioning, conditioning, seed=SEED)
        timed = sample(model, timed_sampler(sampler, timing), sigmas, noise, conditioning, conditioning, seed=SEED)
        scale = float(plain.abs().max())
        check(bool(torch.isfinite(plain).all()), f"{name} on {description}: NaN or inf in the samples")
        check(float((plain - timed).abs().max()) <= tolerance * scale,
              f"{name} on {description}: timing the sampler changed its output")
        check(timing.calls == STEPS, f"{name} on {description}: {timing.calls} model calls for {STEPS} steps")
    euler, sigmas = built[COMFY_EULER.label]
    ddim, _ = built[STRIDE_HYPER.label]
    ours = sample(model, ddim, sigmas, noise, conditioning, conditioning, seed=SEED)
    theirs = sample(model, euler, sigmas, noise, conditioning, conditioning, seed=SEED)
    relative = float((ours - theirs).abs().max()) / float(theirs.abs().max())
    check(relative <= tolerance, f"{description}: Stride DDIM differs from ComfyUI euler by {relative:.2e} (relative)")
    return (f"{description} ({str(dtype).removeprefix('torch.')}): every sampler finite, {STEPS} model calls, timed == "
            f"untimed; Stride DDIM == ComfyUI euler on the same sigmas (relative difference {relative:.1e})")


def _piflow(ctx: BenchContext, section: Section, device: torch.device, repeats: int) -> None:
    dtype, size = (torch.bfloat16, "full") if device.type == "cuda" else (torch.float32, "tiny")
    results = []
    for build in (piflow_overhead.sd15_network, piflow_overhead.flux_network):
        network = build(size, device, dtype)
        ctx.log(f"{NAME}: pi-Flow rollout vs {network.description}")
        results.append(piflow_overhead.measure(network, device, repeats))
        del network
        release_models()
    section.tables.append(piflow_overhead.results_table(results, device_text(device, dtype), repeats))
    if device.type == "cuda":
        section.goals += [piflow_overhead.goal_for(result) for result in results]
    section.checks.append("pi-Flow: network outputs finite with the latent's shape; rollout finite; GM policy "
                          "consistent at its source")
