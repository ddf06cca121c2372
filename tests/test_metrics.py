"""Tests of skquant.metrics: retrieval metrics against loop references."""

import pickle
import tracemalloc
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn import config_context
from sklearn.base import BaseEstimator
from sklearn.datasets import make_blobs
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV

from skquant.metrics import (
    _ranking,
    make_retrieval_scorer,
    map_scorer,
    mean_average_precision,
    precision_at_k,
    retrieval_precision_recall_curve,
)
from skquant.metrics._ranking import _average_precision_per_query
from skquant.metrics._scorer import _score_estimator

# A budget so small that every chunk holds a single query.
TINY_MEMORY = 1e-6


# ---------------------------------------------------------------------------
# Straightforward loop references
# ---------------------------------------------------------------------------


def _is_relevant(label_q, label_d):
    if np.ndim(label_q) == 0:
        return label_q == label_d
    return bool(np.any(np.logical_and(label_q, label_d)))


def _ref_ap(y_query, y_database, ranking, top_k=None):
    """Per-query AP@top_k normalised by the hits in the top_k (None: no hit)."""
    aps = []
    for i, row in enumerate(ranking):
        hits, total = 0, 0.0
        for r, j in enumerate(row[:top_k], start=1):
            if _is_relevant(y_query[i], y_database[j]):
                hits += 1
                total += hits / r
        aps.append(total / hits if hits else None)
    return aps


def _ref_map(y_query, y_database, ranking, top_k=None, no_relevant="zero"):
    aps = _ref_ap(y_query, y_database, ranking, top_k)
    if no_relevant == "zero":
        return np.mean([0.0 if ap is None else ap for ap in aps])
    return np.mean([ap for ap in aps if ap is not None])


def _ref_precision_at_k(y_query, y_database, ranking, k):
    return np.mean(
        [
            sum(_is_relevant(y_query[i], y_database[j]) for j in row[:k]) / k
            for i, row in enumerate(ranking)
        ]
    )


def _ref_curve(y_query, y_database, ranking):
    n_ranked = ranking.shape[1]
    precision = np.zeros(n_ranked)
    recall = np.zeros(n_ranked)
    n_recall = 0
    for i, row in enumerate(ranking):
        n_rel_db = sum(_is_relevant(y_query[i], yd) for yd in y_database)
        n_recall += n_rel_db > 0
        hits = 0
        for r, j in enumerate(row, start=1):
            hits += _is_relevant(y_query[i], y_database[j])
            precision[r - 1] += hits / r
            if n_rel_db:
                recall[r - 1] += hits / n_rel_db
    return precision / len(ranking), recall / n_recall


def _make_data(multilabel, n_queries=15, n_database=40, n_ranked=None, seed=0):
    rng = np.random.RandomState(seed)
    if multilabel:
        # Sparse enough that some items and queries have no label at all.
        y_query = (rng.rand(n_queries, 5) < 0.2).astype(int)
        y_database = (rng.rand(n_database, 5) < 0.2).astype(int)
    else:
        y_query = rng.randint(5, size=n_queries)
        y_database = rng.randint(4, size=n_database)  # label 4: never relevant
    ranking = np.argsort(rng.rand(n_queries, n_database), axis=1)
    return y_query, y_database, ranking[:, :n_ranked]


class BruteForceIndex(BaseEstimator):
    """Minimal search estimator: exact Euclidean kneighbors of a noisy database."""

    def __init__(self, noise=0.0):
        self.noise = noise

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        rng = np.random.RandomState(0)
        self.database_ = X + self.noise * rng.standard_normal(X.shape)
        self.database_labels_ = None if y is None else np.asarray(y)
        self.n_samples_fit_ = X.shape[0]
        self.n_kneighbors_calls_ = 0
        return self

    def kneighbors(self, X, n_neighbors, return_distance=True):
        self.n_kneighbors_calls_ += 1
        X = np.asarray(X, dtype=float)
        dist = ((X[:, None, :] - self.database_[None, :, :]) ** 2).sum(axis=-1)
        ind = np.argsort(dist, axis=1, kind="stable")[:, :n_neighbors]
        assert not return_distance
        return ind


