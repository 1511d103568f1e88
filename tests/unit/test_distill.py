"""LoRA consistency distillation: objectives from the official scripts, the loop, resume, DDP, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distill_core.safe_files import UnsafeFileError, read_safetensors, write_safetensors
from distill_core.sampling.lcm import lcm_boundary_scalings
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod
from distill_core.training.checkpoint import load_checkpoint
from distill_core.training.cli import demo_network
from distill_core.training.conditioning import cond_cat
from distill_core.training.config import DistillConfig, TrainingData
from distill_core.training.lora import attach_lora, ensure_autograd_compatible
from distill_core.training.memory import gradient_checkpointing
from distill_core.training.objectives import (
    LCMObjective,
    SegmentedObjective,
    TDDObjective,
    ddim_timesteps,
    evenly_picked,
    tdd_candidate_timesteps,
)
from distill_core.training.trainer import DistillDivergedError, DistillTrainer, train
from tests.unit import distill_fixtures
from tests.unit.distill_fixtures import tiny_comfy_sd15

comfy = distill_fixtures.comfy  # the fixture, found by pytest under this name (the tests take it as a parameter)
REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SPACE = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def demo_setup(objective: str = "lcm", data_free: bool = False, **overrides):
    """The CLI's demo network in float64 with a fresh rank-2 LoRA and a small config."""
    settings = {"objective": objective, "steps": 8, "rank": 2, "batch": 2, "lr": 1e-3, "data_free_samples": 4,
                "data_free_steps": 3}
    config = DistillConfig(**{**settings, **overrides})
    options = {"dtype": "float64", "num_latents": 0 if data_free else 6, "hidden": 8}
    network = demo_network(options, config)
    torch.manual_seed(5)
    loraset = attach_lora(network.module, config.rank, config.alpha)
    return network, loraset, config


def lora_vector(loraset) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in loraset.parameters()])


# -- objectives -------------------------------------------------------------------------------
def test_grids_and_boundary_scalings_match_the_official_scripts():
    grid = ddim_timesteps(50, 1000)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    assert evenly_picked(grid, 4).tolist() == [999, 759, 499, 259]
    assert evenly_picked(ddim_timesteps(250, 1000), 4).tolist() == [999, 751, 499, 251]
    c_skip, c_out = lcm_boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] == pytest.approx(0.25 / (190**2 + 0.25))
    assert c_out[2] == pytest.approx(9990 / (9990**2 + 0.25) ** 0.5)


def test_tdd_target_selection_follows_the_training_script():
    candidates = tdd_candidate_timesteps(ddim_timesteps(50, 1000), 4, 8)
    assert candidates[:6].tolist() == [0, 139, 159, 179, 199, 259] and candidates[-1] == 879 and 999 not in candidates
    objective = TDDObjective(SPACE, 50)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        steps = objective.sample_timesteps(64, generator)
        for prev, end in zip(steps.prev.tolist(), steps.end.tolist(), strict=True):
            upper = int(candidates[candidates <= prev].max())
            assert end <= upper <= prev
            assert end >= int(0.7 * max(upper - 260, 0)) - 1


def test_segmented_target_never_crosses_the_segment_edge():
    objective = SegmentedObjective(SPACE, 50, 4)
    assert objective.starts.tolist() == [0, 12, 25, 37]
    assert objective.edge_timesteps.tolist() == [0, 239, 499, 739]
    steps = objective.sample_timesteps(256, torch.Generator().manual_seed(1))
    assert bool((steps.end <= steps.prev).all())
    edges_for = objective.edge_timesteps[objective.segment_of(steps.index)]
    assert torch.equal(steps.end, edges_for)
    x_prev, x0 = torch.randn(256, 2, dtype=torch.float64), torch.randn(256, 2, dtype=torch.float64)
    target = objective.target_output(x_prev, x0, steps)
    on_edge = torch.isin(steps.index, objective.starts)
    assert on_edge.any() and (~on_edge).any()
    a, b = SPACE.coefficients(SPACE.sigma_of(steps.prev[on_edge]))
    assert torch.allclose(target[on_edge], x_prev[on_edge] / (a**2 + b**2).sqrt()[:, None])


def test_lcm_outputs_are_the_boundary_parameterisation_in_vp_scale():
    objective = LCMObjective(SPACE, 50)
    steps = objective.sample_timesteps(4, torch.Generator().manual_seed(2))
    x, x0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    alpha_cumprod = scaled_linear_alphas_cumprod()[steps.start]
    c_skip, c_out = lcm_boundary_scalings(steps.start)
    expected = c_skip[:, None] * alpha_cumprod.sqrt()[:, None] * x + c_out[:, None] * x0
    assert torch.allclose(objective.student_output(x, x0, steps), expected, atol=1e-12)


