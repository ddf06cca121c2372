"""BaseQuantizer: the scikit-learn glue every skquant estimator shares.

Validation at the public boundary, parameters, and delegation: a fitted
estimator holds its codebooks (``quantizer_``, see :mod:`skquant._codebooks`)
and its searchable database (``index_``, a
:class:`~skquant._index.QuantizedIndex`); ``encode``/``decode`` go to the
first, ``index``/``add``/``kneighbors`` to the second. ``kneighbors`` has
exactly the semantics of :class:`sklearn.neighbors.NearestNeighbors`, and
``score`` is retrieval mAP. Subclasses only learn a model: see the hooks
documented on :class:`BaseQuantizer`.
"""

import inspect
import math
import numbers
from numbers import Integral

import numpy as np
import scipy.sparse as sp
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.neighbors._base import KNeighborsMixin
from sklearn.utils import gen_batches
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ._codebooks import AdditiveCodebooks, ProductCodebooks
from ._convergence import warn_if_collapsed
from ._dask_index import (
    DaskIndex,
    as_dask_rows,
    check_dask_rows,
    is_dask_array,
    map_rows,
)
from ._index import QuantizedIndex, rows_per_chunk
from ._persistence import _VersionedPickleMixin
from ._progress import Progress

# index() retrains the cells of an inverted file when the new database holds
# at least this many times the items the cells were trained on: cells fitted
# on a small (labelled) training sample of a far larger database are uneven.
_RETRAIN_CELLS_GROWTH = 4


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


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


# Work on the chunks of a dask array, run by the workers: the estimator they
# receive (``model``) is a copy without its database (see _worker_model).
def _validate_chunk(X):
    """The input check of ``_validate_X``, on one chunk (features are
    checked once, on the client)."""
    X = check_array(X, dtype=[np.float64, np.float32], accept_sparse=["csr", "csc", "coo"])
    if sp.issparse(X):
        X = X.tocsr()
        _check_float32_range(X.data)
        return X
    return _check_float32_range(X)


def _encode_chunk(X, model):
    return model._encode_rows(_validate_chunk(X))[0]


def _encode_cells_chunk(X, model):
    """Residual codes and their cells side by side: (n, n_codebooks + 1) int32."""
    codes, cells = model._encode_rows(_validate_chunk(X))
    out = np.empty((len(cells), codes.shape[1] + 1), dtype=np.int32)
    out[:, :-1] = codes
    out[:, -1] = cells
    return out


def _transform_chunk(X, model):
    return np.asarray(model._embed(_validate_chunk(X)), dtype=np.float32)


