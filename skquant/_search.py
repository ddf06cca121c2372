"""Asymmetric quantizer distance (AQD) search: lookup tables -> top-k.

This module is the numeric engine behind every ``kneighbors`` of skquant. It
knows nothing about estimators: it takes per-query lookup tables and database
codes and returns the ``k`` best items per query.

A lookup table holds, for one query, the contribution ``T[m, k]`` of codeword
``k`` of codebook ``m`` to the query's distance, so the AQD to a database item
with codes ``(b_1, ..., b_M)`` is ``sum_m T[m, b_m]``: ``M`` look-ups and
additions per item instead of a ``D``-dimensional distance. Tables are always
"lower is better" (squared Euclidean contributions, or *negated* inner
products), so one top-k routine serves both metrics.

Kernels (chosen by batch size, measured in ``benchmarks/bench_search.py`` and
``shared/research/perf.md``):

* few queries: one query at a time, sub-spaces merged in pairs into
  ``K**2``-entry tables (half the look-ups) read through cached ``uint16``
  pair codes, in the compiled loop of :mod:`skquant._scan_loop` (a bounded
  max-heap of the ``k`` best; an item stops after a quarter of its look-ups
  when the rest cannot bring it under the ``k``-th value);
* batches: database-major blocks, where each code fetched serves a block of
  queries: the rows ``T[:, m, b].T`` of all queries are gathered into a
  ``(items, queries)`` block, by :func:`torch.nn.functional.embedding_bag` when
  torch is importable (one fused gather-and-sum) and by ``np.take(axis=0)``
  otherwise.

Batches use a running-threshold top-k: after the first block only the
entries below each query's current ``k``-th best value are looked at (a
compare and a ``flatnonzero``, about 10x cheaper than ``argpartition``), and
those few are merged by ``(value, index)``; both kernels break ties by the
lower index. Both shard the database over ``n_jobs`` threads.

Memory stays bounded whatever the database size: the database is scanned in
blocks whose scratch fits in ``sklearn.get_config()["working_memory"]`` (per
job), and only the ``k`` best candidates per query are kept. Database shards
run in threads (numpy and torch release the GIL) from a persistent pool, so one
query pays microseconds, not a joblib dispatch; under an explicit non-local
joblib backend (e.g. dask) the shards go through joblib instead.
"""

import importlib.util
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from joblib import effective_n_jobs
from joblib.parallel import get_active_backend
from sklearn import get_config
from sklearn.utils import gen_even_slices
from sklearn.utils.parallel import Parallel, delayed

__all__ = ["CodeLayout", "aqd_search"]

# Bytes of scratch memory per (query, database item) pair in a batch block: the
# float32 accumulator and term being added, and for the first block's top-k a
# float32 partitioned copy and a boolean mask.
_BYTES_PER_PAIR = 4 + 4 + 4 + 1
# Batch blocks of about 2**20 pairs (4 MiB of float32 accumulator) stay in
# cache; larger blocks measured 20-60 % slower (shared/research/perf.md).
_CACHE_PAIRS = 2**20
# Queries per database-major block: each gathered table row is 4 * 64 bytes.
_QUERY_BLOCK = 64
# Below this many queries, the per-query (pair table) kernel is faster than the
# database-major batch kernel (crossover measured at 8 to 16 queries).
_BATCH_MIN_QUERIES = 12
# Pair tables hold K**2 entries: only worth it while they stay cache-sized.
_MAX_PAIR_CODEWORDS = 256

# Up to this many (winner, sub-space) terms the float64 re-sum of the winners
# gathers them all at once (fewer calls); beyond, one sub-space at a time.
_REFINE_GATHER_MAX = 2**15

# A thread only pays off with enough work: dispatching a shard costs tens of
# microseconds, about what scanning 2**16 (query, item) pairs takes.
_MIN_SHARD_WORK = 2**16

_POOL = None
_POOL_LOCK = threading.Lock()


