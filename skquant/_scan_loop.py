"""The one-query-at-a-time AQD scan loop, compiled with numba.

It serves the inverted-file scan (:mod:`skquant._ivf`: a query's probed
cells) and the exhaustive scan of few queries (:mod:`skquant._search`: a
shard of the database seen as one cell). Why compiled, when the batch
kernels are numpy: a query's scan in numpy makes a score of calls per cell
or block (microseconds to tens of microseconds each, the GIL held between
them) for little arithmetic, and two threads ran slower than one. Here a
query's whole scan is one loop: no call per cell, the GIL released
(``nogil``), so the caller's threads each take a share of the queries or of
the database. numba compiles on first use and caches the machine code
beside this file (``cache=True``).

The scan of a query keeps its ``k`` best items by ``(value, original
index)`` in a bounded max-heap; every item's value is summed in one order,
``t_0 + t_1 + ... + t_{M-1}`` left to right in float32, then the item term,
then the cell term, so a value never depends on the batch, the threads or
the bounds below. Two bounds skip work without changing a result:

* **Cells** (residual codes): an item of cell ``c`` is worth at least the
  cell's coarse score plus its lowest item term plus the tables' row minima
  (:func:`cell_lower_bound`); a cell whose bound exceeds the running ``k``-th
  value by more than a rounding slack is not read.
* **Items**: after the first quarter of the terms, the others add at least
  their tables' minima; an item whose bound already exceeds the ``k``-th
  value (by more than a slack far above float32 rounding) is dropped. The
  survivors continue from the same partial sum in the same order, so their
  values are bitwise those of a full sum.
"""

import functools

import numba
import numpy as np

from ._heap import _drain, _insert, _replace_root
from ._probe_loop import enough_cells, probe_query
from ._product_tables import product_tables

# Relative rounding slack of the cell bound: (M + 3) float32 roundings
# (2**-24 each) with a 4x margin, as the bound's derivation below says.
_CELL_EPS = 2.0**-22
# Slack of the item bound: 2**-16 of the terms' magnitudes, far above the
# float32 rounding of at most a few hundred additions.
_ITEM_EPS = 2.0**-16


@numba.njit(nogil=True, cache=True)
def cell_lower_bound(cell_score, cell_lowest, cell_largest, table_min, table_abs,
                     n_subspaces):
    """Residual codes: ``(bound, slack)`` for the items of one cell.

    An item of the cell is worth ``S + b + s`` (table sum, item term, the
    cell's coarse score ``cell_score``); ``S`` is at least ``table_min`` (the
    sum of the query's table row minima) and ``b`` at least ``cell_lowest``.
    The slack bounds the float32 rounding of an item's value (``M + 2``
    additions of terms bounded by ``table_abs``, the sum of the tables' row
    magnitudes, ``cell_largest`` and the coarse score) with a 4x margin.
    """
    bound = cell_score + cell_lowest + table_min
    slack = (abs(cell_score) + cell_largest + table_abs) * (n_subspaces + 3) * _CELL_EPS
    return bound, slack


@numba.njit(nogil=True, cache=True)
def _row_range(row):
    """``(min, max)`` of a float32 row, exact. Four running minima and
    maxima: one of each would wait on the previous compare at every entry
    (a 2,048-entry table took 2.4 us per query that way)."""
    n = row.shape[0]
    lo0 = lo1 = lo2 = lo3 = row[0]
    hi0 = hi1 = hi2 = hi3 = row[0]
    j = 0
    while j + 4 <= n:
        t0, t1, t2, t3 = row[j], row[j + 1], row[j + 2], row[j + 3]
        lo0, hi0 = min(lo0, t0), max(hi0, t0)
        lo1, hi1 = min(lo1, t1), max(hi1, t1)
        lo2, hi2 = min(lo2, t2), max(hi2, t2)
        lo3, hi3 = min(lo3, t3), max(hi3, t3)
        j += 4
    while j < n:
        lo0, hi0 = min(lo0, row[j]), max(hi0, row[j])
        j += 1
    return min(min(lo0, lo1), min(lo2, lo3)), max(max(hi0, hi1), max(hi2, hi3))


