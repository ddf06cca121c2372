"""Inverted-file (IVF) scan: non-exhaustive AQD search over some cells.

A coarse k-means partitions the database into ``n_lists`` cells; a query only
scans the items of the ``n_probe`` cells whose centroids are nearest to it.
This module is the kernel side: the cell layout of the codes
(:class:`InvertedLists`), cell scores and assignment, and the scan. Training
the coarse centroids and keeping the cells up to date belong to the index
(:class:`~skquant._index.QuantizedIndex`).

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
  index). A query gathers the code rows of its probed cells in one
  fancy-indexing call (each row read as one ``M``-byte word), sums its tables
  over them (pair tables for long scans), and selects its top-k with one
  partition. Per query that is about ten numpy
  calls whatever ``n_probe`` is; a cell-by-cell loop (tried first, with the
  queries of a cell scanned together) spent most of its time in per-cell
  Python overhead at the cell sizes that matter (a few thousand items).
  Queries are spread over threads; a single query's cells are split between
  them. Ties are broken by the lower *original* index, as in exhaustive search.
"""

import numpy as np
from joblib import effective_n_jobs
from sklearn import get_config
from sklearn.utils import gen_batches

from . import _search
from ._search import (
    _MAX_PAIR_CODEWORDS,
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
]

def coarse_scores(X, centroids, metric="euclidean"):
    """Lower-is-better scores of every (vector, cell) pair, (n, n_lists) float64.

    Squared Euclidean distance up to the per-row constant ``||x||^2`` (which
    does not change a row's ranking), or the negated inner product.
    """
    # float64: a float32 GEMM rounds a row's scores differently depending on
    # the rows that share its batch (and on the CPU), which could move an
    # item to another cell or change a query's probes near a tie.
    X = np.asarray(X, dtype=np.float64)
    scores = X @ centroids.T.astype(np.float64)
    if metric == "inner_product":
        return np.negative(scores, out=scores)
    scores *= -2.0
    scores += np.einsum("ld,ld->l", centroids, centroids, dtype=np.float64)[None, :]
    return scores