# ---------------------------------------------------------------------------
# Code layouts
class CodeLayout:
    """Scan-friendly views of one codes array, derived on first use and cached.

    The index keeps one per codes array and hands it to :func:`aqd_search`;
    it is only used while ``layout.codes is codes``, so a layout of other
    codes is ignored rather than wrong. Pickling keeps the codes and drops
    the derived arrays, which are rebuilt lazily.

    Parameters
    ----------
    codes : ndarray of shape (n_items, n_codebooks), integer
        The codes it describes (not copied).
    """

    def __init__(self, codes):
        self.codes = codes
        self._codes_t = None
        self._pair_codes = None
        self._lock = threading.Lock()
        self._legacy = {}

    def matches(self, codes):
        """Whether this layout describes ``codes`` (the same array object)."""
        return codes is self.codes

    @property
    def codes_t(self):
        """(M, N) C-contiguous codes: one contiguous run per sub-space.

        A free view when the codes are Fortran-ordered (as the index stores
        them), else a cached copy.
        """
        if self._codes_t is None:
            codes_t = self.codes.T
            if not codes_t.flags.c_contiguous:
                codes_t = np.ascontiguousarray(codes_t)
            self._codes_t = codes_t
        return self._codes_t

    def pair_codes(self, n_codewords):
        """(M // 2, N) uint16 codes of sub-space pairs: ``b[2j] * K + b[2j + 1]``.

        Same bytes as uint8 codes; half as many gathers per item, each into a
        ``K**2``-entry table.
        """
        with self._lock:
            if self._pair_codes is None or self._pair_codes[0] != n_codewords:
                codes_t = self.codes_t
                n_pairs = codes_t.shape[0] // 2
                pairs = np.empty((n_pairs, codes_t.shape[1]), dtype=np.uint16)
                for j in range(n_pairs):
                    np.multiply(codes_t[2 * j], n_codewords, out=pairs[j], dtype=np.uint16)
                    pairs[j] += codes_t[2 * j + 1]
                self._pair_codes = (n_codewords, pairs)
            return self._pair_codes[1]

    def __getstate__(self):
        # Derived arrays are rebuilt on demand. Pickles of skquant before the
        # index object (d3b457b and earlier) also kept the cells of an
        # inverted file here, as "seed": carried through so that their
        # checksum still verifies, and handed to the index on load.
        return {"codes": self.codes, **self._legacy}

    def __setstate__(self, state):
        self.__init__(state["codes"])
        self._legacy = {key: state[key] for key in ("seed",) if key in state}


# ---------------------------------------------------------------------------
# Top-k bookkeeping
def _block_topk(values, k, offset):
    """The ``k`` smallest entries of each row, ties broken by lower column.

    ``np.partition`` finds each row's k-th smallest value ``v``; every entry
    ``< v`` is selected, and among the entries ``== v`` the lowest columns fill
    the remaining places. Rows whose tie group at ``v`` is larger than needed
    are rare (duplicate codes) and handled one by one, which keeps the common
    path vectorised and the scratch memory at ``values.size`` bytes.
    """
    n_rows, n_cols = values.shape
    if k >= n_cols:
        columns = _sort_rows(values, np.arange(n_cols), n_cols)
        return np.take_along_axis(values, columns, axis=1), columns + offset

    kth = np.partition(values, k - 1, axis=1)[:, k - 1 : k]
    selected = values <= kth
    n_selected = np.count_nonzero(selected, axis=1)
    tied_rows = np.flatnonzero(n_selected > k)
    selected[tied_rows] = False
    _, cols = np.nonzero(selected)  # row-major: exactly k per untied row
    columns = np.empty((n_rows, k), dtype=np.intp)
    untied = np.ones(n_rows, dtype=bool)
    untied[tied_rows] = False
    columns[untied] = cols.reshape(-1, k)
    for row in tied_rows:
        below = np.flatnonzero(values[row] < kth[row, 0])
        at = np.flatnonzero(values[row] == kth[row, 0])[: k - len(below)]
        columns[row] = np.concatenate([below, at])
    columns = _sort_rows(np.take_along_axis(values, columns, axis=1), columns, n_cols)
    return np.take_along_axis(values, columns, axis=1), columns + offset


