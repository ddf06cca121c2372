"""QuantizedKNeighborsTransformer: graph conventions and the precomputed consumers."""

import numpy as np
import pytest
from scipy.sparse import issparse
from sklearn.cluster import DBSCAN, SpectralClustering
from sklearn.datasets import load_digits, make_blobs
from sklearn.manifold import TSNE, Isomap, trustworthiness
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import (
    KNeighborsClassifier,
    KNeighborsTransformer,
    LocalOutlierFactor,
)
from sklearn.pipeline import make_pipeline

from skquant import DeepQuantizer, ProductQuantizer, QuantizedKNeighborsTransformer
from skquant.neighbors import row_fingerprints


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X, y


def _pq(**kwargs):
    params = dict(n_codebooks=8, n_codewords=32, random_state=0)
    params.update(kwargs)
    return ProductQuantizer(**params)


def _brute_force_aqd(quantizer, X):
    """Euclidean AQD of X to every indexed item: exact query, decoded database."""
    database = quantizer.decode(quantizer.codes_).astype(np.float64)
    # decode() un-rotates OPQ reconstructions; the AQD is rotation invariant.
    Z = np.asarray(X, dtype=np.float64)
    sq = (Z**2).sum(1)[:, None] - 2 * Z @ database.T + (database**2).sum(1)[None, :]
    return np.sqrt(np.maximum(sq, 0.0))


def _check_graph_rows(graph, n_entries):
    assert issparse(graph) and graph.format == "csr"
    assert np.all(np.diff(graph.indptr) == n_entries)
    data = graph.data.reshape(-1, n_entries)
    assert np.all(data >= 0)
    assert np.all(np.diff(data, axis=1) >= 0), "rows must be sorted by distance"
    indices = graph.indices.reshape(-1, n_entries)
    assert all(len(np.unique(row)) == n_entries for row in indices)


# ----------------------------------------------------------------- graph contract
@pytest.mark.parametrize("rotation", [False, True])
def test_training_graph_matches_brute_force(digits, rotation):
    X, _ = digits
    X = X[:600]
    k = 6
    pq = _pq(rotation=rotation, n_rotation_iter=3)
    transformer = QuantizedKNeighborsTransformer(pq, n_neighbors=k)
    graph = transformer.fit_transform(X)
    assert graph.shape == (len(X), len(X))
    _check_graph_rows(graph, k + 1)

    # The diagonal is explicit and exactly 0, and comes first in each row.
    indices = graph.indices.reshape(len(X), k + 1)
    data = graph.data.reshape(len(X), k + 1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(len(X)))
    np.testing.assert_array_equal(data[:, 0], 0.0)

    # The other entries: the k nearest *other* items by AQD, brute force.
    aqd = _brute_force_aqd(transformer.quantizer_, X)
    np.fill_diagonal(aqd, np.inf)
    expected = np.sort(aqd, axis=1)[:, :k]
    np.testing.assert_allclose(data[:, 1:], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        np.take_along_axis(aqd, indices[:, 1:], axis=1), data[:, 1:], rtol=1e-5, atol=1e-4
    )


def test_fit_transform_equals_fit_then_transform(digits):
    X, _ = digits
    X = X[:400]
    est = QuantizedKNeighborsTransformer(_pq(), n_neighbors=4)
    g1 = est.fit_transform(X)
    g2 = est.fit(X).transform(X)
    assert (g1 != g2).nnz == 0
    np.testing.assert_array_equal(g1.indices, g2.indices)
    # float32 input of the same values is the same data.
    g3 = est.transform(X.astype(np.float32))
    np.testing.assert_array_equal(g3.indices, g1.indices)
    np.testing.assert_array_equal(g3.diagonal(), 0.0)


def test_new_queries_match_quantizer_graph(digits):
    X, _ = digits
    train, test = X[:800], X[800:1000]
    est = QuantizedKNeighborsTransformer(_pq(), n_neighbors=5).fit(train)
    graph = est.transform(test)
    expected = est.quantizer_.kneighbors_graph(test, n_neighbors=6, mode="distance")
    assert graph.shape == (200, 800)
    _check_graph_rows(graph, 6)
    np.testing.assert_array_equal(graph.indices, expected.indices)
    np.testing.assert_allclose(graph.data, expected.data)

    conn = est.set_params(mode="connectivity").transform(test)
    _check_graph_rows(conn, 5)
    np.testing.assert_array_equal(conn.data, 1.0)
    np.testing.assert_array_equal(
        conn.indices.reshape(-1, 5), graph.indices.reshape(-1, 6)[:, :5]
    )


