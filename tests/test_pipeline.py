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
