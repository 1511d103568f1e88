"""Optimal Stepsize Distillation (OSS): the N-step schedule that lands closest to the model's own trajectory.

Paper: J. Pei, H. Hu, S. Gu, "Optimal Stepsize for Diffusion Sampling" (arXiv 2503.21774). Official
code: bebebe666/OptimalSteps, ``OSS/OSS.py`` (``search_OSS``, ``search_OSS_batch``, ``cal_medium``,
``infer_OSS``) at commit ee350436c86e29088c0cf550300a2e6a5911a7ee. Facts taken from it:

* The teacher is the model's own M-step trajectory ``x_0 .. x_M`` (sigmas ``s_0 > .. > s_M = 0``)
  from a batch of noises, here with Euler (``x' = x + (s' - s) (x - D(x, s)) / s``, which is the
  official flow-matching step ``z + (t' - t) v`` in the flow convention and DDIM in both) or Heun.
* The student takes one Euler step per interval between N + 1 of the trajectory's points. Per noise
  sample, a dynamic programme over (student step k, trajectory point j) keeps the student latent
  ``z^k_j = step(z^{k-1}_i, s_i -> s_j)`` whose mean squared distance to the teacher's ``x_j`` is
  smallest over the earlier points ``i`` (ties go to the larger ``s_i``); each layer calls the model
  once at every kept latent, and the schedule is traced back from ``x_M``. The paper calls this
  optimal substructure; it is a greedy choice of one latent per point, exact for N <= 2, and for
  N >= 3 it can miss the subset with the smallest endpoint error (measured in the benchmark).
* Several noise samples: each gets its own schedule, and the schedule used is the per-position
  median of their indices (``cal_medium``).

Differences from the official code: (1) its first layer also starts the noise, unscaled, at every
lower sigma; on the reference teacher a start below ``s_0`` lowered the typical error but sent
held-out samples to other modes than the teacher's, so the student here starts where the teacher
does. (2) It copies layer k into layer k + 1 before filling it, so a point keeps a shorter path's
latent when no (k + 1)-step latent is closer, and the trace-back then reads pointers of different
path lengths: the schedule it returns is not the path that was evaluated. Here layer k holds
exactly-k-step latents. With those two behaviours switched off (three lines) the official code
returns the schedules of this module, and unmodified it does where neither fires (both tested).
(3) Points that cannot reach ``s_M`` in the remaining steps are not evaluated and the first layer
reuses the teacher's call at ``x_0``: ``M + (N - 1)(M - N + 1)`` evaluations per sample instead of
``(1 + N) M``. (4) ``cal_medium`` of an odd number of samples averages the middle value with the
one below it; here the middle value is used. The amplitude calibration of ``infer_OSS`` (the
latent's 5%-95% quantile range rescaled to the teacher's, averaged over samples, before each call)
is left out: it needs its own sampler (the result here is a SIGMAS schedule for any Euler sampler),
and on the reference teacher it made the endpoint error several times larger.

``mode="fast"`` is Stride's variant without extra model calls: each candidate step starts from the
teacher's own latent ``x_i`` with the teacher's ``D(x_i, s_i)``; its cost is its squared error at
``x_j`` relative to ``|x_j|^2`` (a scale-free stand-in for how far the error carries to the
endpoint), a path costs the sum of its steps' costs, and a shortest-path programme minimises that
exactly. Its measured gap to the paper mode is in the benchmark.

Samplers here follow k-diffusion: ``model(x, sigma)`` returns the denoised ``x0``, ``sigma`` has one
entry per batch row, and the latents are 4-D images or 5-D videos, in either noise convention.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..safe_files import read_safetensors, write_safetensors
from .steps import all_finite

Scalar = TypeVar("Scalar", Tensor, float)
Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``model(x, sigma)``: the denoised ``x0`` of latents ``x`` at per-row noise levels ``sigma``."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after every model call (ComfyUI: progress bar and Cancel)."""

SOLVERS = ("euler",)
"""Student solvers the dynamic programme can search for: one model call and one latent per step
(Euler; the same update as DDIM and the official flow-matching step)."""
TEACHER_SOLVERS = ("euler", "heun")
"""Solvers of the reference trajectory (Heun: Karras et al.'s second-order step, 2M - 1 calls)."""
MODES = ("paper", "fast")
MIN_STEPS_PER_STUDENT_STEP = 2
"""The trajectory needs at least this many steps per student step (M >= 2N); with fewer the subset
is nearly forced (the paper searches 5-10 steps in 100-200)."""
FILE_FORMAT = "stride.optimal_steps"
FILE_VERSION = "1"