def _labels_chunk(y):
    return _check_labels(y, y.shape[0])


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
    A subclass provides two hooks:

    - ``_fit(X, y)``: learn the model from validated ``X`` and labels (``None``,
      1-D, or a 2-D indicator); set ``quantizer_``, a codebook object of
      :mod:`skquant._codebooks` (product or additive codebooks, which also
      fix the metric that ``kneighbors`` reports). It may return the coarse
      centroids ``(n_lists, dim)`` ndarray when its codebooks encode
      residuals to them (then the index stores residual codes); any other
      return value is ignored.
    - ``_embed(X)``: validated ``X`` -> float32 embedding ``(n, D)``.

    Everything else is delegated: ``fit`` then indexes ``X`` in ``index_``,
    a :class:`~skquant._index.QuantizedIndex` holding ``quantizer_``. The
    documented fitted attributes (``codebooks_``, ``rotation_``, ``codes_``,
    ``database_labels_``, ``n_samples_fit_``, ``coarse_centroids_``) read
    through to these two objects.
    """

    # Values of parameters added after a pickle was written that describe
    # what the pickled model did (see __setstate__); defaults otherwise.
    _legacy_parameter_values = {}

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
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Training data, also the searchable database.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Class labels, or a 0/1 indicator matrix for multi-label data (two
            items are similar when they share a label). An unsupervised
            quantizer (:class:`ProductQuantizer`) learns nothing from ``y``:
            like ``NearestNeighbors.fit`` it accepts any ``y`` (e.g. the
            continuous multi-output target of a pipeline ending in a
            regressor) and keeps it for :meth:`score` only when it is class
            labels or an indicator matrix. Required by the deep
            (supervised) estimators; kept as the database labels for
            :meth:`score`.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        if is_dask_array(X) or is_dask_array(y):
            raise TypeError(
                "fit() learns the model in this process and does not take dask "
                "arrays: fit on an in-memory sample (e.g. X[:n].compute()), then "
                "index(X) the dask array, which encodes it on the workers."
            )
        X, y = self._validate_input(X, y, reset=True)
        fitted = self._fit(X, y)
        # Only an array means residual codes (some _fit return self).
        residual_centroids = fitted if isinstance(fitted, np.ndarray) else None
        quantizer = self.quantizer_
        empty = np.empty((0, quantizer.n_codebooks), dtype=quantizer.code_dtype)
        self.index_ = QuantizedIndex(
            quantizer, empty, coarse_centroids=residual_centroids,
            cells=None if residual_centroids is None else np.empty(0, np.int32),
            by_residual=residual_centroids is not None,
        )
        codes, cells = self._encode_rows(X)
        if hasattr(self, "history_"):
            # Networks trained on labels: a run that collapsed without a NaN
            # (CPU-dependent) must not pass silently.
            warn_if_collapsed(self, codes, y)
        self.index_.replace(codes, y, cells=cells)
        if self.index_.by_residual:
            self.index_.n_items_trained = len(codes)
            return self
        n_lists = getattr(self, "n_lists", None)
        if n_lists is not None and n_lists <= len(codes):
            # More cells than training items: the cells wait for a database
            # large enough (index() trains them, or train_inverted_file()).
            self.train_inverted_file()
        return self

    def index(self, X, y=None):
        """Replace the searchable database with the codes of ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, dask array} of shape (n_samples, n_features)
            Items to index. A dask array (rows in chunks) is encoded on the
            workers, one task per chunk, and its codes stay there:
            ``codes_`` and ``database_labels_`` become persisted dask arrays
            and searches run chunk by chunk (see the user guide, "A database
            on a dask cluster"); an in-memory ``X`` brings the database back.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels, used by :meth:`score` (a dask array, or an array,
            with a dask ``X``).

        Returns
        -------
        self : object
            The estimator, with ``codes_`` and ``n_samples_fit_`` replaced.

        Notes
        -----
        With an inverted file (``n_lists``), the coarse quantizer is retrained
        on the new database (:meth:`train_inverted_file`) when it holds at
        least ``4`` times as many items as the cells were trained on, or
        when no cells of ``n_lists`` exist yet (``n_lists`` larger than the
        training set, or changed since). Otherwise the cells are kept and
        only the items are assigned to them: a database drawn like the
        training set is served well by its cells, while cells fitted on a
        small labelled sample of a far larger database are uneven (a few
        huge cells, slow and imprecise probes). Residual codes
        (``ProductQuantizer(by_residual=True)``) are encoded against the
        cells learned by :meth:`fit`, which are never retrained here.
        """
        check_is_fitted(self)
        if is_dask_array(X) or is_dask_array(y):
            codes, y, cells = self._dask_database(X, y)
            self.index_ = DaskIndex.like(self.index_, codes, y, cells)
        else:
            X, y = self._validate_input(X, y, reset=False)
            codes, cells = self._encode_rows(X)
            if isinstance(self.index_, DaskIndex):
                # Back to memory, with the same coarse quantizer.
                self.index_ = QuantizedIndex.like(self.index_, codes, y, cells)
            else:
                self.index_.replace(codes, y, cells=cells)
        n_lists = getattr(self, "n_lists", None)
        if self.index_.by_residual:
            return self
        if n_lists is not None and n_lists <= self.index_.n_items:
            trained = self.index_.n_items_trained
            if (self.index_.n_lists != n_lists or trained is None
                    or self.index_.n_items >= _RETRAIN_CELLS_GROWTH * trained):
                self.train_inverted_file()
        return self

    def train_inverted_file(self, n_lists=None, random_state=None):
        """(Re)train the coarse quantizer of the inverted file on the database.

        k-means on the reconstructions of (a sample of) the indexed items; the
        codes and the model are kept, so no refit is needed. Use it after
        changing ``n_lists`` with ``set_params``, or to fit the cells to a
        database indexed with :meth:`add`. :meth:`index` calls it by itself
        when the database is far larger than the cells' training set.
        Not available for residual codes (``ProductQuantizer`` with
        ``by_residual=True``), whose cells are part of the model: refit.

        Parameters
        ----------
        n_lists : int, default=None
            Number of cells, at most the number of indexed items. None uses
            the estimator's ``n_lists``; an int also sets ``n_lists`` (as
            ``set_params(n_lists=...)`` would), so that searches probe it.
        random_state : int, RandomState instance or None, default=None
            Seed of the sample and of k-means; None uses the estimator's
            ``random_state`` when it has one.

        Returns
        -------
        self : object
            The estimator, with new ``coarse_centroids_``.
        """
        check_is_fitted(self)
        if n_lists is None:
            n_lists = getattr(self, "n_lists", None)
        if n_lists is None:
            raise ValueError(
                "train_inverted_file() needs n_lists: pass it, or set the "
                "estimator's n_lists."
            )
        if random_state is None:
            random_state = getattr(self, "random_state", None)
        self.index_.train_inverted_file(n_lists, random_state=random_state)
        # Set only once the cells exist: a refused n_lists leaves the
        # estimator as it was.
        self.set_params(n_lists=n_lists)
        return self

    def add(self, X, y=None):
        """Append the codes of ``X`` to the searchable database.

        Parameters
        ----------
        X : {array-like, sparse matrix, dask array} of shape (n_samples, n_features)
            Items to append; their indices follow the existing ones. A dask
            array moves the database to the cluster (the indexed items become
            its first chunks); an in-memory ``X`` added to a dask-backed
            database becomes a new chunk on the cluster.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels; required when the index holds labels, and refused
            when it holds none.

        Returns
        -------
        self : object
            The estimator, with the new items indexed.
        """
        check_is_fitted(self)
        if is_dask_array(X) or is_dask_array(y):
            codes, y, cells = self._dask_database(X, y)
        else:
            X, y = self._validate_input(X, y, reset=False)
            codes = None
        has_labels = self.database_labels_ is not None
        if has_labels != (y is not None):
            raise ValueError(
                "The index holds labels, so add() needs y as well."
                if has_labels
                else "The index was built without labels, so add() cannot take y; "
                "rebuild it with index(X, y)."
            )
        if has_labels and (y.ndim != self.database_labels_.ndim or (
            y.ndim == 2 and y.shape[1] != self.database_labels_.shape[1]
        )):
            raise ValueError(
                f"y of shape {y.shape} does not match the indexed labels of "
                f"shape {self.database_labels_.shape}."
            )
        if codes is None:
            codes, cells = self._encode_rows(X)
        elif not isinstance(self.index_, DaskIndex):
            # The database moves to the cluster: the items already indexed
            # become its first chunks.
            self.index_ = DaskIndex.from_index(self.index_, max(codes.chunks[0]))
        self.index_.add(codes, y, cells=cells)
        return self

    def _validate_X(self, X, *, reset=False):
        """The one input check of every public entry: array, features, float range."""
        if (
            not reset
            and type(X) is np.ndarray
            and X.ndim == 2
            and X.dtype in _FLOAT_DTYPES
            and X.shape[0] >= 1
            and X.shape[1] == self.__dict__.get("n_features_in_")
            and "feature_names_in_" not in self.__dict__
            and math.isfinite(X.sum())
        ):
            # The common query (a plain float array of the fitted width, all
            # finite): what validate_data would accept unchanged, checked in
            # microseconds instead of its ~100 (a one-query search is a few
            # hundred). Anything else takes validate_data, which raises its
            # standard errors. (A sum that overflows is rechecked there.)
            return _check_float32_range(X)
        X = validate_data(
            self, X, reset=reset, dtype=[np.float64, np.float32],
            accept_sparse=["csr", "csc", "coo"],
        )
        if sp.issparse(X):
            # Row slices (encoding chunks, query batches) are cheap in CSR.
            X = X.tocsr()
            _check_float32_range(X.data)
            return X
        return _check_float32_range(X)

    def _validate_input(self, X, y, *, reset):
        if y is None and reset and self.__sklearn_tags__().target_tags.required:
            # Supervised estimators: let sklearn raise its standard message
            # ("... requires y to be passed, but the target y is None").
            validate_data(self, X, y=None, reset=reset)
        X = self._validate_X(X, reset=reset)
        if y is None:
            return X, None
        if reset and not self.__sklearn_tags__().target_tags.required:
            # Unsupervised fit: y is not learned from, so a y that is no
            # retrieval labels is ignored (as NearestNeighbors.fit ignores
            # y), not refused; index()/add() still check what they store.
            try:
                return X, _check_labels(y, X.shape[0])
            except ValueError:
                return X, None
        return X, _check_labels(y, X.shape[0])

    def _worker_model(self):
        """This estimator without its database (and silent): what the tasks on
        dask workers receive, once per graph."""
        model = object.__new__(type(self))
        model.__dict__.update(
            (key, value) for key, value in self.__dict__.items() if key != "index_"
        )
        # An empty in-memory index: what _encode_rows needs of it (the coarse
        # centroids of residual codes).
        index = self.index_
        empty = np.empty((0, self.quantizer_.n_codebooks), dtype=self.quantizer_.code_dtype)
        model.index_ = QuantizedIndex.like(
            index, empty, cells=np.empty(0, np.int32) if index.by_residual else None
        )
        if "verbose" in model.__dict__:
            model.verbose = 0
        return model

    def _dask_codes(self, X):
        """Lazy ``(codes, cells)`` of a checked dask ``X``, encoded on the
        workers (cells None unless the codes are residual). Residual codes and
        their cells come out of one task per chunk, side by side; persisting
        both together (as the index does) computes it once."""
        quantizer = self.quantizer_
        n_codebooks = quantizer.n_codebooks
        if not self.index_.by_residual:
            codes = map_rows(_encode_chunk, X, self._worker_model(),
                             dtype=quantizer.code_dtype, n_columns=n_codebooks)
            return codes, None
        both = map_rows(_encode_cells_chunk, X, self._worker_model(), dtype=np.int32,
                        n_columns=n_codebooks + 1)
        return both[:, :n_codebooks].astype(quantizer.code_dtype), both[:, n_codebooks]

    def _dask_database(self, X, y):
        """Lazy codes, labels and cells (None unless residual codes) of a
        dask ``X`` (and ``y``): the checks that need no data run here, the
        others on the workers, chunk by chunk."""
        if not is_dask_array(X):
            raise TypeError(
                "y is a dask array but X is not: pass X as a dask array too, or "
                "both in memory."
            )
        X = check_dask_rows(X, self.n_features_in_)
        codes, cells = self._dask_codes(X)
        if y is None:
            return codes, None, cells
        if not is_dask_array(y):
            y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim not in (1, 2):
            raise ValueError(f"y must be 1-D labels or a 2-D indicator, got shape {y.shape}.")
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                f"y has {y.shape[0]} samples but X has {X.shape[0]}: they must match."
            )
        y = as_dask_rows(y, X.chunks[0])
        dtype = np.dtype(np.int8) if y.ndim == 2 else y.dtype
        y = y.map_blocks(_labels_chunk, dtype=dtype, meta=np.empty((0,) * y.ndim, dtype=dtype))
        return codes, y, cells

    def _set_index(self, codes, y):
        """A new index of ``codes`` (and labels ``y``) over ``quantizer_``."""
        self.index_ = QuantizedIndex(self.quantizer_, codes, y)

    # ------------------------------------------------------------------ fitted attributes
    # The documented attributes read through to the codebooks and the index,
    # which own them.
    @property
    def codebooks_(self):
        return self.quantizer_.codebooks

    @property
    def rotation_(self):
        return self.quantizer_.rotation

    @property
    def codes_(self):
        return self.index_.codes

    @codes_.setter
    def codes_(self, codes):
        # Replacing the codes keeps the labels and the coarse quantizer; the
        # cells are rebuilt from the new codes.
        if is_dask_array(codes) != isinstance(self.index_, DaskIndex):
            where = "on a dask cluster" if isinstance(self.index_, DaskIndex) else "in memory"
            raise TypeError(
                f"The database is {where}, so codes_ takes "
                f"{'a dask array' if where != 'in memory' else 'an in-memory array'}; "
                f"got {type(codes).__name__}. Use index() or add() to move it."
            )
        self.index_.replace(codes, self.index_.labels)

    @property
    def database_labels_(self):
        return self.index_.labels

    @property
    def n_samples_fit_(self):
        return self.index_.n_items

    @property
    def coarse_centroids_(self):
        return self.index_.coarse_centroids

    @coarse_centroids_.setter
    def coarse_centroids_(self, centroids):
        self.index_.coarse_centroids = centroids

    @property
    def cells_(self):
        """Cell of each indexed item (int32), None without an inverted file.

        With residual codes, ``decode(codes_, cells=cells_)`` reconstructs
        the database.
        """
        return self.index_.cells

    # ------------------------------------------------------------------ codes
    def transform(self, X):
        """Embed ``X`` in the space where it is quantized.

        Parameters
        ----------
        X : {array-like, sparse matrix, dask array} of shape (n_samples, n_features)
            Input data.

        Returns
        -------
        Z : ndarray of shape (n_samples, embedding_dim), float32
            The learned embedding (the input itself for :class:`ProductQuantizer`).
            A dask array when ``X`` is one: computed lazily, chunk by chunk,
            on the workers.
        """
        check_is_fitted(self)
        if is_dask_array(X):
            return map_rows(_transform_chunk, check_dask_rows(X, self.n_features_in_),
                            self._worker_model(), dtype=np.float32,
                            n_columns=self.quantizer_.dim)
        X = self._validate_X(X)
        return np.asarray(self._embed(X), dtype=np.float32)

    def encode(self, X, return_cells=False):
        """Quantize ``X``: one codeword index per codebook.

        These are the codes :meth:`index` and :meth:`add` store for ``X``.
        With residual codes (:class:`ProductQuantizer` with ``n_lists`` and
        ``by_residual=True``) they encode ``x - c``, the difference between
        ``x`` and the centroid ``c`` of its nearest cell, and only mean
        something together with that cell.

        Parameters
        ----------
        X : {array-like, sparse matrix, dask array} of shape (n_samples, n_features)
            Input data.
        return_cells : bool, default=False
            Also return the cell of each row (residual codes; ``None``
            otherwise), as :meth:`decode` needs it.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_codebooks)
            uint8 when ``n_codewords <= 256``, else uint16. A dask array when
            ``X`` is one: computed lazily, chunk by chunk, on the workers.
        cells : ndarray of shape (n_samples,) or None
            Only when ``return_cells=True`` (a dask array, or None, for a
            dask ``X``).
        """
        check_is_fitted(self)
        if is_dask_array(X):
            codes, cells = self._dask_codes(check_dask_rows(X, self.n_features_in_))
        else:
            X = self._validate_X(X)
            codes, cells = self._encode_rows(X)
        return (codes, cells) if return_cells else codes

    def decode(self, codes, cells=None):
        """Reconstruct vectors in embedding space from their codes.

        Parameters
        ----------
        codes : array-like of shape (n_samples, n_codebooks), integer
            Codes, e.g. from :meth:`encode` or ``codes_``.
        cells : array-like of shape (n_samples,), default=None
            The cells of residual codes (``cells_`` for ``codes_``, or from
            ``encode(X, return_cells=True)``): required with residual codes,
            where the reconstruction is the cell's centroid plus the decoded
            residual; ignored otherwise.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, embedding_dim), float32
            Reconstructions (rotated back for OPQ).
        """
        check_is_fitted(self)
        codes = np.asarray(codes)
        n_codebooks, n_codewords = self.quantizer_.n_codebooks, self.quantizer_.n_codewords
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
        return self.index_.decode(codes, cells)

    def _encode_rows(self, X):
        """Embed and encode ``X`` in row batches, so memory stays bounded.
        Returns ``(codes, cells)``, cells None unless the codes are residual."""
        quantizer, index = self.quantizer_, self.index_
        # Fortran order, as the index stores it: no second copy of the codes.
        codes = np.empty(
            (X.shape[0], quantizer.n_codebooks), dtype=quantizer.code_dtype, order="F"
        )
        cells = np.empty(X.shape[0], dtype=np.int32) if index.by_residual else None
        row_bytes = 8 * (X.shape[1] + quantizer.dim + quantizer.n_codewords)
        if index.by_residual:
            row_bytes += 8 * (index.n_lists + quantizer.dim)
        progress = Progress(type(self).__name__, "encoded", X.shape[0],
                            getattr(self, "verbose", 0))
        for batch in gen_batches(X.shape[0], rows_per_chunk(row_bytes)):
            codes[batch], batch_cells = index.encode(self._embed(X[batch]))
            if cells is not None:
                cells[batch] = batch_cells
            progress.update(batch.stop - batch.start)
        return codes, cells

    @property
    def _n_features_out(self):
        return self.quantizer_.dim

    # ------------------------------------------------------------------ search
    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the nearest indexed items of each query by AQD.

        Same contract as :meth:`sklearn.neighbors.NearestNeighbors.kneighbors`:
        rows sorted by increasing distance, equal distances ordered by lower
        index, and ``X=None`` returns each indexed item's neighbors without
        itself. Where it differs: as only codes are stored, ``X=None``
        queries with the items' reconstructions, and an item is removed from
        its own list by index, not by distance. With more items at distance
        0 than ``n_neighbors`` (duplicates), scikit-learn drops the first
        column, which may hold a duplicate rather than the item itself, so
        its list can keep the item and lose a duplicate; here the item itself
        is the one dropped and the duplicates with the lowest indices are
        kept.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features), default=None
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
        if "index_" not in self.__dict__:
            check_is_fitted(self)  # (its attribute scan costs tens of microseconds)
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        elif n_neighbors <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}")
        elif type(n_neighbors) is not int and not isinstance(n_neighbors, numbers.Integral):
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

        n_probe = self._n_probe()
        index, quantizer = self.index_, self.quantizer_
        n_chunks = 1
        if n_queries > 1:  # (one query is one chunk: spare its microseconds)
            # A chunk of queries holds its lookup tables three times over (the
            # float64 intermediates of the table build, the float32 tables, the
            # engine's transposed copy: 24 bytes per entry), embeddings, coarse
            # scores and results.
            row_bytes = 24 * quantizer.n_codebooks * quantizer.n_codewords + 8 * quantizer.dim
            row_bytes += 16 * n_neighbors + (0 if n_probe is None else 4 * index.n_lists)
            if index.by_residual:
                # Coarse scores, and the winners' exact float64 distances.
                row_bytes += 8 * index.n_lists + 16 * n_neighbors * quantizer.dim
            # Even chunks: a remainder of a few queries would take the
            # single-query kernel, whose pair-code cache is extra memory the
            # batch kernel avoids.
            n_chunks = -(-n_queries // rows_per_chunk(row_bytes))
        if n_chunks == 1:
            # (The search's arrays are the results: no copy.)
            Z = index.reconstruct(slice(0, n_queries)) if query_is_train else self._embed(X)
            neigh_dist, neigh_ind = index.search(
                Z, n_neighbors, n_probe=n_probe, n_jobs=self.n_jobs
            )
        else:
            neigh_dist = np.empty((n_queries, n_neighbors), dtype=np.float64)
            neigh_ind = np.empty((n_queries, n_neighbors), dtype=np.intp)
            # (gen_even_slices's parameter validation costs ~50 us a call.)
            bounds = [n_queries * i // n_chunks for i in range(n_chunks + 1)]
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
                batch = slice(start, stop)
                if query_is_train:
                    # (A dask index fetches the batch's codes and cells.)
                    Z = index.reconstruct(batch)
                else:
                    Z = self._embed(X[batch])
                neigh_dist[batch], neigh_ind[batch] = index.search(
                    Z, n_neighbors, n_probe=n_probe, n_jobs=self.n_jobs
                )

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

    def _n_probe(self):
        """Cells to probe (``n_probe``), or None for exhaustive search."""
        n_lists = getattr(self, "n_lists", None)
        if n_lists is None:
            return None
        if self.index_.n_lists != n_lists:
            trained = self.index_.n_lists or 0
            if self.index_.by_residual:
                raise ValueError(
                    f"n_lists={n_lists} but the residual codes were encoded "
                    f"against {trained} cells: refit to change n_lists "
                    f"(residual codes and cells are learned together), or "
                    f"set it back. n_probe can change at any time."
                )
            raise ValueError(
                f"n_lists={n_lists} but the coarse quantizer has {trained} cells "
                f"(n_lists changed since the cells were trained, or exceeds the "
                f"{self.index_.n_items} indexed items): call train_inverted_file() "
                f"(no refit needed; n_lists is at most the number of indexed "
                f"items), or index() a database of at least n_lists items. "
                f"n_probe can change at any time."
            )
        return self.n_probe

    def score(self, X, y):
        """Mean average precision of ``X`` as queries against the indexed database.

        Relevance: a database item is relevant to a query when they share a label
        (``database_labels_``). The whole database is ranked (mAP@all); queries
        with no relevant item count as 0. Greater is better, so
        :class:`~sklearn.model_selection.GridSearchCV` tunes with it directly.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
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
            ``IndexPQ`` (squared L2 distances), ``IndexIVFPQ`` when the
            quantizer has an inverted file (``n_lists``; ``by_residual`` as
            its codes),
            either wrapped in an ``IndexPreTransform`` when the quantizer has
            a rotation; or an additive-quantizer index with inner-product
            scores for :class:`SphericalQuantizer`.
        """
        from ._faiss import to_faiss

        check_is_fitted(self)
        if isinstance(self.index_, DaskIndex):
            # faiss holds its codes in this process: gather them (size-checked).
            estimator = self._worker_model()
            estimator.index_ = self.index_.gather("to_faiss()")
            return to_faiss(estimator)
        return to_faiss(self)

    def __setstate__(self, state):
        super().__setstate__(state)  # checksum and version checks
        # Parameters renamed to one vocabulary across the estimators.
        for old, new in _RENAMED_PARAMETERS.items():
            if old in self.__dict__ and new not in self.__dict__:
                self.__dict__[new] = self.__dict__.pop(old)
        # Parameters added since the pickle was written: the value that
        # describes the pickled model (e.g. the objective it was trained
        # with), else the constructor's default, so get_params/clone work.
        defaults = inspect.signature(type(self).__init__).parameters
        for name in self._get_param_names():
            if name not in self.__dict__:
                self.__dict__[name] = self._legacy_parameter_values.get(
                    name, defaults[name].default
                )
        if "codes_" in self.__dict__:
            _upgrade_legacy_state(self.__dict__)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # transform returns float32 embeddings, whatever the input dtype.
        tags.transformer_tags.preserves_dtype = ["float32"]
        # scipy sparse X is accepted everywhere, densified in bounded chunks.
        tags.input_tags.sparse = True
        return tags


# Old parameter names -> today's, for pickles written before the renaming
# (n_subspaces of ProductQuantizer/DeepQuantizer, max_epochs of the deep
# estimators; ProductQuantizer's k-means max_iter kept its name).
_RENAMED_PARAMETERS = {"n_subspaces": "n_codebooks", "max_epochs": "max_iter"}


def _upgrade_legacy_state(state):
    """Rebuild ``quantizer_`` and ``index_`` from the plain attributes that
    pickles kept before the codebook and index objects (d3b457b and earlier).

    ``state`` is the estimator's ``__dict__``, changed in place; the checksum
    of the old state has already been verified.
    """
    codebooks = state.pop("codebooks_")
    rotation = state.pop("rotation_", None)
    if "_codebooks_csr" in state:
        # Only SphericalQuantizer (additive codebooks) kept a CSR copy.
        del state["_codebooks_csr"]
        quantizer = AdditiveCodebooks(
            codebooks, sparsity=state["sparsity"],
            n_icm_sweeps=state["n_icm_sweeps"], beam_width=state["beam_width"],
        )
    else:
        quantizer = ProductCodebooks(codebooks, rotation)
    codes = state.pop("codes_")
    centroids = state.pop("coarse_centroids_", None)
    # The inverted file's cells were cached on the scan layout, as
    # (centroids, cells); they hold for the codes as long as the centroids match.
    layout = state.pop("_search_layout", None)
    seed = getattr(layout, "_legacy", {}).get("seed")
    cells = None
    if seed is not None and centroids is not None and np.array_equal(seed[0], centroids):
        cells = seed[1]
    state.pop("n_samples_fit_", None)
    state["quantizer_"] = quantizer
    state["index_"] = QuantizedIndex(
        quantizer, codes, state.pop("database_labels_", None),
        coarse_centroids=centroids, cells=cells,
    )
