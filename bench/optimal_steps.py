"""Optimal-steps schedule search (OSS): the searched N-step schedule against ComfyUI's schedules, and its cost.

The teacher is the analytic reference (demo mixture) in the EPS convention (SD1.5's VE sigmas) and
in the flow convention (shift 1); its exact denoiser is called directly, and ComfyUI's own
schedulers (``comfy.samplers.calculate_sigmas`` on the reference MODEL's model sampling) and preset
nodes (AYS, GITS, OSS) give the schedules it is compared with. The search runs Euler over the
``normal`` M-step trajectory from its search noises; every schedule is then scored with Euler from
held-out noises (never searched) against the exact probability-flow ODE solution from the same
noise. Endpoint error = RMS over the latent, mean over the held-out noises with a 95% Student-t
interval, and each schedule's paired difference to the searched one on the same noises; SWD to
fresh data and the NLL gap are ``distill_core.reference.metrics.evaluate``'s figures (SWD over
independent repeats, disjoint groups of held-out noises each scored against its own fresh reference;
the NLL gap per sample), with their intervals, and each schedule's paired difference to the searched
one (the same noises, reference sets and projections in each repeat).

Cost: model evaluations (latents) and calls of the search against the official DP's
``(1 + N) M`` evaluations per noise, and its wall time against the same calls replayed alone
(identical batch shapes and sigmas, nothing else), on the reference and on ComfyUI's full-size
SD1.5 UNet with random weights. Exactness: how often the paper-mode recursion (greedy for N >= 3)
finds the N-subset with the smallest endpoint error, found by exhaustive search on short
trajectories.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from distill_core.reference import metrics
from distill_core.reference.demo import demo_mixture
from distill_core.reference.mixture import GaussianMixture
from distill_core.reference.statistics import Estimate, estimate, paired_difference
from distill_core.sampling.optimal_steps import search_schedule, solve
from distill_core.spaces import NoiseSpace

from . import models
from .context import BenchContext
from .harness import Goal, Section, Table, check, fmt_ratio, fmt_seconds
from .samplers import sample

NAME = "optimal_steps"
TITLE = "Optimal-steps schedule search (OSS): quality against ComfyUI's schedules, cost against the official DP"
STEP_COUNTS = (4, 5, 6, 8, 10)
PROMPTS = {"ring": 3, "disc": 0, "": None}  # demo class name (empty: unconditional) -> class id
SEARCH_SEED, HELD_OUT_SEED, METRIC_SEED = 0, 1, 2
CALLS_GOAL = 1.1
WALL_GOAL = 1.1
PATHS_AGREE = 1e-4  # ComfyUI's float32 Euler path vs the float64 reference path
SEARCHED, FAST = "OSS search (paper)", "OSS search (fast)"
PlotData = dict[str, dict[str, dict[str, list[tuple[int, Estimate]]]]]
"""Convention -> teacher label -> schedule -> (N, endpoint error) points."""


@dataclass
class Setting:
    """One teacher: a convention, a demo class, and its ComfyUI MODEL (for schedules and the path check)."""

    kind: str
    prompt: str
    space: NoiseSpace
    comfy_model: Any
    compat: ModuleType

    @property
    def label(self) -> str:
        return f"{'EPS (VE sigmas)' if self.kind == 've' else 'flow (shift 1)'}, prompt '{self.prompt or '(empty)'}'"

    def denoiser(self, mixture: GaussianMixture) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        class_id = PROMPTS[self.prompt]

        def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            labels = None if class_id is None else torch.full((x.shape[0],), class_id)
            return mixture.denoise(x, sigma, self.space, labels)

        return model

    def start(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The latent a ComfyUI sampler starts from on ``sigmas`` with an empty latent (Stride's
        ``compat.start_latent``, which Stride Optimal Steps uses too)."""
        return self.compat.start_latent(self.comfy_model.get_model_object("model_sampling"), sigmas, noise)


