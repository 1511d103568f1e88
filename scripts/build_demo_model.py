"""Train Stride's demo model: a small ComfyUI ``UNetModel`` fitted to the demo Gaussian mixture.

The network (:data:`distill_core.reference.demo.DEMO_UNET_CONFIG`) is an SD1.5-style EPS model: VE
convention ``x = x0 + sigma * eps`` with the scaled-linear 1000-step schedule, called like
ComfyUI calls it (input ``/ sqrt(sigma^2 + 1)``, nearest discrete timestep). Instead of noisy
targets it regresses the *exact* noise prediction of the analytic teacher
(:func:`distill_core.reference.demo.demo_mixture`), which converges much faster. A fraction of the
batch carries the empty prompt (unconditional mixture) so classifier-free guidance works.

Everything runs on CPU from one seed with deterministic algorithms. Afterwards the script
samples the net and the exact teacher with the same 50-step Euler sampler and the same noise,
scores both against fresh mixture samples (and data against data), and writes the weights
(safetensors with the config, training facts and metrics as metadata) and a JSON report, both
atomically.

Usage: ``python scripts/build_demo_model.py [--steps N] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_core.reference import metrics  # noqa: E402
from distill_core.reference.demo import (  # noqa: E402
    DEMO_CLASS_NAMES,
    DEMO_UNET_CONFIG,
    DEMO_WEIGHTS_PATH,
    METADATA_PREFIX,
    NUM_DEMO_CLASSES,
    demo_mixture,
    demo_noise_space,
    encode_classes,
    unet_denoiser,
    unet_eps,
)
from distill_core.reference.mixture import GaussianMixture  # noqa: E402
from distill_core.spaces import NoiseSpace  # noqa: E402
from scripts.comfy_host import host_dir  # noqa: E402

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


# ------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------
def build_unet(seed: int) -> nn.Module:
    """ComfyUI's ``UNetModel`` from the demo config, with ComfyUI's loading-time ops and a
    seeded LDM-style initialisation (those ops skip initialisation; outputs start at zero)."""
    sys.path.insert(0, str(host_dir()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**DEMO_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    for module in unet.modules():
        for torch_class in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
            if isinstance(module, torch_class):
                torch_class.reset_parameters(module)
    zero_init = [unet.out[-1]]
    zero_init += [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)]
    zero_init += [m.proj_out for m in unet.modules() if isinstance(m, SpatialTransformer)]
    for module in zero_init:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    return unet


# ------------------------------------------------------------------------------------------
# Training on the exact teacher
# ------------------------------------------------------------------------------------------
def training_batch(
    mixture: GaussianMixture,
    space: NoiseSpace,
    batch: int,
    unconditional_fraction: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noisy latents, sigmas, contexts and the exact teacher's eps (float32).

    Timesteps are uniform over the 1000 training steps (as in SD training); each sample's class is
    uniform and its prompt is emptied with probability ``unconditional_fraction`` (then the target
    is the unconditional mixture's eps).
    """
    class_ids = torch.randint(0, NUM_DEMO_CLASSES, (batch,), generator=generator)
    x0, _ = mixture.sample(batch, generator, class_ids=class_ids)
    timesteps = torch.randint(0, space.num_timesteps, (batch,), generator=generator)
    sigma = space.sigma_table[timesteps]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    prompt_ids = torch.where(
        torch.rand(batch, generator=generator, dtype=torch.float64) < unconditional_fraction, -1, class_ids
    )
    eps = mixture.targets(x, sigma, space, "eps", class_ids=prompt_ids)
    return x.float(), sigma.float(), encode_classes(prompt_ids, batch), eps.float()


