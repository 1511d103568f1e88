"""Distribution-matching distillation (``dmd``): step cost against its passes, memory against two-copy training
and LCM, and quality after training against LCM at equal wall time and the teacher at 50 steps.

Everything runs on the demo UNet (a ComfyUI ``UNetModel``, EPS), CPU, float32, LoRA rank 16 on every layer at
least that wide (as Stride's node attaches it); both LoRAs (generator and fake score) on the one network.

* **Passes.** A generator iteration of DMD2 needs: the backward simulation (``d`` generator forwards without
  grad, ``d`` drawn per iteration), the generator forward + backward, the real score (teacher, cond and uncond
  batched into one call), the fake score forward (no grad) and the fake score's update (forward + backward).
  A fake-score iteration (the other ``ttur - 1`` of every ``ttur``) needs the backward simulation, a generator
  forward without grad and the fake score's update. Each pass is timed alone on the inputs of one trainer
  iteration, interleaved with our full iteration (``DMDTrainer.train_step``).
* **Memory.** Peak RSS growth of a generator iteration: ours (one base network, two LoRAs switched on and off),
  two-copy training (the fake score on its own copy of the network, as DMD2's code holds ``fake_unet``), and an
  LCM step at the same batch and rank.
* **Quality.** The trained demo UNet distilled with ``dmd`` and with ``lcm`` for the same wall time, sampled at
  1 and 4 steps (a 4-step and a 1-step generator), against the teacher at 50 steps and the undistilled teacher on
  the same DMD steps, plus the hybrid (one base-model step, then the DMD student: the diversity the student lost,
  measured and restored) and the GAN term's effect (dmd given data latents, with and without DMD2's classifier
  head): SWD, NLL gap, mode recall, mode entropy and mode TV with 95% intervals over independent repeats.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distill_core.reference import metrics
from distill_core.reference.demo import DEMO_CLASS_NAMES, demo_mixture
from distill_core.reference.statistics import Estimate, judge, paired_difference, verdict
from distill_core.spaces import per_sample
from distill_core.training import dmd
from distill_core.training.config import DistillConfig, TrainingData
from distill_core.training.lora import ensure_autograd_compatible, lora_state_dict
from distill_core.training.memory import frozen_parameters
from distill_core.training.trainer import STUDENT, LoraTrainer, build_trainer, step_seed

from . import models
from .context import BenchContext
from .harness import (
    Goal,
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
    spread,
)
from .samplers import COMFY_EULER, SamplerSpec
from .training import CLOCK_NAMES, PROMPT, RANK, SEED, _class_samples, cpu_timed, goal_clock, model_conds, noise_space

NAME = "dmd"
TITLE = "Distribution-matching distillation (dmd): step cost, memory, quality vs LCM (demo UNet)"
GOAL_PHYSICAL = 1.15
TTUR = 5  # DMD2's SDXL runs
GUIDANCE = 1.0  # the real score's CFG: 1 keeps the target distribution the data's, so the reference can score it
DATASET_SIZE = 16


def _data(ctx: BenchContext, model: Any, side: int) -> TrainingData:
    shape = (4, side, side)
    latents = torch.randn(DATASET_SIZE, *shape, generator=torch.Generator().manual_seed(SEED))
    return TrainingData(conds=[model_conds(ctx, model, PROMPT, shape)], uncond=model_conds(ctx, model, "", shape),
                        latents=latents)


def _config(objective: str, batch: int, **overrides: Any) -> DistillConfig:
    settings: dict[str, Any] = {"objective": objective, "rank": RANK, "batch": batch, "skip_small_layers": True,
                                "seed": SEED}
    if objective == "dmd":
        settings |= {"ttur": TTUR, "guidance_scale": GUIDANCE, "generator_steps": 4}
    return DistillConfig(**(settings | overrides))


def _trainer(ctx: BenchContext, model: Any, config: DistillConfig, data: TrainingData) -> LoraTrainer:
    base = model.model
    return build_trainer(lambda x, sigma, cond: base.apply_model(x, sigma, **cond), base.diffusion_model,
                         noise_space(ctx, model), config, data)


def _step_with(trainer: dmd.DMDTrainer, generator_turn: bool, depth: int) -> int:
    """The first iteration index of the wanted kind whose backward simulation runs ``depth`` generator steps."""
    config = trainer.config
    for step in range(10_000):
        drawn = int(torch.randint(len(trainer.timesteps), (1,),
                                  generator=torch.Generator().manual_seed(step_seed(config.seed, 0, step))))
        if (step % config.ttur == 0) == generator_turn and drawn == depth:
            return step
    raise AssertionError(f"no iteration with backward-simulation depth {depth}")


class DMDPasses:
    """The passes of one DMD iteration, each callable alone on that iteration's own inputs."""

    def __init__(self, trainer: dmd.DMDTrainer, step: int, depth: int) -> None:
        self.trainer, self.depth = trainer, depth
        self.batch = trainer.sample_batch(step)
        batch = self.batch
        x = trainer.generate(batch, grad=False)
        space = trainer.space
        self.x_t = space.noise(x, batch.dm_noise, per_sample(space.sigma_of(batch.dm_timesteps), x))
        self.cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)
        self.sample = x

    def backward_simulation(self) -> None:
        """``d`` generator forwards without grad (the cost of the rollout; its values do not matter here)."""
        trainer, batch = self.trainer, self.batch
        for index in range(self.depth):
            trainer.run_role(STUDENT, batch.inputs, trainer.timesteps[index].expand(len(batch.inputs)), batch.cond)

    def generator_forward(self) -> None:
        self.trainer.generate(self.batch, grad=False)

    def generator_forward_backward(self) -> None:
        self.trainer.optimizers[STUDENT].zero_grad(set_to_none=True)
        x = self.trainer.generate(self.batch, grad=True)
        (x * self.cotangent).sum().backward()

    def real_score(self) -> None:
        self.trainer.real_x0(self.x_t, self.batch.dm_timesteps, self.batch.cond, self.batch.uncond)

    def fake_score(self) -> None:
        self.trainer.run_role(dmd.FAKE, self.x_t, self.batch.dm_timesteps, self.batch.cond)

    def fake_update(self) -> None:
        self.trainer.optimizers[dmd.FAKE].zero_grad(set_to_none=True)
        self.trainer.fake_loss(self.sample, self.batch).backward()


