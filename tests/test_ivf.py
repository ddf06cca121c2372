"""Inverted-file (non-exhaustive) search: engine against a restricted brute
force, and the estimator hook (n_lists / n_probe) against exhaustive search."""

import pickle

import numpy as np
import pytest
from sklearn import config_context
from sklearn.datasets import make_blobs

from skquant import ProductQuantizer, _search
from skquant._additive import inner_product_tables
from skquant._index import QuantizedIndex, train_coarse_quantizer
from skquant._ivf import InvertedLists, assign_lists, coarse_scores, ivf_search
from skquant._search import aqd_search


@pytest.fixture(autouse=True)
def _shard_small_problems(monkeypatch):
    """Small test databases still exercise the multi-thread split and merge."""
    monkeypatch.setattr(_search, "_MIN_SHARD_WORK", 1)


def _restricted_reference(sums, assignments, scores, n_probe, k):
    """Stable top-k over the items of each query's probed cells, probing more
    cells (best first) until they hold k items."""
    n_lists = scores.shape[1]
    sizes = np.bincount(assignments, minlength=n_lists)
    out = []
    for q in range(len(sums)):
        ranked = np.argsort(scores[q], kind="stable")
        needed = np.searchsorted(np.cumsum(sizes[ranked]), k) + 1
        cells = ranked[: max(min(n_probe, n_lists), needed)]
        masked = np.where(np.isin(assignments, cells), sums[q], np.inf)
        out.append(np.argsort(masked, kind="stable")[:k])
    return np.array(out)


@pytest.mark.parametrize("n_queries", [1, 3, 40])
@pytest.mark.parametrize("n_probe", [1, 2, 5])
@pytest.mark.parametrize("residual", [False, True])
def test_ivf_equals_brute_force_on_probed_cells(n_queries, n_probe, residual):
    rng = np.random.default_rng(n_queries + 10 * n_probe)
    M, K, n_items, n_lists = 3, 8, 600, 7
    # Integer tables: exact sums and many ties, broken by the original index.
    tables = rng.integers(0, 3, size=(n_queries, M, K)).astype(np.float32)
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8)
    assignments = rng.integers(0, n_lists, size=n_items)
    # Distinct integer cell scores: unambiguous probes, exact sums.
    scores = np.argsort(rng.random((n_queries, n_lists)), axis=1).astype(np.float64)
    sums = tables[:, np.arange(M), codes].sum(-1)
    # Residual codes: each item's value also holds a per-item term and its
    # cell's coarse score.
    bias = rng.integers(-2, 3, size=n_items).astype(np.float32) if residual else None
    if residual:
        sums = sums + bias + scores[:, assignments]
    ivf = InvertedLists(codes, assignments, n_lists, item_bias=bias)
    for k in (1, 10, 150):
        values, indices = ivf_search(tables, scores, ivf, k, n_probe=n_probe,
                                     add_scores=residual, refine=not residual)
        expected = _restricted_reference(sums, assignments, scores, n_probe, k)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(values, np.take_along_axis(sums, expected, 1))


@pytest.mark.parametrize("n_queries", [1, 30])
def test_all_cells_probed_is_exhaustive_search(n_queries):
    rng = np.random.default_rng(1)
    M, K = 4, 16
    tables = rng.normal(size=(n_queries, M, K)).astype(np.float32)
    codes = rng.integers(0, K, size=(2000, M)).astype(np.uint8)
    ivf = InvertedLists(codes, rng.integers(0, 9, size=2000), 9)
    scores = rng.normal(size=(n_queries, 9)).astype(np.float32)
    expected = aqd_search(tables, codes, 12)
    got = ivf_search(tables, scores, ivf, 12, n_probe=9)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


def test_small_cells_are_extended_to_k_items():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 4, size=(50, 2)).astype(np.uint8)
    assignments = np.r_[np.zeros(2, int), np.ones(48, int)]  # cell 0 has 2 items
    ivf = InvertedLists(codes, assignments, 3)  # cell 2 is empty
    tables = rng.normal(size=(2, 2, 4)).astype(np.float32)
    scores = np.array([[0.0, 2.0, 1.0], [0.0, 1.0, 2.0]], dtype=np.float32)
    _, indices = ivf_search(tables, scores, ivf, 5, n_probe=1)
    assert indices.shape == (2, 5)
    assert np.all(np.isin(indices[:, :2], [0, 1]) | (indices >= 2)[:, :2])
    np.testing.assert_array_equal(
        indices, _restricted_reference(
            tables[:, np.arange(2), codes].sum(-1), assignments, scores, 1, 5)
    )


