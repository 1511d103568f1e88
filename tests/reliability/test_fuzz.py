"""Hostile inputs: a property-based fuzzer (hypothesis) over every input of every Stride node.

The machinery is in ``fuzz.py``. In-process, each Stride node the host lists gets its own run of
``STRIDE_FUZZ_PER_INPUT`` draws per input (default 2, about 270 draws) from a fixed seed (``STRIDE_FUZZ_SEED``);
each input that reads a file gets ``STRIDE_FUZZ_FILE_DRAWS`` malformed files (default 16); a sample of
``STRIDE_FUZZ_SERVER_DRAWS`` draws (default 10) goes through the real server. For a larger budget set e.g.
``STRIDE_FUZZ_PER_INPUT=40 STRIDE_FUZZ_FILE_DRAWS=200 STRIDE_FUZZ_SERVER_DRAWS=100``;
``STRIDE_FUZZ_REPORT=path`` writes the distinct findings, and how many draws of each kind ran, as JSON.

Every distinct failure the fuzzer has found is a named case of the catalogue (``test_bad_inputs.py``);
:data:`PENDING` lists, per catalogue case not fixed yet (a strict xfail), the inputs where the fuzzer meets it,
so the fuzzer fails only on a failure at an input it does not know.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st

from tests.reliability import fuzz
from tests.reliability.support import sampling_graph, tiny_flux_installed

SEED = int(os.environ.get("STRIDE_FUZZ_SEED", "18"))
PER_INPUT = int(os.environ.get("STRIDE_FUZZ_PER_INPUT", "2"))
SERVER_DRAWS = int(os.environ.get("STRIDE_FUZZ_SERVER_DRAWS", "10"))
FILE_DRAWS = int(os.environ.get("STRIDE_FUZZ_FILE_DRAWS", "16"))
REPORT = os.environ.get("STRIDE_FUZZ_REPORT")

# The fuzzer's findings not fixed yet: catalogue case (a strict xfail that pins the failure down) -> (node, input)s.
# Before the fixes of issue #18 (STRIDE_FUZZ_PER_INPUT=8, 40 server draws, 360 malformed files) it found 74 distinct
# (class, node, input) failures; each is now a passing catalogue case, so nothing is pending.
PENDING: dict[str, list[tuple[str, str]]] = {}
KNOWN: set[tuple[str, str]] = {key for keys in PENDING.values() for key in keys}


def hypothesis_settings(examples: int):
    return settings(max_examples=examples, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture(scope="module")
def fuzz_context(fault_host, demo_weights, tmp_path_factory):
    """The host with the tiny FLUX.1 node, and the valid files the file mutations start from."""
    folder_paths = fault_host.folder_paths
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    checkpoints = Path(folder_paths.get_output_directory()) / "stride_checkpoints"
    outside = tmp_path_factory.mktemp("fuzz-outside")
    with tiny_flux_installed(fault_host, loras):
        graph = fuzz.close_over_shared({"save": {"class_type": "StrideSaveLoRA", "inputs": {
            "lora": ["train", 1], "file_name": "fuzz_base_lora", "overwrite": True}}})
        result = fault_host.run(graph)
        assert result.success, result.error()
        schedules = Path(folder_paths.get_folder_paths("stride_schedules")[0])
        payloads = {"lora": (loras / "fuzz_base_lora.safetensors").read_bytes(),
                    "adapter": (loras / "reliability_tiny_gm.safetensors").read_bytes(),
                    "checkpoint": (checkpoints / "fuzz_provider.safetensors").read_bytes(),
                    "schedule": fuzz.prepare_schedule(fault_host, schedules)}
        files = fuzz.Files(loras, checkpoints, outside, "fuzz_base_lora.safetensors", payloads, schedules)
        yield fault_host, files, fault_host.object_info


COUNTER = itertools.count()


def run_draw(host, files: fuzz.Files, info: dict, node: str, mutation: fuzz.Mutation) -> list[fuzz.Finding]:
    """One draw in-process, checked against the whole invariant; the draw's files are removed afterwards."""
    draw = next(COUNTER)
    probe = fuzz.Probe(Path(host.base_dir), files.outside)
    probe.start()
    for folder in files.folders:
        folder.mkdir(parents=True, exist_ok=True)
    written = {name for folder in files.folders for name in os.listdir(folder)}
    graph = fuzz.apply(fuzz.baseline(info, node, files, draw), node, mutation, files, draw)
    host.folder_paths.filename_list_cache.clear()
    outcome = fuzz.run_in_process(host, graph)
    found = fuzz.judge(node, mutation, outcome)
    found += [fuzz.Finding(cls, node, mutation.input, mutation.label, f"{mutation.describe()}: {detail}")
              for cls, detail in probe.problems()]
    after = host.run(sampling_graph(seed=10_000 + draw, prefix="fuzz_after"))
    if not after.success:
        found.append(fuzz.Finding("host broken", node, mutation.input, mutation.label,
                                  f"{mutation.describe()}: {(after.error() or {}).get('exception_message', '')[:200]}"))
    for folder in files.folders:  # leave models/ and output/ as the next draw expects them
        if folder.is_dir():
            for name in set(os.listdir(folder)) - written:
                if name.startswith("fuzz_") and not name.startswith("fuzz_base_"):
                    path = folder / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    host.folder_paths.filename_list_cache.clear()
    return found


