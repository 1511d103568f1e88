"""The shipped demo model: ComfyUI's UNetModel with the trained weights matches the exact teacher.

Needs the provisioned ComfyUI (for ``UNetModel`` and ``ModelSamplingDiscrete``); the context
encoding tests need nothing but ``distill_core``.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from distill_core.reference.demo import (
    CONTEXT_DIM,
    DEMO_CLASS_NAMES,
    DEMO_REPORT_PATH,
    DEMO_UNET_CONFIG,
    DEMO_WEIGHTS_PATH,
    NUM_DEMO_CLASSES,
    check_demo_latent_size,
    decode_context,
    demo_mixture,
    demo_noise_space,
    encode_classes,
    latent_to_rgb,
    load_demo_weights,
    nearest_timestep,
    piflow_demo_glyph,
    piflow_demo_mixture,
    unet_denoiser,
    unet_eps,
)
from scripts.comfy_host import HostError, host_dir

EPS_TOLERANCE = 0.1
"""Relative eps error allowed against the exact teacher. The shipped net reaches about 0.035-0.04
at these sigmas; the exact eps of a wrong class is off by 0.4-3.2 and the bare scaled input
(``x / sqrt(1 + sigma^2)``) by 0.3-1.4, so a broken load, a wrong input scaling or a wrong
timestep fails."""


@pytest.fixture(scope="module")
def comfy_modules():
    """ComfyUI's UNetModel class and discrete model sampling, imported on CPU."""
    try:
        path = host_dir()
    except HostError as error:
        pytest.skip(str(error))
    sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_sampling
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel, comfy.ops, comfy.model_sampling


@pytest.fixture(scope="module")
def demo_unet(comfy_modules):
    """The shipped weights in a UNetModel built from DEMO_UNET_CONFIG, as ComfyUI loads models."""
    unet_model, ops, _ = comfy_modules
    state, _ = load_demo_weights()
    unet = unet_model(**DEMO_UNET_CONFIG, operations=ops.disable_weight_init)
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def test_context_round_trip_and_unconditional_slot():
    ids = torch.tensor([0, 3, -1, 2])
    context = encode_classes(ids, 4)
    assert context.shape == (4, 1, CONTEXT_DIM) == (4, 1, NUM_DEMO_CLASSES + 1)
    assert torch.equal(context.sum(dim=-1), torch.ones(4, 1))
    assert context[2, 0, -1] == 1
    assert torch.equal(decode_context(context), ids)
    assert torch.equal(decode_context(encode_classes(None, 3)), torch.full((3,), -1))
    assert torch.equal(decode_context(0.9 * context + 0.01), ids)
    with pytest.raises(ValueError):
        encode_classes([NUM_DEMO_CLASSES], 1)
    with pytest.raises(ValueError):
        encode_classes([0, 1], 3)


def test_weights_file_matches_config_and_report():
    state, metadata = load_demo_weights()
    assert DEMO_WEIGHTS_PATH.stat().st_size < 8 * 2**20
    assert metadata["config"] == DEMO_UNET_CONFIG
    assert metadata["class_names"] == list(DEMO_CLASS_NAMES)
    assert metadata["training"]["steps"] > 0
    assert all(torch.isfinite(t).all() for t in state.values())
    report = json.loads(DEMO_REPORT_PATH.read_text())
    assert report["parameters"] == sum(t.numel() for t in state.values())
    assert report["evaluation"]["results"]["unconditional"]["net"]["mode_recall"] == 1.0


def test_weights_load_strictly_into_comfy_unet(demo_unet):
    state, _ = load_demo_weights()
    assert set(demo_unet.state_dict()) == set(state)
    for key, value in demo_unet.state_dict().items():
        assert value.shape == state[key].shape, key
    out = demo_unet(torch.zeros(2, 4, 8, 8), torch.tensor([10.0, 900.0]), context=encode_classes([0, -1], 2))
    assert out.shape == (2, 4, 8, 8)


