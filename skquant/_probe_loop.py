"""Coarse probe selection: each query's best cells, compiled with numba.

An inverted-file search first ranks the cells by coarse score (squared
Euclidean distance to the centroid up to ``||x||^2``, or the negated inner
product) and scans the best ``n_probe``. The ranking must be the exact one
(float64, ties to the lower cell) whatever the batch, the BLAS and the CPU:
a cell gained or lost near a tie changes the result. A float64 GEMM gives
it at twice the cost of float32; here float32 scores rank the cells and
are *certified*, as :func:`skquant._ivf.nearest` certifies the encoder:
when the ``n_probe``-th and ``(n_probe + 1)``-th float32 scores are further
apart than twice a rigorous bound on float32 rounding, the ``n_probe`` best
are the exact best set; else (rare) the query's exact scores are computed.
Only the chosen cells' exact scores are then computed, in float64, each
dot product summed left to right (no fused multiply-add without numba's
``fastmath``): the same value on every x86 CPU and in every batch.
"""

import numba
import numpy as np

from ._heap import _drain, _insert, _replace_root, _worse

# Cells per block of the float32 ranking (see probe_query).
_BLOCK = 32


@numba.njit(nogil=True, cache=True)
def best_cells(scores, sizes, k, probes):
    """Each query's ``probes.shape[1]`` best cells by ``(score, index)``,
    ascending, written into ``probes`` (n_queries, n_probe) int64; returns
    whether they hold fewer than ``k`` items (bool per query). A bounded
    heap per query: numpy's argpartition, then the best cell swapped to the
    front and the cells' items counted, took five calls (14 us for one
    query)."""
    n_queries, n_lists = scores.shape
    n_probe = probes.shape[1]
    heap_v = np.empty(n_probe, np.float64)
    heap_i = np.empty(n_probe, np.int64)
    sorted_scores = np.empty(n_probe, np.float64)
    short = np.zeros(n_queries, np.bool_)
    for q in range(n_queries):
        heap_v[:] = np.inf
        heap_i[:] = np.iinfo(np.int64).max
        for cell in range(n_lists):
            score = np.float64(scores[q, cell])
            if _worse(heap_v[0], heap_i[0], score, cell):
                _replace_root(heap_v, heap_i, score, cell)
        _drain(heap_v, heap_i, sorted_scores, probes[q])
        total = 0
        for j in range(n_probe):
            total += sizes[probes[q, j]]
        short[q] = total < k
    return short


@numba.njit(nogil=True, cache=True)
def _exact_score(query, centroids, norms64, euclidean, cell):
    """A cell's exact coarse score for one query, float64: ``||c||^2 - 2
    <x, c>`` (``euclidean``) or ``-<x, c>``, the dot product of the query
    and the (float32, exactly widened) centroid summed left to right."""
    row = centroids[cell]
    dot = 0.0
    for d in range(query.shape[0]):
        dot += np.float64(query[d]) * np.float64(row[d])
    if euclidean:
        return norms64[cell] - 2.0 * dot
    return -dot


@numba.njit(nogil=True, cache=True)
def exact_cell_scores(query, weights32, norms64, euclidean, out):
    """Every cell's exact coarse score for one query into ``out`` (n_lists,)
    float64, bitwise :func:`_exact_score` of each cell, the loop over the
    cells vectorized. ``weights32`` (dim, n_lists) hold ``-2 c`` (or ``-c``)
    transposed: products and sums scaled by a power of two round as the
    unscaled ones (float32 inputs neither overflow nor underflow float64),
    so ``sum x (-2 c)`` is exactly ``-2 <x, c>`` as ``_exact_score`` sums it."""
    dim, n_lists = weights32.shape
    x = np.float64(query[0])
    for cell in range(n_lists):
        out[cell] = 0.0 + x * np.float64(weights32[0, cell])
    for d in range(1, dim):
        x = np.float64(query[d])
        for cell in range(n_lists):
            out[cell] += x * np.float64(weights32[d, cell])
    if euclidean:
        for cell in range(n_lists):
            out[cell] = norms64[cell] + out[cell]