# ---------------------------------------------------------------------------------------------
# Model calls
# ---------------------------------------------------------------------------------------------
@dataclass
class SearchCost:
    """What a search spent: model calls (batches), evaluations (latents, summed over calls), seconds."""

    calls: int = 0
    evaluations: int = 0
    model_seconds: float = 0.0
    total_seconds: float = 0.0


class _CountedModel:
    """The denoiser with call counting, chunking to ``max_batch`` rows, a finiteness check and progress."""

    def __init__(self, model: Denoiser, max_batch: int | None, progress: Progress | None, total_calls: int,
                 sync: Callable[[], None]) -> None:
        self.model = model
        self.max_batch = max_batch
        self.progress = progress
        self.total_calls = total_calls
        self.sync = sync
        self.cost = SearchCost()

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        chunk = x.shape[0] if self.max_batch is None else self.max_batch
        outputs = []
        for start in range(0, x.shape[0], chunk):
            rows = x[start:start + chunk]
            began = time.perf_counter()
            out = self.model(rows, sigma[start:start + chunk])
            self.sync()
            self.cost.model_seconds += time.perf_counter() - began
            self.cost.calls += 1
            self.cost.evaluations += rows.shape[0]
            if not all_finite(out):
                low, high = float(sigma[start:start + chunk].min()), float(sigma[start:start + chunk].max())
                raise ValueError(f"the model returned NaN or inf at sigma {low:.4g}..{high:.4g}; the search stopped")
            outputs.append(out)
            if self.progress is not None:
                self.progress(self.cost.calls, self.total_calls)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _calls_for(rows: int, max_batch: int | None) -> int:
    return 1 if max_batch is None else math.ceil(rows / max_batch)


def _sigma_rows(value: Tensor | float, rows: int, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1).expand(rows).contiguous()


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------
def euler_coefficients(sigma: Scalar, sigma_next: Scalar) -> tuple[Scalar, Scalar]:
    """``(alpha, beta)`` of the Euler step ``x' = x + (s' - s) (x - x0) / s = alpha x + beta x0`` (``s > 0``):
    ``alpha = s' / s``, ``beta = 1 - s' / s``. Broadcasts over tensor arguments. In both noise conventions
    this is also the DDIM move :meth:`NoiseSpace.ddim` (tested)."""
    alpha = sigma_next / sigma
    return alpha, 1 - alpha