def test_inner_product_tables_with_all_cells_match_exhaustive():
    rng = np.random.default_rng(3)
    codebooks = rng.normal(size=(3, 16, 6)).astype(np.float32)
    codes = rng.integers(0, 16, size=(900, 3)).astype(np.uint8)
    decoded = sum(codebooks[m][codes[:, m]] for m in range(3))
    centroids = train_coarse_quantizer(decoded, 6, metric="inner_product", random_state=0)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, rtol=1e-5)
    ivf = InvertedLists(codes, assign_lists(decoded, centroids, "inner_product"), 6)
    queries = rng.normal(size=(8, 6)).astype(np.float32)
    tables = inner_product_tables(queries, codebooks, negate=True)
    scores = coarse_scores(queries, centroids, "inner_product")
    np.testing.assert_array_equal(
        ivf_search(tables, scores, ivf, 7, n_probe=6)[1], aqd_search(tables, codes, 7)[1]
    )


def test_assign_lists_is_nearest_centroid_in_chunks():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3000, 5)).astype(np.float32)
    centroids = rng.normal(size=(11, 5)).astype(np.float32)
    exact = ((X[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    with config_context(working_memory=0.01):
        cells = assign_lists(X, centroids)
    chosen = np.take_along_axis(exact, cells[:, None].astype(np.intp), 1)[:, 0]
    np.testing.assert_allclose(chosen, exact.min(axis=1), rtol=1e-4, atol=1e-4)


def test_coarse_quantizer_size_errors():
    with pytest.raises(ValueError, match="n_lists=10 must be between 1 and"):
        train_coarse_quantizer(np.zeros((5, 2)), 10)


# ---------------------------------------------------------------------------
# Estimator hook
@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=3000, centers=40, n_features=16, cluster_std=1.0,
                      random_state=0)
    return X.astype(np.float32), y


def _pq(**params):
    # Direct codes: these tests check that the cells only choose what is
    # scanned (residual codes are tested in test_residual.py).
    params.setdefault("by_residual", False)
    return ProductQuantizer(n_codebooks=4, n_codewords=32, random_state=0, **params)


def test_estimator_all_cells_equals_exhaustive(blobs):
    X, y = blobs
    exhaustive = _pq().fit(X, y)
    ivf = _pq(n_lists=20, n_probe=20).fit(X, y)
    np.testing.assert_array_equal(ivf.codes_, exhaustive.codes_)
    assert ivf.coarse_centroids_.shape == (20, 16)
    assert exhaustive.coarse_centroids_ is None
    for queries in (X[:1], X[:300]):
        d1, i1 = exhaustive.kneighbors(queries, n_neighbors=10)
        d2, i2 = ivf.kneighbors(queries, n_neighbors=10)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)
    # X=None: same semantics (self excluded), same result.
    np.testing.assert_array_equal(
        exhaustive.kneighbors(n_neighbors=4, return_distance=False),
        ivf.kneighbors(n_neighbors=4, return_distance=False),
    )


def test_estimator_few_probes_recall_and_semantics(blobs):
    X, y = blobs
    exhaustive = _pq().fit(X, y)
    ivf = _pq(n_lists=40, n_probe=3, n_jobs=2).fit(X, y)
    queries = X[::7]
    _, i_ex = exhaustive.kneighbors(queries, n_neighbors=10)
    dist, ind = ivf.kneighbors(queries, n_neighbors=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_ex, ind, strict=True)])
    assert recall > 0.9
    assert np.all(np.diff(dist, axis=1) >= 0)
    # Every returned distance is the item's exact AQD (direct codes).
    decoded = ivf.decode(ivf.codes_).astype(np.float64)
    exact = np.sqrt(((queries[:, None, :] - decoded[ind]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-4)
    # X=None never returns the item itself.
    self_ind = ivf.kneighbors(n_neighbors=5, return_distance=False)
    assert not np.any(self_ind == np.arange(len(X))[:, None])
    # n_probe changes at query time; n_lists needs new cells, not a refit.
    ivf.set_params(n_probe=40)
    np.testing.assert_array_equal(ivf.kneighbors(queries, n_neighbors=10)[1], i_ex)
    codes = ivf.codes_.copy()
    ivf.set_params(n_lists=10, n_probe=2)
    with pytest.raises(ValueError, match="call train_inverted_file"):
        ivf.kneighbors(queries)
    ivf.train_inverted_file()
    assert ivf.coarse_centroids_.shape == (10, 16)
    np.testing.assert_array_equal(ivf.codes_, codes)  # the model was not refitted
    refit = _pq(n_lists=10, n_probe=2, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(ivf.coarse_centroids_, refit.coarse_centroids_)
    np.testing.assert_array_equal(
        ivf.kneighbors(queries, n_neighbors=10)[1], refit.kneighbors(queries, n_neighbors=10)[1]
    )
    ivf.train_inverted_file(n_lists=25)
    assert ivf.n_lists == 25 and ivf.coarse_centroids_.shape == (25, 16)
    ivf.kneighbors(queries)
    with pytest.raises(ValueError, match="must be between 1"):
        ivf.train_inverted_file(n_lists=len(X) + 1)
    assert ivf.n_lists == 25 and ivf.coarse_centroids_.shape == (25, 16)


def test_estimator_index_add_and_pickle_reuse_cells(blobs, monkeypatch):
    X, y = blobs
    ivf = _pq(n_lists=16, n_probe=4).fit(X[:2000], y[:2000])
    ivf.kneighbors(X[:2])  # builds the cells of the first 2000 items
    assigned = []
    original = QuantizedIndex.assign_cells
    monkeypatch.setattr(
        QuantizedIndex, "assign_cells",
        lambda self, codes: assigned.append(len(codes)) or original(self, codes),
    )
    ivf.add(X[2000:], y[2000:])
    _, i_added = ivf.kneighbors(X[:50], n_neighbors=8)
    assert assigned == [1000]  # only the new items were assigned

    fresh = _pq(n_lists=16, n_probe=4).fit(X[:2000], y[:2000]).index(X, y)
    np.testing.assert_array_equal(fresh.kneighbors(X[:50], n_neighbors=8)[1], i_added)

    clone = pickle.loads(pickle.dumps(ivf))
    assigned.clear()
    np.testing.assert_array_equal(clone.kneighbors(X[:50], n_neighbors=8)[1], i_added)
    assert assigned == []  # cells came with the pickle

    # Assigning codes_ directly rebuilds the cells from the codes.
    ivf.codes_ = np.asfortranarray(ivf.codes_[::-1])
    exhaustive = _pq(n_lists=16, n_probe=16).fit(X[:2000], y[:2000])
    exhaustive.codes_ = ivf.codes_
    assert exhaustive.n_samples_fit_ == ivf.n_samples_fit_ == len(X)
    np.testing.assert_array_equal(
        ivf.set_params(n_probe=16).kneighbors(X[:20], n_neighbors=5)[1],
        exhaustive.kneighbors(X[:20], n_neighbors=5)[1],
    )


def test_estimator_n_lists_larger_than_database():
    X = np.random.default_rng(5).normal(size=(30, 4))
    est = ProductQuantizer(n_codebooks=2, n_codewords=8, n_lists=50, by_residual=False).fit(X)
    # More cells than items: no cells yet, a clear error at search...
    assert est.coarse_centroids_ is None
    with pytest.raises(ValueError, match="exceeds the 30 indexed items"):
        est.kneighbors(X[:2])
    with pytest.raises(ValueError, match="n_lists=50 must be between 1"):
        est.train_inverted_file()
    # ... and a database of at least n_lists items trains them at index().
    big = np.random.default_rng(6).normal(size=(200, 4))
    est.index(big)
    assert est.coarse_centroids_.shape == (50, 4)
    assert est.kneighbors(big[:3], n_neighbors=5, return_distance=False).shape == (3, 5)
    with pytest.raises(ValueError, match="needs n_lists"):
        ProductQuantizer(n_codebooks=2, n_codewords=8).fit(X).train_inverted_file()


def test_index_retrains_cells_on_a_far_larger_database(blobs):
    X, y = blobs  # 3000 items
    est = _pq(n_lists=8, n_probe=2).fit(X[:300], y[:300])
    from_fit = est.coarse_centroids_.copy()
    est.index(X[:1000], y[:1000])  # 3.3x the training items: cells kept
    np.testing.assert_array_equal(est.coarse_centroids_, from_fit)
    est.index(X[:1200], y[:1200])  # 4x: cells trained on the database
    assert not np.array_equal(est.coarse_centroids_, from_fit)
    again = est.coarse_centroids_.copy()
    est.index(X[:1300], y[:1300])  # compared with the 1200 items of the last training
    np.testing.assert_array_equal(est.coarse_centroids_, again)
    # The count survives pickling.
    clone = pickle.loads(pickle.dumps(est))
    assert clone.index_.n_items_trained == 1200
    # Training directly on the database equals retraining through the estimator.
    direct = QuantizedIndex(est.quantizer_, est.codes_[:1200]).train_inverted_file(
        8, random_state=0
    )
    np.testing.assert_array_equal(direct.coarse_centroids, again)


@pytest.mark.parametrize("n_probe", [20, 21, 1000])
def test_all_probes_route_to_the_exhaustive_kernel(blobs, monkeypatch, n_probe):
    X, y = blobs
    exhaustive = _pq().fit(X, y)
    ivf = _pq(n_lists=20, n_probe=n_probe).fit(X, y)
    import skquant._index as index_module

    def refuse(*args, **kwargs):
        raise AssertionError("ivf_search called with n_probe >= n_lists")

    monkeypatch.setattr(index_module, "ivf_search", refuse)
    for queries in (X[:1], X[:200]):
        d1, i1 = exhaustive.kneighbors(queries, n_neighbors=7)
        d2, i2 = ivf.kneighbors(queries, n_neighbors=7)
        assert i1.tobytes() == i2.tobytes() and d1.tobytes() == d2.tobytes()
    ivf.set_params(n_probe=19)
    with pytest.raises(AssertionError, match="ivf_search called"):
        ivf.kneighbors(X[:1])


@pytest.mark.parametrize("M, K, n_items", [(1, 16, 300), (2, 300, 900), (5, 16, 3000),
                                           (4, 256, 20000)])
def test_paired_and_plain_scans(M, K, n_items):
    # Short and long scans (several chunks of a query's cells), narrow and
    # wide codes (K > 256): all give the restricted brute force.
    rng = np.random.default_rng(M * K)
    tables = rng.integers(0, 40, size=(6, M, K)).astype(np.float32)
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8 if K <= 256 else np.uint16)
    assignments = rng.integers(0, 4, size=n_items)
    scores = rng.normal(size=(6, 4)).astype(np.float32)
    ivf = InvertedLists(codes, assignments, 4)
    sums = tables[:, np.arange(M), codes].sum(-1)
    for n_probe in (1, 3):
        with config_context(working_memory=0.05):  # several chunks per query
            _, indices = ivf_search(tables, scores, ivf, 9, n_probe=n_probe)
        np.testing.assert_array_equal(
            indices, _restricted_reference(sums, assignments, scores, n_probe, 9)
        )


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_nearest_is_the_float64_argmin_even_near_ties(offset):
    # The float32 GEMM is only trusted where its winner is certain: points
    # on (or within rounding of) the bisector of two centroids, duplicated
    # centroids and far-off data still get exactly the float64 argmin.
    from skquant._product import encode_product

    rng = np.random.default_rng(0)
    C = (rng.normal(size=(40, 8)) + offset).astype(np.float32)
    C[7] = C[3]  # an exact tie: the lower index wins
    i, j = rng.integers(0, 40, size=(2, 3000))
    t = rng.choice([0.5, 0.5 + 1e-7, 0.5 - 1e-7, 0.3], size=3000)[:, None]
    X = np.r_[t * C[i] + (1 - t) * C[j], rng.normal(size=(1000, 8)) + offset, C[[3, 7]]]
    expected = np.argmin(coarse_scores(X, C), axis=1)
    np.testing.assert_array_equal(assign_lists(X, C), expected)
    np.testing.assert_array_equal(assign_lists(X, C, "inner_product"),
                                  np.argmin(coarse_scores(X, C, "inner_product"), axis=1))
    codebooks = C.reshape(40, 2, 4).transpose(1, 0, 2).copy()  # M=2, K=40, d=4
    norms = np.einsum("mkd,mkd->mk", codebooks, codebooks, dtype=np.float64)
    reference = np.stack([
        np.argmin(norms[m] - 2.0 * (X[:, 4 * m : 4 * m + 4] @ codebooks[m].T.astype(np.float64)),
                  axis=1)
        for m in range(2)
    ], axis=1)
    np.testing.assert_array_equal(encode_product(X, codebooks), reference)


@pytest.mark.parametrize("residual", [False, True])
def test_float32_values_do_not_depend_on_path(monkeypatch, residual):
    # Float tables: the scan sums an item's terms in one order whatever the
    # batch, the threads and the bounds, so the selected items and their
    # float32 values are bitwise the same as one query at a time.
    rng = np.random.default_rng(1)
    M, K, n_items, n_lists, n_queries = 8, 64, 4000, 12, 50
    tables = rng.normal(size=(n_queries, M, K)).astype(np.float32)
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8)
    assignments = rng.integers(0, n_lists, size=n_items)
    scores = rng.normal(size=(n_queries, n_lists))
    bias = rng.normal(size=n_items).astype(np.float32) if residual else None
    ivf = InvertedLists(codes, assignments, n_lists, item_bias=bias)
    kwargs = dict(n_probe=4, add_scores=residual, refine=False)
    batch = ivf_search(tables, scores, ivf, 10, **kwargs)
    one = [ivf_search(tables[q : q + 1], scores[q : q + 1], ivf, 10, **kwargs)
           for q in range(n_queries)]
    np.testing.assert_array_equal(batch[0], np.vstack([v for v, _ in one]))
    np.testing.assert_array_equal(batch[1], np.vstack([i for _, i in one]))
    # The expected float32 values: terms added left to right, then the terms.
    rows = np.arange(n_queries)[:, None]
    expected = tables[rows, 0, codes[batch[1], 0]]
    for m in range(1, M):
        expected = expected + tables[rows, m, codes[batch[1], m]]
    if residual:
        expected = expected + bias[batch[1]]
        expected = expected + scores.astype(np.float32)[rows, assignments[batch[1]]]
    np.testing.assert_array_equal(batch[0], expected)


def test_cells_skipped_by_their_lower_bound_change_no_result(monkeypatch):
    # Residual codes of clustered data: most probed cells are far from a
    # query and skipped by their lower bound, and most items of the others
    # by the bound after their first terms; the result is still exactly the
    # top-k by (float32 value, index) over all the probed cells, computed
    # here by brute force in the scan's order of additions.
    from skquant import _scan_loop

    rng = np.random.default_rng(3)
    # K * M > 256: flat table offsets beyond the codes' uint8 range.
    M, K, n_lists, n_queries, k = 4, 128, 20, 30, 5
    centres = rng.normal(scale=3.0, size=(n_lists, 8))
    cells = rng.integers(0, n_lists, size=3000)
    X = (centres[cells] + rng.normal(size=(3000, 8))).astype(np.float32)
    Q = (centres[rng.integers(0, n_lists, n_queries)]
         + rng.normal(size=(n_queries, 8))).astype(np.float32)
    pq = ProductQuantizer(n_codebooks=M, n_codewords=K, n_lists=n_lists, n_probe=n_lists,
                          random_state=0).fit(X)
    pq.index(X)
    index = pq.index_
    tables, scores = index._residual_query_tables(Q), index._coarse().scores(Q)
    lists = index.inverted_lists()
    saved = []
    original = _scan_loop.scan_loop

    def spy(n_columns):
        def scan(*args):
            skipped_cells, cut_items = original(n_columns)(*args)
            saved.append((skipped_cells, cut_items))
            return skipped_cells, cut_items
        return scan

    monkeypatch.setattr(_scan_loop, "scan_loop", spy)
    codes, bias = lists.codes, lists.item_bias.astype(np.float32)
    values = tables[:, 0, codes[:, 0]]
    for m in range(1, M):
        values = values + tables[:, m, codes[:, m]]
    values = values + bias
    values = values + scores.astype(np.float32)[:, lists.assignments]
    # The bound holds: no item of a cell is worth less than its bound (less
    # the slack), for every query and cell.
    lowest, largest = lists.bias_bounds
    for q in range(n_queries):
        table_min, _, table_abs = _scan_loop._table_stats(tables[q], 1)
        for c in range(n_lists):
            bound, slack = _scan_loop.cell_lower_bound(
                float(np.float32(scores[q, c])), lowest[c], largest[c], table_min,
                table_abs, M)
            assert bound - slack <= values[q, lists.assignments == c].min()
    for n_probe in (3, 18, n_lists):  # (18: past the compiled heap's range)
        probed = np.argsort(scores, axis=1, kind="stable")[:, :n_probe]
        masked = np.where(
            (lists.assignments[None, :, None] == probed[:, None, :]).any(-1), values, np.inf
        )
        expected = np.argsort(masked, axis=1, kind="stable")[:, :k]
        for batch in (Q, Q[:1]):
            saved.clear()
            got_v, got_i = ivf_search(tables[: len(batch)], scores[: len(batch)], lists,
                                      k, n_probe=n_probe, add_scores=True, refine=False)
            np.testing.assert_array_equal(got_i, expected[: len(batch)])
            np.testing.assert_array_equal(
                got_v, np.take_along_axis(values[: len(batch)], got_i, 1))
            assert sum(c for _, c in saved) > 0  # items were cut after a few terms
            if n_probe == n_lists:
                assert sum(s for s, _ in saved) > 0  # cells were skipped


def test_cell_lower_bound_is_tight_with_one_codeword():
    # With one codeword per codebook every item's table sum is the sum of
    # the tables' minima, so the bound is each cell's lowest item value (up
    # to the rounding slack): a bound too high by any margin fails here.
    from skquant._scan_loop import _table_stats, cell_lower_bound

    rng = np.random.default_rng(4)
    n_items, n_lists, n_queries, M = 500, 9, 6, 4
    codes = np.zeros((n_items, M), dtype=np.uint8)
    assignments = rng.integers(0, n_lists, size=n_items)
    bias = rng.normal(scale=10.0, size=n_items).astype(np.float32)
    lists = InvertedLists(codes, assignments, n_lists, item_bias=bias)
    tables = rng.normal(size=(n_queries, M, 1)).astype(np.float32)
    cell_bias = rng.normal(scale=10.0, size=(n_queries, n_lists)).astype(np.float32)
    lowest, largest = lists.bias_bounds
    values = tables.sum(axis=(1, 2), dtype=np.float64)[:, None] + bias + cell_bias[:, assignments]
    for q in range(n_queries):
        table_min, _, table_abs = _table_stats(tables[q], 1)
        for c in range(n_lists):
            bound, slack = cell_lower_bound(float(cell_bias[q, c]), lowest[c], largest[c],
                                            table_min, table_abs, M)
            assert abs(bound - values[q, assignments == c].min()) <= slack
            assert slack < 1e-3


@pytest.mark.parametrize("by_residual", [False, True])
def test_batches_split_between_threads(monkeypatch, by_residual):
    # With n_jobs threads, a batch's queries are searched in parts, one per
    # thread (tables, coarse scores, scan and exact distances each); one
    # query, or too little work, stays whole. Same results either way.
    from skquant import _index

    X, _ = make_blobs(n_samples=3000, n_features=8, centers=20, random_state=0)
    X = X.astype(np.float32)
    pq = ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=10, n_probe=3,
                          by_residual=by_residual, random_state=0).fit(X)
    parts = []
    original = _index._run_shards

    def spy(func, shards, args_of):
        parts.append(len(shards))
        return original(func, shards, args_of)

    monkeypatch.setattr(_index, "_run_shards", spy)
    monkeypatch.setattr(_index, "_MIN_PART_PAIRS", 1)
    expected = pq.kneighbors(X[:200], n_neighbors=5)
    got = pq.set_params(n_jobs=2).kneighbors(X[:200], n_neighbors=5)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    assert parts == [2]
    pq.kneighbors(X[:1], n_neighbors=5)
    monkeypatch.setattr(_index, "_MIN_PART_PAIRS", 10**9)
    pq.kneighbors(X[:200], n_neighbors=5)
    assert parts == [2]


