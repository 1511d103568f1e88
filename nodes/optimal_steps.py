"""Schedule distillation: search the N-step schedule for the loaded model (OSS), save it, load it again.

``Stride Optimal Steps`` runs the model's own M-step trajectory from a batch of noises and searches, with
:mod:`distill_core.sampling.optimal_steps`, the N of its sigmas that Euler should visit to land closest to it.
The search is a SAMPLER function run by ``guider.sample``, so every model call takes ComfyUI's own path: model
loading and devices, the guider's conditioning and CFG, model patches and LoRAs. It then scores Euler on the
searched schedule and on ComfyUI's schedulers at the same N against the teacher's endpoints, saves the result
in ``models/stride/schedules`` under a fingerprint of the model and the settings, and reuses a saved result
instead of searching again. ``Stride Saved Schedule`` loads a saved schedule by name and refuses one that was
searched for another model.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths

from ..distill_core.reference.metrics import endpoint_error
from ..distill_core.reference.statistics import Estimate, estimate, paired_difference, verdict
from ..distill_core.sampling.optimal_steps import (
    MODES,
    SOLVERS,
    TEACHER_SOLVERS,
    OptimalSchedule,
    SavedSchedule,
    check_step_counts,
    check_teacher_sigmas,
    endpoint_calls,
    euler_endpoints,
    fingerprint,
    load_schedule,
    save_schedule,
    search_calls,
    search_schedule,
)
from .compat import (
    StrideError,
    combo,
    guider_identity,
    io,
    model_file,
    model_identity,
    model_sampling_in_sampler,
    model_sampling_of_patcher,
    register_model_folder,
    start_latent,
    ui,
)
from .reference import check_prompt_input
from .results import COLUMNS, TABLE
from .samplers import require_finite_latent
from .training import safe_file_name

CATEGORY = "stride/schedules"
FOLDER = "stride_schedules"
"""folder_paths name of ``models/stride/schedules`` (an ``extra_model_paths.yaml`` may add folders to it)."""
FOLDER_LABEL = "models/stride/schedules"
COMPARED = ("normal", "simple", "karras", "beta")
"""ComfyUI schedulers the report scores next to the searched schedule, at the same N ("normal" and "simple" are
ComfyUI's two uniform spacings: in time and over the model's sigma table)."""
SEARCHED = "searched"
VERDICTS = {"higher": "(the searched schedule is closer)", "lower": "(the searched schedule is further)",
            "no difference": "(no difference at this sample size)"}

register_model_folder(FOLDER, "stride", "schedules")


@dataclass(frozen=True)
class SearchSettings:
    """Everything besides the model and its guidance that decides a search's result (saved with it)."""

    steps: int
    teacher_steps: int
    noise_samples: int
    solver: str
    teacher_solver: str
    teacher_scheduler: str
    mode: str
    seed: int
    latent_shape: tuple[int, ...]


@dataclass
class SearchOutcome:
    """A finished search: the schedule, every schedule's per-noise endpoint error to the teacher (searched first),
    and the seconds the scoring took."""

    found: OptimalSchedule
    errors: dict[str, Tensor]
    scoring_seconds: float


def pick_guider(model: Any, positive: Any, negative: Any, cfg: float, guider: Any) -> Any:
    """The GUIDER given, or a CFGGuider of model/positive/negative/cfg; refuses neither and both."""
    direct = (model, positive, negative)
    if guider is not None:
        if any(item is not None for item in direct):
            raise StrideError("guider: connect either a GUIDER or model/positive/negative (with cfg), not both")
        return guider
    if any(item is None for item in direct):
        missing = [name for name, item in zip(("model", "positive", "negative"), direct, strict=True) if item is None]
        raise StrideError(f"{missing[0]}: connect the MODEL with its positive and negative conditioning, or a GUIDER "
                          f"instead (missing: {', '.join(missing)})")
    if not positive:
        raise StrideError("positive: the conditioning is empty; connect a prompt (e.g. CLIP Text Encode or Stride "
                          "Class Prompt).")
    check_prompt_input(model, positive, "positive")
    check_prompt_input(model, negative, "negative")
    made = comfy.samplers.CFGGuider(model)
    made.set_conds(positive, negative)
    made.set_cfg(cfg)
    return made


