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

The scan (``benchmarks/bench_search.py --ivf`` measures it against faiss) is
one compiled loop per query (:mod:`skquant._scan_loop`: its notes say why
numba, and how its bounds skip cells and items without changing a result):
the query's best cell first, then its other probed cells, its ``k`` best
items kept in a heap by ``(value, original index)``. Every item's value is
summed in one order (``t0 + t1 + ...`` left to right, then the item and
cell terms), so it does not depend on the batch, the threads or the bounds;
ties are broken by the lower *original* index, as in exhaustive search. The
scan runs in the calling thread and releases the GIL: the index
(:meth:`~skquant._index.QuantizedIndex.search`) runs parts of a batch, each
query's whole search, in ``n_jobs`` threads.
"""

import threading

import numpy as np
from sklearn import get_config
from sklearn.utils import gen_batches

from ._search import _refine

__all__ = [
    "CoarseProbes",
    "InvertedLists",
    "assign_lists",
    "coarse_scores",
    "ivf_search",
    "nearest",
]

# float32 scores per block of rows in nearest(): 2 MiB, so that the passes
# after the GEMM read them from cache.
_NEAREST_BLOCK = 2**19
# Up to this many probes a query's cells are chosen by a compiled bounded
# heap (3 ms per 1,000 queries of 1,024 cells at 16, against 4-5 ms for
# argpartition at any n_probe; 43 ms at 256).
_HEAP_PROBES = 16
# From this many queries, their float32 coarse scores are one BLAS GEMM;
# below, the compiled probe selection computes them (a one-query GEMV call
# cost 4 us, the loop 2).
_GEMM_QUERIES = 8
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
        """``(codes, bias)``: the codes in stored order, (n_items, M)
        C-contiguous (a cell's codes are one contiguous run), and the item
        bias in stored order (float32, or None). Built on first use."""
        with self._lock:  # concurrent searches build it once
            if self._stored is None:
                codes = np.take(self.codes, self.order, axis=0)
                bias = None
                if self._item_bias is not None:
                    bias = np.asarray(self._item_bias, dtype=np.float32)[self.order]
                self._stored = (codes, bias)
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
        :func:`skquant._scan_loop.cell_lower_bound` needs. Built on
        first use."""
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
    """The cells each query scans, best first: its ``n_probe`` best cells,
    extended (in score order) until they hold at least ``k`` items.

    Returns ``(starts, cells)`` (int64): query ``q`` scans
    ``cells[starts[q]:starts[q + 1]]``, its best cell first (the sooner a
    tight ``k``-th value, the more the scan's bounds skip; the order of the
    others changes no result).
    """
    n_queries, n_lists = scores.shape
    n_probe = min(n_probe, n_lists)
    if n_probe == 1:
        best = np.argmin(scores, axis=1).astype(np.int64)  # (ties: the lower cell)
        if (sizes[best] >= k).all():  # the common case, in few calls
            return np.arange(n_queries + 1, dtype=np.int64), best
        probes = best[:, None]
        short = np.flatnonzero(sizes[best] < k)
    elif n_probe <= _HEAP_PROBES:
        from ._probe_loop import best_cells  # numba: imported on first use

        # Ascending by (score, cell): the best first, the others in the
        # order that tightens the scan's bounds soonest.
        probes = np.empty((n_queries, n_probe), dtype=np.int64)
        short = np.flatnonzero(best_cells(np.ascontiguousarray(scores), sizes, k, probes))
    else:
        # Many probes: numpy's selection (a heap of hundreds of cells costs
        # more), then the best cell first, the others in any order.
        best = np.argmin(scores, axis=1)
        if n_probe < n_lists:
            probes = np.argpartition(scores, n_probe - 1, axis=1)[:, :n_probe]
        else:
            probes = np.tile(np.arange(n_lists), (n_queries, 1))
        rows = np.arange(n_queries)
        where = np.argmax(probes == best[:, None], axis=1)
        probes[rows, where] = probes[:, 0]
        probes[:, 0] = best
        probes = probes.astype(np.int64, copy=False)
        short = np.flatnonzero(sizes[probes].sum(axis=1) < k)
    if not short.size:
        starts = np.arange(0, probes.size + 1, probes.shape[1], dtype=np.int64)
        return starts, probes.ravel()
    # Rare (tiny cells or large k): rank all cells of these queries.
    lists = list(probes)
    for q in short:
        ranked = np.argsort(scores[q], kind="stable")
        n_needed = np.searchsorted(np.cumsum(sizes[ranked]), k) + 1
        lists[q] = ranked[: max(n_probe, n_needed)]
    starts = np.concatenate([[0], np.cumsum([len(p) for p in lists])]).astype(np.int64)
    return starts, np.concatenate(lists).astype(np.int64)


def _cell_scores(scores, starts, cells):
    """The probed cells' scores (float32), aligned with ``cells``: query
    ``q``'s are ``scores[q, cells[starts[q]:starts[q + 1]]]``."""
    owners = np.repeat(np.arange(len(scores)), np.diff(starts))
    return scores[owners, cells].astype(np.float32)


class CoarseProbes:
    """Each query's probes: its best cells by coarse score, best first.

    The coarse quantizer at search time, built once per set of centroids
    (the index caches it). Up to ``_HEAP_PROBES`` probes, a float32 GEMM
    scores the cells and :func:`~skquant._probe_loop.certified_probes`
    turns its ranking into the exact one (a float64 GEMM cost twice the
    time for a batch, and for one query the float64 copies and the
    norms were a third of the coarse step); beyond, the float64 scores of
    :func:`coarse_scores` and :func:`_select_probes`.

    Parameters
    ----------
    centroids : ndarray of shape (n_lists, dim)
        Coarse centroids (float32).
    metric : {"euclidean", "inner_product"}, default="euclidean"
        Squared Euclidean distance up to ``||x||^2``, or negated inner product.
    """

    def __init__(self, centroids, metric="euclidean"):
        self.centroids = centroids
        self.metric = metric
        self._euclidean = metric != "inner_product"
        from ._product_tables import squared_norms  # numba: imported on first use

        c32 = np.ascontiguousarray(centroids, dtype=np.float32)
        n_lists = c32.shape[0]
        # Summed left to right, as the compiled exact scores sum their dot
        # products (the centroids as one codebook, transposed).
        norms = squared_norms(np.ascontiguousarray(c32.T, dtype=np.float64)[None])[0]
        self._c32 = c32
        self._c64 = None  # float64 copy for scores(), made on first use
        self._c_max = float(np.sqrt(norms.max())) if n_lists else 0.0
        # -2 c (or -c), transposed: the float32 scores' GEMM operand, and the
        # exact scores' (scaling by -2 is exact).
        self._weights = np.ascontiguousarray(
            (c32 * np.float32(-2.0 if self._euclidean else -1.0)).T)
        if self._euclidean:
            self._norms64 = norms
            self._norms32 = norms.astype(np.float32)
            self._n_max = float(norms.max()) if n_lists else 0.0
        else:
            self._norms64 = np.zeros(n_lists)
            self._norms32 = None
            self._n_max = 0.0

    def scores(self, queries):
        """Exact float64 scores of every (query, cell), (n, n_lists), by a
        float64 GEMM: see :func:`coarse_scores` (beyond ``_HEAP_PROBES``
        probes)."""
        if self._c64 is None:
            self._c64 = self._c32.astype(np.float64)
        return coarse_scores(queries, self._c64, self.metric,
                             norms=self._norms64 if self._euclidean else None)

    def float32_scores(self, queries):
        """The scores in float32 by one GEMM (n, n_lists), for the compiled
        probe selection to certify; None for fewer than ``_GEMM_QUERIES``
        queries (the compiled loop computes them, cheaper than a BLAS call)."""
        if len(queries) < _GEMM_QUERIES:
            return None
        scores32 = np.asarray(queries, dtype=np.float32) @ self._weights
        if self._norms32 is not None:
            scores32 += self._norms32
        return scores32

    def probes(self, queries, sizes, n_probe, k):
        """``(starts, cells, cell_scores)``: query ``q`` scans
        ``cells[starts[q]:starts[q + 1]]`` (int64), its ``n_probe`` best
        cells by ``(score, cell)`` best first, extended in score order until
        they hold ``k`` items (``sizes``: items per cell); ``cell_scores``
        (float32) are those cells' exact scores, rounded."""
        n_lists = self._c32.shape[0]
        n_probe = min(n_probe, n_lists)
        queries = np.asarray(queries)
        n_queries = len(queries)
        if n_probe > _HEAP_PROBES:
            scores = self.scores(queries)
            starts, cells = _select_probes(scores, sizes, n_probe, k)
            return starts, cells, _cell_scores(scores, starts, cells)
        from ._probe_loop import certified_probes  # numba: imported on first use

        scores32 = self.float32_scores(queries)
        probes = np.empty((n_queries, n_probe), dtype=np.int64)
        cell_scores = np.empty((n_queries, n_probe), dtype=np.float32)
        short, _ = certified_probes(
            scores32, self._weights, self._norms32, queries, self._c32, self._norms64,
            self._euclidean, self._c_max, self._n_max, sizes, k, probes, cell_scores,
        )
        if not short.any():
            starts = np.arange(0, probes.size + 1, n_probe, dtype=np.int64)
            return starts, probes.ravel(), cell_scores.ravel()
        # Rare (tiny cells or large k): rank all cells of these queries.
        from ._probe_loop import enough_cells

        lists, values = list(probes), list(cell_scores)
        for q in np.flatnonzero(short):
            lists[q], values[q] = enough_cells(queries[q], self._weights, self._norms64,
                                               self._euclidean, sizes, n_probe, k)
        starts = np.concatenate([[0], np.cumsum([len(p) for p in lists])]).astype(np.int64)
        return (starts, np.concatenate(lists).astype(np.int64),
                np.concatenate(values).astype(np.float32))


def residual_search_args(coarse, ivf, codebooks, codebooks64):
    """The compiled residual search of ``ivf`` (product codebooks
    ``codebooks``, no rotation; ``codebooks64`` their
    :func:`~skquant._product.float64_codebooks`) and its arguments that do
    not change between searches, for :func:`residual_search` (the caller
    keeps them: gathering them cost a third of a one-query search)."""
    from ._scan_loop import residual_search_loop  # numba: imported on first use

    if len(ivf.order) >= 2**31:
        raise ValueError("The compiled residual search needs fewer than 2**31 items.")
    codes, bias = ivf.stored
    lowest, largest = ivf.bias_bounds
    codebooks_t64, code_norms = codebooks64
    return residual_search_loop(codebooks.shape[0]), (
        codebooks_t64, code_norms, coarse._weights, coarse._norms32, coarse._norms64,
        coarse._c_max, coarse._n_max, ivf.sizes, codes, ivf.order, ivf.offsets, bias, lowest,
        largest, coarse._c32, codebooks,
    )


def residual_search(queries, coarse, prepared, n_neighbors, n_probe):
    """Residual codes: each query's whole search in one compiled loop
    (:func:`skquant._scan_loop.residual_search_loop`), bitwise the result of
    the steps one by one (tables, :meth:`CoarseProbes.probes`,
    :func:`ivf_search`, exact distances) for ``n_probe <= _HEAP_PROBES``.
    ``prepared``: :func:`residual_search_args` of the index.

    Returns ``(distances, indices)`` (n_queries, n_neighbors): exact
    Euclidean distances, ascending, ties by lower index.
    """
    loop, static = prepared
    distances = np.empty((len(queries), n_neighbors))
    indices = np.empty((len(queries), n_neighbors), dtype=np.intp)
    n_probe = min(n_probe, len(coarse.centroids))
    loop(queries, coarse.float32_scores(queries), n_probe, n_neighbors, *static, distances,
         indices)
    return distances, indices


def ivf_search(tables, scores, ivf, n_neighbors, *, n_probe=1, add_scores=False,
               refine=True, cell_sizes=None, probes=None):
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
    probes : tuple, default=None
        ``(starts, cells, cell_scores)`` of :meth:`CoarseProbes.probes`,
        already chosen (``scores`` and ``n_probe`` are then not used).

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
    from ._scan_loop import scan_loop  # numba: imported on first use

    tables = np.ascontiguousarray(tables, dtype=np.float32)
    n_queries = tables.shape[0]
    sizes = ivf.sizes if cell_sizes is None else np.asarray(cell_sizes)
    n_items = int(sizes.sum())
    if not 1 <= n_neighbors <= n_items:
        raise ValueError(
            f"Expected 1 <= n_neighbors <= n_items, got n_neighbors={n_neighbors} "
            f"and n_items={n_items}."
        )
    if add_scores and not ivf.has_item_bias:
        raise ValueError("add_scores=True needs inverted lists with an item_bias.")
    if probes is None:
        starts, cells = _select_probes(scores, sizes, n_probe, n_neighbors)
        cell_scores = _cell_scores(scores, starts, cells) if add_scores else None
    else:
        starts, cells, cell_scores = probes
    codes, bias = ivf.stored
    if add_scores:
        lowest, largest = ivf.bias_bounds
    else:
        bias = cell_scores = lowest = largest = None
    values = np.empty((n_queries, n_neighbors), dtype=np.float32)
    indices = np.empty((n_queries, n_neighbors), dtype=np.intp)
    scan_loop(tables.shape[1])(tables, codes, ivf.order, ivf.offsets, bias, cell_scores,
                               lowest, largest, starts, cells, 0, n_queries, n_neighbors,
                               values, indices)
    if not refine:
        return values, indices
    return _refine(tables, ivf.codes, indices)
