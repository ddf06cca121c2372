"""BaseQuantizer: what every skquant estimator shares.

Validation, the searchable index (codes of the database and their labels),
``transform``/``encode``/``decode``, ``kneighbors`` with exactly the semantics
of :class:`sklearn.neighbors.NearestNeighbors`, and ``score`` (retrieval mAP).
Subclasses only learn a model: see the hooks documented on :class:`BaseQuantizer`.
"""

import numbers
import warnings
import zlib
from numbers import Integral

import numpy as np
from sklearn import get_config
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import InconsistentVersionWarning as _SklearnVersionWarning
from sklearn.neighbors._base import KNeighborsMixin
from sklearn.utils import gen_batches, gen_even_slices
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from ._convergence import warn_if_collapsed
from ._search import CodeLayout, aqd_search, euclidean_tables, inner_product_tables


def _check_labels(y, n_samples):
    """Validate retrieval labels: 1-D class labels or a 2-D 0/1 indicator.

    Returns a new array (the caller's ``y`` is never kept or modified).
    """
    y = np.array(y, copy=True)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()
    if y.shape[0] != n_samples:
        raise ValueError(
            f"y has {y.shape[0]} samples but X has {n_samples}: they must match."
        )
    if y.ndim == 2:
        # type_of_target would call a constant matrix of 3s "multilabel": check values.
        if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
            raise ValueError(
                "A 2-D y must be a multi-label indicator matrix of 0/1 values; got "
                f"values {np.unique(y)[:5]}."
            )
        y = y.astype(np.int8)
    elif y.ndim != 1:
        raise ValueError(f"y must be 1-D labels or a 2-D indicator, got shape {y.shape}.")
    return y


def _check_float32_range(X):
    """Refuse finite float64 values that overflow float32.

    Embeddings, codebooks and lookup tables are float32: a value beyond
    ~3.4e38 would silently become inf, then NaN tables and garbage codes.
    """
    if X.dtype == np.float64 and X.size:
        limit = np.finfo(np.float32).max
        largest = max(-X.min(), X.max())
        if largest > limit:
            raise ValueError(
                f"X contains values of magnitude up to {largest:.3g}, beyond the "
                f"float32 range (+-{limit:.3g}): skquant computes in float32. "
                "Rescale X, e.g. with sklearn.preprocessing.StandardScaler."
            )
    return X


class InconsistentVersionWarning(_SklearnVersionWarning):
    """Warning raised when an estimator is unpickled under another skquant version.

    A subclass of scikit-learn's warning of the same name, so filters set for
    scikit-learn's also apply.

    Parameters
    ----------
    estimator_name : str
        Estimator name.
    current_skquant_version : str
        The skquant version that loads the estimator.
    original_skquant_version : str
        The skquant version that pickled it.
    """

    def __init__(self, *, estimator_name, current_skquant_version, original_skquant_version):
        super().__init__(
            estimator_name=estimator_name,
            current_sklearn_version=current_skquant_version,
            original_sklearn_version=original_skquant_version,
        )
        self.current_skquant_version = current_skquant_version
        self.original_skquant_version = original_skquant_version

    def __str__(self):
        return (
            f"Trying to unpickle estimator {self.estimator_name} from skquant "
            f"version {self.original_skquant_version} when using version "
            f"{self.current_skquant_version}. This might lead to breaking code or "
            "invalid results. Use at your own risk; refit the estimator, or load it "
            "with the version that saved it."
        )