@dataclass
class IterationTiming:
    kind: str
    passes: dict[str, dict[str, list[float]]]  # pass name -> clock -> samples (includes "ours")

    def seconds(self, clock: str) -> dict[str, float]:
        return {name: median(values[clock]) for name, values in self.passes.items()}

    def limit(self, clock: str) -> float:
        return sum(value for name, value in self.seconds(clock).items() if name != "ours")

    def ratio(self, clock: str) -> float:
        return self.seconds(clock)["ours"] / self.limit(clock)


def _time_iterations(ctx: BenchContext, section: Section, side: int, batch: int, setting: str) -> list[IterationTiming]:
    """Our generator and fake-score iterations against the sums of their passes."""
    repeats = ctx.pick(2, 11, 21)
    model, _ = models.demo_unet_model(ctx)
    trainer = _trainer(ctx, model, _config("dmd", batch), _data(ctx, model, side))
    check(isinstance(trainer, dmd.DMDTrainer), "build_trainer did not give a DMDTrainer for objective 'dmd'")
    depth = 1
    timings = []
    try:
        with torch.inference_mode(False), frozen_parameters(trainer.loraset.root):
            for kind, generator_turn in (("generator iteration", True), ("fake-score iteration", False)):
                step = _step_with(trainer, generator_turn, depth)
                passes = DMDPasses(trainer, step, depth)
                candidates: dict[str, Callable[[], Any]] = {
                    f"backward simulation ({depth} generator forward)": passes.backward_simulation}
                if generator_turn:
                    candidates |= {"generator forward + backward": passes.generator_forward_backward,
                                   "real score (teacher)": passes.real_score, "fake score forward": passes.fake_score}
                else:
                    candidates["generator forward"] = passes.generator_forward
                candidates["fake-score update (forward + backward)"] = passes.fake_update
                candidates["ours"] = lambda step=step: trainer.train_step(step)
                ctx.log(f"{NAME}: {kind}, 4x{side}x{side} b{batch} ({repeats} repeats)")
                timings.append(IterationTiming(kind, run_interleaved(
                    {name: cpu_timed(fn) for name, fn in candidates.items()}, repeats)))
    finally:
        trainer.detach()
    section.checks.append(f"{setting}: the passes are timed on the inputs of the trainer's own iterations "
                          f"(sample_batch of a generator and of a fake-score iteration with backward-simulation depth "
                          f"{depth}); the real score runs {'one call (CFG 1)' if GUIDANCE == 1 else 'cond + uncond'}")
    return timings