def _steps(model: Denoiser, x: Tensor, sigmas: Tensor, solver: str) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x0, x_next)`` of each step from ``x`` at ``sigmas[0]`` through ``sigmas`` with ``solver``: Euler, or
    Heun (k-diffusion's ``sample_heun``), which corrects each step with a second call at the target sigma
    except the last."""
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"solver must be one of {TEACHER_SOLVERS}, got {solver!r}")
    for sigma, sigma_next in itertools.pairwise(sigmas.tolist()):
        x0 = model(x, _sigma_rows(sigma, x.shape[0], x))
        alpha, beta = euler_coefficients(sigma, sigma_next)
        x_next = x * alpha + x0 * beta
        if solver == "heun" and sigma_next > 0:
            x0_next = model(x_next, _sigma_rows(sigma_next, x.shape[0], x))
            slope = ((x - x0) / sigma + (x_next - x0_next) / sigma_next) / 2
            x_next = x + slope * (sigma_next - sigma)
        yield x0, x_next
        x = x_next


def solve(model: Denoiser, x: Tensor, sigmas: Tensor, solver: str = "euler") -> Tensor:
    """The latent reached from ``x`` at ``sigmas[0]`` through ``sigmas`` (descending, last 0) with ``solver``."""
    last_step = collections.deque(_steps(model, x, sigmas, solver), maxlen=1)  # keeps only the last (x0, x_next)
    return last_step[0][1] if last_step else x


def trajectory(model: Denoiser, x: Tensor, sigmas: Tensor, solver: str = "euler") -> tuple[Tensor, Tensor]:
    """Every latent of :func:`solve`'s run ``(M + 1, B, ...)`` and the model's ``x0`` at each but the last
    ``(M, B, ...)``."""
    states, denoised = [x], []
    for x0, x_next in _steps(model, x, sigmas, solver):
        denoised.append(x0)
        states.append(x_next)
    return torch.stack(states), torch.stack(denoised)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimalSchedule:
    """A searched schedule: ``indices`` into the trajectory's ``teacher_sigmas`` (``0`` first, ``M`` last),
    ``sigmas`` = ``teacher_sigmas[indices]`` (float64, ending at 0), each noise sample's own indices and
    the error its own schedule reached (paper mode: the mean squared distance of the student's endpoint
    to the teacher's; fast mode: the path's summed relative step errors), and the teacher's endpoints."""

    indices: tuple[int, ...]
    sigmas: Tensor
    teacher_sigmas: Tensor
    per_sample: tuple[tuple[int, ...], ...]
    per_sample_error: tuple[float, ...]
    mode: str
    cost: SearchCost
    teacher_end: Tensor


def check_teacher_sigmas(sigmas: Tensor) -> None:
    """Raise ``ValueError`` unless ``sigmas`` is a teacher schedule: 1-D, finite, strictly decreasing, ending at 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 3:
        raise ValueError(f"the teacher sigmas must be a 1-D schedule of at least 2 steps, got shape "
                         f"{tuple(sigmas.shape)}")
    values = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()) or float(values[-1]) != 0 or not bool((values[:-1] > values[1:]).all()):
        raise ValueError("the teacher sigmas must be finite, strictly decreasing and end at 0")


def check_step_counts(steps: int, total: int) -> None:
    """Raise ``ValueError`` unless N = ``steps`` student steps can be searched in M = ``total`` teacher steps."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of student steps N must be a positive integer, got {steps!r}")
    if steps >= total:
        raise ValueError(f"N ({steps}) must be smaller than the teacher's step count M ({total}): the search picks "
                         "N of the teacher's M steps")
    if total < MIN_STEPS_PER_STUDENT_STEP * steps:
        raise ValueError(f"M ({total}) is too small for N ({steps}): the search needs M >= "
                         f"{MIN_STEPS_PER_STUDENT_STEP} * N = {MIN_STEPS_PER_STUDENT_STEP * steps} teacher steps "
                         "(the paper uses 100-200 for 5-10 student steps)")


