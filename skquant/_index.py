"""The searchable index: codes, labels, scan layouts and an optional inverted file.

:class:`QuantizedIndex` is the one search path of every estimator: it holds
the database (codes and their labels), the layouts the kernels scan (a
:class:`~skquant._search.CodeLayout`, and the cells of an inverted file when
it has a coarse quantizer) and answers ``search`` by handing lookup tables to
the kernels (:func:`~skquant._search.aqd_search`,
:func:`~skquant._ivf.ivf_search`). It holds the estimator's codebook object
(see :mod:`skquant._codebooks`), used through its interface only: ``decode``
places items in cells, ``lookup_tables`` scores queries, ``distances`` turns
table sums into distances. Compare faiss's ``IndexPQ``, which holds its
``ProductQuantizer``.

Derived data (scan layouts, inverted lists) is built on first use and dropped
when the codes it describes change; the cells of an inverted file (one
k-means assignment per item, the costly part) are kept across ``add`` and in
pickles.
"""

import functools
import numbers
import threading

import numpy as np
from joblib import effective_n_jobs
from sklearn import get_config
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state, gen_batches
from threadpoolctl import ThreadpoolController

from ._ivf import (
    _HEAP_PROBES,
    CoarseProbes,
    InvertedLists,
    assign_lists,
    ivf_search,
    residual_search,
    residual_search_args,
)
from ._search import CodeLayout, _local_backend, _run_shards, aqd_search

__all__ = ["RESIDUAL_POINTS_PER_LIST", "QuantizedIndex", "item_bias", "residuals",
           "train_coarse_quantizer"]

# Training points per cell: faiss warns below 39 and samples at most 256; the
# coarse cells only steer the probing (they never change a distance), so 64
# points and 20 Lloyd iterations (faiss trains IVF centroids with 10-25) keep
# training at seconds for thousands of cells.
_MAX_POINTS_PER_LIST = 64
# An inverted-file search is split between threads only in parts of at
# least this many queries and (query, item) pairs: a part costs a thread
# dispatch and its own calls (tables, coarse scores, exact distances).
_MIN_PART_QUERIES = 16
_MIN_PART_PAIRS = 2**17
_COARSE_MAX_ITER = 20
# Residual codes are encoded against their cells, so the cells shape every
# reconstruction: trained like faiss's (at most 256 points per cell).
RESIDUAL_POINTS_PER_LIST = 256


def train_coarse_quantizer(X, n_lists, *, metric="euclidean", random_state=None,
                           max_points_per_list=_MAX_POINTS_PER_LIST):
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
    max_points_per_list : int, default=64
        k-means runs on at most this many points per cell (a random sample).

    Returns
    -------
    centroids : ndarray of shape (n_lists, n_features), float32

    Examples
    --------
    >>> import numpy as np
    >>> from skquant._index import train_coarse_quantizer
    >>> from skquant._ivf import assign_lists
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
    max_points = max_points_per_list * n_lists
    if n_samples > max_points:
        X = X[np.sort(rng.choice(n_samples, max_points, replace=False))]
    # Random init (as faiss): k-means++ costs O(n_lists**2) greedy passes,
    # minutes for thousands of cells.
    kmeans = KMeans(n_clusters=n_lists, init="random", n_init=1,
                    max_iter=_COARSE_MAX_ITER, random_state=rng)
    centroids = kmeans.fit(np.asarray(X, dtype=np.float32)).cluster_centers_
    if metric == "inner_product":
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        centroids = centroids / np.maximum(norms, np.finfo(np.float32).tiny)
    return np.ascontiguousarray(centroids, dtype=np.float32)


def residuals(X, centroids, metric="euclidean"):
    """``X - centroids[cell]`` for each row's nearest cell, (n, dim) float32
    (computed in float64, in row chunks; ``X`` dense)."""
    X = np.asarray(X)
    out = np.empty(X.shape, dtype=np.float32)
    row_bytes = 8 * (centroids.shape[0] + 3 * X.shape[1])
    for batch in gen_batches(len(X), rows_per_chunk(row_bytes)):
        block = np.asarray(X[batch], dtype=np.float64)
        cells = assign_lists(block, centroids, metric)
        out[batch] = block - centroids[cells].astype(np.float64)
    return out


