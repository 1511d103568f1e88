"""The hostile-input fuzzer's machinery: node inputs read from the host, hostile values, graphs, the invariant.

Every Stride node's inputs are read from the host's own node definitions (``object_info``: the
in-process equivalent or the server's ``/object_info``), so the fuzzer follows the nodes through
schema changes. For each node a *baseline* graph feeds every link input from a small valid provider
(by input type) and consumes every output (a sampler, a model, sigmas and guiders are run; anything
else goes to the test-only sink that reports NaN/inf). A *draw* changes exactly one input of the
node under test: a hostile widget value (boundaries, NaN, +-inf, huge, negative, empty, unicode,
control characters, wrong types), a hostile upstream value on a link (NaN/inf/huge/empty latents
and images, malformed conditioning, broken models, odd sigmas, literal values where a link belongs),
or a malformed file made by mutating a valid safetensors file (header dtype/shape/offsets/length,
truncation, junk, zero bytes, symlinks).

The invariant for a draw (:func:`judge`): (a) a validation or execution error whose message names
the changed input and says what to do, without raw library text, or (b) success with finite
outputs; either way nothing is written outside output/models/temp, no temporary file is left, and
the host then runs the next good prompt.
"""
from __future__ import annotations

import json
import os
import random
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.reliability.support import (
    RAW_MESSAGES,
    changed_files,
    class_prompt,
    empty_latent,
    fault_conditioning,
    fault_image,
    fault_latent,
    reference_model,
    repo_outputs,
    snapshot,
    validation_message,
)

