"""The index on a dask cluster: codes and labels in chunks on the workers.

:class:`DaskIndex` is a :class:`~skquant._index.QuantizedIndex` whose codes,
labels and inverted-file cells are *persisted dask arrays*: one chunk of rows
per block, each kept in the memory of the worker that computed it; the client
holds the codebooks, the coarse centroids and one dask key per chunk. It
answers the same ``search`` with the same results (indices and distances,
ties included):

* each chunk runs the exhaustive kernel (or the inverted-file scan of its
  cells) with ``refine=False``, which returns the kernel's own candidates: the
  ``k`` best by ``(float32 sum, index)`` with those sums;
* the per-chunk lists are merged in a tree (fan-in :data:`MERGE_FAN_IN`) by
  the same key, with global indices (chunk offset + local index), carrying
  each candidate's code row along;
* the client re-sums the ``k`` winners in float64 with the kernels' own
  ``_refine`` (the codes of the winners travelled with them), ordered by
  global index so that equal sums keep the lower index first; for residual
  codes (``ProductQuantizer(n_lists=..., by_residual=True)``) the winners'
  cells travel too and the client computes their exact distances as the
  in-memory index does (:meth:`QuantizedIndex._residual_distances
  <skquant._index.QuantizedIndex._residual_distances>`).

The selection key and every float32 sum are those of the in-memory scan (the
kernels sum an item's terms in an order that does not depend on the other
items, nor on the scan path), so the winners and their float64 sums are too.
The inverted-file scan of a chunk probes the cells chosen from the cell sizes
of the whole database (summed over the chunks), as the in-memory scan does.

Residual codes: the cells are part of the model (its coarse centroids are
fixed at fit), so each chunk is assigned and encoded on its worker
(:meth:`BaseQuantizer._dask_codes <skquant._base.BaseQuantizer._dask_codes>`);
the per-item terms ``||r||^2 + 2 <c, r>`` of a chunk are computed on its
worker too, from the per-cell tables computed once on the client
(:func:`~skquant._index.item_bias`).

Nothing here imports dask at module level: ``import skquant`` works without
it. Work is shipped as dask graphs, so any scheduler runs it (distributed,
threads, ``scheduler="synchronous"``); the objects the tasks need (the
estimator without its database, the lookup tables) enter each graph once, as
one key, not once per task.
"""

import sys
import uuid

import numpy as np

from ._index import QuantizedIndex, item_bias
from ._ivf import InvertedLists, ivf_search
from ._search import CodeLayout, _refine, aqd_search

__all__ = ["DaskIndex", "is_dask_array", "map_rows", "check_dask_rows"]

# Partial top-k lists merged per task of the reduction tree: 8 lists of k
# entries per query are one small lexsort; the tree is log8(n_chunks) deep.
MERGE_FAN_IN = 8

# Pickling (or ``to_faiss``) gathers the codes, labels and cells of a dask
# index into the client, up to this many bytes; beyond, a ValueError.
MAX_GATHER_BYTES = 2**30

_SENTINEL = np.iinfo(np.intp).max