def train(
    unet: nn.Module,
    mixture: GaussianMixture,
    space: NoiseSpace,
    steps: int,
    batch: int,
    learning_rate: float,
    unconditional_fraction: float,
    seed: int,
) -> list[float]:
    """AdamW on the eps MSE to the exact teacher, linear warm-up then cosine decay; returns the
    mean loss of each tenth of the run."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    unet.train()
    losses, window = [], []
    for step in range(steps):
        x, sigma, context, eps = training_batch(mixture, space, batch, unconditional_fraction, generator)
        loss = (unet_eps(unet, x, sigma, context, space) - eps).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            print(f"step {step + 1}/{steps}: eps mse {losses[-1]:.5f}", flush=True)
            window = []
    unet.eval()
    return losses


# ------------------------------------------------------------------------------------------
# Evaluation: the same 50-step Euler sampler for the net and the exact teacher
# ------------------------------------------------------------------------------------------
def euler_sample(denoise: Denoiser, noise: Tensor, sigmas: Tensor, class_ids: Tensor | None) -> Tensor:
    """Euler on the probability-flow ODE ``dx/dsigma = (x - denoised) / sigma``, started like
    ComfyUI starts a full denoise of an EPS model (``noise * sqrt(1 + sigma_max^2)``)."""
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        denoised = denoise(x, x.new_full((x.shape[0],), sigma), class_ids)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def normal_sigmas(space: NoiseSpace, steps: int) -> Tensor:
    """ComfyUI's "normal" schedule: timesteps evenly spaced from the last to the first, then 0."""
    return space.sigmas_for_timesteps(torch.linspace(space.num_timesteps - 1, 0, steps, dtype=torch.float64))


def eps_relative_errors(
    unet: nn.Module, mixture: GaussianMixture, space: NoiseSpace, sigmas: list[float], n: int, seed: int
) -> dict[str, float]:
    """``|eps_net - eps_exact| / |eps_exact|`` over ``n`` noisy class-conditional samples per sigma."""
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for sigma in sigmas:
        class_ids = torch.randint(0, NUM_DEMO_CLASSES, (n,), generator=generator)
        x0, _ = mixture.sample(n, generator, class_ids=class_ids)
        x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        exact = mixture.targets(x, sigma, space, "eps", class_ids=class_ids)
        with torch.no_grad():
            predicted = unet_eps(unet, x.float(), torch.full((n,), sigma), encode_classes(class_ids, n), space)
        errors[f"{sigma:g}"] = float((predicted.double() - exact).norm() / exact.norm())
    return errors


def trajectory_agreement(net_samples: Tensor, exact_samples: Tensor, mixture: GaussianMixture) -> dict[str, float]:
    """How closely the net follows the exact teacher's deterministic ODE from the same noise: the
    fraction of samples ending in the same mixture component, and the per-element RMS distance
    between the two samples where they do (to compare with the components' std)."""
    same = metrics.mode_assignment(net_samples, mixture) == metrics.mode_assignment(exact_samples, mixture)
    squared = (net_samples.double() - exact_samples.double()).flatten(1).square().mean(dim=1)
    return {
        "mode_agreement": float(same.double().mean()),
        "rms_to_teacher_same_mode": float(squared[same].mean().sqrt()) if same.any() else math.nan,
    }


