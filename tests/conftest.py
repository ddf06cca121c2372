"""Shared test set-up."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    # The networks in the tests are tiny: one intra-op thread is faster than
    # two (no synchronisation), and keeps timings sane on a loaded 2-core CI
    # box. CI reruns the numerically sensitive tests with
    # SKQUANT_TEST_THREADS=2 (other kernels, other reduction orders).
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SKQUANT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