def assign_lists(X, centroids, metric="euclidean"):
    """Cell of each row of ``X``: its best-scoring centroid, (n,) int32.

    Computed in row chunks bounded by ``working_memory``; ties go to the lower
    cell.
    """
    X = np.asarray(X)
    n_lists = centroids.shape[0]
    out = np.empty(X.shape[0], dtype=np.int32)
    row_bytes = 8 * (n_lists + X.shape[1])
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
    assignments : ndarray of shape (n_items,)
        The cells, as given.
    order : ndarray of shape (n_items,)
        Original index of each stored item (by cell, then by index).
    offsets : ndarray of shape (n_lists + 1,)
        Cell ``l`` holds stored items ``offsets[l]:offsets[l + 1]``.
    """

    def __init__(self, codes, assignments, n_lists):
        assignments = np.asarray(assignments)
        self.codes = codes
        self.assignments = assignments
        index_dtype = np.int32 if len(assignments) < 2**31 else np.int64
        self.order = np.argsort(assignments, kind="stable").astype(index_dtype)
        counts = np.bincount(assignments, minlength=n_lists)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._rows = None

    @property
    def n_lists(self):
        return len(self.offsets) - 1

    @property
    def sizes(self):
        return np.diff(self.offsets)

    @property
    def rows(self):
        """``(rows, words)``: the codes in stored order, (n_items, M), and a
        view of each row as one opaque element, so that gathering the rows of
        some cells is one fancy-indexing pass. Built on first use."""
        if self._rows is None:
            rows = np.ascontiguousarray(self.codes[self.order])
            words = rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).ravel()
            self._rows = (rows, words)
        return self._rows

    def __getstate__(self):
        return {"codes": self.codes, "assignments": self.assignments,
                "n_lists": self.n_lists}

    def __setstate__(self, state):
        self.__init__(state["codes"], state["assignments"], state["n_lists"])


def _select_probes(scores, sizes, n_probe, k):
    """The cells each query scans: its ``n_probe`` best, extended (in score
    order) until they hold at least ``k`` items. Returns one array of cells
    per query."""
    n_queries, n_lists = scores.shape
    n_probe = min(n_probe, n_lists)
    if n_probe < n_lists:
        probes = np.argpartition(scores, n_probe - 1, axis=1)[:, :n_probe]
    else:
        probes = np.broadcast_to(np.arange(n_lists), (n_queries, n_lists))
    probes = list(probes)
    for q in np.flatnonzero(sizes[np.asarray(probes)].sum(axis=1) < k):
        # Rare (tiny cells or large k): rank all cells of this query.
        ranked = np.argsort(scores[q], kind="stable")
        n_needed = np.searchsorted(np.cumsum(sizes[ranked]), k) + 1
        probes[q] = ranked[: max(n_probe, n_needed)]
    return probes


def _positions(offsets, cells):
    """Stored positions of the items of ``cells`` (concatenated)."""
    starts = offsets[cells]
    lengths = offsets[cells + 1] - starts
    total = int(lengths.sum())
    # arange(total) shifted, cell by cell, to each cell's start.
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _scan_queries(tables, scan, ivf, probes, queries, k, budget, n_probed=None):
    """Top-k of each query in ``queries`` over its cells ``probes[q]``.

    Returns (values, original indices), (len(queries), k), sentinel-padded
    when the cells hold fewer than k items (a shard of a split query).
    ``n_probed[q]``, when given, is the number of items query ``q`` probes
    in the whole database (the kernel choice below depends on it, so a
    database split in chunks sums each item the same way).
    """
    words, row_dtype, n_cols = scan
    n_subspaces, n_codewords = tables.shape[1:]
    out_values = np.full((len(queries), k), np.inf, dtype=np.float32)
    out_indices = np.full((len(queries), k), np.iinfo(np.intp).max, dtype=np.intp)
    # Per scanned item: its position, row (twice), pair code, value, term and
    # selection.
    chunk = max(1, budget // (8 + 2 * 2 * n_cols + 2 + 4 + 4 + 5))
    for r, q in enumerate(queries):
        positions = _positions(ivf.offsets, probes[q])
        # Pair tables (K**2 entries per pair) halve the look-ups but cost about
        # K**2 / 4 items' worth of look-ups to build: only for long scans.
        n_scan = len(positions) if n_probed is None else n_probed[q]
        paired = (n_subspaces >= 2 and n_codewords <= _MAX_PAIR_CODEWORDS
                  and 4 * n_scan >= n_codewords**2)
        if paired:
            pair_tables, extra = _pair_tables(tables[q : q + 1])
            pair_tables, extra = pair_tables[0], None if extra is None else extra[0]
        best_v, best_i = out_values[r], out_indices[r]
        for c0 in range(0, len(positions), chunk):
            pos = positions[c0 : c0 + chunk]
            # One gather of whole rows, then contiguous columns for np.take
            # (strided index arrays are several times slower).
            cols = words[pos].view(row_dtype).reshape(len(pos), n_cols).T.copy()
            acc = np.zeros(len(pos), dtype=np.float32)
            tmp = np.empty_like(acc)
            if paired:
                pair = np.empty(len(pos), dtype=np.uint16)
                for j in range(n_subspaces // 2):
                    np.multiply(cols[2 * j], n_codewords, out=pair, dtype=np.uint16)
                    pair += cols[2 * j + 1]
                    np.take(pair_tables[j], pair, out=tmp, mode="clip")
                    acc += tmp
                if extra is not None:
                    np.take(extra, cols[-1], out=tmp, mode="clip")
                    acc += tmp
            else:
                for m in range(n_subspaces):
                    np.take(tables[q, m], cols[m], out=tmp, mode="clip")
                    acc += tmp
            # Candidates: the chunk's k best and ties, below the current k-th.
            if len(acc) > k:
                kth = np.partition(acc, k - 1)[k - 1]
                cand = np.flatnonzero(acc <= min(kth, best_v[-1]))
            else:
                cand = np.flatnonzero(acc <= best_v[-1])
            if not cand.size:
                continue
            values = np.concatenate([best_v, acc[cand]])
            ids = np.concatenate([best_i, ivf.order[pos[cand]]])
            keep = np.lexsort((ids, values))[:k]
            best_v[:], best_i[:] = values[keep], ids[keep]
    return out_values, out_indices


def ivf_search(tables, scores, ivf, n_neighbors, *, n_probe=1, n_jobs=None,
               cell_sizes=None, refine=True):
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
        Threads: over queries for batches, over a query's cells for one query.
    cell_sizes : ndarray of shape (n_lists,), default=None
        Items per cell of the whole database when ``ivf`` holds one chunk of
        it (see :mod:`skquant._dask_index`): probes and kernels are chosen
        from these, so that every chunk scans the cells, and sums the items,
        as the whole database would. None: ``ivf.sizes``.
    refine : bool, default=True
        False returns the candidates as selected: the best by (float32 sum,
        index), with those sums, padded with ``(inf, max intp)`` where the
        probed cells of ``ivf`` hold fewer than ``n_neighbors`` items.

    Returns
    -------
    values : ndarray of shape (n_queries, n_neighbors), float64
        Table sums (recomputed in float64 for the selected items), ascending.
    indices : ndarray of shape (n_queries, n_neighbors), intp
        Original database indices; equal values ordered by lower index.

    Examples
    --------
    >>> import numpy as np
    >>> from skquant._ivf import InvertedLists, ivf_search
    >>> codes = np.array([[0], [1], [1], [0]], dtype=np.uint8)
    >>> ivf = InvertedLists(codes, assignments=[0, 0, 1, 1], n_lists=2)
    >>> tables = np.array([[[0.0, 1.0]]], dtype=np.float32)  # 1 query, M=1, K=2
    >>> scores = np.array([[0.0, 1.0]])  # cell 0 is the nearest
    >>> ivf_search(tables, scores, ivf, 2, n_probe=1)
    (array([[0., 1.]]), array([[0, 1]]))
    """
    tables = np.asarray(tables, dtype=np.float32)
    n_queries, n_subspaces, n_codewords = tables.shape
    sizes = ivf.sizes if cell_sizes is None else np.asarray(cell_sizes)
    n_items = int(sizes.sum())
    if not 1 <= n_neighbors <= n_items:
        raise ValueError(
            f"Expected 1 <= n_neighbors <= n_items, got n_neighbors={n_neighbors} "
            f"and n_items={n_items}."
        )
    probes = _select_probes(scores, sizes, n_probe, n_neighbors)
    n_probed = None if cell_sizes is None else [int(sizes[p].sum()) for p in probes]
    rows, words = ivf.rows
    scan = (words, rows.dtype, rows.shape[1])
    budget = max(1, int(get_config()["working_memory"] * 2**20))

    n_scanned = sum(int(ivf.sizes[p].sum()) for p in probes)
    n_jobs = max(1, min(effective_n_jobs(n_jobs), n_scanned // _search._MIN_SHARD_WORK))
    if n_jobs == 1 or n_queries >= n_jobs:
        groups = [g for g in np.array_split(np.arange(n_queries), n_jobs) if len(g)]
        results = _run_shards(
            _scan_queries, groups,
            lambda g: (tables, scan, ivf, probes, g, n_neighbors, budget, n_probed),
        )
        values = np.vstack([v for v, _ in results])
        indices = np.vstack([i for _, i in results])
    else:
        # Fewer queries than threads: each thread scans a share of every
        # query's cells (cells are split, the items of a cell never are).
        shares = [[np.array_split(p, n_jobs)[t] for p in probes] for t in range(n_jobs)]
        everyone = np.arange(n_queries)
        results = _run_shards(
            _scan_queries, list(range(n_jobs)),
            lambda t: (tables, scan, ivf, shares[t], everyone, n_neighbors, budget,
                       n_probed),
        )
        values = np.hstack([v for v, _ in results])
        indices = np.hstack([i for _, i in results])
        if not refine:
            order = np.lexsort((indices, values), axis=1)[:, :n_neighbors]
            return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)
        indices = _merge_topk(values, indices, n_neighbors)
    if not refine:
        return values, indices
    return _refine(tables, ivf.codes, indices)