def _sort_rows(values, columns, n_cols):
    """Columns of each row ordered by (value, column).

    ``values`` (float32, finite) and ``columns`` (ints in ``[0, n_cols)``,
    broadcastable to ``values``) describe each row's entries. Instead of a
    lexsort (two stable merge sorts), one unstable sort of unique 64-bit keys:
    the value's bits mapped to an unsigned integer of the same order in the
    high half, the column in the low half. numpy sorts such keys with SIMD
    instructions, about 10x faster than a stable argsort of the floats (a
    whole-database ranking is one sort of every item per query).
    """
    if n_cols > 2**32:
        columns = np.broadcast_to(columns, values.shape)
        order = np.lexsort((columns, values), axis=1)
        return np.take_along_axis(columns, order, axis=1)
    # + 0.0 turns -0.0 into +0.0: they compare equal, so only the column
    # may order them.
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    keys = bits.astype(np.uint64)
    # IEEE order as unsigned order: negative floats have all bits flipped,
    # non-negative ones only the sign bit.
    flip = keys >> np.uint64(31)
    flip *= np.uint64(0x7FFFFFFF)
    flip += np.uint64(0x80000000)
    keys ^= flip
    keys <<= np.uint64(32)
    keys |= np.asarray(columns).astype(np.uint64, copy=False)
    keys.sort(axis=1)
    keys &= np.uint64(0xFFFFFFFF)
    return keys.astype(np.intp)


def _merge_topk(values, indices, k):
    """Merge candidate lists: the indices of the ``k`` best per row by (value, index)."""
    if values.dtype != np.float32:
        order = np.lexsort((indices, values), axis=1)[:, :k]
        return np.take_along_axis(indices, order, axis=1)
    # The bound also sends unfilled sentinel slots (the largest intp) to the
    # lexsort fallback of _sort_rows.
    return _sort_rows(values, indices, int(indices.max()) + 1)[:, :k]


def _ramp(start, stop, first, block):
    """Block bounds over ``start:stop``: sizes ``first, 4 * first, ...`` up to
    ``block``. The first block's top-k needs a partition (several ns per
    entry); after it the running threshold only costs a compare. Starting small
    and growing keeps both the partition and the candidates per block small."""
    size = max(1, min(first, block))
    i0 = start
    while i0 < stop:
        i1 = min(i0 + size, stop)
        yield i0, i1
        i0 = i1
        size = min(4 * size, block)