def is_dask_array(X):
    """Whether ``X`` is a ``dask.array.Array`` (without importing dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(X, module.Array)


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - a dask array implies dask
        raise ImportError(
            "A dask-backed index needs dask: pip install 'dask[distributed]'."
        ) from exc
    return dask, da


def _ship(obj, what):
    """``obj`` as one key of a graph (sent once, whatever the number of tasks)."""
    dask, _ = _import_dask()
    return dask.delayed(obj, name=f"skquant-{what}-{uuid.uuid4().hex}", traverse=False)


def check_dask_rows(X, n_features=None, *, name="X"):
    """A 2-D dask array chunked by rows only, with known chunk sizes.

    Parameters
    ----------
    X : dask.array.Array
        Rows to work on.
    n_features : int, default=None
        Required number of columns.
    name : str, default="X"
        Name in error messages.

    Returns
    -------
    X : dask.array.Array
        ``X``, with its columns in one chunk.
    """
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2-D dask array for {name}, got {X.ndim} dimension(s) "
            f"(shape {X.shape})."
        )
    if any(np.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"The chunk sizes of {name} are unknown (e.g. after boolean "
            f"indexing): call {name}.compute_chunk_sizes() first; the index "
            "needs each chunk's length to number the items."
        )
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"{name} has {X.shape[1]} features, but the estimator is expecting "
            f"{n_features} features as input."
        )
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers; got dtype {X.dtype}.")
    if len(X.chunks[1]) > 1:
        X = X.rechunk({1: -1})
    return X


def map_rows(func, X, *args, dtype, n_columns=None):
    """``func(block, *args)`` on each row chunk of ``X``, lazily.

    ``args`` are shipped once per graph (one key each). The result has the
    row chunks of ``X`` and ``n_columns`` columns (1-D when None).
    """
    shipped = [_ship(arg, type(arg).__name__) for arg in args]
    if n_columns is None:
        return X.map_blocks(func, *shipped, dtype=dtype, chunks=(X.chunks[0],),
                            drop_axis=1, meta=np.empty((0,), dtype=dtype))
    return X.map_blocks(func, *shipped, dtype=dtype, chunks=(X.chunks[0], (n_columns,)),
                        meta=np.empty((0, 0), dtype=dtype))


def as_dask_rows(values, chunks):
    """An in-memory array as a dask array with the row chunks ``chunks``."""
    _, da = _import_dask()
    if is_dask_array(values):
        return values.rechunk((chunks,) + (-1,) * (values.ndim - 1))
    values = np.asarray(values)
    return da.from_array(values, chunks=(chunks,) + values.shape[1:], asarray=True)


def _persist(*arrays):
    """Persist dask arrays (None passes through), waiting for them on a
    distributed cluster so that a failed chunk raises here, not later."""
    dask, _ = _import_dask()
    present = [a for a in arrays if a is not None]
    persisted = iter(dask.persist(*present))
    out = [None if a is None else next(persisted) for a in arrays]
    try:
        from distributed import futures_of, wait
    except ImportError:  # pragma: no cover - local schedulers compute in persist
        return out
    futures = futures_of([a for a in out if a is not None])
    if futures:
        wait(futures)
        for future in futures:
            if future.status == "error":
                future.result()  # raises the task's exception
    return out


def _nbytes(array):
    return 0 if array is None else int(np.prod(array.shape)) * array.dtype.itemsize


# ---------------------------------------------------------------------------
# Worker side
class _Chunk:
    """One chunk of the database on a worker: its codes and their scan layouts.

    The layouts (pair codes, the chunk's inverted lists) are built on first
    use and stay in the worker's memory with the chunk, as the in-memory
    index keeps them. ``bias``: the per-item terms of residual codes.
    """

    def __init__(self, codes, cells=None, n_lists=None, bias=None):
        self.codes = np.asfortranarray(codes)
        self.layout = CodeLayout(self.codes)
        self.cells = cells
        self.n_lists = n_lists
        self.bias = bias
        self._lists = None

    def inverted_lists(self):
        if self._lists is None:
            self._lists = InvertedLists(self.codes, self.cells, self.n_lists,
                                        item_bias=self.bias)
        return self._lists


def _make_chunk(codes, cells=None, n_lists=None, terms=None):
    """A chunk's scan object; with residual ``terms`` (per-cell tables), its
    items' residual terms are computed here, on the worker."""
    bias = None if terms is None else item_bias(terms, codes, cells)
    return _Chunk(codes, cells, n_lists, bias)


def _cell_counts(cells, n_lists):
    return np.bincount(cells, minlength=n_lists)[None, :]


def _assign_chunk(codes, assigner):
    return assigner.assign_cells(np.asarray(codes))


def _scan_chunk(chunk, tables, k, offset, coarse=None):
    """Candidates of one chunk: (float32 values, global indices, code rows,
    cells or None). The cells come along for residual codes."""
    cells = None
    if coarse is None:
        values, indices = aqd_search(
            tables, chunk.codes, min(k, chunk.codes.shape[0]), n_jobs=1,
            layout=chunk.layout, refine=False,
        )
    else:
        probes, cell_sizes, residual = coarse
        values, indices = ivf_search(
            tables, None, chunk.inverted_lists(), k, add_scores=residual, refine=False,
            cell_sizes=cell_sizes, probes=probes,
        )
    real = indices != _SENTINEL
    local = np.where(real, indices, 0)
    if coarse is not None and coarse[2]:
        cells = np.asarray(chunk.cells)[local]
    return values, np.where(real, indices + offset, _SENTINEL), chunk.codes[local], cells


def _merge_candidates(parts, k):
    """The ``k`` best of several candidate lists by (float32 value, index)."""
    values = np.hstack([p[0] for p in parts])
    indices = np.hstack([p[1] for p in parts])
    order = np.lexsort((indices, values), axis=1)[:, :k]
    rows = np.arange(len(order))[:, None]
    codes = np.concatenate([p[2] for p in parts], axis=1)[rows, order]
    cells = None
    if parts[0][3] is not None:
        cells = np.hstack([p[3] for p in parts])[rows, order]
    return values[rows, order], indices[rows, order], codes, cells


def _finish(tables, merged):
    """Float64 sums of the winners, sorted by (sum, index): the kernels' refine
    on the winners' own code rows, laid out in increasing global index so
    that its tie order (by position) is the order by index."""
    _, indices, codes, _ = merged
    n_queries, k = indices.shape
    order = np.argsort(indices, axis=1)
    rows = np.arange(n_queries)[:, None]
    indices, codes = indices[rows, order], codes[rows, order]
    positions = np.arange(n_queries * k).reshape(n_queries, k)
    sums, positions = _refine(tables, codes.reshape(n_queries * k, -1), positions)
    return sums, indices.reshape(-1)[positions]


# ---------------------------------------------------------------------------
# Client side
class DaskIndex(QuantizedIndex):
    """A :class:`~skquant._index.QuantizedIndex` whose database lives on a dask cluster.

    Parameters
    ----------
    quantizer : codebook object
        The codebooks the codes refer to.
    codes : dask.array.Array of shape (n_items, n_codebooks), integer
        The database codes, chunked by rows (persisted on construction).
    labels : dask.array.Array of shape (n_items,) or (n_items, n_labels), default=None
        Labels of the items, chunked like ``codes``.
    coarse_centroids : ndarray of shape (n_lists, dim), default=None
        Cell centroids of an inverted file.
    cells : dask.array.Array of shape (n_items,), default=None
        Cells of the items for these centroids, when known (required with
        ``by_residual=True``), chunked like ``codes``.
    by_residual : bool, default=False
        Whether the codes encode residuals to their cells (see
        :class:`~skquant._index.QuantizedIndex`).

    Notes
    -----
    ``codes`` and ``labels`` are persisted dask arrays: reading them (e.g.
    ``codes.compute()``) gathers them to the caller. Pickling gathers the
    whole database too and loads as an in-memory
    :class:`~skquant._index.QuantizedIndex`, up to :data:`MAX_GATHER_BYTES`
    bytes of codes, labels and cells; larger databases raise a ValueError
    (save ``codes`` with :func:`dask.array.to_zarr` instead).

    Examples
    --------
    Estimators build one when given a dask array (here on dask's synchronous
    scheduler; a ``distributed.Client`` runs the same graphs on a cluster):

    >>> import dask
    >>> import dask.array as da
    >>> from sklearn.datasets import load_digits
    >>> from skquant import ProductQuantizer
    >>> X, _ = load_digits(return_X_y=True)
    >>> pq = ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0).fit(X)
    >>> expected = pq.kneighbors(X[:5], n_neighbors=3)
    >>> with dask.config.set(scheduler="synchronous"):
    ...     pq = pq.index(da.from_array(X, chunks=(500, 64)))
    ...     dist, ind = pq.kneighbors(X[:5], n_neighbors=3)
    >>> type(pq.index_).__name__, pq.codes_.chunks[0]
    ('DaskIndex', (500, 500, 500, 297))
    >>> bool((ind == expected[1]).all() and (dist == expected[0]).all())
    True
    """

    def __init__(self, quantizer, codes, labels=None, *, coarse_centroids=None,
                 cells=None, by_residual=False):
        self._chunks = None
        self._gathered = None
        self._terms = None  # (centroids, their residual terms), cached
        super().__init__(quantizer, codes, labels, coarse_centroids=coarse_centroids,
                         cells=cells, by_residual=by_residual)

    @classmethod
    def from_index(cls, index, chunk_size):
        """An in-memory index moved to the cluster, in chunks of ``chunk_size`` rows."""
        chunks = tuple(
            min(chunk_size, index.n_items - start)
            for start in range(0, index.n_items, chunk_size)
        ) or (0,)
        labels = None if index.labels is None else as_dask_rows(index.labels, chunks)
        # The cells known for every item travel (those of residual codes always).
        with index._lock:
            cells = index._lists.assignments if index._lists is not None else index._cells
        if cells is not None and len(cells) != index.n_items:
            cells = None
        cells = None if cells is None else as_dask_rows(cells, chunks)
        return cls.like(index, as_dask_rows(index.codes, chunks), labels, cells)

    def _set_codes(self, codes, labels, cells):
        if not is_dask_array(codes):
            raise TypeError(
                f"A DaskIndex holds dask arrays; got codes of type {type(codes).__name__}."
            )
        if labels is not None:
            labels = as_dask_rows(labels, codes.chunks[0])
        if cells is not None:
            cells = as_dask_rows(cells, codes.chunks[0])
        # Together: residual codes and their cells come out of the same tasks.
        self.codes, self.labels, self._cells = _persist(codes, labels, cells)
        self._layout = None
        self._lists = None
        self._chunks = None
        self._gathered = None

    @staticmethod
    def _as_cells(cells):
        if is_dask_array(cells):
            return cells.astype(np.int32)
        return QuantizedIndex._as_cells(cells)

    def _check_cells(self, codes, cells):
        if not is_dask_array(cells):
            return super()._check_cells(codes, cells)
        # The values were computed by the encoder on the workers (checking
        # them here would compute every chunk once more).
        if cells.shape[0] != codes.shape[0]:
            raise ValueError(
                "Residual codes need the cell of every item: got "
                f"{cells.shape[0]} cells for {codes.shape[0]} codes."
            )
        return None

    # ------------------------------------------------------------------ content
    def add(self, codes, labels=None, cells=None):
        """Append items: dask arrays are appended as their chunks, in-memory
        ones become one new chunk on the cluster (``cells``: as for
        :meth:`QuantizedIndex.add <skquant._index.QuantizedIndex.add>`).
        Returns self."""
        _, da = _import_dask()
        chunk = max(self.codes.chunks[0]) if self.n_items else max(1, len(codes))
        codes = as_dask_rows(codes, codes.chunks[0] if is_dask_array(codes) else chunk)
        if labels is not None:
            labels = da.concatenate([self.labels, as_dask_rows(labels, codes.chunks[0])])
        if self.by_residual:
            if cells is None:
                self._check_cells(codes, None)
            cells = self._as_cells(as_dask_rows(cells, codes.chunks[0]))
            self._check_cells(codes, cells)
            cells = da.concatenate([self._cells, cells])
        else:
            cells = self._cells
            if cells is not None:
                cells = da.concatenate([cells, self._assign_dask(codes)])
        with self._lock:
            self._set_codes(da.concatenate([self.codes, codes]), labels, cells)
        return self

    def reconstruct(self, items):
        """Reconstructions of the indexed items ``items``, fetched from the
        cluster (their codes, and cells for residual codes)."""
        dask, _ = _import_dask()
        cells = self.cells[items] if self.by_residual else None
        codes, cells = dask.compute(self.codes[items], cells)
        return self.decode(codes, cells)

    # ------------------------------------------------------------------ inverted file
    @property
    def cells(self):
        """Cell of every item (a persisted dask array of int32), or None
        without an inverted file; direct codes are assigned on the workers
        on first use."""
        if self._coarse_centroids is None:
            return None
        with self._lock:
            return self._known_cells()

    def _known_cells(self):
        # (Under the lock.)
        if self._cells is None or self._cells.shape[0] != self.n_items:
            (self._cells,) = _persist(self._assign_dask(self.codes))
        return self._cells

    def _gather_rows(self, rows):
        return self.codes[rows].compute()

    def _assign_dask(self, codes):
        assigner = QuantizedIndex(
            self.quantizer, np.empty((0, codes.shape[1]), dtype=codes.dtype),
            coarse_centroids=self._coarse_centroids,
        )
        return map_rows(_assign_chunk, codes, assigner, dtype=np.int32)

    def _residual_terms(self):
        """Per-cell tables of residual codes, computed once (on the client)."""
        centroids = self._coarse_centroids
        if self._terms is None or self._terms[0] is not centroids:
            self._terms = (centroids, self.quantizer.residual_terms(centroids))
        return self._terms[1]

    def _chunk_objects(self):
        """Persisted per-chunk scan objects (and the cell sizes), built once per
        state of the codes and cells; assigns cells on the workers when needed."""
        dask, _ = _import_dask()
        ivf = self._coarse_centroids is not None
        with self._lock:
            # The cache holds the arrays it was built from (not their ids,
            # which a later array may reuse).
            cached = self._chunks
            if (cached is not None and cached[0] == ivf and cached[1] is self.codes
                    and cached[2] is self._cells):
                return cached[3:]
            cell_sizes = None
            blocks = self.codes.to_delayed().ravel()
            if ivf:
                self._known_cells()
                n_lists = self.n_lists
                counts = self._cells.map_blocks(
                    _cell_counts, n_lists, dtype=np.int64, chunks=((1,) * len(blocks),
                                                                   (n_lists,)),
                    new_axis=1, meta=np.empty((0, 0), dtype=np.int64))
                cell_sizes = counts.sum(axis=0).compute()
                cells = self._cells.to_delayed().ravel()
                terms = None
                if self.by_residual:
                    terms = _ship(self._residual_terms(), "residual-terms")
                parts = [dask.delayed(_make_chunk)(b, c, n_lists, terms)
                         for b, c in zip(blocks, cells, strict=True)]
            else:
                parts = [dask.delayed(_make_chunk)(b) for b in blocks]
            parts = list(dask.persist(*parts))
            offsets = np.concatenate([[0], np.cumsum(self.codes.chunks[0])])
            self._chunks = (ivf, self.codes, self._cells, parts, offsets, cell_sizes)
            return self._chunks[3:]

    def inverted_lists(self):
        raise NotImplementedError(
            "A DaskIndex keeps one inverted file per chunk, on the workers."
        )

    def scan_layout(self):
        raise NotImplementedError(
            "A DaskIndex keeps one scan layout per chunk, on the workers."
        )

    # ------------------------------------------------------------------ search
    def search(self, queries, n_neighbors, *, n_probe=None, n_jobs=None):
        """The ``n_neighbors`` nearest items of each query: one task per chunk,
        a merge tree, the float64 re-sum on the client.

        Same parameters and results as
        :meth:`QuantizedIndex.search <skquant._index.QuantizedIndex.search>`;
        ``n_jobs`` is unused (the chunks run in parallel on the workers).
        """
        dask, _ = _import_dask()
        if not 1 <= n_neighbors <= self.n_items:
            raise ValueError(
                f"Expected 1 <= n_neighbors <= n_items, got n_neighbors={n_neighbors} "
                f"and n_items={self.n_items}."
            )
        queries = np.asarray(queries)
        # The scan's inputs, as QuantizedIndex.search prepares them.
        if self.by_residual:
            tables = self._residual_query_tables(queries)
            n_probe = self.n_lists if n_probe is None else n_probe
        else:
            tables = np.asarray(self.quantizer.lookup_tables(queries), dtype=np.float32)
            if n_probe is not None and n_probe >= self.n_lists:
                n_probe = None  # the exhaustive scan
        chunks, offsets, cell_sizes = self._chunk_objects()
        coarse = None
        if n_probe is not None:
            # The probes of the whole database (its cell sizes), chosen here
            # as the in-memory index chooses them: every chunk scans them.
            probes = self._coarse().probes(queries, cell_sizes, n_probe, n_neighbors)
            coarse = _ship((probes, cell_sizes, self.by_residual), "coarse")
        tables_d = _ship(tables, "tables")
        token = uuid.uuid4().hex
        parts = [
            dask.delayed(_scan_chunk)(chunk, tables_d, n_neighbors, int(offsets[i]), coarse,
                                      dask_key_name=f"skquant-scan-{token}-{i}")
            for i, chunk in enumerate(chunks) if offsets[i + 1] > offsets[i]
        ]
        level = 0
        while len(parts) > 1 or level == 0:
            parts = [
                dask.delayed(_merge_candidates)(
                    parts[j : j + MERGE_FAN_IN], n_neighbors,
                    dask_key_name=f"skquant-merge-{token}-{level}-{j}")
                for j in range(0, len(parts), MERGE_FAN_IN)
            ]
            level += 1
        (merged,) = dask.compute(parts[0])
        if self.by_residual:
            _, indices, codes, cells = merged
            return self._residual_distances(
                queries, indices, codes.reshape(-1, codes.shape[-1]), cells
            )
        sums, indices = _finish(tables, merged)
        return self.quantizer.distances(sums), indices

    # ------------------------------------------------------------------ gathering
    def gather(self, purpose="gather"):
        """This index in memory (a :class:`~skquant._index.QuantizedIndex`).

        Parameters
        ----------
        purpose : str, default="gather"
            What needs it, for the error message.

        Returns
        -------
        index : QuantizedIndex
            Same codes, labels, coarse quantizer and known cells.

        Raises
        ------
        ValueError
            When codes, labels and cells exceed :data:`MAX_GATHER_BYTES`.
        """
        dask, _ = _import_dask()
        cells = self._cells if self._cells is not None and (
            self._cells.shape[0] == self.n_items) else None
        size = _nbytes(self.codes) + _nbytes(self.labels) + _nbytes(cells)
        if size > MAX_GATHER_BYTES:
            raise ValueError(
                f"{purpose} needs the whole database in this process, but its codes, "
                f"labels and cells hold {size / 2**20:.1f} MiB on the cluster, more "
                f"than skquant._dask_index.MAX_GATHER_BYTES = "
                f"{MAX_GATHER_BYTES / 2**20:.1f} MiB. Save the database where it "
                "is (e.g. dask.array.to_zarr(est.codes_, ...)), or raise the limit "
                "if this process has the memory."
            )
        codes, labels, cells = dask.compute(self.codes, self.labels, cells)
        return QuantizedIndex.like(self, codes, labels, cells)

    def __getstate__(self):
        # The state of the gathered in-memory index; kept until __reduce_ex__
        # (a checksum reads the state, then pickle reduces the object: one
        # gather for both).
        if self._gathered is None:
            self._gathered = self.gather("Pickling a dask-backed index").__getstate__()
        return self._gathered

    def __reduce_ex__(self, protocol):
        state = self.__getstate__()
        self._gathered = None
        # Loads as an in-memory index: the pickle does not refer to the cluster.
        return (QuantizedIndex.__new__, (QuantizedIndex,), state)
