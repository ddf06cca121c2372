"""The rest of the NearestNeighbors contract: y ignored by unsupervised
quantizers, scipy sparse X in every public method."""

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline

from skquant import ProductQuantizer, QuantizedKNeighborsTransformer


def test_unsupervised_fit_ignores_a_continuous_multioutput_y():
    rng = np.random.RandomState(0)
    X, y = rng.rand(30, 5), rng.rand(30, 2)
    pipe = make_pipeline(
        QuantizedKNeighborsTransformer(ProductQuantizer(1, 30), n_neighbors=5),
        KNeighborsRegressor(5, metric="precomputed"),
    ).fit(X, y)
    assert pipe.predict(X).shape == (30, 2)
    pq = ProductQuantizer(1, 30, random_state=0).fit(X, y)
    assert pq.database_labels_ is None  # not labels: not kept
    # Same model as without y.
    assert_array_equal(pq.codes_, ProductQuantizer(1, 30, random_state=0).fit(X).codes_)
    # Class labels are kept for score; index() still checks what it stores.
    labels = np.arange(30) % 3
    assert_array_equal(ProductQuantizer(1, 30).fit(X, labels).database_labels_, labels)
    with pytest.raises(ValueError, match="0/1"):
        pq.index(X, y)


@pytest.fixture(scope="module")
def digits_sparse():
    X, y = load_digits(return_X_y=True)
    X = X * (X > 8)  # mostly zeros
    return X[:500], y[:500], X[500:600]


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("rotation", [False, True])
def test_product_quantizer_sparse_equals_dense(digits_sparse, fmt, rotation):
    X, y, Q = digits_sparse
    dense = ProductQuantizer(4, 16, rotation=rotation, random_state=0).fit(X, y)
    Xs, Qs = sp.csr_matrix(X).asformat(fmt), sp.csr_matrix(Q).asformat(fmt)
    sparse = ProductQuantizer(4, 16, rotation=rotation, random_state=0).fit(Xs, y)
    # Same model up to k-means on CSR vs dense rounding: compare through the
    # sparse-fitted model only, dense and sparse inputs alike.
    assert_array_equal(sparse.encode(Qs), sparse.encode(Q))
    assert_allclose(sparse.transform(Qs), Q)
    for a, b in zip(sparse.kneighbors(Qs, 5), sparse.kneighbors(Q, 5), strict=True):
        assert_array_equal(a, b)
    sparse.index(Xs, y).add(Qs, np.zeros(len(Q), int))
    assert sparse.n_samples_fit_ == len(X) + len(Q)
    assert sparse.score(Qs, np.zeros(len(Q), int)) == pytest.approx(
        sparse.score(Q, np.zeros(len(Q), int))
    )
    graph = sparse.kneighbors_graph(Qs, 3)
    assert graph.shape == (len(Q), sparse.n_samples_fit_)
    if not rotation:
        # k-means on CSR blocks finds the dense model's codebooks here.
        assert_allclose(sparse.codebooks_, dense.codebooks_, rtol=1e-5, atol=1e-5)


def test_transformer_sparse_equals_dense(digits_sparse):
    X, y, Q = digits_sparse
    est = QuantizedKNeighborsTransformer(ProductQuantizer(4, 16, random_state=0))
    g_dense = est.fit(X).transform(Q)
    g_sparse = est.transform(sp.csr_matrix(Q))
    assert_allclose(g_sparse.toarray(), g_dense.toarray())
    assert_allclose(est.fit_transform(sp.csr_matrix(X)).toarray(),
                    est.fit_transform(X).toarray())


def test_sparse_nan_and_overflow_are_named():
    X = sp.csr_matrix(np.eye(20))
    X.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ProductQuantizer(2, 4).fit(X)
    X.data[0] = 1e300
    with pytest.raises(ValueError, match="float32 range"):
        ProductQuantizer(2, 4).fit(X)


def test_verbose_reports_progress_of_long_encodes_and_rankings(capsys):
    from sklearn import config_context

    X, y = load_digits(return_X_y=True)
    pq = ProductQuantizer(4, 16, random_state=0, verbose=2).fit(X[:300], y[:300])
    capsys.readouterr()
    with config_context(working_memory=0.05):  # many small chunks
        pq.index(X, y)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) > 2
        assert lines[-1].startswith(f"[ProductQuantizer] encoded {len(X)}/{len(X)} items")
        assert all("elapsed" in ln and "left ~" in ln for ln in lines)
        pq.score(X[:200], y[:200])
        out = capsys.readouterr().out
        assert "ranked the database for 200/200 items" in out
    pq.set_params(verbose=0).index(X, y)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["DQN", "DSQ"])
def test_deep_estimators_never_densify_sparse_data_whole(name, monkeypatch):
    # A TF-IDF-like matrix: every densification is of one mini-batch or one
    # bounded inference batch, never of the whole training set.
    from skquant import DeepQuantizer, SphericalQuantizer

    rng = np.random.RandomState(0)
    n, d = 600, 3000
    y = rng.randint(0, 3, n)
    X = sp.random(n, d, density=0.01, format="csr", random_state=0)
    X = X + sp.csr_matrix((np.ones(n), (np.arange(n), y)), shape=(n, d))  # signal
    densified = []
    original = sp.csr_matrix.toarray

    def recording_toarray(self, *args, **kwargs):
        densified.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", recording_toarray)
    cls = DeepQuantizer if name == "DQN" else SphericalQuantizer
    est = cls(n_codewords=16, max_iter=3, batch_size=32, random_state=0,
              device="cpu").fit(X, y)
    assert densified and max(densified) <= 256 < n
    assert est.score(X[:60], y[:60]) > 0.5
