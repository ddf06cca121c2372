"""Tests of RetrievalCurveDisplay (Agg backend)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import BaseEstimator
from sklearn.datasets import make_blobs

from skquant.metrics import (
    RetrievalCurveDisplay,
    mean_average_precision,
    retrieval_precision_recall_curve,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


class BruteForceIndex(BaseEstimator):
    """Minimal search estimator: exact Euclidean kneighbors, labels kept."""

    def fit(self, X, y=None):
        self.database_ = np.asarray(X, dtype=float)
        self.database_labels_ = y
        self.n_samples_fit_ = len(X)
        return self

    def kneighbors(self, X, n_neighbors, return_distance=True):
        dist = ((np.asarray(X)[:, None, :] - self.database_[None]) ** 2).sum(-1)
        return np.argsort(dist, axis=1, kind="stable")[:, :n_neighbors]


def _data(seed=0, n_queries=8, n_database=30):
    rng = np.random.RandomState(seed)
    y_database = rng.randint(3, size=n_database)
    y_query = rng.randint(3, size=n_queries)
    ranking = np.argsort(rng.rand(n_queries, n_database), axis=1)
    return y_query, y_database, ranking


def test_from_predictions_precision_recall():
    y_query, y_database, ranking = _data()
    display = RetrievalCurveDisplay.from_predictions(
        y_query, y_database, ranking, name="random"
    )
    precision, recall, ranks = retrieval_precision_recall_curve(
        y_query, y_database, ranking
    )
    assert_allclose(display.precision, precision)
    assert_allclose(display.recall, recall)
    assert_array_equal(display.ranks, ranks)
    assert display.mean_ap == pytest.approx(
        mean_average_precision(y_query, y_database, ranking)
    )
    assert_allclose(display.line_.get_xdata(), recall)
    assert_allclose(display.line_.get_ydata(), precision)
    assert display.ax_.get_xlabel() == "Recall"
    assert display.ax_.get_ylabel() == "Precision"
    assert display.figure_ is display.ax_.figure
    expected_label = f"random (mAP = {display.mean_ap:0.3f})"
    assert display.line_.get_label() == expected_label
    assert [t.get_text() for t in display.ax_.get_legend().get_texts()] == [
        expected_label
    ]


def test_from_predictions_precision_at_k_and_kwargs():
    y_query, y_database, ranking = _data()
    display = RetrievalCurveDisplay.from_predictions(
        y_query,
        y_database,
        ranking[:, :10],
        kind="precision_at_k",
        color="red",
        label="custom",
    )
    assert_array_equal(display.line_.get_xdata(), np.arange(1, 11))
    assert_allclose(display.line_.get_ydata(), display.precision)
    assert display.ax_.get_xlabel() == "Number of retrieved items"
    assert display.line_.get_color() == "red"
    assert display.line_.get_label() == "custom"


def test_two_displays_share_one_axis():
    X, y = make_blobs(n_samples=80, centers=3, random_state=0)
    index = BruteForceIndex().fit(X[:60], y[:60])
    good = RetrievalCurveDisplay.from_estimator(index, X[60:], y[60:])
    rng = np.random.RandomState(0)
    random_ranking = np.argsort(rng.rand(20, 60), axis=1)
    bad = RetrievalCurveDisplay.from_predictions(
        y[60:], y[:60], random_ranking, name="random", ax=good.ax_
    )
    assert bad.ax_ is good.ax_ and bad.figure_ is good.figure_
    assert len(good.ax_.get_lines()) == 2
    legend = [t.get_text() for t in good.ax_.get_legend().get_texts()]
    assert legend[0].startswith("BruteForceIndex (mAP = ")
    assert legend[1].startswith("random (mAP = ")
    assert good.mean_ap > bad.mean_ap


def test_from_estimator_matches_from_predictions():
    X, y = make_blobs(n_samples=50, centers=3, cluster_std=4.0, random_state=1)
    index = BruteForceIndex().fit(X[:40], y[:40])
    ranking = index.kneighbors(X[40:], n_neighbors=15, return_distance=False)
    for kind in ("precision_recall", "precision_at_k"):
        from_est = RetrievalCurveDisplay.from_estimator(
            index, X[40:], y[40:], kind=kind, n_ranked=15, name="index"
        )
        from_pred = RetrievalCurveDisplay.from_predictions(
            y[40:], y[:40], ranking, kind=kind, name="index"
        )
        assert_allclose(from_est.precision, from_pred.precision)
        assert_allclose(from_est.recall, from_pred.recall)
        assert from_est.mean_ap == pytest.approx(from_pred.mean_ap)
        assert from_est.line_.get_label() == from_pred.line_.get_label()


def test_truncated_ranking_is_labelled_map_at_r():
    # AP@R of a truncated ranking is not the whole database's mAP: the legend
    # must name the cut-off, and say plain "mAP" only for full rankings.
    y_query, y_database, ranking = _data(n_database=30)
    full = RetrievalCurveDisplay.from_predictions(
        y_query, y_database, ranking, name="full"
    )
    top10 = RetrievalCurveDisplay.from_predictions(
        y_query, y_database, ranking[:, :10], name="top10"
    )
    assert full.line_.get_label() == f"full (mAP = {full.mean_ap:0.3f})"
    assert top10.n_database == 30
    assert top10.line_.get_label() == f"top10 (mAP@10 = {top10.mean_ap:0.3f})"
    assert top10.mean_ap == pytest.approx(
        mean_average_precision(y_query, y_database, ranking, top_k=10)
    )

    X, y = make_blobs(n_samples=50, centers=3, cluster_std=4.0, random_state=1)
    index = BruteForceIndex().fit(X[:40], y[:40])
    whole = RetrievalCurveDisplay.from_estimator(index, X[40:], y[40:])
    truncated = RetrievalCurveDisplay.from_estimator(
        index, X[40:], y[40:], n_ranked=15, kind="precision_at_k"
    )
    assert whole.line_.get_label().startswith("BruteForceIndex (mAP = ")
    assert truncated.line_.get_label().startswith("BruteForceIndex (mAP@15 = ")
    # n_ranked equal to the database size is the whole ranking.
    all40 = RetrievalCurveDisplay.from_estimator(index, X[40:], y[40:], n_ranked=40)
    assert all40.line_.get_label() == whole.line_.get_label()

    # Built directly: without n_database nothing says the ranking is cut.
    direct = RetrievalCurveDisplay(
        precision=top10.precision,
        recall=top10.recall,
        ranks=top10.ranks,
        mean_ap=top10.mean_ap,
    ).plot()
    assert direct.line_.get_label() == f"mAP = {top10.mean_ap:0.3f}"
    direct.n_database = 30
    assert direct.plot().line_.get_label() == f"mAP@10 = {top10.mean_ap:0.3f}"


def test_plot_rename_and_bad_kind():
    display = RetrievalCurveDisplay(
        precision=np.array([1.0, 0.5]),
        recall=np.array([0.5, 0.5]),
        ranks=np.array([1, 2]),
    )
    display.plot()
    assert display.ax_.get_legend() is None  # no name, no mAP: no legend
    display.plot(name="renamed")
    assert display.line_.get_label() == "renamed"
    with pytest.raises(ValueError, match="kind must be one of"):
        RetrievalCurveDisplay.from_predictions(*_data(), kind="roc")
