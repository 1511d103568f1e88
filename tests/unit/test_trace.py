"""Diffusion-target traces: what is recorded per step and how the grid is laid out."""
import functools

import pytest
import torch

from distill_core.reference.demo import demo_mixture
from distill_core.sampling import lcm, tcd
from distill_core.sampling.hybrid import HybridPhase, sample_hybrid
from distill_core.sampling.schedules import lcm_timesteps
from distill_core.sampling.trace import StepTrace, trace_grid
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod

VE = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
FLOW = NoiseSpace.flow()
SIGMAS = VE.sigmas_for_timesteps(lcm_timesteps(4))


def test_record_scales_x_t_to_unit_variance_in_either_convention():
    trace = StepTrace(max_items=2)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    trace.record(0, 3.0, x, x * 0.5, VE)
    trace.record(1, 0.25, x, x * 0.5, FLOW)
    first, second = trace.steps
    assert first.x_t.shape == (2, 4, 2, 2) and first.x_t.dtype == torch.float32
    assert torch.allclose(first.x_t, (x[:2] / 10**0.5).float())
    assert torch.allclose(second.x_t, (x[:2] / (0.75**2 + 0.25**2) ** 0.5).float())
    assert torch.allclose(first.x0, (x[:2] * 0.5).float()) and (first.kind, second.kind) == ("ve", "flow")


def test_a_hybrid_run_is_traced_across_both_phases():
    mixture = demo_mixture(size=4)
    base = HybridPhase(lambda x, s, **_: mixture.denoise(x, s, VE),
                       functools.partial(tcd.sample_tcd, space=VE, gamma=0.0), VE)
    distilled = HybridPhase(lambda x, s, **_: mixture.flow_map(x, s, FLOW, steps=8),
                            functools.partial(lcm.sample_lcm, space=FLOW), FLOW)
    trace = StepTrace(max_items=3)
    x = (torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
         * (1 + SIGMAS[0] ** 2).sqrt())
    out = sample_hybrid(base, distilled, x, SIGMAS, handover_steps=1, seed=1, callback=trace.callback())
    steps = trace.steps
    assert [step.step for step in steps] == [0, 1, 2, 3]
    assert [step.kind for step in steps] == ["ve", "flow", "flow", "flow"]
    assert torch.allclose(steps[-1].x0, out[:3].float())
    trace.reset()
    assert trace.steps == []


def test_callback_without_a_space_is_refused():
    with pytest.raises(ValueError, match="noise space"):
        StepTrace().callback()({"i": 0, "sigma": 1.0, "x": torch.zeros(1, 1, 1, 1),
                                "denoised": torch.zeros(1, 1, 1, 1)})


def test_grid_has_a_row_per_step_and_x_t_x0_column_pairs():
    trace = StepTrace()
    for step in range(3):
        x_t = torch.full((4, 1, 2, 2), 0.1 * step)
        trace.record(step, 1.0, x_t * 2**0.5, torch.full((4, 1, 2, 2), 0.5 + 0.1 * step), VE)  # x_t scaled by 1/sqrt(2)

    def decode(latents):  # one grey level per latent, tiles of 3 x 5 pixels
        return latents.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).expand(-1, 3, 5, 3)

    grid = trace_grid(trace.steps, decode, max_items=2, gap=1)
    assert grid.shape == (3 * 3 + 2, 4 * 5 + 3, 3)
    for row in range(3):
        top = row * 4
        for item in range(2):
            x_t_tile = grid[top : top + 3, (2 * item) * 6 : (2 * item) * 6 + 5]
            x0_tile = grid[top : top + 3, (2 * item + 1) * 6 : (2 * item + 1) * 6 + 5]
            assert torch.allclose(x_t_tile, torch.tensor(0.1 * row))
            assert torch.allclose(x0_tile, torch.tensor(0.5 + 0.1 * row))
    assert torch.all(grid[3] == 1.0) and torch.all(grid[:, 5] == 1.0), "gaps show the background"


def test_empty_trace_gives_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        trace_grid([], lambda latents: latents)


def test_a_hybrid_run_records_which_model_ran_each_step():
    mixture = demo_mixture(size=4)
    phases = [HybridPhase(lambda x, s, **_: mixture.denoise(x, s, VE),
                          functools.partial(tcd.sample_tcd, space=VE, gamma=0.0), VE) for _ in range(2)]
    trace = StepTrace()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(SIGMAS[0])
    sample_hybrid(*phases, x, SIGMAS, handover_steps=2, seed=1, callback=trace.callback())
    assert [step.phase for step in trace.steps] == ["base", "base", "distilled", "distilled"]
    trace.record(9, 1.0, x, x, VE)
    assert trace.steps[-1].phase == "", "a plain sampler's steps carry no phase"


def test_video_latents_are_traced_with_their_frames_side_by_side():
    trace = StepTrace()
    frames = torch.arange(3, dtype=torch.float64).view(1, 1, 3, 1, 1).expand(2, 1, 3, 2, 2)  # frame f: value f
    trace.record(0, 1.0, frames * 2**0.5, frames + 10, VE)
    assert trace.steps[0].x_t.shape == (2, 1, 3, 2, 2)

    def decode(latents):  # (m, 1, T, h, w) -> per frame one grey tile of 2 x 4 pixels, its value / 20
        assert latents.ndim == 5
        return (latents.mean(dim=(1, 3, 4)) / 20)[..., None, None, None].expand(-1, -1, 2, 4, 3)

    grid = trace_grid(trace.steps, decode, max_items=1, gap=1)
    assert grid.shape == (2, 2 * 12 + 1, 3)  # one row; x_t and x0 tiles of 3 frames x 4 pixels each
    for frame in range(3):
        assert torch.allclose(grid[:, 4 * frame : 4 * frame + 4], torch.tensor(frame / 20))
        assert torch.allclose(grid[:, 13 + 4 * frame : 13 + 4 * frame + 4], torch.tensor((frame + 10) / 20))


def test_phase_colours_mark_each_row():
    trace = StepTrace()
    for step, phase in enumerate(("base", "distilled", "")):
        trace.record(step, 1.0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), VE, phase)
    colours = {"base": (0.0, 0.0, 1.0), "distilled": (1.0, 0.5, 0.0)}
    grid = trace_grid(trace.steps, lambda latents: torch.zeros(latents.shape[0], 16, 16, 3), gap=2,
                      phase_colours=colours)
    bar = 16 // 8  # then a gap of 2
    assert grid.shape == (3 * 18 - 2, bar + 2 + 2 * 18 - 2, 3)
    assert torch.all(grid[:16, :bar] == torch.tensor(colours["base"]))
    assert torch.all(grid[18:34, :bar] == torch.tensor(colours["distilled"]))
    assert torch.all(grid[36:52, :bar] == 1.0), "a step without a phase has no bar colour"
    assert torch.all(grid[:, bar : bar + 2] == 1.0) and torch.all(grid[:16, bar + 2 : bar + 18] == 0.0)
