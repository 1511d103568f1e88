"""Per-step overhead of each sampler: the time its function spends outside model calls.

Every sampler runs through ComfyUI's SamplerCustom path with its function wrapped so that the
model it receives is timed (``bench.samplers.timed_sampler``): own time = time inside the
sampler function minus time inside model calls. Three settings: the demo UNet on its 4x8x8
latent (model time subtracted), and a zero-cost network (predicts zero noise) on the demo's
4x8x8 latent and on an SDXL-size 4x128x128 latent, where almost all of the call is overhead.
The issue's goal is own time per step <= 1.1x ComfyUI euler's. ComfyUI's lcm and
euler_ancestral, which draw fresh noise every step like Stride's samplers do, are shown too.
"""
from __future__ import annotations

import cProfile
import pstats
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import models
from .context import BenchContext
from .harness import REPO_ROOT, Goal, Section, Table, check, fmt_ratio, fmt_seconds, median, run_interleaved, spread
from .samplers import (
    COMFY_EULER,
    COMFY_LCM,
    OVERHEAD_BUILTINS,
    STRIDE_HYPER,
    STRIDE_SAMPLERS,
    SamplerTiming,
    sample,
    timed_sampler,
)

NAME = "sampler_overhead"
TITLE = "Sampler overhead per step (time outside the model call) vs ComfyUI euler"
STEPS = 4
GOAL_RATIO = 1.1
SEED = 0
SAMPLERS = OVERHEAD_BUILTINS + STRIDE_SAMPLERS
EXACTNESS_TOLERANCE = 1e-4


