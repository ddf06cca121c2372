"""Property tests (hypothesis): the search engine and the metrics equal
brute-force references on random shapes, duplicates and ties, k = database
size, float32 / float64 input, every kernel, sharding and chunking.

Deterministic (``derandomize=True``) and modest (``max_examples``), so the
module runs in seconds and fails the same way on every machine.
"""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn import config_context

from skquant import ProductQuantizer
from skquant._search import aqd_search
from skquant.metrics import (
    mean_average_precision,
    precision_at_k,
    retrieval_precision_recall_curve,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
KERNELS = ["auto", "pairs", "columns", "numpy", "torch"]


def _n_neighbors(n_items):
    """k from 1 to the database size, boundaries (k = 1, N - 1, N) included."""
    return st.one_of(
        st.sampled_from(sorted({1, min(2, n_items), max(1, n_items // 2),
                                max(1, n_items - 1), n_items})),
        st.integers(1, n_items),
    )


# --------------------------------------------------------------------------
# Reference
def _brute_force(tables, codes, k):
    """All table sums in float64, sorted by (value, index): the k first."""
    tables = np.asarray(tables, dtype=np.float32).astype(np.float64)
    n_codebooks = tables.shape[1]
    sums = sum(tables[:, m, codes[:, m]] for m in range(n_codebooks))  # (nq, N)
    n_items = codes.shape[0]
    order = np.lexsort((np.broadcast_to(np.arange(n_items), sums.shape), sums), axis=1)
    order = order[:, :k]
    return np.take_along_axis(sums, order, axis=1), order


@st.composite
def search_problems(draw, integer_tables):
    n_codebooks = draw(st.integers(1, 5))
    # Few codewords and many items: duplicate code rows, hence exact ties.
    n_codewords = draw(st.integers(1, 6))
    n_items = draw(st.one_of(st.sampled_from([1, 2, 9, 64, 150]), st.integers(1, 150)))
    # 1..11 queries use the per-query kernel under "auto", 12+ the batch one.
    n_queries = draw(st.sampled_from([1, 2, 5, 11, 12, 13, 70]))
    codes = draw(
        hnp.arrays(np.uint8, (n_items, n_codebooks), elements=st.integers(0, n_codewords - 1))
    )
    if draw(st.booleans()):
        codes = np.asfortranarray(codes)  # the layout estimators store
    shape = (n_queries, n_codebooks, n_codewords)
    if integer_tables:
        # Small integers: every sum is exact in float32, so ties are exact
        # and the expected order (value, then lower index) is unambiguous.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        tables = rng.integers(-3, 4, size=shape).astype(np.float32)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        tables = rng.standard_normal(shape).astype(np.float32)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return tables.astype(dtype), codes, draw(_n_neighbors(n_items))


@SETTINGS
@given(
    problem=search_problems(integer_tables=True),
    kernel=st.sampled_from(KERNELS),
    n_jobs=st.sampled_from([None, 2, 3]),
    working_memory=st.sampled_from([None, 0.0001]),
)
def test_aqd_search_equals_brute_force_with_ties(problem, kernel, n_jobs, working_memory):
    tables, codes, k = problem
    tables_before, codes_before = tables.copy(), codes.copy()
    with config_context(working_memory=working_memory or 1024):
        values, indices = aqd_search(tables, codes, k, n_jobs=n_jobs, kernel=kernel)
    ref_values, ref_indices = _brute_force(tables, codes, k)
    assert values.shape == indices.shape == (tables.shape[0], k)
    assert_array_equal(indices, ref_indices)
    assert_array_equal(values, ref_values)
    assert_array_equal(tables, tables_before)
    assert_array_equal(codes, codes_before)


@SETTINGS
@given(
    problem=search_problems(integer_tables=False),
    kernel=st.sampled_from(KERNELS),
    n_jobs=st.sampled_from([None, 2]),
)
def test_aqd_search_continuous_tables(problem, kernel, n_jobs):
    # Kernels select in float32 (sums in different orders), then recompute the
    # winners in float64: the values are the true k smallest up to float32
    # rounding, and each returned index really has the value reported.
    tables, codes, k = problem
    values, indices = aqd_search(tables, codes, k, n_jobs=n_jobs, kernel=kernel)
    ref_values, _ = _brute_force(tables, codes, k)
    all_values, _ = _brute_force(tables, codes, codes.shape[0])
    tol = 1e-5 * (1 + np.abs(all_values).max())
    assert_allclose(values, ref_values, rtol=0, atol=tol)
    own = np.take_along_axis(
        sum(
            tables.astype(np.float32).astype(np.float64)[:, m, codes[:, m]]
            for m in range(codes.shape[1])
        ),
        indices,
        axis=1,
    )
    assert_array_equal(values, own)
    assert (np.diff(values, axis=1) >= 0).all()
    for row in indices:
        assert len(np.unique(row)) == k


# --------------------------------------------------------------------------
# Estimator: ProductQuantizer.kneighbors vs exact distances to the decoded
# database (the definition of AQD)
@st.composite
def pq_problems(draw):
    n_codebooks = draw(st.sampled_from([1, 2, 4]))
    n_features = n_codebooks * draw(st.integers(1, 3))
    n_distinct = draw(st.integers(2, 30))
    n_items = draw(st.integers(n_distinct, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    distinct = rng.standard_normal((n_distinct, n_features))
    # Items repeat rows of `distinct`: duplicate codes, tied distances.
    X = distinct[rng.integers(0, n_distinct, n_items)]
    n_codewords = draw(st.integers(1, min(8, n_items)))
    queries = np.vstack([X[: draw(st.integers(0, 3))],
                         rng.standard_normal((draw(st.integers(1, 15)), n_features))])
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return X, queries.astype(dtype), n_codebooks, n_codewords, draw(_n_neighbors(n_items))


def _check_against_decoded(pq, queries, dist, ind):
    recon = pq.decode(pq.codes_).astype(np.float64)
    exact = np.sqrt(((queries[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1))
    k = ind.shape[1]
    scale = 1e-4 * (1 + exact.max())
    # The k smallest distances, and each index at the distance reported.
    assert_allclose(dist, np.sort(exact, axis=1)[:, :k], rtol=0, atol=scale)
    assert_allclose(np.take_along_axis(exact, ind, axis=1), dist, rtol=0, atol=scale)
    # Items with identical codes tie exactly: lower index first, and a later
    # duplicate is never returned without the earlier ones.
    codes = pq.codes_
    for row in ind:
        returned = {int(j): pos for pos, j in enumerate(row)}
        for j, pos in returned.items():
            twins = np.flatnonzero((codes[:j] == codes[j]).all(axis=1))
            for i in twins:
                assert i in returned and returned[i] < pos, (i, j, row)


@settings(SETTINGS, max_examples=40)
@given(problem=pq_problems(), n_jobs=st.sampled_from([None, 2]))
def test_product_quantizer_kneighbors_equals_decoded_brute_force(problem, n_jobs):
    X, queries, n_codebooks, n_codewords, k = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means: fewer distinct points than K
        pq = ProductQuantizer(
            n_codebooks, n_codewords, max_iter=10, n_jobs=n_jobs, random_state=0
        ).fit(X)
    queries_before = queries.copy()
    dist, ind = pq.kneighbors(queries, n_neighbors=k)
    assert_array_equal(queries, queries_before)
    _check_against_decoded(pq, queries, dist, ind)
    if k < X.shape[0]:
        # X=None: the items' own reconstructions as queries, each item excluded.
        dist, ind = pq.kneighbors(n_neighbors=k)
        assert not (ind == np.arange(X.shape[0])[:, None]).any()
        recon = pq.decode(pq.codes_)
        exact = np.sqrt(((recon[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1))
        np.fill_diagonal(exact, np.inf)
        scale = 1e-4 * (1 + exact[np.isfinite(exact)].max())
        assert_allclose(dist, np.sort(exact, axis=1)[:, :k], rtol=0, atol=scale)


# --------------------------------------------------------------------------
# Metrics vs loops over queries
def _relevance_row(yq, yd, ranking_row):
    if yq.ndim == 0:
        return np.array([yd[j] == yq for j in ranking_row], dtype=bool)
    return np.array([bool(np.logical_and(yd[j], yq).any()) for j in ranking_row])


def _ref_ap(rel):
    hits = 0
    total = 0.0
    for r, is_rel in enumerate(rel, start=1):
        if is_rel:
            hits += 1
            total += hits / r
    return total / hits if hits else np.nan


@st.composite
def metric_problems(draw):
    n_database = draw(st.integers(1, 40))
    n_queries = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        n_classes = draw(st.integers(1, 5))
        yd = rng.integers(0, n_classes, n_database)
        yq = rng.integers(0, n_classes + 1, n_queries)  # some queries: no relevant item
        if draw(st.booleans()):
            labels = np.array(["cat", "dog", "eel", "fox", "gnu", "hen"])
            yd, yq = labels[yd], labels[yq]
    else:
        n_labels = draw(st.integers(1, 4))
        yd = (rng.random((n_database, n_labels)) < 0.3).astype(int)
        yq = (rng.random((n_queries, n_labels)) < 0.4).astype(int)
    n_ranked = draw(_n_neighbors(n_database))
    ranking = np.array([rng.permutation(n_database)[:n_ranked] for _ in range(n_queries)])
    top_k = draw(st.one_of(st.none(), st.integers(1, n_ranked)))
    return yq, yd, ranking, top_k


@SETTINGS
@given(problem=metric_problems(), working_memory=st.sampled_from([1024, 0.00001]))
def test_metrics_equal_loop_references(problem, working_memory):
    yq, yd, ranking, top_k = problem
    n_ranked = ranking.shape[1]
    cut = n_ranked if top_k is None else top_k
    rels = [_relevance_row(yq[i], yd, ranking[i]) for i in range(len(yq))]
    ap = np.array([_ref_ap(rel[:cut]) for rel in rels])
    with config_context(working_memory=working_memory):
        assert mean_average_precision(yq, yd, ranking, top_k=top_k) == pytest.approx(
            np.nan_to_num(ap).mean(), abs=1e-12
        )
        if np.isnan(ap).all():
            with pytest.warns(UserWarning, match="undefined"):
                assert np.isnan(
                    mean_average_precision(yq, yd, ranking, top_k=top_k, no_relevant="skip")
                )
        else:
            assert mean_average_precision(
                yq, yd, ranking, top_k=top_k, no_relevant="skip"
            ) == pytest.approx(np.nanmean(ap), abs=1e-12)
        assert precision_at_k(yq, yd, ranking, cut) == pytest.approx(
            np.mean([rel[:cut].mean() for rel in rels]), abs=1e-12
        )
        n_relevant = np.array([
            _relevance_row(yq[i], yd, np.arange(len(yd))).sum() for i in range(len(yq))
        ])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recall undefined when no query has one
            precision, recall, ranks = retrieval_precision_recall_curve(yq, yd, ranking)
    hits = np.array([np.cumsum(rel) for rel in rels], dtype=float)
    assert_array_equal(ranks, np.arange(1, n_ranked + 1))
    assert_allclose(precision, (hits / ranks).mean(axis=0), atol=1e-12)
    has = n_relevant > 0
    if has.any():
        assert_allclose(recall, (hits[has] / n_relevant[has, None]).mean(axis=0), atol=1e-12)
        if n_ranked == len(yd):
            assert recall[-1] == pytest.approx(1.0)
    else:
        assert np.isnan(recall).all()