def item_bias(terms, codes, cells):
    """Query-independent part of each item's squared distance with residual
    codes: ``||r||^2 + 2 <c, r>`` (float32), from the per-cell tables
    ``terms`` ``(n_lists, M, K)`` of the codebooks (``residual_terms``,
    faiss's "precomputed tables"). An item's value depends on its own code
    and cell only (summed over ``m`` in order, in float64)."""
    n_lists, n_subspaces, n_codewords = terms.shape
    flat = terms.reshape(-1)
    bias = np.empty(len(codes), dtype=np.float32)
    for batch in gen_batches(len(codes), 2**18):
        base = cells[batch].astype(np.intp) * (n_subspaces * n_codewords)
        acc = np.zeros(len(base), dtype=np.float64)
        for m in range(n_subspaces):
            acc += flat[base + (m * n_codewords + codes[batch, m].astype(np.intp))]
        bias[batch] = acc
    return bias


def rows_per_chunk(row_bytes):
    """Rows that fit in ``working_memory`` (at least 1)."""
    working_memory = get_config()["working_memory"]
    return max(1, int(working_memory * 2**20) // max(1, int(row_bytes)))


def seed_of(random_state):
    """An int seed (or None) from an int / RandomState / None, without
    advancing a shared RandomState more than once."""
    if random_state is None or isinstance(random_state, numbers.Integral):
        return random_state
    return int(random_state.randint(np.iinfo(np.int32).max))


@functools.cache
def _blas_controller():
    """A :class:`threadpoolctl.ThreadpoolController`, made once (it lists
    the loaded libraries: about a millisecond)."""
    return ThreadpoolController()


class QuantizedIndex:
    """A searchable database of codes: exhaustive or inverted-file search.

    Parameters
    ----------
    quantizer : codebook object
        The codebooks the codes refer to (:class:`~skquant._codebooks.ProductCodebooks`,
        :class:`~skquant._codebooks.AdditiveCodebooks`): anything with
        ``decode``, ``lookup_tables``, ``distances``, ``metric`` and
        ``n_codewords``.
    codes : ndarray of shape (n_items, n_codebooks), integer
        The database codes (stored Fortran-ordered: one contiguous run per
        codebook, the layout the kernels scan).
    labels : ndarray of shape (n_items,) or (n_items, n_labels), default=None
        Labels of the items (for retrieval scores), or None.
    coarse_centroids : ndarray of shape (n_lists, dim), default=None
        Cell centroids of an inverted file (see :meth:`train_inverted_file`).
    cells : ndarray of shape (n_cells_known,), default=None
        Cells of the first items for these centroids, when already known
        (required, for every item, with ``by_residual=True``).
    by_residual : bool, default=False
        Whether the codes encode residuals ``z - c`` to the centroid ``c``
        of each item's cell (faiss ``IndexIVFPQ`` with ``by_residual``,
        product codebooks with Euclidean tables only). The cells are then
        part of the codes: they are given with the codes (see
        :meth:`encode`), kept, and cannot be retrained without re-encoding.
        Otherwise the codes are the items' own codes and the cells, derived
        from the reconstructions, only decide what a query scans.

    Attributes
    ----------
    n_items : int
        Number of indexed items.
    n_lists : int or None
        Number of cells of the inverted file, None without one.
    """

    def __init__(self, quantizer, codes, labels=None, *, coarse_centroids=None,
                 cells=None, by_residual=False):
        if by_residual and coarse_centroids is None:
            raise ValueError("by_residual=True needs coarse_centroids.")
        self.quantizer = quantizer
        self.by_residual = bool(by_residual)
        self._coarse_probes = None  # CoarseProbes of the centroids, cached
        self._residual_args = None  # (lists, coarse, codebooks, their arguments), cached
        self._lock = threading.Lock()
        self._coarse_centroids = coarse_centroids
        cells = self._as_cells(cells)
        if self.by_residual:
            self._check_cells(codes, cells)
        self._set_codes(codes, labels, cells)
        # Items the coarse quantizer was last trained on (None: unknown, e.g.
        # centroids set directly or read from an old pickle); the estimators
        # retrain the cells when the database grows far past it.
        self.n_items_trained = None

    @classmethod
    def like(cls, index, codes, labels=None, cells=None):
        """An index of ``codes`` (and their ``cells``, for residual codes)
        with the codebooks, coarse quantizer and kind of codes of ``index``."""
        new = cls(index.quantizer, codes, labels, coarse_centroids=index.coarse_centroids,
                  cells=cells, by_residual=index.by_residual)
        new.n_items_trained = index.n_items_trained
        return new

    def _set_codes(self, codes, labels, cells):
        """Store the items (and the cells known for them); drop the layouts."""
        self.codes = np.asfortranarray(codes)
        self.labels = labels
        self._cells = cells
        self._layout = None
        self._lists = None

    @staticmethod
    def _as_cells(cells):
        return None if cells is None else np.asarray(cells, dtype=np.int32)

    @property
    def n_items(self):
        return self.codes.shape[0]

    @property
    def n_lists(self):
        centroids = self._coarse_centroids
        return None if centroids is None else centroids.shape[0]

    @property
    def coarse_centroids(self):
        """Cell centroids of the inverted file, or None (exhaustive search only).

        Setting them drops the cells computed for the previous ones.
        """
        return self._coarse_centroids

    @coarse_centroids.setter
    def coarse_centroids(self, centroids):
        if self.by_residual:
            raise ValueError(
                "The codes encode residuals to the current cells: new coarse "
                "centroids would change every reconstruction. Refit the model "
                "to change the cells (or use direct codes, by_residual=False)."
            )
        with self._lock:
            self._coarse_centroids = centroids
            self._cells = None
            self._lists = None
            self.n_items_trained = None

    @property
    def cells(self):
        """Cell of every item (int32), or None without an inverted file.

        With direct codes they are computed from the reconstructions on
        first use; with residual codes they were given with the codes.
        """
        if self._coarse_centroids is None:
            return None
        return self.inverted_lists().assignments

    def _check_cells(self, codes, cells):
        if cells is None or len(cells) != len(codes):
            raise ValueError(
                "Residual codes need the cell of every item: got "
                f"{None if cells is None else len(cells)} cells for {len(codes)} codes."
            )
        if len(cells) and (cells.min() < 0 or cells.max() >= self.n_lists):
            raise ValueError(f"cells must lie in [0, {self.n_lists - 1}].")

    # ------------------------------------------------------------------ content
    def encode(self, Z):
        """Codes of embeddings ``Z`` as this index stores them.

        Returns
        -------
        codes : ndarray of shape (n, n_codebooks)
            The codes of ``Z``, or with residual codes those of
            ``Z - coarse_centroids[cells]``.
        cells : ndarray of shape (n,), int32, or None
            The nearest cell of each row for residual codes, else None (the
            cells of direct codes are derived from them when needed).
        """
        if not self.by_residual:
            return self.quantizer.encode(Z), None
        Z = np.asarray(Z, dtype=np.float64)
        cells = assign_lists(Z, self._coarse_centroids, self.quantizer.metric)
        residuals = Z - self._coarse_centroids[cells].astype(np.float64)
        return self.quantizer.encode(residuals), cells

    def decode(self, codes, cells=None):
        """Reconstructions ``(n, dim)`` float32 of codes (and, for residual
        codes, their cells: ``centroid + decoded residual``)."""
        decoded = self.quantizer.decode(codes)
        if not self.by_residual:
            return decoded
        if cells is None:
            raise ValueError(
                "These codes encode residuals to the cells of an inverted file "
                "(by_residual=True): decoding them needs their cells, e.g. "
                "decode(codes_, cells=cells_), or the cells returned by "
                "encode(X, return_cells=True)."
            )
        cells = np.asarray(cells)
        if cells.shape != (len(codes),) or not np.issubdtype(cells.dtype, np.integer):
            raise ValueError(
                f"cells must be integers of shape ({len(codes)},); got {cells.dtype} "
                f"of shape {cells.shape}."
            )
        if cells.size and (cells.min() < 0 or cells.max() >= self.n_lists):
            raise ValueError(
                f"cells must lie in [0, {self.n_lists - 1}]; got values in "
                f"[{cells.min()}, {cells.max()}]."
            )
        out = self._coarse_centroids[cells].astype(np.float64)
        out += decoded
        return out.astype(np.float32)

    def reconstruct(self, items):
        """Reconstructions of the indexed items ``items`` (a slice or indices)."""
        cells = self.cells[items] if self.by_residual else None
        return self.decode(self.codes[items], cells)

    def replace(self, codes, labels=None, cells=None):
        """Replace the items, keeping the coarse quantizer; returns self.

        ``cells`` (the cells of residual codes, see :meth:`encode`) is
        required with residual codes and ignored otherwise.
        """
        if self.by_residual:
            cells = self._as_cells(cells)
            self._check_cells(codes, cells)
        else:
            cells = None
        with self._lock:
            self._set_codes(codes, labels, cells)
        return self

    def add(self, codes, labels=None, cells=None):
        """Append items (their indices follow the existing ones); returns self.

        ``labels`` must be given exactly when the index holds labels (the
        estimators check this at their public boundary); ``cells`` as for
        :meth:`replace`. The cells already known for the existing items are
        kept.
        """
        if self.by_residual:
            cells = self._as_cells(cells)
            self._check_cells(codes, cells)
        codes = np.concatenate([self.codes, codes])
        if labels is not None:
            labels = np.concatenate([self.labels, labels])
        with self._lock:
            known = self._lists.assignments if self._lists is not None else self._cells
            if self.by_residual:
                known = np.concatenate([known, cells])
            self._set_codes(codes, labels, known)
        return self

    # ------------------------------------------------------------------ inverted file
    def train_inverted_file(self, n_lists, *, random_state=None):
        """Train the coarse quantizer: k-means on the items' reconstructions.

        k-means samples a bounded number of items per cell, so only those are
        decoded. The cells of every item are recomputed on the next search.

        Parameters
        ----------
        n_lists : int
            Number of cells, ``1 <= n_lists <= n_items``.
        random_state : int, RandomState instance or None, default=None
            Seed of the sample and of k-means.

        Returns
        -------
        self : QuantizedIndex
        """
        if self.by_residual:
            raise ValueError(
                "The codes encode residuals to the cells they were encoded "
                "with: retraining the cells would need the original vectors. "
                "Refit the model to change the cells (or use direct codes, "
                "by_residual=False)."
            )
        n_items = self.n_items
        seed = seed_of(random_state)
        rng = np.random.default_rng(seed)
        sample = np.arange(n_items)
        max_points = _MAX_POINTS_PER_LIST * n_lists
        if n_items > max_points:
            sample = np.sort(rng.choice(n_items, max_points, replace=False))
        self.coarse_centroids = train_coarse_quantizer(
            self.quantizer.decode(self._gather_rows(sample)), n_lists,
            metric=self.quantizer.metric, random_state=seed,
        )
        self.n_items_trained = n_items
        return self

    def _gather_rows(self, rows):
        """The code rows ``rows`` as an in-memory array (a subclass may hold
        its codes elsewhere)."""
        return self.codes[rows]

    def assign_cells(self, codes):
        """Cell of each code row: the nearest coarse centroid of its reconstruction."""
        centroids = self._coarse_centroids
        cells = np.empty(len(codes), dtype=np.int32)
        row_bytes = 8 * (self.quantizer.dim + centroids.shape[0])  # float64 scores
        for batch in gen_batches(len(codes), rows_per_chunk(row_bytes)):
            cells[batch] = assign_lists(
                self.quantizer.decode(codes[batch]), centroids, self.quantizer.metric
            )
        return cells

    def inverted_lists(self):
        """The codes grouped by cell (:class:`~skquant._ivf.InvertedLists`),
        built on first use; only items whose cell is unknown are assigned."""
        with self._lock:
            if self._lists is None:
                cells = self._cells
                if cells is None:
                    cells = self.assign_cells(self.codes)
                elif len(cells) < self.n_items:
                    cells = np.concatenate([cells, self.assign_cells(self.codes[len(cells):])])
                self._cells = cells
                bias = self._item_bias(cells) if self.by_residual else None
                self._lists = InvertedLists(self.codes, cells, self.n_lists, item_bias=bias)
            return self._lists

    def _item_bias(self, cells):
        """Query-independent part of each item's squared distance with
        residual codes (see :func:`item_bias`)."""
        return item_bias(self.quantizer.residual_terms(self._coarse_centroids),
                         self.codes, cells)

    def scan_layout(self):
        """The :class:`~skquant._search.CodeLayout` of the codes, built once."""
        with self._lock:
            if self._layout is None:
                self._layout = CodeLayout(self.codes)
            return self._layout

    # ------------------------------------------------------------------ search
    def search(self, queries, n_neighbors, *, n_probe=None, n_jobs=None):
        """The ``n_neighbors`` nearest items of each query.

        Parameters
        ----------
        queries : ndarray of shape (n_queries, dim)
            Queries in the embedding space of the codebooks.
        n_neighbors : int
            Results per query, ``1 <= n_neighbors <= n_items``.
        n_probe : int, default=None
            Cells scanned per query through the inverted file; None, or
            ``n_probe >= n_lists``, scans the whole database with the
            exhaustive kernel.
        n_jobs : int, default=None
            Threads (or joblib workers) of the scan.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float64
            Ascending (see the codebooks' ``distances``).
        indices : ndarray of shape (n_queries, n_neighbors), intp
            Item indices; equal distances ordered by lower index.
        """
        if self.by_residual:
            if n_probe is None:
                n_probe = self.n_lists
        elif n_probe is not None and n_probe >= self.n_lists:
            # Probing every cell is the exhaustive search: the exhaustive
            # kernel gives the same results (same float64 re-sum, same
            # tie order) without the cell bookkeeping, so it is never slower.
            n_probe = None
        if n_probe is None:
            tables = self.quantizer.lookup_tables(queries)
            sums, indices = aqd_search(
                tables, self.codes, n_neighbors, n_jobs=n_jobs, layout=self.scan_layout()
            )
            return self.quantizer.distances(sums), indices
        # The inverted file: the queries' whole searches (tables, coarse
        # scores, scan, exact distances) in parts, one thread each; numpy's
        # calls and the compiled scan release the GIL.
        parts = self._query_parts(len(queries), n_neighbors, n_probe, n_jobs)
        search = self._search_residual if self.by_residual else self._search_direct
        if len(parts) == 1:
            return search(queries, n_neighbors, n_probe)
        # Each part's BLAS calls (coarse scores, tables) in one thread: two
        # parts' multi-threaded OpenBLAS calls at once spun against each
        # other (a 500-query part's tables took 51 ms instead of 5).
        with _blas_controller().limit(limits=1, user_api="blas"):
            results = _run_shards(search, parts,
                                  lambda part: (queries[part], n_neighbors, n_probe))
        return (np.concatenate([d for d, _ in results]),
                np.concatenate([i for _, i in results]))

    def _query_parts(self, n_queries, n_neighbors, n_probe, n_jobs):
        """Slices of the queries searched in parallel threads, one per
        thread: one slice unless every part gets enough work (see
        ``_MIN_PART_*``), or under a non-local joblib backend (whose workers
        would receive the whole index)."""
        if n_queries < 2 * _MIN_PART_QUERIES:
            return [slice(0, n_queries)]
        pairs = n_queries * max(n_probe * self.n_items // max(self.n_lists, 1), n_neighbors)
        most = min(n_queries // _MIN_PART_QUERIES, pairs // _MIN_PART_PAIRS)
        if most < 2 or not _local_backend():
            return [slice(0, n_queries)]
        n_parts = min(most, effective_n_jobs(n_jobs))
        if n_parts < 2:
            return [slice(0, n_queries)]
        bounds = np.linspace(0, n_queries, n_parts + 1).astype(int)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _coarse(self):
        """The :class:`~skquant._ivf.CoarseProbes` of the current centroids
        (residual codes: Euclidean cells; direct codes: the codebooks'
        metric), built once: its weights and norms cost more than one
        query's coarse step."""
        centroids = self._coarse_centroids
        metric = "euclidean" if self.by_residual else self.quantizer.metric
        coarse = self._coarse_probes
        if coarse is None or coarse.centroids is not centroids or coarse.metric != metric:
            coarse = self._coarse_probes = CoarseProbes(centroids, metric)
        return coarse

    def _search_direct(self, queries, n_neighbors, n_probe):
        """Inverted-file search over direct codes, in the calling thread."""
        queries = np.asarray(queries)
        tables = self.quantizer.lookup_tables(queries)
        lists = self.inverted_lists()
        probes = self._coarse().probes(queries, lists.sizes, n_probe, n_neighbors)
        sums, indices = ivf_search(tables, None, lists, n_neighbors, probes=probes)
        return self.quantizer.distances(sums), indices

    def _search_residual(self, queries, n_neighbors, n_probe):
        """Search over residual codes: for a query ``q`` and an item of cell
        ``c`` with residual reconstruction ``r``,
        ``||q - c - r||^2 = ||q||^2 + (||c||^2 - 2 <q, c>) + (||r||^2 + 2 <c, r>)
        - 2 <q, r>``: the coarse score, a per-item term and one lookup table
        per query (``-2 <q_m, C_m[k]>``, shared by all its cells). The scan
        selects on these float32 sums; the winners' distances are then
        recomputed exactly, in float64, from their reconstructions."""
        queries = np.asarray(queries)
        lists = self.inverted_lists()
        quantizer = self.quantizer
        if (n_probe <= _HEAP_PROBES and self.n_items < 2**31
                and getattr(quantizer, "rotation", True) is None):
            # The same steps, one compiled loop per query.
            coarse = self._coarse()
            cached = self._residual_args
            if (cached is None or cached[0] is not lists or cached[1] is not coarse
                    or cached[2] is not quantizer.codebooks):
                cached = self._residual_args = (lists, coarse, quantizer.codebooks,
                                                residual_search_args(
                                                    coarse, lists, quantizer.codebooks,
                                                    quantizer._codebooks64()))
            prepared = cached[3]
            return residual_search(queries, coarse, prepared, n_neighbors, n_probe)
        tables = self._residual_query_tables(queries)
        probes = self._coarse().probes(queries, lists.sizes, n_probe, n_neighbors)
        _, indices = ivf_search(
            tables, None, lists, n_neighbors, add_scores=True, refine=False, probes=probes,
        )
        return self._residual_distances(queries, indices)

    def _residual_query_tables(self, queries):
        """One table per query for residual codes: ``-2 <q_m, C_m[k]>``."""
        tables = self.quantizer.lookup_tables(queries, metric="inner_product")
        tables *= np.float32(2.0)  # (exact)
        return tables

    def _residual_distances(self, queries, indices, codes=None, cells=None):
        """Exact distances of the selected items ``indices`` (n_queries, k),
        re-sorted by (distance, index): ``||q - (c + r)||`` in float64.
        ``codes`` (``n_queries * k`` rows, in the order of
        ``indices.ravel()``) and ``cells`` (n_queries, k): the candidates'
        residual codes and cells, when not in this index (dask chunks)."""
        from ._scan_loop import residual_neighbors, residual_sq_distances  # numba

        if codes is None:
            lists = self.inverted_lists()
            codes, cells, rows = lists.codes, lists.assignments[indices], indices
        else:
            rows = np.arange(indices.size).reshape(indices.shape)
        if getattr(self.quantizer, "rotation", True) is None:
            # Product codebooks without rotation: decoded inside the loop.
            distances = np.empty(indices.shape)
            out = np.empty_like(indices)
            residual_neighbors(np.asarray(queries), self._coarse_centroids,
                               self.quantizer.codebooks, codes, rows, np.asarray(cells),
                               indices, distances, out)
            return distances, out
        residuals = np.ascontiguousarray(self.quantizer.decode(codes[rows.ravel()]),
                                         dtype=np.float32)
        sq = residual_sq_distances(np.ascontiguousarray(queries), self._coarse_centroids,
                                   np.ascontiguousarray(cells), residuals)
        order = np.lexsort((indices, sq), axis=1)
        rows = np.arange(len(order))[:, None]  # (take_along_axis: 10x the overhead)
        sq, indices = sq[rows, order], indices[rows, order]
        return np.sqrt(np.maximum(sq, 0.0)), indices

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # Derived layouts are rebuilt on demand; the cells are kept.
        with self._lock:
            cells = self._lists.assignments if self._lists is not None else self._cells
        state = {"quantizer": self.quantizer, "codes": self.codes, "labels": self.labels,
                 "coarse_centroids": self._coarse_centroids, "cells": cells,
                 "n_items_trained": self.n_items_trained}
        if self.by_residual:
            # Only then: pickles of direct-code indexes keep their old state.
            state["by_residual"] = True
        return state

    def __setstate__(self, state):
        self.__init__(
            state["quantizer"], state["codes"], state["labels"],
            coarse_centroids=state["coarse_centroids"], cells=state["cells"],
            by_residual=state.get("by_residual", False),
        )
        self.n_items_trained = state.get("n_items_trained")