def settings(ctx: BenchContext) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``(label, MODEL, latent shape)`` of each setting."""
    demo_model, trained = models.demo_unet_model(ctx)
    zero_cost = models.zero_cost_model(ctx)
    big = ctx.pick((1, 4, 32, 32), (1, 4, 128, 128), (1, 4, 128, 128))
    return [
        (f"demo UNet ({'trained' if trained else 'random weights'}), 4x8x8 latent, batch 1", demo_model, (1, 4, 8, 8)),
        ("zero-cost network, 4x8x8 latent, batch 1", zero_cost, (1, 4, 8, 8)),
        (f"zero-cost network, {'x'.join(map(str, big[1:]))} latent, batch 1", zero_cost, big),
    ]


def run(ctx: BenchContext) -> Section:
    repeats = ctx.pick(3, 9, 25)
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    table = Table(f"Own time per step ({STEPS}-step runs through ComfyUI's SamplerCustom path), median of {repeats} "
                  "interleaved repeats",
                  ["compared", "model, latent", "device, dtype", "own-time ratio vs euler", "vs ComfyUI lcm",
                   "own time / step", "euler own time / step", "whole call / step (ratio vs euler)", "spread"])
    positive, negative = models.class_prompt(ctx, "disc"), models.class_prompt(ctx, "")
    ratios: dict[str, list[tuple[str, float]]] = {spec.label: [] for spec in STRIDE_SAMPLERS}
    for label, model, shape in settings(ctx):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
        built = {spec.label: spec.build(ctx, model, STEPS) for spec in SAMPLERS}
        section.checks.append(_check_setting(ctx, label, model, built, noise, positive, negative))
        candidates = {spec.label: _candidate(model, *built[spec.label], noise, positive, negative) for spec in SAMPLERS}
        ctx.log(f"{NAME}: timing {label}")
        timings = run_interleaved(candidates, repeats)
        own = {name: median(values["own"]) / STEPS for name, values in timings.items()}
        wall = {name: median(values["wall"]) / STEPS for name, values in timings.items()}
        euler = COMFY_EULER.label
        for spec in SAMPLERS:
            if spec is COMFY_EULER:
                continue
            ratio = own[spec.label] / own[euler]
            if spec in STRIDE_SAMPLERS:
                ratios[spec.label].append((label, ratio))
            table.add(f"{spec.label} vs {euler}", label, "CPU, float32", fmt_ratio(ratio),
                      fmt_ratio(own[spec.label] / own[COMFY_LCM.label]), fmt_seconds(own[spec.label]),
                      fmt_seconds(own[euler]),
                      f"{fmt_seconds(wall[spec.label])} ({fmt_ratio(wall[spec.label] / wall[euler])})",
                      f"+-{100 * spread(timings[spec.label]['own']):.0f}%")
        if "zero-cost" in label:
            section.notes.append(_hotspots(ctx, label, model, built, noise, positive, negative))
    section.tables.append(table)
    for spec in STRIDE_SAMPLERS:
        worst = max(ratio for _, ratio in ratios[spec.label])
        evidence = "; ".join(f"{fmt_ratio(ratio)} on {setting}" for setting, ratio in ratios[spec.label])
        section.goals.append(Goal(f"{spec.label}: own time per step <= {GOAL_RATIO}x ComfyUI euler's",
                                  "met" if worst <= GOAL_RATIO else "missed", evidence))
    section.notes += [
        "Own time excludes the network but includes everything the sampler does per run and per step: Stride's "
        "samplers read the model's noise space once per run (a 1000-entry sigma table), look up training "
        "timesteps per step and draw fresh noise per step (euler draws none; ComfyUI lcm and euler_ancestral do).",
        "'whole call' is the complete sample_custom call divided by the steps (guider, noise scaling, latent "
        "format and the model included): what a user waits for, with a real network the model dominates it.",
        "spread = half the interquartile range of the own-time samples relative to their median.",
    ]
    return section


def _candidate(model, sampler, sigmas, noise, positive, negative) -> Callable[[], dict[str, float]]:
    timing = SamplerTiming()
    timed = timed_sampler(sampler, timing)

    def run_once() -> dict[str, float]:
        sample(model, timed, sigmas, noise, positive, negative, seed=SEED)
        return {"own": timing.own, "model": timing.model}

    return run_once


def _check_setting(ctx: BenchContext, label: str, model, built, noise, positive, negative) -> str:
    """Timing must not change results; every sampler must be finite and call the model once per step;
    on the real network, Stride's DDIM must reproduce ComfyUI's euler on the same sigmas."""
    for name, (sampler, sigmas) in built.items():
        timing = SamplerTiming()
        plain = sample(model, sampler, sigmas, noise, positive, negative, seed=SEED)
        timed = sample(model, timed_sampler(sampler, timing), sigmas, noise, positive, negative, seed=SEED)
        check(bool(torch.isfinite(plain).all()), f"{name} on {label}: NaN or inf in the samples")
        check(torch.equal(plain, timed), f"{name} on {label}: timing the sampler changed its output")
        check(timing.calls == STEPS, f"{name} on {label}: {timing.calls} model calls for {STEPS} steps")
    message = f"{label}: timed == untimed output for every sampler, finite, {STEPS} model calls each"
    if "zero-cost" not in label:
        euler, euler_sigmas = built[COMFY_EULER.label]
        ddim, _ = built[STRIDE_HYPER.label]
        difference = float((sample(model, ddim, euler_sigmas, noise, positive, negative, seed=SEED)
                            - sample(model, euler, euler_sigmas, noise, positive, negative, seed=SEED)).abs().max())
        check(difference < EXACTNESS_TOLERANCE, f"{label}: Stride DDIM differs from ComfyUI euler by {difference:.2e}")
        message += f"; Stride DDIM == ComfyUI euler on the same sigmas (max difference {difference:.1e})"
    return message


def _is_stride_source(filename: str) -> bool:
    path = Path(filename).resolve()
    return path.is_relative_to(REPO_ROOT) and path.parts[len(REPO_ROOT.parts)] in ("distill_core", "nodes")


def _own_time_by_function(stats: dict) -> tuple[dict[str, float], float]:
    """``({function: seconds}, own_total)`` from cProfile stats of timed sampler runs.

    A Stride function is charged its self time plus everything it calls directly outside Stride
    (torch ops and their Python wrappers), except calls that lead to the model: those run inside
    ``CallTimer.__call__`` and are not the sampler's own time. No nesting, no double counting.
    """
    model_key = next(key for key in stats if key[2] == "__call__" and key[0].endswith("harness.py"))
    leads_to_model, frontier = {model_key}, [model_key]
    while frontier:
        for caller in stats[frontier.pop()][4]:
            if caller not in leads_to_model:
                leads_to_model.add(caller)
                frontier.append(caller)
    by_function: dict[str, float] = {}

    def charge(filename: str, function: str, seconds: float) -> None:
        name = f"{Path(filename).stem}.{function}"
        by_function[name] = by_function.get(name, 0.0) + seconds

    for key, (_, _, self_time, _, callers) in stats.items():
        if _is_stride_source(key[0]):
            charge(key[0], key[2], self_time)
        elif key not in leads_to_model:
            for caller, edge in callers.items():
                if _is_stride_source(caller[0]):
                    charge(caller[0], caller[2], edge[3])
    total = sum(row[3] for key, row in stats.items() if key[2] == "timed_function")
    return by_function, total - stats[model_key][3]


def _hotspots(ctx: BenchContext, label: str, model, built, noise, positive, negative) -> str:
    """Where Stride's own time goes: a cProfile of each Stride sampler in one setting, as shares of
    the sampler's own time (profiling inflates Python code, so shares are indicative)."""
    parts = []
    runs = ctx.pick(10, 100, 200)
    for spec in STRIDE_SAMPLERS:
        sampler, sigmas = built[spec.label]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(runs):
            sample(model, timed_sampler(sampler, SamplerTiming()), sigmas, noise, positive, negative, seed=SEED)
        profiler.disable()
        by_function, own = _own_time_by_function(pstats.Stats(profiler).stats)
        top = sorted(by_function.items(), key=lambda item: item[1], reverse=True)[:4]
        rest = own - sum(seconds for _, seconds in top)
        parts.append(f"{spec.label}: " + ", ".join(f"{name} {100 * seconds / own:.0f}%" for name, seconds in top)
                     + f", rest {100 * rest / own:.0f}%")
    return (f"Where Stride's own time goes on the {label} (cProfile; a function's self time plus the torch calls "
            "it makes directly, as a share of the sampler's own time): " + "; ".join(parts) + ".")
