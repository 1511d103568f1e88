"""The optimal-steps search (OSS) against exhaustive search, the official code and the exact ODE.

* The fast mode's shortest-path programme equals an exhaustive search of its objective over every
  N-subset; the paper mode is exact for N = 2 and its reported error is the error of the schedule
  it returns (the official trace-back is not: see the module docstring).
* The official code (bebebe666/OptimalSteps at the recorded commit, run from /work/.mirror when it
  is there) returns the same schedules as Stride on toys where its two quirks do not fire, and on
  the demo toy once they are switched off; the schedules it returned are recorded below, so the
  comparison also holds where the mirror is absent.
* On the analytic reference teacher, Euler on the searched schedule lands closer to the exact ODE
  endpoint than on ComfyUI's normal, karras and beta schedules (implemented here from their
  definitions) at N = 4 .. 10, judged on held-out noises with paired 95% intervals.
"""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from distill_core.reference.demo import demo_mixture
from distill_core.reference.mixture import GaussianMixture
from distill_core.safe_files import write_safetensors
from distill_core.sampling import optimal_steps
from distill_core.sampling.optimal_steps import (
    endpoint_calls,
    euler_endpoints,
    load_schedule,
    median_schedule,
    save_schedule,
    search_calls,
    search_schedule,
    solve,
    trajectory,
)
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod

VE = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
FLOW = NoiseSpace.flow()
OFFICIAL_MIRROR = Path("/work/.mirror/bebebe666+OptimalSteps/repo")
OFFICIAL_COMMIT = "ee350436c86e29088c0cf550300a2e6a5911a7ee"
RING = 3  # demo class "ring"