def evaluate(
    unet: nn.Module, mixture: GaussianMixture, space: NoiseSpace, steps: int, samples_per_class: int, cfg_scale: float,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of the net's and the exact teacher's ``steps``-step Euler samples (same noise) and of
    fresh data, per class, for the empty prompt, and with classifier-free guidance. The net's entry
    also compares its samples with the teacher's from the same noise (see :func:`trajectory_agreement`)."""
    net = unet_denoiser(unet, space)

    def exact(x: Tensor, sigma: Tensor, class_ids: Tensor | None) -> Tensor:
        return mixture.denoise(x, sigma, space, class_ids)

    def guided(denoise: Denoiser) -> Denoiser:
        def denoise_cfg(x: Tensor, sigma: Tensor, class_ids: Tensor | None) -> Tensor:
            uncond = denoise(x, sigma, None)
            return uncond + cfg_scale * (denoise(x, sigma, class_ids) - uncond)

        return denoise_cfg

    settings: list[tuple[str, Tensor | None, Denoiser, Denoiser]] = [
        (name, torch.full((samples_per_class,), label), net, exact) for label, name in enumerate(DEMO_CLASS_NAMES)
    ]
    all_classes = torch.arange(NUM_DEMO_CLASSES).repeat_interleave(samples_per_class)
    settings.append(("unconditional", None, net, exact))
    settings.append((f"cfg{cfg_scale:g}", all_classes, guided(net), guided(exact)))
    sigmas = normal_sigmas(space, steps).float()
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for name, class_ids, net_denoise, exact_denoise in settings:
        n = len(all_classes) if class_ids is None else len(class_ids)
        noise = torch.randn((n, *mixture.latent_shape), generator=generator)
        with torch.no_grad():
            net_samples = euler_sample(net_denoise, noise, sigmas, class_ids)
        exact_samples = euler_sample(exact_denoise, noise.double(), sigmas.double(), class_ids)
        data, _ = mixture.sample(n, generator, class_ids=class_ids)
        metric_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        results[name] = {
            label: metrics.evaluate_samples(samples, mixture, class_ids, torch.Generator().manual_seed(metric_seed))
            for label, samples in (("net", net_samples), ("teacher", exact_samples), ("data", data))
        }
        row = results[name]
        row["net"] |= trajectory_agreement(net_samples, exact_samples, mixture)
        print(
            f"{name:>13}: swd net {row['net']['swd']:.4f} teacher {row['teacher']['swd']:.4f} "
            f"data {row['data']['swd']:.4f} | nll gap net {row['net']['nll_gap']:+.4f} "
            f"teacher {row['teacher']['nll_gap']:+.4f} | same mode as teacher {row['net']['mode_agreement']:.2f} "
            f"| recall net {row['net']['mode_recall']:.2f} "
            f"| entropy net {row['net']['mode_entropy']:.3f} data {row['data']['mode_entropy']:.3f}",
            flush=True,
        )
    return results


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename it over ``path`` (with the
    permissions a plain new file would get, not ``mkstemp``'s private 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2500, help="training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-3, help="peak AdamW learning rate")
    parser.add_argument("--unconditional-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of the recipe)")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--samples-per-class", type=int, default=256)
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the CFG evaluation row")
    parser.add_argument("--out", type=Path, default=DEMO_WEIGHTS_PATH, help="weights path (.json report beside it)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    mixture, space = demo_mixture(), demo_noise_space()
    unet = build_unet(args.seed)
    parameters = sum(p.numel() for p in unet.parameters())
    print(f"UNetModel with {parameters} parameters", flush=True)

    start, start_cpu = time.perf_counter(), time.process_time()
    losses = train(unet, mixture, space, args.steps, args.batch, args.lr, args.unconditional_fraction, args.seed)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"trained {args.steps} steps in {wall:.1f} s ({cpu:.1f} CPU s)", flush=True)

    eps_errors = eps_relative_errors(unet, mixture, space, [0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 14.0], 512, args.seed + 1)
    print("eps relative error by sigma:", {k: round(v, 4) for k, v in eps_errors.items()}, flush=True)
    evaluation = evaluate(unet, mixture, space, args.sample_steps, args.samples_per_class, args.cfg, args.seed + 2)

    training = {
        "steps": args.steps,
        "batch": args.batch,
        "learning_rate": args.lr,
        "schedule": "AdamW, 5% linear warm-up, cosine decay, grad-norm clip 1",
        "target": "exact eps of distill_core.reference.demo.demo_mixture()",
        "timesteps": "uniform over 1000 scaled-linear steps",
        "unconditional_fraction": args.unconditional_fraction,
        "seed": args.seed,
        "threads": args.threads,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "loss_by_tenth": [round(v, 6) for v in losses],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    report = {
        "config": DEMO_UNET_CONFIG,
        "class_names": list(DEMO_CLASS_NAMES),
        "parameters": parameters,
        "training": training,
        "eps_relative_error": eps_errors,
        "evaluation": {"sampler": f"euler, {args.sample_steps} steps, normal schedule", "results": evaluation},
    }
    summary = {name: {k: round(row["net"][k], 4) for k in ("swd", "nll_gap", "mode_recall")}
               for name, row in evaluation.items()}
    metadata = {
        f"{METADATA_PREFIX}config": json.dumps(DEMO_UNET_CONFIG),
        f"{METADATA_PREFIX}class_names": json.dumps(list(DEMO_CLASS_NAMES)),
        f"{METADATA_PREFIX}training": json.dumps(training),
        f"{METADATA_PREFIX}metrics": json.dumps(summary),
    }
    state = {key: value.detach().contiguous() for key, value in unet.state_dict().items()}
    write_atomically(args.out, lambda p: save_file(state, str(p), metadata=metadata))
    report_path = args.out.with_suffix(".json")
    write_atomically(report_path, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {report_path}")


if __name__ == "__main__":
    main()
