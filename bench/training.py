"""In-graph LoRA distillation: step cost against its physical limit, the diffusers recipe and ComfyUI's
TrainLoraNode; distillation quality after N steps; step time and memory vs latent size and batch.

Everything runs on the demo UNet (a ComfyUI ``UNetModel``, EPS; the shipped trained weights, or the
same architecture with random weights where only time and memory are measured) on the CPU in
float32, with LoRA rank 16 on every layer at least that wide (as Stride's node attaches it).

* **Physical limit.** One LCM distillation step needs, per sample, a teacher forward with cond and
  uncond (batched into one call, LoRA off, no grad), a target forward (student, no grad; the
  trainer folds the LoRA into each layer's weight for it, ``LoraSet.merged``) and a student
  forward + backward. Each pass is timed alone on exactly the inputs of a trainer step
  (``DistillTrainer.sample_batch(step)``), interleaved with our full step (``train_step``:
  the passes plus batch sampling, the DDIM jump, loss, clipping and AdamW).
* **Reference recipe.** The loop of diffusers' ``train_lcm_distill_lora_sd_wds.py`` written here on
  the same model, LoRA and batch: student forward first (its graph held), the teacher as a second
  model copy (as that script loads ``teacher_unet``) called once for cond and once for uncond,
  target (through the LoRA's low-rank path, as peft runs an unmerged adapter), loss, backward,
  clipping, AdamW.
* **ComfyUI's TrainLoraNode** (plain LoRA: one forward + backward per step, the in-graph anchor)
  against Stride's ``StrideDistillLoRA`` node, both called as the executor calls them, on separate
  copies of the same model with the same batch, rank and data.
* **Quality.** The trained demo UNet distilled with the LCM objective, then sampled class-conditionally.
* **Scaling.** Our step at latent sides 8, 16, 32 and batches 1, 4, 16.

Memory is the peak resident set size of the process during a call above its size just before (as in
the scaling benchmark: ``VmHWM`` reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from distill_core.reference import demo, metrics
from distill_core.reference.demo import DEMO_CLASS_NAMES, demo_mixture
from distill_core.reference.mixture import GaussianMixture
from distill_core.reference.statistics import judge, paired_difference
from distill_core.spaces import per_sample
from distill_core.training import objectives
from distill_core.training.conditioning import cond_cat
from distill_core.training.config import DistillConfig, TrainingData
from distill_core.training.lora import LoraSet, attach_lora, lora_state_dict
from distill_core.training.memory import frozen_parameters
from distill_core.training.trainer import DistillTrainer

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
from .samplers import COMFY_EULER, STRIDE_LCM, sample
from .scaling import plot_step_time_memory, scaling_table

NAME = "training"
TITLE = "In-graph LoRA distillation: step cost, memory, quality and scaling (demo UNet)"
RANK = 16
SEED = 0
PROMPT = "disc"
DATASET_SIZE = 16  # latents a timing run draws its batches from
GOAL_PHYSICAL = 1.15
GOAL_REFERENCE = 0.85
GOAL_MEMORY = 1.15
GOAL_QUALITY = 1.25
QUALITY_GUIDANCE = 0.0  # teacher guidance w of the quality run (LCM form; ComfyUI cfg = w + 1)
QUALITY_LR = 3e-4
HELD_OUT_BATCHES = 8
TEACHER_STEPS = 50
STUDENT_STEPS = 4
LOSS_TOLERANCE = 1e-6  # relative: the same loss recomputed from separately timed passes
REFERENCE_TOLERANCE = 1e-4  # relative: batched vs separate teacher calls round differently
STUDENT_MODEL_TOLERANCE = 1e-4  # the LoRA merged by ComfyUI's loader vs the hooked LoRA


# ------------------------------------------------------------------------------------------
# A trainer on a ComfyUI MODEL
# ------------------------------------------------------------------------------------------
@dataclass
class Rig:
    """A ComfyUI MODEL's network with a LoRA attached (as ``StrideDistillLoRA`` attaches it)."""

    model: Any  # the MODEL (ModelPatcher)
    loraset: LoraSet

    @property
    def base(self) -> Any:
        return self.model.model

    @property
    def network(self) -> torch.nn.Module:
        return self.model.model.diffusion_model

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.base.apply_model(x, sigma, **cond)

    def parameter_bytes(self) -> int:
        held = list(self.network.parameters()) + self.loraset.parameters()
        return sum(parameter.numel() * parameter.element_size() for parameter in held)


def attach(model: Any) -> Rig:
    """Attach a seeded, zero-initialised rank-16 LoRA to the MODEL's network."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        loraset = attach_lora(model.model.diffusion_model, RANK, skip_small_layers=True)
    return Rig(model, loraset)


def model_conds(ctx: BenchContext, model: Any, prompt: str, latent_shape: tuple[int, ...]) -> dict:
    """The network keyword arguments of a class prompt, derived by Stride's training node."""
    return ctx.stride_module("nodes.training").model_conds(model, models.class_prompt(ctx, prompt), latent_shape)


def noise_space(ctx: BenchContext, model: Any) -> Any:
    """The MODEL's noise space as Stride's training node reads it."""
    compat = ctx.stride_module("nodes.compat")
    return compat.noise_space(compat.model_sampling_of_patcher(model))


