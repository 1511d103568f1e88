"""Hybrid sampling (diversity distillation): does one base step restore what the distilled model lost?

The base model is the analytic reference teacher in its *denoiser* form (the ideal many-step
model of the 8-mode demo mixture); the distilled model is the *flow map* of its mode-collapsed
partner ("demo collapsed (2 of 8 modes)": 90% of the mass on 2 modes), i.e. an ideal few-step
student that has lost modes, as mode-seeking distillation does. Samples are unconditional (empty
prompt) with CFG 1 on both phases: with an empty prompt the conditional and unconditional
predictions coincide, so 1 is the base's own CFG here. Compared side by side, from the same
initial noise: the base alone (25 steps, ComfyUI euler, simple schedule), the distilled model alone
(4 steps, Stride LCM), and ``StrideHybridSample`` on the shared 4-step LCM schedule (base euler for
the first 1 or 2 steps, distilled LCM for the rest). Scores against the base's data (the demo
mixture): mode recall, normalised mode entropy and the total-variation distance of the mode histogram to the
true weights (diversity across modes), kornia image diversity of the decoded previews
(``distill_core.reference.diversity`` on ``latent_to_rgb``), SWD and NLL gap
(``distill_core.reference.metrics.evaluate``), each as mean ± 95% half-width over 8 independent repeats (per
sample for the NLL gap); every run shares the noises and the references of each repeat, so the
differences to the distilled model alone are paired. NFE = counted network calls of each model.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from distill_core.reference import diversity, metrics
from distill_core.reference.demo import DEMO_COMPONENTS, demo_mixture, latent_to_rgb
from distill_core.reference.mixture import GaussianMixture
from distill_core.reference.statistics import Estimate, estimate, judge, paired_difference, share_interval
from distill_core.sampling import hybrid, lcm, tcd

from . import models
from .context import BenchContext
from .harness import Goal, Section, Table, check, fmt_ratio, fmt_seconds, median, run_interleaved
from .samplers import COMFY_EULER, STRIDE_LCM, counting_model, sample

NAME = "hybrid"
TITLE = "Hybrid sampling (diversity distillation) on the reference models: base, distilled and hybrid"
COLLAPSED_VARIANT = "demo collapsed (2 of 8 modes)"
SEED = 0  # initial noise and per-step noise of every run
METRIC_SEED = 1  # reference data and projections of the metrics
DATA_SEED = 2  # the fresh data set scored like the samples
BASE_STEPS = 25
HYBRID_STEPS = 4
HANDOVERS = (1, 2)
LIBRARY_CHECK_SAMPLES = 8


def _hybrid_label(handover: int) -> str:
    return f"hybrid {handover}+{HYBRID_STEPS - handover}"


def run(ctx: BenchContext) -> Section:
    metric_repeats = ctx.pick(4, metrics.REPEATS, metrics.REPEATS)
    per_repeat = ctx.pick(8, 64, 256)
    num_samples = metric_repeats * per_repeat
    flow_map_steps = ctx.pick(16, 64, 64)
    repeats = ctx.pick(1, 2, 3)
    reference = ctx.stride_module("nodes.reference")
    compat = ctx.stride_module("nodes.compat")
    base_model = models.reference_model(ctx, models.DENOISER_FORM)
    distilled_model = ctx.node("StrideReferenceModel").execute(COLLAPSED_VARIANT, "eps", models.FLOW_MAP_FORM,
                                                             flow_map_steps)[0]
    empty = models.class_prompt(ctx, "")
    data_mixture = demo_mixture()
    latent = torch.zeros(num_samples, *data_mixture.latent_shape)
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, SEED)
    counted_base, base_calls = counting_model(base_model)
    counted_distilled, distilled_calls = counting_model(distilled_model)
    hybrid_node = ctx.node("StrideHybridSample")

    def hybrid_run(handover: int) -> torch.Tensor:
        return hybrid_node.execute(counted_base, empty, empty, 1.0, "euler", counted_distilled, empty, empty, 1.0,
                                   "lcm", "lcm / tcd grid", HYBRID_STEPS, handover, SEED,
                                   {"samples": latent})[0]["samples"]

    base_sampler, base_sigmas = COMFY_EULER.build(ctx, counted_base, BASE_STEPS)
    lcm_sampler, lcm_sigmas = STRIDE_LCM.build(ctx, counted_distilled, HYBRID_STEPS)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        f"base alone, {BASE_STEPS} steps (ComfyUI euler)":
            lambda: sample(counted_base, base_sampler, base_sigmas, noise, empty, empty, seed=SEED),
        f"distilled alone, {HYBRID_STEPS} steps (Stride LCM)":
            lambda: sample(counted_distilled, lcm_sampler, lcm_sigmas, noise, empty, empty, seed=SEED),
        **{_hybrid_label(k): functools.partial(hybrid_run, k) for k in HANDOVERS},
    }
    expected_calls = {label: (BASE_STEPS, 0) if label.startswith("base") else (0, HYBRID_STEPS) for label in runs}
    expected_calls |= {_hybrid_label(k): (k, HYBRID_STEPS - k) for k in HANDOVERS}
    distilled_label = list(runs)[1]

    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    section.checks.append(_check_node_handover_zero(hybrid_run, runs[distilled_label]))
    space = compat.noise_space(compat.model_sampling_of_patcher(base_model))
    section.checks.append(_check_library_identities(data_mixture, reference.mixture_for(COLLAPSED_VARIANT), space,
                                                    flow_map_steps))

    samples: dict[str, torch.Tensor] = {}
    calls: dict[str, tuple[int, int]] = {}
    for label, draw in runs.items():
        ctx.log(f"{NAME}: {label}")
        base_calls[0] = distilled_calls[0] = 0
        samples[label] = draw()
        calls[label] = (base_calls[0], distilled_calls[0])
        check(bool(torch.isfinite(samples[label]).all()), f"{label}: NaN or inf in the samples")
        check(calls[label] == expected_calls[label], f"{label}: {calls[label]} (base, distilled) network calls, "
                                                     f"expected {expected_calls[label]}")
    section.checks.append("every run finite, with exactly the expected network calls per model: "
                          + "; ".join(f"{label} {b} base + {d} distilled" for label, (b, d) in calls.items()))

    ctx.log(f"{NAME}: timing {len(runs)} runs, {repeats} interleaved repeats")
    # the scored runs above were the warm-up
    timings = run_interleaved(runs, repeats, warmup=0)
    wall = {label: median(timings[label]["wall"]) for label in runs}

    groups = metrics.repeat_groups(num_samples, metric_repeats)

    def score(latents: torch.Tensor) -> dict[str, Estimate]:
        result = metrics.evaluate(latents.double(), data_mixture, None, torch.Generator().manual_seed(METRIC_SEED),
                                  metric_repeats)
        rgb = latent_to_rgb(latents.float())
        image_diversity = [diversity.image_diversity(rgb[group]).overall for group in groups]  # the same repeats
        return result | {"image_diversity": estimate(torch.tensor(image_diversity), per_repeat)}

    scores = {label: score(latents) for label, latents in samples.items()}
    data_samples = data_mixture.sample(num_samples, torch.Generator().manual_seed(DATA_SEED))[0].float()
    data_score = score(data_samples)
    distilled = scores[distilled_label]

    def gain(result: dict[str, Estimate], name: str) -> Estimate:
        return paired_difference(result[name], distilled[name])

    figures = (("mode_recall", 2, False), ("mode_entropy", 3, False), ("mode_tv", 3, False),
               ("image_diversity", 3, False), ("swd", 3, False), ("nll_gap", 3, True))
    table = Table(
        f"Unconditional samples ({num_samples}, same initial noise, CFG 1) of the reference models through ComfyUI: "
        f"base = exact denoiser of the 8-mode demo mixture, distilled = flow map ({flow_map_steps} ODE steps per call) "
        f"of its 2-of-8-mode collapsed partner; CPU float32 latents (the analytic models compute in float64). Figures: "
        f"mean ± 95% half-width over {metric_repeats} repeats of {per_repeat} (NLL gap: over all samples); wall time "
        f"median of {repeats} interleaved repeats",
        ["compared", "mode recall", "mode entropy", "mode entropy - distilled alone (paired)", "mode TV",
         "image diversity", "SWD", "NLL gap", "NFE (base + distilled)", "wall time vs distilled alone", "wall time"])

    def cells(result: dict[str, Estimate]) -> list[str]:
        values = [result[name].format(digits, signed) for name, digits, signed in figures]
        return [*values[:2], gain(result, "mode_entropy").format(3, signed=True), *values[2:]]

    for label in runs:
        base_nfe, distilled_nfe = calls[label]
        table.add(label, *cells(scores[label]), f"{base_nfe + distilled_nfe} ({base_nfe} + {distilled_nfe})",
                  fmt_ratio(wall[label] / wall[distilled_label]), fmt_seconds(wall[label]))
    table.add(f"data ({num_samples} fresh samples)", *cells(data_score), "-", "-", "-")
    section.tables.append(table)
    section.plots.append(_plot(ctx, samples, data_samples, data_mixture))

    base = scores[next(iter(runs))]
    for k in HANDOVERS:
        label = _hybrid_label(k)
        result = scores[label]
        entropy_gain, recall_change = gain(result, "mode_entropy"), gain(result, "mode_recall")
        verdicts = (judge(entropy_gain, 0.0, at_most=False), judge(recall_change, 0.0, at_most=False))
        status = "met" if verdicts == ("met", "met") else "missed" if "missed" in verdicts else "undecided"
        section.goals.append(Goal(
            f"{label} restores diversity the distilled model lost (the method's claim: higher mode entropy, no "
            "lower mode recall than the distilled model alone; judged on the paired 95% intervals)",
            status,
            f"mode entropy {result['mode_entropy'].format()} vs {distilled['mode_entropy'].format()} distilled alone, "
            f"paired gain {entropy_gain.format(signed=True)} (base alone {base['mode_entropy'].format()}, data "
            f"{data_score['mode_entropy'].format()}); recall {result['mode_recall'].format(2)} vs "
            f"{distilled['mode_recall'].format(2)}, paired change {recall_change.format(2, signed=True)}; at "
            f"{HYBRID_STEPS} NFE ({k} of the base) vs the base's {BASE_STEPS}"))

    section.notes += [
        f"Intervals: every figure but the NLL gap is a mean over {metric_repeats} independent repeats of {per_repeat} "
        "samples, each scored against its own fresh data set (SWD also with its own projections), with a Student-t "
        "95% interval; the NLL gap is a mean over all samples. All runs share the noises and each repeat's "
        "references, so 'mode entropy - distilled alone' is a paired difference; the data row shares only the "
        "references. Mode entropy and TV of a finite set of data sit slightly off their population values (1 and 0); "
        "compare with the data row at the same size.",
        "Wall times: the analytic flow map integrates the probability-flow ODE inside every call "
        f"({flow_map_steps} exact-denoiser evaluations), so here a distilled NFE costs far more than a base NFE; "
        "with real networks both cost about the same per NFE and the NFE column is the cost to compare.",
        "The node refuses handover_steps >= steps (the distilled model must take at least one step), so the identity "
        "'handover = steps is the base alone' is checked on distill_core.sampling.hybrid.sample_hybrid, the same "
        "schedule split and seed rule the node uses.",
        "Mode recall counts a mode when it holds at least a quarter of its expected share; mode entropy is the "
        "normalised entropy of the samples' mode histogram (1 = all 8 modes equally often); mode TV is half the "
        "summed absolute difference between the mode shares and the true weights. Image diversity is the mean "
        "pairwise distance of kornia colour/edge descriptors of the 8x8 previews (compare rows, not absolute "
        "values). The plot's error bars are 95% Wilson intervals of each mode's share over all samples.",
    ]
    return section


def _check_node_handover_zero(hybrid_run: Callable[[int], torch.Tensor],
                              distilled_alone: Callable[[], torch.Tensor]) -> str:
    """StrideHybridSample with handover 0 must be exactly the distilled sampler alone (same seed, same sigmas)."""
    return _compare_exact(hybrid_run(0), distilled_alone(), "StrideHybridSample, handover 0",
                          f"the distilled model alone (Stride LCM, {HYBRID_STEPS} steps, same seed)")


def _compare_exact(ours: torch.Tensor, theirs: torch.Tensor, what: str, reference: str) -> str:
    difference = float((ours - theirs).abs().max())
    check(torch.equal(ours, theirs), f"{what} differs from {reference} by up to {difference:.2e}")
    return f"{what} == {reference}: bit-identical"


def _check_library_identities(mixture: GaussianMixture, collapsed: GaussianMixture, space,
                              flow_map_steps: int) -> str:
    """``sample_hybrid`` with handover 0 is the distilled sampler alone and with handover = steps the base
    sampler alone (float64 analytic models, same seed): bit-identical."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(LIBRARY_CHECK_SAMPLES, *mixture.latent_shape, generator=generator, dtype=torch.float64)
    sigmas = space.sigmas_for_timesteps([999, 759, 499, 259])
    x = x * sigmas[0]
    base = hybrid.HybridPhase(lambda x, s, **_: mixture.denoise(x, s, space),
                              functools.partial(tcd.sample_tcd, space=space, gamma=0.0), space)
    distilled = hybrid.HybridPhase(lambda x, s, **_: collapsed.flow_map(x, s, space, steps=flow_map_steps),
                                   functools.partial(lcm.sample_lcm, space=space), space)
    steps = len(sigmas) - 1
    messages = []
    for handover, phase, name in ((0, distilled, "the distilled sampler alone"),
                                  (steps, base, "the base sampler alone")):
        ours = hybrid.sample_hybrid(base, distilled, x, sigmas, handover_steps=handover, seed=SEED)
        alone = phase.sampler(phase.model, x, sigmas, extra_args={"seed": SEED})
        messages.append(_compare_exact(ours, alone, f"sample_hybrid handover {handover}", name))
    return "; ".join(messages) + " (distill_core, float64, 4-step LCM grid)"