def test_eps_wrapper_calls_the_net_like_comfy_eps_model_sampling(comfy_modules):
    """Input scaling and timestep equal ComfyUI's EPS ``calculate_input`` and ``timestep``."""
    _, _, model_sampling = comfy_modules

    class Sampling(model_sampling.ModelSamplingDiscrete, model_sampling.EPS):
        pass

    host_sampling = Sampling()
    seen = {}

    def recording_net(x, timesteps, context):
        seen.update(x=x, timesteps=timesteps, context=context)
        return torch.ones_like(x)

    space = demo_noise_space()
    sigma = torch.tensor([0.03, 0.4, 1.0, 5.5, 14.6])
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = unet_eps(recording_net, x, sigma, encode_classes(None, 5), space)
    torch.testing.assert_close(seen["x"], host_sampling.calculate_input(sigma, x))
    assert torch.equal(seen["timesteps"], host_sampling.timestep(sigma).float())
    torch.testing.assert_close(x - sigma.reshape(-1, 1, 1, 1) * eps, host_sampling.calculate_denoised(sigma, eps, x))
    table_sigmas = space.sigma_table[[0, 1, 500, 998, 999]].float()
    assert nearest_timestep(space, table_sigmas).tolist() == [0, 1, 500, 998, 999]


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_net_eps_is_close_to_the_exact_teacher(demo_unet, sigma):
    mixture, space = demo_mixture(), demo_noise_space()
    generator = torch.Generator().manual_seed(1)
    class_ids = torch.arange(-1, NUM_DEMO_CLASSES).repeat(8)
    x0, _ = mixture.sample(len(class_ids), generator, class_ids=class_ids)
    x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    exact = mixture.targets(x, sigma, space, "eps", class_ids=class_ids)
    sigmas = torch.full((len(class_ids),), sigma)
    with torch.no_grad():
        predicted = unet_eps(demo_unet, x.float(), sigmas, encode_classes(class_ids, len(class_ids)), space)
    relative_error = float((predicted.double() - exact).norm() / exact.norm())
    assert relative_error < EPS_TOLERANCE, relative_error


def test_prompt_steers_the_net_like_the_teacher(demo_unet):
    """At high noise (where the prompt decides the class), each prompt's denoised x0 lands near that
    class's exact answer, at most half as far as from any other class's answer."""
    mixture, space = demo_mixture(), demo_noise_space()
    sigma = 6.0
    generator = torch.Generator().manual_seed(2)
    x0, _ = mixture.sample(8, generator)
    x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    net = unet_denoiser(demo_unet, space)
    exact = torch.stack([mixture.denoise(x, sigma, space, torch.full((8,), c)) for c in range(NUM_DEMO_CLASSES)])
    for c in range(NUM_DEMO_CLASSES):
        with torch.no_grad():
            predicted = net(x.float(), torch.full((8,), sigma), torch.full((8,), c)).double()
        distances = (exact - predicted).flatten(2).norm(dim=2).mean(dim=1)
        assert distances.argmin() == c, distances
        assert distances[c] < 0.5 * distances[torch.arange(NUM_DEMO_CLASSES) != c].min(), distances


def test_piflow_reference_data_decodes_to_the_letter_pi_in_varied_colours():
    """The pi-Flow reference teacher's samples are pictures: in the preview, the letter's pixels are warm
    (red > 0.7) and the others grey, in every sample; within the letter the four colours vary by sample."""
    mixture = piflow_demo_mixture()
    latents, components = mixture.sample(64, torch.Generator().manual_seed(0))
    rgb = latent_to_rgb(latents)
    letter = piflow_demo_glyph().bool()
    warm = rgb[..., 0] > 0.7
    assert bool((warm == letter).all()), f"{int((warm != letter).sum())} of {warm.numel()} pixels off the picture"
    grey = rgb[:, ~letter]
    assert float((grey.max(dim=-1).values - grey.min(dim=-1).values).max()) < 0.3, "the background stays grey"
    in_letter = components[:, letter]
    assert set(in_letter.unique().tolist()) == {0, 1, 2, 3}
    assert len({tuple(row.tolist()) for row in in_letter}) == 64, "every sample colours the letter differently"


@pytest.mark.parametrize("height,width", [(1, 1), (2, 2), (1, 2), (2, 3), (3, 1), (1, 8), (7, 9), (8, 8)])
def test_the_latent_size_check_agrees_with_the_network(demo_unet, height, width):
    x = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(0))
    context = encode_classes(torch.tensor([1]), 1).float()
    try:
        with torch.no_grad():
            demo_unet(x, torch.tensor([500.0]), context=context)
        runs = True
    except ValueError:  # the network's own GroupNorm refusal
        runs = False
    if runs:
        check_demo_latent_size(height, width)
    else:
        with pytest.raises(ValueError, match=f"at least 3 in height or width \\(got {height}x{width}\\)"):
            check_demo_latent_size(height, width)