def make_trainer(ctx: BenchContext, rig: Rig, side: int, batch: int) -> DistillTrainer:
    """An LCM ``DistillTrainer`` on random latents of ``4 x side x side`` with the class prompt."""
    shape = (4, side, side)
    latents = torch.randn(DATASET_SIZE, *shape, generator=torch.Generator().manual_seed(SEED))
    data = TrainingData(conds=[model_conds(ctx, rig.model, PROMPT, shape)],
                                uncond=model_conds(ctx, rig.model, "", shape), latents=latents)
    config = DistillConfig(objective="lcm", rank=RANK, batch=batch, skip_small_layers=True, seed=SEED)
    return DistillTrainer(rig.denoise, rig.loraset, noise_space(ctx, rig.model), config, data)


@contextlib.contextmanager
def training(rig: Rig) -> Iterator[None]:
    """What ``DistillTrainer.train`` sets up around its steps: autograd on, base weights frozen."""
    with torch.inference_mode(False), frozen_parameters(rig.network):
        yield


def goal_clock() -> str:
    """The clock the goals are judged on: the process's CPU time with one torch thread (on a shared machine
    the wall clock also counts the time other processes held the core), the wall clock otherwise."""
    return "cpu" if torch.get_num_threads() == 1 else "wall"


CLOCK_NAMES = {"cpu": "CPU time", "wall": "wall time"}


def cpu_timed(fn: Callable[[], Any]) -> Callable[[], dict[str, float]]:
    """``fn`` reporting the CPU seconds of the process it took (``run_interleaved`` adds its wall time)."""
    def timed() -> dict[str, float]:
        start = time.process_time()
        fn()
        return {"cpu": time.process_time() - start}

    return timed


# ------------------------------------------------------------------------------------------
# The passes of one step, on a trainer's own batch
# ------------------------------------------------------------------------------------------
@dataclass
class StepInputs:
    """What the passes of step ``k`` see: the trainer's batch, ``x_t``, both sigmas and ``x_prev``."""

    batch: Any
    x_t: torch.Tensor
    sigma_start: torch.Tensor  # float64, per sample
    sigma_prev: torch.Tensor
    x_prev: torch.Tensor

    def model_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(device=self.x_t.device, dtype=self.x_t.dtype)


def step_inputs(trainer: DistillTrainer, step: int) -> StepInputs:
    """The inputs ``DistillTrainer.batch_loss(step)`` builds (same batch, noise, guidance, timesteps)."""
    batch = trainer.sample_batch(step)
    space = trainer.space
    sigma_start, sigma_prev = space.sigma_of(batch.timesteps.start), space.sigma_of(batch.timesteps.prev)
    x_t = space.noise(batch.x0, batch.noise, per_sample(sigma_start, batch.x0))
    guided = trainer.teacher_x0(x_t, sigma_start.to(batch.x0), batch.cond, batch.uncond, batch.guidance)
    x_prev = space.ddim(x_t, guided, sigma_start, sigma_prev)
    return StepInputs(batch, x_t, sigma_start, sigma_prev, x_prev)


class Passes:
    """The three passes a distillation step cannot avoid, each callable alone on fixed inputs."""

    def __init__(self, rig: Rig, trainer: DistillTrainer, inputs: StepInputs) -> None:
        self.rig, self.trainer, self.inputs = rig, trainer, inputs
        batch = inputs.batch
        self.teacher_x = torch.cat([inputs.x_t, inputs.x_t])
        self.teacher_sigma = inputs.model_sigma(torch.cat([inputs.sigma_start, inputs.sigma_start]))
        self.teacher_cond = cond_cat([batch.cond, batch.uncond])
        with torch.no_grad():
            self.target = trainer.objective.target_output(inputs.x_prev, self.target_pass(), batch.timesteps)

    def teacher_pass(self) -> torch.Tensor:
        """Cond and uncond in one batched call, LoRA off, no grad."""
        with torch.no_grad(), self.rig.loraset.enabled(False):
            return self.rig.denoise(self.teacher_x, self.teacher_sigma, self.teacher_cond)

    def target_pass(self) -> torch.Tensor:
        """The student at ``(x_prev, t_prev)`` without grad, its LoRA folded into the weights as the trainer runs it."""
        with self.rig.loraset.merged():
            return self.rig.denoise(self.inputs.x_prev, self.inputs.model_sigma(self.inputs.sigma_prev),
                                    self.inputs.batch.cond)

    def student_pass(self) -> torch.Tensor:
        """The student at ``(x_t, t)`` with the LoRA on, its consistency loss and backward."""
        for parameter in self.rig.loraset.parameters():
            parameter.grad = None
        inputs, config = self.inputs, self.trainer.config
        x0 = self.rig.denoise(inputs.x_t, inputs.model_sigma(inputs.sigma_start), inputs.batch.cond)
        prediction = self.trainer.objective.student_output(inputs.x_t, x0, inputs.batch.timesteps)
        loss = objectives.consistency_loss(prediction, self.target, config.loss, config.huber_c)
        loss.backward()
        return loss.detach()