ROOT = Path(__file__).resolve().parents[2]
STAYS_INSIDE = ("output", "models", "temp")  # the folders ComfyUI lets nodes write
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Words of a message that says what to do (Stride's messages end in an instruction).
ADVICE = ("use ", "choose", "connect", "set ", "check", "lower", "raise", "pick", "turn ", "copy", "download",
          "re-create", "encode", "resize", "try", "load", "save", "name one", "leave", "delete", "reinstall", "fix",
          "hand over", "remove", "rename", "type ", "give", "convert", "score", "plug", "run ", "keep", "select",
          "reduce", "increase", "shorten", "wait")
WATCHDOG_S = 60.0  # a draw still running after this long is interrupted and counted as a hang


# ------------------------------------------------------------------------------------------
# The host's node definitions
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One input of a node as the host declares it."""

    name: str
    kind: str  # "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO" or a link type ("MODEL", "LATENT", ...)
    options: dict
    choices: tuple = ()
    required: bool = True

    @property
    def is_widget(self) -> bool:
        return self.kind in WIDGETS and not self.options.get("forceInput")


def stride_nodes(object_info: dict) -> list[str]:
    return sorted(name for name in object_info if name.startswith("Stride"))


def node_inputs(object_info: dict, node: str) -> list[InputSpec]:
    """The required and optional inputs of ``node`` from the host's ``object_info`` (V1 and V3 nodes alike)."""
    found = []
    for section in ("required", "optional"):
        for name, spec in object_info[node]["input"].get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            choices: tuple = ()
            if isinstance(kind, list):
                kind, choices = "COMBO", tuple(kind)
            elif kind == "COMBO":
                choices = tuple(options.get("options", ()))
            found.append(InputSpec(name, kind, options, choices, section == "required"))
    return found


def node_outputs(object_info: dict, node: str) -> list[str]:
    return list(object_info[node]["output"])


# ------------------------------------------------------------------------------------------
# Draws
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    """One changed input: a literal value, an upstream sub-graph, or a file written before the run."""

    input: str
    label: str  # the class of the value, e.g. "nan", "wrong type", "file: truncated" (findings are grouped by it)
    value: Any = None
    link: tuple[tuple[str, dict], ...] | None = None  # (node id, node) pairs; the first, "bad", is linked (slot 0)
    file: tuple[str, int] | None = None  # (mutation kind, seed) of a safetensors file
    culprits: tuple[str, ...] = ()  # input names a message may name; the input itself when empty
    unset: bool = False  # leave the input out (an optional input not connected)

    def names(self) -> tuple[str, ...]:
        return self.culprits or (self.input,)

    def describe(self) -> str:
        if self.file is not None:
            return f"{self.input} <- {self.label}"
        if self.link is not None:
            return f"{self.input} <- {self.link[0][1]['class_type']}({_short(self.link[0][1]['inputs'])})"
        return f"{self.input} = {_short(self.value)}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


NAN, INF = float("nan"), float("inf")
WRONG_TYPES = (("wrong type: text", "abc"), ("wrong type: null", None), ("wrong type: bool", True),
               ("wrong type: object", {"a": 1}), ("wrong type: wrapped list", {"__value__": [1, 2]}))
HOSTILE_TEXT = (
    "", " ", "\n", "\t", "x\n", "x\r\n", " x ", "\x00", "x\x00y", "\x1b[31mred", "..", "../x", "../../escape",
    "/etc/passwd",
    "C:\\x", "\\\\server\\share", "~", "$HOME", "%s%n", "{0}", "CON", "nul.txt", "lpt1", "x:y", "a*?", "<>|", "é",
    "🙂", "\u202ex", "\u200b", "e\u0301", "中文", "disc ring", "DISC", " disc ", "discs", "a" * 121, "a" * 255,
    "a" * 4096, "x.safetensors", "x.pt", ".hidden", "-", "- x",
)
COST_CAPS = {  # in-range values above these make a valid but slow run; larger ones are drawn only past the maximum
    "steps": 8, "substeps": 32, "flow_map_steps": 64, "batch_size": 4, "width": 128, "height": 128, "rank": 64,
    "save_every": 4, "teacher_steps": 16, "noise_samples": 4,
}
NODE_COST_CAPS = {("StrideDistillLoRA", "steps"): 2}


def cost_cap(node: str, name: str) -> int | None:
    return NODE_COST_CAPS.get((node, name), COST_CAPS.get(name))


def widget_values(node: str, spec: InputSpec) -> st.SearchStrategy[Mutation]:
    """Hostile values of one widget input, from its declared kind, range and choices."""
    o = spec.options

    def labelled(pairs) -> st.SearchStrategy[Mutation]:
        return st.sampled_from([Mutation(spec.name, label, value) for label, value in pairs])

    wrong = labelled(WRONG_TYPES)
    if spec.kind == "FLOAT":
        low, high, step = o.get("min", -1e9), o.get("max", 1e9), o.get("step", 0.01) or 0.01
        special = [("nan", NAN), ("inf", INF), ("-inf", -INF), ("huge", 1e308), ("-huge", -1e308),
                   ("subnormal", 5e-324), ("-0.0", -0.0), ("zero", 0.0), ("negative", -1.0), ("min", low),
                   ("max", high), ("below min", low - step), ("above max", high + step), ("text nan", "nan"),
                   ("text inf", "1e999"), ("default", o.get("default", low))]
        in_range = st.floats(low, high, allow_nan=False).map(lambda v: Mutation(spec.name, "in range", v))
        return st.one_of(labelled(special), labelled(special), in_range, wrong)
    if spec.kind == "INT":
        low, high = int(o.get("min", -(2**63))), int(o.get("max", 2**63))
        cap = cost_cap(node, spec.name)
        top = min(high, cap) if cap is not None else high
        special = [("min", low), ("max", top), ("below min", low - 1), ("above max", high + 1), ("zero", 0),
                   ("negative", -1), ("2**63", 2**63), ("2**64", 2**64), ("-2**63", -(2**63)), ("huge", 10**30),
                   ("fraction", 1.5), ("nan", NAN), ("inf", INF), ("text number", "7"),
                   ("default", min(o.get("default", low), top))]
        in_range = st.integers(low, max(low, top)).map(lambda v: Mutation(spec.name, "in range", v))
        return st.one_of(labelled(special), labelled(special), in_range, wrong)
    if spec.kind == "BOOLEAN":
        return labelled([("true", True), ("false", False), ("text false", "false"), ("empty text", ""), ("zero", 0),
                         ("two", 2), ("null", None), ("fraction", 0.5), ("wrapped", {"__value__": False})])
    if spec.kind == "COMBO":
        first = spec.choices[0] if spec.choices else "x"
        pairs = [("choice", choice) for choice in spec.choices] + [
            ("not in list", "nonexistent"), ("empty", ""), ("upper case", str(first).upper()),
            ("trailing space", f"{first} "), ("trailing newline", f"{first}\n"), ("number", 0), ("null", None)]
        return labelled(pairs)
    # STRING
    text = st.text(st.characters(codec="utf-8"), max_size=40).map(lambda v: Mutation(spec.name, "random text", v))
    return st.one_of(labelled([("hostile text", value) for value in HOSTILE_TEXT]), text,
                     labelled([("number", 1), ("fraction", 1.5), ("null", None), ("bool", True)]))


def fault_model(fill: str) -> list[tuple[str, dict]]:
    return [("bad", {"class_type": "ReliabilityFaultModel", "inputs": {"model": ["bad_base", 0], "fill": fill}}),
            ("bad_base", reference_model())]


LINK_VARIANTS: dict[str, list[tuple[str, list[tuple[str, dict]]]]] = {
    "LATENT": [(f"latent {fill}", [("bad", fault_latent(batch=2, fill=fill))])
               for fill in ("nan", "inf", "-inf", "huge", "zeros")]
    + [("latent 16 channels", [("bad", fault_latent(channels=16, batch=2))]),
       ("latent 1 channel", [("bad", fault_latent(channels=1, batch=2))]),
       ("latent 1x1", [("bad", fault_latent(height=1, width=1, batch=2))]),
       ("latent 7x9", [("bad", fault_latent(height=7, width=9, batch=2))]),
       ("latent empty batch", [("bad", fault_latent(batch=0))]),
       ("video latent", [("bad", fault_latent(batch=2, frames=2))]),
       ("latent 64x64", [("bad", fault_latent(height=64, width=64, batch=1))])],
    "CONDITIONING": [("empty conditioning", [("bad", fault_conditioning(empty=True))]),
                     ("text-encoder conditioning", [("bad", fault_conditioning())]),
                     ("1x1 conditioning", [("bad", fault_conditioning(width=1, tokens=1))]),
                     ("NaN conditioning", [("bad", fault_conditioning(width=5, tokens=1, nan=True))])],
    "IMAGE": [(f"image {fill}", [("bad", fault_image(fill=fill))]) for fill in ("nan", "inf", "zeros", "huge")]
    + [("empty image batch", [("bad", fault_image(batch=0))]), ("one image", [("bad", fault_image(batch=1))]),
       ("1x1 images", [("bad", fault_image(height=1, width=1))])],
    "MODEL": [("model returning NaN", fault_model("nan")), ("model returning inf", fault_model("inf")),
              ("v-prediction model", [("bad", reference_model("v"))]),
              ("flow model", [("bad", reference_model("flow"))]),
              ("pi-Flow model", [("bad", {"class_type": "StridePiFlowReferenceModel", "inputs": {}})]),
              ("demo model", [("bad", {"class_type": "StrideDemoModel", "inputs": {}})])],
    "STRIDE_LOSS": [(f"loss {name}", [("bad", {"class_type": "ReliabilityFaultLoss", "inputs": {"values": name}})])
                    for name in ("empty", "one", "nan", "inf", "negative", "zeros", "huge", "long")],
    "SAMPLER": [("ComfyUI euler", [("bad", {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}})]),
                ("ComfyUI dpmpp_2m",
                 [("bad", {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}})])],
}
LINK_LITERALS = (("literal number", 0), ("literal text", "abc"), ("literal null", None), ("literal object", {}),
                 ("literal latent-like object", {"samples": 1}), ("literal bool", True))
