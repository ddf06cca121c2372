"""A row's embedding, codes and neighbours depend on that row only.

Not on which other rows share its batch, their order, the inference batch
size, or the number of threads -- on any CPU. float32 GEMM kernels round a
row differently depending on its position in the batch (seen on Intel Xeon,
not on AMD EPYC), so the networks are evaluated in float64 and rounded to
float32 (see ``skquant._deep._torch.embed``). These tests demand *bitwise*
equality, which is stronger than scikit-learn's
``check_methods_sample_order_invariance`` (rtol 1e-7).

CI runs this file again under other thread counts and instruction sets
(``SKQUANT_TEST_THREADS``, ``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``; see ``.ci/run``), which pick other kernels the
way another CPU would.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from sklearn.datasets import load_digits

from skquant import DeepQuantizer, ProductQuantizer, SphericalQuantizer

FACTORIES = {
    "PQ": lambda: ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0),
    "OPQ-IVF": lambda: ProductQuantizer(
        n_codebooks=4, n_codewords=16, rotation=True, n_lists=8, n_probe=3,
        random_state=0,
    ),
    "PQ-IVF-direct": lambda: ProductQuantizer(
        n_codebooks=4, n_codewords=16, n_lists=8, n_probe=3, by_residual=False,
        random_state=0,
    ),
    "DQN": lambda: DeepQuantizer(
        n_codebooks=4, n_codewords=16, max_iter=4, random_state=0, device="cpu"
    ),
    "DSQ": lambda: SphericalQuantizer(
        n_codebooks=4, n_codewords=16, max_iter=4, random_state=0, device="cpu"
    ),
}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:400], y[:400], X[400:700]


@pytest.fixture(scope="module", params=list(FACTORIES))
def fitted(request, digits):
    X, y, _ = digits
    return FACTORIES[request.param]().fit(X, y)


def _outputs(est, Q):
    dist, ind = est.kneighbors(Q, n_neighbors=10)
    return est.transform(Q), est.encode(Q), dist, ind


def test_row_order_does_not_matter(fitted, digits):
    Q = digits[2]
    perm = np.random.RandomState(0).permutation(len(Q))
    ref = _outputs(fitted, Q)
    for a, b in zip(_outputs(fitted, Q[perm]), ref, strict=True):
        assert_array_equal(a, b[perm])


def test_batch_composition_does_not_matter(fitted, digits):
    Q = digits[2]
    ref = _outputs(fitted, Q)
    # Ragged batches of 7, one row at a time, and a row surrounded by others.
    for parts in (
        [Q[i : i + 7] for i in range(0, len(Q), 7)],
        [Q[i : i + 1] for i in range(25)],
    ):
        got = [_outputs(fitted, part) for part in parts]
        n = sum(len(p) for p in parts)
        for j in range(4):
            assert_array_equal(np.concatenate([g[j] for g in got]), ref[j][:n])


@pytest.mark.parametrize("name", ["DQN", "DSQ"])
def test_inference_batch_size_does_not_matter(name, digits):
    X, y, Q = digits
    est = FACTORIES[name]().fit(X, y)
    ref = _outputs(est, Q)
    # batch_size only sets how many rows go through the network at once
    # after fit (fitted parameters are unchanged).
    est.set_params(batch_size=5)
    for a, b in zip(_outputs(est, Q), ref, strict=True):
        assert_array_equal(a, b)


def test_thread_count_does_not_matter(fitted, digits):
    Q = digits[2]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _outputs(fitted, Q)
        torch.set_num_threads(2)
        two = _outputs(fitted, Q)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two, strict=True):
        assert_array_equal(a, b)


def test_module_is_left_untouched(digits):
    # Inference runs on a float64 copy: the fitted float32 module is not
    # cast, moved or switched to another mode.
    X, y, Q = digits
    est = FACTORIES["DQN"]().fit(X, y)
    est.module_.train()
    before = {k: v.clone() for k, v in est.module_.state_dict().items()}
    est.transform(Q)
    assert est.module_.training
    for k, v in est.module_.state_dict().items():
        assert v.dtype == before[k].dtype
        assert torch.equal(v, before[k])