# ------------------------------------------------------------------------------------------
# The reference recipe: diffusers' train_lcm_distill_lora_sd_wds.py loop
# ------------------------------------------------------------------------------------------
class ReferenceRecipe:
    """The LCM-LoRA step as diffusers' script orders it, on the same LoRA, batch and objective:
    student forward first (graph held through the teacher and target), a second model copy as the
    teacher with separate cond and uncond calls, then target, loss, backward, clipping and AdamW."""

    def __init__(self, rig: Rig, teacher_base: Any, trainer: DistillTrainer) -> None:
        self.rig, self.teacher_base, self.trainer = rig, teacher_base, trainer
        self.optimizer = torch.optim.AdamW(rig.loraset.parameters(), lr=trainer.config.lr)

    def loss(self, step: int) -> torch.Tensor:
        trainer, config, space = self.trainer, self.trainer.config, self.trainer.space
        batch = trainer.sample_batch(step)
        steps = batch.timesteps
        sigma_start, sigma_prev = space.sigma_of(steps.start), space.sigma_of(steps.prev)
        x_t = space.noise(batch.x0, batch.noise, per_sample(sigma_start, batch.x0))
        student_x0 = self.rig.denoise(x_t, sigma_start.to(x_t), batch.cond)
        prediction = trainer.objective.student_output(x_t, student_x0, steps)
        with torch.no_grad():
            x0_cond = self.teacher_base.apply_model(x_t, sigma_start.to(x_t), **batch.cond)
            x0_uncond = self.teacher_base.apply_model(x_t, sigma_start.to(x_t), **batch.uncond)
            guided = x0_cond + per_sample(batch.guidance, x0_cond) * (x0_cond - x0_uncond)
            x_prev = space.ddim(x_t, guided, sigma_start, sigma_prev)
            target = trainer.objective.target_output(x_prev, self.rig.denoise(x_prev, sigma_prev.to(x_t), batch.cond),
                                                     steps)
        return objectives.consistency_loss(prediction, target, config.loss, config.huber_c)

    def step(self, step: int) -> float:
        loss = self.loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.rig.loraset.parameters(), self.trainer.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------
def run(ctx: BenchContext) -> Section:
    check(peak_rss_available(), "this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    settings = ctx.pick([(8, 2)], [(8, 4), (16, 4)], [(8, 4), (16, 4)])
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    _, trained = models.demo_unet_model(ctx)
    weights = "trained weights" if trained else "random weights of the demo architecture"

    def describe(side: int, batch: int) -> str:
        return f"demo UNet ({weights}), 4x{side}x{side} latent, batch {batch}, LoRA rank {RANK}"

    measured = [_measure_step(ctx, section, side, batch, describe(side, batch)) for side, batch in settings]
    section.tables += _step_tables(section, measured)
    section.tables.append(_nodes_table(ctx, section, *settings[-1], describe(*settings[-1])))
    quality = _quality_table(ctx, section)
    if quality is not None:
        section.tables.append(quality)
    scaling_table, plot = _scaling(ctx, section)
    section.tables.append(scaling_table)
    section.plots.append(plot)
    section.notes += [
        "Peak RSS growth counts only memory newly requested from the OS during the call; allocations served from "
        "memory the process already held do not show, so small differences (about 1 MiB) are noise.",
        f"Clock: the step comparisons record both the wall time and the CPU time of the process; goals are judged on "
        f"{CLOCK_NAMES[goal_clock()]}s (CPU time when torch runs one thread: on a shared machine the wall clock also "
        "counts the time other processes held the core, while single-threaded CPU time is what the step costs on an "
        "idle one). The scaling table is wall time.",
        "spread = half the interquartile range of the timed samples relative to their median.",
    ]
    return section


@dataclass
class StepMeasurement:
    """Medians of one setting: the passes and our step, our step vs the recipe, their memory and weights held."""

    setting: str
    repeats: int
    timings: dict[str, dict[str, list[float]]]  # teacher, target, student, ours: "wall" and "cpu" samples
    versus_recipe: dict[str, dict[str, list[float]]]  # ours, recipe
    memory: tuple[float, float]  # (ours, recipe) peak RSS growth of one step
    parameter_bytes: tuple[int, int]  # (ours, recipe)

    def seconds(self, clock: str) -> dict[str, float]:
        return {name: median(values[clock]) for name, values in self.timings.items()}

    def limit(self, clock: str) -> float:
        seconds = self.seconds(clock)
        return seconds["teacher"] + seconds["target"] + seconds["student"]

    def physical_ratio(self, clock: str) -> float:
        return self.seconds(clock)["ours"] / self.limit(clock)

    def recipe_seconds(self, clock: str) -> tuple[float, float]:
        return median(self.versus_recipe["ours"][clock]), median(self.versus_recipe["recipe"][clock])

    def recipe_ratio(self, clock: str) -> float:
        ours, theirs = self.recipe_seconds(clock)
        return ours / theirs


def _measure_step(ctx: BenchContext, section: Section, side: int, batch: int, setting: str) -> StepMeasurement:
    """Our step against the sum of its passes and against the diffusers recipe, on one setting."""
    repeats = ctx.pick(2, 13, 25)
    model, _ = models.demo_unet_model(ctx)
    teacher_copy = copy.deepcopy(model.model)  # the recipe's second model, copied before any LoRA is attached
    probe = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(SEED))
    probe_sigma = torch.full((batch,), 2.0)
    probe_cond = cond_cat([model_conds(ctx, model, PROMPT, (4, side, side))] * batch)
    with torch.no_grad():
        before = model.model.apply_model(probe, probe_sigma, **probe_cond)
    rig = attach(model)
    trainer = make_trainer(ctx, rig, side, batch)
    recipe = ReferenceRecipe(rig, teacher_copy, trainer)
    step = 0
    try:
        with training(rig):
            with torch.no_grad():
                hooked = rig.denoise(probe, probe_sigma, probe_cond)
            check(torch.equal(hooked, before), f"{setting}: a zero-initialised LoRA changed the network's output")
            passes = Passes(rig, trainer, step_inputs(trainer, step))
            from_passes = passes.student_pass()
            with torch.no_grad():
                trainer_loss = trainer.batch_loss(step)
                recipe_loss = recipe.loss(step)
            difference = abs(float(from_passes) - float(trainer_loss)) / abs(float(trainer_loss))
            check(difference <= LOSS_TOLERANCE,
                  f"{setting}: the timed passes compute a loss {difference:.1e} (relative) away from "
                  "DistillTrainer.batch_loss on the same step: their inputs differ")
            recipe_difference = abs(float(recipe_loss) - float(trainer_loss)) / abs(float(trainer_loss))
            check(recipe_difference <= REFERENCE_TOLERANCE,
                  f"{setting}: the reference recipe's loss differs from ours by {recipe_difference:.1e} (relative) "
                  "on the same batch")
            section.checks.append(
                f"4x{side}x{side}, batch {batch}: a zero-initialised rank-{RANK} LoRA ({len(rig.loraset)} adapters) "
                f"leaves the network's output bit-identical; the separately timed passes see the trainer's own batch "
                f"(sample_batch({step})): the loss recomputed from them equals DistillTrainer.batch_loss (relative "
                f"difference {difference:.1e}); the reference recipe computes the same loss (relative difference "
                f"{recipe_difference:.1e})")

            ctx.log(f"{NAME}: 4x{side}x{side} b{batch}: passes, our step and the recipe ({repeats} repeats)")
            timings = run_interleaved({
                "teacher": cpu_timed(passes.teacher_pass), "target": cpu_timed(passes.target_pass),
                "student": cpu_timed(passes.student_pass), "ours": cpu_timed(lambda: trainer.train_step(step)),
            }, repeats)
            recipe_timings = run_interleaved({"ours": cpu_timed(lambda: trainer.train_step(step)),
                                              "recipe": cpu_timed(lambda: recipe.step(step))}, repeats)
            memory: dict[str, list[int]] = {"ours": [], "recipe": []}
            for _ in range(ctx.pick(1, 2, 3)):
                memory["ours"].append(peak_rss_growth(lambda: trainer.train_step(step))[1])
                memory["recipe"].append(peak_rss_growth(lambda: recipe.step(step))[1])
    finally:
        rig.loraset.remove()
    ours_bytes = rig.parameter_bytes()
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher_copy.diffusion_model.parameters())
    return StepMeasurement(setting, repeats, timings, recipe_timings,
                           (median(memory["ours"]), median(memory["recipe"])), (ours_bytes, ours_bytes + teacher_bytes))