SIGMAS_VARIANTS = ("empty", "one", "increasing", "negative", "nan", "huge", "flat")


def link_values(spec: InputSpec, culprits: tuple[str, ...] = ()) -> st.SearchStrategy[Mutation]:
    pairs = [Mutation(spec.name, label, link=tuple(nodes), culprits=culprits)
             for label, nodes in LINK_VARIANTS.get(spec.kind, [])]
    pairs += [Mutation(spec.name, label, value) for label, value in LINK_LITERALS]
    if not spec.required:
        pairs.append(Mutation(spec.name, "left unconnected", unset=True))
    return st.sampled_from(pairs)


FILE_MUTATIONS = (
    "unknown dtype", "other dtype", "shape changed", "shape negative", "shape not integers", "offsets swapped",
    "offsets overlap", "offsets past the end", "offsets not integers", "header length zero", "header length huge",
    "header length one short", "header length one long", "truncated in header", "truncated in data",
    "junk appended", "junk header", "header is a JSON list", "header deeply nested", "header not UTF-8",
    "header with duplicate keys", "all zero bytes", "zeroed header", "zeroed length", "empty file",
    "metadata not a string", "metadata a list", "metadata value garbled", "metadata removed", "nan weights",
    "inf weights", "symlink dangling", "symlink loop", "symlink to a folder", "symlink to a device",
    "symlink to a good file outside",
)


def file_values(spec: InputSpec, culprits: tuple[str, ...] = ()) -> st.SearchStrategy[Mutation]:
    return st.builds(lambda kind, seed: Mutation(spec.name, f"file: {kind}", file=(kind, seed), culprits=culprits),
                     st.sampled_from(FILE_MUTATIONS), st.integers(0, 2**16))


# ------------------------------------------------------------------------------------------
# Malformed safetensors files
# ------------------------------------------------------------------------------------------
def split_safetensors(payload: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + size]), payload[8 + size:]


