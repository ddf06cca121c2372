"""Inverted-file (IVF) scan: non-exhaustive AQD search over some cells.

A coarse k-means partitions the database into ``n_lists`` cells; a query only
scans the items of the ``n_probe`` cells whose centroids are nearest to it.
This module is the kernel side: the cell layout of the codes
(:class:`InvertedLists`), cell scores and assignment, and the scan. Training
the coarse centroids and keeping the cells up to date belong to the index
(:class:`~skquant._index.QuantizedIndex`).

Two kinds of codes share the scan (see :class:`~skquant._index.QuantizedIndex`):

* **Direct codes** (the deep estimators, ``ProductQuantizer(by_residual=
  False)``): items keep the codes the estimator gave them; the cells, fitted
  to the reconstructions, only reorder them. A scanned item's value is its
  exhaustive AQD, one lookup table per query serves all its cells, and with
  every cell probed the result *is* the exhaustive search.
* **Residual codes** (``ProductQuantizer`` with ``n_lists``, the default):
  codes of ``x - c``, faiss ``IndexIVFPQ``'s. An item's value adds a
  per-item term (``ivf.item_bias``) and its cell's coarse score for the query
  to the same kind of one-table-per-query sum (``add_scores=True``), the
  exact decomposition of ``||q - c - r||^2`` up to ``||q||^2``.

The scan (``benchmarks/bench_search.py --ivf`` measures it against faiss):

* **Batches, cell by cell.** The (query, cell) pairs are grouped by cell, so
  each probed cell is read once for all the queries that probe it, in
  database-major blocks of at most 64 queries (a code's row of all the
  block's queries one gather). Two passes: each query's
  best cell first, whose ``k``-th value becomes the query's threshold, then
  the other cells, where an entry costs a compare against it instead of a
  partition. All candidates are merged at the end by ``(value, index)``.
* **A few queries, one at a time**, over the concatenation of their cells'
  code runs (cells are contiguous per codebook, adjacent cells read as one
  run), the best cell first; then a quarter of the terms, a bound, and the
  other look-ups for the few survivors.
* **One thread.** The scan is many small numpy calls per cell, which hold
  the GIL between them: threads measured slower, so ``n_jobs`` does not
  split it (the exhaustive kernels and a dask database's chunks do run in
  parallel).
* **Cells that cannot hold a result are skipped** (residual codes): a cell's
  items are worth at least its coarse score plus its lowest item term plus
  the tables' row minima (:func:`_cell_lower_bounds`); once a query's best
  cell has given it a ``k``-th value, a probed cell whose bound exceeds it
  (by more than a float32 rounding slack) is not read. No result changes;
  with many probes most far cells go (about 80 % of the items at
  ``n_probe = n_lists`` on clustered data).
* Every path sums an item's terms in the same order (``t0 + t1 + t2 +
  ...`` left to right, then the item and cell terms), so an item's float32 value
  does not depend on the path, the batch or the threads; ties are broken by
  the lower *original* index, as in exhaustive search.
"""

import threading

import numpy as np
from sklearn import get_config
from sklearn.utils import gen_batches

from ._search import _refine

__all__ = [
    "InvertedLists",
    "assign_lists",
    "coarse_scores",
    "ivf_search",
    "nearest",
]

# float32 scores per block of rows in nearest(): 2 MiB, so that the passes
# after the GEMM read them from cache.
_NEAREST_BLOCK = 2**19
# Queries from which a batch is scanned cell by cell (each probed cell read
# once for all the queries that probe it); fewer queries are scanned one at a
# time over the concatenation of their cells.
_GROUPED_MIN_QUERIES = 8
# (items x queries) entries of one block of the grouped scan: 2**18 float32
# (1 MiB) accumulators stay in cache.
_BLOCK_PAIRS = 2**18
# Queries per block of the grouped scan: their tables, database-major
# (M x K x 64 float32, 512 KiB at M = 8, K = 256), are gathered once per cell
# and stay in cache; larger blocks cost more to gather than they save.
_QUERY_BLOCK = 64
# Cells probed by fewer queries than this, in the second pass (thresholds
# known), are bounded query by query like the one-query scan; more share
# one database-major sum.
_FEW_QUERIES = 3


