"""BaseQuantizer behaviour, through ProductQuantizer: NearestNeighbors semantics,
the index, codes, scoring, persistence."""

import pickle

import numpy as np
import pytest
from sklearn import config_context
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import NearestNeighbors

from skquant import ProductQuantizer
from skquant.metrics import mean_average_precision


@pytest.fixture(scope="module")
def digits():
    return load_digits(return_X_y=True)


@pytest.fixture(scope="module")
def fitted(digits):
    X, y = digits
    return ProductQuantizer(n_codebooks=8, n_codewords=32, random_state=0).fit(X, y)


def _brute_force(pq, queries):
    """AQD computed directly: squared distance to each decoded database item."""
    decoded = pq.decode(pq.codes_).astype(np.float64)
    d2 = ((queries[:, None, :] - decoded[None]) ** 2).sum(-1)
    return np.sqrt(d2)


def test_kneighbors_equals_brute_force_on_decoded(digits, fitted):
    X, _ = digits
    queries = X[:50]
    dist, ind = fitted.kneighbors(queries, n_neighbors=10)
    exact = _brute_force(fitted, queries)
    ref = np.argsort(exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(dist, np.take_along_axis(exact, ref, 1), rtol=1e-4)
    assert np.mean(ind == ref) > 0.99
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_x_none_excludes_self_and_matches_reconstruction_queries(fitted):
    ind_all = fitted.kneighbors(fitted.decode(fitted.codes_), n_neighbors=6,
                                return_distance=False)
    ind = fitted.kneighbors(n_neighbors=5, return_distance=False)
    n = fitted.n_samples_fit_
    assert ind.shape == (n, 5)
    assert not np.any(ind == np.arange(n)[:, None])
    # Removing self from the k+1 list of the reconstruction queries gives the same rows.
    for i in range(0, n, 97):
        expected = [j for j in ind_all[i] if j != i][:5]
        np.testing.assert_array_equal(ind[i], expected)


def test_duplicates_corner_case():
    # Three identical items. Item 2's k+1 list is [0, 1] (ties by lower index)
    # and does not contain itself: its nearest other item is 0, as in sklearn.
    X = np.array([[0.0, 0.0]] * 3 + [[5.0, 5.0], [9.0, 1.0], [3.0, 7.0]])
    pq = ProductQuantizer(n_codebooks=1, n_codewords=6, random_state=0).fit(X)
    ind = pq.kneighbors(n_neighbors=1, return_distance=False)
    expected = NearestNeighbors(n_neighbors=1).fit(X).kneighbors(return_distance=False)
    np.testing.assert_array_equal(ind, expected)
    np.testing.assert_array_equal(ind[:3, 0], [1, 0, 0])
    ind2 = pq.kneighbors(n_neighbors=2, return_distance=False)
    np.testing.assert_array_equal(ind2[:3], [[1, 2], [0, 2], [0, 1]])


def test_kneighbors_errors_match_sklearn(fitted, digits):
    X, _ = digits
    n = fitted.n_samples_fit_
    with pytest.raises(ValueError, match="Expected n_neighbors > 0. Got 0"):
        fitted.kneighbors(X[:1], n_neighbors=0)
    with pytest.raises(TypeError, match="n_neighbors does not take"):
        fitted.kneighbors(X[:1], n_neighbors=2.5)
    with pytest.raises(ValueError, match="Expected n_neighbors <= n_samples_fit"):
        fitted.kneighbors(X[:1], n_neighbors=n + 1)
    with pytest.raises(ValueError, match="Expected n_neighbors < n_samples_fit"):
        fitted.kneighbors(n_neighbors=n)
    with pytest.raises(ValueError, match="features"):
        fitted.kneighbors(X[:1, :10])
    with pytest.raises(NotFittedError):
        ProductQuantizer().kneighbors(X[:1])


def test_kneighbors_whole_database_and_graph(fitted, digits):
    X, _ = digits
    n = fitted.n_samples_fit_
    dist, ind = fitted.kneighbors(X[:3], n_neighbors=n)
    for row in ind:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    graph = fitted.kneighbors_graph(X[:4], n_neighbors=3, mode="distance")
    assert graph.shape == (4, n)
    assert np.all(graph.getnnz(axis=1) == 3)
    d, i = fitted.kneighbors(X[:4], n_neighbors=3)
    np.testing.assert_allclose(graph[0, i[0]].toarray().ravel(), d[0])


def test_chunking_and_jobs_do_not_change_results(fitted, digits):
    X, _ = digits
    dist, ind = fitted.kneighbors(X[:100], n_neighbors=8)
    with config_context(working_memory=0.01):
        fitted.set_params(n_jobs=2)
        try:
            dist2, ind2 = fitted.kneighbors(X[:100], n_neighbors=8)
        finally:
            fitted.set_params(n_jobs=None)
    np.testing.assert_array_equal(ind, ind2)
    np.testing.assert_allclose(dist, dist2)


def test_index_and_add(digits):
    X, y = digits
    pq = ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0).fit(X[:500], y[:500])
    codes_first = pq.codes_.copy()
    assert pq.index(X[500:800], y[500:800]) is pq
    assert pq.n_samples_fit_ == 300
    np.testing.assert_array_equal(pq.codes_, pq.encode(X[500:800]))
    pq.add(X[800:900], y[800:900])
    assert pq.n_samples_fit_ == 400
    np.testing.assert_array_equal(pq.codes_[300:], pq.encode(X[800:900]))
    np.testing.assert_array_equal(pq.database_labels_, y[500:900])
    # The codebooks did not change: re-indexing the training part gives the same codes.
    np.testing.assert_array_equal(pq.index(X[:500]).codes_, codes_first)
    with pytest.raises(ValueError, match="without labels"):
        pq.add(X[:2], y[:2])
    pq.index(X[:10], y[:10])
    with pytest.raises(ValueError, match="needs y"):
        pq.add(X[:2])


