"""Coarse probe selection: float32 scores certified into the exact ranking,
and the one-loop residual search against its steps."""

import numpy as np
import pytest

from skquant import ProductQuantizer
from skquant._ivf import _GEMM_QUERIES, _HEAP_PROBES, CoarseProbes, ivf_search
from skquant._probe_loop import certified_probes


def _exact_scores(queries, centroids, metric):
    """The exact scores as defined: float64 products summed left to right."""
    x, c = queries.astype(np.float64), centroids.astype(np.float64)
    dots, norms = 0.0, 0.0
    for d in range(c.shape[1]):
        dots = dots + x[:, None, d] * c[None, :, d]
        norms = norms + c[:, d] * c[:, d]
    return norms[None] - 2.0 * dots if metric == "euclidean" else -dots


def _expected_probes(scores, sizes, n_probe, k):
    """Each query's cells by (score, cell), until they hold k items."""
    out = []
    for row in scores:
        ranked = np.argsort(row, kind="stable")
        needed = np.searchsorted(np.cumsum(sizes[ranked]), k) + 1
        out.append(ranked[: max(n_probe, min(needed, len(row)))])
    return out


def _grid_problem():
    # Centroids on an integer grid, queries on it and half-way between: the
    # exact scores tie often (float32 computes them exactly too, so the
    # certificate must see the ties and fall back).
    axis = np.arange(3.0)
    centroids = np.stack(np.meshgrid(axis, axis, axis, axis), -1).reshape(-1, 4)
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 5, size=(30, 4)) / 2.0
    return queries.astype(np.float32), centroids.astype(np.float32)


def _offset_problem():
    # Far from the origin: float32 scores round by more than the gaps between
    # many cells.
    rng = np.random.default_rng(1)
    centroids = (1000.0 + rng.normal(size=(200, 32))).astype(np.float32)
    queries = (1000.0 + rng.normal(size=(30, 32))).astype(np.float32)
    return queries, centroids


@pytest.mark.parametrize("problem", [_grid_problem, _offset_problem])
@pytest.mark.parametrize("metric", ["euclidean", "inner_product"])
@pytest.mark.parametrize("n_probe", [1, 2, 7, _HEAP_PROBES, _HEAP_PROBES + 1])
def test_probes_are_the_exact_ranking(problem, metric, n_probe):
    queries, centroids = problem()
    n_lists = len(centroids)
    sizes = np.random.default_rng(2).integers(0, 3, size=n_lists)
    coarse = CoarseProbes(centroids, metric)
    exact = _exact_scores(queries, centroids, metric)
    for k in (1, 40):
        expected = _expected_probes(exact, sizes, n_probe, k)
        # A batch (float32 scores by one GEMM) and each query alone (the
        # compiled loop's own float32 scores) give the same probes.
        batch = coarse.probes(queries, sizes, n_probe, k)
        assert len(queries) >= _GEMM_QUERIES
        for q in range(len(queries)):
            one = coarse.probes(queries[q : q + 1], sizes, n_probe, k)
            starts, cells, scores = batch
            got = cells[starts[q] : starts[q + 1]]
            np.testing.assert_array_equal(one[1], got)
            np.testing.assert_array_equal(one[2], scores[starts[q] : starts[q + 1]])
            if n_probe <= _HEAP_PROBES or len(got) > n_probe:
                np.testing.assert_array_equal(got, expected[q])
                np.testing.assert_array_equal(
                    scores[starts[q] : starts[q + 1]], exact[q, got].astype(np.float32))
            else:
                # Beyond the heap: numpy's selection (float64 BLAS scores),
                # the best first, then the rest of a best set in any order
                # (ties at its edge broken numpy's way).
                assert got[0] == expected[q][0] and len(got) == len(expected[q])
                rest = np.setdiff1d(np.arange(n_lists), got)
                assert exact[q, got].max() <= exact[q, rest].min()


def test_certificate_falls_back_on_ties_only():
    queries, centroids = _grid_problem()
    sizes = np.ones(len(centroids), dtype=np.int64)
    n_exact = {}
    rng = np.random.default_rng(3)
    separated = (rng.normal(size=(30, 4)) * 0.3 + 1.0).astype(np.float32)
    for name, batch in (("ties", queries), ("separated", separated)):
        coarse = CoarseProbes(centroids)
        probes = np.empty((len(batch), 2), dtype=np.int64)
        scores = np.empty((len(batch), 2), dtype=np.float32)
        _, n_exact[name] = certified_probes(
            None, coarse._weights, coarse._norms32, batch, coarse._c32, coarse._norms64, True,
            coarse._c_max, coarse._n_max, sizes, 1, probes, scores)
    assert n_exact["ties"] > 0  # exact ties cannot be certified in float32
    assert n_exact["separated"] <= 3


@pytest.mark.parametrize("n_probe", [1, 3, _HEAP_PROBES])
def test_one_loop_residual_search_equals_its_steps(n_probe):
    # Small cells, some empty, and k beyond most cells: the loop's own
    # extension to more cells runs too. Same values, bit for bit, as the
    # tables, probes, scan and exact distances one by one, in a batch and
    # one query at a time.
    rng = np.random.default_rng(4)
    X = rng.normal(size=(600, 8)).astype(np.float32)
    pq = ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=60, random_state=0).fit(X)
    X = X[X[:, 0] > 0.3]  # (a database in part of the space: empty cells)
    pq.index(X)
    index = pq.index_
    lists = index.inverted_lists()
    assert (lists.sizes == 0).any()
    Q = rng.normal(size=(20, 8)).astype(np.float32)
    for k in (5, 30):
        tables = index._residual_query_tables(Q)
        probes = index._coarse().probes(Q, lists.sizes, n_probe, k)
        _, candidates = ivf_search(tables, None, lists, k, add_scores=True, refine=False,
                                   probes=probes)
        expected = index._residual_distances(Q, candidates)
        got = index._search_residual(Q, k, n_probe)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
        for q in (0, 7):
            one = index._search_residual(Q[q : q + 1], k, n_probe)
            np.testing.assert_array_equal(one[1], expected[1][q : q + 1])
            np.testing.assert_array_equal(one[0], expected[0][q : q + 1])
        # The exact distances of the items found.
        reconstructed = index.reconstruct(slice(None)).astype(np.float64)
        brute = np.sqrt(((Q[:, None].astype(np.float64) - reconstructed[got[1]]) ** 2).sum(-1))
        np.testing.assert_allclose(got[0], brute, rtol=1e-5)