def comfy_schedules(setting: Setting, steps: int) -> dict[str, torch.Tensor]:
    """ComfyUI's schedulers on the MODEL's own model sampling, and the presets that apply to its convention."""
    import comfy.samplers

    sampling = setting.comfy_model.get_model_object("model_sampling")
    out = {name: comfy.samplers.calculate_sigmas(sampling, name, steps)
           for name in ("normal", "simple", "karras", "beta")}
    from comfy_extras import nodes_align_your_steps, nodes_gits, nodes_optimalsteps

    if setting.kind == "ve":
        out["AYS preset (SD1)"] = nodes_align_your_steps.AlignYourStepsScheduler.execute("SD1", steps, 1.0).result[0]
        out["GITS preset (coeff 1.2)"] = nodes_gits.GITSScheduler.execute(1.2, steps, 1.0).result[0]
    else:
        for preset in ("FLUX", "Wan"):
            preset_sigmas = nodes_optimalsteps.OptimalStepsScheduler.execute(preset, steps, 1.0).result[0]
            out[f"OSS preset ({preset})"] = preset_sigmas
    return {name: sigmas.to(torch.float64) for name, sigmas in out.items()}


def rms_errors(setting: Setting, model, noise: torch.Tensor, sigmas: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per held-out noise, the RMS distance of Euler's endpoint on ``sigmas`` (started as ComfyUI starts) to the
    exact ODE endpoint."""
    return metrics.endpoint_error(solve(model, setting.start(noise, sigmas), sigmas), exact)


def run(ctx: BenchContext) -> Section:
    teacher_steps = ctx.pick(20, 50, 100)
    search_noises = ctx.pick(4, 16, 32)
    held_out = ctx.pick(32, 128, 512)
    repeats = ctx.pick(2, 4, 8)
    step_counts = ctx.pick((4,), STEP_COUNTS, STEP_COUNTS)
    kinds = ctx.pick(("ve",), ("ve", "flow"), ("ve", "flow"))
    prompts = ctx.pick(("ring",), tuple(PROMPTS), tuple(PROMPTS))
    mixture = demo_mixture()
    builder = ctx.node("StrideReferenceModel")
    comfy_models = {kind: builder.execute("demo", "eps" if kind == "ve" else "flow", models.DENOISER_FORM, 0)[0]
                    for kind in kinds}
    spaces = {kind: NoiseSpace.from_sigma_table(kind, comfy_models[kind].get_model_object("model_sampling").sigmas)
              for kind in kinds}
    compat = ctx.stride_module("nodes.compat")
    ve_ring = Setting("ve", "ring", spaces["ve"], comfy_models["ve"], compat)
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    section.checks.append(_check_paths_agree(ctx, ve_ring, mixture, teacher_steps))
    search_start = torch.randn((search_noises, *mixture.latent_shape), dtype=torch.float64,
                               generator=torch.Generator().manual_seed(SEARCH_SEED))
    held_start = torch.randn((held_out, *mixture.latent_shape), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    plot_data: PlotData = {}
    for kind, prompt in itertools.product(kinds, prompts):
        setting = Setting(kind, prompt, spaces[kind], comfy_models[kind], compat)
        ctx.log(f"{NAME}: {setting.label}")
        _quality(ctx, section, setting, mixture, teacher_steps, step_counts, search_start, held_start, repeats,
                 plot_data, full_metrics=prompt == prompts[0])
    section.plots.append(_plot(ctx, plot_data))
    _cost(ctx, section, ve_ring, mixture, teacher_steps, step_counts, search_start)
    _exhaustive(ctx, section, ve_ring, mixture)
    section.notes += [
        f"Search: {search_noises} noises (seed {SEARCH_SEED}), teacher = Euler on ComfyUI's normal schedule with M = "
        f"{teacher_steps} steps, per-noise schedules aggregated by their per-position median (the official "
        f"cal_medium). Scores: {held_out} held-out noises (seed {HELD_OUT_SEED}); the exact ODE solution is the "
        "reference's 3rd-order exponential integrator on 200 steps (reference.ode.solve_probability_flow).",
        "Presets are ComfyUI's nodes: AYS and GITS were made for SD1.5-type (VE) models, the OSS presets for FLUX and "
        "Wan (flow, with their own shifts), so on this reference they are other models' schedules.",
        "Searched schedules start at the teacher's first sigma. The official search also lets the first step start the "
        "noise at a lower sigma; on this reference that lowers the typical error but moves samples to other modes than "
        "the teacher's (see distill_core/sampling/optimal_steps.py).",
    ]
    return section


def _quality(ctx: BenchContext, section: Section, setting: Setting, mixture, teacher_steps: int,
             step_counts: tuple[int, ...], search_start: torch.Tensor, held_start: torch.Tensor, repeats: int,
             plot_data: PlotData, full_metrics: bool) -> None:
    import comfy.samplers

    model = setting.denoiser(mixture)
    sampling = setting.comfy_model.get_model_object("model_sampling")
    teacher_sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", teacher_steps).to(torch.float64)
    class_id = PROMPTS[setting.prompt]
    labels = None if class_id is None else torch.full((held_start.shape[0],), class_id)
    exact = mixture.flow_map(setting.start(held_start, teacher_sigmas), teacher_sigmas[0], setting.space, labels)
    search_latents = setting.start(search_start, teacher_sigmas)
    columns = [f"N = {steps}" for steps in step_counts]
    error_table = Table(f"{setting.label}: endpoint RMS error to the exact ODE (mean ± 95% interval over "
                        f"{held_start.shape[0]} held-out noises); in brackets the paired difference to the searched "
                        "schedule (positive: the searched one is closer)", ["schedule", *columns])
    metric_table = Table(f"{setting.label}: SWD to fresh data / NLL gap (mean ± 95% interval: SWD over {repeats} "
                         f"repeats of {held_start.shape[0] // repeats} samples with a fresh reference each, the NLL "
                         "gap over samples); in brackets the paired differences to the searched schedule (the same "
                         "noises, reference sets and projections; positive: the searched one is lower)",
                         ["schedule", *columns])
    rows: dict[str, list[str]] = {}
    metric_rows: dict[str, list[str]] = {}
    beaten_everywhere = True
    losses = []
    for steps in step_counts:
        searched = search_schedule(model, search_latents, teacher_sigmas, steps)
        fast = search_schedule(model, search_latents, teacher_sigmas, steps, mode="fast")
        schedules = {SEARCHED: searched.sigmas, FAST: fast.sigmas} | comfy_schedules(setting, steps)
        errors = {}
        for name, sigmas in schedules.items():
            per_noise = rms_errors(setting, model, held_start, sigmas, exact)
            check(bool(torch.isfinite(per_noise).all()), f"{name} at N = {steps}: non-finite endpoints")
            errors[name] = estimate(per_noise)
        scored = {}
        for name, sigmas in schedules.items():
            cell = errors[name].format()
            if name != SEARCHED:
                gain = paired_difference(errors[name], errors[SEARCHED])
                cell += f" [{gain.format(signed=True)}]"
                if name != FAST and gain.low <= 0:
                    beaten_everywhere = False
                    losses.append(f"{name} at N = {steps} ({gain.format(signed=True)})")
            rows.setdefault(name, []).append(cell)
            plot_data.setdefault(setting.kind, {}).setdefault(setting.label, {}).setdefault(name, []).append(
                (steps, errors[name]))
            if full_metrics:
                samples = solve(model, setting.start(held_start, sigmas), sigmas)
                scored[name] = metrics.evaluate(samples, mixture, labels, torch.Generator().manual_seed(METRIC_SEED),
                                                repeats)
        for name, report in scored.items():
            compared = None if name == SEARCHED else scored[SEARCHED]
            metric_rows.setdefault(name, []).append(_metric_cell(report, compared))
    for name, cells in rows.items():
        error_table.add(name, *cells)
    section.tables.append(error_table)
    if full_metrics:
        data = mixture.sample(held_start.shape[0], torch.Generator().manual_seed(METRIC_SEED + 1000), labels)[0]
        data_cell = _metric_cell(metrics.evaluate(data, mixture, labels, torch.Generator().manual_seed(METRIC_SEED),
                                                  repeats), None)
        for name, cells in metric_rows.items():
            metric_table.add(name, *cells)
        metric_table.add("data (fresh sets scored like samples)", *([data_cell] * len(step_counts)))
        section.tables.append(metric_table)
    section.goals.append(Goal(
        f"{setting.label}: Euler on the searched schedule is closer to the exact ODE endpoint than on every ComfyUI "
        "schedule and preset at every N (whole paired interval)",
        "met" if beaten_everywhere else "missed",
        "all paired intervals above 0" if beaten_everywhere else "not at: " + "; ".join(losses)))


def _metric_cell(report: dict[str, Estimate], searched: dict[str, Estimate] | None) -> str:
    """SWD / NLL gap with their intervals and, next to the searched schedule's figures, the paired differences."""
    cell = f"{report['swd'].format()} / {report['nll_gap'].format(signed=True)}"
    if searched is not None:
        swd, gap = (paired_difference(report[name], searched[name]).format(signed=True) for name in ("swd", "nll_gap"))
        cell += f" [{swd} / {gap}]"
    return cell


def _check_paths_agree(ctx: BenchContext, setting: Setting, mixture, teacher_steps: int) -> str:
    """Euler through ComfyUI (SamplerCustom path, the reference MODEL, prompt 'ring') on a searched schedule equals
    the float64 reference path the scores use."""
    import comfy.samplers

    sampling = setting.comfy_model.get_model_object("model_sampling")
    teacher_sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", teacher_steps).to(torch.float64)
    start = torch.randn((4, *mixture.latent_shape), generator=torch.Generator().manual_seed(SEARCH_SEED))
    found = search_schedule(setting.denoiser(mixture), setting.start(start.double(), teacher_sigmas), teacher_sigmas, 4)
    prompt = models.class_prompt(ctx, setting.prompt)
    euler = comfy.samplers.sampler_object("euler")
    theirs = sample(setting.comfy_model, euler, found.sigmas.float(), start, prompt, prompt)
    ours = solve(setting.denoiser(mixture), setting.start(start.double(), found.sigmas), found.sigmas)
    difference = float((theirs.double() - ours).abs().max())
    check(difference < PATHS_AGREE, f"ComfyUI's euler and the reference path differ by {difference:.2e} on a searched "
                                    f"schedule (expected < {PATHS_AGREE})")
    return (f"ComfyUI euler (SamplerCustom, reference MODEL, prompt 'ring') on a searched 4-step schedule equals the "
            f"float64 path used for the scores (max difference {difference:.1e})")


# ------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------
class _Recorder:
    """The model with the shapes and sigmas of every call kept, to replay the same calls alone."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[tuple[torch.Size, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape, sigma.clone()))
        return self.model(x, sigma)

    def replay(self, dtype: torch.dtype, device: torch.device, sync: Callable[[], None]) -> float:
        generator = torch.Generator().manual_seed(0)
        inputs = [(torch.randn(shape, generator=generator, dtype=dtype).to(device) * float(sigma.max()), sigma)
                  for shape, sigma in self.calls]
        sync()
        started = time.perf_counter()
        for x, sigma in inputs:
            self.model(x, sigma)
        sync()
        return time.perf_counter() - started


def _cost_row(table: Table, label: str, model, start: torch.Tensor, sigmas: torch.Tensor, steps: int,
              max_batch: int | None, sync: Callable[[], None], repeats: int) -> tuple[float, Estimate]:
    """One row of the cost table: the search's evaluations against the official count, and over ``repeats`` paired
    timings (search, then its recorded calls replayed alone; after a recording run that warms up) the wall-time ratio
    with its 95% interval."""
    recorder = _Recorder(model)
    found = search_schedule(recorder, start, sigmas, steps, max_batch=max_batch, sync=sync)  # also the warm-up
    searched, replayed = [], []
    for _ in range(repeats):
        searched.append(search_schedule(model, start, sigmas, steps, max_batch=max_batch, sync=sync).cost.total_seconds)
        replayed.append(recorder.replay(start.dtype, start.device, sync))
    fast = search_schedule(model, start, sigmas, steps, mode="fast", max_batch=max_batch, sync=sync)
    official = (1 + steps) * (sigmas.numel() - 1) * start.shape[0]
    calls_ratio = found.cost.evaluations / official
    search_wall, alone_wall = estimate(torch.tensor(searched)), estimate(torch.tensor(replayed))
    wall_ratio = estimate(torch.tensor(searched) / torch.tensor(replayed))
    table.add(label, steps, f"{found.cost.evaluations} ({found.cost.calls} calls)", official, fmt_ratio(calls_ratio),
              f"{search_wall.format()} s", f"{alone_wall.format()} s", wall_ratio.format(),
              f"{fast.cost.evaluations} / {fmt_seconds(fast.cost.total_seconds)}")
    return calls_ratio, wall_ratio


def _cost(ctx: BenchContext, section: Section, setting: Setting, mixture, teacher_steps: int,
          step_counts: tuple[int, ...], search_start: torch.Tensor) -> None:
    import comfy.samplers

    sampling = setting.comfy_model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", teacher_steps).to(torch.float64)
    repeats = ctx.pick(2, 3, 5)
    table = Table("Search cost: evaluations (latents through the model) against the official DP's (1 + N) M per noise, "
                  "and the search's wall time against the same calls replayed alone (mean ± 95% interval over "
                  f"{repeats} paired timings; the ratio per pair)",
                  ["model", "N", "Stride evaluations", "official", "ratio", "search wall", "calls alone", "ratio",
                   "fast mode: evaluations / wall"])
    calls_ratios, reference_wall = [], []
    for steps in step_counts:
        calls, wall = _cost_row(table, f"reference teacher, {search_start.shape[0]} noises, M = {teacher_steps}",
                                setting.denoiser(mixture), setting.start(search_start, sigmas), sigmas, steps, None,
                                lambda: None, repeats)
        calls_ratios.append(calls)
        reference_wall.append(wall)
    unet_wall = None
    if ctx.tier == "full":
        unet_wall = _unet_cost(ctx, table, calls_ratios, repeats)
    section.tables.append(table)
    section.goals.append(Goal(f"search evaluations <= {CALLS_GOAL}x the official DP's (1 + N) M per noise",
                              "met" if max(calls_ratios) <= CALLS_GOAL else "missed",
                              f"worst {fmt_ratio(max(calls_ratios))}"))
    wall_goal = f"search wall time <= {WALL_GOAL}x its model calls measured alone (full-size network)"
    worst = max(reference_wall, key=lambda ratio: ratio.value)
    reference_text = (f"analytic reference (a model call costs microseconds, so the programme's own work shows) worst "
                      f"{worst.format()}")
    if unet_wall is None:
        section.goals.append(Goal(wall_goal, "undecided",
                                  f"the SD1.5 UNet runs in the full tier only; {reference_text}"))
    else:
        status = "met" if unet_wall.high <= WALL_GOAL else "missed" if unet_wall.low > WALL_GOAL else "undecided"
        section.goals.append(Goal(wall_goal, status, f"SD1.5 UNet {unet_wall.format()} (met: the whole interval at or "
                                                     f"below {WALL_GOAL}); {reference_text}"))


def _unet_cost(ctx: BenchContext, table: Table, calls_ratios: list[float], repeats: int) -> Estimate:
    """The search on ComfyUI's full-size SD1.5 UNet (random weights, float32, CPU unless CUDA) at a small latent."""
    import comfy.samplers

    device = ctx.device
    config = models.unet_config("sd15")
    patcher = models.unet_model("sd15", config, device, torch.float32)
    base = patcher.model
    base.diffusion_model.to(device)
    context = models.unet_conditioning("sd15", config)[0][0].to(device)
    sync = (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    size = 16 if device.type == "cuda" else 8
    teacher_steps, steps = (100, 5) if device.type == "cuda" else (20, 4)
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "normal", teacher_steps).to(torch.float64)

    @torch.no_grad()
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return base.apply_model(x, sigma.to(x.dtype), c_crossattn=context.expand(x.shape[0], -1, -1))

    start = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(SEARCH_SEED)).to(device)
    label = models.describe_unet("sd15", config, base.diffusion_model) + f", latent {size}x{size}, M = {teacher_steps}"
    calls, wall = _cost_row(table, label, denoiser, start * float(sigmas[0]), sigmas, steps, 32, sync, repeats)
    calls_ratios.append(calls)
    return wall