def test_config_defaults_per_objective_and_validation():
    lcm, tdd = DistillConfig(), DistillConfig(objective="tdd")
    assert ((lcm.guidance_min, lcm.guidance_max, lcm.num_ddim_timesteps, lcm.empty_prompt_proportion)
            == (3.0, 15.0, 50, 0.0))
    assert ((tdd.guidance_min, tdd.guidance_max, tdd.num_ddim_timesteps, tdd.empty_prompt_proportion)
            == (3.5, 3.5, 250, 0.2))
    assert (lcm.lr, lcm.loss, lcm.huber_c, lcm.grad_clip, lcm.alpha) == (1e-4, "huber", 0.001, 1.0, 64.0)
    assert DistillConfig.from_dict(json.loads(json.dumps(tdd.to_dict()))) == tdd
    with pytest.raises(ValueError, match="objective"):
        DistillConfig(objective="sds")
    with pytest.raises(ValueError, match="unknown distillation settings"):
        DistillConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="lr=0"):
        DistillConfig(lr=0)


# -- the loop ---------------------------------------------------------------------------------
def test_teacher_runs_cond_and_uncond_in_one_call_without_lora_or_grad():
    network, loraset, config = demo_setup(steps=3, batch=3)
    calls = []

    def recording(x, sigma, cond):
        calls.append((x.shape[0], loraset.is_enabled, torch.is_grad_enabled()))
        return network.denoiser(x, sigma, cond)

    train(recording, loraset, network.space, config, network.data)
    teacher, target, student = (6, False, False), (3, True, False), (3, True, True)
    assert calls == [teacher, target, student] * 3


def test_empty_prompts_replace_the_conditioning_of_student_target_and_teacher():
    network, loraset, config = demo_setup(steps=1, empty_prompt_proportion=1.0)
    seen = []

    def recording(x, sigma, cond):
        seen.append(cond)
        return network.denoiser(x, sigma, cond)

    train(recording, loraset, network.space, config, network.data)
    uncond = cond_cat([network.data.uncond] * 2)
    assert torch.equal(seen[0], cond_cat([uncond, uncond]))
    assert all(torch.equal(cond, uncond) for cond in seen[1:])


@pytest.mark.parametrize("objective", ["lcm", "tdd", "segmented"])
def test_loss_decreases_on_held_out_batches(objective):
    network, loraset, config = demo_setup(objective, steps=30, lr=1e-2, batch=4)
    trainer = DistillTrainer(network.denoiser, loraset, network.space, config, network.data)

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(float(trainer.batch_loss(10_000 + i)) for i in range(8)) / 8

    before = held_out_loss()
    trainer.train()
    after = held_out_loss()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("objective,data_free", [("lcm", False), ("tdd", True), ("segmented", False)])
def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tmp_path, objective, data_free):
    network, loraset, config = demo_setup(objective, data_free)
    whole = train(network.denoiser, loraset, network.space, config, network.data)
    uninterrupted = lora_vector(loraset)

    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, loraset, config = demo_setup(objective, data_free)
    finished: list[int] = []  # should_stop is also polled inside the data-free pool: count steps, not polls
    first = train(network.denoiser, loraset, network.space, config, network.data,
                  callback=lambda step, loss: finished.append(step), should_stop=lambda: len(finished) >= 3,
                  checkpoint_path=checkpoint)
    assert first.cancelled and first.steps_done == 3 and load_checkpoint(checkpoint).step == 3

    network, loraset, config = demo_setup(objective, data_free)
    torch.manual_seed(123)  # the checkpoint restores the torch RNG
    second = train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint,
                   resume=True)
    assert second.steps_done == 8
    # the loss history covers the whole run, the part before the resume included
    assert torch.allclose(torch.tensor(second.losses["loss"]), torch.tensor(whole.losses["loss"]), rtol=1e-6, atol=0)
    assert (lora_vector(loraset) - uninterrupted).abs().max() < 1e-6
    assert os.listdir(tmp_path) == ["run.ckpt.safetensors"]


def test_resume_refuses_a_checkpoint_of_different_settings(tmp_path):
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, loraset, config = demo_setup(steps=1)
    train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint)
    network, loraset, _ = demo_setup()
    changed = DistillConfig(objective="lcm", steps=8, rank=2, batch=2, lr=5e-4, data_free_samples=4, data_free_steps=3)
    with pytest.raises(ValueError, match=r"different settings \['lr'\]"):
        train(network.denoiser, loraset, network.space, changed, network.data, checkpoint_path=checkpoint, resume=True)


