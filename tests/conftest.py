"""Shared test set-up."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread():
    # The networks in the tests are tiny: one intra-op thread is faster than
    # two (no synchronisation), and keeps timings sane on a loaded 2-core CI box.
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