@numba.njit(nogil=True, cache=True)
def _table_stats(table, head):
    """Sum of the row minima (all rows, and rows ``head:``) and of the rows'
    largest magnitudes, float64."""
    table_min = 0.0
    rest_min = 0.0
    table_abs = 0.0
    for m in range(table.shape[0]):
        low, high = _row_range(table[m])
        low, high = np.float64(low), np.float64(high)
        table_min += low
        if m >= head:
            rest_min += low
        table_abs += max(high, -low)
    return table_min, rest_min, table_abs


@numba.njit(nogil=True, cache=True)
def _item_limit(kth, rest_min, magnitude):
    """The item bound's limit for a running ``k``-th value ``kth`` (float32;
    inf while the heap is not full): an item whose first terms (with its
    item and cell terms) exceed it is worth more than ``kth`` once the other
    terms, at least ``rest_min``, are added, even after float32 rounding."""
    kth = np.float64(kth)
    if kth == np.inf:
        return np.inf
    return kth - rest_min + _ITEM_EPS * (abs(kth) + magnitude)


@functools.cache
def scan_loop(n_columns):
    """The scan compiled for tables of ``n_columns`` columns: ``scan_queries``.

    The number of columns is a constant of the machine code (the loops over
    an item's columns unroll; a loop with a trip count read at run time cost
    up to twice the time); numba caches each such loop on disk.
    """
    head = max(1, (n_columns + 3) // 4)

    @numba.njit(nogil=True, cache=True)
    def scan_queries(tables, codes, order, offsets, item_bias, probe_scores, cell_lowest,
                     cell_largest, probe_starts, probe_cells, first, stop, k, out_values,
                     out_indices):
        return _scan(tables, codes, order, offsets, item_bias, probe_scores, cell_lowest,
                     cell_largest, probe_starts, probe_cells, first, stop, k, out_values,
                     out_indices, n_columns, head, False)

    return scan_queries


@numba.njit(nogil=True, cache=True, inline="always")
def _scan(tables, codes, order, offsets, item_bias, probe_scores, cell_lowest, cell_largest,
          probe_starts, probe_cells, first, stop, k, out_values, out_indices, n_columns,
          head, with_positions):
    """Scan queries ``first:stop`` over their probed cells (the body of
    :func:`scan_loop`'s function, inlined there with its constant
    ``n_columns`` and ``head``, the terms summed before the item bound).

    Parameters
    ----------
    tables : float32 (n_queries, J, T)
        Lookup tables, C-contiguous: column ``j`` of an item is looked up in
        ``tables[q, j]`` (a sub-space, or a pair of sub-spaces).
    codes : (n_items, J) unsigned integers, any strides
        Codes in stored order (cell by cell).
    order : (n_items,) int, or None
        Original index of each stored item; None: an item's index is its
        position less ``offsets[0]`` (a shard of a database).
    offsets : int64 (n_lists + 1,)
        Cell ``c`` holds stored items ``offsets[c]:offsets[c + 1]``.
    item_bias : float32 (n_items,) or None
        Per-item term in stored order (residual codes); None for direct
        codes, with the next three None too. (None arguments compile a
        loop without their branches.)
    probe_scores : float32 (n_probes,) or None
        Coarse score of each probed cell (``probe_cells``) for its query,
        added to the values of residual codes.
    cell_lowest, cell_largest : float64 (n_lists,) or None
        Lowest item term and largest magnitude per cell (residual codes).
    probe_starts : int64 (n_queries + 1,), probe_cells : int64
        Query ``q`` scans ``probe_cells[probe_starts[q]:probe_starts[q + 1]]``
        in that order (its best cell first: the earlier a tight ``k``-th
        value, the more the bounds skip).
    k : int
    out_values : float32 (n_queries, k), out_indices : intp (n_queries, k)
        Rows ``first:stop`` are written, ascending by ``(value, index)``,
        padded with ``(inf, max intp)`` past the probed items.
    with_positions : bool (a constant where inlined)
        Write ``index << 32 | stored position`` (int64) instead of the index:
        the same order (indices are distinct), and the winners' stored
        rows without a look-up. Needs fewer than ``2**31`` items.

    Returns
    -------
    skipped_cells, cut_items : int
        Work the bounds saved (for tests and profiling).
    """
    # Unsigned loop indices: numba tests every signed index for negative
    # wraparound, 10-20 % of the scan's time.
    n_col, n_head, one = np.uint64(n_columns), np.uint64(head), np.uint64(1)
    index_base = np.int64(offsets[0])
    heap_v = np.empty(k, np.float32)
    heap_i = np.empty(k, out_indices.dtype)
    no_index = np.iinfo(out_indices.dtype).max
    skipped_cells = 0
    cut_items = 0
    for q in range(first, stop):
        heap_v[:] = np.inf
        heap_i[:] = no_index
        table = tables[q]
        table_min, rest_min, table_abs = _table_stats(table, head)
        for p in range(probe_starts[q], probe_starts[q + 1]):
            cell = probe_cells[p]
            a, b = np.uint64(offsets[cell]), np.uint64(offsets[cell + 1])
            if a == b:
                continue
            cell_term = np.float32(0.0)
            magnitude = table_abs
            if item_bias is not None:
                cell_term = probe_scores[p]
                magnitude += cell_largest[cell] + abs(np.float64(cell_term))
                kth = np.float64(heap_v[0])
                if kth < np.inf:
                    bound, slack = cell_lower_bound(
                        np.float64(cell_term), cell_lowest[cell], cell_largest[cell],
                        table_min, table_abs, n_columns)
                    if bound > kth + slack + _CELL_EPS * abs(kth):
                        skipped_cells += 1
                        continue
            # An item whose first terms plus the others' minima exceed this
            # cannot enter the heap (see the module notes); inf until the
            # heap is full, updated when its k-th value moves.
            limit = _item_limit(heap_v[0], rest_min, magnitude)
            for i in range(a, b):
                acc = table[np.uint64(0), np.uint64(codes[i, np.uint64(0)])]
                for m in range(one, n_head):
                    acc += table[m, np.uint64(codes[i, m])]
                partial = np.float64(acc)
                if item_bias is not None:
                    partial += np.float64(item_bias[i]) + np.float64(cell_term)
                if partial > limit:
                    cut_items += 1
                    continue
                for m in range(n_head, n_col):
                    acc += table[m, np.uint64(codes[i, m])]
                if item_bias is not None:
                    acc += item_bias[i]
                    acc += cell_term
                if acc <= heap_v[0]:
                    index = np.int64(i) - index_base if order is None else order[i]
                    if with_positions:
                        index = (np.int64(index) << 32) | np.int64(i)
                    if acc < heap_v[0] or index < heap_i[0]:
                        _replace_root(heap_v, heap_i, acc, index)
                        limit = _item_limit(heap_v[0], rest_min, magnitude)
        _drain(heap_v, heap_i, out_values[q], out_indices[q])
    return skipped_cells, cut_items


@numba.njit(nogil=True, cache=True)
def residual_sq_distances(queries, centroids, cells, residuals):
    """Exact squared distances ``||q - (c + r)||^2`` in float64 of each
    query's candidates: ``cells`` (n_queries, k) and the decoded residuals
    (n_queries * k, dim) float32 of the candidates, row by row. One pass
    (numpy made five over float64 copies of the reconstructions); the terms
    are summed left to right."""
    n_queries, k = cells.shape
    dim = queries.shape[1]
    out = np.empty((n_queries, k))
    for q in range(n_queries):
        for j in range(k):
            centroid = centroids[cells[q, j]]
            residual = residuals[q * k + j]
            total = 0.0
            for d in range(dim):
                diff = np.float64(queries[q, d]) - (np.float64(centroid[d])
                                                    + np.float64(residual[d]))
                total += diff * diff
            out[q, j] = total
    return out


@numba.njit(nogil=True, cache=True)
def residual_neighbors(queries, centroids, codebooks, codes, rows, cells, indices,
                       out_distances, out_indices):
    """Residual codes: the candidates' exact distances, ascending.

    Candidate ``j`` of query ``q`` is item ``indices[q, j]``, with residual
    codes ``codes[rows[q, j]]`` and cell ``cells[q, j]``
    (``codebooks`` (M, K, ds) float32: product codebooks, no rotation).
    Writes ``||q - (c + r)||`` (float64, the terms as
    :func:`residual_sq_distances` sums them, on the decoded residual ``r``)
    into ``out_distances`` and the candidates re-sorted by (distance,
    index) into ``out_indices``. One call for what was a decode, this
    function's sibling, a lexsort and two gathers (14 us for one query).
    """
    n_queries, k = indices.shape
    n_subspaces, _, subspace_dim = codebooks.shape
    sq = np.empty(k)
    ids = np.empty(k, np.int64)
    their_codes = np.empty((k, n_subspaces), np.int64)
    for q in range(n_queries):
        # The candidates' codes first, in a loop of loads only: they are
        # scattered over the database (cache misses), and without arithmetic
        # between them the CPU waits for all at once.
        for j in range(k):
            row = rows[q, j]
            for m in range(n_subspaces):
                their_codes[j, m] = codes[row, m]
        for j in range(k):
            centroid = centroids[cells[q, j]]
            total = 0.0
            for m in range(n_subspaces):
                codeword = codebooks[m, their_codes[j, m]]
                for t in range(subspace_dim):
                    d = m * subspace_dim + t
                    diff = np.float64(queries[q, d]) - (np.float64(centroid[d])
                                                        + np.float64(codeword[t]))
                    total += diff * diff
            # Sorted by (distance, index) as they come: k is small.
            _insert(sq, ids, j, total, np.int64(indices[q, j]))
        for j in range(k):
            out_distances[q, j] = np.sqrt(max(sq[j], 0.0))
            out_indices[q, j] = ids[j]


@functools.cache
def residual_search_loop(n_columns):
    """Residual codes' whole search of each query, compiled for tables of
    ``n_columns`` columns (as :func:`scan_loop`): ``search_queries``.

    Query by query: its table (:func:`~skquant._product_tables.product_tables`,
    times 2), its probes (:func:`~skquant._probe_loop.probe_query`), the
    scan of their cells and the exact distances of its ``k`` candidates
    (:func:`residual_neighbors`): the functions the step-by-step search
    calls, in the same order, so each result is bitwise theirs. One call
    per part of a batch: for one query, a dozen numpy calls and their
    arrays less, and a batch's tables and coarse scores are never stored.
    """
    head = max(1, (n_columns + 3) // 4)

    @numba.njit(nogil=True, cache=True)
    def search_queries(queries, scores32, n_probe, k, codebooks_t64, code_norms, weights32,
                       norms32, norms64, c_max, n_max, sizes,
                       stored_codes, order, offsets, bias, lowest, largest, centroids,
                       codebooks, out_distances, out_indices):
        n_subspaces, _, n_codewords = codebooks_t64.shape
        table = np.empty((1, n_subspaces, n_codewords), np.float32)
        row32 = np.empty(centroids.shape[0], np.float32)
        probes = np.empty(n_probe, np.int64)
        probe_scores = np.empty(n_probe, np.float32)
        starts = np.zeros(2, np.int64)
        candidate_values = np.empty((1, k), np.float32)
        candidates = np.empty((1, k), np.int64)
        positions = np.empty((1, k), np.int64)
        indices = np.empty((1, k), np.int64)
        their_cells = np.empty((1, k), np.int64)
        n_exact = 0
        for q in range(queries.shape[0]):
            query = queries[q : q + 1]
            product_tables(query, codebooks_t64, code_norms, False, table)
            for m in range(n_subspaces):
                for c in range(n_codewords):
                    table[0, m, c] *= np.float32(2.0)  # (exact)
            n_exact += probe_query(
                queries[q], None if scores32 is None else scores32[q], weights32, norms32,
                centroids, norms64, True, c_max, n_max, probes, probe_scores, row32)
            total = 0
            for j in range(n_probe):
                total += sizes[probes[j]]
            cells, cell_scores = probes, probe_scores
            if total < k:  # (rare: tiny cells or large k)
                cells, cell_scores = enough_cells(queries[q], weights32, norms64, True, sizes,
                                                  n_probe, k)
            starts[1] = cells.shape[0]
            _scan(table, stored_codes, order, offsets, bias, cell_scores, lowest, largest,
                  starts, cells, 0, 1, k, candidate_values, candidates, n_columns, head, True)
            # The winners' stored rows and cells, from the scan's keys.
            for j in range(k):
                key = candidates[0, j]
                positions[0, j] = key & 0xFFFFFFFF
                indices[0, j] = key >> 32
                their_cells[0, j] = np.searchsorted(offsets, positions[0, j], side="right") - 1
            residual_neighbors(query, centroids, codebooks, stored_codes, positions,
                               their_cells, indices, out_distances[q : q + 1],
                               out_indices[q : q + 1])
        return n_exact

    return search_queries