def _step_tables(section: Section, measured: list[StepMeasurement]) -> list[Table]:
    clock = goal_clock()
    name = CLOCK_NAMES[clock]
    repeats = measured[0].repeats
    physical = Table(
        "Our LCM distillation step vs the passes it needs, each timed alone on the same batch (CPU, float32), median "
        f"of {repeats} interleaved repeats; times are {name}s",
        ["compared", "model, latent, batch", "device, dtype", f"ratio ({name})", "ratio (wall time)", "our step",
         "sum of passes", "teacher (cond+uncond, 1 call)", "target", "student fwd+bwd", "sum / student fwd+bwd",
         "spread (ours)"])
    reference = Table(
        "Our step vs diffusers' LCM-LoRA loop (train_lcm_distill_lora_sd_wds.py order, teacher = a second model copy) "
        f"on the same model, LoRA and batch (CPU, float32), median of {repeats} interleaved repeats; times are {name}s",
        ["compared", "model, latent, batch", "device, dtype", f"step time ratio ({name})", "ratio (wall time)",
         "our step", "recipe step", "peak RSS growth of a step (ours / recipe)", "parameter bytes held (ours / recipe)",
         "spread (ours / recipe)"])
    for m in measured:
        seconds = m.seconds(clock)
        physical.add("our step (DistillTrainer.train_step) vs sum of the passes", m.setting, "CPU, float32",
                     fmt_ratio(m.physical_ratio(clock)), fmt_ratio(m.physical_ratio("wall")),
                     fmt_seconds(seconds["ours"]), fmt_seconds(m.limit(clock)), fmt_seconds(seconds["teacher"]),
                     fmt_seconds(seconds["target"]), fmt_seconds(seconds["student"]),
                     fmt_ratio(m.limit(clock) / seconds["student"]), f"+-{100 * spread(m.timings['ours'][clock]):.0f}%")
        ours, theirs = m.recipe_seconds(clock)
        reference.add("our step vs the diffusers recipe", m.setting, "CPU, float32", fmt_ratio(m.recipe_ratio(clock)),
                      fmt_ratio(m.recipe_ratio("wall")), fmt_seconds(ours), fmt_seconds(theirs),
                      f"{fmt_bytes(m.memory[0])} / {fmt_bytes(m.memory[1])}",
                      f"{fmt_bytes(m.parameter_bytes[0])} / {fmt_bytes(m.parameter_bytes[1])}",
                      f"+-{100 * spread(m.versus_recipe['ours'][clock]):.0f}% / "
                      f"+-{100 * spread(m.versus_recipe['recipe'][clock]):.0f}%")

    def goal(text: str, ratio: Callable[[StepMeasurement, str], float], limit: float) -> Goal:
        evidence = "; ".join(f"{fmt_ratio(ratio(m, clock))} {name} ({fmt_ratio(ratio(m, 'wall'))} wall) on {m.setting}"
                             for m in measured)
        return Goal(text, "met" if max(ratio(m, clock) for m in measured) <= limit else "missed", evidence)

    section.goals.append(goal(f"our step <= {GOAL_PHYSICAL}x the sum of its required passes",
                              StepMeasurement.physical_ratio, GOAL_PHYSICAL))
    section.goals.append(goal(f"our step <= {GOAL_REFERENCE}x the diffusers recipe's step time",
                              StepMeasurement.recipe_ratio, GOAL_REFERENCE))
    ours_bytes, recipe_bytes = measured[-1].parameter_bytes
    section.goals.append(Goal("one model copy in memory", "met",
                              f"our trainer holds the network once ({fmt_bytes(ours_bytes)} of parameters with the "
                              f"LoRA; its teacher is the same network with the LoRA off), the recipe "
                              f"{fmt_bytes(recipe_bytes)} (a second copy as its teacher)"))
    return [physical, reference]


