"""Headless distillation: ``python -m distill_core.training.cli --config config.json``.

Runs the same loop as the in-graph node, single-process or under ``torchrun`` (DDP: gloo on
CPU, NCCL on CUDA, gradients averaged over the LoRA parameters). The JSON config::

    {
      "distill": {...DistillConfig fields...},
      "network": "package.module:factory",     # default: the built-in demo network
      "network_options": {...},                # passed to the factory
      "output": "lora.safetensors",            # written by rank 0 (dmd: the generator's LoRA)
      "checkpoint": "run.ckpt.safetensors",    # optional; with "resume": true it continues
      "resume": false,
      "lora_prefix": "diffusion_model.",
      "log_every": 10,
      "fake_score_output": "fake.safetensors", # dmd, optional: keep the fake score's LoRA (rank 0)
      "fake_score_init": "fake.safetensors"    # dmd, optional: start the fake score from a kept one
    }

A factory ``factory(options, config) -> HeadlessNetwork`` supplies the denoiser, the module
carrying its weights, the noise space and the training data; exporters point it at their own
loader (the ComfyUI node exports a bundle folder: this config, the teacher's weights and
:func:`save_training_data`'s file, read back by ``nodes/headless_teacher.py``). Relative paths in a config
are relative to the config file's folder. The demo network is a tiny EPS-predicting conv net
wrapped like ComfyUI's ``BaseModel.apply_model`` (VE space).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..safe_files import read_safetensors, write_safetensors
from ..spaces import NoiseSpace, scaled_linear_alphas_cumprod
from .conditioning import Denoiser
from .config import DistillConfig, TrainingData
from .lora import lora_state_dict, weights_fingerprint
from .progress import TrainingProgress
from .trainer import LoraTrainer, TrainResult, build_trainer

DEFAULT_NETWORK = f"{__package__}.cli:demo_network"
CONFIG_FILE, DATA_FILE = "config.json", "data.safetensors"
TEACHER_FILE, TEACHER_FORMAT = "teacher.safetensors", "stride-headless-teacher-1"  # written by the node layer


@dataclass
class HeadlessNetwork:
    denoiser: Denoiser
    module: nn.Module
    space: NoiseSpace
    data: TrainingData


@dataclass
class RunSummary:
    trainer: LoraTrainer  # its LoRAs stay attached to the network
    result: TrainResult
    rank: int
    world_size: int


class DemoEpsNet(nn.Module):
    """A tiny conditional EPS predictor from Linear and Conv2d layers (for tests and demos)."""

    def __init__(self, channels: int = 4, hidden: int = 16, cond_dim: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.embed = nn.Linear(cond_dim + 1, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        embedding = self.embed(torch.cat([cond, timestep.reshape(-1, 1).to(cond.dtype) / 1000], dim=1))
        h = nn.functional.silu(self.conv_in(x) + embedding[:, :, None, None])
        h = nn.functional.silu(self.conv_mid(h))
        return self.conv_out(h)


def eps_denoiser(net: nn.Module, space: NoiseSpace) -> Denoiser:
    """``x0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma), cond)``: ComfyUI's EPS ``apply_model``."""
    def denoise(x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        sigma_column = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        timestep = space.timestep_of(sigma.detach().cpu()).to(device=x.device, dtype=x.dtype)
        return x - sigma_column * net(x / (sigma_column**2 + 1).sqrt(), timestep, cond)
    return denoise


def velocity_denoiser(net: nn.Module, space: NoiseSpace) -> Denoiser:
    """``x0 = x - sigma * v(x, 1000 sigma, cond)``: ComfyUI's CONST (rectified flow) ``apply_model``."""
    def denoise(x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        sigma_column = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x - sigma_column * net(x, sigma * 1000, cond)
    return denoise


def demo_network(options: dict[str, Any], config: DistillConfig) -> HeadlessNetwork:
    """The demo: seeded random net, random conditionings, random latents or data-free; an EPS model in the
    SD1.5 VE space, or with ``"prediction": "velocity"`` a flow model (shift ``options["shift"]``, default 3)."""
    channels, size = options.get("channels", 4), options.get("size", 8)
    cond_dim, dtype = options.get("cond_dim", 8), getattr(torch, options.get("dtype", "float32"))
    generator = torch.Generator().manual_seed(options.get("seed", 0))
    with torch.random.fork_rng():
        torch.manual_seed(options.get("seed", 0))
        net = DemoEpsNet(channels, options.get("hidden", 16), cond_dim).to(dtype)
    prediction = options.get("prediction", "eps")
    if prediction not in ("eps", "velocity"):
        raise ValueError(f"demo network prediction must be 'eps' or 'velocity', got {prediction!r}")
    flow = prediction == "velocity"
    space = (NoiseSpace.flow(options.get("shift", 3.0)) if flow
             else NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod()))
    conds = [torch.randn(1, cond_dim, generator=generator, dtype=dtype) for _ in range(options.get("num_conds", 4))]
    uncond = torch.zeros(1, cond_dim, dtype=dtype)
    num_latents = options.get("num_latents", 8)
    latents = torch.randn(num_latents, channels, size, size, generator=generator, dtype=dtype) if num_latents else None
    data = TrainingData(conds, uncond, latents=latents, latent_shape=(channels, size, size))
    return HeadlessNetwork((velocity_denoiser if flow else eps_denoiser)(net, space), net, space, data)


def save_training_data(path: str | os.PathLike, data: TrainingData) -> None:
    """Write conditionings (tensors or dicts of tensors) and latents as one safetensors file, atomically."""
    tensors: dict[str, Tensor] = {}
    for label, cond in [*((f"cond.{i}", c) for i, c in enumerate(data.conds)), ("uncond", data.uncond)]:
        parts = cond if isinstance(cond, dict) else {"": cond}
        tensors.update({f"{label}.{name}" if name else label: value for name, value in parts.items()})
    if data.latents is not None:
        tensors["latents"] = data.latents
    metadata = {"format": "stride-training-data-1", "num_conds": str(len(data.conds)),
                "latent_shape": json.dumps(list(data.latent_shape) if data.latent_shape else None),
                "paired": json.dumps(data.paired)}
    write_safetensors(path, tensors, metadata)


def load_training_data(path: str | os.PathLike, device: torch.device | str = "cpu") -> TrainingData:
    """Read :func:`save_training_data`'s file (safetensors only) onto ``device``."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != "stride-training-data-1":
        raise ValueError(f"{path} is not a Stride training-data file (format {metadata.get('format')!r})")
    tensors = {key: value.to(device) for key, value in tensors.items()}

    def cond(label: str) -> Tensor | dict[str, Tensor]:
        if label in tensors:
            return tensors[label]
        return {key[len(label) + 1:]: value for key, value in tensors.items() if key.startswith(label + ".")}

    shape = json.loads(metadata["latent_shape"])
    return TrainingData([cond(f"cond.{i}") for i in range(int(metadata["num_conds"]))], cond("uncond"),
                        latents=tensors.get("latents"), latent_shape=tuple(shape) if shape else None,
                        paired=json.loads(metadata["paired"]))


def import_network_factory(path: str) -> Callable[[dict[str, Any], DistillConfig], HeadlessNetwork]:
    """The factory named ``package.module:factory`` or ``path/to/file.py:factory`` (a file is loaded on its own,
    without importing the package around it; :func:`main` makes a relative file path absolute from the
    directory the run was started in)."""
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ValueError(f"network must look like 'package.module:factory' or 'path/file.py:factory', got {path!r}")
    if module_name.endswith(".py"):
        name = f"stride_network_{os.path.basename(module_name)[:-3]}"
        spec = importlib.util.spec_from_file_location(name, module_name)
        if spec is None or spec.loader is None or not os.path.isfile(module_name):
            raise ValueError(f"network file {module_name!r} not found (paths are relative to the working directory)")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, attribute)
    return getattr(importlib.import_module(module_name), attribute)


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://")
    return True


def _check_replicas_equal(trainer: LoraTrainer) -> None:
    """Fail loudly if ranks ended with different trained weights (they must be replicas)."""
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.params]).double().cpu()
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    difference = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    if difference.item() != 0:
        raise RuntimeError(f"LoRA replicas differ across ranks (max |diff| {difference.item():.3g})")


def run(settings: dict[str, Any]) -> RunSummary:
    """Train as the JSON ``settings`` say; rank 0 writes ``output``. Returns the attached LoRA."""
    known = {"distill", "network", "network_options", "output", "checkpoint", "resume", "lora_prefix", "log_every",
             "fake_score_output", "fake_score_init"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}")
    config = DistillConfig.from_dict(settings.get("distill", {}))
    if config.objective != "dmd" and ({"fake_score_output", "fake_score_init"} & set(settings)):
        raise ValueError("fake_score_output / fake_score_init belong to the 'dmd' objective")
    started_group = init_distributed_from_env()
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        factory = import_network_factory(settings.get("network", DEFAULT_NETWORK))
        network = factory(settings.get("network_options", {}), config)
        log_every = settings.get("log_every", 10)
        progress: TrainingProgress | None = None

        def log(step: int, losses: dict[str, float]) -> None:
            """Every ``log_every`` steps: a JSON line on stdout (each series' loss raw and ``<series>_smoothed``,
            the seconds left), and on stderr what the node shows (step, losses raw and smoothed, time left)."""
            nonlocal progress
            if progress is None:  # a resumed run starts after its checkpoint's step
                progress = TrainingProgress(config.steps, first_step=step)
            progress.update(step, losses)
            if rank == 0 and (step % log_every == 0 or step == config.steps):
                event = progress.event()
                smoothed = {f"{series}_smoothed": event["ema"][series] for series in losses}
                print(json.dumps({"step": step, **losses, **smoothed, "eta_s": event["eta_s"]}), flush=True)
                print(progress.text(), file=sys.stderr, flush=True)

        fake_state = None
        if settings.get("fake_score_init"):
            from .dmd import read_fake_score  # dmd.py builds on the trainer

            fake_state = read_fake_score(settings["fake_score_init"], weights_fingerprint(network.module))
        trainer = build_trainer(network.denoiser, network.module, network.space, config, network.data, fake_state)
        result = trainer.train(log, checkpoint_path=settings.get("checkpoint"), resume=settings.get("resume", False))
        if world_size > 1:
            _check_replicas_equal(trainer)
        if rank == 0 and settings.get("output"):
            metadata = {"stride.objective": config.objective, "stride.steps": str(result.steps_done),
                        "stride.config": json.dumps(config.to_dict())}
            prefix = settings.get("lora_prefix", "diffusion_model.")
            write_safetensors(settings["output"], lora_state_dict(trainer.loraset, prefix), metadata)
        if rank == 0 and settings.get("fake_score_output"):
            from .dmd import FAKE, fake_score_metadata

            write_safetensors(settings["fake_score_output"], lora_state_dict(trainer.adapters[FAKE]),
                              fake_score_metadata(weights_fingerprint(network.module), config))
        return RunSummary(trainer, result, rank, world_size)
    finally:
        if started_group:
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stride LoRA distillation (headless)")
    parser.add_argument("--config", required=True, help="JSON file with the run settings")
    arguments = parser.parse_args(argv)
    with open(arguments.config, encoding="utf-8") as stream:
        settings = json.load(stream)
    network = settings.get("network", DEFAULT_NETWORK)
    if network.partition(":")[0].endswith(".py"):  # a network file is relative to where the run was started
        settings["network"] = os.path.abspath(network)
    os.chdir(os.path.dirname(os.path.abspath(arguments.config)))  # other relative paths are relative to the config
    summary = run(settings)
    if summary.rank == 0:
        note = summary.result.resume_note(DistillConfig.from_dict(settings.get("distill", {})).steps)
        print(json.dumps({"done": summary.result.steps_done, "world_size": summary.world_size,
                          **({"note": note} if note else {})}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
