"""Run Stride's benchmarks and write bench/RESULTS.md (+ plots in bench/plots/).

    python -m bench.run [--quick] [--only NAME ...] [--gpu] [--full-size] [--device auto|cpu|cuda] [--threads N]

Each benchmark is a module in :data:`BENCHMARKS` with ``NAME``, ``TITLE`` and
``run(ctx) -> Section`` (ComfyUI is already imported when it runs); a module checks its own
results and raises ``SanityError`` before it reports a speed. A failed benchmark is written as FAILED (no numbers),
the others still run, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

from . import (
    dmd,
    family_quality,
    full_size,
    gpu,
    hybrid,
    optimal_steps,
    piflow_overhead,
    sampler_overhead,
    sampler_quality,
    scaling,
    training,
)
from .context import BenchContext
from .harness import REPO_ROOT, SanityError, machine_facts
from .report import merge, render_failure, render_header, render_section

BENCHMARKS: list[ModuleType] = [sampler_quality, family_quality, sampler_overhead, piflow_overhead, scaling, hybrid,
                                 optimal_steps, training, dmd, gpu, full_size]
"""Every benchmark, in report order (one module each)."""
OPT_IN = {gpu.NAME, full_size.NAME}
"""Benchmarks that run only when asked for (``--gpu``, ``--full-size`` or ``--only``)."""
DEFAULT_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
DEFAULT_PLOTS = REPO_ROOT / "bench" / "plots"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [module.NAME for module in BENCHMARKS]
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller sizes and fewer repeats (a few minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny functional run for the test suite (numbers mean nothing)")
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(names)}")
    parser.add_argument("--gpu", action="store_true",
                        help="also run the full-size SD1.5/SDXL/FLUX benchmark "
                             "(CUDA; on a machine without CUDA its tiny CPU configuration)")
    parser.add_argument("--full-size", action="store_true",
                        help="also run the full-size SD1.5/SDXL sampling and distillation benchmark on this device "
                             "(not in CI: about 40 min on 2 idle CPU cores at the full tier, ~15 min with --quick)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="device of the gpu benchmark (auto: CUDA when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a loaded machine")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown file to write (merged)")
    parser.add_argument("--plots", type=Path, default=DEFAULT_PLOTS, help="folder for the PNG plots")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> list[ModuleType]:
    if args.only:
        return [module for module in BENCHMARKS if module.NAME in args.only]
    wanted = {gpu.NAME, full_size.NAME} if args.gpu else {full_size.NAME} if args.full_size else set()
    return [module for module in BENCHMARKS if module.NAME not in OPT_IN or module.NAME in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    tier = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.plots.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(tier=tier, device=device, plots_dir=args.plots.resolve())
    results_path = args.results.resolve()
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    facts = machine_facts(ctx.comfyui_version)
    blocks: dict[str, str] = {}
    failed = []
    try:
        ctx.start_host()
        for module in selected(args):
            ctx.log(f"running {module.NAME} ({tier})")
            started = time.perf_counter()
            load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
            try:
                section = module.run(ctx)
            except Exception as exc:  # noqa: BLE001  (a failed benchmark must not hide the others' results)
                kind = "sanity check failed" if isinstance(exc, SanityError) else type(exc).__name__
                traceback.print_exc()
                failed.append(module.NAME)
                provenance = f"run {facts['date (UTC)']} UTC, tier {tier}: {kind}"
                blocks[module.NAME] = render_failure(module.TITLE, provenance, f"{kind}: {exc}")
                continue
            seconds = time.perf_counter() - started
            provenance = (f"run {facts['date (UTC)']} UTC, tier {tier}, {seconds:.0f} s, torch threads "
                          f"{torch.get_num_threads()}, load average at start {load}")
            blocks[module.NAME] = render_section(section, provenance, results_path)
            ctx.log(f"{module.NAME} done in {seconds:.0f} s")
    finally:
        ctx.close()
    previous = results_path.read_text() if results_path.exists() else ""
    text = merge(render_header(facts, command), previous, blocks, [module.NAME for module in BENCHMARKS])
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(text)
    ctx.log(f"wrote {results_path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