@dataclass
class NodeComparison:
    """StrideDistillLoRA vs TrainLoraNode on one model: step times (from their progress updates) and peak memory."""

    step_times: dict[str, dict[str, list[float]]]  # "ours" / "comfy" -> "wall" / "cpu" -> seconds between updates
    memory: dict[str, list[int]]  # "ours" / "comfy" -> peak memory growth of whole node calls

    def step(self, name: str, clock: str) -> float:
        return median(self.step_times[name][clock])

    def ratio(self, clock: str) -> float:
        return self.step("ours", clock) / self.step("comfy", clock)

    def peak(self, name: str) -> float:
        return median(self.memory[name])


def compare_nodes(ctx: BenchContext, section: Section, make_model: Callable[[], Any], positive: list, empty: list,
                  latents: torch.Tensor, batch: int, steps: int, rounds: int, checkpointing: bool,
                  training_dtype: str = "fp32", memory_of: Callable[[Callable[[], Any]], int] | None = None,
                  ) -> NodeComparison:
    """Call both nodes as the executor does on separate copies of the model (``make_model()``), same latents, batch
    and rank, gradient checkpointing ``checkpointing``; ``memory_of(fn)`` measures a call's peak (default: RSS)."""
    measure = memory_of or (lambda fn: peak_rss_growth(fn)[1])
    ours_model, comfy_model = make_model(), make_model()  # TrainLoraNode patches weight wrappers into its copy
    data = ctx.node("StrideDistillDataset").execute(positive, empty, latents={"samples": latents})[0]
    half = len(latents) // 2
    # ComfyUI 0.3.75's TrainLoraNode fails on a single LATENT input (UnboundLocalError: 'multi_res'); a list of
    # two same-shape LATENTs takes its working path (concatenated into one batch dataset).
    comfy_latents = [{"samples": latents[:half]}, {"samples": latents[half:]}]
    train_lora = ctx.host.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]

    def comfy_node(step_count: int) -> Any:
        return train_lora.execute(
            model=[comfy_model], latents=comfy_latents, positive=[positive], batch_size=[batch],
            grad_accumulation_steps=[1], steps=[step_count], learning_rate=[1e-4], rank=[RANK], optimizer=["AdamW"],
            loss_function=["MSE"], seed=[SEED], training_dtype=[training_dtype], lora_dtype=["fp32"],
            algorithm=["LoRA"], gradient_checkpointing=[checkpointing], existing_lora=["[None]"])

    def ours_node(step_count: int) -> Any:
        return ctx.node("StrideDistillLoRA").execute(
            model=ours_model, data=data, objective="lcm", steps=step_count, learning_rate=1e-4, rank=RANK, alpha=0.0,
            batch_size=batch, guidance_min=0.0, guidance_max=0.0, loss="huber", gradient_checkpointing=checkpointing,
            seed=SEED, save_every=0, lora_name="bench_training", resume=False)

    ours_losses = ours_node(1)[2]["loss"]  # the node's losses per series (consistency objectives: one, 'loss')
    comfy_losses = comfy_node(1).result[2]["loss"]
    for name, losses in (("StrideDistillLoRA", ours_losses), ("TrainLoraNode", comfy_losses)):
        check(len(losses) == 1 and bool(torch.isfinite(torch.tensor(losses)).all()), f"{name} returned losses {losses}")
    section.checks.append(f"both nodes train on the same {len(latents)} latents (batch {batch}, rank {RANK}, gradient "
                          f"checkpointing {'on' if checkpointing else 'off'}) and report finite losses; TrainLoraNode "
                          "is fed two LATENTs (0.3.75 fails on one)")

    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    step_times: dict[str, dict[str, list[float]]] = {"ours": {"wall": [], "cpu": []}, "comfy": {"wall": [], "cpu": []}}
    memory: dict[str, list[int]] = {"ours": [], "comfy": []}
    candidates = {"ours": ours_node, "comfy": comfy_node}
    ctx.log(f"{NAME}: StrideDistillLoRA vs TrainLoraNode, {rounds} rounds of {steps} steps")
    for round_index in range(rounds):
        order = list(candidates) if round_index % 2 == 0 else list(candidates)[::-1]
        for name in order:
            stamps: list[dict[str, float]] = []
            previous_listener = ctx.host.progress_listener
            ctx.host.progress_listener = (lambda value, total, stamps=stamps:
                                          stamps.append({key: now() for key, now in clocks.items()}))
            try:
                grown = measure(functools.partial(candidates[name], steps))
            finally:
                ctx.host.progress_listener = previous_listener
            check(len(stamps) == steps, f"{name}: {len(stamps)} progress updates for {steps} steps")
            for key in clocks:
                step_times[name][key] += [later[key] - earlier[key] for earlier, later in itertools.pairwise(stamps)]
            memory[name].append(grown)
    return NodeComparison(step_times, memory)


