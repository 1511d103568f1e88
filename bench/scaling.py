"""How sampling cost grows with latent size and batch: the demo UNet under Stride's LCM sampler.

Each configuration samples 4 LCM steps through ComfyUI's SamplerCustom path (the demo UNet is
a ComfyUI ``UNetModel``, one downsampling level, so any even latent side works). Step time is
the whole call divided by the steps, timed with all configurations interleaved; memory is the
peak resident set size of the process during the call above its size just before (Linux
``VmHWM``, reset per call through ``/proc/self/clear_refs``; CPU tensors live in the process
heap, so this is what sampling needs from the OS). Training scaling is added with the training
benchmark.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from . import models
from .context import BenchContext
from .harness import (
    Section,
    Table,
    check,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    median,
    peak_rss_available,
    peak_rss_growth,
    run_interleaved,
)
from .samplers import STRIDE_HYPER, STRIDE_LCM, sample

NAME = "scaling"
TITLE = "Sampling step time and memory vs latent size and batch (demo UNet)"
STEPS = 4
SEED = 0
BATCH_TOLERANCE = 1e-4


def run(ctx: BenchContext) -> Section:
    sides = ctx.pick((8, 16), (8, 16, 32, 64), (8, 16, 32, 64))
    batches = ctx.pick((1, 2), (1, 4, 16), (1, 4, 16))
    repeats = ctx.pick(2, 2, 5)
    check(peak_rss_available(), "this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    model, trained = models.demo_unet_model(ctx)
    positive, negative = models.class_prompt(ctx, "disc"), models.class_prompt(ctx, "")
    sampler, sigmas = STRIDE_LCM.build(ctx, model, STEPS)
    configs = [(side, batch) for side in sides for batch in batches]
    noises = {(side, batch): torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(SEED))
              for side, batch in configs}

    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    section.checks.append(_check_batches(ctx, model, sides[:2], batches, noises, positive, negative))

    def candidate(key: tuple[int, int]):
        return lambda: sample(model, sampler, sigmas, noises[key], positive, negative, seed=SEED)

    memory = {}
    for key in configs:  # ascending size, so a smaller run never reuses memory a bigger one freed
        samples, memory[key] = peak_rss_growth(candidate(key))
        check(bool(torch.isfinite(samples).all()),
              f"Stride LCM on a {key[0]}x{key[0]} latent, batch {key[1]}: NaN or inf")
    section.checks.append("Stride LCM samples finite in every configuration")
    ctx.log(f"{NAME}: timing {len(configs)} configurations")
    # the memory pass above ran every configuration once: it is the warm-up
    timings = run_interleaved({key: candidate(key) for key in configs}, repeats, warmup=0)
    step = {key: median(timings[key]["wall"]) / STEPS for key in configs}

    weights = "trained weights" if trained else "random weights of the demo architecture"
    section.tables.append(scaling_table(f"Stride LCM step ({STEPS}-step runs) through ComfyUI on the demo UNet "
                                        f"({weights}), median of {repeats} interleaved repeats", configs, step, memory))
    section.plots.append(plot_step_time_memory(ctx, NAME, sides, batches, step, memory, "step time (ms)",
                                               "Demo UNet + Stride LCM through ComfyUI (CPU float32)"))
    section.notes.append("Peak RSS growth counts only memory newly requested from the OS during the call; "
                         "allocations served from memory the process already held do not show.")
    return section


def _check_batches(ctx: BenchContext, model, sides, batches, noises, positive, negative) -> str:
    """Batching must not change a sample: the deterministic DDIM path, first sample of the largest
    batch vs the same noise alone, at the given latent sides."""
    ddim, sigmas = STRIDE_HYPER.build(ctx, model, STEPS)
    largest = max(batches)
    worst = 0.0
    for side in sides:
        batched = sample(model, ddim, sigmas, noises[(side, largest)], positive, negative, seed=SEED)
        alone = sample(model, ddim, sigmas, noises[(side, largest)][:1], positive, negative, seed=SEED)
        worst = max(worst, float((batched[:1] - alone).abs().max()))
    check(worst < BATCH_TOLERANCE, f"the first sample of a batch of {largest} differs from the same noise alone "
                                   f"by {worst:.2e}")
    return f"batch of {largest} vs batch of 1 on the same noise: first samples agree (max difference {worst:.1e})"


def scaling_table(title: str, configs: list[tuple[int, int]], step: dict, memory: dict) -> Table:
    """Step time and peak memory per (latent side, batch), as ratios to the first (smallest) configuration."""
    base = configs[0]
    table = Table(title, ["compared", "latent", "batch", "device, dtype", "step time ratio vs smallest", "step time",
                          "per sample", "peak RSS growth"])
    for side, batch in configs:
        compared = ("(baseline)" if (side, batch) == base
                    else f"{side}x{side} b{batch} vs {base[0]}x{base[0]} b{base[1]}")
        table.add(compared, f"4x{side}x{side}", batch, "CPU, float32", fmt_ratio(step[(side, batch)] / step[base]),
                  fmt_seconds(step[(side, batch)]), fmt_seconds(step[(side, batch)] / batch),
                  fmt_bytes(memory[(side, batch)]))
    return table


def plot_step_time_memory(ctx: BenchContext, name: str, sides, batches, step, memory, time_label: str, title: str):
    """Step time (log) and peak RSS growth against latent side, one line per batch size; returns the PNG path."""
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in batches:
        time_axis.plot(sides, [step[(side, batch)] * 1e3 for side in sides], marker="o", label=f"batch {batch}")
        memory_axis.plot(sides, [memory[(side, batch)] / 2**20 for side in sides], marker="o", label=f"batch {batch}")
    for axis, label in ((time_axis, time_label), (memory_axis, "peak RSS growth (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(sides), [f"{side}x{side}" for side in sides])
        axis.set_xlabel("latent size (4 channels)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    time_axis.set_yscale("log")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = ctx.plots_dir / f"{name}_step_time_memory.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