def join_safetensors(header: dict | str | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def mutated_safetensors(payload: bytes, kind: str, seed: int) -> bytes:
    """A copy of a valid safetensors file with one structural defect of ``kind`` (symlink kinds excluded)."""
    rng = random.Random(seed)
    header, data = split_safetensors(payload)
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    name = rng.choice(tensors)
    entry = header[name]
    raw_header = payload[8:8 + int.from_bytes(payload[:8], "little")]
    if kind == "unknown dtype":
        entry["dtype"] = rng.choice(["X7", "F128", "", "f32", "float"])
    elif kind == "other dtype":
        others = [d for d in ("F64", "F16", "BF16", "I8", "U8", "BOOL", "I64", "F8_E4M3") if d != entry["dtype"]]
        entry["dtype"] = rng.choice(others)
    elif kind == "shape changed":
        entry["shape"] = [*entry["shape"][:-1], entry["shape"][-1] + rng.choice([-1, 1, 7])] if entry["shape"] else [2]
    elif kind == "shape negative":
        entry["shape"] = [-1, *entry["shape"][1:]] if entry["shape"] else [-1]
    elif kind == "shape not integers":
        entry["shape"] = [rng.choice([1.5, "4", None, [2]]) for _ in entry["shape"] or [0]]
    elif kind == "offsets swapped":
        entry["data_offsets"] = entry["data_offsets"][::-1]
    elif kind == "offsets overlap":
        start, end = entry["data_offsets"]
        shift = max(1, (end - start) // 2)
        entry["data_offsets"] = [max(0, start - shift), end - shift] if start else [start + shift, end + shift]
    elif kind == "offsets past the end":
        entry["data_offsets"] = [entry["data_offsets"][0], len(data) + rng.choice([1, 4, 2**40])]
    elif kind == "offsets not integers":
        entry["data_offsets"] = [str(entry["data_offsets"][0]), entry["data_offsets"][1] + 0.5]
    elif kind == "header length zero":
        return bytes(8) + payload[8:]
    elif kind == "header length huge":
        return rng.choice([2**63, 2**64 - 1, 10**12]).to_bytes(8, "little") + payload[8:]
    elif kind == "header length one short":
        return (len(raw_header) - 1).to_bytes(8, "little") + payload[8:]
    elif kind == "header length one long":
        return (len(raw_header) + 1).to_bytes(8, "little") + payload[8:]
    elif kind == "truncated in header":
        return payload[:rng.randrange(1, 8 + len(raw_header))]
    elif kind == "truncated in data":
        return payload[:8 + len(raw_header) + rng.randrange(0, max(1, len(data)))]
    elif kind == "junk appended":
        return payload + rng.randbytes(rng.choice([1, 7, 4096]))
    elif kind == "junk header":
        return join_safetensors(rng.randbytes(len(raw_header)), data)
    elif kind == "header is a JSON list":
        return join_safetensors(json.dumps(list(header.items())), data)
    elif kind == "header deeply nested":
        depth = rng.choice([2000, 100000])
        return join_safetensors("[" * depth + "]" * depth, data)
    elif kind == "header not UTF-8":
        return join_safetensors(b"{\"\xff\xfe\": 1}" + b" " * max(0, len(raw_header) - 9), data)
    elif kind == "header with duplicate keys":
        text = json.dumps(header)
        return join_safetensors(text[:-1] + f", {json.dumps(name)}: {json.dumps(entry)}" + "}", data)
    elif kind == "all zero bytes":
        return bytes(len(payload))
    elif kind == "zeroed header":
        return payload[:8] + bytes(len(raw_header)) + data
    elif kind == "zeroed length":
        return bytes(8) + payload[8:]
    elif kind == "empty file":
        return b""
    elif kind == "metadata not a string":
        value = rng.choice([1, 1.5, None, [1], {"a": 1}])
        header["__metadata__"] = {**header.get("__metadata__", {}), "stride.steps": value}
    elif kind == "metadata a list":
        header["__metadata__"] = ["stride.format", "x"]
    elif kind == "metadata value garbled":  # each file kind's declared metadata (step, config JSON, fingerprint, ...)
        declared = header.get("__metadata__") or {"format": ""}
        key = rng.choice(sorted(declared))
        declared[key] = rng.choice(["", "{", "abc", "[]", "-1", "3.5", "1e999", "null", "[" * 5000 + "]" * 5000])
        header["__metadata__"] = declared
    elif kind == "metadata removed":
        header.pop("__metadata__", None)
    elif kind in ("nan weights", "inf weights"):
        start, end = entry["data_offsets"]
        if entry["dtype"] != "F32" or end - start < 4:
            return mutated_safetensors(payload, "nan weights" if kind == "inf weights" else "unknown dtype", seed + 1)
        value = struct.pack("<f", NAN if kind == "nan weights" else INF)
        at = start + 4 * rng.randrange((end - start) // 4)
        return join_safetensors(raw_header, data[:at] + value + data[at + 4:])
    else:
        raise ValueError(f"unknown file mutation {kind!r}")
    return join_safetensors(header, data)


def write_mutated_file(path: Path, payload: bytes, kind: str, seed: int, outside: Path) -> None:
    """Write (or link) the file of one file mutation at ``path``."""
    if kind == "symlink dangling":
        path.symlink_to(outside / f"missing-{seed}.safetensors")
    elif kind == "symlink loop":
        path.symlink_to(path.name)
    elif kind == "symlink to a folder":
        path.symlink_to(outside, target_is_directory=True)
    elif kind == "symlink to a device":
        path.symlink_to("/dev/zero")
    elif kind == "symlink to a good file outside":
        target = outside.parent / f"{outside.name}-good-{seed}.safetensors"  # beside ``outside``, which must stay empty
        target.write_bytes(payload)
        path.symlink_to(target)
    else:
        path.write_bytes(mutated_safetensors(payload, kind, seed))


# ------------------------------------------------------------------------------------------
# Outcomes and the invariant
# ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # "validation", "execution", "success", "crash" (validation itself raised) or "hang"
    message: str = ""
    exception_type: str = ""
    node_type: str = ""
    nonfinite: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Finding:
    cls: str  # the class of the failure (see CLASSES)
    node: str
    input: str
    label: str
    detail: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.cls, self.node, self.input)


CLASSES = {
    "raw error": "an execution error that is not a Stride message (a library exception reached the user)",
    "raw text": "a Stride message that carries raw library text",
    "wrong culprit": "an error whose message does not name the changed input",
    "no advice": "a Stride message that does not say what to do",
    "non-finite output": "a run that 'succeeded' with NaN or inf in an output (a silent wrong result)",
    "validation crash": "the host's validation raised instead of answering",
    "hang": f"a run still going after {WATCHDOG_S:.0f} s",
    "wrote outside": "a file written outside output/models/temp or into the repository",
    "temp file left": "a temporary file left behind",
    "host broken": "the next good prompt failed",
}


def names_input(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) for name in names)


def judge(node: str, mutation: Mutation, outcome: Outcome) -> list[Finding]:
    """The invariant's message part for one draw (files, temp files and the next prompt are checked by the caller)."""
    found: list[Finding] = []

    def add(cls: str, detail: str) -> None:
        found.append(Finding(cls, node, mutation.input, mutation.label, f"{mutation.describe()}: {detail}"))

    text = outcome.message
    if outcome.kind == "crash":
        add("validation crash", text)
    elif outcome.kind == "hang":
        add("hang", f"interrupted after {outcome.seconds:.0f} s")
    elif outcome.kind == "success":
        if outcome.nonfinite:
            add("non-finite output", ", ".join(outcome.nonfinite[:3]))
    elif outcome.kind == "validation":
        if not names_input(text, mutation.names()):
            add("wrong culprit", text[:300])
    else:
        stride = outcome.exception_type.endswith("StrideError")
        raw = [marker for marker in RAW_MESSAGES if marker in text]
        if not stride:
            add("raw error", f"{outcome.exception_type} in {outcome.node_type}: {text[:300]}")
        elif raw:
            add("raw text", f"{raw}: {text[:300]}")
        elif not names_input(text, mutation.names()):
            add("wrong culprit", text[:300])
        elif not any(word in text.lower() for word in ADVICE):
            add("no advice", text[:300])
    return found


# ------------------------------------------------------------------------------------------
# Running a draw in-process
# ------------------------------------------------------------------------------------------
def run_in_process(host: Any, graph: dict, watchdog_s: float = WATCHDOG_S) -> Outcome:
    """Validate and run ``graph`` in the in-process host; the sinks' reports of NaN/inf are collected."""
    start = time.monotonic()
    try:
        valid, error, _, node_errors = host.validate(graph)
    except Exception as exc:  # noqa: BLE001  (the host's validation itself failed: a finding)
        return Outcome("crash", f"{type(exc).__name__}: {exc}")
    if not valid:
        return Outcome("validation", validation_message(error, node_errors))
    timer = threading.Timer(watchdog_s, host.interrupt)
    timer.start()
    try:
        result = host.run(graph)
    finally:
        timer.cancel()
        host.nodes.interrupt_processing(False)
    seconds = time.monotonic() - start
    if result.success:
        nonfinite = [part for node_id, ui in result.outputs.items() if node_id.startswith("sink")
                     for part in ui.get("nonfinite", [])]
        return Outcome("success", nonfinite=nonfinite, seconds=seconds)
    error = result.error()
    if error is None:
        return Outcome("hang", seconds=seconds)
    if error.get("exception_type", "").endswith("InterruptProcessingException"):
        return Outcome("hang", seconds=seconds)
    return Outcome("execution", error.get("exception_message", "").strip(), error.get("exception_type", ""),
                   error.get("node_type", ""), seconds=seconds)


def temp_files(base_dir: Path) -> list[str]:
    """Temporary files under the host's base directory (what an interrupted atomic write leaves)."""
    found = []
    for folder, _, names in os.walk(base_dir):  # links are not followed (custom_nodes/stride is the repository)
        found += [os.path.relpath(os.path.join(folder, name), base_dir) for name in names
                  if name.endswith((".tmp", ".part", ".partial"))]
    return sorted(found)


@dataclass
class Probe:
    """What must not change during a draw: files outside output/models/temp, the repository, ``outside``."""

    base_dir: Path
    outside: Path
    before: dict = field(default_factory=dict)
    repo_before: set = field(default_factory=set)

    def start(self) -> None:
        self.before = snapshot(self.base_dir, skip=STAYS_INSIDE)
        self.repo_before = repo_outputs()

    def problems(self) -> list[tuple[str, str]]:
        found = []
        changed = changed_files(self.before, snapshot(self.base_dir, skip=STAYS_INSIDE))
        new_in_repo = sorted(repo_outputs() - self.repo_before)
        outside = sorted(p.name for p in self.outside.iterdir())
        if changed or new_in_repo or outside:
            found.append(("wrote outside", f"{changed[:3]} {new_in_repo[:3]} {outside[:3]}"))
        leftovers = temp_files(self.base_dir)
        if leftovers:
            found.append(("temp file left", ", ".join(leftovers[:3])))
        return found



# ------------------------------------------------------------------------------------------
# Graphs: a valid baseline around each node, with one input changed
# ------------------------------------------------------------------------------------------
def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _custom_sampling(guider: str, sampler: list, sigmas: list) -> dict:
    return _node("SamplerCustomAdvanced", noise=["noise", 0], guider=[guider, 0], sampler=sampler, sigmas=sigmas,
                 latent_image=["latent", 0])


TRAINING = {"objective": "lcm", "steps": 1, "learning_rate": 1e-3, "rank": 4, "alpha": 0.0, "batch_size": 2,
            "guidance_min": 0.0, "guidance_max": 0.0, "loss": "huber", "gradient_checkpointing": False, "seed": 3,
            "save_every": 0, "resume": False}
SHARED: dict[str, dict] = {  # the valid providers a baseline links to (only those it uses are added)
    "ref": reference_model(),
    "ref_fm": {**reference_model(),
               "inputs": {**reference_model()["inputs"], "form": "flow map (ideal distilled student)"}},
    "piref": _node("StridePiFlowReferenceModel"),
    "demo": _node("StrideDemoModel"),
    "flux": _node("ReliabilityTinyFlux"),
    "disc": class_prompt("disc"), "ring": class_prompt("ring"), "empty": class_prompt(""),
    "latent": empty_latent(1),
    "empty_batch": empty_latent(4),
    "latent_batch": _node("StrideFewStepSample", model=["ref", 0], positive=["disc", 0], negative=["empty", 0],
                          latent_image=["empty_batch", 0], method="lcm", steps=2, cfg=0.0, gamma=0.3, eta=0.2,
                          seed=0, denoise=1.0),
    "images": _node("StrideLatentToImage", samples=["latent_batch", 0], scale=8),
    "noise": _node("RandomNoise", noise_seed=1),
    "lcm_sampler": _node("StrideLCMSampler", s_noise=1.0, boundary_condition=True),
    "euler": _node("KSamplerSelect", sampler_name="euler"),
    "guider": _node("CFGGuider", model=["ref_fm", 0], positive=["disc", 0], negative=["empty", 0], cfg=1.0),
    "lcm_sigmas": _node("StrideLCMScheduler", model=["ref_fm", 0], steps=4, original_steps=50, denoise=1.0),
    "pi_guider": _node("BasicGuider", model=["piref", 0], conditioning=["empty", 0]),
    "pi_sampler": _node("StridePiFlowSampler", substeps=8, diffusion_coefficient=0.0, temperature="auto",
                        manual_temperature=1.0, shift=3.2),
    "pi_sigmas": _node("StridePiFlowScheduler", model=["piref", 0], steps=2, shift=3.2, final_step_size_scale=0.5,
                       denoise=1.0),
    "data": _node("StrideDistillDataset", prompt_1=["disc", 0], prompt_2=["ring", 0], empty_prompt=["empty", 0],
                  latents=["latent_batch", 0]),
    "train": _node("StrideDistillLoRA", model=["demo", 0], data=["data", 0], lora_name="fuzz_provider", **TRAINING),
    "trace_sampler": _node("StrideTraceSampler", sampler=["lcm_sampler", 0]),
    "trace_run": _custom_sampling("guider", ["trace_sampler", 0], ["lcm_sigmas", 0]),
    "report": _node("StrideReferenceMetrics", samples=["latent_batch", 0], conditioning=["disc", 0], label="fuzz"),
}
TYPE_SOURCES = {"MODEL": ["ref", 0], "CONDITIONING": ["disc", 0], "LATENT": ["latent", 0],
                "SAMPLER": ["lcm_sampler", 0], "GUIDER": ["guider", 0], "IMAGE": ["images", 0],
                "STRIDE_DISTILL_DATA": ["data", 0],
                "STRIDE_LORA": ["train", 1], "STRIDE_LOSS": ["train", 2], "STRIDE_TRACE": ["trace_sampler", 1],
                "SIGMAS": ["lcm_sigmas", 0], "STRING": ["report", 0]}
NODE_SOURCES = {  # where a node's baseline differs from TYPE_SOURCES
    "StrideHybridSample": {"distilled_model": ["ref_fm", 0]},
    "StrideHybridGuider": {"base_sampler": ["euler", 0]},
    "StrideTraceGrid": {"samples": ["trace_run", 0]},
    "StridePiFlowScheduler": {"model": ["piref", 0]},
    "StridePiFlowSample": {"model": ["piref", 0], "positive": ["empty", 0]},
    "StridePiFlowAdapterLoader": {"model": ["flux", 0]},
    "StrideReferenceMetrics": {"samples": ["latent_batch", 0]},
    "StrideLatentToImage": {"samples": ["latent_batch", 0]},
    "StrideDistillLoRA": {"model": ["demo", 0]},
    "StrideReloadLoRA": {"model": ["demo", 0], "lora_name": ["lora_name", 0]},
    "StrideOptimalSteps": {"model": ["ref", 0], "positive": ["disc", 0], "negative": ["empty", 0]},
}
NODE_VALUES = {  # cheap valid widget values where the declared default is slow or needs context
    "StrideReferenceModel": {"flow_map_steps": 8},
    "StrideFewStepSample": {"steps": 2, "method": "lcm-lora"},  # auto cannot name the reference model's family
    "StrideFewStepScheduler": {"family": "lcm-lora", "steps": 2},
    "StrideHybridSample": {"base_cfg": 2.0},
    "StridePiFlowSample": {"steps": 2, "substeps": 8},
    "StridePiFlowSampler": {"substeps": 8},
    "StridePiFlowScheduler": {"steps": 2},
    "StrideLatentToImage": {"scale": 2},
    "StrideDistillDataset": {"width": 64, "height": 64},
    "StrideDistillLoRA": dict(TRAINING),
    "StrideOptimalSteps": {"steps": 2, "teacher_steps": 8, "noise_samples": 2, "schedule_name": "fuzz_search"},
}
PIFLOW_MODELS = ("StridePiFlowReferenceModel", "StridePiFlowAdapterLoader")
# Inputs that read a file: (node, input) -> the file kind a draw mutates
FILE_INPUTS = {("StrideReloadLoRA", "lora_name"): "lora", ("StridePiFlowAdapterLoader", "adapter_name"): "adapter",
               ("StrideDistillLoRA", "resume"): "checkpoint", ("StrideSavedSchedule", "schedule"): "schedule"}
BASE_SCHEDULE = "fuzz_base_schedule.safetensors"  # in models/stride/schedules: a schedule of the analytic teacher


@dataclass
class Files:
    """The valid files the file mutations start from, and the folders they go to."""

    loras: Path
    checkpoints: Path
    outside: Path
    lora_name: str  # a valid Stride LoRA of the demo model in ``loras``
    payloads: dict[str, bytes]  # "lora", "adapter", "checkpoint", "schedule" -> bytes of a valid file
    schedules: Path  # models/stride/schedules, holding BASE_SCHEDULE
    adapter_name: str = "reliability_tiny_gm.safetensors"

    @property
    def folders(self) -> tuple[Path, ...]:
        """Where draws write files (cleaned after each draw but for the ``fuzz_base_*`` files)."""
        return (self.loras, self.checkpoints, self.schedules)


def prepare_schedule(host: Any, schedules: Path) -> bytes:
    """Search a schedule of the analytic teacher with the baseline's settings and keep it as BASE_SCHEDULE."""
    graph = {"target": _node("StrideOptimalSteps", latent_image=["latent", 0], solver="euler", teacher_solver="euler",
                             teacher_scheduler="normal", mode="paper", seed=0, cfg=1.0,
                             **{**NODE_VALUES["StrideOptimalSteps"], "schedule_name": "fuzz_base_schedule"},
                             **NODE_SOURCES["StrideOptimalSteps"])}
    result = host.run(close_over_shared(graph))
    assert result.success, result.error()
    for path in schedules.glob("fuzz_base_schedule-*.safetensors"):
        path.replace(schedules / BASE_SCHEDULE)
    return (schedules / BASE_SCHEDULE).read_bytes()


def consumers(node: str, outputs: list[str]) -> dict[str, dict]:
    """Nodes that use every output of the node under test (id "target") and sink what comes out."""
    graph: dict[str, dict] = {}
    for slot, kind in enumerate(outputs):
        link = ["target", slot]
        use = f"use_{slot}"
        if kind == "MODEL" and node in PIFLOW_MODELS:
            positive = ["flux", 1] if node == "StridePiFlowAdapterLoader" else ["empty", 0]
            graph[use] = _node("StridePiFlowSample", model=link, positive=positive, latent_image=["latent", 0],
                               **{**NODE_VALUES["StridePiFlowSample"], "diffusion_coefficient": 0.0, "shift": 3.2,
                                  "final_step_size_scale": 0.5, "temperature": "auto", "manual_temperature": 1.0,
                                  "seed": 0, "denoise": 1.0})
        elif kind == "MODEL":
            graph[use] = _node("StrideFewStepSample", model=link, positive=["disc", 0], negative=["empty", 0],
                               latent_image=["latent", 0], method="lcm", steps=2, cfg=0.0, gamma=0.3, eta=0.2, seed=0,
                               denoise=1.0)
        elif kind == "SAMPLER":
            piflow = node == "StridePiFlowSampler"
            graph[use] = _custom_sampling("pi_guider" if piflow else "guider", link,
                                          ["pi_sigmas" if piflow else "lcm_sigmas", 0])
        elif kind == "SIGMAS":
            piflow = node == "StridePiFlowScheduler"
            graph[use] = _custom_sampling("pi_guider" if piflow else "guider",
                                          ["pi_sampler" if piflow else "lcm_sampler", 0], link)
        elif kind == "GUIDER":
            graph[use] = _custom_sampling(link[0], ["lcm_sampler", 0], ["lcm_sigmas", 0])
            graph[use]["inputs"]["guider"] = link
        else:
            graph[f"sink_{slot}"] = _node("ReliabilityFuzzSink", value=link)
            continue
        graph[f"sink_{slot}"] = _node("ReliabilityFuzzSink", value=[use, 0])
        if graph[use]["class_type"] == "SamplerCustomAdvanced":
            graph[f"sink_{slot}_denoised"] = _node("ReliabilityFuzzSink", value=[use, 1])
    return graph


def close_over_shared(graph: dict) -> dict:
    """Add the shared providers the graph links to (and theirs)."""
    pending = True
    while pending:
        pending = False
        for node in list(graph.values()):
            for value in node["inputs"].values():
                if isinstance(value, list) and len(value) == 2 and value[0] in SHARED and value[0] not in graph:
                    graph[value[0]] = json.loads(json.dumps(SHARED[value[0]]))
                    pending = True
    return graph


def baseline(object_info: dict, node: str, files: Files, draw: int) -> dict:
    """A valid graph that runs ``node`` (id "target") and uses all its outputs."""
    inputs: dict[str, Any] = {}
    graph: dict[str, dict] = {}
    values = NODE_VALUES.get(node, {})
    for spec in node_inputs(object_info, node):
        source = NODE_SOURCES.get(node, {}).get(spec.name)
        if spec.is_widget:
            if spec.name in values:
                inputs[spec.name] = values[spec.name]
            elif spec.kind == "COMBO":
                inputs[spec.name] = spec.options.get("default", spec.choices[0] if spec.choices else None)
            else:
                inputs[spec.name] = spec.options.get("default")
        elif source is not None:
            inputs[spec.name] = source
        elif spec.required:
            kind = spec.kind
            if kind == "CONDITIONING" and ("negative" in spec.name or "empty" in spec.name):
                inputs[spec.name] = ["empty", 0]
            else:
                inputs[spec.name] = TYPE_SOURCES[kind]
    if node == "StridePiFlowAdapterLoader":
        inputs["adapter_name"] = files.adapter_name
    if node == "StrideReloadLoRA":
        graph["lora_name"] = _node("PrimitiveString", value=files.lora_name)
    if node == "StrideDistillLoRA":
        inputs["lora_name"] = f"fuzz_train_{draw}"
    if node == "StrideSaveLoRA":
        inputs["file_name"] = f"fuzz_save_{draw}"
    if node == "StrideSavedSchedule":
        inputs["schedule"] = BASE_SCHEDULE
    graph["target"] = _node(node, **inputs)
    graph.update(consumers(node, node_outputs(object_info, node)))
    return close_over_shared(graph)


def apply(graph: dict, node: str, mutation: Mutation, files: Files, draw: int) -> dict:
    """``graph`` with the mutation's input changed (files written where the node will read them)."""
    target = graph["target"]["inputs"]
    if mutation.input == "sigmas" and mutation.link is not None:  # the sampler under test gets odd sigmas
        graph["bad_sigmas"] = mutation.link[0][1]
        graph["use_0"]["inputs"]["sigmas"] = ["bad_sigmas", 0]
        return close_over_shared(graph)
    if mutation.file is not None:
        kind, seed = mutation.file
        file_kind = FILE_INPUTS[(node, mutation.input)]
        folder = {"checkpoint": files.checkpoints, "schedule": files.schedules}.get(file_kind, files.loras)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"fuzz_{file_kind}_{draw}"
        write_mutated_file(folder / f"{name}.safetensors", files.payloads[file_kind], kind, seed, files.outside)
        if file_kind == "lora":
            graph["lora_name"]["inputs"]["value"] = f"{name}.safetensors"
        elif file_kind in ("adapter", "schedule"):
            target[mutation.input] = f"{name}.safetensors"
        else:
            target.update(lora_name=name, resume=True)
        return graph
    if mutation.unset:
        target.pop(mutation.input, None)
    elif mutation.link is not None:
        for node_id, sub in mutation.link:  # the first is "bad"; others are its own upstream nodes
            graph[node_id] = json.loads(json.dumps(sub))
        target[mutation.input] = ["bad", 0]
    elif node == "StrideReloadLoRA" and mutation.input == "lora_name":
        graph["lora_name"]["inputs"]["value"] = mutation.value
    else:
        target[mutation.input] = mutation.value
    return close_over_shared(graph)


def mutations(object_info: dict, node: str) -> st.SearchStrategy[Mutation]:
    """One changed input of ``node``: every input is equally likely; file inputs also get malformed files."""
    choices = []
    for spec in node_inputs(object_info, node):
        if (node, spec.name) in FILE_INPUTS:
            culprits = ("resume", "lora_name") if spec.name == "resume" else ()
            choices.append(file_values(spec, culprits))
            if spec.name in ("resume", "schedule"):  # a widget too: the file's name is a value
                choices.append(widget_values(node, spec))
        elif node == "StrideReloadLoRA" and spec.name == "lora_name":
            choices.append(widget_values(node, InputSpec(spec.name, "STRING", {})))
        elif spec.is_widget:
            choices.append(widget_values(node, spec))
        else:
            culprits = ("images", "vae") if spec.name == "images" else ()
            choices.append(link_values(spec, culprits))
    if "SAMPLER" in node_outputs(object_info, node):
        choices.append(st.sampled_from([
            Mutation("sigmas", f"sigmas {name}", link=(("bad", _node("ReliabilityFaultSigmas", values=name)),))
            for name in SIGMAS_VARIANTS]))
    return st.one_of(*choices)