# ---------------------------------------------------------------------------
# mean_average_precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("top_k", [None, 1, 7, 30])
@pytest.mark.parametrize("no_relevant", ["zero", "skip"])
def test_map_matches_loop_reference(multilabel, top_k, no_relevant):
    y_query, y_database, ranking = _make_data(multilabel, n_ranked=30)
    expected = _ref_map(y_query, y_database, ranking, top_k, no_relevant)
    got = mean_average_precision(
        y_query, y_database, ranking, top_k=top_k, no_relevant=no_relevant
    )
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("multilabel", [False, True])
def test_per_query_ap_nan_for_no_relevant(multilabel):
    y_query, y_database, ranking = _make_data(multilabel)
    ref = _ref_ap(y_query, y_database, ranking, top_k=5)
    got = _average_precision_per_query(y_query, y_database, ranking, top_k=5)
    assert any(ap is None for ap in ref)  # the case is exercised
    assert_array_equal(np.isnan(got), [ap is None for ap in ref])
    assert_allclose(got[~np.isnan(got)], [ap for ap in ref if ap is not None])


@pytest.mark.parametrize("multilabel", [False, True])
def test_map_whole_database_equals_sklearn_average_precision(multilabel):
    # With the ranking covering the database, the top-R normalisation is the
    # classic AP: compare with sklearn's, scoring items by minus their rank.
    y_query, y_database, ranking = _make_data(multilabel)
    expected = []
    for i, row in enumerate(ranking):
        y_true = [_is_relevant(y_query[i], y_database[j]) for j in row]
        if any(y_true):
            expected.append(average_precision_score(y_true, -np.arange(len(row))))
    got = mean_average_precision(y_query, y_database, ranking, no_relevant="skip")
    assert got == pytest.approx(np.mean(expected), rel=1e-12)


def test_map_hand_computed():
    y_database = np.array(["cat", "dog", "cat", "dog", "bird"])
    y_query = np.array(["cat", "dog", "fish"])
    ranking = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]])
    # cat: hits at ranks 1, 3 -> (1 + 2/3) / 2; dog: ranks 2, 4 -> (1/2 + 2/4) / 2;
    # fish: no relevant item -> 0 ("zero") or left out ("skip").
    ap = [(1 + 2 / 3) / 2, 0.5]
    assert mean_average_precision(y_query, y_database, ranking) == pytest.approx(
        sum(ap) / 3
    )
    assert mean_average_precision(
        y_query, y_database, ranking, no_relevant="skip"
    ) == pytest.approx(sum(ap) / 2)
    # top_k=2 normalises by the hits inside the top 2: cat 1/1, dog (1/2)/1.
    assert mean_average_precision(
        y_query, y_database, ranking, top_k=2, no_relevant="skip"
    ) == pytest.approx((1 + 0.5) / 2)


def test_map_hand_computed_multilabel():
    # Items share >= 1 label with the query [1, 1, 0] when column 0 or 1 is set.
    y_database = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]])
    y_query = np.array([[1, 1, 0]])
    ranking = np.array([[0, 1, 2, 3]])
    # relevant at ranks 2 and 3 -> (1/2 + 2/3) / 2
    assert mean_average_precision(y_query, y_database, ranking) == pytest.approx(
        (1 / 2 + 2 / 3) / 2
    )
    assert precision_at_k(y_query, y_database, ranking, 3) == pytest.approx(2 / 3)


def test_map_no_relevant_at_all():
    y_query, y_database = np.array([7, 8]), np.array([0, 1, 2])
    ranking = np.array([[0, 1, 2], [2, 1, 0]])
    assert mean_average_precision(y_query, y_database, ranking) == 0.0
    with pytest.warns(UndefinedMetricWarning, match="no_relevant='skip'"):
        score = mean_average_precision(y_query, y_database, ranking, no_relevant="skip")
    assert np.isnan(score)


