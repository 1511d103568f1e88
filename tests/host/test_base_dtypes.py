"""Base weights in float16, bfloat16 and float8 (ComfyUI's fp8_e4m3fn with its manual cast): training and sampling.

The shipped demo UNet (ComfyUI's own UNetModel, trained on the reference mixture) is built with each weight dtype
as ComfyUI's model config builds it (``set_inference_dtype(weight, manual_cast)``): on a CPU ComfyUI casts
float16/bfloat16/float8 weights to float32 layer by layer; GPUs compute in float16 or bfloat16. Each variant is
compared with a float32 model holding the *same* rounded weights, so the comparison measures training and sampling
in that precision, not the rounding of the base.

Tolerance. What decides whether a low-precision run "reaches float32's loss" is float32 training's own variation:
the LoRA trained in a dtype (evaluated in float32 on held-out batches) must land no further from the float32 run on
the same batches than float32 runs on other batches land from it, and must move in the same direction as that run
clearly more than those runs do (cosine of the LoRA displacements above twice theirs). A run that does not train
(cosine 0) or trains on wrong gradients fails. Measured (8 steps at lr 1e-2, a rate that moves the LoRA far in a
short run; the held-out loss rises from 0.0128 to 0.025 at it, which does not matter when comparing precisions):
cosine with the same-batch float32 run 0.91 (float16), 0.67 (bfloat16), 0.68 (fp8 -> bfloat16), 1.000 (every
CPU-cast variant); float32 runs on other batches at most 0.09; held-out losses within 0.005 of float32's, whose
runs on other batches spread 0.009-0.011. A single evaluation of this model's consistency loss in bfloat16 is itself
~65 % off float32 (the loss measures differences of two outputs that are small next to bfloat16's rounding of them),
which is why the LoRA is judged in float32 and the losses a bfloat16 run reports are noisy.

The float16 run reported silent after 7 minutes (issue 19) was the data-free teacher pool, which then showed no
progress: 16 samples x 8 guided teacher calls run before the first step. float16 itself is not slower here: on the
full SD1.5 UNet at 32x32 latents on this CPU (1 thread, shared machine) a teacher call took 16.4 s in native float16
vs 17.7 s in float32, a LoRA forward + backward 24.2 s vs 28.8 s. The one float16 op that is slow on a CPU is a
convolution's weight gradient (a 320-channel 3x3 conv at 32x32: 18.4 s vs 0.14 s in float32), which a LoRA run never
computes: the base is frozen and the adapters are float32. What float16 did need is loss scaling
(test_float16_gradients_are_accurate_only_with_loss_scaling).

Sampling: a few-step sample in a compute dtype must equal the float32 model's to ``TOLERANCE_U`` units of roundoff u
of that dtype (2^-11 float16, 2^-8 bfloat16; float32 compute: ``FLOAT32_FLOOR``) relative to the samples' scale:
four model calls, each rounding its output to about u, with CFG amplifying the difference of two of them.
"""
from __future__ import annotations

import sys
from typing import ClassVar

import pytest
import torch

from distill_core.reference import demo

COMPUTE_U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TOLERANCE_U = 8
FLOAT32_FLOOR = 1e-5
VARIANTS = {  # name: (weight dtype, compute dtype; None = the weight dtype)
    "float16": (torch.float16, None),  # a GPU's float16 path
    "float16, CPU cast": (torch.float16, torch.float32),  # what ComfyUI picks on a CPU
    "bfloat16": (torch.bfloat16, None),
    "bfloat16, CPU cast": (torch.bfloat16, torch.float32),
    "fp8_e4m3fn, CPU cast": (torch.float8_e4m3fn, torch.float32),  # UNETLoader weight_dtype fp8_e4m3fn on a CPU
    "fp8_e4m3fn, bfloat16 cast": (torch.float8_e4m3fn, torch.bfloat16),  # ... on a GPU with bfloat16
}
SIDE = 8
STEPS = 8
LR = 1e-2
HELD_OUT = 4
SEED = 2
OTHER_SEEDS = (3, 4, 5)
DATASET = 64


def demo_config(weight_dtype: torch.dtype, compute: torch.dtype | None):
    """A ComfyUI model config for the demo UNet (``DEMO_UNET_CONFIG``, SD1.5 latents and schedule) storing its
    weights in ``weight_dtype``, manually cast to ``compute`` when given (as ComfyUI's loaders configure it)."""
    import comfy.latent_formats
    import comfy.supported_models_base

    class DemoConfig(comfy.supported_models_base.BASE):
        unet_config: ClassVar[dict] = {}
        unet_extra_config: ClassVar[dict] = {}
        latent_format = comfy.latent_formats.SD15
        supported_inference_dtypes: ClassVar[list] = [torch.float16, torch.bfloat16, torch.float32]

    config = DemoConfig(dict(demo.DEMO_UNET_CONFIG))
    config.set_inference_dtype(weight_dtype, compute)
    return config