# ------------------------------------------------------------------------------------------
# Exactness
# ------------------------------------------------------------------------------------------
def _exhaustive(ctx: BenchContext, section: Section, setting: Setting, mixture) -> None:
    import comfy.samplers

    total = ctx.pick(8, 12, 14)
    count = ctx.pick(4, 16, 32)
    model = setting.denoiser(mixture)
    sigmas = comfy.samplers.calculate_sigmas(setting.comfy_model.get_model_object("model_sampling"), "normal",
                                             total).to(torch.float64)
    start = setting.start(torch.randn((count, *mixture.latent_shape), dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(HELD_OUT_SEED)), sigmas)
    teacher_end = solve(model, start, sigmas)
    table = Table(f"Paper mode vs exhaustive search of the endpoint error over every N-subset ({setting.label}, "
                  f"M = {total}, {count} noises, each noise's own schedule)",
                  ["N", "subsets", "optimum found", "excess MSE of the found schedule: median / worst",
                   "fast mode: optimum found, worst excess"])
    for steps in ctx.pick((2, 3), (2, 3, 4), (2, 3, 4, 5)):
        subsets = [(0, *middle, total) for middle in itertools.combinations(range(1, total), steps - 1)]
        ends = torch.stack([solve(model, start, sigmas[list(subset)]) for subset in subsets])
        errors = ((ends - teacher_end) ** 2).flatten(2).mean(2)  # (subsets, noises)
        optimum = errors.min(0).values
        results = []
        for mode in ("paper", "fast"):
            found = search_schedule(model, start, sigmas, steps, mode=mode)
            reached = torch.stack([errors[subsets.index(path), b] for b, path in enumerate(found.per_sample)])
            results.append((int((reached <= optimum * (1 + 1e-12)).sum()), reached / optimum - 1))
        (hits, excess), (fast_hits, fast_excess) = results
        if steps == 2:
            check(hits == count, f"paper mode with N = 2 missed the exhaustive optimum on {count - hits} noises")
        table.add(steps, len(subsets), f"{hits} / {count}", f"{100 * float(excess.median()):.2f}% / "
                  f"{100 * float(excess.max()):.2f}%", f"{fast_hits} / {count}, {100 * float(fast_excess.max()):.1f}%")
    section.tables.append(table)
    section.checks.append("paper mode with N = 2 finds the exhaustive optimum on every noise (it is exact there)")


