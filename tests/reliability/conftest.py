"""Fixtures of the reliability suite (bad inputs, faults, load, safety); helpers live in support.py."""
from __future__ import annotations

import pytest

from tests.reliability import support


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: bad inputs, faults, load and safety (tests/reliability)")


@pytest.fixture(scope="session")
def fault_host(comfy_host):
    """The in-process host with the fault nodes registered (removed again at the end)."""
    comfy_host.nodes.NODE_CLASS_MAPPINGS.update(support.FAULT_NODES)
    try:
        yield comfy_host
    finally:
        for name in support.FAULT_NODES:
            comfy_host.nodes.NODE_CLASS_MAPPINGS.pop(name, None)


@pytest.fixture(scope="session")
def demo_weights():
    """The shipped demo weights (assets/demo); training cases need them."""
    assert support.DEMO_WEIGHTS.is_file(), \
        f"demo weights missing at {support.DEMO_WEIGHTS}; run scripts/build_demo_model.py"
    return support.DEMO_WEIGHTS