def teacher_schedule(model_sampling: Any, settings: SearchSettings) -> Tensor:
    """The teacher's M + 1 sigmas from ComfyUI's scheduler (float64, exactly the float32 values ComfyUI samples at)."""
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, settings.teacher_scheduler, settings.teacher_steps)
    sigmas = sigmas.to("cpu", torch.float64)
    try:
        check_teacher_sigmas(sigmas)
    except ValueError as exc:
        raise StrideError(f"teacher_scheduler: '{settings.teacher_scheduler}' at {settings.teacher_steps} steps "
                          f"does not give a usable teacher ({exc}); choose 'normal' or another scheduler") from None
    total = sigmas.numel() - 1  # a scheduler may merge repeated sigmas (beta): the trajectory's own step count
    try:
        check_step_counts(settings.steps, total)
    except ValueError as exc:
        raise StrideError(f"{'steps' if settings.steps >= total else 'teacher_steps'}: {exc}") from None
    return sigmas


def search_keys(guider: Any, settings: SearchSettings) -> tuple[str, str]:
    """(model fingerprint, search key): the first identifies the MODEL (weights, LoRAs, patches) and is what
    Stride Saved Schedule checks; the second adds the conditioning, the guidance and the settings."""
    model_key = fingerprint({"model": model_identity(guider.model_patcher)})
    search_key = fingerprint({"guider": guider_identity(guider), "settings": asdict(settings)})
    return model_key, search_key


def saved_result(search_key: str) -> Path | None:
    """The saved file of this search key, if any (its name ends with the key's first 16 hex digits)."""
    for folder in folder_paths.get_folder_paths(FOLDER):
        matches = sorted(Path(folder).glob(f"*-{search_key[:16]}.safetensors"))
        if matches:
            return matches[0]
    return None


def load_checked(path: Path, model_key: str, input_name: str, advice: str = "") -> SavedSchedule:
    """A saved schedule read and validated, refused (naming ``input_name``, adding ``advice``) if damaged or of
    another model."""
    try:
        return load_schedule(path, model_key)
    except ValueError as exc:
        raise StrideError(f"{input_name}: {exc}{advice}") from None


def run_search(guider: Any, settings: SearchSettings, noise: Tensor, teacher_sigmas: Tensor, call_rows: int
               ) -> SearchOutcome:
    """The search, then Euler on the searched and the :data:`COMPARED` schedules from the same noises, as one
    SAMPLER function run by ``guider.sample``. The batch handed to ``guider.sample`` has one call's rows, so
    ComfyUI loads the model for the memory one call needs; the function starts its own latents from ``noise``
    as a sampler starts from an empty latent. Progress and Cancel after every model call."""
    model_sampling = model_sampling_of_patcher(guider.model_patcher)
    schedules = {name: comfy.samplers.calculate_sigmas(model_sampling, name, settings.steps) for name in COMPARED}
    step_counts = [settings.steps, *(sigmas.numel() - 1 for sigmas in schedules.values())]
    total = (search_calls(noise.shape[0], teacher_sigmas.numel() - 1, settings.steps, settings.teacher_solver,
                          settings.mode, call_rows)
             + endpoint_calls(noise.shape[0], step_counts, call_rows))
    bar = comfy.utils.ProgressBar(total)
    done = 0

    def progress(_calls: int, _total: int) -> None:
        nonlocal done
        comfy.model_management.throw_exception_if_processing_interrupted()
        done += 1
        bar.update_absolute(done, total)

    outcome: list[SearchOutcome] = []

    def search(model_k: Any, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Any = None,
               disable: Any = None) -> Tensor:
        arguments = extra_args or {}
        sampling = model_sampling_in_sampler(model_k)

        def denoiser(rows: Tensor, sigma: Tensor) -> Tensor:
            return model_k(rows, sigma.to(rows.dtype), **arguments)

        def start(schedule: Tensor) -> Tensor:
            return start_latent(sampling, schedule, noise.to(x))

        found = search_schedule(denoiser, start(teacher_sigmas), teacher_sigmas, settings.steps, settings.solver,
                                settings.teacher_solver, settings.mode, max_batch=call_rows, progress=progress)
        began = time.perf_counter()
        ends = euler_endpoints(denoiser, start, {SEARCHED: found.sigmas, **schedules}, call_rows, progress)
        errors = {name: endpoint_error(end, found.teacher_end) for name, end in ends.items()}
        outcome.append(SearchOutcome(found, errors, time.perf_counter() - began))
        return x

    empty = torch.zeros((call_rows, *noise.shape[1:]), dtype=noise.dtype)
    guider.sample(empty, empty, comfy.samplers.KSAMPLER(search), teacher_sigmas.float(), disable_pbar=True,
                  seed=settings.seed)
    return outcome[0]


