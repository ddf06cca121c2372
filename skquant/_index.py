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

import numbers
import threading

import numpy as np
from sklearn import get_config
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state, gen_batches

from ._ivf import InvertedLists, assign_lists, coarse_scores, ivf_search
from ._search import CodeLayout, aqd_search

__all__ = ["QuantizedIndex", "train_coarse_quantizer"]

# Training points per cell: faiss warns below 39 and samples at most 256; the
# coarse cells only steer the probing (they never change a distance), so 64
# points and 20 Lloyd iterations (faiss trains IVF centroids with 10-25) keep
# training at seconds for thousands of cells.
_MAX_POINTS_PER_LIST = 64
_COARSE_MAX_ITER = 20


def train_coarse_quantizer(X, n_lists, *, metric="euclidean", random_state=None):
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
    max_points = _MAX_POINTS_PER_LIST * n_lists
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
        Cells of the first items for these centroids, when already known.

    Attributes
    ----------
    n_items : int
        Number of indexed items.
    n_lists : int or None
        Number of cells of the inverted file, None without one.
    """

    def __init__(self, quantizer, codes, labels=None, *, coarse_centroids=None,
                 cells=None):
        self.quantizer = quantizer
        self._lock = threading.Lock()
        self._set_codes(codes, labels)
        self._coarse_centroids = coarse_centroids
        self._cells = cells
        # Items the coarse quantizer was last trained on (None: unknown, e.g.
        # centroids set directly or read from an old pickle); the estimators
        # retrain the cells when the database grows far past it.
        self.n_items_trained = None

    def _set_codes(self, codes, labels):
        self.codes = np.asfortranarray(codes)
        self.labels = labels
        self._layout = None
        self._lists = None

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
        with self._lock:
            self._coarse_centroids = centroids
            self._cells = None
            self._lists = None
            self.n_items_trained = None

    # ------------------------------------------------------------------ content
    def replace(self, codes, labels=None):
        """Replace the items, keeping the coarse quantizer; returns self."""
        with self._lock:
            self._set_codes(codes, labels)
            self._cells = None
        return self

    def add(self, codes, labels=None):
        """Append items (their indices follow the existing ones); returns self.

        ``labels`` must be given exactly when the index holds labels (the
        estimators check this at their public boundary). The cells already
        computed for the existing items are kept.
        """
        codes = np.concatenate([self.codes, codes])
        if labels is not None:
            labels = np.concatenate([self.labels, labels])
        with self._lock:
            cells = self._lists.assignments if self._lists is not None else self._cells
            self._set_codes(codes, labels)
            self._cells = cells
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
                self._lists = InvertedLists(self.codes, cells, self.n_lists)
            return self._lists

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
        tables = self.quantizer.lookup_tables(queries)
        if n_probe is not None and n_probe >= self.n_lists:
            # Probing every cell is the exhaustive search: the exhaustive
            # kernel gives the same results (same float64 re-sum, same
            # tie order) without the cell bookkeeping, so it is never slower.
            n_probe = None
        if n_probe is None:
            sums, indices = aqd_search(
                tables, self.codes, n_neighbors, n_jobs=n_jobs, layout=self.scan_layout()
            )
        else:
            scores = coarse_scores(queries, self._coarse_centroids, self.quantizer.metric)
            sums, indices = ivf_search(
                tables, scores, self.inverted_lists(), n_neighbors,
                n_probe=n_probe, n_jobs=n_jobs,
            )
        return self.quantizer.distances(sums), indices

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # Derived layouts are rebuilt on demand; the cells are kept.
        with self._lock:
            cells = self._lists.assignments if self._lists is not None else self._cells
        return {"quantizer": self.quantizer, "codes": self.codes, "labels": self.labels,
                "coarse_centroids": self._coarse_centroids, "cells": cells,
                "n_items_trained": self.n_items_trained}

    def __setstate__(self, state):
        self.__init__(
            state["quantizer"], state["codes"], state["labels"],
            coarse_centroids=state["coarse_centroids"], cells=state["cells"],
        )
        self.n_items_trained = state.get("n_items_trained")