def test_label_types_and_sparse_indicator_agree():
    y_query, y_database, ranking = _make_data(False)
    expected = mean_average_precision(y_query, y_database, ranking)
    as_str = np.array([f"label-{v}" for v in range(5)], dtype=object)
    assert mean_average_precision(
        as_str[y_query].tolist(), as_str[y_database], ranking
    ) == pytest.approx(expected, rel=1e-15)

    yq, yd, ranking = _make_data(True)
    expected = mean_average_precision(yq, yd, ranking, top_k=9)
    got = mean_average_precision(
        sparse.csr_matrix(yq), sparse.csr_matrix(yd.astype(bool)), ranking, top_k=9
    )
    assert got == pytest.approx(expected, rel=1e-15)


# ---------------------------------------------------------------------------
# precision_at_k and the precision-recall curve
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("k", [1, 4, 25])
def test_precision_at_k_matches_loop_reference(multilabel, k):
    y_query, y_database, ranking = _make_data(multilabel, n_ranked=25)
    expected = _ref_precision_at_k(y_query, y_database, ranking, k)
    assert precision_at_k(y_query, y_database, ranking, k) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("n_ranked", [None, 12])
def test_curve_matches_loop_reference(multilabel, n_ranked):
    y_query, y_database, ranking = _make_data(multilabel, n_ranked=n_ranked)
    precision, recall, ranks = retrieval_precision_recall_curve(
        y_query, y_database, ranking
    )
    ref_precision, ref_recall = _ref_curve(y_query, y_database, ranking)
    assert_allclose(precision, ref_precision, rtol=1e-12)
    assert_allclose(recall, ref_recall, rtol=1e-12)
    assert_array_equal(ranks, np.arange(1, ranking.shape[1] + 1))
    # Precision at rank k is precision@k; recall is monotone.
    for k in (1, 5, ranking.shape[1]):
        assert precision[k - 1] == pytest.approx(
            precision_at_k(y_query, y_database, ranking, k)
        )
    assert np.all(np.diff(recall) >= 0)
    if n_ranked is None:  # whole database ranked: every relevant item found
        assert recall[-1] == pytest.approx(1.0)


def test_curve_recall_undefined_warns():
    ranking = np.array([[0, 1], [1, 0]])
    with pytest.warns(UndefinedMetricWarning, match="recall is undefined"):
        precision, recall, _ = retrieval_precision_recall_curve([5, 6], [0, 1], ranking)
    assert_array_equal(precision, [0, 0])
    assert np.isnan(recall).all()


# ---------------------------------------------------------------------------
# Chunking, memory, input safety
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
def test_chunking_gives_identical_results(multilabel, monkeypatch):
    y_query, y_database, ranking = _make_data(multilabel, n_queries=30)

    def compute():
        return (
            mean_average_precision(y_query, y_database, ranking, top_k=20),
            _average_precision_per_query(y_query, y_database, ranking),
            precision_at_k(y_query, y_database, ranking, 10),
            retrieval_precision_recall_curve(y_query, y_database, ranking),
        )

    n_calls = []
    relevance = _ranking._relevance

    def counting_relevance(*args):
        n_calls.append(1)
        return relevance(*args)

    monkeypatch.setattr(_ranking, "_relevance", counting_relevance)
    full = compute()
    n_full = len(n_calls)
    with config_context(working_memory=TINY_MEMORY):
        chunked = compute()
    assert len(n_calls) - n_full == 4 * len(y_query)  # really one query per chunk
    assert chunked[0] == full[0]
    assert_array_equal(chunked[1], full[1])
    assert chunked[2] == full[2]
    for got, expected in zip(chunked[3], full[3], strict=True):
        assert_allclose(got, expected, rtol=1e-13)


@pytest.mark.parametrize("multilabel", [False, True])
def test_memory_stays_under_working_memory(multilabel):
    # A (200, 20000) ranking: one dense float64 matrix of that shape is 32 MiB,
    # the unchunked kernels peak near 100 MiB.
    rng = np.random.RandomState(0)
    n_queries, n_database = 200, 20_000
    if multilabel:
        y_database = rng.rand(n_database, 8) < 0.2
        y_query = rng.rand(n_queries, 8) < 0.2
    else:
        y_database = rng.randint(10, size=n_database)
        y_query = rng.randint(10, size=n_queries)
    ranking = np.tile(np.arange(n_database), (n_queries, 1))
    with config_context(working_memory=2):
        tracemalloc.start()
        try:
            mean_average_precision(y_query, y_database, ranking)
            precision_at_k(y_query, y_database, ranking, n_database)
            retrieval_precision_recall_curve(y_query, y_database, ranking)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 3 * 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("multilabel", [False, True])
