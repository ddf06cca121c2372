"""Inverted file (IVF) for non-exhaustive AQD search.

A coarse k-means partitions the database into ``n_lists`` cells; a query only
scans the items of the ``n_probe`` cells whose centroids are nearest to it.

Design choices (shared by every estimator, see ``benchmarks/bench_search.py``):

* **Direct codes.** Items keep the codes the estimator gave them; the cells
  only reorder them. Residual codes (faiss ``IndexIVFPQ``) quantize ``x - c``
  with codebooks trained on residuals, which would mean retraining each
  estimator's (supervised, jointly learned) codebooks per cell and changing
  what ``codes_`` and ``decode`` mean. With direct codes the AQD of a scanned
  item is exactly its exhaustive AQD, so with ``n_probe = n_lists`` the result
  *is* the exhaustive search, and recall is only lost on items of unprobed
  cells. One lookup table per query serves all its cells.
* **Cells of the reconstructions.** Items are assigned by their decoded vector
  ``x̂`` (the point the AQD ranks), so the cells can be rebuilt from codes
  alone (after ``index``, ``add``, unpickling, or setting ``codes_``), and a
  database item used as a query (``kneighbors(X=None)``) probes its own cell
  first.
* **Scan.** Cells are stored contiguously (codes permuted by cell, then by
  index), so a cell is a slice of each sub-space's code row. A batch is
  processed cell by cell: the queries probing a cell scan it together
  (database-major gather for a block of queries, per-query pair tables for
  one or two), with the running-threshold top-k of :mod:`skquant._search`.
  Ties are broken by the lower *original* index, as in exhaustive search.
"""

import numpy as np
from joblib import effective_n_jobs
from sklearn import get_config
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state, gen_batches

from ._search import (
    _MAX_PAIR_CODEWORDS,
    _empty_best,
    _merge_into,
    _merge_topk,
    _pair_tables,
    _refine,
    _run_shards,
)

__all__ = [
    "InvertedLists",
    "assign_lists",
    "coarse_scores",
    "ivf_search",
    "train_coarse_quantizer",
]

# faiss's rule of thumb: more than 256 training points per centroid adds little.
_MAX_POINTS_PER_LIST = 256
# Below this many queries probing a cell, per-query pair tables beat the
# database-major gather.
_CELL_BATCH_MIN = 4
# Largest batch that gets pair tables (1 MiB per query at M=8, K=256).
_PAIR_MAX_QUERIES = 16


def train_coarse_quantizer(X, n_lists, *, metric="euclidean", random_state=None):
    """Coarse centroids of an inverted file: k-means on (a sample of) ``X``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Vectors to partition (the database reconstructions).
    n_lists : int
        Number of cells; at most ``n_samples``.
    metric : {"euclidean", "inner_product"}, default="euclidean"
        For inner product the centroids are L2-normalised (spherical cells),
        so the most similar centroid is also the nearest one.
    random_state : int, RandomState instance or None, default=None
        Seeds the sub-sample and k-means.

    Returns
    -------
    centroids : ndarray of shape (n_lists, n_features), float32

    Examples
    --------
    >>> import numpy as np
    >>> from skquant._ivf import train_coarse_quantizer, assign_lists
    >>> X = np.r_[np.zeros((5, 2)), np.ones((5, 2))]
    >>> centroids = train_coarse_quantizer(X, 2, random_state=0)
    >>> len(np.unique(assign_lists(X, centroids)))
    2
    """
    X = np.asarray(X)
    n_samples = X.shape[0]
    if not 1 <= n_lists <= n_samples:
        raise ValueError(
            f"n_lists={n_lists} must be between 1 and the number of indexed items "
            f"n_samples={n_samples}. Use a smaller n_lists (about sqrt(n_samples) "
            f"is a good start) or n_lists=None for exhaustive search."
        )
    rng = check_random_state(random_state)
    max_points = _MAX_POINTS_PER_LIST * n_lists
    if n_samples > max_points:
        X = X[np.sort(rng.choice(n_samples, max_points, replace=False))]
    kmeans = KMeans(n_clusters=n_lists, n_init=1, max_iter=50, random_state=rng)
    centroids = kmeans.fit(np.asarray(X, dtype=np.float32)).cluster_centers_
    if metric == "inner_product":
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        centroids = centroids / np.maximum(norms, np.finfo(np.float32).tiny)
    return np.ascontiguousarray(centroids, dtype=np.float32)


