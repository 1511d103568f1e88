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
mixture): mode recall and normalised mode entropy (diversity across modes), kornia image diversity
of the decoded previews (``distill_core.reference.diversity`` on ``latent_to_rgb``), SWD and NLL gap
(``distill_core.reference.metrics.evaluate_samples``); NFE = counted network calls of each model.
"""
from __future__ import annotations

import functools
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from distill_core.reference import diversity, metrics
from distill_core.reference.demo import DEMO_COMPONENTS, demo_mixture, latent_to_rgb
from distill_core.reference.mixture import GaussianMixture
from distill_core.sampling import hybrid, lcm, tcd

from . import models  # noqa: E402
from .context import BenchContext  # noqa: E402
from .harness import Goal, Section, Table, check, fmt_ratio, fmt_seconds, median, run_interleaved  # noqa: E402
from .samplers import COMFY_EULER, STRIDE_LCM, counting_model, sample  # noqa: E402

NAME = "hybrid"
TITLE = "Hybrid sampling (diversity distillation) on the reference models: base, distilled and hybrid"
COLLAPSED_VARIANT = "demo collapsed (2 of 8 modes)"
SEED = 0  # initial noise and per-step noise of every run
METRIC_SEED = 1  # reference data and projections of the metrics
DATA_SEED = 2  # first of the fresh data sets scored like the samples (the floor)
DATA_DRAWS = 5
BASE_STEPS = 25
HYBRID_STEPS = 4
HANDOVERS = (1, 2)
LIBRARY_CHECK_SAMPLES = 8


def _hybrid_label(handover: int) -> str:
    return f"hybrid {handover}+{HYBRID_STEPS - handover}"


def run(ctx: BenchContext) -> Section:
    num_samples = ctx.pick(16, 64, 256)
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
        return hybrid_node.execute(counted_base, empty, empty, 1.0, "euler", counted_distilled, empty, empty, 1.0, "lcm",
                                  "lcm / tcd grid", HYBRID_STEPS, handover, SEED, {"samples": latent})[0]["samples"]

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

    def score(latents: torch.Tensor) -> dict[str, float]:
        result = metrics.evaluate_samples(latents.double(), data_mixture, None,
                                          torch.Generator().manual_seed(METRIC_SEED))
        return result | {"image_diversity": diversity.image_diversity(latent_to_rgb(latents.float())).overall}

    scores = {label: score(latents) for label, latents in samples.items()}
    data_sets = [data_mixture.sample(num_samples, torch.Generator().manual_seed(DATA_SEED + k))[0].float()
                 for k in range(DATA_DRAWS)]
    draws = sorted(((score(latents), latents) for latents in data_sets), key=lambda pair: pair[0]["swd"])
    data_score, data_samples = draws[DATA_DRAWS // 2]

    table = Table(
        f"Unconditional samples ({num_samples}, same initial noise, CFG 1) of the reference models through ComfyUI: "
        f"base = exact denoiser of the 8-mode demo mixture, distilled = flow map ({flow_map_steps} ODE steps per call) "
        "of its 2-of-8-mode collapsed partner; CPU float32 latents (the analytic models compute in float64); wall "
        f"time median of {repeats} interleaved repeats",
        ["compared", "mode recall", "mode entropy", "image diversity", "SWD", "NLL gap", "NFE (base + distilled)",
         "wall time vs distilled alone", "wall time"])
    for label in runs:
        result = scores[label]
        base_nfe, distilled_nfe = calls[label]
        table.add(label, f"{result['mode_recall']:.2f}", f"{result['mode_entropy']:.3f}",
                  f"{result['image_diversity']:.3f}", f"{result['swd']:.3f}", f"{result['nll_gap']:+.3f}",
                  f"{base_nfe + distilled_nfe} ({base_nfe} + {distilled_nfe})",
                  fmt_ratio(wall[label] / wall[distilled_label]), fmt_seconds(wall[label]))
    table.add(f"data (median of {DATA_DRAWS} fresh sets of {num_samples})", f"{data_score['mode_recall']:.2f}",
              f"{data_score['mode_entropy']:.3f}", f"{data_score['image_diversity']:.3f}", f"{data_score['swd']:.3f}",
              f"{data_score['nll_gap']:+.3f}", "-", "-", "-")
    section.tables.append(table)
    section.plots.append(_plot(ctx, samples, data_samples, data_mixture))

    distilled = scores[distilled_label]
    for k in HANDOVERS:
        label = _hybrid_label(k)
        result = scores[label]
        restored = (result["mode_entropy"] > distilled["mode_entropy"]
                    and result["mode_recall"] >= distilled["mode_recall"])
        section.goals.append(Goal(
            f"{label} restores diversity the distilled model lost (the method's claim: higher mode entropy, no "
            "lower mode recall than the distilled model alone)",
            "met" if restored else "missed",
            f"mode entropy {result['mode_entropy']:.3f} vs {distilled['mode_entropy']:.3f} distilled alone "
            f"(base alone {scores[list(runs)[0]]['mode_entropy']:.3f}, data {data_score['mode_entropy']:.3f}); recall "
            f"{result['mode_recall']:.2f} vs {distilled['mode_recall']:.2f}; at {HYBRID_STEPS} NFE ({k} of the base) "
            f"vs the base's {BASE_STEPS}"))

    def data_range(metric: str, digits: int) -> str:
        values = [result[metric] for result, _ in draws]
        return f"{min(values):.{digits}f} to {max(values):.{digits}f}"

    section.notes += [
        f"Noise scale: {DATA_DRAWS} independent data sets of {num_samples} samples score SWD {data_range('swd', 3)}, "
        f"mode entropy {data_range('mode_entropy', 3)} and mode recall {data_range('mode_recall', 2)}; all runs share "
        "the initial noise, so their differences are paired.",
        "Wall times: the analytic flow map integrates the probability-flow ODE inside every call "
        f"({flow_map_steps} exact-denoiser evaluations), so here a distilled NFE costs far more than a base NFE; "
        "with real networks both cost about the same per NFE and the NFE column is the cost to compare.",
        "The node refuses handover_steps >= steps (the distilled model must take at least one step), so the identity "
        "'handover = steps is the base alone' is checked on distill_core.sampling.hybrid.sample_hybrid, the same schedule "
        "split and seed rule the node uses.",
        "Mode recall counts a mode when it holds at least a quarter of its expected share; mode entropy is the "
        "normalised entropy of the samples' mode histogram (1 = all 8 modes equally often). Image diversity is the "
        "mean pairwise distance of kornia colour/edge descriptors of the 8x8 previews (compare rows, not absolute "
        "values).",
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
        axis.bar(modes + (index - (len(rows) - 1) / 2) * width, shares.numpy(), width, label=label)
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