def check_search_arguments(x: Tensor, sigmas: Tensor, steps: int, solver: str, teacher_solver: str, mode: str) -> None:
    """Raise ``ValueError`` with the reason when a search would be meaningless or impossible."""
    if solver not in SOLVERS:
        raise ValueError(f"the schedule search supports the solver(s) {', '.join(SOLVERS)}, not {solver!r}: the "
                         "dynamic programme needs a step that calls the model once and carries nothing but the "
                         "latent (multistep solvers carry history, Heun-type solvers call at the target sigma)")
    if teacher_solver not in TEACHER_SOLVERS:
        raise ValueError(f"teacher_solver must be one of {TEACHER_SOLVERS}, got {teacher_solver!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_teacher_sigmas(sigmas)
    check_step_counts(steps, sigmas.numel() - 1)
    if x.ndim not in (4, 5) or x.shape[0] < 1:
        raise ValueError(f"latents must be a 4-D image or 5-D video batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"latents must be floating point, got {x.dtype}")
    if not all_finite(x):
        raise ValueError("the starting latents contain NaN or inf; the search needs finite noise")


def search_calls(batch: int, total: int, steps: int, teacher_solver: str, mode: str, max_batch: int | None) -> int:
    """How many model calls :func:`search_schedule` makes (for progress bars). Its evaluations (latents) are
    ``batch * (M + (N - 1)(M - N + 1))`` with the Euler teacher in paper mode, against the official
    ``batch * (1 + N) M``, and ``batch * M`` in fast mode."""
    teacher_calls = (2 * total - 1) if teacher_solver == "heun" else total
    calls = teacher_calls * _calls_for(batch, max_batch)
    if mode == "paper":
        calls += (steps - 1) * _calls_for(batch * (total - steps + 1), max_batch)
    return calls


def search_schedule(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    steps: int,
    solver: str = "euler",
    teacher_solver: str = "euler",
    mode: str = "paper",
    max_batch: int | None = None,
    progress: Progress | None = None,
    sync: Callable[[], None] = lambda: None,
) -> OptimalSchedule:
    """Search the ``steps``-step schedule for ``solver`` among the points of the teacher trajectory.

    ``x``: the starting latents at ``sigmas[0]`` (B noise samples, 4-D or 5-D; the batch shares the
    model's conditioning). ``sigmas``: the teacher's M + 1 sigmas (descending, last 0). ``mode``:
    ``"paper"`` (the official recursion, ``(N - 1)(M - N + 1)`` extra evaluations per sample) or
    ``"fast"`` (no extra calls). ``max_batch`` caps the rows of one model call; ``progress`` is
    called after each call; ``sync`` runs after each call before its time is taken (CUDA timing).
    """
    check_search_arguments(x, sigmas, steps, solver, teacher_solver, mode)
    started = time.perf_counter()
    teacher_sigmas = sigmas.detach().to("cpu", torch.float64)
    total = teacher_sigmas.numel() - 1
    counted = _CountedModel(model, max_batch, progress,
                            search_calls(x.shape[0], total, steps, teacher_solver, mode, max_batch), sync)
    states, denoised = trajectory(counted, x, teacher_sigmas, teacher_solver)
    if mode == "paper":
        paths, errors = _paper_paths(counted, states, denoised[0], teacher_sigmas, steps)
    else:
        paths, errors = _fast_paths(states, denoised, teacher_sigmas, steps)
    indices = median_schedule(paths)
    counted.cost.total_seconds = time.perf_counter() - started
    return OptimalSchedule(tuple(indices), teacher_sigmas[list(indices)], teacher_sigmas,
                           tuple(tuple(path) for path in paths), tuple(errors), mode, counted.cost, states[-1])


def _flat64(t: Tensor) -> Tensor:
    return t.reshape(*t.shape[:2], -1).to(torch.float64)


def step_errors(sources: Tensor, denoised: Tensor, source_sigmas: Tensor, targets: Tensor, target_sigmas: Tensor
                ) -> Tensor:
    """Mean squared distance of every Euler step from a source latent to every target: ``(B, I, J)``.

    ``sources``, ``denoised`` ``(B, I, D)`` (the model's ``x0`` at the sources), ``targets`` ``(B, J, D)``,
    all float64; the step from source i lands at ``alpha_ij s_i + beta_ij d_i``
    (:func:`euler_coefficients`), and its distance to target j is expanded into inner products, so no
    ``B x I x J`` latents are formed. Pairs with ``target_sigma >= source_sigma`` are ``inf``.
    """
    alpha, beta = euler_coefficients(source_sigmas[:, None], target_sigmas[None, :])
    alpha, beta = alpha.to(sources.device), beta.to(sources.device)
    ss = (sources * sources).sum(-1)[..., None]
    dd = (denoised * denoised).sum(-1)[..., None]
    sd = (sources * denoised).sum(-1)[..., None]
    tt = (targets * targets).sum(-1)[:, None, :]
    st = sources @ targets.transpose(1, 2)
    dt = denoised @ targets.transpose(1, 2)
    squared = alpha**2 * ss + beta**2 * dd + 2 * alpha * beta * sd - 2 * alpha * st - 2 * beta * dt + tt
    errors = squared.clamp(min=0) / sources.shape[-1]
    later = (target_sigmas[None, :] < source_sigmas[:, None]).to(sources.device)
    return torch.where(later, errors, torch.full_like(errors, math.inf))


def _trace(back: list[Tensor], batch: int, total: int) -> list[list[int]]:
    """Per sample, the indices from ``0`` to ``total`` along the back pointers (``back[k][b, j]``: the
    point before ``j`` on the best (k + 1)-step path)."""
    paths = []
    for b in range(batch):
        path = [total]
        for pointers in reversed(back):
            path.append(int(pointers[b, path[-1]]))
        paths.append(path[::-1])
    return paths


def _paper_paths(model: _CountedModel, states: Tensor, first_denoised: Tensor, sigmas: Tensor, steps: int
                 ) -> tuple[list[list[int]], list[float]]:
    """The official recursion (module docstring) per sample, every layer's model calls batched."""
    total = sigmas.numel() - 1
    batch = states.shape[1]
    teacher = _flat64(states.transpose(0, 1))  # (B, M + 1, D)
    width = total - steps + 1  # the points a layer can use and still reach s_M in time
    kept = states[0][:, None]  # (B, I, ...): the student latents of the previous layer, here the start
    kept_denoised = first_denoised[:, None]  # the teacher's call at x_0, reused
    source_index = torch.zeros(1, dtype=torch.long)
    back: list[Tensor] = []
    errors = torch.zeros(batch, 1)
    for k in range(1, steps + 1):
        if k > 1:
            rows = kept.reshape(-1, *kept.shape[2:])
            row_sigmas = sigmas[source_index].repeat(batch).to(rows.device, rows.dtype)
            kept_denoised = model(rows, row_sigmas).reshape(kept.shape)
        target_index = torch.tensor([total]) if k == steps else torch.arange(k, k + width)
        errors = step_errors(_flat64(kept), _flat64(kept_denoised), sigmas[source_index],
                             teacher[:, target_index], sigmas[target_index])
        best = errors.argmin(dim=1)  # (B, J): the first minimum, i.e. the larger source sigma on ties
        errors = errors.gather(1, best[:, None]).squeeze(1)
        pointers = torch.full((batch, total + 1), -1, dtype=torch.long)
        pointers[:, target_index] = source_index[best.cpu()]
        back.append(pointers)
        alpha, beta = euler_coefficients(sigmas[source_index][best.cpu()], sigmas[target_index][None, :])
        shape = (batch, target_index.numel()) + (1,) * (kept.ndim - 2)
        chosen = best.to(kept.device).reshape(shape).expand(-1, -1, *kept.shape[2:])
        alpha, beta = (c.to(kept.device, kept.dtype).reshape(shape) for c in (alpha, beta))
        kept = alpha * kept.gather(1, chosen) + beta * kept_denoised.gather(1, chosen)
        source_index = target_index
    return _trace(back, batch, total), errors[:, 0].tolist()


def _fast_paths(states: Tensor, denoised: Tensor, sigmas: Tensor, steps: int) -> tuple[list[list[int]], list[float]]:
    """Exact shortest N-step paths over the teacher's own points (no model calls): a step from ``x_i``
    with the teacher's ``D(x_i, s_i)`` to ``x_j`` costs its squared error relative to ``|x_j|^2``."""
    total = sigmas.numel() - 1
    batch = states.shape[1]
    teacher = _flat64(states.transpose(0, 1))
    size = (teacher**2).mean(-1).clamp(min=torch.finfo(torch.float64).tiny)[:, None, :]
    costs = step_errors(teacher[:, :-1], _flat64(denoised.transpose(0, 1)), sigmas[:-1], teacher, sigmas) / size
    value = costs[:, 0, :]  # (B, M + 1): one step from the start
    back = [torch.zeros(batch, total + 1, dtype=torch.long)]
    for _ in range(2, steps + 1):
        value, best = (value[:, :-1, None] + costs).min(dim=1)  # over the sources i = 0 .. M - 1
        back.append(best.cpu())
    return _trace(back, batch, total), value[:, total].tolist()


def endpoint_calls(batch: int, step_counts: Iterable[int], max_batch: int | None) -> int:
    """How many model calls :func:`euler_endpoints` makes on schedules of ``step_counts`` steps (for progress bars)."""
    return sum(step_counts) * _calls_for(batch, max_batch)


def euler_endpoints(model: Denoiser, start: Callable[[Tensor], Tensor], schedules: Mapping[str, Tensor],
                    max_batch: int | None = None, progress: Progress | None = None) -> dict[str, Tensor]:
    """Per schedule, Euler's endpoints from the same noises (e.g. to score the searched schedule and others against
    the teacher's endpoints). ``start(sigmas)`` gives the starting latents of a schedule (its first sigma decides
    the noise scaling); ``max_batch`` and ``progress`` as in :func:`search_schedule`."""
    starts = {name: start(sigmas.detach().to("cpu", torch.float64)) for name, sigmas in schedules.items()}
    batch = next(iter(starts.values())).shape[0]
    total = endpoint_calls(batch, (sigmas.numel() - 1 for sigmas in schedules.values()), max_batch)
    counted = _CountedModel(model, max_batch, progress, total, lambda: None)
    return {name: solve(counted, starts[name], sigmas.detach().to("cpu", torch.float64))
            for name, sigmas in schedules.items()}


def median_schedule(paths: Sequence[Sequence[int]]) -> list[int]:
    """Per position, the median of the samples' indices; for an even count the mean of the two middle
    values rounded towards the lower sigma, as the official ``cal_medium`` (which counts indices from
    the clean end and floors). Strictly increasing when every path is."""
    columns = torch.tensor([list(path) for path in paths], dtype=torch.long).sort(dim=0).values
    count = columns.shape[0]
    return ((columns[(count - 1) // 2] + columns[count // 2] + 1) // 2).tolist()


# ---------------------------------------------------------------------------------------------
# Saved schedules
# ---------------------------------------------------------------------------------------------
def fingerprint(parts: Mapping[str, Any]) -> str:
    """A SHA-256 hex digest of JSON-serialisable ``parts`` (the model's identity and the search settings);
    tensors among the values are hashed by dtype, shape and bytes."""
    digest = hashlib.sha256()

    def canonical(value: Any) -> Any:
        if isinstance(value, Tensor):
            tensor = value.detach().to("cpu").contiguous()
            return {"tensor": hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
                    "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        if isinstance(value, Mapping):
            return {str(key): canonical(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [canonical(item) for item in value]
        return value

    digest.update(json.dumps(canonical(parts), sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class SavedSchedule:
    """A schedule read back from a file: its sigmas, trajectory indices and teacher sigmas, the fingerprint
    it was saved under and the settings and report stored with it."""

    sigmas: Tensor
    indices: tuple[int, ...]
    teacher_sigmas: Tensor
    fingerprint: str
    settings: dict[str, Any]
    report: dict[str, Any]


def save_schedule(path: str | os.PathLike, schedule: OptimalSchedule, fingerprint_hex: str,
                  settings: Mapping[str, Any], report: Mapping[str, Any] | None = None) -> None:
    """Write ``schedule`` as a small safetensors file (atomically) keyed by ``fingerprint_hex``."""
    tensors = {"sigmas": schedule.sigmas.to(torch.float64), "indices": torch.tensor(schedule.indices, dtype=torch.long),
               "teacher_sigmas": schedule.teacher_sigmas.to(torch.float64)}
    metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "fingerprint": fingerprint_hex,
                "settings": json.dumps(dict(settings), sort_keys=True),
                "report": json.dumps(dict(report or {}), sort_keys=True)}
    write_safetensors(path, tensors, metadata)


def load_schedule(path: str | os.PathLike, expected_fingerprint: str | None = None) -> SavedSchedule:
    """Read and validate a file of :func:`save_schedule`; refuse another model's (or settings') fingerprint."""
    tensors, metadata = read_safetensors(path)
    name = os.path.basename(os.fspath(path))
    if metadata.get("format") != FILE_FORMAT or metadata.get("version") != FILE_VERSION:
        raise ValueError(f"{name} is not a Stride optimal-steps schedule (format {metadata.get('format')!r}, version "
                         f"{metadata.get('version')!r}; expected {FILE_FORMAT!r} version {FILE_VERSION})")
    try:
        settings = json.loads(metadata["settings"])
        report = json.loads(metadata["report"])
        sigmas, indices, teacher = tensors["sigmas"], tensors["indices"], tensors["teacher_sigmas"]
        saved_fingerprint = metadata["fingerprint"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} is a damaged schedule file ({exc!r} missing or unreadable)") from exc
    valid = (sigmas.ndim == 1 and indices.ndim == 1 and teacher.ndim == 1 and teacher.numel() >= 3
             and sigmas.numel() == indices.numel() >= 2
             and sigmas.dtype == teacher.dtype == torch.float64 and indices.dtype == torch.long
             and bool(torch.isfinite(teacher).all()) and float(teacher[-1]) == 0
             and bool((teacher[:-1] > teacher[1:]).all()) and int(indices[0]) == 0
             and int(indices[-1]) == teacher.numel() - 1 and bool((indices[1:] > indices[:-1]).all())
             and torch.equal(teacher[indices], sigmas))
    if not valid:
        raise ValueError(f"{name} is a damaged schedule file (its sigmas are not a descending subset of its teacher "
                         "sigmas ending at 0)")
    if expected_fingerprint is not None and saved_fingerprint != expected_fingerprint:
        raise ValueError(f"{name} was searched for another model or other settings (its fingerprint differs); "
                         "search again for this model, or load the file with the model it was made for")
    return SavedSchedule(sigmas, tuple(indices.tolist()), teacher, saved_fingerprint, settings, report)