def coarse_scores(X, centroids, metric="euclidean", norms=None):
    """Lower-is-better scores of every (vector, cell) pair, (n, n_lists) float64.

    Squared Euclidean distance up to the per-row constant ``||x||^2`` (which
    does not change a row's ranking), or the negated inner product.
    ``norms``: the centroids' squared norms (float64), when already known.
    """
    # float64: a float32 GEMM rounds a row's scores differently depending on
    # the rows that share its batch (and on the CPU), which could move an
    # item to another cell or change a query's probes near a tie.
    X = np.asarray(X, dtype=np.float64)
    scores = X @ np.asarray(centroids, dtype=np.float64).T
    if metric == "inner_product":
        return np.negative(scores, out=scores)
    scores *= -2.0
    if norms is None:
        norms = np.einsum("ld,ld->l", centroids, centroids, dtype=np.float64)
    scores += norms[None, :]
    return scores


def nearest(X, centroids, exact_scores, *, norms=None):
    """``argmin(exact_scores(X), axis=1)``, mostly without computing it.

    ``exact_scores(rows)`` are float64 scores ``norms - 2 <x, c>`` (``norms``
    given: squared Euclidean distances up to ``||x||^2``) or ``-<x, c>``
    (``norms`` None), of float32 ``centroids``. They are first computed with
    a float32 GEMM (several times faster); a row whose best float32 score
    is not ahead of every other by more than twice a rigorous bound on the
    float32 error is recomputed with ``exact_scores``. Every other row's
    float32 winner is the exact winner, hence the float64 one: the result
    is bitwise that of the float64 computation, whatever the batch and the
    BLAS (ties go to the lower index, as ``argmin``).

    The float32 scores come from one GEMM of ``[x, 1]`` with ``[-2 c, ||c||^2]``
    (the scaling and the norms folded in), in blocks of rows whose scores
    stay in cache: after the GEMM, two passes over them (best, then second
    best), read from cache rather than memory.
    """
    X = np.asarray(X)
    n, dim = X.shape
    c32 = np.asarray(centroids, dtype=np.float32)
    n_centroids = c32.shape[0]
    c_max = float(np.sqrt(np.max(np.einsum("ld,ld->l", c32, c32, dtype=np.float64))))
    n_max = 0.0
    # (-2 c and -c are exact in float32.)
    if norms is not None:
        weights = np.empty((dim + 1, n_centroids), dtype=np.float32)
        np.multiply(c32.T, np.float32(-2.0), out=weights[:dim])
        weights[dim] = norms
        n_max = float(np.max(np.abs(norms)))
    else:
        weights = np.ascontiguousarray(-c32.T)
    n_cols = weights.shape[0]
    rows = max(1, min(n, _NEAREST_BLOCK // max(n_centroids, 1)))
    xa = np.ones((rows, n_cols), dtype=np.float32)
    scores_buf = np.empty((rows, n_centroids), dtype=np.float32)
    best = np.empty(n, dtype=np.intp)
    margin = np.empty(n, dtype=np.float64)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        xb = xa[: r1 - r0]
        xb[:, :dim] = X[r0:r1]
        scores = np.matmul(xb, weights, out=scores_buf[: r1 - r0])
        b = np.argmin(scores, axis=1)
        ar = np.arange(r1 - r0)
        s_best = scores[ar, b]
        scores[ar, b] = np.inf
        second = scores.min(axis=1) if n_centroids > 1 else np.full(r1 - r0, np.inf)
        best[r0:r1] = b
        margin[r0:r1] = second.astype(np.float64) - s_best
        margin[r0:r1][~np.isfinite(s_best)] = -np.inf
    # Error of a float32 score against the exact one: rounding X to float32
    # and the dot products (gamma_(dim+1) * (2 ||x|| ||c|| + |norm|) by
    # Cauchy-Schwarz, any summation order), the norms' rounding; about 2x
    # margin over that first-order bound.
    x_norm = np.sqrt(np.einsum("nd,nd->n", X, X, dtype=np.float64))
    bound = 2.0**-22 * (dim + 8) * (x_norm * c_max + n_max + 1e-30)
    unsure = np.flatnonzero(~(margin > 2.0 * bound))
    if unsure.size:
        best[unsure] = np.argmin(exact_scores(X[unsure]), axis=1)
    return best


def assign_lists(X, centroids, metric="euclidean"):
    """Cell of each row of ``X``: its best-scoring centroid, (n,) int32.

    The argmin of :func:`coarse_scores` (float64), computed in row chunks
    bounded by ``working_memory`` with a float32 GEMM certified by
    :func:`nearest`; ties go to the lower cell.
    """
    X = np.asarray(X)
    n_lists = centroids.shape[0]
    out = np.empty(X.shape[0], dtype=np.int32)
    row_bytes = 12 * (n_lists + X.shape[1])
    rows = max(1, int(get_config()["working_memory"] * 2**20) // row_bytes)
    norms = None
    if metric != "inner_product":
        norms = np.einsum("ld,ld->l", centroids, centroids, dtype=np.float64)
    for batch in gen_batches(X.shape[0], rows):
        out[batch] = nearest(
            X[batch], centroids, lambda rows: coarse_scores(rows, centroids, metric),
            norms=norms,
        )
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
    item_bias : ndarray of shape (n_items,), default=None
        A per-item term added to every table sum (float32), e.g. the
        query-independent part ``||r||^2 + 2 <c, r>`` of residual codes.

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

    def __init__(self, codes, assignments, n_lists, item_bias=None):
        assignments = np.asarray(assignments)
        self.codes = codes
        self.assignments = assignments
        # Kept in original order only until the stored layout holds it.
        self._item_bias = item_bias
        index_dtype = np.int32 if len(assignments) < 2**31 else np.int64
        self.order = np.argsort(assignments, kind="stable").astype(index_dtype)
        counts = np.bincount(assignments, minlength=n_lists)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._sizes = counts.astype(np.int64)
        self._stored = None
        self._bias_bounds = None
        self._lock = threading.Lock()

    @property
    def n_lists(self):
        return len(self.offsets) - 1

    @property
    def sizes(self):
        """Items per cell, (n_lists,) int64."""
        return self._sizes

    @property
    def stored(self):
        """``(codes_t, bias)``: the codes in stored order as (M, n_items)
        C-contiguous rows (a cell's codes of one codebook are one contiguous
        run) and the item bias in stored order (float32, or None). Built on
        first use."""
        with self._lock:  # concurrent searches build it once
            if self._stored is None:
                codes_t = np.empty((self.codes.shape[1], len(self.order)),
                                   dtype=self.codes.dtype)
                for m in range(self.codes.shape[1]):
                    np.take(self.codes[:, m], self.order, out=codes_t[m])
                bias = None
                if self._item_bias is not None:
                    bias = np.asarray(self._item_bias, dtype=np.float32)[self.order]
                self._stored = (codes_t, bias)
                # One copy per item is enough (4 bytes per item): the
                # original order is rebuilt from it when asked for.
                self._item_bias = None
            return self._stored

    @property
    def has_item_bias(self):
        """Whether the items carry a per-item term (residual codes)."""
        with self._lock:
            stored = self._stored
            return self._item_bias is not None or (stored is not None and stored[1] is not None)

    @property
    def item_bias(self):
        """The per-item term in original order (float32), or None."""
        with self._lock:
            if self._stored is None:
                return self._item_bias
            bias = self._stored[1]
        if bias is None:
            return None
        original = np.empty_like(bias)
        original[self.order] = bias
        return original

    @property
    def bias_bounds(self):
        """``(lowest, largest magnitude)`` of the item bias in each cell,
        (n_lists,) float64 each (``+inf`` and 0 for an empty cell): what
        :func:`_cell_lower_bounds` needs. Built on first use."""
        if self._bias_bounds is None:
            _, bias = self.stored
            lowest = np.full(self.n_lists, np.inf)
            largest = np.zeros(self.n_lists)
            filled = np.flatnonzero(self._sizes)
            if filled.size:
                starts = self.offsets[filled]
                lowest[filled] = np.minimum.reduceat(bias, starts)
                largest[filled] = np.maximum.reduceat(np.abs(bias), starts)
            self._bias_bounds = (lowest, largest)
        return self._bias_bounds

    def __getstate__(self):
        return {"codes": self.codes, "assignments": self.assignments,
                "n_lists": self.n_lists, "item_bias": self.item_bias}

    def __setstate__(self, state):
        self.__init__(state["codes"], state["assignments"], state["n_lists"],
                      state.get("item_bias"))


def _select_probes(scores, sizes, n_probe, k):
    """The (query, cell) pairs to scan: each query's ``n_probe`` best cells,
    extended (in score order) until they hold at least ``k`` items.

    Returns ``(pair_queries, pair_cells, best)``: the pairs, by query, and
    each query's best cell.
    """
    n_queries, n_lists = scores.shape
    n_probe = min(n_probe, n_lists)
    best = np.argmin(scores, axis=1)
    if n_probe == 1:
        probes = best[:, None]
    elif n_probe < n_lists:
        probes = np.argpartition(scores, n_probe - 1, axis=1)[:, :n_probe]
    else:
        probes = np.broadcast_to(np.arange(n_lists), (n_queries, n_lists))
    short = np.flatnonzero(sizes[probes].sum(axis=1) < k)
    if not short.size:
        pair_queries = np.repeat(np.arange(n_queries), probes.shape[1])
        return pair_queries, probes.ravel(), best
    # Rare (tiny cells or large k): rank all cells of these queries.
    lists = list(probes)
    for q in short:
        ranked = np.argsort(scores[q], kind="stable")
        n_needed = np.searchsorted(np.cumsum(sizes[ranked]), k) + 1
        lists[q] = ranked[: max(n_probe, n_needed)]
    lengths = [len(p) for p in lists]
    return np.repeat(np.arange(n_queries), lengths), np.concatenate(lists), best


def _sum_in_order(term, n_subspaces):
    """``t_0 + t_1 + ... + t_{M-1}``, left to right, ``term(m, out=None)``
    giving the float32 terms of sub-space ``m``.

    The one order every scan sums in, so that the float32 value of an item
    does not depend on the path (batch or one query, bounded or not); it is
    also the order of :func:`torch.nn.functional.embedding_bag`'s sum.
    """
    acc = term(0)
    if n_subspaces > 1:
        tmp = np.empty_like(acc)
        for m in range(1, n_subspaces):
            acc += term(m, tmp)
    return acc


class _CellSums:
    """Table sums of a range of stored items for a group of queries: an
    (items, queries) float32 array ``t_0 + ... + t_{M-1} (+ item bias + cell
    bias)``, in the order of :func:`_sum_in_order`.

    The queries' tables are laid out database-major, so that a code's row of
    all the group's queries is one contiguous gather (``np.take(axis=0)``);
    one query takes 1-D look-ups. (torch's ``embedding_bag``, which the
    exhaustive batch kernel uses, measured 2x slower here with its default
    threads: a cell is too small a call to share.)
    """

    def __init__(self, tables, ivf, cell_bias):
        n_queries, n_subspaces, n_codewords = tables.shape
        self.tables = tables
        self.flat_tables = tables.reshape(n_queries, n_subspaces * n_codewords)
        self.codes_t, self.bias = ivf.stored
        self.cell_bias = cell_bias
        self._block = None
        self._bounds = None

    def _block_tables(self, queries):
        """The queries' tables database-major, (M * K, queries) C-contiguous:
        a code's row of all the queries is one contiguous gather. (Rows
        gathered, then transposed: 5x faster than gathering columns.)"""
        if self._block is None or self._block[0] is not queries:
            self._block = (queries, np.ascontiguousarray(self.flat_tables[queries].T))
        return self._block[1]

    @property
    def table_bounds(self):
        """:func:`_table_bounds` of every query's tables, computed once."""
        if self._bounds is None:
            self._bounds = _table_bounds(self.tables)
        return self._bounds

    def below(self, q, cell, a, b, threshold):
        """Items ``a:b`` (of ``cell``) worth at most ``threshold`` to query
        ``q``: ``(values, positions from a)``, by :func:`_prune_and_finish`."""
        table_mins, table_abs = self.table_bounds
        item_bias = cell_term = None
        if self.bias is not None:
            item_bias, cell_term = self.bias[a:b], self.cell_bias[q, cell]
        return _prune_and_finish(self.tables[q], self.codes_t[:, a:b], item_bias, cell_term,
                                 threshold, table_mins[q], float(table_abs[q]))

    def __call__(self, queries, cell, a, b):
        n_subspaces, n_codewords = self.tables.shape[1:]
        codes_t = self.codes_t
        if len(queries) == 1:
            table = self.tables[queries[0]]
            acc = _sum_in_order(
                lambda m, out=None: np.take(table[m], codes_t[m, a:b], out=out, mode="clip"),
                n_subspaces,
            )[:, None]
        else:
            block = self._block_tables(queries).reshape(n_subspaces, n_codewords, len(queries))
            acc = _sum_in_order(
                lambda m, out=None: np.take(block[m], codes_t[m, a:b], axis=0, out=out,
                                            mode="clip"),
                n_subspaces,
            )
        if self.bias is not None:
            acc += self.bias[a:b, None]
            acc += self.cell_bias[queries, cell][None, :]
        return acc


def _table_bounds(tables):
    """Per query: its tables' row minima, float64 ``(..., M)``, and the sum of
    their rows' largest magnitudes, float64 ``(...)`` (the scale of the
    rounding slack of a sum of look-ups)."""
    return (tables.min(axis=-1).astype(np.float64),
            np.abs(tables).max(axis=-1).sum(axis=-1, dtype=np.float64))


def _cell_lower_bounds(scores, cells, table_min, table_abs, ivf, n_subspaces):
    """Residual codes: a lower bound on every item value of cell ``cells[i]``
    for a query whose coarse score for it is ``scores[i]`` (float32), and
    the rounding slack to allow it, float64. ``table_min`` (the sum of the
    query's table row minima) and ``table_abs`` (:func:`_table_bounds`) are
    per pair or one query's scalars.

    An item of cell ``c`` is worth ``S + b + s_c`` (table sum, item bias,
    the cell's coarse score for the query), and ``S`` is at least the sum of
    the tables' row minima, ``b`` at least the cell's lowest item bias. A
    cell whose bound exceeds a query's running ``k``-th value by more than
    the slack cannot hold one of its results (not even a tie): the scan
    skips it, which changes no result. The slack bounds the float32 rounding
    of an item's value (``M + 2`` additions, terms bounded by the tables'
    largest magnitudes, the cell's largest bias and the coarse score) with a
    4x margin.
    """
    lowest, largest = ivf.bias_bounds
    scores = np.asarray(scores, dtype=np.float64)
    bounds = scores + lowest[cells]
    bounds += table_min
    slack = np.abs(scores)
    slack += largest[cells]
    slack += table_abs
    slack *= (n_subspaces + 3) * 2.0**-22
    return bounds, slack


def _may_hold_results(bounds, slack, limit):
    """Cells whose lower bound (:func:`_cell_lower_bounds`) is within the
    slack of the running ``k``-th value ``limit`` (float64, rounded too)."""
    return bounds <= limit + slack + 2.0**-22 * np.abs(limit)


def _scan_groups(cell_sums, ivf, groups, k, thresholds):
    """Scan cells for the queries that probe them.

    ``groups`` is a list of ``(cell, queries)``; ``cell_sums`` a
    :class:`_CellSums`. With ``thresholds`` None (first pass), each query
    keeps the ``k`` best items of its cell and their ties and the ``k``-th
    value is returned as its threshold; otherwise items at or below the
    query's threshold are kept. Returns ``(queries, values, indices, kth)``
    of the candidates (``kth`` only in the first pass).
    """
    offsets, order = ivf.offsets, ivf.order
    out_q, out_v, out_i, out_kth = [], [], [], []
    for cell, cell_queries in groups:
        a, b = int(offsets[cell]), int(offsets[cell + 1])
        if a == b:
            if thresholds is None:
                out_kth.append((cell_queries, np.full(len(cell_queries), np.inf, np.float32)))
            continue
        blocks = [cell_queries[q0 : q0 + _QUERY_BLOCK]
                  for q0 in range(0, len(cell_queries), _QUERY_BLOCK)]
        # The first pass ranks a cell whole; later ones scan it in blocks
        # of at most _BLOCK_PAIRS (item, query) entries.
        step = b - a if thresholds is None else max(1, _BLOCK_PAIRS // len(blocks[0]))
        for i0 in range(a, b, step):
            i1 = min(i0 + step, b)
            for queries in blocks:
                if thresholds is not None and len(queries) < _FEW_QUERIES:
                    # A cell of one or two queries with their thresholds
                    # known: bounded like the one-query scan.
                    for q in queries:
                        values, cand = cell_sums.below(q, cell, i0, i1, float(thresholds[q]))
                        if len(cand):
                            out_q.append(np.full(len(cand), q))
                            out_v.append(values)
                            out_i.append(order[cand + i0])
                    continue
                acc = cell_sums(queries, cell, i0, i1)
                if thresholds is None:
                    if i1 - i0 > k:
                        kth = np.partition(acc, k - 1, axis=0)[k - 1]
                    else:
                        kth = np.full(len(queries), np.inf, dtype=np.float32)
                    out_kth.append((queries, kth))
                    hits = np.flatnonzero(acc <= kth)
                else:
                    hits = np.flatnonzero(acc <= thresholds[queries])
                if hits.size:
                    items, cols = np.divmod(hits, len(queries))
                    out_q.append(queries[cols])
                    out_v.append(acc.ravel()[hits])
                    out_i.append(order[items + i0])
    return out_q, out_v, out_i, out_kth


def _group_pairs(pair_queries, pair_cells):
    """Pairs grouped by cell: [(cell, sorted queries)] and their sizes."""
    if not len(pair_cells):
        return []
    order = np.argsort(pair_cells, kind="stable")  # queries stay ascending
    cells = pair_cells[order]
    queries = pair_queries[order]
    bounds = np.flatnonzero(np.diff(cells)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(cells)]])
    return [(int(cells[s]), queries[s:e]) for s, e in zip(starts, ends, strict=True)]


def _scan_grouped(tables, cell_bias, ivf, pairs, k):
    """Batch scan: each probed cell read once for all queries probing it.

    Two passes: each query's best cell first (its ``k``-th value there is its
    threshold), then the other probed cells, keeping only entries at or below
    the threshold (a compare instead of a partition). All candidates are then
    merged by ``(value, index)``.
    """
    pair_queries, pair_cells, best = pairs
    n_queries = tables.shape[0]
    cell_sums = _CellSums(tables, ivf, cell_bias)
    first = pair_cells == best[pair_queries]
    results = []
    thresholds = np.full(n_queries, np.inf, dtype=np.float32)
    for thr in (None, thresholds):
        mask = first if thr is None else ~first
        if thr is not None and cell_bias is not None:
            # Skip the (query, cell) pairs whose cell cannot hold a result.
            q, c = pair_queries[mask], pair_cells[mask]
            table_mins, table_abs = cell_sums.table_bounds
            bounds, slack = _cell_lower_bounds(cell_bias[q, c], c, table_mins.sum(axis=1)[q],
                                               table_abs[q], ivf, tables.shape[1])
            useful = _may_hold_results(bounds, slack, thr[q].astype(np.float64))
            mask[np.flatnonzero(mask)[~useful]] = False
        groups = _group_pairs(pair_queries[mask], pair_cells[mask])
        if not groups:
            continue
        out_q, out_v, out_i, out_kth = _scan_groups(cell_sums, ivf, groups, k, thr)
        results.append((out_q, out_v, out_i))
        for queries, kth in out_kth:
            thresholds[queries] = kth
    # (No candidate at all only in a chunk of a database: ``cell_sizes``.)
    qs = np.concatenate([a for out_q, _, _ in results for a in out_q] or [[]])
    vs = np.concatenate([a for _, out_v, _ in results for a in out_v] or [[]])
    ids = np.concatenate([a for _, _, out_i in results for a in out_i] or [[]])
    qs, vs = qs.astype(np.intp, copy=False), vs.astype(np.float32, copy=False)
    ids = ids.astype(np.intp)
    return _topk_by_query(qs, vs, ids, n_queries, k)


def _topk_by_query(qs, vs, ids, n_queries, k):
    """The ``k`` best candidates of each query by ``(value, index)``, padded
    with ``(inf, max intp)`` for a query with fewer (only in one chunk of a
    database, see ``ivf_search(cell_sizes=...)``)."""
    order = np.lexsort((ids, vs, qs))
    counts = np.bincount(qs, minlength=n_queries)
    starts = np.cumsum(counts) - counts
    slots = starts[:, None] + np.arange(k)
    if (counts >= k).all():
        keep = order[slots]
        return vs[keep], ids[keep]
    # Past a query's candidates: a sentinel entry appended at the end.
    vs = np.append(vs, np.float32(np.inf))
    ids = np.append(ids, np.iinfo(np.intp).max)
    order = np.append(order, len(vs) - 1)
    keep = order[np.where(np.arange(k) < counts[:, None], slots, len(order) - 1)]
    return vs[keep], ids[keep]


def _scan_one(tables, cell_bias, ivf, cells, q, k, budget):
    """Top-k of query ``q`` over ``cells``: the first cell alone, then the
    others' codes concatenated, scanned in chunks of about ``budget`` items.
    Returns (values, original indices), sentinel-padded when the cells hold
    fewer than k items.

    Lean on purpose: a single query's whole search is a few hundred
    microseconds, so a cell read alone is a view (no concatenation) and its
    coarse score a scalar.
    """
    codes_t, bias = ivf.stored
    offsets, order = ivf.offsets, ivf.order
    table = tables[q]
    n_subspaces = table.shape[0]
    best_v = np.full(k, np.inf, dtype=np.float32)
    best_i = np.full(k, np.iinfo(np.intp).max, dtype=np.intp)
    # The first cell (the query's best) alone, whose k-th value is a tight
    # threshold for the others; those in stored order, so that neighbouring
    # cells are read as one run (the result does not depend on the order:
    # ties go to the lower index).
    if len(cells) > 2:
        cells = np.concatenate([cells[:1], np.sort(cells[1:])])
    starts, ends = offsets[cells], offsets[cells + 1]
    nonempty = ends > starts
    if not nonempty.all():
        starts, ends, cells = starts[nonempty], ends[nonempty], cells[nonempty]
    table_mins, table_abs = _table_bounds(table)
    table_abs = float(table_abs)
    lengths = ends - starts
    chunk_ends = np.cumsum(lengths)
    threshold = np.inf
    c0 = 0
    while c0 < len(cells):
        full = np.isfinite(threshold)
        # Cells c0:c1 hold at most ``size`` items (at least one cell): a
        # small first chunk gives the running k-th value, after which a
        # chunk costs a compare instead of a partition.
        size = budget if full else min(budget, max(64 * k, 4096))
        base = chunk_ends[c0 - 1] if c0 else 0
        c1 = c0 + 1
        if c0 and c1 < len(cells):
            c1 = max(c1, int(np.searchsorted(chunk_ends, base + size, side="right")))
        if c1 - c0 == 1:
            a, b = int(starts[c0]), int(ends[c0])
            cols = codes_t[:, a:b]
            item_bias = None if bias is None else bias[a:b]
        else:
            # Runs of adjacent cells, each one slice.
            s0, e0 = starts[c0:c1], ends[c0:c1]
            new_run = np.flatnonzero(s0[1:] != e0[:-1]) + 1
            run_starts = np.concatenate([[0], new_run])
            run_ends = np.concatenate([new_run, [len(s0)]]) - 1
            spans = [slice(int(s0[i]), int(e0[j]))
                     for i, j in zip(run_starts, run_ends, strict=True)]
            cols = np.concatenate([codes_t[:, sp] for sp in spans], axis=1)
            item_bias = None if bias is None else np.concatenate([bias[sp] for sp in spans])
        if item_bias is None:
            cell_term = None
        elif c1 - c0 == 1:
            cell_term = cell_bias[q, cells[c0]]
        else:
            cell_term = np.repeat(cell_bias[q, cells[c0:c1]], lengths[c0:c1])
        if full:
            # Threshold known: the first terms, a bound, the rest for the
            # few survivors only.
            values, cand = _prune_and_finish(table, cols, item_bias, cell_term,
                                             threshold, table_mins, table_abs)
        else:
            acc = _sum_in_order(
                lambda m, out=None: np.take(table[m], cols[m], out=out, mode="clip"),
                n_subspaces,
            )
            if item_bias is not None:
                acc += item_bias
                acc += cell_term
            if len(acc) > k:
                kth = np.partition(acc, k - 1)[k - 1]
                cand = np.flatnonzero(acc <= kth)
            else:
                cand = np.arange(len(acc))
            values = acc[cand]
        if cand.size:
            # Stored positions of the candidates -> original indices.
            if c1 - c0 == 1:
                pos = cand + a
            else:
                seg = np.searchsorted(chunk_ends[c0:c1] - base, cand, side="right")
                pos = starts[c0:c1][seg] + cand - (chunk_ends[c0:c1] - lengths[c0:c1] - base)[seg]
            values = np.concatenate([best_v, values])
            ids = np.concatenate([best_i, order[pos]])
            keep = np.lexsort((ids, values))[:k]
            best_v, best_i = values[keep], ids[keep]
            threshold = float(best_v[-1])
        if c0 == 0 and np.isfinite(threshold) and bias is not None and len(cells) > 1:
            # Skip the other cells that cannot hold a result.
            rest = cells[1:]
            bounds, slack = _cell_lower_bounds(cell_bias[q, rest], rest, table_mins.sum(),
                                               table_abs, ivf, n_subspaces)
            keep = np.concatenate([[True], _may_hold_results(bounds, slack, threshold)])
            if not keep.all():
                cells, starts, ends = cells[keep], starts[keep], ends[keep]
                lengths = ends - starts
                chunk_ends = np.cumsum(lengths)
        c0 = c1
    return best_v, best_i


def _prune_and_finish(table, cols, item_bias, cell_term, threshold, table_mins, table_abs):
    """Items of a chunk of one query's scan whose value is at most
    ``threshold``: ``(values, positions in the chunk)``.

    Only the first quarter of the terms is summed for every item; the other
    terms add at least their tables' minima, so an item whose bound already
    exceeds the threshold (by more than a slack far above the float32
    rounding: 2**-16 of the terms' magnitudes) is dropped, and only the
    survivors (a few percent, after the query's best cell) get their other
    look-ups. The survivors' sums continue from the same partial sums in the
    same order (:func:`_sum_in_order`, then the item and cell terms), so
    their values are bitwise those of the full scan. ``table_mins``: the
    tables' row minima (float64); ``table_abs``: the sum of their rows'
    largest magnitudes (with the item and cell terms' and the threshold's,
    the scale of the slack).
    """
    n_subspaces = table.shape[0]
    head = max(1, (n_subspaces + 3) // 4)
    acc = _sum_in_order(
        lambda m, out=None: np.take(table[m], cols[m], out=out, mode="clip"), head
    )
    rest_min = float(table_mins[head:].sum())
    magnitude = abs(threshold) + table_abs
    if item_bias is None:
        bound = acc
    else:
        bound = acc + item_bias
        bound += cell_term
        magnitude += float(np.abs(item_bias).max()) + float(np.max(np.abs(cell_term)))
    limit = threshold - rest_min + 2.0**-16 * magnitude
    alive = np.flatnonzero(bound <= limit)
    if 4 * len(alive) > len(acc):
        # Unselective (a loose threshold): finish every item, contiguously.
        tmp = np.empty_like(acc)
        for m in range(head, n_subspaces):
            acc += np.take(table[m], cols[m], out=tmp, mode="clip")
        if item_bias is not None:
            acc += item_bias
            acc += cell_term
        cand = np.flatnonzero(acc <= threshold)
        return acc[cand], cand
    values = acc[alive]
    for m in range(head, n_subspaces):
        values += table[m][cols[m][alive]]
    if item_bias is not None:
        values += item_bias[alive]
        values += cell_term[alive] if np.ndim(cell_term) else cell_term
    keep = values <= threshold
    return values[keep], alive[keep]


def _scan_queries(tables, cell_bias, ivf, probes, queries, k, budget):
    """One-query-at-a-time scan of ``queries`` over their cells ``probes[q]``."""
    out_v = np.empty((len(queries), k), dtype=np.float32)
    out_i = np.empty((len(queries), k), dtype=np.intp)
    for r, q in enumerate(queries):
        out_v[r], out_i[r] = _scan_one(tables, cell_bias, ivf, probes[q], q, k, budget)
    return out_v, out_i


def ivf_search(tables, scores, ivf, n_neighbors, *, n_probe=1, n_jobs=None,
               add_scores=False, refine=True, cell_sizes=None):
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
        Accepted for the callers' uniformity; the scan runs in the calling
        thread (see the module notes: threads measured slower).
    add_scores : bool, default=False
        Residual codes: an item's value is its table sum plus its
        ``ivf.item_bias`` plus its cell's coarse score for the query.
    refine : bool, default=True
        Recompute the winners' table sums in float64 (direct codes only);
        with False the float32 values of the scan are returned.
    cell_sizes : ndarray of shape (n_lists,), default=None
        Items per cell of the whole database when ``ivf`` holds one chunk of
        it (see :mod:`skquant._dask_index`): the probes are chosen from these,
        so that every chunk scans the cells the whole database would, and a
        query whose probed cells hold fewer than ``n_neighbors`` items of the
        chunk gets its candidates padded with ``(inf, max intp)`` (use with
        ``refine=False``). None: ``ivf.sizes``.

    Returns
    -------
    values : ndarray of shape (n_queries, n_neighbors)
        Table sums, ascending: float64 recomputed for the selected items
        (``refine=True``) or the scan's float32 values.
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
    if add_scores and not ivf.has_item_bias:
        raise ValueError("add_scores=True needs inverted lists with an item_bias.")
    cell_bias = np.asarray(scores, dtype=np.float32) if add_scores else None
    pairs = _select_probes(scores, sizes, n_probe, n_neighbors)
    # The scan runs in the calling thread, whatever n_jobs: its work is many
    # small numpy calls per cell, which hold the GIL between them, and two
    # threads measured slower than one (one query 1,357 -> 504 q/s, 1,000
    # queries 3,992 -> 3,480 q/s at n_probe 16 on 1M items).
    if n_queries >= _GROUPED_MIN_QUERIES:
        values, indices = _scan_grouped(tables, cell_bias, ivf, pairs, n_neighbors)
    else:
        pair_queries, pair_cells, best = pairs
        bounds = np.searchsorted(pair_queries, np.arange(n_queries + 1))
        probes = [pair_cells[bounds[q] : bounds[q + 1]] for q in range(n_queries)]
        # Each query's best cell first (see _scan_one).
        probes = [p if p[0] == b else np.concatenate([[b], p[p != b]])
                  for p, b in zip(probes, best, strict=True)]
        # Per scanned item: codes, value, term and selection.
        budget = max(1, int(get_config()["working_memory"] * 2**20)
                     // (n_subspaces * tables.itemsize + 4 + 4 + 4 + 9))
        budget = min(budget, 2**18)
        values, indices = _scan_queries(tables, cell_bias, ivf, probes, np.arange(n_queries),
                                        n_neighbors, budget)
    if not refine:
        return values, indices
    return _refine(tables, ivf.codes, indices)