def distinct(findings: list[fuzz.Finding]) -> dict[tuple[str, str, str], list[fuzz.Finding]]:
    groups: dict[tuple[str, str, str], list[fuzz.Finding]] = defaultdict(list)
    for finding in findings:
        groups[finding.key].append(finding)
    return dict(groups)


def summary(groups: dict) -> str:
    lines = []
    for key, items in sorted(groups.items()):
        labels = sorted({item.label for item in items})
        lines.append(f"{key[0]:18} {key[1]}.{key[2]} [{', '.join(labels)[:120]}] e.g. {items[0].detail[:300]}")
    return "\n".join(lines)


def write_report(name: str, groups: dict, drawn: Counter, seconds: float) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = {"draws": sum(drawn.values()), "seconds": round(seconds, 1), "seed": SEED, "per_input": PER_INPUT,
                  "drawn": dict(drawn.most_common()),
                  "distinct": len(groups),
                  "findings": [{"class": key[0], "node": key[1], "input": key[2],
                                "labels": sorted({item.label for item in items}), "example": items[0].detail}
                               for key, items in sorted(groups.items())]}
    path.write_text(json.dumps(data, indent=1))


def test_every_node_has_a_clean_baseline(fuzz_context):
    """The fuzzer's ground: each Stride node's baseline graph runs, with finite outputs, and covers the node."""
    host, files, info = fuzz_context
    nodes = fuzz.stride_nodes(info)
    assert len(nodes) >= 25, nodes
    for node in nodes:
        outcome = fuzz.run_in_process(host, fuzz.baseline(info, node, files, next(COUNTER)))
        assert outcome.kind == "success" and not outcome.nonfinite, f"{node}: {outcome}"


def fuzz_with(host, files: fuzz.Files, info: dict, node: str, strategy, examples: int,
              findings: list[fuzz.Finding], drawn: Counter) -> None:
    """``examples`` hypothesis draws of ``strategy`` for ``node``; ``drawn`` counts them by kind of value."""

    @seed(SEED)
    @hypothesis_settings(examples)
    @given(strategy)
    def draw(mutation):
        drawn[mutation.label.split(":")[0]] += 1
        findings.extend(run_draw(host, files, info, node, mutation))

    draw()


def test_fuzzer_over_every_input_of_every_node(fuzz_context):
    host, files, info = fuzz_context
    findings: list[fuzz.Finding] = []
    drawn: Counter = Counter()
    start = time.monotonic()
    for node in fuzz.stride_nodes(info):
        inputs = len(fuzz.node_inputs(info, node)) + ("SAMPLER" in fuzz.node_outputs(info, node))
        if inputs:
            fuzz_with(host, files, info, node, fuzz.mutations(info, node), PER_INPUT * inputs, findings, drawn)
    draws = sum(drawn.values())
    groups = distinct(findings)
    write_report("in-process", groups, drawn, time.monotonic() - start)
    unknown = {key: items for key, items in groups.items() if key[1:] not in KNOWN}
    assert not unknown, f"{len(unknown)} new distinct failures in {draws} draws:\n{summary(unknown)}"


def test_fuzzer_over_malformed_files(fuzz_context):
    """Mutated safetensors files and odd symlinks at every input that reads a file (LoRA, adapter, checkpoint,
    saved schedule)."""
    host, files, info = fuzz_context
    findings: list[fuzz.Finding] = []
    drawn: Counter = Counter()
    start = time.monotonic()
    for node, name in fuzz.FILE_INPUTS:
        spec = next(spec for spec in fuzz.node_inputs(info, node) if spec.name == name)
        strategy = fuzz.file_values(spec, ("resume", "lora_name") if name == "resume" else ())
        fuzz_with(host, files, info, node, strategy, FILE_DRAWS, findings, drawn)
    groups = distinct(findings)
    write_report("files", groups, drawn, time.monotonic() - start)
    unknown = {key: items for key, items in groups.items() if key[1:] not in KNOWN}
    assert not unknown, f"{len(unknown)} new distinct failures with malformed files:\n{summary(unknown)}"