def test_inputs_not_modified(multilabel):
    y_query, y_database, ranking = _make_data(multilabel)
    copies = [a.copy() for a in (y_query, y_database, ranking)]
    mean_average_precision(y_query, y_database, ranking, top_k=5)
    precision_at_k(y_query, y_database, ranking, 5)
    retrieval_precision_recall_curve(y_query, y_database, ranking)
    for original, copy in zip((y_query, y_database, ranking), copies, strict=True):
        assert_array_equal(original, copy)


Y1, R1 = np.array([0, 1, 0]), np.array([[0, 1], [1, 2]])


@pytest.mark.parametrize(
    "y_query, y_database, ranking, kwargs, match",
    [
        ([[1, 0], [0, 1]], Y1, R1, {}, "must both be 1-D class labels or both 2-D"),
        (
            [0, 1],
            [[1, 0], [0, 1], [1, 1]],
            R1,
            {},
            "must both be 1-D class labels or both",
        ),
        ([[1, 2], [0, 1]], [[1, 0], [0, 1], [1, 1]], R1, {}, "0/1 label indicator"),
        ([[1, 0], [0, 1]], [[1, 0, 0]] * 3, R1, {}, "same labels"),
        ([0, 1], Y1, R1.astype(float), {}, "integer indices"),
        ([0, 1], Y1, R1[:, 0], {}, "Expected 2D array"),
        ([0, 1, 1], Y1, R1, {}, "ranking has 2 rows but there are 3 queries"),
        ([0, 1], Y1, R1 + 1, {}, r"indices must lie in \[0, 2\]"),
        ([0, 1], Y1, R1 - 1, {}, r"indices must lie in \[0, 2\]"),
        ([0, 1], Y1, R1, {"top_k": 0}, "top_k must be a positive integer"),
        ([0, 1], Y1, R1, {"top_k": 2.0}, "top_k must be a positive integer"),
        ([0, 1], Y1, R1, {"top_k": True}, "top_k must be a positive integer"),
        ([0, 1], Y1, R1, {"top_k": 3}, "top_k=3 is too large"),
        ([0, 1], Y1, R1, {"no_relevant": "nan"}, "no_relevant must be one of"),
        ([], Y1, R1[:0], {}, "0 sample"),
    ],
)
def test_bad_inputs_raise(y_query, y_database, ranking, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mean_average_precision(y_query, y_database, ranking, **kwargs)


@pytest.mark.parametrize("k, match", [(0, "positive integer"), (3, "too large")])
def test_precision_at_k_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        precision_at_k([0, 1], Y1, R1, k)


# ---------------------------------------------------------------------------
# Estimator scoring and scorers
# ---------------------------------------------------------------------------


def _fitted_index(multilabel, noise=0.0):
    X, y = make_blobs(n_samples=60, centers=4, cluster_std=3.0, random_state=0)
    if multilabel:
        y = np.eye(4, dtype=int)[y] | np.eye(4, dtype=int)[(y + 1) % 4] * (X[:, :1] > 0)
    X_db, y_db, X_q, y_q = X[:45], y[:45], X[45:], y[45:]
    return BruteForceIndex(noise).fit(X_db, y_db), X_q, y_q, y_db


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("top_k", [None, 10, 1000])
def test_score_estimator_map_matches_ranking_metric(multilabel, top_k):
    est, X_q, y_q, y_db = _fitted_index(multilabel)
    ranking = est.kneighbors(X_q, n_neighbors=45, return_distance=False)
    expected = mean_average_precision(
        y_q, y_db, ranking, top_k=None if top_k is None else min(top_k, 45)
    )
    assert 0 < expected < 1
    assert _score_estimator(est, X_q, y_q, "map", top_k=top_k) == pytest.approx(
        expected, rel=1e-12
    )
    scorer = make_retrieval_scorer("map", top_k=top_k)
    assert scorer(est, X_q, y_q) == pytest.approx(expected, rel=1e-12)
    if top_k is None:
        assert map_scorer(est, X_q, y_q) == pytest.approx(expected, rel=1e-12)


def test_score_estimator_precision_at_k_and_n_ranked():
    est, X_q, y_q, y_db = _fitted_index(False)
    ranking = est.kneighbors(X_q, n_neighbors=45, return_distance=False)
    expected = precision_at_k(y_q, y_db, ranking, 7)
    assert _score_estimator(est, X_q, y_q, "precision_at_k", k=7) == pytest.approx(
        expected
    )
    assert make_retrieval_scorer("precision_at_k", k=7)(est, X_q, y_q) == (
        pytest.approx(expected)
    )
    # n_ranked bounds what kneighbors returns; top_k None then means all of it.
    assert _score_estimator(est, X_q, y_q, "map", n_ranked=12) == pytest.approx(
        mean_average_precision(y_q, y_db, ranking, top_k=12)
    )


def test_score_estimator_is_chunked():
    est, X_q, y_q, _ = _fitted_index(True)
    full = _score_estimator(est, X_q, y_q, "map")
    assert est.n_kneighbors_calls_ == 1
    with config_context(working_memory=TINY_MEMORY):
        chunked = _score_estimator(est, X_q, y_q, "map")
    assert est.n_kneighbors_calls_ == 1 + len(X_q)
    assert chunked == full


def test_score_estimator_errors():
    est, X_q, y_q, _ = _fitted_index(False)
    with pytest.raises(ValueError, match="metric must be one of"):
        _score_estimator(est, X_q, y_q, "ndcg")
    with pytest.raises(TypeError, match="does not accept"):
        _score_estimator(est, X_q, y_q, "map", k=3)
    with pytest.raises(TypeError, match="requires k"):
        _score_estimator(est, X_q, y_q, "precision_at_k")
    with pytest.raises(ValueError, match="k=46 is too large"):
        _score_estimator(est, X_q, y_q, "precision_at_k", k=46)
    with pytest.raises(ValueError, match="top_k=20 is too large"):
        _score_estimator(est, X_q, y_q, "map", top_k=20, n_ranked=10)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        _score_estimator(est, X_q, y_q[:-1], "map")
    with pytest.raises(ValueError, match="must both be 1-D class labels or both 2-D"):
        _score_estimator(est, X_q, np.eye(4, dtype=int)[y_q], "map")
    unlabelled = BruteForceIndex().fit(X_q)
    with pytest.raises(ValueError, match="the index was built without labels"):
        _score_estimator(unlabelled, X_q, y_q, "map")


def test_make_retrieval_scorer_validation_and_pickle():
    with pytest.raises(ValueError, match="metric must be one of"):
        make_retrieval_scorer("auc")
    with pytest.raises(ValueError, match="requires k"):
        make_retrieval_scorer("precision_at_k")
    with pytest.raises(ValueError, match="only used with metric='precision_at_k'"):
        make_retrieval_scorer("map", k=3)
    with pytest.raises(ValueError, match="only used with metric='map'"):
        make_retrieval_scorer("precision_at_k", top_k=3, k=3)
    with pytest.raises(ValueError, match="positive integer"):
        make_retrieval_scorer("map", top_k=-1)

    scorer = make_retrieval_scorer("map", top_k=10)
    assert repr(scorer) == "make_retrieval_scorer('map', top_k=10)"
    est, X_q, y_q, _ = _fitted_index(False)
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone(est, X_q, y_q) == scorer(est, X_q, y_q)


def test_scorer_in_grid_search_prefers_better_ranking():
    # Noise on the database destroys the ranking: the scorer must rate the
    # clean index higher (greater is better) for GridSearchCV to pick it.
    X, y = make_blobs(n_samples=90, centers=3, cluster_std=1.0, random_state=0)
    search = GridSearchCV(
        BruteForceIndex(),
        {"noise": [30.0, 0.0]},
        scoring=make_retrieval_scorer("map", top_k=20),
        cv=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.fit(X, y)
    assert search.best_params_ == {"noise": 0.0}
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > 0.8 and scores[0] < 0.6