def _iteration_table(section: Section, timings: list[IterationTiming], setting: str) -> Table:
    clock = goal_clock()
    name = CLOCK_NAMES[clock]
    table = Table(f"Our DMD iteration vs the passes it needs, each timed alone on the same inputs ({setting}; CPU, "
                  f"float32), medians; times are {name}s. The TTUR row averages one generator and {TTUR - 1} "
                  f"fake-score iterations (ttur {TTUR})",
                  ["compared", f"ratio ({name})", "ratio (wall time)", "our iteration", "sum of passes", "passes",
                   "spread (ours)"])
    for timing in timings:
        seconds = timing.seconds(clock)
        passes = "; ".join(f"{key} {fmt_seconds(value)}" for key, value in seconds.items() if key != "ours")
        table.add(f"{timing.kind} (DMDTrainer.train_step) vs sum of passes", fmt_ratio(timing.ratio(clock)),
                  fmt_ratio(timing.ratio("wall")), fmt_seconds(seconds["ours"]), fmt_seconds(timing.limit(clock)),
                  passes, f"+-{100 * spread(timing.passes['ours'][clock]):.0f}%")
    generator, fake = timings

    def averaged(clock: str) -> tuple[float, float]:
        ours = (generator.seconds(clock)["ours"] + (TTUR - 1) * fake.seconds(clock)["ours"]) / TTUR
        return ours, (generator.limit(clock) + (TTUR - 1) * fake.limit(clock)) / TTUR

    ours, limit = averaged(clock)
    wall_ours, wall_limit = averaged("wall")
    table.add(f"TTUR {TTUR} average", fmt_ratio(ours / limit), fmt_ratio(wall_ours / wall_limit), fmt_seconds(ours),
              fmt_seconds(limit), "", "")
    worst = max(timing.ratio(clock) for timing in timings)
    section.goals.append(Goal(f"DMD iteration <= {GOAL_PHYSICAL}x the sum of its required passes",
                              "met" if worst <= GOAL_PHYSICAL else "missed",
                              "; ".join(f"{timing.kind} {fmt_ratio(timing.ratio(clock))} {name} "
                                        f"({fmt_ratio(timing.ratio('wall'))} wall)" for timing in timings)
                              + f" on {setting}"))
    return table


def _two_copy(ctx: BenchContext, model: Any, config: DistillConfig, data: TrainingData) -> dmd.DMDTrainer:
    """A DMD trainer whose fake score runs on its own copy of the network (DMD2's separate ``fake_unet``)."""
    copy_base = copy.deepcopy(model.model)  # before any LoRA is attached
    base = model.model
    trainer: dmd.DMDTrainer | None = None

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        on_copy = trainer is not None and trainer.adapters[dmd.FAKE].is_enabled
        return (copy_base if on_copy else base).apply_model(x, sigma, **cond)

    trainer = build_trainer(denoise, base.diffusion_model, noise_space(ctx, model), config, data)
    trainer.adapters[dmd.FAKE].remove()
    trainer.add_role(dmd.FAKE, dmd.attach_fake_score_lora(copy_base.diffusion_model, config), config.fake_lr)
    trainer.copy_base = copy_base  # held with the trainer
    return trainer


def _memory_table(ctx: BenchContext, section: Section, side: int, batch: int, setting: str) -> Table:
    rounds = ctx.pick(1, 2, 3)
    data = {}
    grown: dict[str, list[int]] = {"dmd (one network)": [], "dmd (two copies)": [], "lcm": []}
    held: dict[str, int] = {}
    for label in grown:
        model, _ = models.demo_unet_model(ctx)
        data = _data(ctx, model, side)
        if label == "lcm":
            trainer = _trainer(ctx, model, _config("lcm", batch), data)
            step = 0
        elif label == "dmd (two copies)":
            trainer = _two_copy(ctx, model, _config("dmd", batch), data)
            step = _step_with(trainer, True, 1)
        else:
            trainer = _trainer(ctx, model, _config("dmd", batch), data)
            step = _step_with(trainer, True, 1)
        networks = [model.model.diffusion_model] + ([trainer.copy_base.diffusion_model] if hasattr(trainer, "copy_base")
                                                     else [])
        try:
            with torch.inference_mode(False), frozen_parameters(model.model.diffusion_model):
                if hasattr(trainer, "copy_base"):
                    for parameter in trainer.copy_base.diffusion_model.parameters():
                        parameter.requires_grad_(False)
                trainer.train_step(step)  # optimizer states exist from here on
                for _ in range(rounds):
                    grown[label].append(peak_rss_growth(lambda trainer=trainer, step=step: trainer.train_step(step))[1])
            held[label] = sum(p.numel() * p.element_size() for network in networks for p in network.parameters())
            held[label] += sum(p.numel() * p.element_size() * 3 for p in trainer.params)  # + AdamW's two moments
        finally:
            trainer.detach()
    table = Table(f"Memory of one training iteration ({setting}; CPU, float32): peak RSS growth of a generator "
                  f"iteration (median of {rounds}), and the weights a run holds (networks + LoRAs + AdamW moments)",
                  ["trainer", "peak RSS growth", "weights held", "held vs dmd (one network)"])
    ours = held["dmd (one network)"]
    for label in grown:
        table.add(label, fmt_bytes(median(grown[label])), fmt_bytes(held[label]), fmt_ratio(held[label] / ours))
    section.goals.append(Goal("dmd holds one base network", "met" if held["dmd (two copies)"] > ours else "missed",
                              f"{fmt_bytes(ours)} held vs {fmt_bytes(held['dmd (two copies)'])} with a second copy for "
                              f"the fake score; LCM at the same batch and rank {fmt_bytes(held['lcm'])}"))
    return table


