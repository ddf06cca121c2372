"""Sparse k-nearest-neighbors graphs from quantized search, for pipelines.

:class:`QuantizedKNeighborsTransformer` is to skquant's quantizers what
:class:`sklearn.neighbors.KNeighborsTransformer` is to exact search: ``fit``
builds the index (learns and indexes a quantizer), ``transform`` returns the
sparse graph of each query's nearest indexed items. Every scikit-learn
estimator that accepts ``metric="precomputed"`` graphs (``KNeighborsClassifier``,
``KNeighborsRegressor``, ``Isomap``, ``TSNE``, ``DBSCAN``,
``SpectralClustering``, ``LocalOutlierFactor``...) then runs on quantized
search inside a :class:`~sklearn.pipeline.Pipeline`.
"""

# SPDX-License-Identifier: BSD-3-Clause

from numbers import Integral

import numpy as np
import scipy.sparse as sp
from scipy.sparse import csr_matrix
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
    clone,
)
from sklearn.utils import gen_batches
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils._tags import get_tags
from sklearn.utils.validation import check_is_fitted, validate_data

from ._index import rows_per_chunk
from ._persistence import _VersionedPickleMixin
from ._rows import dense_rows

__all__ = ["QuantizedKNeighborsTransformer"]

# splitmix64 finaliser constants (Steele, Lea & Flood 2014): a bijective
# avalanche mix of one 64-bit word.
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FINGERPRINT_BATCH = 4096