@numba.njit(nogil=True, cache=True)
def _scores32(query, weights32, out):
    """``out[c] = sum_d x_d weights32[d, c]`` in float32 (``x`` the query
    rounded to float32), the loop over the cells vectorized. Eight
    dimensions per pass over ``out``: one pass per dimension spent its
    time loading and storing ``out`` (1.5x the time)."""
    dim, n_lists = weights32.shape
    for cell in range(n_lists):
        out[cell] = np.float32(0.0)
    d = 0
    while d + 8 <= dim:
        x0, x1 = np.float32(query[d]), np.float32(query[d + 1])
        x2, x3 = np.float32(query[d + 2]), np.float32(query[d + 3])
        x4, x5 = np.float32(query[d + 4]), np.float32(query[d + 5])
        x6, x7 = np.float32(query[d + 6]), np.float32(query[d + 7])
        w0, w1, w2, w3 = weights32[d], weights32[d + 1], weights32[d + 2], weights32[d + 3]
        w4, w5, w6, w7 = weights32[d + 4], weights32[d + 5], weights32[d + 6], weights32[d + 7]
        for cell in range(n_lists):
            acc = out[cell]
            acc += x0 * w0[cell]
            acc += x1 * w1[cell]
            acc += x2 * w2[cell]
            acc += x3 * w3[cell]
            acc += x4 * w4[cell]
            acc += x5 * w5[cell]
            acc += x6 * w6[cell]
            acc += x7 * w7[cell]
            out[cell] = acc
        d += 8
    while d < dim:
        x0, w0 = np.float32(query[d]), weights32[d]
        for cell in range(n_lists):
            out[cell] += x0 * w0[cell]
        d += 1


@numba.njit(nogil=True, cache=True)
def probe_query(query, scores32, weights32, norms32, centroids, norms64, euclidean, c_max,
                n_max, probes, probe_scores, row32):
    """One query's ``n_probe`` best cells by exact ``(score, cell)``, best
    first, into ``probes`` (n_probe,) int64, their exact scores rounded to
    float32 into ``probe_scores``; returns whether every cell's exact score
    had to be computed.

    ``scores32`` (n_lists,) float32 approximate the exact scores
    (:func:`_exact_score`) by any float32 computation (a GEMM of the
    queries with ``-2 c`` plus the norms, in any order): the first-order
    bound of their error, ``gamma_(dim+1) (2 ||x|| ||c|| + |norm|)``,
    rounding the query to float32 included, is below ``bound = 2**-22 (dim
    + 8) (||x|| c_max + n_max)`` (``c_max``: the largest centroid norm,
    ``n_max`` the largest |norm|), about 2x margin. The ``n_probe + 1``
    best float32 scores are kept in a heap; when the last two are further
    apart than ``2 bound``, no cell outside the first ``n_probe`` can beat
    one inside, whatever the rounding, else every exact score is computed
    and ranked. ``scores32`` None: computed here into the scratch ``row32``
    (n_lists,) from ``weights32`` (dim, n_lists) float32 (``-2 c`` or ``-c``,
    transposed) and ``norms32`` (None for inner products): for one query,
    cheaper than a BLAS call.
    """
    n_lists, dim = centroids.shape
    n_probe = probes.shape[0]
    width = min(n_probe + 1, n_lists)
    if scores32 is None:
        _scores32(query, weights32, row32)
        if norms32 is not None:
            for cell in range(n_lists):
                row32[cell] += norms32[cell]
        scores = row32
    else:
        scores = scores32
    heap_v = np.full(width, np.inf, np.float32)
    heap_i = np.full(width, np.iinfo(np.int64).max, np.int64)
    # Blocks of cells whose lowest score cannot enter the heap are passed
    # over on their minimum (a vectorized reduction, exact in any order).
    for start in range(0, n_lists, _BLOCK):
        stop = min(start + _BLOCK, n_lists)
        lowest = scores[start]
        for cell in range(start + 1, stop):
            lowest = min(lowest, scores[cell])
        if lowest <= heap_v[0]:
            for cell in range(start, stop):
                if _worse(heap_v[0], heap_i[0], scores[cell], cell):
                    _replace_root(heap_v, heap_i, scores[cell], cell)
    ranked_v = np.empty(width, np.float32)
    ranked_i = np.empty(width, np.int64)
    _drain(heap_v, heap_i, ranked_v, ranked_i)
    x_norm = 0.0
    for d in range(dim):
        x_norm += np.float64(query[d]) * np.float64(query[d])
    bound = 2.0**-22 * (dim + 8) * (np.sqrt(x_norm) * c_max + n_max + 1e-30)
    # (False when not finite.)
    certain = width == n_probe or (
        np.float64(ranked_v[n_probe]) - np.float64(ranked_v[n_probe - 1]) > 2.0 * bound)
    exact_v = np.empty(n_probe, np.float64)
    if certain:
        for j in range(n_probe):
            probes[j] = ranked_i[j]
            exact_v[j] = _exact_score(query, centroids, norms64, euclidean, ranked_i[j])
    else:
        all_scores = np.empty(n_lists, np.float64)
        exact_cell_scores(query, weights32, norms64, euclidean, all_scores)
        exact_v[:] = np.inf
        probes[:] = np.iinfo(np.int64).max
        for cell in range(n_lists):
            if _worse(exact_v[0], probes[0], all_scores[cell], cell):
                _replace_root(exact_v, probes, all_scores[cell], cell)
    # Best first: insertion sort by (exact score, cell) of a few cells.
    for j in range(1, n_probe):
        _insert(exact_v, probes, j, exact_v[j], probes[j])
    for j in range(n_probe):
        probe_scores[j] = np.float32(exact_v[j])
    return not certain