def search_report(outcome: SearchOutcome, settings: SearchSettings) -> dict[str, Any]:
    """What is saved with a schedule and shown: the per-noise errors, the search's cost and the official DP's."""
    cost = outcome.found.cost
    return {"errors": {name: values.tolist() for name, values in outcome.errors.items()},
            "evaluations": cost.evaluations, "calls": cost.calls, "search_seconds": cost.total_seconds,
            "model_seconds": cost.model_seconds, "scoring_seconds": outcome.scoring_seconds,
            "official_evaluations": ((1 + settings.steps) * (outcome.found.teacher_sigmas.numel() - 1)
                                     * settings.noise_samples)}


def report_text(settings: dict[str, Any], sigmas: Tensor, indices: tuple[int, ...], report: dict[str, Any],
                source: str) -> str:
    """The node's report: the schedule, its error against ComfyUI's schedulers at the same N, the search's cost."""
    compared = compared_errors(report)
    lines = [
        f"Stride Optimal Steps: {settings['steps']} {settings['solver']} steps ({source})",
        "sigmas: " + ", ".join(f"{value:.4g}" for value in sigmas.tolist()),
        f"teacher: {settings['teacher_solver']}, {settings['teacher_steps']} steps of '{settings['teacher_scheduler']}'"
        f" (the schedule takes its steps {', '.join(map(str, indices))}); {settings['noise_samples']} noises, seed "
        f"{settings['seed']}; {settings['mode']} mode",
        f"Euler's endpoint: RMS distance to the teacher's endpoint from the same {compared[0][1].repeats} noises "
        "(the search's own), mean ± 95% interval; then the paired difference to the searched schedule:",
    ]
    for name, error, difference in compared:
        row = f"  {name:<9} {error.format(4)}"
        if difference is not None:
            row += f"   {difference.format(4, signed=True)}  {VERDICTS[verdict(difference)]}"
        lines.append(row)
    lines.append(f"search: {report['evaluations']} model evaluations in {report['calls']} calls, "
                 f"{report['search_seconds']:.1f} s ({report['model_seconds']:.1f} s in the model; the official DP "
                 f"makes {report['official_evaluations']} evaluations); scoring {report['scoring_seconds']:.1f} s")
    return "\n".join(lines)


SCHEDULE_HELP = {  # the table's columns on the node (web/stride_results.js), in plain words
    "endpoint_error": "how far Euler on this schedule lands from the model's own many-step result (RMS over the "
                      "search's noises); lower is closer",
    "minus_searched": "this schedule's error minus the searched one's, on the same noises: above 0, the searched "
                      "schedule is better",
}


def compared_errors(report: dict[str, Any]) -> list[tuple[str, Estimate, Estimate | None]]:
    """Per schedule (searched first, then ComfyUI's in their order): its endpoint error and its paired difference
    to the searched schedule's (None for the searched one), with 95% intervals."""
    errors = {name: estimate(torch.tensor(values)) for name, values in report["errors"].items()}
    return [(name, errors[name], None if name == SEARCHED else paired_difference(errors[name], errors[SEARCHED]))
            for name in (SEARCHED, *sorted(set(errors) - {SEARCHED}, key=_compared_order))]


def schedule_table(report: dict[str, Any]) -> dict[str, list]:
    """The report's errors as table rows for the node (one per schedule, searched first), with 95% half-widths."""
    rows = []
    for name, error, difference in compared_errors(report):
        row: dict[str, Any] = {"label": name, "endpoint_error": error.value, "endpoint_error_pm": error.half_width}
        if difference is not None:
            row.update(minus_searched=difference.value, minus_searched_pm=difference.half_width)
        rows.append(row)
    return {TABLE: rows, COLUMNS: [{"key": key, "help": help} for key, help in SCHEDULE_HELP.items()]}


def _compared_order(name: str) -> tuple[int, str]:
    return (COMPARED.index(name) if name in COMPARED else len(COMPARED), name)


