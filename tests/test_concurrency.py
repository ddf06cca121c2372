"""Thread safety: ``kneighbors`` from several threads on one fitted estimator
gives exactly the results of serial calls.

A web service typically shares one fitted index between request threads.
The estimators cache derived search layouts (transposed and pair codes, the
inverted file) on first use, and the engine runs database shards on a shared
thread pool; all threads start together (barrier) on an estimator whose
caches are cold (fresh from a pickle), so the lazy initialisation races.
"""

import copy
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import load_digits

from skquant import DeepQuantizer, ProductQuantizer, QuantizedKNeighborsTransformer
from skquant._deep._dsq import SphericalQuantizer

N_THREADS = 8
TIMEOUT = 120  # seconds: a deadlock fails the test instead of hanging the suite

ESTIMATORS = {
    "PQ": lambda: ProductQuantizer(8, 16, random_state=0),
    "PQ-n_jobs": lambda: ProductQuantizer(8, 16, n_jobs=2, random_state=0),
    "OPQ": lambda: ProductQuantizer(8, 16, rotation=True, n_rotation_iter=2, random_state=0),
    "PQ-IVF": lambda: ProductQuantizer(8, 16, n_lists=8, n_probe=3, random_state=0),
    "DQN": lambda: DeepQuantizer(
        n_codebooks=4, n_codewords=16, embedding_dim=16, hidden_layer_sizes=(32,),
        max_iter=2, warmup_epochs=1, device="cpu", random_state=0,
    ),
    "DSQ": lambda: SphericalQuantizer(
        n_codebooks=4, n_codewords=16, embedding_dim=16, hidden_layer_sizes=(32,),
        max_iter=2, warmup_epochs=1, device="cpu", random_state=0, n_jobs=2,
    ),
}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600], y[:600], X[600:700]


def _requests(Q):
    """(method, args, kwargs): single queries (per-query kernel), batches
    (batch kernel), X=None, several k, graphs."""
    reqs = []
    for i in range(0, 40, 3):
        reqs.append(("kneighbors", (Q[i : i + 1],), {"n_neighbors": 1 + i % 7}))
    for i in range(0, 100, 25):
        reqs.append(("kneighbors", (Q[i : i + 25],), {"n_neighbors": 10}))
    reqs.append(("kneighbors", (Q,), {"n_neighbors": 50}))
    reqs.append(("kneighbors", (), {"n_neighbors": 4}))
    reqs.append(("kneighbors_graph", (Q[:30],), {"n_neighbors": 5, "mode": "distance"}))
    return reqs


def _as_arrays(result):
    if isinstance(result, tuple):
        return result
    if hasattr(result, "toarray"):
        return (result.toarray(),)
    return (result,)


def _run_concurrently(est, requests):
    barrier = threading.Barrier(N_THREADS)

    def worker(offset):
        barrier.wait()
        # Each thread walks all requests, from a different starting point.
        out = {}
        for j in range(len(requests)):
            r = (offset + j) % len(requests)
            method, args, kwargs = requests[r]
            out[r] = _as_arrays(getattr(est, method)(*args, **kwargs))
        return out

    with ThreadPoolExecutor(N_THREADS) as pool:
        futures = [pool.submit(worker, t) for t in range(N_THREADS)]
        return [f.result(timeout=TIMEOUT) for f in futures]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_kneighbors_from_threads_equals_serial(name, digits):
    X, y, Q = digits
    fitted = ESTIMATORS[name]().fit(X, y)
    requests = _requests(Q)
    serial_est = copy.deepcopy(fitted)
    serial = [
        _as_arrays(getattr(serial_est, m)(*a, **kw)) for m, a, kw in requests
    ]
    for _ in range(2):  # two rounds, each on an estimator with cold caches
        shared = pickle.loads(pickle.dumps(fitted))
        for per_thread in _run_concurrently(shared, requests):
            for r, arrays in per_thread.items():
                for got, expected in zip(arrays, serial[r], strict=True):
                    assert_array_equal(got, expected)


def test_transformer_from_threads_equals_serial(digits):
    X, y, Q = digits
    est = QuantizedKNeighborsTransformer(
        ProductQuantizer(8, 16, random_state=0), n_neighbors=5
    ).fit(X)
    expected = [est.transform(Q[i : i + 10]).toarray() for i in range(0, 100, 10)]
    shared = pickle.loads(pickle.dumps(est))
    with ThreadPoolExecutor(N_THREADS) as pool:
        futures = [
            pool.submit(lambda i=i: shared.transform(Q[i : i + 10]).toarray())
            for i in range(0, 100, 10)
            for _ in range(3)
        ]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    for j, got in enumerate(results):
        assert_array_equal(got, expected[j // 3])

