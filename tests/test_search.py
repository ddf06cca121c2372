"""The AQD engine against brute force on the decoded vectors."""

import numpy as np
import pytest
from sklearn import config_context

from skquant._search import aqd_search, euclidean_tables, inner_product_tables


def _reference_topk(distances, k):
    """Exact ranking: by distance, ties by lower index (stable argsort)."""
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def _random_product_problem(rng, n_queries=23, n_items=701, M=4, K=16, ds=3):
    codebooks = rng.normal(size=(M, K, ds)).astype(np.float32)
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8)
    queries = rng.normal(size=(n_queries, M * ds)).astype(np.float32)
    decoded = np.hstack([codebooks[m][codes[:, m]] for m in range(M)]).astype(np.float64)
    return codebooks, codes, queries, decoded


@pytest.mark.parametrize("n_jobs", [None, 2])
@pytest.mark.parametrize("working_memory", [1024, 0.002])
def test_euclidean_search_equals_brute_force(n_jobs, working_memory):
    rng = np.random.default_rng(0)
    codebooks, codes, queries, decoded = _random_product_problem(rng)
    exact = ((queries[:, None, :].astype(np.float64) - decoded[None]) ** 2).sum(-1)
    k = 10
    with config_context(working_memory=working_memory):
        values, indices = aqd_search(
            euclidean_tables(queries, codebooks), np.asfortranarray(codes), k, n_jobs=n_jobs
        )
    ref_values, ref_indices = _reference_topk(exact, k)
    np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-4)
    # Indices agree except where float32 rounding reorders near-equal distances.
    mismatch = indices != ref_indices
    gaps = np.abs(np.take_along_axis(exact, indices, 1) - ref_values)
    assert np.all(gaps[mismatch] < 1e-3)
    assert mismatch.mean() < 0.01


@pytest.mark.parametrize("n_jobs", [None, 2])
def test_inner_product_search_equals_brute_force(n_jobs):
    rng = np.random.default_rng(1)
    M, K, D = 3, 8, 5
    codebooks = rng.normal(size=(M, K, D)).astype(np.float32)
    codes = rng.integers(0, K, size=(400, M)).astype(np.uint8)
    queries = rng.normal(size=(17, D)).astype(np.float32)
    decoded = sum(codebooks[m][codes[:, m]].astype(np.float64) for m in range(M))
    exact = -(queries.astype(np.float64) @ decoded.T)
    with config_context(working_memory=0.001):
        values, indices = aqd_search(
            inner_product_tables(queries, codebooks), codes, 7, n_jobs=n_jobs
        )
    ref_values, ref_indices = _reference_topk(exact, 7)
    np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-4)
    assert np.mean(indices == ref_indices) > 0.99


def test_product_inner_product_tables():
    rng = np.random.default_rng(2)
    codebooks, codes, queries, decoded = _random_product_problem(rng, n_items=50)
    tables = inner_product_tables(queries, codebooks, layout="product")
    sums = tables[:, np.arange(codes.shape[1]), codes].sum(-1)
    np.testing.assert_allclose(sums, -(queries @ decoded.T), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_jobs", [None, 2])
@pytest.mark.parametrize("k", [1, 5, 300])
def test_ties_are_broken_by_lower_index(n_jobs, k):
    # Small integer tables make sums exact and ties frequent (duplicate codes
    # and equal sums), so the expected order is unambiguous.
    rng = np.random.default_rng(3)
    tables = rng.integers(0, 3, size=(40, 3, 4)).astype(np.float32)
    codes = rng.integers(0, 4, size=(300, 3)).astype(np.uint8)
    sums = tables[:, np.arange(3), codes].sum(-1)
    with config_context(working_memory=0.0005):
        values, indices = aqd_search(tables, codes, k, n_jobs=n_jobs)
    ref_values, ref_indices = _reference_topk(sums, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(values, ref_values)


def test_all_equal_distances():
    tables = np.zeros((3, 2, 4), dtype=np.float32)
    codes = np.zeros((50, 2), dtype=np.uint8)
    values, indices = aqd_search(tables, codes, 5)
    np.testing.assert_array_equal(indices, np.tile(np.arange(5), (3, 1)))
    assert np.all(values == 0)


def test_euclidean_tables_match_direct_computation():
    rng = np.random.default_rng(4)
    codebooks, _, queries, _ = _random_product_problem(rng)
    M, K, ds = codebooks.shape
    direct = (
        (queries.reshape(-1, M, 1, ds) - codebooks[None]) ** 2
    ).sum(-1)
    np.testing.assert_allclose(euclidean_tables(queries, codebooks), direct, rtol=1e-5, atol=1e-5)


def test_uint16_codes():
    rng = np.random.default_rng(5)
    tables = rng.normal(size=(4, 2, 300)).astype(np.float32)
    codes = rng.integers(0, 300, size=(1000, 2)).astype(np.uint16)
    sums = tables[:, np.arange(2), codes].sum(-1)
    _, indices = aqd_search(tables, codes, 3)
    np.testing.assert_array_equal(indices, _reference_topk(sums, 3)[1])


def test_bad_arguments():
    tables = np.zeros((1, 2, 4), dtype=np.float32)
    codes = np.zeros((5, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="n_neighbors"):
        aqd_search(tables, codes, 6)
    with pytest.raises(ValueError, match="n_neighbors"):
        aqd_search(tables, codes, 0)
    with pytest.raises(ValueError, match="shape"):
        aqd_search(tables, codes[:, :1], 1)