def test_connectivity_training_graph_includes_self(digits):
    X, _ = digits
    X = X[:300]
    graph = QuantizedKNeighborsTransformer(
        _pq(), n_neighbors=3, mode="connectivity"
    ).fit_transform(X)
    _check_graph_rows(graph, 3)
    np.testing.assert_array_equal(graph.diagonal(), 1.0)


def test_query_equal_to_an_indexed_row_gets_distance_zero(digits):
    X, _ = digits
    train, test = X[:500], X[500:520].copy()
    test[[3, 7]] = train[[42, 300]]
    graph = QuantizedKNeighborsTransformer(_pq(), n_neighbors=4).fit(train).transform(test)
    for row, own in [(3, 42), (7, 300)]:
        assert graph.indices[graph.indptr[row]] == own
        assert graph.data[graph.indptr[row]] == 0.0
    # Rows without a copy are untouched: no zero distances there.
    others = np.setdiff1d(np.arange(20), [3, 7])
    assert np.all(graph[others].data > 0)


def test_duplicated_training_rows_are_all_at_distance_zero():
    X, _ = make_blobs(n_samples=60, n_features=4, random_state=0)
    X = np.vstack([X, X[:5], X[:5]])  # rows i, 60 + i and 65 + i are equal
    graph = QuantizedKNeighborsTransformer(
        _pq(n_codebooks=2, n_codewords=8), n_neighbors=3
    ).fit_transform(X)
    _check_graph_rows(graph, 4)
    for i in range(5):
        copies = [i, 60 + i, 65 + i]
        for row in copies:
            start = graph.indptr[row]
            np.testing.assert_array_equal(graph.indices[start : start + 3], copies)
            np.testing.assert_array_equal(graph.data[start : start + 3], 0.0)


def test_row_fingerprints():
    rng = np.random.RandomState(0)
    X = rng.randn(1000, 7)
    f = row_fingerprints(X)
    assert f.dtype == np.uint64 and len(np.unique(f)) == 1000
    np.testing.assert_array_equal(row_fingerprints(X[::-1]), f[::-1])
    # Column order matters; -0.0 equals 0.0; float32 rows equal their float64 cast.
    assert row_fingerprints(X[:1, ::-1])[0] != f[0]
    zero = np.zeros((1, 3))
    assert row_fingerprints(zero)[0] == row_fingerprints(-zero)[0]
    X32 = X.astype(np.float32)
    np.testing.assert_array_equal(row_fingerprints(X32), row_fingerprints(X32.astype(float)))


def test_too_many_neighbors_raises(digits):
    X, _ = digits
    est = QuantizedKNeighborsTransformer(_pq(n_codebooks=2, n_codewords=4), n_neighbors=10)
    with pytest.raises(ValueError, match="n_neighbors"):
        est.fit_transform(X[:10])


def test_quantizer_params_are_nested_and_clone_is_kept(digits):
    X, _ = digits
    pq = _pq()
    est = QuantizedKNeighborsTransformer(pq)
    assert est.get_params()["quantizer__n_codebooks"] == 8
    est.set_params(quantizer__n_codebooks=4).fit(X[:300])
    assert est.quantizer_.n_codebooks == 4 and est.quantizer_ is not pq
    assert not hasattr(pq, "codes_")
    names = est.get_feature_names_out()
    assert len(names) == 300 and names[0] == "quantizedkneighborstransformer0"


# ----------------------------------------------------------------- consumers
def test_kneighbors_classifier_precomputed(digits):
    X, y = digits
    Xtr, ytr, Xte, yte = X[:1300], y[:1300], X[1300:], y[1300:]
    model = make_pipeline(
        QuantizedKNeighborsTransformer(_pq(), n_neighbors=5),
        KNeighborsClassifier(n_neighbors=5, metric="precomputed"),
    ).fit(Xtr, ytr)
    exact = KNeighborsClassifier(n_neighbors=5).fit(Xtr, ytr).score(Xte, yte)
    quantized = model.score(Xte, yte)
    assert quantized > exact - 0.05, (quantized, exact)
    # The classifier votes over the same neighbors as the quantizer finds.
    ind = model[0].quantizer_.kneighbors(Xte, n_neighbors=5, return_distance=False)
    votes = np.array([np.bincount(row, minlength=10).argmax() for row in ytr[ind]])
    np.testing.assert_array_equal(model.predict(Xte), votes)


