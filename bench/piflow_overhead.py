"""pi-Flow rollout overhead: 128 substeps of a GM policy (K = 8) vs one network evaluation.

The rollout is Stride's real sampler (``distill_core.sampling.piflow.sample_piflow``, 4 NFE, 128 substeps
in total) driven by a stand-in network that returns precomputed GM outputs of the right shapes
(velocity means ``(1, 8, C, H, W)``, log-weights, log-std), so its time is the whole policy
overhead of a 4-NFE run: policy construction, temperature and every substep. It is timed side by
side with one forward of ComfyUI's own network classes with random weights at the latent size
of each family: an SD1.5 UNet on a 4x64x64 latent (512 px) and FLUX.1's Flux on a 16x128x128
latent (1024 px, 4096 image tokens + 256 text tokens). That is also pi-Qwen-Image's policy latent
at 1024 px; pi-FLUX.2's is 32x128x128 (twice the values per substep, behind a larger network) and
is not timed here. On CPU the networks are reduced where a
full-size forward does not fit the time or memory of a run; the row says so. A reduced network
is cheaper than the full one, so a ratio measured against it is an upper bound of the full-size
ratio (nothing is extrapolated). The issue's goal: the 128 substeps cost <= 3% of one evaluation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distill_core.methods import METHODS
from distill_core.sampling import piflow

from . import models
from .context import BenchContext
from .harness import Goal, Section, Table, check, cuda_sync_for, fmt_percent, fmt_seconds, median, run_interleaved

NAME = "piflow_overhead"
TITLE = "pi-Flow policy rollout overhead vs one network evaluation"
SUBSTEPS = piflow.DEFAULT_SUBSTEPS
COMPONENTS = 8
NFE = 4
GOAL_FRACTION = 0.03
SEED = 0


@dataclass
class NetworkUnderTest:
    """A network forward at one latent size, and what it is."""

    description: str
    latent_shape: tuple[int, ...]
    forward: Callable[[torch.Tensor], torch.Tensor]
    reduced: bool


SD15_SIZES = {"tiny": {"reduced_depth": True, "model_channels": 32, "context_dim": 64},
              "reduced": {"reduced_depth": True, "model_channels": 160}, "full": {}}
"""``models.unet_config`` options of each SD1.5 UNet size."""
FLUX_SIZES = {"tiny": (1, 1, 256), "reduced": (1, 1, 512), "full width": (1, 1, 3072),
              "full": (models.FLUX_DEV_ARCHITECTURE["depth"], models.FLUX_DEV_ARCHITECTURE["depth_single_blocks"],
                       models.FLUX_DEV_ARCHITECTURE["hidden_size"])}
"""(double blocks, single blocks, hidden size) of each Flux size."""
CPU_SIZES = {"smoke": ("tiny", "tiny"), "quick": ("reduced", "reduced"), "full": ("full", "full width")}
"""(SD1.5 size, Flux size) of the CPU run in each tier: a full-size Flux does not fit a CPU run."""


def sd15_network(size: str, device: torch.device, dtype: torch.dtype) -> NetworkUnderTest:
    """ComfyUI's SD1.5 UNetModel on a 4x64x64 latent (8x8 for the tiny size)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = models.unet_config("sd15", **SD15_SIZES[size])
    network = UNetModel(**config, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    models.init_random_(network, SEED).eval()
    side = 8 if size == "tiny" else 64
    generator = torch.Generator().manual_seed(SEED)
    context = torch.randn(1, 77, config["context_dim"], generator=generator).to(device, dtype)
    timestep = torch.tensor([500.0], device=device, dtype=dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return network(x.to(dtype), timestep, context=context)

    description = models.describe_unet("sd15", config, network)
    return NetworkUnderTest(description, (1, 4, side, side), forward, size != "full")


def flux_network(size: str, device: torch.device, dtype: torch.dtype) -> NetworkUnderTest:
    """ComfyUI's Flux (FLUX.1-dev layout) on a 16x128x128 latent (8x8 for the tiny size)."""
    full = models.FLUX_DEV_ARCHITECTURE
    network, description = models.flux_network(*FLUX_SIZES[size], device, dtype, SEED)
    side = 8 if size == "tiny" else 128
    generator = torch.Generator().manual_seed(SEED)
    context = torch.randn(1, models.FLUX_TEXT_TOKENS, full["context_in_dim"], generator=generator).to(device, dtype)
    pooled = torch.randn(1, full["vec_in_dim"], generator=generator).to(device, dtype)
    timestep = torch.tensor([0.5], device=device, dtype=dtype)
    guidance = torch.tensor([METHODS["pi-flux1-gm-4step"].flux_guidance], device=device, dtype=dtype)  # the adapters'

    def forward(x: torch.Tensor) -> torch.Tensor:
        return network(x.to(dtype), timestep, context, y=pooled, guidance=guidance)

    return NetworkUnderTest(description, (1, 16, side, side), forward, size != "full")


def gm_rollout(latent_shape: tuple[int, ...], device: torch.device) -> tuple[Callable[[], torch.Tensor], int, Any]:
    """``(run, substeps, first_policy)``: a 4-NFE ``sample_piflow`` run on precomputed GM outputs (float32)."""
    generator = torch.Generator().manual_seed(SEED)
    batch, *rest = latent_shape
    outputs = [(torch.randn(batch, COMPONENTS, *rest, generator=generator).to(device),
                torch.randn(batch, COMPONENTS, 1, *rest[1:], generator=generator).to(device))
               for _ in range(NFE)]
    logstd = torch.full((batch, 1, 1, 1, 1), -1.0, device=device)
    noise = torch.randn(latent_shape, generator=generator).to(device)
    sigmas = piflow.piflow_sigmas(NFE).float()
    calls = [0]

    def precomputed_network(x: torch.Tensor, sigma: torch.Tensor) -> piflow.GMPolicy:
        means, logweights = outputs[calls[0] % NFE]
        calls[0] += 1
        return piflow.GMPolicy.from_velocity(means, logweights, logstd, x, sigma)

    def run() -> torch.Tensor:
        calls[0] = 0
        return piflow.sample_piflow(precomputed_network, noise, sigmas, substeps=SUBSTEPS, disable=True)

    substeps = sum(len(piflow.substep_sigmas(float(sigmas[i]), float(sigmas[i + 1]), SUBSTEPS)) - 1
                   for i in range(NFE))
    first_policy = precomputed_network(noise, sigmas[0] * torch.ones(batch, device=device))
    return run, substeps, first_policy


@dataclass
class RolloutMeasurement:
    """Medians of one network forward and of the whole rollout (the network itself is not kept)."""

    description: str
    latent_shape: tuple[int, ...]
    reduced: bool
    forward_seconds: float
    rollout_seconds: float
    substeps: int

    @property
    def fraction(self) -> float:
        return self.rollout_seconds / self.forward_seconds


@torch.inference_mode()
def measure(network: NetworkUnderTest, device: torch.device, repeats: int) -> RolloutMeasurement:
    """Check the network and the rollout, then time them interleaved (medians)."""
    x = torch.randn(network.latent_shape, generator=torch.Generator().manual_seed(SEED)).to(device)
    out = network.forward(x)
    check(tuple(out.shape) == network.latent_shape and bool(torch.isfinite(out).all()),
          f"{network.description}: output of shape {tuple(out.shape)} is not a finite {network.latent_shape} tensor")
    run_rollout, substeps, policy = gm_rollout(network.latent_shape, device)
    check(abs(substeps - SUBSTEPS) <= NFE, f"the {NFE}-NFE rollout has {substeps} substeps, expected ~{SUBSTEPS}")
    anchored = policy.x0(policy.x_src, policy.sigma_src.reshape(-1))
    check(torch.allclose(anchored, policy.denoised, rtol=1e-4, atol=1e-5),
          "GM policy: its x0 at the source point differs from its own mixture mean")
    check(bool(torch.isfinite(run_rollout()).all()), "pi-Flow rollout produced NaN or inf")
    timings = run_interleaved({"network": lambda: network.forward(x), "rollout": run_rollout}, repeats,
                              sync=cuda_sync_for(device))
    return RolloutMeasurement(network.description, network.latent_shape, network.reduced,
                              median(timings["network"]["wall"]), median(timings["rollout"]["wall"]), substeps)


def goal_for(result: RolloutMeasurement) -> Goal:
    model = result.description.split(",")[0]
    text = f"{SUBSTEPS} GM substeps <= {fmt_percent(GOAL_FRACTION)} of one {model} evaluation"
    evidence = f"{fmt_percent(result.fraction)} measured"
    if result.fraction <= GOAL_FRACTION:
        if result.reduced:
            evidence += " against a reduced network (the full one costs more, so its ratio is lower still)"
        return Goal(text, "met", evidence)
    if result.reduced:
        return Goal(text, "undecided", evidence + " against a reduced network, an upper bound only; run with --gpu "
                                                  "for the full-size network")
    return Goal(text, "missed", evidence + " against the full-size network")


def results_table(results: list[RolloutMeasurement], device_text: str, repeats: int) -> Table:
    """``device_text`` names the device and the network's dtype (the policy math is float32)."""
    table = Table(f"{SUBSTEPS} substeps of a K={COMPONENTS} GM policy ({NFE}-NFE run, float32 policy math) vs one "
                  f"network forward, median of {repeats} interleaved repeats",
                  ["compared", "network", "latent", "device, network dtype", "rollout / forward",
                   "rollout (all substeps)", "one forward", "per NFE of a 4-NFE run"])
    for result in results:
        latent = "x".join(map(str, result.latent_shape[1:]))
        table.add(f"{result.substeps} GM substeps vs 1 forward", result.description, latent, device_text,
                  fmt_percent(result.fraction), fmt_seconds(result.rollout_seconds),
                  fmt_seconds(result.forward_seconds), fmt_percent(result.fraction / NFE))
    return table


def run(ctx: BenchContext) -> Section:
    device, dtype = torch.device("cpu"), torch.float32
    repeats = ctx.pick(2, 2, 3)
    section = Section(NAME, TITLE, __doc__.split("\n\n", 1)[1].strip())
    results = []
    for build, size in zip((sd15_network, flux_network), CPU_SIZES[ctx.tier], strict=True):
        network = build(size, device, dtype)
        ctx.log(f"{NAME}: {network.description}")
        results.append(measure(network, device, repeats))
        del network
    section.tables.append(results_table(results, "CPU, float32", repeats))
    section.goals += [goal_for(result) for result in results]
    section.checks.append("network outputs finite with the latent's shape; the rollout has "
                          f"{results[0].substeps} substeps and finite output; a GM policy's x0 at its source equals "
                          "its mixture mean")
    section.notes += [
        "A full-size FLUX.1 forward on CPU needs ~48 GB of float32 weights and minutes per step, so the CPU rows use "
        "a reduced Flux; the --gpu benchmark runs the full-size networks on CUDA.",
        "'per NFE of a 4-NFE run' = the rollout's share when its 128 substeps are spread over the run's 4 network "
        "evaluations (the overhead a user actually sees).",
    ]
    return section