def _fitted_data_crc(state):
    """CRC-32 of the numeric data of an estimator's state.

    Covers numpy arrays, scipy sparse arrays, torch tensors and modules
    (their ``state_dict``), inside dicts, lists, tuples and skquant's own
    helper objects (code layouts, inverted lists). Python scalars and strings
    are left out: a flipped byte there breaks the pickle's structure or is
    caught by the unpickler, while one inside array data loads silently.
    """
    crc = 0

    # No deduplication of shared arrays (codes_ and its layout's codes): a
    # pickle keeps them shared, joblib's files store them twice, and the sum
    # must not depend on which wrote it.
    def feed(obj):
        nonlocal crc
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                for item in obj.ravel(order="K"):
                    feed(item)
                return
            if obj.size == 0:
                return
            # C order whatever the memory layout (a loader may change it),
            # a few MiB at a time (codes_ is Fortran-ordered).
            rows = obj.reshape(obj.shape[0], -1) if obj.ndim else obj.reshape(1, 1)
            step = max(1, 2**22 // max(1, rows[:1].nbytes))
            for start in range(0, rows.shape[0], step):
                block = np.ascontiguousarray(rows[start : start + step])
                crc = zlib.crc32(block.view(np.uint8), crc)
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                feed(item)
        elif hasattr(obj, "tocsr") and hasattr(obj, "data"):  # scipy sparse
            for name in ("data", "indices", "indptr", "row", "col", "offsets"):
                feed(getattr(obj, name, None))
        elif type(obj).__module__.startswith("torch"):
            import torch

            if isinstance(obj, torch.nn.Module):
                feed(dict(obj.state_dict()))
            elif isinstance(obj, torch.Tensor):
                feed(obj.detach().cpu().numpy())
        elif type(obj).__module__.startswith("skquant."):
            feed(obj.__getstate__() if hasattr(obj, "__getstate__") else vars(obj))

    feed(state)
    return crc


class _VersionedPickleMixin:
    """Store the skquant version and a checksum of the fitted data in pickles.

    Loading warns under another skquant version, and raises when the
    checksum does not match: a flipped byte inside an array would otherwise
    load silently and change every search result.
    """

    def __getstate__(self):
        from . import __version__

        # A copy: BaseEstimator.__getstate__ may return the instance __dict__ itself.
        state = dict(super().__getstate__(), _skquant_version=__version__)
        state["_skquant_crc32"] = _fitted_data_crc(state)
        return state

    def __setstate__(self, state):
        from . import __version__

        state = dict(state)
        expected = state.pop("_skquant_crc32", None)
        # Pickles written before the checksum existed have none to verify.
        if expected is not None and _fitted_data_crc(state) != expected:
            raise ValueError(
                f"The pickled {type(self).__name__} is corrupt: the checksum of "
                "its fitted arrays (codebooks, codes, network weights) does not "
                "match the one stored when it was saved. Load an intact copy or "
                "refit the estimator."
            )
        pickle_version = state.pop("_skquant_version", "unknown")
        if pickle_version != __version__:
            warnings.warn(
                InconsistentVersionWarning(
                    estimator_name=type(self).__name__,
                    current_skquant_version=__version__,
                    original_skquant_version=pickle_version,
                ),
                stacklevel=2,
            )
        super().__setstate__(state)


class BaseQuantizer(
    _VersionedPickleMixin,
    ClassNamePrefixFeaturesOutMixin,
    KNeighborsMixin,
    TransformerMixin,
    BaseEstimator,
):
    """Base class of skquant's quantizers: learn, index, search.

    Not used directly: :class:`ProductQuantizer`, :class:`DeepQuantizer` and
    :class:`SphericalQuantizer` inherit every public method from it.

    Notes
    -----
    A subclass provides these hooks:

    - ``_codebook_layout`` ("product" or "additive"): block codebooks
      ``(M, K, D / M)`` whose codewords are concatenated, or full-dimensional
      codebooks ``(M, K, D)`` whose codewords are summed.
    - ``_metric`` ("euclidean" or "inner_product"): what the lookup tables
      approximate; ``kneighbors`` reports the Euclidean AQD, or ``1 - <z_q, x̂>``.
    - ``_fit(X, y)``: learn the model from validated ``X`` and labels (``None``,
      1-D, or a 2-D indicator); set ``codebooks_`` and optionally ``rotation_``.
    - ``_embed(X)``: validated ``X`` -> float32 embedding ``(n, D)``.
    - ``_encode_embedding``, ``_decode_codes``, ``_lookup_tables``: have
      defaults for product codebooks; additive quantizers override them.
    """

    _codebook_layout = "product"
    _metric = "euclidean"

    _parameter_constraints = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [Integral, None],
        "n_lists": [Interval(Integral, 1, None, closed="left"), None],
        "n_probe": [Interval(Integral, 1, None, closed="left")],
    }

    # ------------------------------------------------------------------ fit/index
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the quantizer on ``X`` (and ``y``), then index ``X`` for search.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, also the searchable database.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Class labels, or a 0/1 indicator matrix for multi-label data (two
            items are similar when they share a label). Required by the deep
            (supervised) estimators; kept as the database labels for
            :meth:`score`.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        X, y = self._validate_input(X, y, reset=True)
        self._fit(X, y)
        codes = self._encode_rows(X)
        if hasattr(self, "history_"):
            # Networks trained on labels: a run that collapsed without a NaN
            # (CPU-dependent) must not pass silently.
            warn_if_collapsed(self, codes, y)
        self._set_index(codes, y)
        self._fit_coarse_quantizer()
        return self

    def index(self, X, y=None):
        """Replace the searchable database with the codes of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Items to index.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels, used by :meth:`score`.

        Returns
        -------
        self : object
            The estimator, with ``codes_`` and ``n_samples_fit_`` replaced.
        """
        check_is_fitted(self)
        X, y = self._validate_input(X, y, reset=False)
        self._set_index(self._encode_rows(X), y)
        return self

    def add(self, X, y=None):
        """Append the codes of ``X`` to the searchable database.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Items to append; their indices follow the existing ones.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels; required when the index holds labels, and refused
            when it holds none.

        Returns
        -------
        self : object
            The estimator, with the new items indexed.
        """
        check_is_fitted(self)
        X, y = self._validate_input(X, y, reset=False)
        has_labels = self.database_labels_ is not None
        if has_labels != (y is not None):
            raise ValueError(
                "The index holds labels, so add() needs y as well."
                if has_labels
                else "The index was built without labels, so add() cannot take y; "
                "rebuild it with index(X, y)."
            )
        layout = self._search_layout_or_none()
        codes = np.concatenate([self.codes_, self._encode_rows(X)])
        if has_labels:
            if y.ndim != self.database_labels_.ndim or (
                y.ndim == 2 and y.shape[1] != self.database_labels_.shape[1]
            ):
                raise ValueError(
                    f"y of shape {y.shape} does not match the indexed labels of "
                    f"shape {self.database_labels_.shape}."
                )
            y = np.concatenate([self.database_labels_, y])
        self._set_index(codes, y)
        if layout is not None:
            # Keep the inverted-file cells already computed for the old items.
            self._search_layout = layout.extended(self.codes_)
        return self

    def _validate_X(self, X, *, reset=False):
        """The one input check of every public entry: array, features, float range."""
        X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        return _check_float32_range(X)

    def _validate_input(self, X, y, *, reset):
        if y is None and reset and self.__sklearn_tags__().target_tags.required:
            # Supervised estimators: let sklearn raise its standard message
            # ("... requires y to be passed, but the target y is None").
            validate_data(self, X, y=None, reset=reset)
        X = self._validate_X(X, reset=reset)
        return X, (None if y is None else _check_labels(y, X.shape[0]))

    def _set_index(self, codes, y):
        # Fortran order: each sub-space's codes are contiguous, which is the
        # layout the search engine scans (codes_.T is then a free view).
        self.codes_ = np.asfortranarray(codes)
        self.database_labels_ = y
        self.n_samples_fit_ = codes.shape[0]
        # Derived search layouts (pair codes, inverted file) of the old codes.
        self._search_layout = None

    # ------------------------------------------------------------------ IVF
    def _fit_coarse_quantizer(self):
        """Coarse centroids of the inverted file (``n_lists``), on the
        reconstructions of the indexed items; None for exhaustive search."""
        n_lists = getattr(self, "n_lists", None)
        if n_lists is None:
            self.coarse_centroids_ = None
            return
        from ._ivf import _MAX_POINTS_PER_LIST, train_coarse_quantizer

        n_items = self.codes_.shape[0]
        # k-means samples a bounded number of items per cell: decode only those.
        seed = _seed_of(getattr(self, "random_state", None))
        rng = np.random.default_rng(seed)
        sample = np.arange(n_items)
        max_points = _MAX_POINTS_PER_LIST * n_lists
        if n_items > max_points:
            sample = np.sort(rng.choice(n_items, max_points, replace=False))
        self.coarse_centroids_ = train_coarse_quantizer(
            self._decode_codes(self.codes_[sample]), n_lists,
            metric=self._metric, random_state=seed,
        )

    def _search_layout_or_none(self):
        layout = getattr(self, "_search_layout", None)
        if layout is not None and layout.matches(self.codes_):
            return layout
        return None

    def _code_layout(self):
        """Cached scan layouts of ``codes_`` (rebuilt when ``codes_`` changes)."""
        layout = self._search_layout_or_none()
        if layout is None:
            layout = self._search_layout = CodeLayout(self.codes_)
        return layout

    def _assign_cells(self, codes):
        """Cell of each code row: nearest coarse centroid of its reconstruction."""
        from ._ivf import assign_lists

        cells = np.empty(len(codes), dtype=np.int32)
        row_bytes = 4 * (self._n_features_out + self.coarse_centroids_.shape[0])
        for batch in gen_batches(len(codes), _rows_per_chunk(row_bytes)):
            cells[batch] = assign_lists(
                self._decode_codes(codes[batch]), self.coarse_centroids_, self._metric
            )
        return cells

    def _inverted_lists(self):
        """The inverted file of the index, or None for exhaustive search."""
        n_lists = getattr(self, "n_lists", None)
        if n_lists is None:
            return None
        centroids = getattr(self, "coarse_centroids_", None)
        if centroids is None or centroids.shape[0] != n_lists:
            raise ValueError(
                f"n_lists={n_lists} but the coarse quantizer was trained with "
                f"{0 if centroids is None else centroids.shape[0]} cells: call fit "
                f"again after changing n_lists (n_probe can change at any time)."
            )
        return self._code_layout().inverted_lists(centroids, self._assign_cells)

    # ------------------------------------------------------------------ codes
    def transform(self, X):
        """Embed ``X`` in the space where it is quantized.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input data.

        Returns
        -------
        Z : ndarray of shape (n_samples, embedding_dim), float32
            The learned embedding (the input itself for :class:`ProductQuantizer`).
        """
        check_is_fitted(self)
        X = self._validate_X(X)
        return np.asarray(self._embed(X), dtype=np.float32)

    def encode(self, X):
        """Quantize ``X``: one codeword index per codebook.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input data.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_codebooks)
            uint8 when ``n_codewords <= 256``, else uint16.
        """
        check_is_fitted(self)
        X = self._validate_X(X)
        return self._encode_rows(X)

    def decode(self, codes):
        """Reconstruct vectors in embedding space from their codes.

        Parameters
        ----------
        codes : array-like of shape (n_samples, n_codebooks), integer
            Codes, e.g. from :meth:`encode` or ``codes_``.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, embedding_dim), float32
            Reconstructions (rotated back for OPQ).
        """
        check_is_fitted(self)
        codes = np.asarray(codes)
        n_codebooks, n_codewords, _ = self.codebooks_.shape
        if codes.ndim != 2 or codes.shape[1] != n_codebooks:
            raise ValueError(
                f"codes must have shape (n_samples, {n_codebooks}); got {codes.shape}."
            )
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers; got dtype {codes.dtype}.")
        if codes.size and (codes.min() < 0 or codes.max() >= n_codewords):
            raise ValueError(
                f"codes must lie in [0, {n_codewords - 1}] (n_codewords={n_codewords}); "
                f"got values in [{codes.min()}, {codes.max()}]."
            )
        return self._decode_codes(codes)

    def _encode_rows(self, X):
        """Embed and encode ``X`` in row batches, so memory stays bounded."""
        n_codebooks, n_codewords, _ = self.codebooks_.shape
        # Fortran order, as _set_index stores it: no second copy of the codes.
        codes = np.empty(
            (X.shape[0], n_codebooks),
            dtype=np.uint8 if n_codewords <= 256 else np.uint16,
            order="F",
        )
        row_bytes = 8 * (X.shape[1] + self._n_features_out + n_codewords)
        for batch in gen_batches(X.shape[0], _rows_per_chunk(row_bytes)):
            codes[batch] = self._encode_embedding(self._embed(X[batch]))
        return codes

    # Default hooks, for product (block) codebooks.
    def _rotate(self, Z):
        rotation = getattr(self, "rotation_", None)
        # float64: a float32 GEMM rounds a row differently with the batch it
        # shares; every consumer (encoder, tables) works in float64 anyway.
        return Z if rotation is None else np.asarray(Z, np.float64) @ rotation

    def _encode_embedding(self, Z):
        from ._pq import encode_product

        return encode_product(self._rotate(Z), self.codebooks_)

    def _decode_codes(self, codes):
        if self._codebook_layout == "additive":
            decoded = np.zeros((len(codes), self.codebooks_.shape[2]), dtype=np.float32)
            for m in range(self.codebooks_.shape[0]):
                decoded += self.codebooks_[m][codes[:, m]]
            return decoded
        from ._pq import decode_product

        decoded = decode_product(codes, self.codebooks_)
        rotation = getattr(self, "rotation_", None)
        if rotation is None:
            return decoded
        return (decoded.astype(np.float64) @ rotation.T).astype(np.float32)

    def _lookup_tables(self, Z):
        Z = self._rotate(Z)
        if self._metric == "euclidean":
            if self._codebook_layout != "product":
                raise NotImplementedError(
                    "Euclidean tables need per-item norms for additive codebooks."
                )
            return euclidean_tables(Z, self.codebooks_)
        return inner_product_tables(Z, self.codebooks_, layout=self._codebook_layout)

    def _tables_to_distances(self, values):
        values = values.astype(np.float64)
        if self._metric == "euclidean":
            return np.sqrt(np.maximum(values, 0.0))
        # tables hold -<z, c>: 1 + sum = 1 - <z_q, x̂>; clipped at 0 so that graph
        # consumers always see non-negative distances (order is unchanged).
        return np.maximum(1.0 + values, 0.0)

    @property
    def _n_features_out(self):
        n_codebooks, _, dim = self.codebooks_.shape
        return dim * n_codebooks if self._codebook_layout == "product" else dim

    # ------------------------------------------------------------------ search
    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the nearest indexed items of each query by AQD.

        Same contract as :meth:`sklearn.neighbors.NearestNeighbors.kneighbors`:
        rows sorted by increasing distance, equal distances ordered by lower
        index, and ``X=None`` returns each indexed item's neighbors without
        itself. As only codes are stored, ``X=None`` queries with the items'
        reconstructions.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query points; ``None`` queries the indexed items.
        n_neighbors : int, default=None
            Number of neighbors per query; the constructor's value by default.
        return_distance : bool, default=True
            Whether to return the distances.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors)
            Euclidean AQD (square root of the summed squared sub-space
            distances), or ``1 - <z_q, x̂>`` for inner-product quantizers.
            Only present if ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries, n_neighbors)
            Indices of the nearest indexed items.
        """
        check_is_fitted(self)
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        elif n_neighbors <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}")
        elif not isinstance(n_neighbors, numbers.Integral):
            raise TypeError(
                f"n_neighbors does not take {type(n_neighbors)} value, enter "
                "integer value"
            )

        query_is_train = X is None
        if query_is_train:
            n_queries = self.n_samples_fit_
            # Include an extra neighbor to account for the sample itself being
            # returned, which is removed later.
            n_neighbors += 1
        else:
            X = self._validate_X(X)
            n_queries = X.shape[0]

        n_samples_fit = self.n_samples_fit_
        if n_neighbors > n_samples_fit:
            if query_is_train:
                n_neighbors -= 1
                inequality_str = "n_neighbors < n_samples_fit"
            else:
                inequality_str = "n_neighbors <= n_samples_fit"
            raise ValueError(
                f"Expected {inequality_str}, but "
                f"n_neighbors = {n_neighbors}, n_samples_fit = {n_samples_fit}, "
                f"n_samples = {n_queries}"
            )

        n_codebooks, n_codewords, _ = self.codebooks_.shape
        ivf = self._inverted_lists()
        # A chunk of queries holds its lookup tables three times over (the
        # float64 intermediates of the table build, the float32 tables, the
        # engine's transposed copy: 24 bytes per entry), embeddings, coarse
        # scores and results.
        row_bytes = 24 * n_codebooks * n_codewords + 8 * self._n_features_out
        row_bytes += 16 * n_neighbors + (0 if ivf is None else 4 * ivf.n_lists)
        neigh_dist = np.empty((n_queries, n_neighbors), dtype=np.float64)
        neigh_ind = np.empty((n_queries, n_neighbors), dtype=np.intp)
        # Even chunks: a remainder of a few queries would take the single-query
        # kernel, whose pair-code cache is extra memory the batch kernel avoids.
        n_chunks = -(-n_queries // _rows_per_chunk(row_bytes))
        for batch in gen_even_slices(n_queries, n_chunks):
            if query_is_train:
                Z = self._decode_codes(self.codes_[batch])
            else:
                Z = self._embed(X[batch])
            if ivf is None:
                values, indices = aqd_search(
                    self._lookup_tables(Z), self.codes_, n_neighbors,
                    n_jobs=self.n_jobs, layout=self._code_layout(),
                )
            else:
                from ._ivf import coarse_scores, ivf_search

                values, indices = ivf_search(
                    self._lookup_tables(Z),
                    coarse_scores(Z, self.coarse_centroids_, self._metric),
                    ivf, n_neighbors, n_probe=self.n_probe, n_jobs=self.n_jobs,
                )
            neigh_dist[batch] = self._tables_to_distances(values)
            neigh_ind[batch] = indices

        if query_is_train:
            # Remove each item from its own list by index (not by distance: the
            # AQD of an item to itself is its quantization error). Corner case:
            # when ties with lower indices push the item out of its k+1 list, the
            # first k entries are already its k nearest others, so drop the
            # *last* column. (scikit-learn drops the first, assuming self sits
            # at distance 0 in front; with stable ties that would skip a true
            # neighbor.)
            sample_mask = neigh_ind != np.arange(n_queries)[:, None]
            sample_mask[:, -1][np.all(sample_mask, axis=1)] = False
            neigh_ind = neigh_ind[sample_mask].reshape(n_queries, n_neighbors - 1)
            neigh_dist = neigh_dist[sample_mask].reshape(n_queries, n_neighbors - 1)

        if return_distance:
            return neigh_dist, neigh_ind
        return neigh_ind

    def score(self, X, y):
        """Mean average precision of ``X`` as queries against the indexed database.

        Relevance: a database item is relevant to a query when they share a label
        (``database_labels_``). The whole database is ranked (mAP@all); queries
        with no relevant item count as 0. Greater is better, so
        :class:`~sklearn.model_selection.GridSearchCV` tunes with it directly.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Queries.
        y : array-like of shape (n_queries,) or (n_queries, n_labels)
            Their labels.

        Returns
        -------
        score : float
            mAP over the queries.
        """
        from .metrics._scorer import _score_estimator

        check_is_fitted(self)
        return _score_estimator(self, X, y, metric="map")

    # ------------------------------------------------------------------ interop
    def to_faiss(self):
        """Export the codebooks and the indexed codes as a faiss index.

        Requires the optional dependency ``faiss`` (``pip install faiss-cpu``).
        The index searches the same space as :meth:`kneighbors`: queries must
        be embedded first (``index.search(est.transform(X), k)``; for
        :class:`ProductQuantizer` the embedding is ``X`` itself).

        Returns
        -------
        index : faiss.Index
            ``IndexPQ`` (squared L2 distances), ``IndexIVFPQ`` on direct
            codes when the quantizer has an inverted file (``n_lists``),
            either wrapped in an ``IndexPreTransform`` when the quantizer has
            a rotation; or an additive-quantizer index with inner-product
            scores for :class:`SphericalQuantizer`.
        """
        from ._faiss import to_faiss

        check_is_fitted(self)
        return to_faiss(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # transform returns float32 embeddings, whatever the input dtype.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _seed_of(random_state):
    """An int seed (or None) from an int / RandomState / None, without
    advancing a shared RandomState more than once."""
    if random_state is None or isinstance(random_state, numbers.Integral):
        return random_state
    return int(random_state.randint(np.iinfo(np.int32).max))


def _rows_per_chunk(row_bytes):
    """Rows that fit in ``working_memory`` (at least 1)."""
    working_memory = get_config()["working_memory"]
    return max(1, int(working_memory * 2**20) // max(1, int(row_bytes)))