@pytest.fixture(scope="module")
def weights(comfy_host) -> dict[str, torch.Tensor]:
    """The shipped demo UNet (trained on the reference mixture): distillation lowers its held-out loss."""
    return demo.load_demo_weights()[0]


def base_model(weights: dict[str, torch.Tensor], weight_dtype: torch.dtype, compute: torch.dtype | None):
    """ComfyUI's BaseModel with ``weights`` stored in ``weight_dtype`` (manual cast to ``compute`` when given)."""
    model = demo_config(weight_dtype, compute).get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict({name: value.to(weight_dtype) for name, value in weights.items()})
    assert {p.dtype for p in model.diffusion_model.parameters()} == {weight_dtype}
    return model


def rounded(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: value.to(dtype).float() for name, value in weights.items()}


def class_cond(label: int) -> dict[str, torch.Tensor]:
    return {"c_crossattn": demo.encode_classes([label], 1)}


def trainer_for(model, side: int = SIDE, seed: int = SEED):
    """An LCM trainer (CFG 1) on class-paired mixture samples, as the benchmark's quality run sets it up; every
    run starts from the same LoRA, ``seed`` draws its batches."""
    from distill_core.spaces import NoiseSpace
    from distill_core.training.config import DistillConfig, TrainingData
    from distill_core.training.lora import attach_lora
    from distill_core.training.trainer import DistillTrainer

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(DATASET) % demo.NUM_DEMO_CLASSES
    if side == demo.DEMO_UNET_CONFIG["image_size"]:
        latents = demo.demo_mixture().sample(len(labels), generator, labels)[0].float()
    else:
        latents = torch.randn(len(labels), 4, side, side, generator=generator)
    data = TrainingData([class_cond(int(label)) for label in labels], {"c_crossattn": demo.encode_classes(None, 1)},
                        latents=latents, paired=True)
    config = DistillConfig(objective="lcm", steps=STEPS, rank=4, batch=8, lr=LR, guidance_min=0.0, guidance_max=0.0,
                           skip_small_layers=True, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # one LoRA initialisation for every run; ``seed`` draws the batches
        loraset = attach_lora(model.diffusion_model, config.rank, config.alpha, skip_small_layers=True)
    space = NoiseSpace.from_sigma_table("ve", model.model_sampling.sigmas)
    return DistillTrainer(lambda x, sigma, cond: model.apply_model(x, sigma, **cond), loraset, space, config, data)


def held_out_loss(trainer) -> float:
    """Mean loss of batches the run never trains on (step indices past its end), LoRA as it is now."""
    with torch.inference_mode(False), torch.no_grad():
        return sum(float(trainer.batch_loss(10_000 + i)) for i in range(HELD_OUT)) / HELD_OUT


def trained_lora(model, seed: int = SEED, steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor], object]:
    """``(losses, LoRA state, trainer)`` of a short LCM run on ``model`` (``steps=0``: the starting LoRA)."""
    from distill_core.training.lora import lora_state_dict

    trainer = trainer_for(model, seed=seed)
    trainer.config.steps = steps
    with torch.inference_mode(False):
        losses = trainer.train().losses["loss"] if steps else []
    state = lora_state_dict(trainer.loraset)
    trainer.loraset.remove()
    return losses, state, trainer


def float32_held_out(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor] | None) -> float:
    """The held-out loss of ``lora`` (None: none) on the float32 model with ``weights``, computed in float32."""
    from distill_core.training.lora import load_lora_state_dict

    trainer = trainer_for(base_model(weights, torch.float32, None))
    if lora is not None:
        load_lora_state_dict(trainer.loraset, lora)
    loss = held_out_loss(trainer)
    trainer.loraset.remove()
    return loss