def test_checkpoint_holds_optimizer_rng_history_and_config_as_safetensors(tmp_path):
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, loraset, config = demo_setup(steps=2)
    result = train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint)
    tensors, metadata = read_safetensors(checkpoint)
    state = load_checkpoint(checkpoint)
    assert state.step == 2 and DistillConfig.from_dict(state.config) == config
    optimizer = state.optimizers["student"]
    assert list(state.optimizers) == list(state.loras) == ["student"]
    assert len(optimizer["state"]) == len(loraset.parameters())
    assert set(optimizer["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    assert state.history == result.losses and len(state.history["loss"]) == 2
    assert "rng.torch" in tensors and metadata["format"] == "stride-distill-checkpoint-2"


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_explains(tmp_path):
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, loraset, config = demo_setup(steps=10, save_every=2)
    calls = []

    def breaks_at_step_four(x, sigma, cond):
        calls.append(1)
        x0 = network.denoiser(x, sigma, cond)
        return x0 * float("nan") if len(calls) > 9 else x0

    with pytest.raises(DistillDivergedError, match=r"step 4.*NaN.*last good checkpoint .*step 2"):
        train(breaks_at_step_four, loraset, network.space, config, network.data, checkpoint_path=checkpoint)
    saved = load_checkpoint(checkpoint)
    assert saved.step == 2 and all(torch.isfinite(value).all() for value in saved.loras["student"].values())
    assert all(torch.isfinite(param).all() for param in loraset.parameters())
    assert os.listdir(tmp_path) == ["run.ckpt.safetensors"]


def test_gradient_checkpointing_gives_the_same_step_and_restores_forwards():
    results = []
    for checkpointing in (False, True):
        network, loraset, config = demo_setup(steps=2, gradient_checkpointing=checkpointing)
        train(network.denoiser, loraset, network.space, config, network.data)
        results.append(lora_vector(loraset))
        assert all("forward" not in module.__dict__ for module in network.module.modules())
        assert all(param.requires_grad for param in network.module.parameters())
    assert torch.allclose(results[0], results[1], atol=1e-12, rtol=0)
    network, _, _ = demo_setup()
    with gradient_checkpointing(network.module):
        assert all("forward" in block.__dict__ for block in network.module.children())


# -- multi-process and headless --------------------------------------------------------------
def test_two_process_gloo_ranks_end_with_identical_lora(tmp_path):
    settings = {
        "distill": {"objective": "tdd", "steps": 4, "rank": 2, "batch": 2, "lr": 1e-3},
        "network_options": {"dtype": "float64", "hidden": 8},
        "output": str(tmp_path / "lora.safetensors"),
        "log_every": 1,
    }
    completed = subprocess.run([sys.executable, "-m", "tests.unit.ddp_worker", str(tmp_path), json.dumps(settings)],
                               cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, meta0 = read_safetensors(tmp_path / "rank0.safetensors")
    rank1, meta1 = read_safetensors(tmp_path / "rank1.safetensors")
    assert meta0["world_size"] == meta1["world_size"] == "2"
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert any(key.endswith("lora_up.weight") and rank0[key].abs().max() > 0 for key in rank0)
    output, _ = read_safetensors(tmp_path / "lora.safetensors")
    assert output.keys() == {key[len("student."):] for key in rank0}
    assert all(torch.equal(output[key], rank0[f"student.{key}"]) for key in output)


def test_cli_runs_headless_and_writes_a_comfyui_keyed_lora(tmp_path):
    config_path = tmp_path / "config.json"
    output = tmp_path / "lora.safetensors"
    config_path.write_text(json.dumps({
        "distill": {"objective": "segmented", "steps": 3, "rank": 2, "batch": 2},
        "output": str(output), "checkpoint": str(tmp_path / "run.ckpt.safetensors"), "log_every": 1,
    }))
    completed = subprocess.run([sys.executable, "-m", "distill_core.training.cli", "--config", str(config_path)],
                               cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["step"] for line in lines[:3]] == [1, 2, 3] and lines[-1] == {"done": 3, "world_size": 1}
    assert lines[0]["loss_smoothed"] == lines[0]["loss"] and lines[2]["eta_s"] == 0
    # The terminal shows what the node shows: step, loss raw and smoothed, time left (then the run's duration).
    shown = [line for line in completed.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in shown] == ["step 1/3", "step 2/3", "step 3/3"]
    assert " (smoothed " in shown[0] and " · ETA " in shown[0] and " · done in " in shown[2]
    tensors, metadata = read_safetensors(output)
    assert metadata["stride.objective"] == "segmented"
    assert "diffusion_model.conv_in.lora_up.weight" in tensors and "diffusion_model.embed.alpha" in tensors


# -- ComfyUI's own UNet ------------------------------------------------------------------------
def test_trains_comfyui_unet_built_under_inference_mode(comfy):
    """The host's situation: model, latents and conds made under inference mode, graph run in it."""
    model = tiny_comfy_sd15(comfy)
    unet = model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        data = TrainingData(conds=[torch.randn(1, 3, 32, generator=generator) for _ in range(2)],
                            uncond=torch.zeros(1, 3, 32), latents=torch.randn(4, 4, 8, 8, generator=generator))

    def denoiser(x, sigma, cond):
        return model.apply_model(x, sigma, c_crossattn=cond)

    config = DistillConfig(objective="lcm", steps=2, rank=4, batch=2, lr=1e-3)
    loraset = attach_lora(unet, config.rank)
    with pytest.raises(ValueError, match="ensure_autograd_compatible"):
        train(denoiser, loraset, SPACE, config, data)
    loraset.remove()
    assert ensure_autograd_compatible(unet) > 0
    weights_before = {key: value.clone() for key, value in unet.state_dict().items()}

    vectors = []
    for checkpointing in (False, True):
        config = DistillConfig(objective="lcm", steps=2, rank=4, batch=2, lr=1e-3, gradient_checkpointing=checkpointing)
        torch.manual_seed(1)
        loraset = attach_lora(unet, config.rank)
        with torch.inference_mode():
            result = train(denoiser, loraset, SPACE, config, data)
        assert all(torch.isfinite(torch.tensor(result.losses["loss"])))
        vectors.append(lora_vector(loraset))
        loraset.remove()
    assert vectors[0].abs().max() > 0
    assert torch.allclose(vectors[0], vectors[1], atol=1e-6)
    assert all(torch.equal(unet.state_dict()[key], value) for key, value in weights_before.items())


def test_resuming_a_run_that_already_has_the_steps_trains_nothing_and_says_so(tmp_path):
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, loraset, config = demo_setup(steps=3)
    fresh = train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint)
    assert fresh.resumed_from is None and fresh.resume_note(3) is None
    trained = lora_vector(loraset)

    network, loraset, config = demo_setup(steps=2)
    again = train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint,
                  resume=True)
    # nothing trained: the loss history is the checkpoint's (the whole run's, as after any resume)
    assert again.resumed_from == 3 and again.steps_done == 3 and again.losses == fresh.losses
    assert (lora_vector(loraset) - trained).abs().max() == 0  # the checkpoint's LoRA, not a 2-step one
    assert "already had 3 steps, more than the 2 asked for" in again.resume_note(config.steps)
    assert load_checkpoint(checkpoint).step == 3

    network, loraset, config = demo_setup(steps=5)
    longer = train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint,
                   resume=True)
    assert longer.resumed_from == 3 and longer.steps_done == 5 and longer.resume_note(config.steps) is None