def test_probes_are_the_best_cells_best_first():
    # Integer scores with many ties: each query's probes are n_probe best
    # cells, the best (lowest cell of the lowest score) first; the compiled
    # heap (up to 16 probes) gives them by (score, cell), numpy's selection
    # beyond it in any order after the best; short queries get more cells,
    # by (score, cell).
    from skquant._ivf import _HEAP_PROBES, _select_probes

    rng = np.random.default_rng(6)
    n_queries, n_lists = 40, 50
    scores = rng.integers(0, 8, size=(n_queries, n_lists)).astype(np.float64)
    sizes = rng.integers(0, 4, size=n_lists)
    ranked = np.argsort(scores, axis=1, kind="stable")
    for n_probe in (1, 2, 7, _HEAP_PROBES, _HEAP_PROBES + 1, n_lists):
        for k in (1, 25):
            starts, cells = _select_probes(scores, sizes, n_probe, k)
            for q in range(n_queries):
                got = cells[starts[q] : starts[q + 1]]
                needed = np.searchsorted(np.cumsum(sizes[ranked[q]]), k) + 1
                expected = ranked[q, : max(n_probe, min(needed, n_lists))]
                assert got[0] == expected[0] and len(got) == len(expected)
                rest = np.setdiff1d(np.arange(n_lists), got)
                # A best set (numpy's selection breaks ties at its edge its own way).
                assert not rest.size or scores[q, got].max() <= scores[q, rest].min()
                if n_probe <= _HEAP_PROBES or len(got) > n_probe:
                    np.testing.assert_array_equal(got, expected)