def _refine(tables, codes, indices):
    """Exact float64 sums of the selected items, re-sorted by (value, index).

    The kernels sum float32 terms in different orders (pairs, blocks), so
    their last bit differs; recomputing the ``k`` winners in one fixed way
    makes the result the same whichever kernel, batch size or sharding ran.
    """
    n_queries, n_subspaces, n_codewords = tables.shape
    # Both branches add the M terms in the same order, (t0 + t1) + t2 ...,
    # so a value does not depend on how many neighbors were asked for.
    if indices.size * n_subspaces <= _REFINE_GATHER_MAX:
        # The usual few winners: one gather over all sub-spaces, the fewest
        # numpy calls (this runs once per single-query search).
        codes = np.moveaxis(codes[indices], -1, 0)  # (M, n_queries, k)
        flat = (np.arange(n_queries)[:, None] * n_subspaces * n_codewords
                + np.arange(n_subspaces)[:, None, None] * n_codewords
                + codes.astype(np.intp))
        values = tables.reshape(-1)[flat].astype(np.float64).sum(axis=0)
        order = np.lexsort((indices, values), axis=1)
        return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)
    # Long rankings (k up to n_items), in blocks of rows: the scratch stays
    # cache-sized and is reused, where whole-array temporaries would each be
    # fresh memory (page faults cost more than the arithmetic here).
    n_rows, k = indices.shape
    values = np.empty((n_rows, k), dtype=np.float64)
    unsorted = []
    step = max(1, _REFINE_GATHER_MAX // k)
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        block_indices, block_values = indices[rows], values[rows]
        offsets = np.arange(rows.start, rows.stop)[:, None] * n_codewords
        for m in range(n_subspaces):
            flat = codes[:, m][block_indices].astype(np.intp)
            flat += offsets
            term = np.take(tables[:, m, :].reshape(-1), flat)
            if m == 0:
                block_values[...] = term
            else:
                block_values += term
        # The kernels' candidates come sorted by their float32 sums; the
        # float64 sums rarely reorder them: only rows out of order are re-sorted.
        dv = np.diff(block_values, axis=1)
        ordered = (dv > 0) | ((dv == 0) & (np.diff(block_indices, axis=1) > 0))
        unsorted.append(r0 + np.flatnonzero(~ordered.all(axis=1)))
    unsorted = np.concatenate(unsorted)
    if unsorted.size:
        # Nearly sorted rows: a stable sort by value alone is close to linear
        # (a lexsort would first sort by index: a full sort of a shuffled row).
        # It keeps the kernel's (float32 value, index) order among equal
        # float64 values, which is by index unless unequal float32 sums met
        # at one float64 value; those rows are sorted again by (run of equal
        # values, index), again nearly sorted.
        sub_values, sub_indices = values[unsorted], indices[unsorted]
        order = np.argsort(sub_values, axis=1, kind="stable")
        sub_values = np.take_along_axis(sub_values, order, 1)
        sub_indices = np.take_along_axis(sub_indices, order, 1)
        bad = np.flatnonzero(
            ((np.diff(sub_values, axis=1) == 0) & (np.diff(sub_indices, axis=1) < 0))
            .any(axis=1)
        )
        if bad.size:
            runs = np.zeros((bad.size, k), dtype=np.int64)
            np.cumsum(np.diff(sub_values[bad], axis=1) != 0, axis=1, out=runs[:, 1:])
            order = np.argsort(runs * codes.shape[0] + sub_indices[bad], axis=1,
                               kind="stable")
            sub_values[bad] = np.take_along_axis(sub_values[bad], order, 1)
            sub_indices[bad] = np.take_along_axis(sub_indices[bad], order, 1)
        values[unsorted] = sub_values
        indices = indices.copy()
        indices[unsorted] = sub_indices
    return values, indices


def _empty_best(n_queries, k):
    """Running top-k of ``n_queries`` queries, filled with sentinels that lose to
    every real candidate (``+inf``, then the largest index)."""
    return (
        np.full((n_queries, k), np.inf, dtype=np.float32),
        np.full((n_queries, k), np.iinfo(np.intp).max, dtype=np.intp),
    )


def _merge_into(best_values, best_indices, rows, values, indices):
    """Merge candidates ``(rows, values, indices)`` into the running top-k, in place.

    Only the rows that received candidates are touched; each keeps its ``k``
    best by ``(value, index)``.
    """
    k = best_values.shape[1]
    touched, rows = np.unique(rows, return_inverse=True)
    n_touched = len(touched)
    all_rows = np.concatenate([np.repeat(np.arange(n_touched), k), rows])
    all_values = np.concatenate([best_values[touched].ravel(), values])
    all_indices = np.concatenate([best_indices[touched].ravel(), indices])
    order = np.lexsort((all_indices, all_values, all_rows))
    counts = np.bincount(all_rows, minlength=n_touched)
    starts = np.cumsum(counts) - counts
    keep = order[starts[:, None] + np.arange(k)]
    best_values[touched] = all_values[keep]
    best_indices[touched] = all_indices[keep]


# ---------------------------------------------------------------------------
# Kernels: each scans database items start:stop of one shard and returns the
# top-k (values, indices) of every query, indices relative to the shard.
def _pair_tables(tables):
    """Per-query tables of sub-space pairs, (n_queries, M // 2, K * K)
    float32 (``M`` even): entry ``b0 * K + b1`` of pair ``j`` is
    ``T[2j, b0] + T[2j + 1, b1]``."""
    n_queries, n_subspaces, n_codewords = tables.shape
    pairs = tables[:, 0::2, :, None] + tables[:, 1::2, None, :]
    return pairs.reshape(n_queries, n_subspaces // 2, n_codewords * n_codewords)


def _scan_per_query(columns, codes_t, k):
    """Per-query kernel: the compiled scan loop (:mod:`skquant._scan_loop`)
    over one shard seen as a single cell, one query after the other.

    ``columns`` are (n_queries, J, T) float32 tables indexed by the J rows of
    ``codes_t`` (J, n_items) (pair codes or plain codes). After the query's
    first ``k`` items, an item sums only the first quarter of its columns
    unless that, plus the other tables' minima, can still beat the ``k``-th
    value; survivors finish the same sum in the same order.
    """
    from ._scan_loop import scan_loop  # numba: imported on first use

    n_queries = columns.shape[0]
    n_items = codes_t.shape[1]
    k = min(k, n_items)
    values = np.empty((n_queries, k), dtype=np.float32)
    indices = np.empty((n_queries, k), dtype=np.intp)
    scan = scan_loop(columns.shape[1])
    scan(columns, codes_t.T, None, np.array([0, n_items], dtype=np.int64), None, None, None,
         None, np.arange(n_queries + 1, dtype=np.int64), np.zeros(n_queries, dtype=np.int64),
         0, n_queries, k, values, indices)
    return values, indices


def _torch_embedding_bag():
    """``torch.nn.functional.embedding_bag`` when torch is importable, else None."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch.nn.functional as F
    except ImportError:  # pragma: no cover - broken torch install
        return None
    return F.embedding_bag


def _scan_batch(tables_t, codes_t, start, stop, k, item_block, use_torch):
    """Database-major batch kernel over items ``start:stop``.

    ``tables_t`` is (n_query_blocks, M, K, Qb): for each block of queries and
    each sub-space, the table rows of code ``b`` for all the block's queries are
    contiguous, so gathering ``tables_t[., m][codes]`` builds the (items,
    queries) distance block one cache line per code. Each database block is
    read once for all query blocks.
    """
    n_qblocks, n_subspaces, n_codewords, qb = tables_t.shape
    n_queries = n_qblocks * qb
    k = min(k, stop - start)
    best_values, best_indices = _empty_best(n_queries, k)
    if use_torch:
        import torch

        embedding_bag = _torch_embedding_bag()
        weights = [
            torch.from_numpy(tables_t[b].reshape(n_subspaces * n_codewords, qb))
            for b in range(n_qblocks)
        ]
        offsets = (np.arange(n_subspaces, dtype=np.int32) * n_codewords)[None, :]
        index_buf = np.empty((item_block, n_subspaces), dtype=np.int32)
    else:
        acc_buf = np.empty((item_block, qb), dtype=np.float32)
        tmp_buf = np.empty((item_block, qb), dtype=np.float32)

    def index_of(i0, i1):
        index = index_buf[: i1 - i0]
        np.add(codes_t[:, i0:i1].T, offsets, out=index, dtype=np.int32)
        return torch.from_numpy(index)

    def block_sums(b, i0, i1, index_t=None):
        """(items i0:i1, queries of block b) table sums."""
        if use_torch:
            return embedding_bag(index_t, weights[b], mode="sum").numpy()
        acc = acc_buf[: i1 - i0]
        tmp = tmp_buf[: i1 - i0]
        np.take(tables_t[b, 0], codes_t[0, i0:i1], axis=0, out=acc, mode="clip")
        for m in range(1, n_subspaces):
            np.take(tables_t[b, m], codes_t[m, i0:i1], axis=0, out=tmp, mode="clip")
            acc += tmp
        return acc

    if 4 * k >= stop - start:
        # Near-complete rankings (k >= a quarter of the items, e.g. mAP@all):
        # the running threshold prunes little, and merging k-long candidate
        # lists after every block is quadratic in k. Sum every item once into
        # a (queries, items) matrix and select once; its float32 size is at
        # most that of the float64 values and intp indices returned for them.
        dist = np.empty((qb, stop - start), dtype=np.float32)
        for b in range(n_qblocks):
            for i0 in range(start, stop, item_block):
                i1 = min(i0 + item_block, stop)
                index_t = index_of(i0, i1) if use_torch else None
                dist[:, i0 - start : i1 - start] = block_sums(b, i0, i1, index_t).T
            rows = slice(b * qb, (b + 1) * qb)
            best_values[rows], best_indices[rows] = _block_topk(dist, k, 0)
        return best_values, best_indices

    filled = 0  # items scanned so far: thresholds are valid once filled >= k
    for i0, i1 in _ramp(start, stop, max(4 * k, 256), item_block):
        n = i1 - i0
        index_t = index_of(i0, i1) if use_torch else None
        for b in range(n_qblocks):
            acc = block_sums(b, i0, i1, index_t)
            q0 = b * qb
            if filled < k:
                values, cols = _block_topk(acc.T, min(k, n), i0 - start)
                rows = np.repeat(np.arange(q0, q0 + qb), values.shape[1])
                _merge_into(best_values, best_indices, rows, values.ravel(), cols.ravel())
                continue
            hits = np.flatnonzero(acc < best_values[q0 : q0 + qb, k - 1])
            if hits.size:
                items, queries = np.divmod(hits, qb)
                _merge_into(
                    best_values, best_indices, queries + q0,
                    acc.ravel()[hits], items + (i0 - start),
                )
        filled += n
    return best_values, best_indices


# ---------------------------------------------------------------------------
# Dispatch
def _thread_pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="skquant-search"
            )
        return _POOL


def _local_backend():
    """Whether the active joblib backend runs here (loky, threads,
    processes, sequential), not on a cluster (dask, ray, ...)."""
    backend, _ = get_active_backend()
    return type(backend).__name__ in {
        "LokyBackend", "ThreadingBackend", "MultiprocessingBackend", "SequentialBackend"
    }


def _run_shards(func, shards, args_of):
    """Run ``func(*args_of(shard))`` for each shard; [results] in shard order.

    The local (loky/threading/multiprocessing/sequential) joblib backends get a
    persistent thread pool: the kernels release the GIL, and a joblib dispatch
    costs milliseconds, more than a whole single-query scan. Other backends
    (dask, ray, ...) receive the shards through joblib.
    """
    if len(shards) == 1:
        return [func(*args_of(shards[0]))]
    if _local_backend():
        futures = [_thread_pool().submit(func, *args_of(s)) for s in shards]
        return [f.result() for f in futures]
    return Parallel(n_jobs=len(shards), prefer="threads")(
        delayed(func)(*args_of(s)) for s in shards
    )


def _choose_kernel(n_queries, n_codewords, kernel):
    if kernel != "auto":
        return kernel
    if n_queries < _BATCH_MIN_QUERIES:
        return "pairs" if n_codewords <= _MAX_PAIR_CODEWORDS else "columns"
    return "torch" if _torch_embedding_bag() is not None else "numpy"


def aqd_search(tables, codes, n_neighbors, *, n_jobs=None, layout=None, kernel="auto",
               refine=True):
    """Exhaustive AQD search: the ``n_neighbors`` smallest table sums per query.

    Parameters
    ----------
    tables : ndarray of shape (n_queries, n_codebooks, n_codewords)
        Lookup tables, lower is better (built by the codebooks, see
        :mod:`skquant._codebooks`). Converted to float32.
    codes : ndarray of shape (n_items, n_codebooks), integer
        Database codes; ``codes[i, m]`` indexes ``tables[:, m, :]``. A
        Fortran-ordered array (as the index stores it) is scanned without a copy.
    n_neighbors : int
        Number of results per query, ``1 <= n_neighbors <= n_items``.
    n_jobs : int, default=None
        Number of database shards searched in parallel (threads). ``None``
        means 1 unless in a :func:`joblib.parallel_config` context; ``-1`` all
        cores. Under a non-local joblib backend (dask, ray), the shards are
        dispatched through joblib.
    layout : CodeLayout, default=None
        Cached derived layouts of ``codes`` (e.g. pair codes); used only when
        ``layout.matches(codes)``. The index keeps one across calls.
    kernel : {"auto", "pairs", "columns", "numpy", "torch"}, default="auto"
        Scan kernel; "auto" picks by batch size (benchmarks and tests force
        the others). "pairs" needs ``n_codewords <= 256``.
    refine : bool, default=True
        False returns the kernel's candidates as they were selected: the
        ``n_neighbors`` best by (float32 sum, index), with those float32
        sums, in no particular order. A database split in chunks (see
        :mod:`skquant._dask_index`) merges such lists by the same key and
        refines the winners once, which gives exactly this function's result.

    Returns
    -------
    values : ndarray of shape (n_queries, n_neighbors), float64
        Table sums (recomputed in float64 for the selected items), ascending.
    indices : ndarray of shape (n_queries, n_neighbors), intp
        Database indices; equal values are ordered by lower index.

    Examples
    --------
    >>> import numpy as np
    >>> from skquant._search import aqd_search
    >>> tables = np.array([[[0., 1.], [5., 2.]]], dtype=np.float32)  # 1 query, M=2, K=2
    >>> codes = np.array([[0, 0], [1, 1], [0, 1]], dtype=np.uint8)
    >>> aqd_search(tables, codes, 2)
    (array([[2., 3.]]), array([[2, 1]]))
    """
    tables = np.asarray(tables, dtype=np.float32)
    codes = np.asarray(codes)
    n_items = codes.shape[0]
    if tables.ndim != 3 or codes.ndim != 2 or codes.shape[1] != tables.shape[1]:
        raise ValueError(
            f"tables of shape (n_queries, M, K) and codes of shape (n_items, M) are "
            f"required; got tables {tables.shape} and codes {codes.shape}."
        )
    if not 1 <= n_neighbors <= n_items:
        raise ValueError(
            f"Expected 1 <= n_neighbors <= n_items, got n_neighbors={n_neighbors} "
            f"and n_items={n_items}."
        )
    if layout is None or not layout.matches(codes):
        layout = CodeLayout(codes)
    n_queries, n_subspaces, n_codewords = tables.shape
    working_memory = get_config()["working_memory"]
    budget = max(1, int(working_memory * 2**20))
    kernel = _choose_kernel(n_queries, n_codewords, kernel)
    n_shards = max(1, min(effective_n_jobs(n_jobs), n_items * n_queries // _MIN_SHARD_WORK))
    shards = list(gen_even_slices(n_items, n_shards))

    if kernel in ("pairs", "columns"):
        if kernel == "pairs" and n_subspaces % 2 == 0:
            columns, codes_t = _pair_tables(tables), layout.pair_codes(n_codewords)
        else:
            # (An odd M scans plain columns: pairs plus a last column would
            # cost a second table per query for one look-up in eight.)
            columns, codes_t = np.ascontiguousarray(tables), layout.codes_t

        def args_of(s):
            # Slicing the shard's codes ships only those to remote backends.
            return columns, codes_t[:, s], n_neighbors

        results = _run_shards(_scan_per_query, shards, args_of)
    elif kernel in ("numpy", "torch"):
        qb = min(n_queries, _QUERY_BLOCK)
        n_qblocks = -(-n_queries // qb)
        # (n_qblocks, M, K, qb): padded queries (zero tables) are dropped below.
        tables_t = np.zeros((n_qblocks, n_subspaces, n_codewords, qb), dtype=np.float32)
        for b in range(n_qblocks):
            block = tables[b * qb : (b + 1) * qb]
            tables_t[b, :, :, : len(block)] = block.transpose(1, 2, 0)
        budget_pairs = budget // _BYTES_PER_PAIR
        item_block = max(1, min(budget_pairs, _CACHE_PAIRS) // qb)
        use_torch = kernel == "torch"
        codes_t = layout.codes_t

        def args_of(s):
            return (tables_t, codes_t[:, s], 0, s.stop - s.start, n_neighbors,
                    min(item_block, s.stop - s.start), use_torch)

        results = _run_shards(_scan_batch, shards, args_of)
        results = [(v[:n_queries], i[:n_queries]) for v, i in results]
    else:
        raise ValueError(f"Unknown kernel {kernel!r}.")

    if not refine:
        if len(results) == 1:
            return results[0]
        values = np.hstack([v for v, _ in results])
        indices = np.hstack([i + s.start for (_, i), s in zip(results, shards, strict=True)])
        order = np.lexsort((indices, values), axis=1)[:, :n_neighbors]
        return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)
    if len(results) == 1:
        indices = results[0][1]
    else:
        values = np.hstack([v for v, _ in results])
        indices = np.hstack([i + s.start for (_, i), s in zip(results, shards, strict=True)])
        indices = _merge_topk(values, indices, n_neighbors)
    return _refine(tables, layout.codes, indices)