def test_training_data_refuses_non_finite_latents_and_conditioning():
    good = torch.zeros(1, 3, 4)
    bad = good.clone()
    bad[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="the training latents contain NaN or inf"):
        TrainingData(conds=[good], uncond=good, latents=torch.full((2, 4, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="the conditioning tensors of prompt 2 contain NaN or inf"):
        TrainingData(conds=[{"c": good}, {"c": bad}], uncond={"c": good}, latent_shape=(4, 8, 8))
    with pytest.raises(ValueError, match="the empty prompt's conditioning tensors contain NaN or inf"):
        TrainingData(conds=[good], uncond=[bad], latent_shape=(4, 8, 8))


@pytest.mark.parametrize("key,value,problem", [
    ("step", "3.5", "its step '3.5' is not a whole number"),
    ("step", None, "its metadata lacks ['step']"),
    ("config", "{not json", "its 'config' metadata is not valid JSON"),
    ("config", "[1, 2]", "its settings ('config') are not a JSON object"),
    ("optimizer.student.scalars", '{"x": {}}', "student optimizer scalars are not objects keyed by parameter number"),
    ("optimizer.student.param_groups", '[{"lr": 1}]', "parameter groups are not a list of objects with 'params'"),
    ("optimizer.student.param_groups", "[" * 100000 + "]" * 100000,
     "'optimizer.student.param_groups' metadata is not valid JSON"),
    ("optimizers", '["student", 3]', "its 'optimizers' metadata is not a list of role names"),
])
def test_a_checkpoint_with_damaged_metadata_is_refused_in_plain_words(tmp_path, key, value, problem):
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, loraset, config = demo_setup(steps=1)
    train(network.denoiser, loraset, network.space, config, network.data, checkpoint_path=checkpoint)
    tensors, metadata = read_safetensors(checkpoint)
    if value is None:
        del metadata[key]
    else:
        metadata[key] = value
    write_safetensors(checkpoint, tensors, metadata)
    with pytest.raises(UnsafeFileError, match="is a damaged Stride checkpoint") as refused:
        load_checkpoint(checkpoint)
    assert problem in str(refused.value)