class StrideOptimalSteps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideOptimalSteps", display_name="Stride Optimal Steps", category=CATEGORY,
            description=("Searches the N-step schedule (SIGMAS) on which Euler lands closest to this model's own "
                         "M-step result (Optimal Stepsize Distillation: dynamic programming over the teacher "
                         "trajectory's sigmas), reports its error next to ComfyUI's schedulers, saves it under a "
                         f"fingerprint of the model and the settings in {FOLDER_LABEL}, and reuses a saved result "
                         "instead of searching again."),
            inputs=[
                io.Latent.Input("latent_image", tooltip="Its size (channels, frames, height, width) is the size "
                                "searched at; its batch size is the most latents per model call (what you sample "
                                "at: raise it to search faster, lower it if memory runs out). Its values are not "
                                "used: the search starts from noise, as text-to-image does."),
                io.Int.Input("steps", default=5, min=1, max=50,
                             tooltip="N: the number of steps of the schedule searched (the paper: 5-10)."),
                io.Int.Input("teacher_steps", default=100, min=2, max=1000,
                             tooltip="M: the steps of the teacher trajectory the schedule is chosen from (at least "
                                     "2 N; the paper: 100-200)."),
                io.Int.Input("noise_samples", default=8, min=1, max=256,
                             tooltip="How many noises the search follows; each gets its own schedule, the result is "
                                     "their per-step median (as the official code)."),
                combo("solver", SOLVERS, "The sampler the schedule is for: Euler (ComfyUI's euler; its ddim is the "
                      "same update). The search needs a one-call step that carries only the latent."),
                combo("teacher_solver", TEACHER_SOLVERS, "The solver of the teacher trajectory: euler (M calls) or "
                      "heun (2 M - 1 calls, more accurate).", default="euler"),
                combo("teacher_scheduler", comfy.samplers.SCHEDULER_NAMES, "ComfyUI scheduler of the teacher's M "
                      "sigmas; the schedule searched is a subset of them.", default="normal"),
                combo("mode", MODES, "paper: the official dynamic programme (about N x M model calls per noise in "
                      "all, the teacher's M included); fast: no calls beyond the teacher trajectory, a little further "
                      "from the teacher (bench/RESULTS.md).", default="paper"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the search's noises (as RandomNoise's noise_seed); kept fixed, so that "
                                     "queueing again reuses the saved result."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the teacher trajectory: the one you will sample with (not used "
                                       "with a GUIDER)."),
                io.String.Input("schedule_name", default="optimal_steps",
                                tooltip=f"File name prefix in {FOLDER_LABEL} (no folders); the file name adds N and "
                                        "the fingerprint."),
                io.Model.Input("model", optional=True, tooltip="The model the schedule is for, with its LoRAs and "
                                                                "patches."),
                io.Conditioning.Input("positive", optional=True, tooltip="The prompt the teacher follows."),
                io.Conditioning.Input("negative", optional=True, tooltip="The negative prompt (matters with cfg > 1)."),
                io.Guider.Input("guider", optional=True, tooltip="A GUIDER instead of model/positive/negative/cfg "
                                                                  "(e.g. DualCFGGuider, BasicGuider)."),
            ],
            outputs=[
                io.Sigmas.Output(display_name="sigmas", tooltip="The searched schedule: connect it to "
                                 "SamplerCustomAdvanced's sigmas with the euler sampler."),
                io.String.Output(display_name="report", tooltip="The schedule, Euler's endpoint error on it and on "
                                 "ComfyUI's normal/simple/karras/beta schedules at the same N, and the search's "
                                 "cost."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent_image: dict, steps: int, teacher_steps: int, noise_samples: int, solver: str,
                teacher_solver: str, teacher_scheduler: str, mode: str, seed: int, cfg: float, schedule_name: str,
                model: Any = None, positive: Any = None, negative: Any = None, guider: Any = None) -> io.NodeOutput:
        stem = safe_file_name(schedule_name, "schedule_name")[: -len(".safetensors")]
        require_finite_latent(latent_image["samples"])
        if latent_image["samples"].shape[0] < 1:
            raise StrideError("latent_image: the latent batch is empty; its batch size sets the latents per model "
                              "call: use Empty Latent Image with a batch size of 1 or more.")
        guider = pick_guider(model, positive, negative, cfg, guider)
        samples = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_image["samples"])
        settings = SearchSettings(steps, teacher_steps, noise_samples, solver, teacher_solver, teacher_scheduler, mode,
                                  seed, tuple(samples.shape[1:]))
        sigmas, text, report = search_or_reuse(guider, settings, stem, samples.shape[0])
        return io.NodeOutput(sigmas, text, ui={"text": [text], **schedule_table(report)})


