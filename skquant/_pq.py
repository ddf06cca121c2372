"""ProductQuantizer: product quantization (PQ) and optimized PQ (OPQ) as an estimator.

The numerics (sub-space k-means, encoding, the OPQ alternation, lookup tables)
live in :mod:`skquant._product`; the fitted codebooks are a
:class:`~skquant._codebooks.ProductCodebooks`.
"""

from numbers import Integral

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval

from ._base import BaseQuantizer
from ._codebooks import ProductCodebooks
from ._index import (
    RESIDUAL_POINTS_PER_LIST,
    residuals,
    seed_of,
    train_coarse_quantizer,
)
from ._product import check_codebook_size, fit_opq, fit_subspace_codebooks
from ._rows import dense_rows


class ProductQuantizer(BaseQuantizer):
    """Product quantization (PQ) index, with an optional OPQ rotation.

    Splits each vector into ``n_codebooks`` contiguous blocks and quantizes each
    block with its own k-means codebook of ``n_codewords`` codewords, so a vector
    is stored in ``n_codebooks`` bytes (``n_codebooks * log2(n_codewords)``
    bits). Search ranks the database by the asymmetric quantizer distance (AQD):
    exact query, quantized database. Unsupervised: ``y`` is only stored as the
    database labels used by :meth:`score`.

    Parameters
    ----------
    n_codebooks : int, default=4
        Number of sub-spaces (codebooks) ``M``; must divide ``n_features``.
        With the default 256 codewords, 4 codebooks make 32-bit codes, the
        deep quantizers' default too.
    n_codewords : int, default=256
        Codewords per codebook ``K``; at most the number of training samples.
    rotation : bool, default=False
        Learn an orthogonal rotation jointly with the codebooks (OPQ).
    n_rotation_iter : int, default=10
        OPQ alternations between k-means and the Procrustes rotation.
    max_iter : int, default=100
        Lloyd iterations of each sub-space k-means (the deep quantizers'
        ``max_iter`` counts training epochs, as ``MLPClassifier``'s does).
    n_neighbors : int, default=5
        Default number of neighbors for :meth:`kneighbors`.
    n_jobs : int, default=None
        Parallel jobs for search (database shards). ``None`` means 1 unless in
        a :func:`joblib.parallel_config` context, ``-1`` all processors.
    n_lists : int, default=None
        Non-exhaustive search: number of cells of an inverted file (coarse
        k-means on the reconstructions of the indexed items, trained by
        :meth:`fit`, retrained by :meth:`index` on a database of at least 4
        times as many items and on request by :meth:`train_inverted_file`);
        a query scans only the items of its ``n_probe`` nearest cells.
        ``None`` scans the whole database. At most the number of indexed
        items (not of training items); about ``sqrt(n_samples)`` to
        ``4 * sqrt(n_samples)`` of the database is a good start.
    n_probe : int, default=8
        Cells scanned per query when ``n_lists`` is set (more when they hold
        fewer than ``n_neighbors`` items). Trades speed for recall; can be
        changed after fitting with :meth:`set_params`. ``n_probe >= n_lists``
        scans every cell (with direct codes it runs the exhaustive search,
        bitwise the same result).
    by_residual : bool, default=True
        With ``n_lists``: encode each vector's residual ``x - c`` to the
        centroid ``c`` of its cell, as faiss's ``IndexIVFPQ`` does. The cells
        are learned first (k-means on ``X``), then the codebooks (and the OPQ
        rotation) on the residuals of ``X``. Residuals are smaller than the
        vectors, so the same bytes reconstruct them far better (recall
        against exact search rises accordingly, see the user guide). The
        cells are then part of the model: ``n_lists`` is at most the number
        of training samples, and changing it needs a refit (no
        :meth:`train_inverted_file`). ``codes_`` hold the residual codes and
        ``cells_`` their cells; ``decode(codes, cells)`` gives
        ``c + decoded residual``. ``False``: direct codes (each vector's own
        code; the cells only select what a query scans and can be retrained
        on the database without refitting). Ignored without ``n_lists``.
    random_state : int, RandomState instance or None, default=None
        Seeds k-means; pass an int for reproducible codebooks.
    verbose : int, default=0
        1 prints the progress of long encodes (``fit``, ``index``, ``add``,
        ``encode``) and rankings (``score``) every few seconds; 2 after every
        chunk.

    Attributes
    ----------
    codebooks_ : ndarray of shape (n_codebooks, n_codewords, n_features // n_codebooks)
        The sub-space codebooks (float32), in faiss/nanopq layout.
    rotation_ : ndarray of shape (n_features, n_features) or None
        OPQ rotation; vectors are quantized as ``X @ rotation_``.
    quantizer_ : ProductCodebooks
        The fitted codebooks (and rotation) as one object: encode, decode,
        lookup tables. ``codebooks_`` and ``rotation_`` read through to it.
    index_ : QuantizedIndex
        The searchable database: codes, labels, scan layouts, inverted file.
        ``codes_``, ``database_labels_``, ``n_samples_fit_`` and
        ``coarse_centroids_`` read through to it.
    codes_ : ndarray of shape (n_samples_fit, n_codebooks)
        Codes of the indexed database (uint8 when ``n_codewords <= 256``); a
        persisted dask array, chunks on the workers, after indexing a dask
        array.
    database_labels_ : ndarray or None
        Labels of the indexed items (for :meth:`score`); a persisted dask
        array after indexing a dask array.
    n_samples_fit_ : int
        Number of indexed items.
    n_iter_ : int
        Largest number of k-means iterations over the sub-spaces, or the number
        of OPQ alternations when ``rotation=True``.
    coarse_centroids_ : ndarray of shape (n_lists, n_features) or None
        Cell centroids of the inverted file (``None`` when ``n_lists=None``).
    cells_ : ndarray of shape (n_samples_fit,) or None
        Cell of each indexed item (``None`` when ``n_lists=None``).
    n_features_in_ : int
        Number of features seen during :meth:`fit`.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during :meth:`fit`, when X has string column names.

    See Also
    --------
    DeepQuantizer : Supervised deep quantization network (DQN).
    sklearn.neighbors.NearestNeighbors : Exact search on the float vectors.

    References
    ----------
    .. [1] H. Jégou, M. Douze, C. Schmid, "Product quantization for nearest
       neighbor search", IEEE TPAMI 33(1), 2011.
    .. [2] T. Ge, K. He, Q. Ke, J. Sun, "Optimized product quantization for
       approximate nearest neighbor search", CVPR 2013.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skquant import ProductQuantizer
    >>> X, y = load_digits(return_X_y=True)
    >>> pq = ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0).fit(X, y)
    >>> pq.encode(X[:2]).shape
    (2, 4)
    >>> dist, ind = pq.kneighbors(X[:1], n_neighbors=3)
    >>> ind.shape
    (1, 3)

    With an inverted file the codes encode residuals to the cells:

    >>> ivf = ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=8, n_probe=2,
    ...                        random_state=0).fit(X)
    >>> codes, cells = ivf.encode(X[:2], return_cells=True)
    >>> ivf.decode(codes, cells=cells).shape
    (2, 64)
    >>> bool((ivf.encode(X[:2]) == ivf.codes_[:2]).all())
    True
    """

    _parameter_constraints = {
        **BaseQuantizer._parameter_constraints,
        "n_codebooks": [Interval(Integral, 1, None, closed="left")],
        "n_codewords": [Interval(Integral, 1, 2**16, closed="both")],
        "rotation": ["boolean"],
        "by_residual": ["boolean"],
        "n_rotation_iter": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_codebooks=4,
        n_codewords=256,
        *,
        rotation=False,
        n_rotation_iter=10,
        max_iter=100,
        n_neighbors=5,
        n_jobs=None,
        n_lists=None,
        n_probe=8,
        by_residual=True,
        random_state=None,
        verbose=0,
    ):
        self.n_codebooks = n_codebooks
        self.n_codewords = n_codewords
        self.rotation = rotation
        self.n_rotation_iter = n_rotation_iter
        self.max_iter = max_iter
        self.n_neighbors = n_neighbors
        self.n_jobs = n_jobs
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.by_residual = by_residual
        self.random_state = random_state
        self.verbose = verbose

    # Pickles written before residual codes existed hold direct codes.
    _legacy_parameter_values = {"by_residual": False}

    def _fit(self, X, y):
        n_samples, n_features = X.shape
        check_codebook_size(n_samples, n_features, self.n_codebooks, self.n_codewords)
        centroids = None
        if self.n_lists is not None and self.by_residual:
            if self.n_lists > n_samples:
                raise ValueError(
                    f"n_lists={self.n_lists} is larger than the number of training "
                    f"samples n_samples={n_samples}: residual codes learn their cells "
                    f"at fit. Use a smaller n_lists, or by_residual=False (direct "
                    f"codes, whose cells are trained on the indexed database)."
                )
            # Cells first (on X), then the codebooks on the residuals to them.
            X = dense_rows(X, np.float32)
            rng = check_random_state(self.random_state)
            centroids = train_coarse_quantizer(
                X, self.n_lists, random_state=seed_of(rng),
                max_points_per_list=RESIDUAL_POINTS_PER_LIST,
            )
            X = residuals(X, centroids)
            random_state = rng
        else:
            random_state = self.random_state
        if self.rotation:
            rotation, codebooks = fit_opq(
                X, self.n_codebooks, self.n_codewords,
                n_iter=self.n_rotation_iter, max_iter=self.max_iter,
                random_state=random_state,
            )
            self.n_iter_ = self.n_rotation_iter
        else:
            rotation = None
            codebooks, self.n_iter_ = fit_subspace_codebooks(
                X, self.n_codebooks, self.n_codewords,
                max_iter=self.max_iter, random_state=random_state,
                return_n_iter=True,
            )
        self.quantizer_ = ProductCodebooks(codebooks, rotation)
        return centroids

    @classmethod
    def from_faiss(cls, index):
        """Build a fitted quantizer from a faiss product-quantization index.

        The inverse of :meth:`to_faiss`. Requires the optional dependency
        ``faiss`` (``pip install faiss-cpu``).

        Parameters
        ----------
        index : faiss.IndexPQ or faiss.IndexPreTransform
            A trained ``IndexPQ`` with ``METRIC_L2``, optionally behind one
            orthogonal ``LinearTransform`` (OPQ, e.g. from
            ``faiss.index_factory(d, "OPQ8,PQ8np")``).

        Returns
        -------
        estimator : ProductQuantizer
            Fitted, with the index's codebooks, rotation and codes; the
            database has no labels (call :meth:`index` with ``y`` to
            :meth:`score` it).

        Examples
        --------
        >>> import faiss  # doctest: +SKIP
        >>> import numpy as np
        >>> from skquant import ProductQuantizer
        >>> X = np.random.RandomState(0).rand(1000, 16).astype("float32")
        >>> index = faiss.IndexPQ(16, 4, 8)  # doctest: +SKIP
        >>> index.train(X); index.add(X)  # doctest: +SKIP
        >>> pq = ProductQuantizer.from_faiss(index)  # doctest: +SKIP
        >>> pq.codes_.shape  # doctest: +SKIP
        (1000, 4)
        """
        from ._faiss import from_faiss

        return from_faiss(cls, index)

    def _embed(self, X):
        # PQ quantizes the input space itself (sparse rows densified here,
        # one chunk of the caller's at a time).
        return dense_rows(X, np.float32)