def _plot(ctx: BenchContext, samples: dict[str, torch.Tensor], data_samples: torch.Tensor,
          mixture: GaussianMixture):
    """Mode shares of every run next to the data's: where the distilled model's mass went and what came back."""
    rows = {**samples, "data": data_samples}
    modes = torch.arange(mixture.num_components)
    width = 0.8 / len(rows)
    figure, axis = plt.subplots(figsize=(9, 3.8))
    for index, (label, latents) in enumerate(rows.items()):
        shares = metrics.mode_shares(latents.double(), mixture)
        low, high = share_interval(shares * latents.shape[0], latents.shape[0])
        axis.bar(modes + (index - (len(rows) - 1) / 2) * width, shares.numpy(), width, label=label,
                 yerr=torch.stack([shares - low, high - shares]).numpy(), capsize=2)
    axis.axhline(1 / mixture.num_components, color="grey", linestyle=":", label="data's expected share")
    names = [f"{shape}\n{'ab'[k % 2]}" for k, (shape, _) in enumerate(DEMO_COMPONENTS)]
    axis.set_xticks(modes.tolist(), names, fontsize=8)
    axis.set_ylabel("share of samples")
    axis.set_title("Mode shares: base, collapsed distilled model and hybrid runs (unconditional)", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = ctx.plots_dir / f"{NAME}_mode_shares.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
