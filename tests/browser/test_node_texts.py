"""What the nodes say about themselves: every "shows" in a node description is checked by a browser test, and
tooltips lead with plain words (the paper's symbols come after). Read from the server's /object_info."""
from __future__ import annotations

import re

import pytest

from tests.browser import test_frontend

PACK_MODULE = "custom_nodes.stride"
# Node -> (what its description says it shows, the browser test in test_frontend.py that checks it is shown).
CLAIMS = {
    "StrideDistillLoRA": ("node shows the step, each loss (raw and smoothed) and the time left, as text and in a live "
                          "chart, and the long phases before the steps (the data-free teacher pool, the headless "
                          "export) with their own progress", "test_live_loss_chart_follows_a_training_run"),
    "StrideReferenceMetrics": ("shows the scores as a table on the node",
                               "test_workflow_loads_runs_and_shows_its_images"),
    "StrideImageDiversity": ("shown as a table on the node", "test_workflow_loads_runs_and_shows_its_images"),
    "StrideCompareResults": ("Shows several reports as one table on the node",
                             "test_workflow_loads_runs_and_shows_its_images"),
}
SHOWS = re.compile(r"\bshow(s|n|ing)?\b", re.IGNORECASE)
SYMBOLS = re.compile(r"[=~_|\[\]^]")  # formula characters a plain-words opening does not have


@pytest.fixture(scope="module")
def stride_nodes(comfy_server) -> dict[str, dict]:
    return {k: v for k, v in comfy_server.object_info.items() if v["python_module"] == PACK_MODULE}


def test_every_shows_in_a_node_description_is_checked_by_a_browser_test(stride_nodes):
    for kind, spec in stride_nodes.items():
        if not SHOWS.search(spec["description"]):
            assert kind not in CLAIMS, f"{kind} no longer says it shows something: drop it from CLAIMS"
            continue
        assert kind in CLAIMS, f"{kind}'s description says it shows something; add the browser test that checks it"
        phrase, test_name = CLAIMS[kind]
        assert phrase in spec["description"], f"{kind}: the description changed; update CLAIMS and its test"
        assert callable(getattr(test_frontend, test_name, None)), f"{kind}: no browser test {test_name}"


def _texts(spec: dict) -> list[tuple[str, str]]:
    """(where, text) of a node's description and every tooltip of its inputs and outputs."""
    found = [("description", spec["description"])]
    for section in ("required", "optional"):
        for name, input_spec in spec["input"].get(section, {}).items():
            options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
            found.append((f"input {name}", options.get("tooltip", "")))
    found += [(f"output {i}", tip or "") for i, tip in enumerate(spec.get("output_tooltips") or [])]
    return found


def test_tooltips_open_with_plain_words(stride_nodes):
    """The first three words of every description and tooltip hold no formula (=, ~, _, |, [, ^): 'How much fresh
    noise each step adds (TCD's gamma)', not 'gamma ~ U[0,1]'."""
    formulas = []
    for kind, spec in stride_nodes.items():
        for where, text in _texts(spec):
            assert text.strip(), f"{kind} {where}: no tooltip"
            opening = " ".join(text.split()[:3])
            if SYMBOLS.search(opening):
                formulas.append(f"{kind} {where}: {text[:60]}")
    assert formulas == []