def _mix64(z):
    """splitmix64 finaliser of a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def row_fingerprints(X):
    """64-bit fingerprint of each row's values, equal for equal rows.

    Rows are compared as float64 values (``-0.0`` equals ``0.0``), so the same
    data given as float32 at fit time and at transform time match. Two
    different rows share a fingerprint with probability about ``2**-64``.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features), float

    Returns
    -------
    fingerprints : ndarray of shape (n_samples,), uint64
    """
    n_samples, n_features = X.shape
    out = np.empty(n_samples, dtype=np.uint64)
    salts = _mix64(_GOLDEN * np.arange(1, n_features + 1, dtype=np.uint64))
    # Batches of dense float64 rows within working_memory (sparse X is
    # densified one batch at a time); the result does not depend on them.
    batch_rows = min(_FINGERPRINT_BATCH, rows_per_chunk(16 * max(n_features, 1)))
    for batch in gen_batches(n_samples, batch_rows):
        # + 0.0 maps -0.0 to 0.0, so equal values have equal bits.
        words = (dense_rows(X[batch], np.float64) + 0.0).view(np.uint64)
        h = np.full(words.shape[0], _GOLDEN, dtype=np.uint64)
        for j in range(n_features):
            h = _mix64(h ^ _mix64(words[:, j] ^ salts[j]))
        out[batch] = h
    return out


class QuantizedKNeighborsTransformer(
    _VersionedPickleMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator
):
    """Transform X into a sparse graph of k-nearest neighbors by quantized search.

    The quantized counterpart of :class:`sklearn.neighbors.KNeighborsTransformer`:
    ``fit`` fits a clone of ``quantizer`` on ``X`` (and ``y`` for the supervised
    deep quantizers), which indexes ``X``; ``transform`` searches that index by
    asymmetric quantizer distance (AQD) and returns each query's neighbors as a
    CSR matrix whose columns are the indexed training samples. Chain it with
    any estimator that takes ``metric="precomputed"`` neighbors graphs.

    The graph follows scikit-learn's conventions for precomputed graphs:
    ``n_neighbors + 1`` entries per row in ``mode="distance"`` (consumers
    drop what they do not need), rows sorted by increasing distance, and a
    query identical to an indexed item (in particular each training sample,
    in ``fit_transform`` or ``fit(X).transform(X)``) has that item as a
    neighbor at distance exactly 0, as with exact search. (The AQD of an item
    to itself is its quantization error, not 0; identical rows are recognised
    by a 64-bit fingerprint of their values, stored at fit time.) The other
    distances are the quantizer's: Euclidean AQD in the embedding space, or
    ``1 - <z_q, x_hat>`` for :class:`~skquant.SphericalQuantizer`.

    Parameters
    ----------
    quantizer : estimator
        An unfitted skquant quantizer (e.g. :class:`~skquant.ProductQuantizer`,
        :class:`~skquant.DeepQuantizer`); cloned at fit. Its parameters are
        tunable through this transformer as ``quantizer__<name>``.
    n_neighbors : int, default=5
        Number of neighbors of each sample in the transformed graph: the graph
        holds ``n_neighbors + 1`` entries per row in ``mode="distance"`` and
        ``n_neighbors`` in ``mode="connectivity"``, counting the sample itself
        for the training data.
    mode : {"distance", "connectivity"}, default="distance"
        Store the distances, or ones.

    Attributes
    ----------
    quantizer_ : estimator
        The fitted clone of ``quantizer``, holding the index.
    n_samples_fit_ : int
        Number of indexed (training) samples: the number of columns of the graph.
    n_features_in_ : int
        Number of features seen during :meth:`fit`.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during :meth:`fit`, when X has string column names.

    See Also
    --------
    sklearn.neighbors.KNeighborsTransformer : The same graph from exact search.
    skquant.ProductQuantizer.kneighbors_graph : The graph of any fitted quantizer,
        with sklearn's ``kneighbors_graph`` conventions.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.neighbors import KNeighborsClassifier
    >>> from sklearn.pipeline import make_pipeline
    >>> from skquant import ProductQuantizer
    >>> from skquant.neighbors import QuantizedKNeighborsTransformer
    >>> X, y = load_digits(return_X_y=True)
    >>> pq = ProductQuantizer(n_codebooks=8, n_codewords=32, random_state=0)
    >>> graph = QuantizedKNeighborsTransformer(pq, n_neighbors=5).fit_transform(X)
    >>> graph.shape, graph.nnz == 6 * len(X), graph.diagonal().max()
    ((1797, 1797), True, np.float64(0.0))
    >>> model = make_pipeline(
    ...     QuantizedKNeighborsTransformer(pq, n_neighbors=5),
    ...     KNeighborsClassifier(n_neighbors=5, metric="precomputed"),
    ... ).fit(X[:1500], y[:1500])
    >>> float(model.score(X[1500:], y[1500:])) > 0.9
    True
    """

    _parameter_constraints = {
        "quantizer": [HasMethods(["fit", "kneighbors"])],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "mode": [StrOptions({"distance", "connectivity"})],
    }

    def __init__(self, quantizer, n_neighbors=5, mode="distance"):
        self.quantizer = quantizer
        self.n_neighbors = n_neighbors
        self.mode = mode

    # The quantizer validates its own parameters, so nested validation stays on.
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the quantizer on ``X`` (and ``y``) and index ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data: the indexed samples, the columns of the graph.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Labels for supervised quantizers (required by
            :class:`~skquant.DeepQuantizer` and
            :class:`~skquant.SphericalQuantizer`); ignored otherwise.

        Returns
        -------
        self : QuantizedKNeighborsTransformer
            The fitted transformer.
        """
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], accept_sparse=["csr", "csc", "coo"]
        )
        X = X.tocsr() if sp.issparse(X) else X
        quantizer = clone(self.quantizer)
        quantizer.fit(X) if y is None else quantizer.fit(X, y)
        self.quantizer_ = quantizer
        self.n_samples_fit_ = int(quantizer.n_samples_fit_)
        fingerprints = row_fingerprints(X)
        order = np.argsort(fingerprints, kind="stable")
        self._fingerprints = fingerprints[order]
        self._fingerprint_order = order
        self._n_features_out = self.n_samples_fit_
        return self

    def transform(self, X):
        """Compute the graph of each sample's nearest indexed samples.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Query samples.

        Returns
        -------
        Xt : sparse matrix of shape (n_queries, n_samples_fit)
            CSR graph: ``Xt[i, j]`` is the distance from query ``i`` to indexed
            sample ``j`` (or 1 in ``mode="connectivity"``) for the neighbors
            of ``i``, and is not stored otherwise. Each row holds
            ``n_neighbors + 1`` entries in ``mode="distance"`` (``n_neighbors``
            otherwise), sorted by increasing distance; a query equal to an
            indexed sample has it at distance 0.
        """
        check_is_fitted(self)
        X = validate_data(
            self, X, reset=False, dtype=[np.float64, np.float32],
            accept_sparse=["csr", "csc", "coo"],
        )
        X = X.tocsr() if sp.issparse(X) else X
        n_neighbors = self.n_neighbors + (self.mode == "distance")
        if n_neighbors > self.n_samples_fit_:
            raise ValueError(
                f"Expected n_neighbors{' + 1' if self.mode == 'distance' else ''} "
                f"<= n_samples_fit, but n_neighbors = {self.n_neighbors}, "
                f"n_samples_fit = {self.n_samples_fit_}, n_samples = {X.shape[0]}"
            )
        dist, ind = self.quantizer_.kneighbors(X, n_neighbors=n_neighbors)
        dist, ind = self._force_exact_matches(X, dist, ind)

        n_queries = X.shape[0]
        if self.mode == "distance":
            data = np.ascontiguousarray(dist, dtype=np.float64).ravel()
        else:
            data = np.ones(n_queries * n_neighbors, dtype=np.float64)
        indptr = np.arange(0, n_queries * n_neighbors + 1, n_neighbors)
        return csr_matrix(
            (data, ind.ravel(), indptr), shape=(n_queries, self.n_samples_fit_)
        )

    def fit_transform(self, X, y=None):
        """Fit to ``X``, then return the training graph.

        Equal to ``fit(X, y).transform(X)``: each sample is its own first
        neighbor, at distance 0.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Labels for supervised quantizers; ignored otherwise.

        Returns
        -------
        Xt : sparse matrix of shape (n_samples, n_samples)
            CSR graph, as returned by :meth:`transform`.
        """
        return self.fit(X, y).transform(X)

    def _force_exact_matches(self, X, dist, ind):
        """Put the indexed items identical to a query at distance 0 in its row.

        Rows stay sorted by (distance, index) and keep their length: an exact
        match missing from the AQD top-k replaces the farthest entry.
        """
        fingerprints = row_fingerprints(X)
        left = np.searchsorted(self._fingerprints, fingerprints, side="left")
        right = np.searchsorted(self._fingerprints, fingerprints, side="right")
        n_matches = right - left
        if not n_matches.any():
            return dist, ind
        dist, ind = dist.copy(), ind.copy()
        k = ind.shape[1]

        # Common case: one identical indexed item (the query's own training row).
        rows = np.flatnonzero(n_matches == 1)
        if rows.size:
            own = self._fingerprint_order[left[rows]]
            d, i = dist[rows], ind[rows]
            hit = i == own[:, None]
            d[hit] = 0.0
            missing = ~hit.any(axis=1)
            d[missing, -1] = 0.0
            i[missing, -1] = own[missing]
            order = np.lexsort((i, d), axis=1)
            dist[rows] = np.take_along_axis(d, order, axis=1)
            ind[rows] = np.take_along_axis(i, order, axis=1)

        # Duplicated training rows: every copy is at distance 0.
        for row in np.flatnonzero(n_matches > 1):
            same = np.sort(self._fingerprint_order[left[row] : right[row]])
            others = ~np.isin(ind[row], same)
            cand_i = np.concatenate([same, ind[row][others]])
            cand_d = np.concatenate([np.zeros(len(same)), dist[row][others]])
            order = np.lexsort((cand_i, cand_d))[:k]
            dist[row], ind[row] = cand_d[order], cand_i[order]
        return dist, ind

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        quantizer_tags = get_tags(self.quantizer)
        tags.target_tags.required = quantizer_tags.target_tags.required
        tags.non_deterministic = quantizer_tags.non_deterministic
        tags.input_tags.sparse = quantizer_tags.input_tags.sparse
        return tags
