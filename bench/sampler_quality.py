"""Quality vs NFE: every Stride sampler next to ComfyUI's built-ins, scored exactly, with 95% intervals.

Each sampler draws class-conditional samples (prompt "disc", CFG 1, the same initial noise for
all) at 1, 2, 4 and 8 steps from three models: the analytic reference teacher in its *denoiser*
form (the ideal many-step teacher: fair for plain solvers) and its *flow-map* form (the ideal
consistency-distilled student: fair for few-step samplers), and the demo UNet (an undistilled
network trained on the same data). Every figure is ``distill_core.reference.metrics.evaluate``'s: the
samples are scored in 8 independent repeats, each against its own fresh data set and projections, and
shown as mean ± 95% half-width. All runs share the noises and the references of each repeat, so their
differences are paired. Figures: sliced Wasserstein distance to fresh data (SWD) and its paired
difference to the exact ODE solution from the same noises; NLL gap to the data (negative =
over-concentrated); total-variation distance of the mode histogram to the true mode weights (mode
TV); each mode's squared mean shift and covariance error relative to its exact component (0 for
data); and for deterministic samplers the endpoint error: the RMS distance per latent element to
the exact probability-flow ODE solution from the sampler's own starting latent.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from distill_core.reference import demo, metrics
from distill_core.reference.demo import demo_mixture
from distill_core.reference.statistics import Estimate, paired_difference, verdict

from . import models
from .context import BenchContext
from .harness import Section, Table, check
from .samplers import (
    COMFY_EULER,
    QUALITY_BUILTINS,
    STRIDE_HYPER,
    STRIDE_SAMPLERS,
    counting_model,
    sample,
    start_recording,
)

NAME = "sampler_quality"
TITLE = "Sampler quality vs NFE (exact reference teacher and demo UNet)"
PROMPT = "disc"
SEED = 0  # initial noise of every sampler
METRIC_SEED = 1  # reference data and projections of the metrics: a stream independent of the noise
DATA_SEED = 2  # the data set scored like the samples
STEP_COUNTS = (1, 2, 4, 8)
SAMPLERS = STRIDE_SAMPLERS + QUALITY_BUILTINS
EXACTNESS_TOLERANCE = 1e-4
EXACT_LABEL = "exact ODE solution from the same noises"
# A working sampler at its top NFE on the model it is made for recalls every mode in every repeat, keeps its
# whole NLL-gap interval within this many nats per element of the data's (all-zero latents: +7; a sampler that
# leaves noise of std 0.5 on the data: about +1.2) and has a lower SWD than all-zero latents (paired interval).
SENSIBLE_NLL_GAP = 1.0
COLUMNS = (("swd", 3, False), ("nll_gap", 3, True), ("mode_tv", 3, False), ("mode_mean_shift", 4, True),
           ("mode_cov_error", 3, True), ("endpoint_error", 4, False))


def _fmt(result: dict[str, Estimate], name: str, digits: int, signed: bool) -> str:
    return result[name].format(digits, signed) if name in result else "-"


def _row(result: dict[str, Estimate], exact: dict[str, Estimate]) -> list[str]:
    cells = [_fmt(result, "swd", 3, False), paired_difference(result["swd"], exact["swd"]).format(3, signed=True)]
    return cells + [_fmt(result, name, digits, signed) for name, digits, signed in COLUMNS[1:]]


def _fair(spec, form: str) -> bool:
    return spec.few_step == (form == models.FLOW_MAP_FORM)


def run(ctx: BenchContext) -> Section:
    per_repeat = ctx.pick(32, 64, 256)
    repeats = ctx.pick(4, metrics.REPEATS, metrics.REPEATS)
    num_samples = per_repeat * repeats
    step_counts = ctx.pick((1, 4), STEP_COUNTS, STEP_COUNTS)
    flow_map_steps = ctx.pick(16, 64, 64)
    mixture = demo_mixture()
    positive, negative = models.class_prompt(ctx, PROMPT), models.class_prompt(ctx, "")
    class_id = int(demo.decode_context(positive[0][0])[0])
    labels = torch.full((num_samples,), class_id)
    latent_shape = (num_samples, *mixture.latent_shape)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(SEED))
    compat = ctx.stride_module("nodes.compat")

    def score(samples: torch.Tensor, exact: torch.Tensor | None = None) -> dict[str, Estimate]:
        return metrics.evaluate(samples.double(), mixture, labels, torch.Generator().manual_seed(METRIC_SEED),
                                repeats, exact_endpoints=exact)

    exact_cache: list[tuple[torch.Tensor, float, torch.Tensor]] = []

    def exact_solution(model, start: list) -> torch.Tensor:
        """The exact ODE solution (the mixture's flow map, 200 steps) from a run's starting latent, cached."""
        x, sigma = start[0].double(), float(start[1])
        for cached_x, cached_sigma, solution in exact_cache:
            if cached_sigma == sigma and torch.equal(cached_x, x):
                return solution
        space = compat.noise_space(compat.model_sampling_of_patcher(model))
        solution = mixture.flow_map(x, sigma, space, labels)
        exact_cache.append((x, sigma, solution))
        return solution

    demo_model, trained = models.demo_unet_model(ctx)
    model_rows = [
        ("reference teacher, denoiser form", models.reference_model(ctx, models.DENOISER_FORM), models.DENOISER_FORM),
        ("reference teacher, flow-map form", models.reference_model(ctx, models.FLOW_MAP_FORM, flow_map_steps),
         models.FLOW_MAP_FORM),
    ]
    if trained:
        model_rows.append(("demo UNet (trained, undistilled)", demo_model, models.DENOISER_FORM))

    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    section.checks.append(_check_paths_agree(ctx, model_rows[0][1], noise, positive, negative))

    results: dict[tuple[str, str, int], dict[str, Estimate]] = {}
    for model_label, model, _ in model_rows:
        counted, calls = counting_model(model)
        for spec in SAMPLERS:
            for steps in step_counts:
                ctx.log(f"{NAME}: {model_label} / {spec.label} / {steps} steps")
                sampler, sigmas = spec.build(ctx, counted, steps)
                start: list = []
                calls[0] = 0
                samples = sample(counted, start_recording(sampler, start), sigmas, noise, positive, negative, seed=SEED)
                check(bool(torch.isfinite(samples).all()),
                      f"{spec.label} at {steps} steps on the {model_label} produced NaN or inf")
                check(calls[0] == steps,
                      f"{spec.label} at {steps} steps made {calls[0]} network calls, expected {steps}")
                exact = exact_solution(model, start)
                results[(model_label, spec.label, steps)] = score(samples, exact if spec.deterministic else None)
    section.checks.append(f"all {len(results)} runs (model x sampler x NFE) finite; each made exactly NFE = steps "
                          "network calls")
    spread = max(float((x - exact_cache[0][0]).abs().max() / exact_cache[0][0].abs().max()) for x, _, _ in exact_cache)
    check(spread < 1e-6, f"the runs started from latents that differ by {spread:.1e} (relative): not the same noise")
    section.checks.append(f"every run started from the same noise scaled to sigma_max (the {len(exact_cache)} starting "
                          f"latents differ by float32 rounding of sigma_max only, {spread:.0e} relative); each "
                          "deterministic run's endpoint error is measured against the exact ODE solution from its own "
                          "start (the mixture's flow map, 200 DPM-Solver++ 3M steps)")
    exact_result = score(exact_cache[0][2], exact_cache[0][2])
    data = score(mixture.sample(num_samples, torch.Generator().manual_seed(DATA_SEED), labels)[0])
    trivial = score(torch.zeros(latent_shape))
    top = max(step_counts)

    def sensible(result: dict[str, Estimate]) -> bool:
        gap = result["nll_gap"]
        return (result["mode_recall"].value == 1.0 and gap.low >= -SENSIBLE_NLL_GAP and gap.high <= SENSIBLE_NLL_GAP
                and verdict(paired_difference(result["swd"], trivial["swd"])) == "lower")

    def described(result: dict[str, Estimate]) -> str:
        return (f"SWD {result['swd'].format()}, NLL gap {result['nll_gap'].format(signed=True)}, recall "
                f"{result['mode_recall'].value:.2f}")

    for spec in SAMPLERS:
        form_label = "reference teacher, " + ("flow-map form" if spec.few_step else "denoiser form")
        result = results[(form_label, spec.label, top)]
        check(sensible(result), f"{spec.label} at {top} steps on the exact teacher it is made for scores "
                                f"{described(result)} (all-zero latents: SWD {trivial['swd'].format()})")
    section.checks.append(
        f"every sampler at {top} steps on its fair form of the exact teacher: all modes recalled in every repeat, NLL "
        f"gap interval within ±{SENSIBLE_NLL_GAP}, SWD lower than all-zero latents' (paired interval below 0)")
    if trained:
        demo_label = "demo UNet (trained, undistilled)"
        check(any(sensible(results[(demo_label, spec.label, top)]) for spec in SAMPLERS if not spec.few_step),
              f"no plain solver on the demo UNet samples sensibly at {top} steps: the demo model or the host path "
              "is broken")
        section.checks.append(f"demo UNet: a plain solver at {top} steps passes the same criteria")
    else:
        section.notes.append("Demo UNet rows skipped: its trained weights are not built "
                             f"({demo.DEMO_WEIGHTS_PATH.relative_to(demo.REPO_ROOT)}); "
                             "run scripts/build_demo_model.py.")

    headers = ["SWD", "SWD - exact ODE (paired)", "NLL gap", "mode TV", "mode mean shift", "mode cov error",
               "endpoint error"]
    for model_label, _, form in model_rows:
        table = Table(
            f"{model_label}: {num_samples} samples (prompt '{PROMPT}', CFG 1, CPU float32 latents; the analytic "
            f"teacher computes in float64) scored in {repeats} repeats of {per_repeat} (SWD, mode figures) or per "
            "sample (NLL gap, endpoint error); mean ± 95% half-width",
            ["sampler", "schedule", "fair here?", "NFE", *headers])
        for spec in SAMPLERS:
            for steps in step_counts:
                table.add(spec.label, spec.schedule, "yes" if _fair(spec, form) else "no", steps,
                          *_row(results[(model_label, spec.label, steps)], exact_result))
        table.add(EXACT_LABEL, "-", "-", "-", *_row(exact_result, exact_result))
        table.add(f"data ({num_samples} fresh samples)", "-", "-", "-", *_row(data, exact_result))
        table.add("all-zero latents (trivial)", "-", "-", "-", *_row(trivial, exact_result))
        section.tables.append(table)

    section.plots.append(_plot(ctx, model_rows, step_counts, results, data))
    section.notes += [
        f"Intervals: SWD and the mode figures are means over {repeats} independent repeats of {per_repeat} samples "
        "(each scored against its own fresh data set and projections) with a Student-t 95% interval; NLL gap and "
        f"endpoint error are means over all {num_samples} samples with their t interval. SWD on its own is noisy (a "
        "set's SWD moves with its mode mix; compare the data row's interval), but every run here shares the noises "
        "and the references of each repeat, so the paired column 'SWD - exact ODE' resolves small differences; an "
        "interval that holds 0 means no difference was detected. The exact ODE row is the ideal sampler; the data "
        "row shares only the references.",
        "Mode mean shift and cov error are the count-weighted per-mode ||E[x|k] - mu_k||^2 / (s_k^2 D) and "
        "||Cov_k - s_k^2 I||_F^2 / (s_k^4 D), both unbiased (0 for data; see "
        "distill_core.reference.metrics.mode_moment_errors); endpoint error (RMS per latent element) is shown for "
        "deterministic samplers only (ComfyUI euler, dpmpp_2m, uni_pc, Stride Hyper-SD = DDIM): the others draw "
        "fresh noise, so no single ODE solution is their target.",
        "Fair comparisons: plain solvers (ComfyUI euler, dpmpp_2m, uni_pc) on the denoiser form; few-step samplers "
        "(Stride LCM/TCD/TDD/Hyper-SD, ComfyUI lcm) on the flow-map form, which is what a perfectly distilled "
        "LCM/TCD/TDD model computes. The other form is reported too: few-step samplers fed a plain denoiser "
        "over-concentrate samples (negative NLL gap, covariance error up), which is why a distilled model is needed.",
        "The demo UNet is an undistilled (denoiser-type) network, so its fair samplers are the plain solvers; its "
        "endpoint error compares it with the exact ODE of the mixture it was trained on (model plus solver error).",
        f"Built-in schedulers: {', '.join(f'{s.label.split()[-1]} with {s.schedule}' for s in QUALITY_BUILTINS)}; "
        "Stride samplers use their own schedule nodes. NFE = network calls, counted.",
    ]
    return section


def _check_paths_agree(ctx: BenchContext, model, noise, positive, negative) -> str:
    """Stride's Hyper-SD sampler (TCD, gamma 0 = DDIM) on euler's sigmas must reproduce ComfyUI's euler."""
    sampler, _ = STRIDE_HYPER.build(ctx, model, 4)
    euler, sigmas = COMFY_EULER.build(ctx, model, 4)
    ours = sample(model, sampler, sigmas, noise, positive, negative, seed=SEED)
    theirs = sample(model, euler, sigmas, noise, positive, negative, seed=SEED)
    difference = float((ours - theirs).abs().max())
    check(difference < EXACTNESS_TOLERANCE,
          f"Stride DDIM and ComfyUI euler differ by {difference:.2e} on the same sigmas "
          f"(expected < {EXACTNESS_TOLERANCE})")
    return f"Stride TCD with gamma 0 equals ComfyUI euler on the same 4 sigmas (max difference {difference:.1e})"


def _plot(ctx: BenchContext, model_rows, step_counts, results, data: dict[str, Estimate]):
    """SWD and NLL gap against NFE with their 95% intervals, one column per model; the data's interval shaded."""
    figure, axes = plt.subplots(2, len(model_rows), figsize=(5.2 * len(model_rows), 7.6), sharex=True, sharey="row",
                                squeeze=False)
    for column, (model_label, _, _) in enumerate(model_rows):
        for row, name in enumerate(("swd", "nll_gap")):
            axis = axes[row][column]
            for spec in SAMPLERS:
                figures = [results[(model_label, spec.label, steps)][name] for steps in step_counts]
                axis.errorbar(step_counts, [f.value for f in figures], yerr=[f.half_width for f in figures], marker="o",
                              capsize=3, linestyle="-" if spec.origin == "Stride" else "--", label=spec.label)
            axis.axhspan(data[name].low, data[name].high, color="grey", alpha=0.2, label="data (95% interval)")
            axis.set_xscale("log", base=2)
            axis.set_xticks(list(step_counts), [str(steps) for steps in step_counts])
            if row == 0:
                axis.set_title(model_label, fontsize=10)
            else:
                axis.set_xlabel("NFE")
                axis.set_yscale("symlog", linthresh=0.1)
    axes[0][0].set_ylabel("sliced Wasserstein distance to data")
    axes[1][0].set_ylabel("NLL gap to the data (nats / element)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    path = ctx.plots_dir / f"{NAME}_swd_vs_nfe.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