def test_known_failures_are_pending_catalogue_cases():
    """Each failure the fuzzer knows is pinned by a catalogue case that is marked as failing today (strict xfail)."""
    from tests.reliability.test_bad_inputs import CASES

    pending = {case.id for case in CASES if case.xfail}
    assert set(PENDING) <= pending, set(PENDING) - pending


# ------------------------------------------------------------------------------------------
# A sample through the real server (only real nodes: the sinks become Preview as Text)
# ------------------------------------------------------------------------------------------
def server_graph(graph: dict) -> dict | None:
    for node_id, node in list(graph.items()):
        if node["class_type"] == "ReliabilityFuzzSink":
            graph[node_id] = {"class_type": "PreviewAny", "inputs": {"source": node["inputs"]["value"]}}
    if any(node["class_type"].startswith("Reliability") for node in graph.values()):
        return None
    return graph


def server_outcome(server, graph: dict) -> fuzz.Outcome:
    answer = server.queue(graph)
    if "prompt_id" not in answer:
        if answer.get("http_status") != 400:
            return fuzz.Outcome("crash", json.dumps(answer)[:300])
        message = fuzz.validation_message(answer.get("error", {}), answer.get("node_errors", {}))
        return fuzz.Outcome("validation", message)
    entry = server._history_entry(answer["prompt_id"], timeout=fuzz.WATCHDOG_S)
    if entry.get("status", {}).get("status_str") == "success":
        return fuzz.Outcome("success")
    messages = entry.get("status", {}).get("messages", [])
    error = next((data for event, data in messages if event == "execution_error"), {})
    return fuzz.Outcome("execution", error.get("exception_message", "").strip(), error.get("exception_type", ""),
                        error.get("node_type", ""))


def test_fuzzer_sample_through_the_server(comfy_server, demo_weights, tmp_path):
    info = comfy_server.object_info
    loras = comfy_server.base_dir / "models" / "loras"
    checkpoints = comfy_server.base_dir / "output" / "stride_checkpoints"
    prepared = comfy_server.run(fuzz.close_over_shared({"save": {"class_type": "StrideSaveLoRA", "inputs": {
        "lora": ["train", 1], "file_name": "fuzz_base_lora", "overwrite": True}}}))
    assert prepared.success, prepared.messages[-3:]
    schedules = comfy_server.base_dir / "models" / "stride" / "schedules"
    payloads = {"lora": (loras / "fuzz_base_lora.safetensors").read_bytes(),
                "checkpoint": (checkpoints / "fuzz_provider.safetensors").read_bytes(),
                "schedule": fuzz.prepare_schedule(comfy_server, schedules)}
    files = fuzz.Files(loras, checkpoints, tmp_path, "fuzz_base_lora.safetensors", payloads, schedules)
    nodes = [node for node in fuzz.stride_nodes(info)
             if server_graph(fuzz.baseline(info, node, files, 0)) is not None and fuzz.node_inputs(info, node)]
    findings: list[fuzz.Finding] = []
    drawn: Counter = Counter()
    skip = ("server.log", "user")
    start = time.monotonic()

    @seed(SEED)
    @hypothesis_settings(SERVER_DRAWS)
    @given(st.sampled_from(nodes).flatmap(lambda node: st.tuples(st.just(node), fuzz.mutations(info, node))))
    def draw(pair):
        node, mutation = pair
        number = next(COUNTER)
        graph = server_graph(fuzz.apply(fuzz.baseline(info, node, files, number), node, mutation, files, number))
        assume(graph is not None)  # draws with a test-only upstream node run in-process only
        drawn[mutation.label.split(":")[0]] += 1
        before = fuzz.snapshot(comfy_server.base_dir, skip=fuzz.STAYS_INSIDE + skip)
        findings.extend(fuzz.judge(node, mutation, server_outcome(comfy_server, graph)))
        if fuzz.changed_files(before, fuzz.snapshot(comfy_server.base_dir, skip=fuzz.STAYS_INSIDE + skip)):
            findings.append(fuzz.Finding("wrote outside", node, mutation.input, mutation.label, mutation.describe()))
        after = comfy_server.run(sampling_graph(seed=20_000 + number, prefix="fuzz_after"))
        if not after.success:
            findings.append(fuzz.Finding("host broken", node, mutation.input, mutation.label, mutation.describe()))

    draw()
    groups = distinct(findings)
    write_report("server", groups, drawn, time.monotonic() - start)
    unknown = {key: items for key, items in groups.items() if key[1:] not in KNOWN}
    assert not unknown, f"{len(unknown)} new distinct failures through the server:\n{summary(unknown)}"
