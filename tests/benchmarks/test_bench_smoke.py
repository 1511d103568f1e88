"""The benchmark suite keeps working: a tiny run of the real runner, plus its merge and timing rules.

The runner test starts ``python -m bench.run --smoke`` in a subprocess (it starts its own
in-process ComfyUI) on the sampler-overhead, hybrid-sampling, optimal-steps and distillation-training
benchmarks and the GPU benchmark in its tiny CPU configuration, writing into a temporary RESULTS.md that already
holds another benchmark's block.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench_module(name: str):
    """``bench.<name>`` of the repository (this test folder is not called ``bench``: pytest's importlib
    mode would register it under that name and hide the real package)."""
    return importlib.import_module(f"bench.{name}")


run_interleaved = _bench_module("harness").run_interleaved
existing_blocks, merge = _bench_module("report").existing_blocks, _bench_module("report").merge
KEPT_BLOCK = "## Scaling from an earlier run\n\nkept as it was\n"


def _block(name: str, body: str) -> str:
    return f"<!-- section:{name} -->\n{body}<!-- /section:{name} -->\n"


def test_runner_smoke_writes_checked_sections_and_keeps_others(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# old header\n\n" + _block("scaling", KEPT_BLOCK))
    command = [sys.executable, "-m", "bench.run", "--smoke", "--only", "sampler_overhead", "--only", "hybrid",
               "--only", "optimal_steps", "--only", "training", "--only", "gpu", "--device", "cpu", "--threads", "1",
               "--results", str(results), "--plots", str(tmp_path / "plots")]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]

    text = results.read_text()
    blocks = existing_blocks(text)
    # registry order, old block kept in place
    assert list(blocks) == ["sampler_overhead", "scaling", "hybrid", "optimal_steps", "training", "gpu"]
    assert blocks["scaling"].strip() == KEPT_BLOCK.strip()
    assert "old header" not in text and "torch threads | 1" in text
    for name in ("sampler_overhead", "hybrid", "optimal_steps", "training", "gpu"):
        assert "FAILED" not in blocks[name]
        assert "Sanity checks (passed before any number below was recorded)" in blocks[name]
    # ratio first: after what was compared, on what model and on which device and dtype comes a ratio ("1.23x")
    overhead_rows = [line for line in blocks["sampler_overhead"].splitlines() if line.startswith("| Stride")]
    assert len(overhead_rows) == 4 * 3  # four Stride samplers in three settings
    assert all(re.fullmatch(r"[\d.e+-]+x", row.split(" | ")[3]) for row in overhead_rows)
    assert "Stride DDIM == ComfyUI euler" in blocks["gpu"]
    assert "GM substeps vs 1 forward" in blocks["gpu"]

    hybrid_rows = [line.split(" | ") for line in blocks["hybrid"].splitlines() if line.startswith("| hybrid ")]
    assert [row[0] for row in hybrid_rows] == ["| hybrid 1+3", "| hybrid 2+2"]
    assert [row[8] for row in hybrid_rows] == ["4 (1 + 3)", "4 (2 + 2)"]  # counted NFE: base + distilled calls
    assert "handover 0 == the distilled model alone" in blocks["hybrid"]
    assert (tmp_path / "plots" / "hybrid_mode_shares.png").is_file()

    optimal_rows = [line.split(" | ") for line in blocks["optimal_steps"].splitlines() if line.startswith("| ")]
    assert [row[0] for row in optimal_rows if row[0].startswith("| OSS search")] == ["| OSS search (paper)",
                                                                                  "| OSS search (fast)"] * 2
    cost_rows = [row for row in optimal_rows if row[0].startswith("| reference teacher")]
    assert cost_rows and all(re.fullmatch(r"[\d.e+-]+x", row[4]) for row in cost_rows)  # evaluations vs the official DP
    assert "finds the exhaustive optimum on every noise" in blocks["optimal_steps"]
    assert (tmp_path / "plots" / "optimal_steps_endpoint_error.png").is_file()

    training_rows = {line.split(" | ")[0]: line.split(" | ") for line in blocks["training"].splitlines()
                     if line.startswith("| ") and " vs " in line.split(" | ")[0]}
    for compared in ("| StrideDistillLoRA vs TrainLoraNode", "| our step vs the diffusers recipe",
                     "| our step (DistillTrainer.train_step) vs sum of the passes"):
        assert re.fullmatch(r"[\d.e+-]+x", training_rows[compared][3]), training_rows[compared]
    assert "the loss recomputed from them equals DistillTrainer.batch_loss" in blocks["training"]
    assert (tmp_path / "plots" / "training_step_time_memory.png").is_file()


def test_merge_replaces_run_blocks_and_keeps_the_rest():
    previous = "# header\n" + _block("a", "old a\n") + _block("b", "old b\n") + _block("retired", "old r\n")
    text = merge("# new header\n", previous, {"b": "new b\n", "c": "new c\n"}, ["a", "b", "c"])
    assert existing_blocks(text) == {"a": "old a\n", "b": "new b\n", "c": "new c\n", "retired": "old r\n"}
    assert text.startswith("# new header\n") and text.index("new b") < text.index("new c") < text.index("old r")


def test_interleaved_timing_alternates_and_collects_measurements():
    order = []
    candidates = {name: (lambda name=name: order.append(name) or {"extra": float(len(order))}) for name in "xyz"}
    samples = run_interleaved(candidates, repeats=3, warmup=1)
    assert order[:3] == ["x", "y", "z"]  # warm-up round
    assert order[3:] == ["x", "y", "z", "y", "z", "x", "z", "x", "y"]  # the order rotates every repeat
    assert all(len(samples[name]["wall"]) == 3 and len(samples[name]["extra"]) == 3 for name in "xyz")


def test_full_size_benchmark_smoke_writes_every_row(tmp_path):
    """The full-size tier (``--full-size``, not in CI) at its tiny smoke configuration: every table and check."""
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench.run", "--smoke", "--only", "full_size", "--device", "cpu", "--threads", "1",
               "--results", str(results), "--plots", str(tmp_path / "plots")]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    block = existing_blocks(results.read_text())["full_size"]
    assert "FAILED" not in block and "the separately timed passes compute DistillTrainer.batch_loss's loss" in block
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ")]
    compared = [row[0] for row in rows]
    assert "| Stride LCM vs ComfyUI" in compared and "| ComfyUI lcm" in compared
    assert compared.count("| StrideDistillLoRA vs TrainLoraNode") == 2, "with and without gradient checkpointing"
    assert "| one distillation step (teacher + target + student fwd+bwd + AdamW)" in compared
    assert all(re.fullmatch(r"[\d.e+-]+x", row[3]) for row in rows if row[0] == "| StrideDistillLoRA vs TrainLoraNode")
