"""Retrieval metrics computed from rankings: mAP@R, precision@k, PR curves.

A *ranking* is an integer array ``(n_queries, n_ranked)`` of database indices,
best first (what ``kneighbors(..., return_distance=False)`` returns). Relevance
is derived from labels: same class for 1-D labels, at least one shared label
for 2-D 0/1 indicator matrices (the multi-label convention of the deep
hashing literature).

Everything here is pure numpy. Work is done a chunk of queries at a time so
that the temporaries stay under ``sklearn.get_config()["working_memory"]``:
a dense ``(n_queries, n_database)`` float matrix is never built.
"""

# SPDX-License-Identifier: BSD-3-Clause

import numbers
import warnings

import numpy as np
from scipy import sparse
from sklearn import get_config
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.utils import check_array, gen_batches

_NO_RELEVANT_OPTIONS = ("zero", "skip")


# --------------------------------------------------------------------------
# Validation and label encoding
# --------------------------------------------------------------------------


def _as_label_array(y, name):
    """Validate one label array: 1-D labels of any type or a 2-D 0/1 indicator."""
    if sparse.issparse(y):
        # Indicator matrices are (n, n_labels) with few labels: dense is cheap.
        y = y.toarray()
    y = check_array(
        y, ensure_2d=False, dtype=None, ensure_all_finite=False, input_name=name
    )
    if y.ndim == 2:
        if y.dtype.kind not in "biuf" or not (
            y.dtype.kind == "b" or np.logical_or(y == 0, y == 1).all()
        ):
            raise ValueError(
                f"{name} is 2-D, so it must be a 0/1 label indicator matrix "
                "(multi-label); pass 1-D class labels for single-label data."
            )
        y = y.astype(bool)
    return y


def _check_labels(y_query, y_database):
    """Validate query/database labels and encode them for fast relevance tests.

    Returns
    -------
    yq, yd : ndarray
        1-D labels: int64 codes (equal codes <=> equal labels).
        2-D labels: bool indicator matrices.
    """
    yq = _as_label_array(y_query, "y_query")
    yd = _as_label_array(y_database, "y_database")
    if yq.ndim != yd.ndim:
        raise ValueError(
            "y_query and y_database must both be 1-D class labels or both 2-D "
            f"0/1 indicator matrices; got {yq.ndim}-D y_query and {yd.ndim}-D "
            "y_database."
        )
    if yq.ndim == 2:
        if yq.shape[1] != yd.shape[1]:
            raise ValueError(
                f"y_query has {yq.shape[1]} label columns but y_database has "
                f"{yd.shape[1]}; both indicator matrices must use the same labels."
            )
        return yq, yd
    # One joint encoding turns any label type (str, object, float) into ints,
    # so relevance is an integer comparison whatever the user's labels are.
    try:
        _, codes = np.unique(np.concatenate([yq, yd]), return_inverse=True)
    except TypeError as exc:
        raise ValueError(
            "y_query and y_database labels cannot be compared with each other "
            "(mixed label types?)."
        ) from exc
    codes = codes.reshape(-1).astype(np.int64, copy=False)
    return codes[: yq.shape[0]], codes[yq.shape[0] :]


def _check_ranking(ranking, n_queries, n_database):
    """Validate a ranking of database indices, one row per query."""
    ranking = check_array(ranking, dtype=None, input_name="ranking")
    if ranking.dtype.kind not in "iu":
        raise ValueError(
            "ranking must hold integer indices into the database, got dtype "
            f"{ranking.dtype}."
        )
    if ranking.shape[0] != n_queries:
        raise ValueError(
            f"ranking has {ranking.shape[0]} rows but there are {n_queries} "
            "queries (y_query); one row of database indices per query is needed."
        )
    low, high = ranking.min(), ranking.max()
    if low < 0 or high >= n_database:
        raise ValueError(
            f"ranking holds indices in [{low}, {high}] but the database has "
            f"{n_database} items: indices must lie in [0, {n_database - 1}]."
        )
    return ranking


def _check_cutoff(value, upper, name, *, allow_none=True, upper_desc=None):
    """Validate a cut-off (top_k, k): an int in [1, upper]; None -> upper."""
    if value is None and allow_none:
        return upper
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if value > upper:
        upper_desc = upper_desc or "the number of ranked columns"
        raise ValueError(
            f"{name}={value} is too large: it must be at most {upper} ({upper_desc})."
        )
    return int(value)


def _check_no_relevant(no_relevant):
    if no_relevant not in _NO_RELEVANT_OPTIONS:
        raise ValueError(
            f"no_relevant must be one of {_NO_RELEVANT_OPTIONS}, got {no_relevant!r}."
        )


