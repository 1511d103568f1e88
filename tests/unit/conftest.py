"""Fixtures for every unit test of distill_core."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The unit tests' tensors are small: one intra-op thread avoids spin-waiting thread pools on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
