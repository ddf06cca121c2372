"""Retrieval scores of fitted search estimators, and scorers for model selection.

The estimator glue lives here; the numbers come from the kernels of
:mod:`skquant.metrics._ranking`. An estimator is anything with
``kneighbors(X, n_neighbors, return_distance=False)``, ``n_samples_fit_`` and
``database_labels_`` (the labels given to ``fit``/``index``/``add``).
"""

# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import scipy.sparse as sp
from sklearn.utils import _safe_indexing, check_consistent_length
from sklearn.utils.validation import check_is_fitted

from .._progress import Progress
from ._ranking import (
    _ap_from_relevance,
    _check_cutoff,
    _check_labels,
    _check_no_relevant,
    _count_relevant,
    _CurveAccumulator,
    _query_chunks,
    _reduce,
    _relevance,
    _row_bytes,
)

_METRICS = ("map", "precision_at_k")
_DB = "the number of indexed database items, n_samples_fit_"


def _database_labels(estimator):
    check_is_fitted(estimator, "n_samples_fit_")
    labels = getattr(estimator, "database_labels_", None)
    if labels is None:
        raise ValueError(
            f"{type(estimator).__name__} cannot be scored: the index was built "
            "without labels; pass y to fit/index/add."
        )
    return labels


def _iter_rankings(estimator, X, yq, yd, n_ranked, extra_row_bytes=0):
    """Yield (query slice, relevance) chunk by chunk of the queries X.

    The chunk size bounds the rankings returned by ``kneighbors`` (and the
    distances it may compute alongside) plus the metric temporaries by
    ``sklearn.get_config()["working_memory"]``.
    """
    row_bytes = _row_bytes(yd, n_ranked) + n_ranked * (8 + 8) + extra_row_bytes
    if sp.issparse(X) and X.format not in ("csr", "csc"):
        X = X.tocsr()  # COO and friends cannot be sliced by rows
    progress = Progress(type(estimator).__name__, "ranked the database for",
                        yq.shape[0], getattr(estimator, "verbose", 0))
    for sl in _query_chunks(yq.shape[0], row_bytes):
        ranking = estimator.kneighbors(
            _safe_indexing(X, sl), n_neighbors=n_ranked, return_distance=False
        )
        yield sl, _relevance(yq[sl], yd, np.asarray(ranking))
        progress.update(sl.stop - sl.start)


def _prepare(estimator, X, y):
    yd_raw = _database_labels(estimator)
    check_consistent_length(X, y)
    yq, yd = _check_labels(y, yd_raw)
    return yq, yd, int(estimator.n_samples_fit_)