def search_or_reuse(guider: Any, settings: SearchSettings, stem: str, call_rows: int
                    ) -> tuple[Tensor, str, dict[str, Any]]:
    """The schedule (float32 SIGMAS), the report's text and its figures: a saved result of the same search, or a
    new search saved as
    ``<stem>-<N>steps-<key>.safetensors``. Every input is checked before anything is written."""
    teacher_sigmas = teacher_schedule(model_sampling_of_patcher(guider.model_patcher), settings)
    model_key, search_key = search_keys(guider, settings)
    saved = saved_result(search_key)
    if saved is not None:
        advice = f" (the saved result of this search: delete {FOLDER_LABEL}/{saved.name} to search again)"
        loaded = load_checked(saved, model_key, "schedule_name", advice)
        if loaded.settings.get("key") != search_key:
            raise StrideError(f"schedule_name: {FOLDER_LABEL}/{saved.name} holds another search's result under this "
                              f"search's name{advice}")
        text = report_text(loaded.settings, loaded.sigmas, loaded.indices, loaded.report,
                           f"reused {FOLDER_LABEL}/{saved.name}, no search")
        return loaded.sigmas.float(), text, loaded.report
    noise = comfy.sample.prepare_noise(torch.zeros((settings.noise_samples, *settings.latent_shape)), settings.seed)
    try:
        outcome = run_search(guider, settings, noise, teacher_sigmas, call_rows)
    except ValueError as exc:  # the model returned NaN or inf: nothing is saved
        raise StrideError(f"model: {exc}; check the model, its LoRAs and the conditioning") from None
    report = search_report(outcome, settings)
    folder = Path(folder_paths.get_folder_paths(FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{settings.steps}steps-{search_key[:16]}.safetensors"
    saved_settings = {**asdict(settings), "key": search_key}
    save_schedule(path, outcome.found, model_key, saved_settings, report)
    text = report_text(saved_settings, outcome.found.sigmas, outcome.found.indices, report,
                       f"searched, saved as {FOLDER_LABEL}/{path.name}")
    return outcome.found.sigmas.float(), text, report


def saved_schedule_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


class StrideSavedSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideSavedSchedule", display_name="Stride Saved Schedule", category=CATEGORY,
            description=(f"Loads a schedule that Stride Optimal Steps saved in {FOLDER_LABEL}; refuses one that was "
                         "searched for another model (other weights, LoRAs or patches)."),
            inputs=[
                io.Model.Input("model", tooltip="The model the schedule will be used with (checked against the "
                                                "fingerprint saved in the file)."),
                combo("schedule", saved_schedule_names(), f"A file of {FOLDER_LABEL} (refresh the page to list one "
                      "saved since it loaded)."),
            ],
            outputs=[
                io.Sigmas.Output(display_name="sigmas", tooltip="The saved schedule, for SamplerCustomAdvanced with "
                                                                 "the euler sampler."),
                io.String.Output(display_name="report", tooltip="The report saved with it (settings, errors, cost)."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, schedule: str) -> io.NodeOutput:
        if schedule not in saved_schedule_names():
            raise StrideError(f"schedule: {FOLDER_LABEL}/{schedule} does not exist; search one with Stride Optimal "
                              "Steps")
        path = Path(model_file(FOLDER, schedule, "schedule", FOLDER_LABEL))
        loaded = load_checked(path, fingerprint({"model": model_identity(model)}), "schedule",
                              "; choose a schedule that Stride Optimal Steps saved for this model, or search one with "
                              "Stride Optimal Steps")
        text = report_text(loaded.settings, loaded.sigmas, loaded.indices, loaded.report, f"loaded {schedule}")
        return io.NodeOutput(loaded.sigmas.float(), text, ui=ui.PreviewText(text))


NODES: list[type[io.ComfyNode]] = [StrideOptimalSteps, StrideSavedSchedule]