def _validate(y_query, y_database, ranking):
    yq, yd = _check_labels(y_query, y_database)
    ranking = _check_ranking(ranking, yq.shape[0], yd.shape[0])
    return yq, yd, ranking


# --------------------------------------------------------------------------
# Chunked numeric kernels (inputs already validated and encoded)
# --------------------------------------------------------------------------


def _row_bytes(yd, n_ranked):
    """Bytes of temporaries per query and ranked item in the kernels below.

    Gathered labels (int64 codes, or two bool copies of the label row), the
    bool relevance, an int64 cumulative hit count and ~three float64 arrays.
    """
    per_item = 8 if yd.ndim == 1 else 2 * yd.shape[1]
    return n_ranked * (per_item + 1 + 8 + 3 * 8)


def _chunk_n_rows(row_bytes, n_rows):
    """Rows whose temporaries fit in ``sklearn.get_config()["working_memory"]``.

    At least one row, whatever the budget: one query's ranking is the unit of
    work and never holds more than ``n_database`` items.
    """
    budget = get_config()["working_memory"] * 2**20
    return int(min(max(budget // max(row_bytes, 1), 1), max(n_rows, 1)))


def _query_chunks(n_queries, row_bytes):
    """Slices of queries whose temporaries fit in the working memory."""
    return gen_batches(n_queries, _chunk_n_rows(row_bytes, n_queries))


def _relevance(yq, yd, ranking):
    """Bool (n_queries, n_ranked): is ranking[i, r] relevant to query i."""
    if yq.ndim == 1:
        return yd[ranking] == yq[:, None]
    return np.logical_and(yd[ranking], yq[:, None, :]).any(axis=2)


def _ap_from_relevance(rel):
    """Per-query AP@R, R = rel.shape[1], normalised by the hits in the top R.

    AP = (1 / rel_R) * sum_{r <= R} P@r * rel_r; nan when rel_R == 0.
    """
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    n_hits = hits[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rel, precision, 0.0).sum(axis=1) / n_hits


def _ap_kernel(yq, yd, ranking):
    """Per-query AP over all columns of ``ranking``, chunked over queries."""
    out = np.empty(yq.shape[0], dtype=np.float64)
    for sl in _query_chunks(yq.shape[0], _row_bytes(yd, ranking.shape[1])):
        out[sl] = _ap_from_relevance(_relevance(yq[sl], yd, ranking[sl]))
    return out


def _precision_kernel(yq, yd, ranking):
    """Per-query precision over all columns of ``ranking``, chunked."""
    out = np.empty(yq.shape[0], dtype=np.float64)
    for sl in _query_chunks(yq.shape[0], _row_bytes(yd, ranking.shape[1])):
        out[sl] = _relevance(yq[sl], yd, ranking[sl]).mean(axis=1)
    return out


def _reduce(per_query, no_relevant):
    """Mean of per-query values where nan marks 'no relevant item'."""
    if no_relevant == "zero":
        return float(np.nan_to_num(per_query, nan=0.0).mean())
    defined = ~np.isnan(per_query)
    if not defined.any():
        warnings.warn(
            "No query has a relevant item in its ranking; with no_relevant='skip' "
            "the mean average precision is undefined and nan is returned.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return float("nan")
    return float(per_query[defined].mean())


def _count_relevant(yq, yd):
    """Number of relevant database items per query (recall denominators).

    Multi-label counts are chunked over the database, so the largest
    temporary is a (n_queries, chunk) float32 overlap matrix.
    """
    if yq.ndim == 1:
        n_codes = max(yq.max(), yd.max()) + 1
        return np.bincount(yd, minlength=n_codes)[yq]
    counts = np.zeros(yq.shape[0], dtype=np.int64)
    yq32 = yq.astype(np.float32)
    # float32 overlap, its bool mask and the reduction buffers per database item.
    row_bytes = yq.shape[0] * (4 + 1 + 8) + yd.shape[1] * 4
    for sl in gen_batches(yd.shape[0], _chunk_n_rows(row_bytes, yd.shape[0])):
        # float32 matmul is exact here: overlaps are small integer counts.
        overlap = yq32 @ yd[sl].T.astype(np.float32)
        counts += (overlap > 0).sum(axis=1)
    return counts


class _CurveAccumulator:
    """Running sums for the mean precision/recall curves over query chunks.

    ``update`` takes the relevance of a chunk of queries and the number of
    relevant database items of each; ``result`` returns the curves and mAP.
    Precision is averaged over all queries; recall over the queries that have
    at least one relevant item in the database (recall is undefined otherwise).
    """

    def __init__(self, n_ranked):
        self.ranks = np.arange(1, n_ranked + 1)
        self.precision_sum = np.zeros(n_ranked)
        self.recall_sum = np.zeros(n_ranked)
        self.n_queries = 0
        self.n_recall_queries = 0
        self.ap = []

    def update(self, rel, n_relevant):
        hits = np.cumsum(rel, axis=1)
        self.precision_sum += (hits / self.ranks).sum(axis=0)
        has_relevant = n_relevant > 0
        self.recall_sum += (hits[has_relevant] / n_relevant[has_relevant, None]).sum(
            axis=0
        )
        self.n_queries += rel.shape[0]
        self.n_recall_queries += int(has_relevant.sum())
        self.ap.append(_ap_from_relevance(rel))

    def result(self):
        precision = self.precision_sum / self.n_queries
        if self.n_recall_queries == 0:
            warnings.warn(
                "No query has a relevant item in the database: recall is undefined "
                "and set to nan.",
                UndefinedMetricWarning,
                stacklevel=3,
            )
            recall = np.full_like(precision, np.nan)
        else:
            recall = self.recall_sum / self.n_recall_queries
        mean_ap = _reduce(np.concatenate(self.ap), "zero")
        return precision, recall, self.ranks.copy(), mean_ap


def _curve_kernel(yq, yd, ranking):
    """Precision, recall, ranks and mAP@n_ranked of validated inputs."""
    n_relevant = _count_relevant(yq, yd)
    acc = _CurveAccumulator(ranking.shape[1])
    row_bytes = _row_bytes(yd, ranking.shape[1]) + 3 * 8 * ranking.shape[1]
    for sl in _query_chunks(yq.shape[0], row_bytes):
        acc.update(_relevance(yq[sl], yd, ranking[sl]), n_relevant[sl])
    return acc.result()


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------


def _average_precision_per_query(y_query, y_database, ranking, *, top_k=None):
    """Per-query AP@top_k (nan for queries with no relevant item in the top_k).

    Same conventions as :func:`mean_average_precision`; used by it and by the
    estimator scorers.
    """
    yq, yd, ranking = _validate(y_query, y_database, ranking)
    top_k = _check_cutoff(top_k, ranking.shape[1], "top_k")
    return _ap_kernel(yq, yd, ranking[:, :top_k])


def mean_average_precision(
    y_query, y_database, ranking, *, top_k=None, no_relevant="zero"
):
    """Mean average precision (mAP@R) of rankings of a labelled database.

    For each query, with ``rel_r = 1`` when the item ranked ``r`` is relevant
    and ``P@r`` the precision of the top ``r`` items, the average precision
    over the top ``R = top_k`` items is::

        AP@R = (1 / rel_R) * sum_{r <= R} P@r * rel_r

    where ``rel_R`` is the number of relevant items *within the top R*. This
    is the convention of the DQN/DHN/DVSQ authors' code (mAP@5000 on
    NUS-WIDE); it equals the classic AP when the ranking covers the whole
    database. The mAP is the mean of AP@R over queries.

    Parameters
    ----------
    y_query : array-like of shape (n_queries,) or (n_queries, n_labels)
        Query labels: class labels (any type), or a 0/1 indicator matrix for
        multi-label data.

    y_database : array-like of shape (n_database,) or (n_database, n_labels)
        Database labels, of the same kind as `y_query`. A database item is
        relevant to a query when it has the same label (1-D) or shares at
        least one label with it (2-D).

    ranking : array-like of int of shape (n_queries, n_ranked)
        Indices into the database, best first, e.g. the output of
        ``estimator.kneighbors(X_query, n_neighbors, return_distance=False)``.
        Each row is assumed to hold distinct indices.

    top_k : int, default=None
        The cut-off R: only the first `top_k` columns of `ranking` count.
        None uses all columns (mAP@all when the ranking covers the database).

    no_relevant : {"zero", "skip"}, default="zero"
        What to do with queries that have no relevant item in their top R
        (their AP is 0/0). ``"zero"`` counts them as AP = 0 (the mean is over
        all queries, as DeepHash-pytorch's ``CalcTopMap``); ``"skip"`` leaves
        them out of the mean (as thulab/DeepHash's ``get_mAPs``). If every
        query is skipped, nan is returned with an ``UndefinedMetricWarning``.

    Returns
    -------
    score : float
        The mean average precision, in [0, 1].

    See Also
    --------
    precision_at_k : Mean precision of the top k items.
    retrieval_precision_recall_curve : Mean precision and recall at each rank.

    Notes
    -----
    Queries are processed in chunks so that temporaries stay under
    ``sklearn.get_config()["working_memory"]`` (see
    :func:`sklearn.config_context`).

    Examples
    --------
    >>> import numpy as np
    >>> from skquant.metrics import mean_average_precision
    >>> y_database = np.array([0, 1, 0, 1])
    >>> y_query = np.array([0, 1])
    >>> ranking = np.array([[0, 1, 2, 3],
    ...                     [0, 1, 2, 3]])
    >>> # query 0: relevant at ranks 1, 3 -> (1/1 + 2/3) / 2 = 0.833...
    >>> # query 1: relevant at ranks 2, 4 -> (1/2 + 2/4) / 2 = 0.5
    >>> round(mean_average_precision(y_query, y_database, ranking), 4)
    0.6667
    >>> round(mean_average_precision(y_query, y_database, ranking, top_k=1), 4)
    0.5
    """
    _check_no_relevant(no_relevant)
    per_query = _average_precision_per_query(y_query, y_database, ranking, top_k=top_k)
    return _reduce(per_query, no_relevant)


def precision_at_k(y_query, y_database, ranking, k):
    """Mean precision of the top `k` ranked items (precision@k).

    For each query, the fraction of relevant items among the first `k`
    columns of its ranking; the result is the mean over queries.

    Parameters
    ----------
    y_query : array-like of shape (n_queries,) or (n_queries, n_labels)
        Query labels: class labels, or a 0/1 indicator matrix (multi-label).

    y_database : array-like of shape (n_database,) or (n_database, n_labels)
        Database labels, of the same kind as `y_query`. Relevance is the same
        label (1-D) or at least one shared label (2-D).

    ranking : array-like of int of shape (n_queries, n_ranked)
        Indices into the database, best first.

    k : int
        Number of top items to consider, ``1 <= k <= n_ranked``.

    Returns
    -------
    precision : float
        Mean precision@k over queries, in [0, 1].

    See Also
    --------
    mean_average_precision : Mean average precision over the top R items.

    Examples
    --------
    >>> import numpy as np
    >>> from skquant.metrics import precision_at_k
    >>> y_database = np.array([0, 1, 0, 1])
    >>> ranking = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    >>> precision_at_k([0, 1], y_database, ranking, k=2)
    0.5
    >>> precision_at_k([0, 1], y_database, ranking, k=1)
    0.5
    """
    yq, yd, ranking = _validate(y_query, y_database, ranking)
    k = _check_cutoff(k, ranking.shape[1], "k", allow_none=False)
    return float(_precision_kernel(yq, yd, ranking[:, :k]).mean())


def retrieval_precision_recall_curve(y_query, y_database, ranking):
    """Mean precision and recall over queries at every cut-off 1..n_ranked.

    At cut-off ``r``, a query's precision is (relevant items in its top r) / r
    and its recall is (relevant items in its top r) / (relevant items in the
    whole database). Precision is averaged over all queries, so
    ``precision[k - 1] == precision_at_k(..., k)``. Recall is averaged over the
    queries that have at least one relevant item in the database (recall is
    undefined for the others); it reaches 1 when the ranking covers the
    database.

    Parameters
    ----------
    y_query : array-like of shape (n_queries,) or (n_queries, n_labels)
        Query labels: class labels, or a 0/1 indicator matrix (multi-label).

    y_database : array-like of shape (n_database,) or (n_database, n_labels)
        Database labels, of the same kind as `y_query`. Relevance is the same
        label (1-D) or at least one shared label (2-D).

    ranking : array-like of int of shape (n_queries, n_ranked)
        Indices into the database, best first.

    Returns
    -------
    precision : ndarray of shape (n_ranked,)
        Mean precision at cut-offs 1, 2, ..., n_ranked.

    recall : ndarray of shape (n_ranked,)
        Mean recall at the same cut-offs (all nan, with an
        ``UndefinedMetricWarning``, if no query has a relevant item).

    ranks : ndarray of shape (n_ranked,)
        The cut-offs, ``1, 2, ..., n_ranked``.

    See Also
    --------
    RetrievalCurveDisplay : Plot these curves.

    Examples
    --------
    >>> import numpy as np
    >>> from skquant.metrics import retrieval_precision_recall_curve
    >>> y_database = np.array([0, 1, 0, 1])
    >>> ranking = np.array([[0, 1, 2, 3]])
    >>> precision, recall, ranks = retrieval_precision_recall_curve(
    ...     [0], y_database, ranking)
    >>> precision
    array([1.        , 0.5       , 0.66666667, 0.5       ])
    >>> recall
    array([0.5, 0.5, 1. , 1. ])
    >>> ranks
    array([1, 2, 3, 4])
    """
    yq, yd, ranking = _validate(y_query, y_database, ranking)
    precision, recall, ranks, _ = _curve_kernel(yq, yd, ranking)
    return precision, recall, ranks