def test_transform_encode_decode(fitted, digits):
    X, _ = digits
    Z = fitted.transform(X[:5])
    assert Z.dtype == np.float32 and Z.shape == (5, 64)
    codes = fitted.encode(X[:5])
    assert codes.dtype == np.uint8 and codes.shape == (5, 8)
    recon = fitted.decode(codes)
    assert recon.shape == (5, 64)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 31\]"):
        fitted.decode(np.full((1, 8), 32))
    with pytest.raises(ValueError, match="shape"):
        fitted.decode(np.zeros((1, 7), dtype=np.uint8))
    names = fitted.get_feature_names_out()
    assert names[0] == "productquantizer0" and len(names) == 64


def test_score_is_map_of_full_ranking(fitted, digits):
    X, y = digits
    ranking = fitted.kneighbors(X[:60], n_neighbors=fitted.n_samples_fit_,
                                return_distance=False)
    expected = mean_average_precision(y[:60], fitted.database_labels_, ranking)
    assert fitted.score(X[:60], y[:60]) == pytest.approx(expected)
    unlabeled = ProductQuantizer(4, 16, random_state=0).fit(X)
    with pytest.raises(ValueError, match="without labels"):
        unlabeled.score(X[:5], y[:5])


def test_multilabel_database_labels(digits):
    X, y = digits
    Y = np.zeros((len(y), 3), dtype=int)
    Y[np.arange(len(y)), y % 3] = 1
    Y[:, 2] |= (y > 7).astype(int)
    pq = ProductQuantizer(4, 16, random_state=0).fit(X, Y)
    assert pq.database_labels_.shape == (len(y), 3)
    assert 0 < pq.score(X[:30], Y[:30]) <= 1
    # fit ignores a y that is no labels (as NearestNeighbors.fit); index()
    # stores labels and checks them.
    assert ProductQuantizer(4, 16).fit(X, np.full((len(y), 2), 3)).database_labels_ is None
    with pytest.raises(ValueError, match="indicator"):
        pq.index(X, np.full((len(y), 2), 3))
    with pytest.raises(ValueError, match="must match"):
        pq.index(X, y[:-1])


def test_pickle_round_trip_is_exact(fitted, digits):
    X, _ = digits
    clone = pickle.loads(pickle.dumps(fitted))
    d1, i1 = fitted.kneighbors(X[:20])
    d2, i2 = clone.kneighbors(X[:20])
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    assert clone.codes_.flags.f_contiguous


def test_inner_product_distances_via_additive_layout(digits):
    # The base's inner-product path: 1 - <z, x̂>, clipped at 0, ranked by the
    # largest inner product.
    X, _ = digits
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    pq = ProductQuantizer(4, 16, random_state=0).fit(X)
    pq.quantizer_.metric = "inner_product"  # instance-level switch, for this test only
    dist, ind = pq.kneighbors(X[:10], n_neighbors=5)
    scores = X[:10] @ pq.decode(pq.codes_).T
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert np.mean(ind == ref) > 0.95
    np.testing.assert_allclose(
        dist, np.maximum(1 - np.take_along_axis(scores, ind, 1), 0), atol=1e-5
    )
