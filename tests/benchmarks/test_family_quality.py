"""The family benchmark's pieces: the t-interval helper and the ideal students it samples from."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from distill_core.methods import build_sampler, method, method_sigmas
from distill_core.reference.mixture import GaussianMixture
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod

# this folder is not named 'bench' (see the smoke test): import the benchmark package by its name
family_quality = importlib.import_module("bench.family_quality")
context = importlib.import_module("bench.context")
VE = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
FLOW = NoiseSpace.flow(1.0)


@pytest.mark.parametrize("key, space", [("sdxl-lightning-4step", VE), ("tcd-lora", VE), ("tdd-sdxl", VE),
                                        ("qwen-image-lightning-4step", FLOW)])
def test_ideal_student_keeps_one_gaussian_exact(key, space):
    """For one centred Gaussian every registry sampler fed its ideal student returns samples of N(0, s^2): a wrong
    target would leave noise in (variance too high) or take too much out. (Centred, because SD's top timestep still
    holds signal: a start from pure noise misses the mean's 3% share, as with the real models.)"""
    generator = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(torch.zeros(1, 2, 2, 2, dtype=torch.float64), 0.5)
    entry = method(key)
    sigmas = method_sigmas(entry, space)
    model = family_quality.ideal_student(mixture, space, entry, sigmas, None, ode_steps=40)
    noise = torch.randn(4000, 2, 2, 2, generator=generator, dtype=torch.float64)
    start = family_quality._host_start(space, noise, float(sigmas[0]))
    samples = build_sampler(entry, space)(model, start, sigmas, {"seed": 1}, disable=True)
    assert samples.mean(0).abs().max() < 0.05
    assert (samples.var(0) / 0.25 - 1).abs().max() < 0.1


def test_smoke_run_reports_every_family_row(tmp_path: Path):
    ctx = context.BenchContext(tier="smoke", device=torch.device("cpu"), plots_dir=tmp_path, verbose=False)
    section = family_quality.run(ctx)
    (table,) = section.tables
    assert [row[0] for row in table.rows][:-1] == [family for family, _ in family_quality.FAMILIES[::4]]
    assert all("±" in cell for row in table.rows for cell in row[3:] if cell != "-")