@numba.njit(nogil=True, cache=True)
def certified_probes(scores32, weights32, norms32, queries, centroids, norms64, euclidean,
                     c_max, n_max, sizes, k, probes, probe_scores):
    """:func:`probe_query` for each query (``scores32`` (n_queries, n_lists)
    or None, ``probes`` and ``probe_scores`` (n_queries, n_probe)).

    Returns ``(short, n_exact)``: whether each query's cells hold fewer than
    ``k`` items, and how many queries needed every exact score.
    """
    n_queries = probes.shape[0]
    row32 = np.empty(centroids.shape[0], np.float32)
    short = np.zeros(n_queries, np.bool_)
    n_exact = 0
    for q in range(n_queries):
        n_exact += probe_query(
            queries[q], None if scores32 is None else scores32[q], weights32, norms32,
            centroids, norms64, euclidean, c_max, n_max, probes[q], probe_scores[q], row32)
        total = 0
        for j in range(probes.shape[1]):
            total += sizes[probes[q, j]]
        short[q] = total < k
    return short, n_exact


@numba.njit(nogil=True, cache=True)
def enough_cells(query, weights32, norms64, euclidean, sizes, n_probe, k):
    """A query's cells by exact ``(score, cell)`` until they hold ``k``
    items (at least ``n_probe``; all cells if they hold fewer), and their
    exact scores rounded to float32: the probes of a query whose ``n_probe``
    best cells hold fewer than ``k`` items (rare: tiny cells or large k)."""
    n_lists = weights32.shape[1]
    scores = np.empty(n_lists)
    exact_cell_scores(query, weights32, norms64, euclidean, scores)
    ranked = np.argsort(scores, kind="mergesort")  # (stable: ties to the lower cell)
    total = 0
    n_cells = 0
    while n_cells < n_lists and (n_cells < n_probe or total < k):
        total += sizes[ranked[n_cells]]
        n_cells += 1
    cells = ranked[:n_cells].astype(np.int64)
    return cells, scores[cells].astype(np.float32)