def coarse_scores(X, centroids, metric="euclidean"):
    """Lower-is-better scores of every (vector, cell) pair, (n, n_lists) float32.

    Squared Euclidean distance up to the per-row constant ``||x||^2`` (which
    does not change a row's ranking), or the negated inner product.
    """
    X = np.asarray(X, dtype=np.float32)
    scores = X @ centroids.T
    if metric == "inner_product":
        return np.negative(scores, out=scores)
    scores *= -2.0
    scores += np.einsum("ld,ld->l", centroids, centroids)[None, :]
    return scores


def assign_lists(X, centroids, metric="euclidean"):
    """Cell of each row of ``X``: its best-scoring centroid, (n,) int32.

    Computed in row chunks bounded by ``working_memory``; ties go to the lower
    cell.
    """
    X = np.asarray(X)
    n_lists = centroids.shape[0]
    out = np.empty(X.shape[0], dtype=np.int32)
    row_bytes = 4 * (n_lists + X.shape[1])
    rows = max(1, int(get_config()["working_memory"] * 2**20) // row_bytes)
    for batch in gen_batches(X.shape[0], rows):
        out[batch] = np.argmin(coarse_scores(X[batch], centroids, metric), axis=1)
    return out


class InvertedLists:
    """Codes grouped by cell, contiguous per cell.

    Parameters
    ----------
    codes : ndarray of shape (n_items, n_codebooks)
        Database codes.
    assignments : ndarray of shape (n_items,)
        Cell of each item, in ``[0, n_lists)``.
    n_lists : int
        Number of cells.

    Attributes
    ----------
    codes : ndarray of shape (n_items, n_codebooks)
        The codes in original order (a reference, not a copy).
    order : ndarray of shape (n_items,)
        Original index of each stored item (by cell, then by index).
    offsets : ndarray of shape (n_lists + 1,)
        Cell ``l`` holds stored items ``offsets[l]:offsets[l + 1]``.
    codes_t : ndarray of shape (n_codebooks, n_items)
        Codes in stored order, one contiguous row per sub-space.
    """

    def __init__(self, codes, assignments, n_lists):
        assignments = np.asarray(assignments)
        self.codes = codes
        self.assignments = assignments
        index_dtype = np.int32 if len(assignments) < 2**31 else np.int64
        self.order = np.argsort(assignments, kind="stable").astype(index_dtype)
        counts = np.bincount(assignments, minlength=n_lists)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        codes_t = np.empty((codes.shape[1], codes.shape[0]), dtype=codes.dtype)
        for m in range(codes.shape[1]):
            np.take(codes[:, m], self.order, out=codes_t[m])
        self.codes_t = codes_t
        self._pair_codes = None

    @property
    def n_lists(self):
        return len(self.offsets) - 1

    @property
    def sizes(self):
        return np.diff(self.offsets)

    def pair_codes(self, n_codewords):
        """(M // 2, n_items) uint16 pair codes in stored order (see CodeLayout)."""
        if self._pair_codes is None or self._pair_codes[0] != n_codewords:
            n_pairs = self.codes_t.shape[0] // 2
            pairs = np.empty((n_pairs, self.codes_t.shape[1]), dtype=np.uint16)
            for j in range(n_pairs):
                np.multiply(self.codes_t[2 * j], n_codewords, out=pairs[j], dtype=np.uint16)
                pairs[j] += self.codes_t[2 * j + 1]
            self._pair_codes = (n_codewords, pairs)
        return self._pair_codes[1]


def _select_probes(scores, sizes, n_probe, k):
    """The cells each query scans: its ``n_probe`` best, extended (in score
    order) until they hold at least ``k`` items. Returns ``(queries, cells)``
    pairs."""
    n_queries, n_lists = scores.shape
    n_probe = min(n_probe, n_lists)
    if n_probe < n_lists:
        probes = np.argpartition(scores, n_probe - 1, axis=1)[:, :n_probe]
    else:
        probes = np.broadcast_to(np.arange(n_lists), (n_queries, n_lists))
    short = np.flatnonzero(sizes[probes].sum(axis=1) < k)
    queries = [np.repeat(np.arange(n_queries), probes.shape[1])]
    cells = [probes.ravel()]
    if short.size:
        # Rare (tiny cells or large k): rank all cells of these queries.
        keep = np.ones(n_queries, dtype=bool)
        keep[short] = False
        queries = [np.repeat(np.flatnonzero(keep), probes.shape[1])]
        cells = [probes[keep].ravel()]
        for q in short:
            ranked = np.argsort(scores[q], kind="stable")
            n_needed = np.searchsorted(np.cumsum(sizes[ranked]), k) + 1
            chosen = ranked[: max(n_probe, n_needed)]
            queries.append(np.full(len(chosen), q))
            cells.append(chosen)
    return np.concatenate(queries), np.concatenate(cells)


def _scan_cells(tables, pairs, ivf, query_ids, cell_ids, k):
    """Scan the (query, cell) pairs; running top-k for all queries.

    Pairs are processed cell by cell, all the queries probing a cell together.
    """
    n_queries, n_subspaces, _ = tables.shape
    best_values, best_indices = _empty_best(n_queries, k)
    n_found = np.zeros(n_queries, dtype=np.int64)
    order = np.lexsort((query_ids, cell_ids))
    query_ids, cell_ids = query_ids[order], cell_ids[order]
    bounds = np.flatnonzero(np.diff(cell_ids)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(cell_ids)]])
    codes_t = ivf.codes_t
    for a, b in zip(starts, stops):
        cell = cell_ids[a]
        i0, i1 = ivf.offsets[cell], ivf.offsets[cell + 1]
        if i1 == i0:
            continue
        qs = query_ids[a:b]
        n = i1 - i0
        if pairs is not None and len(qs) < _CELL_BATCH_MIN:
            pair_tables, extra, pair_codes = pairs
            acc = np.empty((n, len(qs)), dtype=np.float32, order="F")
            tmp = np.empty(n, dtype=np.float32)
            for c, q in enumerate(qs):
                col = acc[:, c]
                np.take(pair_tables[q, 0], pair_codes[0, i0:i1], out=col, mode="clip")
                for j in range(1, pair_tables.shape[1]):
                    np.take(pair_tables[q, j], pair_codes[j, i0:i1], out=tmp, mode="clip")
                    col += tmp
                if extra is not None:
                    np.take(extra[q], codes_t[-1, i0:i1], out=tmp, mode="clip")
                    col += tmp
        else:
            # (M, K, nq) tables of these queries, then database-major gather.
            sub = np.ascontiguousarray(tables[qs].transpose(1, 2, 0))
            acc = np.take(sub[0], codes_t[0, i0:i1], axis=0)
            tmp = np.empty_like(acc)
            for m in range(1, n_subspaces):
                np.take(sub[m], codes_t[m, i0:i1], axis=0, out=tmp, mode="clip")
                acc += tmp
        ids = ivf.order[i0:i1]
        fresh = n_found[qs] < k
        # Cells come in cell order, not index order, so items equal to the
        # current k-th value may still win on index: compare with <=.
        hits = np.flatnonzero(acc <= best_values[qs, k - 1])
        if fresh.any() and hits.size > k * len(qs):
            # A query's first cells select everything: prune them per column.
            cols = np.flatnonzero(fresh)
            kk = min(k, n)
            kth = np.partition(acc[:, cols], kk - 1, axis=0)[kk - 1]
            thresholds = best_values[qs, k - 1].copy()
            thresholds[cols] = np.minimum(thresholds[cols], kth)
            hits = np.flatnonzero(acc <= thresholds)
        n_found[qs] += n
        if hits.size:
            items, cols = np.divmod(hits, len(qs))
            _merge_into(best_values, best_indices, qs[cols], acc[items, cols], ids[items])
    return best_values, best_indices