TRAIN_LORA_NOTE = ("TrainLoraNode trains more tensors than Stride's node: a LoRA on every weight with 2+ dimensions "
                   "(also the 4-channel in/out convolutions) plus a difference for every bias and 1-D weight; its LoRA "
                   "is applied as a weight wrapper (weight + up @ down recomputed per call) where Stride adds "
                   "up(down(x)) to a layer's output.")


def _nodes_table(ctx: BenchContext, section: Section, side: int, batch: int, setting: str) -> Table:
    """StrideDistillLoRA vs ComfyUI's TrainLoraNode on the demo UNet, gradient checkpointing off."""
    steps = ctx.pick(3, 6, 12)
    rounds = ctx.pick(1, 2, 3)
    latents = torch.randn(max(DATASET_SIZE, 2 * batch), 4, side, side, generator=torch.Generator().manual_seed(SEED))
    compared = compare_nodes(ctx, section, lambda: models.demo_unet_model(ctx)[0], models.class_prompt(ctx, PROMPT),
                             models.class_prompt(ctx, ""), latents, batch, steps, rounds, checkpointing=False)
    clock = goal_clock()
    ours_memory, comfy_memory = compared.peak("ours"), compared.peak("comfy")
    table = Table(
        f"StrideDistillLoRA (LCM distillation: teacher + target + student per step) vs ComfyUI TrainLoraNode (plain "
        f"LoRA: one forward + backward per step), each node called as the executor calls it ({setting}; CPU, float32, "
        f"no gradient checkpointing); step time = median {CLOCK_NAMES[clock]} between progress updates over {rounds} "
        f"rounds of {steps} steps, memory = median peak RSS growth of a whole node call",
        ["compared", "model, latent, batch", "device, dtype", f"step time ratio ({CLOCK_NAMES[clock]})",
         "ratio (wall time)", "memory ratio", "our step", "TrainLoraNode step",
         "peak RSS growth (ours / TrainLoraNode)"])
    table.add("StrideDistillLoRA vs TrainLoraNode", setting, "CPU, float32", fmt_ratio(compared.ratio(clock)),
              fmt_ratio(compared.ratio("wall")), fmt_ratio(ours_memory / comfy_memory),
              fmt_seconds(compared.step("ours", clock)), fmt_seconds(compared.step("comfy", clock)),
              f"{fmt_bytes(ours_memory)} / {fmt_bytes(comfy_memory)}")
    section.goals.append(Goal(f"peak memory <= {GOAL_MEMORY}x ComfyUI TrainLoraNode's",
                              "met" if ours_memory <= GOAL_MEMORY * comfy_memory else "missed",
                              f"{fmt_ratio(ours_memory / comfy_memory)} ({fmt_bytes(ours_memory)} vs "
                              f"{fmt_bytes(comfy_memory)}; {setting})"))
    section.notes.append(TRAIN_LORA_NOTE + " Its default gradient checkpointing is switched off here to match "
                         "Stride's default.")
    return table


@dataclass
class Distilled:
    """The outcome of the quality run: the LoRA state dict, its losses, and the hooked student's output on a probe."""

    state: dict[str, torch.Tensor]
    losses: torch.Tensor
    seconds: float
    held_out: tuple[float, float]  # mean loss on the same unseen batches before and after training
    probe: tuple[torch.Tensor, torch.Tensor, dict]
    probe_output: torch.Tensor


def _distil(ctx: BenchContext, model: Any, mixture: GaussianMixture, steps: int, batch: int,
            dataset_size: int) -> Distilled:
    """LCM-distil ``model`` with ``DistillTrainer.train`` on paired class-conditional mixture samples."""
    names = list(DEMO_CLASS_NAMES)
    shape = mixture.latent_shape
    generator = torch.Generator().manual_seed(SEED)
    labels = torch.arange(dataset_size) % len(names)
    latents = mixture.sample(dataset_size, generator, labels)[0].float()
    class_conds = [model_conds(ctx, model, name, shape) for name in names]
    data = TrainingData(conds=[class_conds[label] for label in labels.tolist()],
                                uncond=model_conds(ctx, model, "", shape), latents=latents, paired=True)
    config = DistillConfig(objective="lcm", steps=steps, lr=QUALITY_LR, rank=RANK, batch=batch,
                                   guidance_min=QUALITY_GUIDANCE, guidance_max=QUALITY_GUIDANCE,
                                   skip_small_layers=True, seed=SEED)
    probe = (latents[:4] + 2.0 * torch.randn(latents[:4].shape, generator=generator), torch.full((4,), 2.0),
             cond_cat(data.conds[:4]))
    rig = attach(model)
    try:
        trainer = DistillTrainer(rig.denoise, rig.loraset, noise_space(ctx, model), config, data)

        def held_out_loss() -> float:
            """Mean loss on batches the run never trains on (step indices past its end), LoRA as it is now."""
            with torch.no_grad():
                return float(torch.stack([trainer.batch_loss(steps + k) for k in range(HELD_OUT_BATCHES)]).mean())

        before = held_out_loss()
        ctx.log(f"{NAME}: distilling the demo UNet for {steps} steps (batch {batch})")
        started = time.perf_counter()
        losses = torch.tensor(trainer.train().losses["loss"])
        seconds = time.perf_counter() - started
        with torch.no_grad():
            probe_output = rig.denoise(*probe)
        return Distilled(lora_state_dict(rig.loraset), losses, seconds, (before, held_out_loss()), probe,
                         probe_output)
    finally:
        rig.loraset.remove()