def test_kneighbors_classifier_with_deep_quantizer(digits):
    X, y = digits
    Xtr, ytr, Xte, yte = X[:1200], y[:1200], X[1200:], y[1200:]
    dqn = DeepQuantizer(
        n_codebooks=2, n_codewords=16, embedding_dim=16, hidden_layer_sizes=(64,),
        # 6 epochs only: learning_rate=3e-3 (the default 1e-3 is chosen for
        # the default 60 epochs; here it scores 0.71).
        max_iter=6, warmup_epochs=2, learning_rate=3e-3, device="cpu",
        random_state=0,
    )
    model = make_pipeline(
        QuantizedKNeighborsTransformer(dqn, n_neighbors=10),
        KNeighborsClassifier(n_neighbors=10, metric="precomputed"),
    ).fit(Xtr, ytr)
    assert model[0].__sklearn_tags__().target_tags.required
    # Chance is 0.1; a supervised embedding is far above it after a few epochs.
    assert model.score(Xte, yte) > 0.8


def test_isomap_precomputed(digits):
    X, _ = digits
    X = X[:500]
    k = 10
    emb = make_pipeline(
        QuantizedKNeighborsTransformer(_pq(), n_neighbors=k),
        Isomap(n_neighbors=k, n_components=2, metric="precomputed"),
    ).fit_transform(X)
    exact = make_pipeline(
        KNeighborsTransformer(n_neighbors=k),
        Isomap(n_neighbors=k, n_components=2, metric="precomputed"),
    ).fit_transform(X)
    assert emb.shape == (500, 2) and np.isfinite(emb).all()
    t_quant = trustworthiness(X, emb, n_neighbors=5)
    t_exact = trustworthiness(X, exact, n_neighbors=5)
    assert t_quant > t_exact - 0.05, (t_quant, t_exact)


def test_tsne_precomputed(digits):
    X, _ = digits
    X = X[:400]
    perplexity = 5
    emb = make_pipeline(
        QuantizedKNeighborsTransformer(_pq(), n_neighbors=3 * perplexity + 1),
        TSNE(
            metric="precomputed", perplexity=perplexity, init="random",
            max_iter=250, random_state=0,
        ),
    ).fit_transform(X)
    assert emb.shape == (400, 2)
    # A random 2-D layout scores ~0.5; t-SNE on a sensible graph far more.
    assert trustworthiness(X, emb, n_neighbors=5) > 0.85


def test_dbscan_precomputed():
    X, y = make_blobs(n_samples=300, centers=3, n_features=8, cluster_std=0.5, random_state=0)
    labels = make_pipeline(
        QuantizedKNeighborsTransformer(_pq(n_codebooks=4, n_codewords=32), n_neighbors=10),
        DBSCAN(eps=3.0, min_samples=5, metric="precomputed"),
    ).fit_predict(X)
    assert adjusted_rand_score(y, labels) > 0.95


# Three well-separated blobs: the 10-NN graph has one component per blob.
@pytest.mark.filterwarnings("ignore:Graph is not fully connected:UserWarning")
def test_spectral_clustering_precomputed_nearest_neighbors():
    X, y = make_blobs(n_samples=300, centers=3, n_features=8, cluster_std=0.8, random_state=1)
    model = make_pipeline(
        QuantizedKNeighborsTransformer(
            _pq(n_codebooks=4, n_codewords=32), n_neighbors=10, mode="connectivity"
        ),
        SpectralClustering(
            n_clusters=3, affinity="precomputed_nearest_neighbors", n_neighbors=10,
            random_state=0,
        ),
    )
    labels = model.fit_predict(X)
    assert adjusted_rand_score(y, labels) > 0.95


def test_local_outlier_factor_precomputed():
    X, _ = make_blobs(n_samples=200, centers=2, n_features=8, cluster_std=0.5, random_state=0)
    outliers = np.full((5, 8), 25.0) + np.arange(5)[:, None]
    X = np.vstack([X, outliers])
    pred = make_pipeline(
        QuantizedKNeighborsTransformer(_pq(n_codebooks=4, n_codewords=16), n_neighbors=10),
        LocalOutlierFactor(n_neighbors=10, metric="precomputed", contamination=5 / 205),
    ).fit_predict(X)
    np.testing.assert_array_equal(np.flatnonzero(pred == -1), np.arange(200, 205))