def ivf_search(tables, scores, ivf, n_neighbors, *, n_probe=1, n_jobs=None):
    """Non-exhaustive AQD search over the best ``n_probe`` cells of each query.

    Parameters
    ----------
    tables : ndarray of shape (n_queries, n_codebooks, n_codewords)
        Lookup tables, lower is better.
    scores : ndarray of shape (n_queries, n_lists)
        Coarse scores, lower is better (:func:`coarse_scores`).
    ivf : InvertedLists
        The database grouped by cell.
    n_neighbors : int
        Results per query, at most the number of items.
    n_probe : int, default=1
        Cells scanned per query (more when they hold fewer than
        ``n_neighbors`` items, so that every query gets ``n_neighbors``).
    n_jobs : int, default=None
        Threads: over query groups for batches, over cells for a single query.

    Returns
    -------
    values : ndarray of shape (n_queries, n_neighbors), float64
        Table sums (recomputed in float64 for the selected items), ascending.
    indices : ndarray of shape (n_queries, n_neighbors), intp
        Original database indices; equal values ordered by lower index.
    """
    tables = np.asarray(tables, dtype=np.float32)
    n_queries, n_subspaces, n_codewords = tables.shape
    n_items = ivf.codes_t.shape[1]
    if not 1 <= n_neighbors <= n_items:
        raise ValueError(
            f"Expected 1 <= n_neighbors <= n_items, got n_neighbors={n_neighbors} "
            f"and n_items={n_items}."
        )
    query_ids, cell_ids = _select_probes(scores, ivf.sizes, n_probe, n_neighbors)

    pairs = None
    if n_subspaces >= 2 and n_codewords <= _MAX_PAIR_CODEWORDS:
        # Pair tables (K**2 floats per pair and query) only for small batches,
        # whose cells are mostly scanned by one query.
        if n_queries <= _PAIR_MAX_QUERIES:
            pair_tables, extra = _pair_tables(tables)
            pairs = (pair_tables, extra, ivf.pair_codes(n_codewords))

    n_jobs = max(1, min(effective_n_jobs(n_jobs), len(cell_ids)))
    if n_jobs == 1:
        groups = [np.arange(len(cell_ids))]
    elif n_queries >= n_jobs:
        # Split the queries: each thread scans its queries' cells.
        groups = [np.flatnonzero(np.isin(query_ids, g))
                  for g in np.array_split(np.arange(n_queries), n_jobs)]
    else:
        # Few queries: split their cells, balancing the items scanned.
        sizes = ivf.sizes[cell_ids]
        cut = np.searchsorted(np.cumsum(sizes), np.arange(1, n_jobs) * sizes.sum() / n_jobs)
        groups = np.split(np.arange(len(cell_ids)), cut)
    groups = [g for g in groups if len(g)]
    results = _run_shards(
        _scan_cells, groups,
        lambda g: (tables, pairs, ivf, query_ids[g], cell_ids[g], n_neighbors),
    )
    if len(results) == 1:
        indices = results[0][1]
    else:
        values = np.hstack([v for v, _ in results])
        indices = _merge_topk(values, np.hstack([i for _, i in results]), n_neighbors)[1]
    return _refine(tables, ivf.codes, indices)