def _class_samples(ctx: BenchContext, model: Any, spec, steps: int, noise: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Class-conditional samples through ComfyUI (CFG 1): ``noise[i]`` drawn for class ``labels[i]``."""
    sampler, sigmas = spec.build(ctx, model, steps)
    empty = models.class_prompt(ctx, "")
    samples = torch.empty_like(noise)
    for index, name in enumerate(DEMO_CLASS_NAMES):
        chosen = labels == index
        samples[chosen] = sample(model, sampler, sigmas, noise[chosen], models.class_prompt(ctx, name), empty,
                                 seed=SEED)
    check(bool(torch.isfinite(samples).all()), f"{spec.label} at {steps} steps: NaN or inf in the samples")
    return samples


def _quality_table(ctx: BenchContext, section: Section) -> Table | None:
    """Distil the trained demo UNet for N steps; student 4-step LCM vs teacher 50-step euler and 4-step LCM."""
    model, trained = models.demo_unet_model(ctx)
    goal = f"student {STUDENT_STEPS}-step SWD <= {GOAL_QUALITY}x teacher {TEACHER_STEPS}-step SWD"
    if not trained:
        weights = demo.DEMO_WEIGHTS_PATH.relative_to(demo.REPO_ROOT)
        section.goals.append(Goal(goal, "undecided", f"the demo UNet's trained weights are not built ({weights}); "
                                                     "run scripts/build_demo_model.py"))
        return None
    import comfy.model_management
    import comfy.sd

    steps, batch = ctx.pick(30, 60, 300), ctx.pick(8, 16, 16)
    mixture = demo_mixture()
    distilled = _distil(ctx, model, mixture, steps, batch, ctx.pick(64, 1024, 1024))
    check(bool(torch.isfinite(distilled.losses).all()) and len(distilled.losses) == steps,
          "the quality run's losses are not all finite")
    fifth = max(1, steps // 5)
    first, last = float(distilled.losses[:fifth].mean()), float(distilled.losses[-fifth:].mean())
    before, after = distilled.held_out
    check(after < before, f"the loss did not fall over the quality run: {before:.4g} before, {after:.4g} after on the "
                          f"same {HELD_OUT_BATCHES} unseen batches")
    section.checks.append(f"quality run: {steps} finite losses; on the same {HELD_OUT_BATCHES} unseen batches the loss "
                          f"fell from {before:.4g} to {after:.4g} (running loss: mean {first:.4g} over the first fifth "
                          f"of the steps, {last:.4g} over the last)")

    repeats, per_repeat = ctx.pick(4, metrics.REPEATS, metrics.REPEATS), ctx.pick(16, 64, 256)
    num_classes = len(DEMO_CLASS_NAMES)
    per_class = repeats * per_repeat // num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), *mixture.latent_shape, generator=torch.Generator().manual_seed(SEED + 1))
    teacher_label = f"teacher, {TEACHER_STEPS} steps (ComfyUI euler)"
    runs = {teacher_label: _class_samples(ctx, model, COMFY_EULER, TEACHER_STEPS, noise, labels),
            f"teacher, {STUDENT_STEPS} steps (Stride LCM, undistilled)": _class_samples(ctx, model, STRIDE_LCM,
                                                                                       STUDENT_STEPS, noise, labels)}
    # the student as Stride's node returns it: the LoRA state dict through ComfyUI's own LoRA loader
    student = comfy.sd.load_lora_for_models(model, None, distilled.state, 1.0, 0)[0]
    comfy.model_management.load_models_gpu([student])
    with torch.no_grad():
        merged = student.model.apply_model(distilled.probe[0], distilled.probe[1], **distilled.probe[2])
    difference = float((merged - distilled.probe_output).abs().max())
    check(difference <= STUDENT_MODEL_TOLERANCE, f"the LoRA loaded by ComfyUI's loader differs from the trained hooks "
                                                 f"by {difference:.1e}")
    section.checks.append(f"the student MODEL (LoRA state dict through ComfyUI's load_lora_for_models, as Stride's "
                          f"node returns it) reproduces the trained hooks (max difference {difference:.1e})")
    student_label = f"student (teacher + LoRA after {steps} steps), {STUDENT_STEPS} steps (Stride LCM)"
    runs[student_label] = _class_samples(ctx, student, STRIDE_LCM, STUDENT_STEPS, noise, labels)

    def score(samples: torch.Tensor) -> dict:
        return metrics.evaluate(samples.double(), mixture, labels, torch.Generator().manual_seed(SEED + 2), repeats)

    scores = {label: score(samples) for label, samples in runs.items()}
    data_label = f"data ({len(labels)} fresh samples, same labels)"
    scores[data_label] = score(mixture.sample(len(labels), torch.Generator().manual_seed(SEED + 3), labels)[0])

    table = Table(
        f"Quality after {steps} LCM distillation steps of the trained demo UNet (batch {batch}, rank {RANK}, lr "
        f"{QUALITY_LR:g}, teacher guidance w = {QUALITY_GUIDANCE:g} i.e. CFG 1, {fmt_seconds(distilled.seconds)} of "
        f"training): {len(labels)} class-conditional samples ({per_class} per class, CFG 1, same noise) scored in "
        f"{repeats} repeats of {per_repeat} (NLL gap: per sample); mean ± 95% half-width; CPU, float32",
        ["compared", "SWD", f"SWD - teacher {TEACHER_STEPS}-step (paired)", "NLL gap", "mode TV", "mode mean shift",
         "mode cov error", "mode recall", "mode entropy"])
    teacher_result = scores[teacher_label]

    def cell(result: dict, name: str, digits: int = 3, signed: bool = False) -> str:
        return result[name].format(digits, signed) if name in result else "-"

    for label, result in scores.items():
        table.add(label, cell(result, "swd"), paired_difference(result["swd"], teacher_result["swd"]).format(3, True),
                  cell(result, "nll_gap", signed=True), cell(result, "mode_tv"),
                  cell(result, "mode_mean_shift", 4, True), cell(result, "mode_cov_error", signed=True),
                  cell(result, "mode_recall", 2), cell(result, "mode_entropy"))
    student_result = scores[student_label]
    excess = paired_difference(student_result["swd"], teacher_result["swd"], scale=GOAL_QUALITY)
    section.notes.append(
        f"Intervals: SWD and the mode figures are means over {repeats} independent repeats of {per_repeat} samples "
        f"({per_repeat // num_classes} per class), each scored against its own fresh data set with the same labels and "
        "its own projections, with a Student-t 95% interval; the NLL gap is a mean over all samples. The rows share "
        "the noises and each repeat's references, so their SWD differences to the teacher are paired (the data row "
        "shares only the references). The NLL gap: negative = samples over-concentrated on the modes (what few-step "
        f"sampling of an undistilled model does), 0 = like the data. Guidance w = {QUALITY_GUIDANCE:g} (CFG 1) so that "
        "every row is scored against the same data distribution; LCM-LoRA's default range w ~ U[3, 15] would distil a "
        "guided distribution that the data cannot score.")
    undistilled = scores[list(runs)[1]]

    def change(name: str) -> str:
        if name not in student_result or name not in undistilled:
            return "-"
        return paired_difference(student_result[name], undistilled[name]).format(3, signed=True)

    undistilled_excess = paired_difference(undistilled["swd"], teacher_result["swd"], scale=GOAL_QUALITY)
    section.notes.append(
        f"What distillation changed, paired against the undistilled teacher at {STUDENT_STEPS} LCM steps (same "
        f"noises, same references): NLL gap {change('nll_gap')}, SWD {change('swd')}, mode cov error "
        f"{change('mode_cov_error')}. The SWD goal does not by itself show that distillation helped: the undistilled "
        f"teacher at {STUDENT_STEPS} steps scores {undistilled_excess.format(3, signed=True)} on the same test "
        f"(undistilled - {GOAL_QUALITY} x teacher).")
    section.goals.append(Goal(f"{goal} (judged on the paired 95% interval of student SWD - {GOAL_QUALITY} x teacher "
                              "SWD)",
                              judge(excess, 0.0),
                              f"student {student_result['swd'].format()} vs teacher {teacher_result['swd'].format()}: "
                              f"student - {GOAL_QUALITY} x teacher = {excess.format(signed=True)} (the undistilled "
                              f"teacher at {STUDENT_STEPS} LCM steps: {scores[list(runs)[1]]['swd'].format()}; data: "
                              f"{scores[data_label]['swd'].format()}) after {steps} steps"))
    return table


def _scaling(ctx: BenchContext, section: Section) -> tuple[Table, Any]:
    """Our step's time and peak memory for every latent side x batch, one LoRA on one model."""
    sides = ctx.pick((8, 16), (8, 16, 32), (8, 16, 32))
    batches = ctx.pick((1, 2), (1, 4, 16), (1, 4, 16))
    repeats = ctx.pick(1, 2, 3)
    model, trained = models.demo_unet_model(ctx)
    rig = attach(model)
    configs = [(side, batch) for side in sides for batch in batches]
    try:
        trainers = {key: make_trainer(ctx, rig, *key) for key in configs}
        memory = {}
        with training(rig):
            for key in configs:  # ascending size, so a smaller run never reuses memory a bigger one freed
                trainers[key].train_step(0)  # one-time allocations (AdamW state) are not a step's memory
                loss, memory[key] = peak_rss_growth(functools.partial(trainers[key].train_step, 1))
                check(bool(torch.isfinite(torch.tensor(loss["loss"]))), f"training step at {key}: loss {loss}")
            ctx.log(f"{NAME}: timing {len(configs)} training configurations")
            timings = run_interleaved({key: (lambda key=key: trainers[key].train_step(1)) for key in configs},
                                      repeats, warmup=0)
    finally:
        rig.loraset.remove()
    section.checks.append("scaling: every configuration's training step has a finite loss")
    step = {key: median(timings[key]["wall"]) for key in configs}
    weights = "trained weights" if trained else "random weights of the demo architecture"
    table = scaling_table(f"Our LCM distillation step (DistillTrainer.train_step) on the demo UNet ({weights}), "
                          f"LoRA rank {RANK}, median of {repeats} interleaved repeats", configs, step, memory)
    return table, plot_step_time_memory(ctx, NAME, sides, batches, step, memory, "training step time (ms)",
                                        f"Demo UNet + rank-{RANK} LoRA, LCM distillation step (CPU float32)")


