"""Bounded heaps of ``(value, index)`` pairs for the compiled loops.

The scan (:mod:`skquant._scan_loop`) keeps a query's ``k`` best items and the
probe selection (:mod:`skquant._probe_loop`) a query's best cells in a
max-heap of fixed size: its root is the worst entry kept, replaced when a
better one comes. Entries rank by value, then by index (the lower first), so
the kept set and its order never depend on the order in which the entries
came. numba-compiled, for those loops only.
"""

import numba


@numba.njit(nogil=True, cache=True)
def _worse(v1, i1, v2, i2):
    """Whether ``(v1, i1)`` ranks after ``(v2, i2)``."""
    return v1 > v2 or (v1 == v2 and i1 > i2)


@numba.njit(nogil=True, cache=True)
def _sift_down(values, ids, size):
    """Restore the max-heap order of ``values[:size]`` from its root."""
    v, i = values[0], ids[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(values[child + 1], ids[child + 1],
                                       values[child], ids[child]):
            child += 1
        if not _worse(values[child], ids[child], v, i):
            break
        values[pos], ids[pos] = values[child], ids[child]
        pos = child
    values[pos], ids[pos] = v, i


@numba.njit(nogil=True, cache=True)
def _replace_root(values, ids, v, i):
    """Put ``(v, i)`` in place of the heap's worst entry (its root)."""
    values[0], ids[0] = v, i
    _sift_down(values, ids, values.shape[0])


@numba.njit(nogil=True, cache=True)
def _drain(values, ids, out_values, out_ids):
    """Empty the heap into ``out_*``, ascending by ``(value, id)``: popped
    worst first, from the end of the row."""
    for j in range(values.shape[0] - 1, -1, -1):
        out_values[j], out_ids[j] = values[0], ids[0]
        values[0], ids[0] = values[j], ids[j]
        _sift_down(values, ids, j)


@numba.njit(nogil=True, cache=True)
def _insert(values, ids, size, v, i):
    """Insert ``(v, i)`` into ``values[:size]``, ascending by ``(value,
    id)``: an insertion sort's step, for a few entries."""
    pos = size
    while pos > 0 and _worse(values[pos - 1], ids[pos - 1], v, i):
        values[pos], ids[pos] = values[pos - 1], ids[pos - 1]
        pos -= 1
    values[pos], ids[pos] = v, i