def run(ctx: BenchContext) -> Section:
    check(peak_rss_available(), "this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    side, batch = ctx.pick((8, 2), (8, 8), (8, 16))
    _, trained = models.demo_unet_model(ctx)
    setting = (f"demo UNet ({'trained weights' if trained else 'random weights of the demo architecture'}), 4x{side}x"
               f"{side} latent, batch {batch}, LoRA rank {RANK}")
    section.tables.append(_iteration_table(section, _time_iterations(ctx, section, side, batch, setting), setting))
    section.tables.append(_memory_table(ctx, section, side, batch, setting))
    quality = _quality_table(ctx, section)
    if quality is not None:
        section.tables.append(quality)
    closer = _closer_table(ctx, section)
    if closer is not None:
        section.tables.append(closer)
    return section


# ------------------------------------------------------------------------------------------
# Quality: dmd vs lcm at equal training time, against the teacher at 50 steps
# ------------------------------------------------------------------------------------------
TEACHER_STEPS = 50
QUALITY_LR = 1e-3  # lower rates left the student within noise of the undistilled teacher at these budgets
LCM_LR = 3e-4
GAN_FEATURES = "middle_block.0"  # the demo UNet's bottleneck (4x4) ResBlock, as DMD2 reads the fake UNet's mid block
GAN_DATASET = 1024
GOAL_DMD_SWD = 1.25
GOAL_HYBRID_ENTROPY = 0.05


def _train_node(ctx: BenchContext, model: Any, data: dict, objective: str, steps: int, batch: int,
                generator_steps: int = 4, **dmd_settings: Any) -> tuple:
    """Stride Distill LoRA as the executor calls it: ``(student MODEL, lora, losses, CPU seconds)``; ``dmd_settings``
    override the dmd inputs (``ttur``, ``dmd_regression``)."""
    settings: dict[str, Any] = {
        "model": model, "data": data, "objective": objective, "steps": steps, "rank": RANK, "alpha": 0.0,
        "learning_rate": QUALITY_LR if objective == "dmd" else LCM_LR, "batch_size": batch, "guidance_min": 0.0,
        "guidance_max": 0.0, "loss": "huber", "gradient_checkpointing": False, "seed": SEED, "save_every": 0,
        "lora_name": f"bench_quality_{objective}{generator_steps if objective == 'dmd' else ''}", "resume": False}
    if objective == "dmd":
        settings |= {"dmd_guidance": GUIDANCE, "ttur": TTUR, "generator_steps": generator_steps} | dmd_settings
        settings["lora_name"] += "".join(f"_{name}{value:g}" for name, value in dmd_settings.items())
    started = time.process_time()
    output = ctx.node("StrideDistillLoRA").execute(**settings)
    return output[0], output[1], output[2], time.process_time() - started


def _train_with_latents(ctx: BenchContext, model: Any, steps: int, batch: int, gan: bool) -> tuple[Any, float]:
    """A 4-step dmd run given paired class-conditional data latents (the with-images mode), with or without
    DMD2's GAN term on the fake score's bottleneck features: ``(student MODEL, CPU seconds)``."""
    mixture = demo_mixture()
    labels = torch.arange(GAN_DATASET) % len(DEMO_CLASS_NAMES)
    latents = mixture.sample(GAN_DATASET, torch.Generator().manual_seed(SEED), labels)[0].float()
    shape = mixture.latent_shape
    class_conds = [model_conds(ctx, model, name, shape) for name in DEMO_CLASS_NAMES]
    data = TrainingData(conds=[class_conds[label] for label in labels.tolist()],
                        uncond=model_conds(ctx, model, "", shape), latents=latents, paired=True)
    config = _config("dmd", batch, steps=steps, lr=QUALITY_LR, gan_features=GAN_FEATURES if gan else None)
    ensure_autograd_compatible(model.model.diffusion_model)
    trainer = _trainer(ctx, model, config, data)
    try:
        started = time.process_time()
        result = trainer.train()
        seconds = time.process_time() - started
        check(len(result.losses["fake"]) == steps and all(math.isfinite(v) for v in result.losses["fake"]),
              f"dmd with data latents (GAN {'on' if gan else 'off'}): the fake-score losses are not all finite")
        state = lora_state_dict(trainer.adapters[STUDENT])
    finally:
        trainer.detach()
    return ctx.stride_module("nodes.compat").apply_lora(model, state, 1.0), seconds


def _at_steps(lora: dict, steps: int) -> dict:
    """A LoRA dict whose recommended sampling takes ``steps`` steps (a dmd LoRA: its first ``steps`` timesteps)."""
    recommended = json.loads(lora["metadata"]["stride.recommended"]) | {"steps": steps}
    if recommended["timesteps"] is not None:
        recommended["timesteps"] = recommended["timesteps"][:steps]
    return {**lora, "metadata": {**lora["metadata"], "stride.recommended": json.dumps(recommended)}}


def _lora_spec(label: str, lora: dict) -> SamplerSpec:
    """The LoRA's own sampling (Stride Distilled Sampling) as a benchmark sampler spec."""
    def build(ctx: BenchContext, model: Any, steps: int) -> tuple[Any, torch.Tensor]:
        output = ctx.node("StrideDistilledSampling").execute(model, _at_steps(lora, steps))
        return output[0], output[1]

    return SamplerSpec(label, "Stride", True, False, "the LoRA's trained schedule", build)


def _hybrid_samples(ctx: BenchContext, base: Any, student: Any, spec: SamplerSpec, noise: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """One base (teacher) euler step on the student's first timestep, the student for the rest (CFG 1 both)."""
    import comfy.samplers

    sampler, sigmas = spec.build(ctx, base, 4)
    empty = models.class_prompt(ctx, "")
    samples = torch.empty_like(noise)
    for index, name in enumerate(DEMO_CLASS_NAMES):
        chosen = labels == index
        prompt = models.class_prompt(ctx, name)
        guiders = []
        for model in (base, student):
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(prompt, empty)
            guider.set_cfg(1.0)
            guiders.append(guider)
        hybrid = ctx.node("StrideHybridGuider").execute(guiders[0], guiders[1], comfy.samplers.sampler_object("euler"),
                                                         1)[0]
        with torch.inference_mode():
            samples[chosen] = hybrid.sample(noise[chosen], torch.zeros_like(noise[chosen]), sampler, sigmas.clone(),
                                            seed=SEED).cpu()
    check(bool(torch.isfinite(samples).all()), "hybrid: NaN or inf in the samples")
    return samples


def _paired(a: dict, b: dict, figures: tuple[str, ...] = ("swd", "nll_gap", "mode_entropy", "mode_tv")) -> str:
    """``a - b`` per figure, paired (same noises, same references), with 95% half-widths."""
    return ", ".join(f"{name.replace('_', ' ')} {paired_difference(a[name], b[name]).format(3, True)}"
                     for name in figures)


def _quality_table(ctx: BenchContext, section: Section) -> Table | None:
    """dmd (4-step and 1-step generators) and lcm LoRAs of the trained demo UNet after the same CPU time, the
    hybrid, and the GAN term's effect (dmd with data latents, with and without it)."""
    model, trained = models.demo_unet_model(ctx)
    swd_goal = f"4-step dmd student SWD <= {GOAL_DMD_SWD}x teacher {TEACHER_STEPS}-step SWD"
    entropy_goal = f"hybrid mode entropy within {GOAL_HYBRID_ENTROPY:.0%} of the base model's ({TEACHER_STEPS} steps)"
    if not trained:
        for goal in (swd_goal, entropy_goal):
            section.goals.append(Goal(goal, "undecided", "the demo UNet's trained weights are not built; run "
                                                         "scripts/build_demo_model.py"))
        return None
    dmd_steps, batch = ctx.pick(20, 300, 600), ctx.pick(4, 16, 16)
    mixture = demo_mixture()
    prompts = [models.class_prompt(ctx, name) for name in DEMO_CLASS_NAMES]
    data = ctx.node("StrideDistillDataset").execute(prompts[0], models.class_prompt(ctx, ""), prompt_2=prompts[1],
                                                    prompt_3=prompts[2], prompt_4=prompts[3], width=64, height=64)[0]
    ctx.log(f"{NAME}: dmd, 4-step and 1-step generators, {dmd_steps} iterations each (batch {batch})")
    dmd_student, dmd_lora, dmd_losses, dmd_seconds = _train_node(ctx, model, data, "dmd", dmd_steps, batch)
    dmd1_student, dmd1_lora, _dmd1_losses, dmd1_seconds = _train_node(ctx, model, data, "dmd", dmd_steps, batch, 1)
    probe_steps = ctx.pick(2, 10, 10)
    *_, probe_seconds = _train_node(ctx, model, data, "lcm", probe_steps, batch)
    lcm_steps = max(1, round(dmd_seconds / (probe_seconds / probe_steps)))
    ctx.log(f"{NAME}: lcm, {lcm_steps} steps (the 4-step dmd run's CPU time)")
    lcm_student, lcm_lora, _lcm_losses, lcm_seconds = _train_node(ctx, model, data, "lcm", lcm_steps, batch)
    check(all(math.isfinite(v) for v in dmd_losses["fake"]) and len(dmd_losses["fake"]) == dmd_steps,
          "the dmd run's fake-score losses are not all finite")
    ctx.log(f"{NAME}: dmd with data latents, without and with the GAN term ({dmd_steps} iterations each)")
    plain_student, plain_seconds = _train_with_latents(ctx, model, dmd_steps, batch, gan=False)
    gan_student, gan_seconds = _train_with_latents(ctx, model, dmd_steps, batch, gan=True)

    repeats, per_repeat = ctx.pick(2, metrics.REPEATS, metrics.REPEATS), ctx.pick(8, 64, 256)
    per_class = repeats * per_repeat // len(DEMO_CLASS_NAMES)
    labels = torch.arange(len(DEMO_CLASS_NAMES)).repeat_interleave(per_class)
    noise = torch.randn(len(labels), *mixture.latent_shape, generator=torch.Generator().manual_seed(SEED + 1))
    dmd_spec, dmd1_spec, lcm_spec = _lora_spec("dmd", dmd_lora), _lora_spec("dmd 1", dmd1_lora), _lora_spec("lcm",
                                                                                                             lcm_lora)
    teacher_label, undistilled_label = f"teacher, {TEACHER_STEPS} steps (ComfyUI euler)", "teacher, 4 DMD steps"
    student_label, hybrid_label = "dmd student, 4 steps", "hybrid: 1 teacher step + 3 dmd student steps"
    plain_label, gan_label = "dmd student, 4 steps, data latents", f"dmd student + GAN ({GAN_FEATURES}), 4 steps"
    runs = {
        teacher_label: _class_samples(ctx, model, COMFY_EULER, TEACHER_STEPS, noise, labels),
        undistilled_label + " (undistilled)": _class_samples(ctx, model, dmd_spec, 4, noise, labels),
        student_label: _class_samples(ctx, dmd_student, dmd_spec, 4, noise, labels),
        "lcm student, 4 steps (LCM grid)": _class_samples(ctx, lcm_student, lcm_spec, 4, noise, labels),
        hybrid_label: _hybrid_samples(ctx, model, dmd_student, dmd_spec, noise, labels),
        plain_label: _class_samples(ctx, plain_student, dmd_spec, 4, noise, labels),
        gan_label: _class_samples(ctx, gan_student, dmd_spec, 4, noise, labels),
        "teacher, 1 DMD step (undistilled)": _class_samples(ctx, model, dmd1_spec, 1, noise, labels),
        "dmd student, 1-step generator": _class_samples(ctx, dmd1_student, dmd1_spec, 1, noise, labels),
        "lcm student, 1 step (LCM grid)": _class_samples(ctx, lcm_student, lcm_spec, 1, noise, labels),
    }

    def score(samples: torch.Tensor) -> dict:
        return metrics.evaluate(samples.double(), mixture, labels, torch.Generator().manual_seed(SEED + 2), repeats)

    scores = {label: score(samples) for label, samples in runs.items()}
    scores[f"data ({len(labels)} fresh samples, same labels)"] = score(
        mixture.sample(len(labels), torch.Generator().manual_seed(SEED + 3), labels)[0])
    teacher = scores[teacher_label]
    table = Table(
        f"Quality after the same CPU time of training ({fmt_seconds(dmd_seconds)} dmd 4-step generator = {dmd_steps} "
        f"iterations, ttur {TTUR}, lr {QUALITY_LR:g}; {fmt_seconds(lcm_seconds)} lcm = {lcm_steps} steps, lr "
        f"{LCM_LR:g}; the 1-step generator {dmd_steps} iterations, {fmt_seconds(dmd1_seconds)}; with data latents "
        f"{fmt_seconds(plain_seconds)} without and {fmt_seconds(gan_seconds)} with the GAN term; batch {batch}, rank "
        f"{RANK}, real score CFG {GUIDANCE:g}) of the trained demo UNet, through Stride Distill LoRA (data latents: "
        f"DMDTrainer): {len(labels)} class-conditional samples ({per_class} per class, CFG 1, same noise) scored in "
        f"{repeats} repeats of {per_repeat} (NLL gap: per sample; mode TV: total variation of the mode shares to the "
        "true weights); mean ± 95% half-width; CPU, float32",
        ["compared", "SWD", f"SWD - teacher {TEACHER_STEPS}-step (paired)", "NLL gap", "mode recall", "mode entropy",
         f"entropy - teacher {TEACHER_STEPS}-step (paired)", "mode TV"])
    for label, result in scores.items():
        table.add(label, result["swd"].format(), paired_difference(result["swd"], teacher["swd"]).format(3, True),
                  result["nll_gap"].format(3, True), result["mode_recall"].format(2), result["mode_entropy"].format(),
                  paired_difference(result["mode_entropy"], teacher["mode_entropy"]).format(3, True),
                  result["mode_tv"].format())
    student, hybrid = scores[student_label], scores[hybrid_label]
    excess = paired_difference(student["swd"], teacher["swd"], scale=GOAL_DMD_SWD)
    section.goals.append(Goal(f"{swd_goal} (paired 95% interval of dmd SWD - {GOAL_DMD_SWD} x teacher SWD)",
                              judge(excess, 0.0),
                              f"dmd {student['swd'].format()} vs teacher {teacher['swd'].format()}: "
                              f"{excess.format(signed=True)}"))
    shortfall = paired_difference(hybrid["mode_entropy"], teacher["mode_entropy"], scale=1 - GOAL_HYBRID_ENTROPY)
    section.goals.append(Goal(f"{entropy_goal} (paired 95% interval of hybrid entropy - "
                              f"{1 - GOAL_HYBRID_ENTROPY:g} x base entropy >= 0)",
                              judge(shortfall, 0.0, at_most=False),
                              f"hybrid {hybrid['mode_entropy'].format()} vs base {teacher['mode_entropy'].format()}: "
                              f"{shortfall.format(signed=True)}; the 4-step dmd student alone "
                              f"{student['mode_entropy'].format()}"))
    lost = paired_difference(student["mode_entropy"], teacher["mode_entropy"])
    section.notes += [
        f"Diversity, measured and restored (paired, same noises and references). Measured: 4-step dmd student - "
        f"teacher {TEACHER_STEPS}-step: {_paired(student, teacher)} (entropy: {verdict(lost)}). Restored: hybrid - "
        f"teacher: {_paired(hybrid, teacher)}; hybrid - dmd student: {_paired(hybrid, student)}. 1-step generator - "
        f"teacher: {_paired(scores['dmd student, 1-step generator'], teacher)}.",
        "What dmd changed, paired against the undistilled teacher on the same DMD steps: 4 steps "
        f"{_paired(student, scores[undistilled_label + ' (undistilled)'])}; 1 step "
        f"{_paired(scores['dmd student, 1-step generator'], scores['teacher, 1 DMD step (undistilled)'])}. The real "
        "score runs at CFG 1 so that every row is scored against the same data distribution.",
        f"GAN term (DMD2's classifier head on the fake score's {GAN_FEATURES} features, real latents noised to "
        f"t ~ U{{0..999}}, weights 5e-3 generator / 1e-2 classifier), paired, same data latents and iterations: "
        f"with - without {_paired(scores[gan_label], scores[plain_label])}; its CPU time "
        f"{fmt_ratio(gan_seconds / plain_seconds)} the run's without it.",
    ]
    return table


CLOSER_REPEATS = 16  # paired repeats: a student-teacher SWD difference of ~0.03 needs a half-width under that
REGRESSION_WEIGHT = 1.0  # the paired regression's weight in the recipe the goals judge (the last setting)
CLOSER_SETTINGS = (("DMD2 SDXL ratio: ttur 5", {"ttur": 5}), ("DMD2 SD1.5 ratio: ttur 10", {"ttur": 10}),
                   ("ttur 10 + DMD's paired regression 0.25 (its lambda_reg)", {"ttur": 10, "dmd_regression": 0.25}),
                   (f"ttur 10 + paired regression {REGRESSION_WEIGHT:g}",
                    {"ttur": 10, "dmd_regression": REGRESSION_WEIGHT}))


def _closer_table(ctx: BenchContext, section: Section) -> Table | None:
    """Issue #14's test: is a short in-graph run's 4-step student closer to the data than the undistilled teacher on
    the same 4 DMD steps, in SWD and NLL gap? Three settings of Stride Distill LoRA, the same iterations each."""
    model, trained = models.demo_unet_model(ctx)
    goal = "a short run's 4-step dmd student closer to the data than the undistilled 4-step teacher (SWD and NLL gap)"
    if not trained:
        section.goals.append(Goal(goal, "undecided", "the demo UNet's trained weights are not built"))
        return None
    iterations, batch = ctx.pick(20, 1200, 1200), ctx.pick(4, 16, 16)
    repeats, per_repeat = ctx.pick(2, CLOSER_REPEATS, CLOSER_REPEATS), ctx.pick(8, 512, 512)
    mixture = demo_mixture()
    prompts = [models.class_prompt(ctx, name) for name in DEMO_CLASS_NAMES]
    data = ctx.node("StrideDistillDataset").execute(prompts[0], models.class_prompt(ctx, ""), prompt_2=prompts[1],
                                                    prompt_3=prompts[2], prompt_4=prompts[3], width=64, height=64)[0]
    labels = torch.arange(len(DEMO_CLASS_NAMES)).repeat_interleave(repeats * per_repeat // len(DEMO_CLASS_NAMES))
    noise = torch.randn(len(labels), *mixture.latent_shape, generator=torch.Generator().manual_seed(SEED + 4))

    def score(samples: torch.Tensor) -> dict:
        return metrics.evaluate(samples.double(), mixture, labels, torch.Generator().manual_seed(SEED + 5), repeats)

    runs = []
    for label, settings in CLOSER_SETTINGS:
        ctx.log(f"{NAME}: closer than the teacher? {label}, {iterations} iterations")
        student, lora, _losses, seconds = _train_node(ctx, model, data, "dmd", iterations, batch, **settings)
        runs.append((label, student, _lora_spec(label, lora), seconds))
    spec = runs[0][2]  # every run's LoRA samples on DMD2's 4-step timesteps
    teacher = score(_class_samples(ctx, model, spec, 4, noise, labels))
    many = score(_class_samples(ctx, model, COMFY_EULER, TEACHER_STEPS, noise, labels))
    table = Table(
        f"Closer to the data than the undistilled teacher? Stride Distill LoRA (dmd, 4-step generator, {iterations} "
        f"iterations, batch {batch}, rank {RANK}, lr {QUALITY_LR:g}, real score CFG {GUIDANCE:g}) on the trained "
        f"demo UNet; {len(labels)} class-conditional samples, 4 DMD steps (999, 749, 499, 249), scored in {repeats} "
        f"repeats of {per_repeat}, each against its own fresh data set; student - teacher paired (same noises and "
        "references); mean ± 95% half-width; CPU, float32",
        ["4 DMD steps", "CPU time", "SWD", "SWD - teacher (paired)", "NLL gap", "NLL gap - teacher (paired)",
         "mode entropy", "closer in both?", f"SWD - {GOAL_DMD_SWD:g} x teacher {TEACHER_STEPS}-step (paired)"])
    table.add(f"teacher, {TEACHER_STEPS} steps (ComfyUI euler; not 4 DMD steps)", "", many["swd"].format(), "",
              many["nll_gap"].format(3, True), "", many["mode_entropy"].format(), "", "")
    table.add("teacher (undistilled)", "", teacher["swd"].format(), "", teacher["nll_gap"].format(3, True), "",
              teacher["mode_entropy"].format(), "", "")
    verdicts = []
    for label, student_model, _spec, seconds in runs:
        result = score(_class_samples(ctx, student_model, spec, 4, noise, labels))
        swd = paired_difference(result["swd"], teacher["swd"])
        nll = paired_difference(result["nll_gap"], teacher["nll_gap"])
        status = _closer(swd, nll, result["nll_gap"], teacher["nll_gap"])
        excess = paired_difference(result["swd"], many["swd"], scale=GOAL_DMD_SWD)
        verdicts.append((label, status, swd, nll))
        table.add(label, fmt_seconds(seconds), result["swd"].format(), swd.format(3, True),
                  result["nll_gap"].format(3, True), nll.format(3, True), result["mode_entropy"].format(),
                  {"met": "yes", "missed": "no"}.get(status, status), excess.format(3, True))
    label, status, swd, nll = verdicts[-1]
    section.goals.append(Goal(f"4-step dmd student SWD <= {GOAL_DMD_SWD}x teacher {TEACHER_STEPS}-step SWD, at "
                              f"{iterations} iterations with ttur 10 and the paired regression "
                              f"{REGRESSION_WEIGHT:g} (paired 95% interval of dmd SWD - {GOAL_DMD_SWD} x teacher SWD)",
                              judge(excess, 0.0), f"{excess.format(signed=True)}; teacher {TEACHER_STEPS}-step "
                                                  f"{many['swd'].format()}"))
    others = "; ".join(f"{other}: {other_status} (SWD {other_swd.format(3, True)}, NLL gap "
                       f"{other_nll.format(3, True)})" for other, other_status, other_swd, other_nll in verdicts[:-1])
    section.goals.append(Goal(f"{goal}, with ttur 10 and the paired regression {REGRESSION_WEIGHT:g} (whole paired "
                              "intervals: SWD - teacher < 0, NLL gap - teacher > 0 and the gap nearer 0)", status,
                              f"SWD - teacher {swd.format(3, True)}, NLL gap - teacher {nll.format(3, True)}; the "
                              f"other settings: {others}"))
    return table


def _closer(swd: Estimate, nll: Estimate, student_gap: Estimate, teacher_gap: Estimate) -> str:
    """``met`` when the student is closer to the data than the teacher in SWD and NLL gap by whole intervals (its
    gap above the teacher's negative one and nearer 0), ``missed`` when one is farther by a whole interval."""
    nearer = ("met" if student_gap.high < -teacher_gap.high else
              "missed" if student_gap.low > -teacher_gap.low else "undecided")
    verdicts = (judge(swd, 0.0), judge(nll, 0.0, at_most=False), nearer)
    return "met" if all(v == "met" for v in verdicts) else "missed" if "missed" in verdicts else "undecided"