def _plot(ctx: BenchContext, plot_data: PlotData) -> Path:
    """Endpoint error against N, a row per convention and a panel per teacher, each point with its 95% interval over
    the held-out noises; a schedule has the same colour in every panel."""
    rows = list(plot_data.values())
    columns = max(len(row) for row in rows)
    names = list(dict.fromkeys(name for row in rows for panel in row.values() for name in panel))
    colours = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(names)}
    figure, axes = plt.subplots(len(rows), columns, figsize=(4.6 * columns, 3.8 * len(rows)), squeeze=False)
    for row_axes, row in zip(axes, rows, strict=True):
        for axis, (label, panel) in zip(row_axes, row.items(), strict=False):
            for name, points in panel.items():
                steps = [n for n, _ in points]
                axis.errorbar(steps, [error.value for _, error in points],
                              yerr=[error.half_width for _, error in points], marker="o", capsize=2,
                              color=colours[name], linestyle="-" if name.startswith("OSS search") else "--", label=name)
                axis.set_xticks(steps)
            axis.set_yscale("log")
            axis.set_title(label, fontsize=8)
            axis.set_xlabel("steps N")
        row_axes[0].set_ylabel("endpoint RMS error to the exact ODE\n(mean, 95% interval)")
        row_axes[len(row) - 1].legend(fontsize=6)
    figure.tight_layout()
    path = ctx.plots_dir / f"{NAME}_endpoint_error.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