def lora_vector(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for key, value in sorted(state.items()) if not key.endswith(".alpha")])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def float32_runs(weights) -> dict[torch.dtype, dict[str, object]]:
    """Per weight dtype, float32 training on its rounded weights, from the same LoRA: the run on :data:`SEED`'s
    batches (its held-out loss after, its LoRA displacement) and how far runs on other batches land from it
    (largest held-out loss difference, largest cosine of their displacements with its)."""
    runs: dict[torch.dtype, dict[str, object]] = {}
    for weight_dtype in {dtype for dtype, _ in VARIANTS.values()}:
        same = rounded(weights, weight_dtype)
        start = lora_vector(trained_lora(base_model(same, torch.float32, None), steps=0)[1])
        outcomes = {}
        for seed in (SEED, *OTHER_SEEDS):
            lora = trained_lora(base_model(same, torch.float32, None), seed)[1]
            outcomes[seed] = (float32_held_out(same, lora), lora_vector(lora) - start)
        after, moved = outcomes[SEED]
        runs[weight_dtype] = {
            "weights": same, "start": start, "before": float32_held_out(same, None), "after": after, "moved": moved,
            "loss_spread": max(abs(outcomes[seed][0] - after) for seed in OTHER_SEEDS),
            "direction_floor": max(cosine(outcomes[seed][1], moved) for seed in OTHER_SEEDS)}
    return runs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_base_dtype_trains_a_float32_lora_to_the_float32_loss(weights, float32_runs, variant):
    from distill_core.training.trainer import STUDENT

    weight_dtype, compute = VARIANTS[variant]
    compute = compute or weight_dtype
    model = base_model(weights, weight_dtype, None if compute == weight_dtype else compute)
    losses, lora, trainer = trained_lora(model)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert {param.dtype for param in trainer.params} == {torch.float32}, "the LoRA stays float32"
    optimizer_dtypes = {value.dtype for state in trainer.optimizers[STUDENT].state.values() for value in state.values()
                        if torch.is_tensor(value) and value.ndim}
    assert optimizer_dtypes == {torch.float32}, "AdamW's moments stay float32"
    assert trainer.loss_scales[STUDENT].enabled == (compute == torch.float16), \
        "loss scaling exactly where float16 computes"

    reference = float32_runs[weight_dtype]
    direction = cosine(lora_vector(lora) - reference["start"], reference["moved"])
    after = float32_held_out(reference["weights"], lora)
    assert direction > 2 * reference["direction_floor"], (
        f"{variant}: its LoRA moved in direction {direction:.3f} (cosine) of the float32 run on the same batches; "
        f"float32 runs on other batches reach {reference['direction_floor']:.3f}")
    assert abs(after - reference["after"]) <= reference["loss_spread"], (
        f"{variant}: its LoRA's held-out loss {after:.6g} vs the float32 run's {reference['after']:.6g} (before "
        f"training {reference['before']:.6g}; float32 runs on other batches land up to {reference['loss_spread']:.3g} "
        f"away); losses per step {losses}")


def test_float16_gradients_are_accurate_only_with_loss_scaling(weights):
    """At 64x64 latents (512 px), batch 8, the loss gradient per element (~8e-6) is below float16's normal range:
    unscaled, the LoRA gradient is off by tens of percent; scaled by 2^16, by about u. The loss here is the
    consistency loss against a fixed offset of the student's own output, so only backward precision differs."""
    from distill_core.training.loss_scale import INIT_SCALE
    from distill_core.training.memory import frozen_parameters
    from distill_core.training.objectives import consistency_loss

    def gradient(model, scale: float) -> torch.Tensor:
        trainer = trainer_for(model, side=64)
        batch = trainer.sample_batch(0)
        sigma = trainer.space.sigma_of(batch.timesteps.start)
        x_t = trainer.space.noise(batch.x0, batch.noise, sigma.reshape(-1, 1, 1, 1))
        offset = 0.01 * torch.randn(x_t.shape, generator=torch.Generator().manual_seed(4))
        with torch.inference_mode(False), frozen_parameters(model.diffusion_model):
            x0 = trainer.denoiser(x_t, sigma.float(), batch.cond)
            (consistency_loss(x0, x0.detach() + offset, "huber", 0.001) * scale).backward()
        trainer.loraset.remove()
        return torch.cat([param.grad.flatten() / scale for param in trainer.params if param.grad is not None])

    reference = gradient(base_model(rounded(weights, torch.float16), torch.float32, None), 1.0)
    errors = {scale: float((gradient(base_model(weights, torch.float16, None), scale) - reference).norm()
                           / reference.norm()) for scale in (1.0, INIT_SCALE)}
    assert errors[INIT_SCALE] < 0.02 and errors[1.0] > 5 * errors[INIT_SCALE], errors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stride_samplers_run_on_each_base_dtype(comfy_host, weights, variant):
    """Stride's TCD sampler (4 steps, CFG 2) through ComfyUI's sample_custom, wrapped as Stride's nodes wrap it:
    finite, and equal to the float32 model's samples within a few u of the compute dtype (relative to their scale)."""
    import comfy.model_patcher
    import comfy.sample

    from distill_core.sampling import tcd

    samplers = sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideTCDSampler"].__module__]
    weight_dtype, compute = VARIANTS[variant]
    noise = torch.randn(4, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    positive = [[demo.encode_classes([0], 1), {}]]
    negative = [[demo.encode_classes(None, 1), {}]]

    def samples(model) -> torch.Tensor:
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        sampling = patcher.get_model_object("model_sampling")
        sigmas = torch.cat([sampling.sigma(torch.tensor([999.0, 759.0, 499.0, 259.0])), torch.zeros(1)])
        sampler = samplers.stride_ksampler(tcd.sample_tcd, gamma=0.3)
        return comfy.sample.sample_custom(patcher, noise, 2.0, sampler, sigmas, positive, negative,
                                          torch.zeros_like(noise), seed=7)

    reference = samples(base_model(rounded(weights, weight_dtype), torch.float32, None))
    result = samples(base_model(weights, weight_dtype, compute))
    assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())
    difference = float((result - reference).abs().max() / reference.abs().max())
    assert difference <= max(TOLERANCE_U * COMPUTE_U[compute or weight_dtype], FLOAT32_FLOOR), difference
