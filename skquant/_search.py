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

Memory stays bounded whatever the database size: the database is scanned in
blocks whose distance buffer fits in ``sklearn.get_config()["working_memory"]``
(per job), and only the ``k`` best candidates of each block are kept.
"""

import numpy as np
from joblib import effective_n_jobs
from sklearn import get_config
from sklearn.utils import gen_even_slices
from sklearn.utils.parallel import Parallel, delayed

__all__ = [
    "aqd_search",
    "euclidean_tables",
    "inner_product_tables",
]

# Bytes of scratch memory per (query, database item) pair in a block: the
# float32 accumulator, the float32 copy made by ``np.partition`` and a bool mask.
_BYTES_PER_PAIR = 4 + 4 + 1
# Blocks of about 2**20 pairs (4 MiB of float32 accumulator) stay in L2/L3
# cache; larger blocks measured 20-60 % slower (shared/research/perf.md).
_CACHE_PAIRS = 2**20
# Queries scanned together: each code fetched from memory then serves a block
# of queries (perf.md: 8-32 queries per block is the sweet spot).
_QUERY_BLOCK = 32


def euclidean_tables(queries, codebooks):
    """Squared Euclidean lookup tables for product (block) codebooks.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_subspaces * subspace_dim)
        Query vectors in the (possibly rotated) quantization space.
    codebooks : ndarray of shape (n_subspaces, n_codewords, subspace_dim)
        One codebook per contiguous sub-space.

    Returns
    -------
    tables : ndarray of shape (n_queries, n_subspaces, n_codewords), float32
        ``tables[q, m, k] = ||queries[q, m-th block] - codebooks[m, k]||^2``.
    """
    n_subspaces, _, subspace_dim = codebooks.shape
    # float64 for the expansion ||q||^2 - 2 q.c + ||c||^2, which cancels badly in
    # float32 when q is close to a codeword; the tables are cast down afterwards.
    q = np.asarray(queries, dtype=np.float64).reshape(-1, n_subspaces, subspace_dim)
    q = q.transpose(1, 0, 2)  # (M, n, ds)
    c = codebooks.astype(np.float64, copy=False)
    tables = np.matmul(q, c.transpose(0, 2, 1))  # (M, n, K)
    tables *= -2.0
    tables += np.einsum("mnd,mnd->mn", q, q)[:, :, None]
    tables += np.einsum("mkd,mkd->mk", c, c)[:, None, :]
    np.maximum(tables, 0.0, out=tables)
    return np.ascontiguousarray(tables.transpose(1, 0, 2), dtype=np.float32)


def inner_product_tables(queries, codebooks, layout="additive"):
    """Negated inner-product lookup tables.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, dim)
        Query vectors.
    codebooks : ndarray of shape (n_codebooks, n_codewords, codeword_dim)
        Full-dimensional codebooks (``layout="additive"``, ``codeword_dim == dim``)
        or block codebooks (``layout="product"``, ``n_codebooks * codeword_dim == dim``).
    layout : {"additive", "product"}, default="additive"
        How codewords combine into a reconstruction: summed, or concatenated.

    Returns
    -------
    tables : ndarray of shape (n_queries, n_codebooks, n_codewords), float32
        ``-<query, codeword>`` (of the query's block for product codebooks), so
        that summing the tables gives ``-<query, reconstruction>``.
    """
    n_codebooks, n_codewords, codeword_dim = codebooks.shape
    q = np.asarray(queries, dtype=np.float32)
    if layout == "additive":
        flat = codebooks.reshape(n_codebooks * n_codewords, codeword_dim)
        tables = -(q @ flat.T).reshape(len(q), n_codebooks, n_codewords)
    else:
        q = q.reshape(len(q), n_codebooks, codeword_dim).transpose(1, 0, 2)
        tables = -np.matmul(q, codebooks.transpose(0, 2, 1)).transpose(1, 0, 2)
    return np.ascontiguousarray(tables, dtype=np.float32)


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
        order = np.argsort(values, axis=1, kind="stable")
        return np.take_along_axis(values, order, axis=1), order + offset

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
    top = np.take_along_axis(values, columns, axis=1)
    order = np.lexsort((columns, top), axis=1)
    return (
        np.take_along_axis(top, order, axis=1),
        np.take_along_axis(columns, order, axis=1) + offset,
    )


def _merge_topk(values, indices, k):
    """Merge candidate lists: the ``k`` best per row by (value, index)."""
    order = np.lexsort((indices, values), axis=1)[:, :k]
    return (
        np.take_along_axis(values, order, axis=1),
        np.take_along_axis(indices, order, axis=1),
    )


def _scan_shard(tables, codes_t, start, stop, k, working_memory):
    """Top-k of every query over database items ``start:stop``.

    ``codes_t`` is the (M, N) column-major view of the codes: the codes of one
    sub-space for a run of items are contiguous, so each sub-space is a single
    ``np.take`` over a block of queries (``out=`` and ``mode="clip"`` avoid
    numpy's buffered bounds checks; codes are in range by construction).
    """
    n_queries, n_subspaces, _ = tables.shape
    n_items = stop - start
    k = min(k, n_items)
    query_block = min(n_queries, _QUERY_BLOCK)
    budget_pairs = max(1, int(working_memory * 2**20) // _BYTES_PER_PAIR)
    item_block = max(1, min(budget_pairs, _CACHE_PAIRS) // query_block)
    item_block = min(item_block, n_items)

    best_values = np.empty((n_queries, k), dtype=np.float32)
    best_indices = np.empty((n_queries, k), dtype=np.intp)
    accumulator = np.empty((query_block, item_block), dtype=np.float32)
    scratch = np.empty_like(accumulator)
    for q0 in range(0, n_queries, query_block):
        q1 = min(q0 + query_block, n_queries)
        # (M, nq, K) contiguous per sub-space, so take(axis=1) reads one row per query
        block_tables = np.ascontiguousarray(tables[q0:q1].transpose(1, 0, 2))
        cand_values, cand_indices = [], []
        for i0 in range(start, stop, item_block):
            i1 = min(i0 + item_block, stop)
            acc = accumulator[: q1 - q0, : i1 - i0]
            tmp = scratch[: q1 - q0, : i1 - i0]
            np.take(block_tables[0], codes_t[0, i0:i1], axis=1, out=acc, mode="clip")
            for m in range(1, n_subspaces):
                np.take(block_tables[m], codes_t[m, i0:i1], axis=1, out=tmp, mode="clip")
                acc += tmp
            v, i = _block_topk(acc, min(k, i1 - i0), i0)
            cand_values.append(v)
            cand_indices.append(i)
        if len(cand_values) == 1:
            v, i = cand_values[0], cand_indices[0]
        else:
            v, i = _merge_topk(np.hstack(cand_values), np.hstack(cand_indices), k)
        best_values[q0:q1] = v
        best_indices[q0:q1] = i
    return best_values, best_indices


def aqd_search(tables, codes, n_neighbors, *, n_jobs=None):
    """Exhaustive AQD search: the ``n_neighbors`` smallest table sums per query.

    Parameters
    ----------
    tables : ndarray of shape (n_queries, n_codebooks, n_codewords)
        Lookup tables, lower is better (see :func:`euclidean_tables` and
        :func:`inner_product_tables`). Converted to float32.
    codes : ndarray of shape (n_items, n_codebooks), integer
        Database codes; ``codes[i, m]`` indexes ``tables[:, m, :]``. A
        Fortran-ordered array (as estimators store it) is scanned without a copy.
    n_neighbors : int
        Number of results per query, ``1 <= n_neighbors <= n_items``.
    n_jobs : int, default=None
        Number of database shards searched in parallel with joblib (threads by
        default; any joblib backend, e.g. dask, can run them). ``None`` means 1
        unless in a :func:`joblib.parallel_config` context; ``-1`` all cores.

    Returns
    -------
    values : ndarray of shape (n_queries, n_neighbors), float32
        Table sums, ascending.
    indices : ndarray of shape (n_queries, n_neighbors), intp
        Database indices; equal values are ordered by lower index.

    Examples
    --------
    >>> import numpy as np
    >>> from skquant._search import aqd_search
    >>> tables = np.array([[[0., 1.], [5., 2.]]], dtype=np.float32)  # 1 query, M=2, K=2
    >>> codes = np.array([[0, 0], [1, 1], [0, 1]], dtype=np.uint8)
    >>> aqd_search(tables, codes, 2)
    (array([[2., 3.]], dtype=float32), array([[2, 1]]))
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
    codes_t = codes.T  # (M, N); C-contiguous when codes is Fortran-ordered
    if not codes_t.flags.c_contiguous:
        codes_t = np.ascontiguousarray(codes_t)
    working_memory = get_config()["working_memory"]

    n_shards = min(effective_n_jobs(n_jobs), n_items)
    if n_shards == 1:
        return _scan_shard(tables, codes_t, 0, n_items, n_neighbors, working_memory)
    shards = list(gen_even_slices(n_items, n_shards))
    results = Parallel(n_jobs=n_shards, prefer="threads")(
        delayed(_scan_shard)(
            tables,
            codes_t[:, s],  # ship only the shard's codes to remote backends
            0,
            s.stop - s.start,
            n_neighbors,
            working_memory,
        )
        for s in shards
    )
    values = np.hstack([v for v, _ in results])
    indices = np.hstack([i + s.start for (_, i), s in zip(results, shards)])
    return _merge_topk(values, indices, n_neighbors)