def _score_estimator(estimator, X, y, metric="map", n_ranked=None, **kwargs):
    """Retrieval score of X (queries, labels y) against a fitted estimator's index.

    Parameters
    ----------
    estimator : fitted search estimator
        Needs ``kneighbors``, ``n_samples_fit_`` and ``database_labels_``.
    X : array-like of shape (n_queries, n_features)
        Queries, passed (in row chunks) to ``estimator.kneighbors``.
    y : array-like of shape (n_queries,) or (n_queries, n_labels)
        Query labels, of the same kind as ``database_labels_``.
    metric : {"map", "precision_at_k"}
        ``"map"`` accepts ``top_k=None`` and ``no_relevant="zero"`` (see
        :func:`~skquant.metrics.mean_average_precision`); a `top_k` larger than
        the database means the whole database. ``"precision_at_k"`` requires
        ``k`` (at most the database size).
    n_ranked : int, default=None
        Neighbours asked from ``kneighbors`` per query. None: `top_k` (or the
        whole database) for "map", `k` for "precision_at_k".

    Returns
    -------
    score : float
        Greater is better.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
    allowed = {"map": {"top_k", "no_relevant"}, "precision_at_k": {"k"}}[metric]
    unexpected = set(kwargs) - allowed
    if unexpected:
        raise TypeError(
            f"metric={metric!r} does not accept {sorted(unexpected)}; "
            f"allowed: {sorted(allowed)}."
        )
    yq, yd, n_database = _prepare(estimator, X, y)

    if metric == "map":
        no_relevant = kwargs.get("no_relevant", "zero")
        _check_no_relevant(no_relevant)
        top_k = kwargs.get("top_k")
        if top_k is not None:
            # AP@R normalises by the hits in the top R, so R beyond the
            # database is the same as the whole database.
            top_k = min(_check_cutoff(top_k, np.inf, "top_k"), n_database)
        if n_ranked is None:
            n_ranked = n_database if top_k is None else top_k
        n_ranked = _check_cutoff(n_ranked, n_database, "n_ranked", upper_desc=_DB)
        top_k = _check_cutoff(top_k, n_ranked, "top_k", upper_desc="n_ranked")
    else:
        if "k" not in kwargs:
            raise TypeError("metric='precision_at_k' requires k.")
        k = _check_cutoff(
            kwargs["k"], n_database, "k", allow_none=False, upper_desc=_DB
        )
        n_ranked = _check_cutoff(
            k if n_ranked is None else n_ranked,
            n_database,
            "n_ranked",
            upper_desc=_DB,
        )
        k = _check_cutoff(k, n_ranked, "k", allow_none=False, upper_desc="n_ranked")

    per_query = np.empty(yq.shape[0], dtype=np.float64)
    for sl, rel in _iter_rankings(estimator, X, yq, yd, n_ranked):
        if metric == "map":
            per_query[sl] = _ap_from_relevance(rel[:, :top_k])
        else:
            per_query[sl] = rel[:, :k].mean(axis=1)
    if metric == "map":
        return _reduce(per_query, no_relevant)
    return float(per_query.mean())


def _estimator_curve(estimator, X, y, n_ranked=None):
    """Precision, recall, ranks, mAP@n_ranked of an estimator's rankings, and
    the database size."""
    yq, yd, n_database = _prepare(estimator, X, y)
    n_ranked = _check_cutoff(n_ranked, n_database, "n_ranked", upper_desc=_DB)
    n_relevant = _count_relevant(yq, yd)
    acc = _CurveAccumulator(n_ranked)
    for sl, rel in _iter_rankings(
        estimator, X, yq, yd, n_ranked, extra_row_bytes=3 * 8 * n_ranked
    ):
        acc.update(rel, n_relevant[sl])
    return (*acc.result(), n_database)


class _RetrievalScorer:
    """Picklable ``scorer(estimator, X, y) -> float`` (greater is better)."""

    def __init__(self, metric, kwargs):
        self._metric = metric
        self._kwargs = kwargs

    def __call__(self, estimator, X, y, **kwargs):
        if kwargs:
            raise TypeError(
                f"retrieval scorers take no extra arguments, got {sorted(kwargs)}."
            )
        return _score_estimator(estimator, X, y, self._metric, **self._kwargs)

    def __repr__(self):
        args = "".join(f", {key}={value!r}" for key, value in self._kwargs.items())
        return f"make_retrieval_scorer({self._metric!r}{args})"


def make_retrieval_scorer(metric="map", *, top_k=None, k=None):
    """Make a scorer that rates a fitted search estimator by retrieval quality.

    The scorer ranks the database of the fitted estimator for each row of
    ``X`` (queries) with ``estimator.kneighbors`` and compares labels ``y``
    with the labels the database was indexed with (``database_labels_``).
    Use it as ``scoring=`` in :class:`~sklearn.model_selection.GridSearchCV`:
    each split then fits on the training fold (which becomes the database)
    and queries it with the validation fold.

    Parameters
    ----------
    metric : {"map", "precision_at_k"}, default="map"
        ``"map"``: :func:`~skquant.metrics.mean_average_precision` at cut-off
        `top_k` (queries with no relevant item count as 0).
        ``"precision_at_k"``: :func:`~skquant.metrics.precision_at_k` at `k`.

    top_k : int, default=None
        Cut-off R of the mAP; None (or a value larger than the database) ranks
        the whole database. Only for ``metric="map"``.

    k : int
        Number of retrieved items for ``metric="precision_at_k"`` (required
        there, not allowed for "map").

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, greater is better. Picklable.

    See Also
    --------
    map_scorer : Ready-made ``make_retrieval_scorer("map")``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.neighbors import NearestNeighbors
    >>> from skquant.metrics import make_retrieval_scorer
    >>> class LabelledNN(NearestNeighbors):
    ...     def fit(self, X, y=None):
    ...         self.database_labels_ = y
    ...         return super().fit(X)
    >>> X = np.array([[0.0], [0.1], [5.0], [5.1]])
    >>> y = np.array([0, 0, 1, 1])
    >>> nn = LabelledNN().fit(X, y)
    >>> scorer = make_retrieval_scorer("precision_at_k", k=2)
    >>> scorer(nn, np.array([[0.05], [5.05]]), np.array([0, 1]))
    1.0
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
    if metric == "map":
        if k is not None:
            raise ValueError(
                "k is only used with metric='precision_at_k'; "
                "use top_k for the mAP cut-off."
            )
        if top_k is not None:
            _check_cutoff(top_k, np.inf, "top_k")
        return _RetrievalScorer("map", {"top_k": top_k})
    if top_k is not None:
        raise ValueError("top_k is only used with metric='map'; use k.")
    if k is None:
        raise ValueError("metric='precision_at_k' requires k.")
    _check_cutoff(k, np.inf, "k", allow_none=False)
    return _RetrievalScorer("precision_at_k", {"k": k})


#: Scorer for the mean average precision over the whole database (mAP@all).
map_scorer = make_retrieval_scorer("map")
