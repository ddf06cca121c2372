"""Distributed search: kneighbors spreads database shards over a dask cluster."""

import numpy as np
import pytest
from joblib import parallel_config
from sklearn import config_context
from sklearn.datasets import load_digits

from skquant import ProductQuantizer, QuantizedKNeighborsTransformer

distributed = pytest.importorskip("distributed")
pytest.importorskip("joblib._dask")


@pytest.fixture(scope="module")
def client():
    # Threads in one process: starts in well under a second and needs no
    # spawned interpreters, yet every shard goes through the scheduler.
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def fitted():
    X, y = load_digits(return_X_y=True)
    pq = ProductQuantizer(n_codebooks=8, n_codewords=32, random_state=0).fit(X, y)
    return pq, X


@pytest.mark.parametrize("n_jobs", [2, 4, -1])
def test_dask_backend_gives_identical_neighbors(client, fitted, n_jobs):
    pq, X = fitted
    queries = X[:300]
    dist, ind = pq.kneighbors(queries, n_neighbors=10)
    pq.set_params(n_jobs=n_jobs)
    try:
        with distributed.get_task_stream(client) as stream:
            with parallel_config(backend="dask"):
                dist_dask, ind_dask = pq.kneighbors(queries, n_neighbors=10)
                ind_all = pq.kneighbors(n_neighbors=5, return_distance=False)
    finally:
        pq.set_params(n_jobs=None)
    np.testing.assert_array_equal(ind_dask, ind)
    np.testing.assert_array_equal(dist_dask, dist)
    np.testing.assert_array_equal(ind_all, pq.kneighbors(n_neighbors=5, return_distance=False))
    # The shards really ran as tasks on the cluster, on both workers.
    assert len(stream.data) >= 2
    assert len({task["worker"] for task in stream.data}) == 2


def test_dask_backend_with_small_working_memory(client, fitted):
    # Many query chunks, each sharded over the workers.
    pq, X = fitted
    expected = pq.kneighbors(X[:200], n_neighbors=7)
    pq.set_params(n_jobs=2)
    try:
        with config_context(working_memory=0.05), parallel_config(backend="dask"):
            result = pq.kneighbors(X[:200], n_neighbors=7)
    finally:
        pq.set_params(n_jobs=None)
    for a, b in zip(expected, result, strict=True):
        np.testing.assert_array_equal(a, b)


def test_knn_graph_on_dask(client):
    X, _ = load_digits(return_X_y=True)
    X = X[:500]
    pq = ProductQuantizer(n_codebooks=8, n_codewords=32, random_state=0)
    expected = QuantizedKNeighborsTransformer(pq, n_neighbors=5).fit_transform(X)
    with parallel_config(backend="dask"):
        graph = QuantizedKNeighborsTransformer(
            pq.set_params(n_jobs=2), n_neighbors=5
        ).fit_transform(X)
    assert (graph != expected).nnz == 0
