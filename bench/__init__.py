"""Stride's benchmark suite: ratios measured side by side in one process, written to bench/RESULTS.md.

Run ``python -m bench.run [--quick] [--only NAME] [--gpu]`` from the repository root (``make bench``,
``make bench-quick``). Each benchmark is one module with ``NAME``, ``TITLE`` and ``run(ctx) -> Section``,
registered in ``bench.run.BENCHMARKS``; shared machinery lives in ``harness`` (timing, memory, sanity
checks, result types), ``context`` (the in-process ComfyUI host), ``models`` and ``samplers``.
"""