# ---------------------------------------------------------------------------------------------
# Shared toy problems
# ---------------------------------------------------------------------------------------------
def normal_sigmas(space: NoiseSpace, steps: int) -> torch.Tensor:
    """ComfyUI's ``normal`` scheduler: timesteps evenly from the top of the table to the bottom, then 0
    (flow: from ``t(1) = num_timesteps`` down to ``t(s_min)``, as ModelSamplingDiscreteFlow's timestep is
    ``s * num_timesteps`` and its sigma ``shift(t / num_timesteps)``)."""
    if space.kind == "flow":
        t = torch.linspace(space.num_timesteps, 1, steps, dtype=torch.float64) / space.num_timesteps
        sigmas = t  # shift 1
    else:
        sigmas = space.sigma_of(torch.linspace(space.num_timesteps - 1, 0, steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(space: NoiseSpace, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then 0."""
    low, high = float(space.sigma_table[0]), float(space.sigma_table[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def beta_sigmas(space: NoiseSpace, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's ``beta`` scheduler (Lee et al. 2024): table entries at ``rint(ppf(1 - i/n) * (T - 1))``
    of a Beta(0.6, 0.6), repeats dropped, then 0."""
    quantiles = 1 - torch.arange(steps, dtype=torch.float64) / steps
    timesteps = torch.tensor(stats.beta.ppf(quantiles.numpy(), alpha, beta)).mul(space.num_timesteps - 1).round().long()
    kept = [int(t) for k, t in enumerate(timesteps) if k == 0 or t != timesteps[k - 1]]
    return torch.cat([space.sigma_table[kept], torch.zeros(1, dtype=torch.float64)])


def reference_model(mixture: GaussianMixture, space: NoiseSpace, class_id: int | None = None):
    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ids = None if class_id is None else torch.full((x.shape[0],), class_id)
        return mixture.denoise(x, sigma, space, ids)

    return model


def noise(count: int, seed: int, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def endpoint(model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return solve(model, x, sigmas)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_teacher_solvers_converge_at_their_order(space):
    """Against the same solver on 8x the steps (every grid ends with the same jump from the table's
    lowest sigma to 0, whose own error would otherwise hide the order)."""
    model = reference_model(demo_mixture(), space, RING)
    x = noise(16, 0) * float(normal_sigmas(space, 2)[0])
    for solver, order, steps in (("euler", 1, 20), ("heun", 2, 10)):
        fine = solve(model, x, normal_sigmas(space, 8 * steps), solver)
        errors = [float(mse(solve(model, x, normal_sigmas(space, m), solver), fine).mean().sqrt())
                  for m in (steps, 2 * steps)]
        assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3), (solver, errors)


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_trajectory_takes_euler_steps_which_are_ddim_moves(space):
    model = reference_model(demo_mixture(), space)
    sigmas = normal_sigmas(space, 6)
    x = noise(3, 1) * sigmas[0]
    states, denoised = trajectory(model, x, sigmas)
    assert states.shape == (7, 3, 4, 8, 8) and denoised.shape == (6, 3, 4, 8, 8)
    torch.testing.assert_close(states[-1], solve(model, x, sigmas), rtol=0, atol=0)
    for i in range(6):
        x0 = model(states[i], sigmas[i].expand(3))
        torch.testing.assert_close(denoised[i], x0)
        euler = states[i] + (sigmas[i + 1] - sigmas[i]) * (states[i] - x0) / sigmas[i]  # k-diffusion's sample_euler
        torch.testing.assert_close(states[i + 1], euler, rtol=0, atol=1e-12)
        ddim = space.ddim(states[i], x0, float(sigmas[i]), float(sigmas[i + 1]))
        torch.testing.assert_close(states[i + 1], ddim, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Exactness of the programmes
# ---------------------------------------------------------------------------------------------
def subsets(total: int, steps: int):
    for middle in itertools.combinations(range(1, total), steps - 1):
        yield (0, *middle, total)


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_fast_mode_equals_exhaustive_search_of_its_objective(space, steps):
    model = reference_model(demo_mixture(), space)
    sigmas = normal_sigmas(space, 11)
    x = noise(3, 2) * sigmas[0]
    found = search_schedule(model, x, sigmas, steps, mode="fast")
    assert found.cost.evaluations == 3 * 11  # the trajectory only
    states, denoised = trajectory(model, x, sigmas)

    def step_cost(b: int, i: int, j: int) -> float:  # Euler from the teacher's x_i with its own x0, vs x_j
        moved = states[i, b] + (sigmas[j] - sigmas[i]) * (states[i, b] - denoised[i, b]) / sigmas[i]
        return float(((moved - states[j, b]) ** 2).mean() / (states[j, b] ** 2).mean())

    for b in range(3):
        costs = {path: sum(step_cost(b, i, j) for i, j in itertools.pairwise(path)) for path in subsets(11, steps)}
        best = min(costs, key=costs.get)
        assert found.per_sample[b] == best
        assert found.per_sample_error[b] == pytest.approx(costs[best], rel=1e-9)


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_paper_mode_with_two_steps_equals_exhaustive_search_of_the_endpoint(space):
    model = reference_model(demo_mixture(), space)
    sigmas = normal_sigmas(space, 14)
    x = noise(4, 3) * sigmas[0]
    found = search_schedule(model, x, sigmas, 2)
    teacher_end = endpoint(model, x, sigmas)
    torch.testing.assert_close(found.teacher_end, teacher_end, rtol=0, atol=0)
    for b in range(4):
        errors = {path: float(mse(endpoint(model, x[b:b + 1], sigmas[list(path)]), teacher_end[b:b + 1]))
                  for path in subsets(14, 2)}
        best = min(errors, key=errors.get)
        assert found.per_sample[b] == best
        assert found.per_sample_error[b] == pytest.approx(errors[best], rel=1e-9)


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
@pytest.mark.parametrize("steps", [3, 4, 6])
def test_paper_mode_reports_the_error_of_the_schedule_it_returns(space, steps):
    """The traced schedule, run with Euler, lands exactly where the programme's kept latent was."""
    model = reference_model(demo_mixture(), space, 0)
    sigmas = normal_sigmas(space, 24)
    x = noise(5, 4) * sigmas[0]
    found = search_schedule(model, x, sigmas, steps)
    teacher_end = endpoint(model, x, sigmas)
    for b, path in enumerate(found.per_sample):
        assert path[0] == 0 and path[-1] == 24 and list(path) == sorted(set(path)) and len(path) == steps + 1
        reached = float(mse(endpoint(model, x[b:b + 1], sigmas[list(path)]), teacher_end[b:b + 1]))
        assert found.per_sample_error[b] == pytest.approx(reached, rel=1e-9)


def test_median_schedule_follows_the_official_rounding():
    # even count: mean of the two middle values, rounded towards the lower sigma (the larger index here)
    assert median_schedule([(0, 3, 10), (0, 6, 10)]) == [0, 5, 10]
    assert median_schedule([(0, 2, 9, 20), (0, 5, 11, 20), (0, 4, 12, 20), (0, 9, 13, 20)]) == [0, 5, 12, 20]
    # odd count: the middle value
    assert median_schedule([(0, 1, 10), (0, 4, 10), (0, 9, 10)]) == [0, 4, 10]


# ---------------------------------------------------------------------------------------------
# The official code
# ---------------------------------------------------------------------------------------------
SHARP = {"std": 0.05, "seed": 0, "count": 4}
"""The shared toy on which the unmodified official code and Stride agree: the demo mixture's means
with component std 0.05, SD1.5's VE schedule ("normal", M steps), 4 float64 noises of seed 0."""
RECORDED_OFFICIAL = {
    # (M, N): (per-sample schedules, cal_medium) as the official search_OSS / search_OSS_batch returned them
    # at commit ee350436 (indices count from the clean end: 0 = sigma 0, M = the start)
    (30, 8): ([[1, 2, 14, 17, 21, 23, 27, 30], [1, 2, 3, 6, 23, 26, 28, 30], [1, 2, 4, 21, 23, 25, 27, 30],
               [1, 2, 21, 23, 24, 26, 28, 30]], [1, 2, 9, 19, 23, 25, 27, 30]),
    (40, 6): ([[1, 5, 13, 17, 27, 40], [1, 2, 5, 31, 36, 40], [1, 2, 27, 31, 35, 40], [1, 2, 26, 30, 36, 40]],
              [1, 2, 19, 30, 35, 40]),
    (50, 10): ([[1, 2, 24, 27, 29, 33, 37, 40, 45, 50], [1, 2, 3, 5, 11, 38, 42, 45, 47, 50],
                [1, 2, 3, 7, 35, 39, 41, 43, 46, 50], [1, 2, 5, 35, 38, 40, 42, 44, 47, 50]],
               [1, 2, 4, 17, 32, 38, 41, 43, 46, 50]),
}


def sharp_toy(total: int):
    mixture = GaussianMixture(demo_mixture().means, SHARP["std"])
    sigmas = normal_sigmas(VE, total)
    return reference_model(mixture, VE), sigmas, noise(SHARP["count"], SHARP["seed"]) * sigmas[0]


def as_official(path, total: int) -> list[int]:
    """A Stride schedule (indices from the start, 0 .. M) in the official order (from the clean end, 0 excluded)."""
    return sorted(total - i for i in path if i != total)


@pytest.mark.parametrize("total,steps", list(RECORDED_OFFICIAL))
def test_recorded_official_schedules_are_reproduced(total, steps):
    model, sigmas, x = sharp_toy(total)
    found = search_schedule(model, x, sigmas, steps)
    per_sample, median = RECORDED_OFFICIAL[(total, steps)]
    assert [as_official(path, total) for path in found.per_sample] == per_sample
    assert as_official(found.indices, total) == median


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official OSS package of the recorded commit, extracted from the mirror (skips without it),
    plus a copy of ``search_OSS_batch`` with its two quirks switched off (``search_OSS_batch_pinned``)."""
    if not (OFFICIAL_MIRROR / "objects").is_dir():
        pytest.skip("the official code's mirror is not on this machine")
    folder = tmp_path_factory.mktemp("official")
    archive = subprocess.run(["git", f"--git-dir={OFFICIAL_MIRROR}", "archive", OFFICIAL_COMMIT, "OSS"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    source = (folder / "OSS" / "OSS.py").read_text()
    pinned = source[source.index("def search_OSS_batch("):]
    pinned = pinned.replace("def search_OSS_batch(", "def search_OSS_batch_pinned(")
    edits = [  # start only at the top; layer k + 1 starts empty and extends only the latents layer k reached
        ("        for k in range(STEP):\n",
         "        valid = torch.arange(N + 1) == N\n        for k in range(STEP):\n"),
        ("            for i in reversed(range(1,N+1)):\n                t = torch.ones((i,)",
         "            for i in reversed(range(1,N+1)):\n                if not valid[i]: continue\n"
         "                t = torch.ones((i,)"),
        ("            dp[k+1] = dp[k].clone()\n            tracestep[k+1] = tracestep[k].clone()\n",
         "            valid = torch.isfinite(dp[k]).cpu()\n"),
    ]
    for old, new in edits:
        assert pinned.count(old) == 1, old
        pinned = pinned.replace(old, new)
    (folder / "OSS" / "OSS.py").write_text(source + "\n\n" + pinned)
    sys.path.insert(0, str(folder))
    try:
        import OSS.OSS as module
    finally:
        sys.path.remove(str(folder))
    yield module
    sys.modules.pop("OSS.OSS", None)
    sys.modules.pop("OSS", None)


class OfficialWrapper:
    """The reference model as the official code wants it: ``fm_steps`` ascending from the clean end and a
    velocity ``(z - x0) / s`` (its step ``z + (t' - t) v`` is then Euler in the model's own convention)."""

    def __init__(self, model, sigmas: torch.Tensor) -> None:
        self.model = model
        self.fm_steps = sigmas.flip(0)

    def __call__(self, z, t, class_emb, model_kwargs):
        sigma = self.fm_steps[t].to(z.dtype)
        return (z - self.model(z, sigma)) / sigma.reshape(-1, *([1] * (z.ndim - 1)))


@pytest.mark.parametrize("total,steps", list(RECORDED_OFFICIAL))
def test_unmodified_official_code_returns_stride_schedules(official, total, steps):
    model, sigmas, x = sharp_toy(total)
    wrapper = OfficialWrapper(model, sigmas)
    per_sample = official.search_OSS(wrapper, x, x.shape[0], None, "cpu", teacher_steps=total, student_steps=steps)
    batched = official.search_OSS_batch(wrapper, x, x.shape[0], None, "cpu", teacher_steps=total, student_steps=steps)
    assert [sorted(path) for path in per_sample] == [sorted(path) for path in batched]
    assert ([sorted(path) for path in per_sample], official.cal_medium(per_sample)) == RECORDED_OFFICIAL[(total, steps)]
    found = search_schedule(model, x, sigmas, steps)
    assert [as_official(path, total) for path in found.per_sample] == [sorted(path) for path in per_sample]


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_official_code_without_its_quirks_returns_stride_schedules_on_the_demo_toy(official, space):
    model = reference_model(demo_mixture(), space)
    total, steps = 60, 5
    sigmas = normal_sigmas(space, total)
    x = noise(4, 0) * sigmas[0]
    wrapper = OfficialWrapper(model, sigmas)
    found = search_schedule(model, x, sigmas, steps)
    ours = [as_official(path, total) for path in found.per_sample]
    pinned = official.search_OSS_batch_pinned(wrapper, x, 4, None, "cpu", teacher_steps=total, student_steps=steps)
    assert [sorted(path) for path in pinned] == ours
    assert official.cal_medium(pinned) == as_official(found.indices, total)
    # unmodified, it returns other schedules here (its first layer also starts the noise lower down)
    released = official.search_OSS_batch(wrapper, x, 4, None, "cpu", teacher_steps=total, student_steps=steps)
    assert [sorted(path) for path in released] != ours


# ---------------------------------------------------------------------------------------------
# Quality on the exact reference
# ---------------------------------------------------------------------------------------------
SEARCH_NOISES, HELD_OUT, TEACHER_STEPS = 32, 512, 100


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_searched_schedule_beats_normal_karras_and_beta_on_held_out_noise(space):
    """Paired per-noise differences of the RMS endpoint error to the exact ODE solution; the whole 95%
    interval (normal approximation, n = 512) must favour the searched schedule. Demo class "ring"."""
    mixture = demo_mixture()
    model = reference_model(mixture, space, RING)
    teacher_sigmas = normal_sigmas(space, TEACHER_STEPS)
    start = float(teacher_sigmas[0])
    held_out = noise(HELD_OUT, 1) * start
    exact = mixture.flow_map(held_out, start, space, torch.full((HELD_OUT,), RING))
    search_noise = noise(SEARCH_NOISES, 0) * start

    def errors(sigmas: torch.Tensor) -> torch.Tensor:
        return mse(endpoint(model, held_out * float(sigmas[0]) / start, sigmas), exact).sqrt()

    for steps in range(4, 11):
        searched = errors(search_schedule(model, search_noise, teacher_sigmas, steps).sigmas)
        for name, builtin in (("normal", normal_sigmas), ("karras", karras_sigmas), ("beta", beta_sigmas)):
            gain = errors(builtin(space, steps)) - searched
            low = float(gain.mean() - 1.96 * gain.std() / math.sqrt(HELD_OUT))
            assert low > 0, f"{space.kind}, N = {steps}: {name} minus searched = {float(gain.mean()):+.4f}, " \
                            f"interval from {low:+.4f}"


# ---------------------------------------------------------------------------------------------
# Cost, shapes, progress
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["paper", "fast"])
@pytest.mark.parametrize("teacher_solver", ["euler", "heun"])
def test_counted_calls_and_evaluations(mode, teacher_solver):
    model = reference_model(demo_mixture(), VE)
    total, steps, batch, max_batch = 20, 4, 3, 16
    sigmas = normal_sigmas(VE, total)
    seen = []
    found = search_schedule(model, noise(batch, 5) * sigmas[0], sigmas, steps, teacher_solver=teacher_solver,
                            mode=mode, max_batch=max_batch, progress=lambda done, count: seen.append((done, count)))
    teacher_evaluations = (2 * total - 1 if teacher_solver == "heun" else total) * batch
    extra = (steps - 1) * (total - steps + 1) * batch if mode == "paper" else 0
    assert found.cost.evaluations == teacher_evaluations + extra
    assert found.cost.calls == search_calls(batch, total, steps, teacher_solver, mode, max_batch) == len(seen)
    assert seen == [(done, found.cost.calls) for done in range(1, found.cost.calls + 1)]
    if mode == "paper" and teacher_solver == "euler":
        assert found.cost.evaluations <= (1 + steps) * total * batch  # the official count


def test_euler_endpoints_of_several_schedules_in_counted_calls():
    model = reference_model(demo_mixture(), VE, RING)
    start = noise(5, 9)
    schedules = {"normal": normal_sigmas(VE, 4), "karras": karras_sigmas(VE, 6)}
    seen = []
    ends = euler_endpoints(model, lambda sigmas: start * sigmas[0], schedules, max_batch=2,
                           progress=lambda done, count: seen.append((done, count)))
    for name, sigmas in schedules.items():
        assert torch.allclose(ends[name], solve(model, start * sigmas[0], sigmas), rtol=0, atol=1e-11)
    calls = endpoint_calls(5, (4, 6), 2)
    assert calls == (4 + 6) * 3 and seen == [(done, calls) for done in range(1, calls + 1)]


def test_progress_callback_can_cancel_between_calls():
    class Cancelled(Exception):
        pass

    def cancel_at_five(done: int, total: int) -> None:
        if done == 5:
            raise Cancelled

    model = reference_model(demo_mixture(), VE)
    sigmas = normal_sigmas(VE, 20)
    with pytest.raises(Cancelled):
        search_schedule(model, noise(2, 6) * sigmas[0], sigmas, 4, progress=cancel_at_five)


def test_video_latents_search_like_their_frames():
    """A 5-D latent with one frame, on a model that denoises frame by frame, gets the 4-D schedule."""
    image_model = reference_model(demo_mixture(), FLOW, 1)

    def video_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return image_model(x[:, :, 0], sigma)[:, :, None]

    sigmas = normal_sigmas(FLOW, 30)
    images = noise(3, 7) * sigmas[0]
    for mode in ("paper", "fast"):
        as_images = search_schedule(image_model, images, sigmas, 5, mode=mode)
        as_video = search_schedule(video_model, images[:, :, None], sigmas, 5, mode=mode)
        assert as_video.per_sample == as_images.per_sample and as_video.indices == as_images.indices


def test_float32_latents_search_like_float64():
    model = reference_model(demo_mixture(), VE, RING)
    sigmas = normal_sigmas(VE, 40)
    x = noise(4, 8) * sigmas[0]
    assert search_schedule(model, x.float(), sigmas, 5).indices == search_schedule(model, x, sigmas, 5).indices


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_with_the_reason():
    model = reference_model(demo_mixture(), VE)
    sigmas = normal_sigmas(VE, 10)
    x = noise(2, 9) * sigmas[0]
    poisoned = x.clone()
    poisoned[1, 0, 0, 0] = math.nan
    cases = [
        ({"steps": 10}, "must be smaller than the teacher's step count"),
        ({"steps": 12}, "must be smaller than the teacher's step count"),
        ({"steps": 6}, "too small for N"),
        ({"steps": 0}, "positive integer"),
        ({"steps": 3, "solver": "heun"}, "supports the solver"),
        ({"steps": 3, "solver": "dpmpp_2m"}, "supports the solver"),
        ({"steps": 3, "teacher_solver": "lms"}, "teacher_solver"),
        ({"steps": 3, "mode": "slow"}, "mode must be"),
        ({"steps": 3, "sigmas": sigmas.flip(0)}, "strictly decreasing and end at 0"),
        ({"steps": 3, "sigmas": sigmas[:-1]}, "strictly decreasing and end at 0"),
        ({"steps": 3, "x": poisoned}, "NaN or inf"),
        ({"steps": 3, "x": x[:, 0]}, "4-D image or 5-D video"),
    ]
    for overrides, message in cases:
        arguments = {"model": model, "x": x, "sigmas": sigmas} | overrides
        with pytest.raises(ValueError, match=message):
            search_schedule(**arguments)


def test_a_model_returning_nan_stops_the_search():
    def broken(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[sigma < 1] = math.nan
        return out

    sigmas = normal_sigmas(VE, 20)
    with pytest.raises(ValueError, match="returned NaN or inf at sigma"):
        search_schedule(broken, noise(2, 10) * sigmas[0], sigmas, 4)


# ---------------------------------------------------------------------------------------------
# Saved schedules
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def searched():
    model = reference_model(demo_mixture(), VE)
    sigmas = normal_sigmas(VE, 20)
    return search_schedule(model, noise(2, 11) * sigmas[0], sigmas, 4)


def test_saved_schedule_round_trips(tmp_path, searched):
    key = optimal_steps.fingerprint({"model": "demo", "steps": 4})
    path = tmp_path / "schedule.safetensors"
    save_schedule(path, searched, key, {"steps": 4, "solver": "euler"}, {"error": 0.5})
    loaded = load_schedule(path, key)
    assert torch.equal(loaded.sigmas, searched.sigmas) and loaded.sigmas.dtype == torch.float64
    assert loaded.indices == searched.indices and torch.equal(loaded.teacher_sigmas, searched.teacher_sigmas)
    assert loaded.fingerprint == key and loaded.settings == {"steps": 4, "solver": "euler"}
    assert loaded.report == {"error": 0.5}
    assert load_schedule(path).indices == searched.indices  # no expected fingerprint: read as it is
    assert [entry.name for entry in tmp_path.iterdir()] == ["schedule.safetensors"]  # no temporary files left


def test_fingerprint_mismatch_is_refused(tmp_path, searched):
    path = tmp_path / "schedule.safetensors"
    save_schedule(path, searched, optimal_steps.fingerprint({"model": "a"}), {})
    with pytest.raises(ValueError, match="was searched for another model or other settings"):
        load_schedule(path, optimal_steps.fingerprint({"model": "b"}))


def test_fingerprint_is_canonical_and_sees_tensors():
    weights = torch.arange(6, dtype=torch.float32)
    first = optimal_steps.fingerprint({"a": 1, "b": [1, 2], "w": weights})
    assert first == optimal_steps.fingerprint({"w": weights.clone(), "b": (1, 2), "a": 1})
    assert first != optimal_steps.fingerprint({"a": 1, "b": [1, 2], "w": weights + 1e-3})
    assert first != optimal_steps.fingerprint({"a": 1, "b": [1, 2], "w": weights.double()})
    assert len(first) == 64


def test_corrupt_schedule_files_are_refused(tmp_path, searched):
    good = tmp_path / "good.safetensors"
    save_schedule(good, searched, "f" * 64, {})
    payload = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(payload[:-5])
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"sigmas": searched.sigmas}, pickled)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a schedule at all")
    foreign = tmp_path / "foreign.safetensors"
    write_safetensors(foreign, {"weight": torch.zeros(3)}, {"format": "something else"})
    tampered = tmp_path / "tampered.safetensors"
    write_safetensors(tampered, {"sigmas": searched.sigmas * 1.01, "indices": torch.tensor(searched.indices),
                                               "teacher_sigmas": searched.teacher_sigmas},
                                    {"format": optimal_steps.FILE_FORMAT, "version": optimal_steps.FILE_VERSION,
                                     "fingerprint": "f" * 64, "settings": "{}", "report": "{}"})
    poisoned = tmp_path / "poisoned.safetensors"
    write_safetensors(poisoned, {"sigmas": searched.sigmas * math.nan, "indices": torch.tensor(searched.indices),
                                 "teacher_sigmas": searched.teacher_sigmas})
    missing = tmp_path / "missing.safetensors"
    write_safetensors(missing, {"sigmas": searched.sigmas},
                                    {"format": optimal_steps.FILE_FORMAT, "version": optimal_steps.FILE_VERSION})
    for path, message in ((truncated, "damaged safetensors file"), (pickled, "zip archive"),
                          (garbage, "not a safetensors"), (poisoned, "NaN or infinite"),
                          (foreign, "not a Stride optimal-steps schedule"), (tampered, "damaged schedule file"),
                          (missing, "damaged schedule file")):
        with pytest.raises(ValueError, match=message):
            load_schedule(path, "f" * 64)
