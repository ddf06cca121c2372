"""QuantizerPipeline: a tuned pipeline serves queries like its quantizer."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from skquant import DeepQuantizer, ProductQuantizer
from skquant.pipeline import QuantizerPipeline, make_quantizer_pipeline


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600], y[:600], X[600:1000], y[600:1000], X[1000:1050]


def _by_hand(pipe, X_db, y_db, Q):
    """What serving meant before: take the pipeline apart."""
    prep, quantizer = pipe[:-1], clone(pipe[-1])
    quantizer.__dict__.update(pipe[-1].__dict__)  # same fitted model
    quantizer.index(prep.transform(X_db), y_db)
    return quantizer, prep.transform(Q)


def test_grid_search_best_estimator_serves(digits):
    X, y, X_db, y_db, Q = digits
    pipe = make_quantizer_pipeline(
        MinMaxScaler(), ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0)
    )
    search = GridSearchCV(
        pipe, {"productquantizer__n_codewords": [8, 16]}, cv=2
    ).fit(X, y)
    best = search.best_estimator_
    assert isinstance(best, QuantizerPipeline)
    assert best.index(X_db, y_db) is best
    dist, ind = best.kneighbors(Q, n_neighbors=7)

    quantizer, Qt = _by_hand(best, X_db, y_db, Q)
    ref_dist, ref_ind = quantizer.kneighbors(Qt, n_neighbors=7)
    assert_array_equal(ind, ref_ind)
    assert_allclose(dist, ref_dist)
    assert_array_equal(best.encode(Q), quantizer.encode(Qt))
    assert_allclose(best.decode(best.encode(Q)), quantizer.decode(quantizer.encode(Qt)))
    assert best.score(Q, np.zeros(len(Q))) == pytest.approx(
        quantizer.score(Qt, np.zeros(len(Q)))
    )
    graph = best.kneighbors_graph(Q, n_neighbors=3, mode="distance")
    assert graph.shape == (len(Q), len(X_db)) and graph.nnz == 3 * len(Q)


def test_add_and_database_self_query(digits):
    X, y, X_db, y_db, Q = digits
    pipe = make_quantizer_pipeline(
        StandardScaler(), ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0)
    ).fit(X, y)
    pipe.index(X_db[:200], y_db[:200]).add(X_db[200:], y_db[200:])
    assert pipe[-1].n_samples_fit_ == len(X_db)
    ind = pipe.kneighbors(n_neighbors=3, return_distance=False)
    assert ind.shape == (len(X_db), 3)
    assert not (ind == np.arange(len(X_db))[:, None]).any()  # X=None: no self


def test_wrapping_a_fitted_plain_pipeline_refits_nothing(digits):
    X, y, X_db, y_db, Q = digits
    plain = make_pipeline(
        MinMaxScaler(),
        DeepQuantizer(n_codebooks=2, n_codewords=8, max_iter=2, random_state=0),
    ).fit(X, y)
    codebooks = plain[-1].codebooks_.copy()
    served = QuantizerPipeline(plain.steps).index(X_db, y_db)
    assert served[-1] is plain[-1]
    assert_array_equal(served[-1].codebooks_, codebooks)
    assert served.kneighbors(Q, n_neighbors=2)[1].shape == (len(Q), 2)


def test_single_step_and_wrong_last_step(digits):
    X, y, X_db, y_db, Q = digits
    pipe = QuantizerPipeline(
        [("pq", ProductQuantizer(n_codebooks=2, n_codewords=8, random_state=0))]
    ).fit(X, y)
    assert_array_equal(pipe.kneighbors(Q)[1], pipe[-1].kneighbors(Q)[1])
    bad = make_quantizer_pipeline(StandardScaler(), MinMaxScaler()).fit(X)
    with pytest.raises(TypeError, match="MinMaxScaler, has no kneighbors"):
        bad.kneighbors(Q)


def test_supervised_embedding_with_residual_inverted_file():
    # The composition benchmarks/bench_supervised_ivf.py recommends for a
    # million-item database: a supervised estimator's embedding, quantized
    # by ProductQuantizer's residual inverted file. Through the pipeline it
    # searches exactly as the two estimators used by hand.
    from skquant import SphericalQuantizer

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16
    X_fit, y_fit, X_db, y_db, X_q = X[:900], y[:900], X[900:1700], y[900:1700], X[1700:1730]

    def make():
        return (SphericalQuantizer(n_codebooks=2, n_codewords=16, max_iter=3, random_state=0),
                ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=8, n_probe=2,
                                 random_state=0))

    pipe = make_quantizer_pipeline(*make()).fit(X_fit, y_fit).index(X_db, y_db)
    dsq, pq = make()
    dsq.fit(X_fit, y_fit)
    pq.fit(dsq.transform(X_fit), y_fit).index(dsq.transform(X_db), y_db)
    assert pq.index_.by_residual
    dist, ind = pipe.kneighbors(X_q, n_neighbors=5)
    dist_ref, ind_ref = pq.kneighbors(dsq.transform(X_q), n_neighbors=5)
    assert_array_equal(ind, ind_ref)
    assert_array_equal(dist, dist_ref)
    assert pipe.score(X_q, y[1700:1730]) == pq.score(dsq.transform(X_q), y[1700:1730])
