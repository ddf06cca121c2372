"""Codebook families: what a code means, as one object per family.

A codebook object turns embeddings into codes and back, and builds the lookup
tables with which a query is scored against codes under its metric. Each
estimator holds one as ``quantizer_`` (and hands the same object to its
:class:`~skquant._index.QuantizedIndex`); nothing else needs to know which
family it is.

- :class:`ProductCodebooks`: one codebook per contiguous block, codewords
  concatenated (and rotated back, for OPQ); Euclidean or inner-product tables.
- :class:`AdditiveCodebooks`: full-dimensional codebooks whose codewords are
  summed (optionally sparse); inner-product tables.

The interface every family provides (duck-typed: the index imports no family):

- ``codebooks`` ``(M, K, d)``, ``metric``, ``n_codebooks``, ``n_codewords``,
  ``dim`` (the embedding dimension) and ``code_dtype``;
- ``encode(Z) -> codes`` and ``decode(codes) -> Z_hat``;
- ``lookup_tables(Z) -> (n, M, K)`` float32 tables, lower is better, whose sum
  over a code is the item's score;
- ``distances(sums)``: those sums as the distances ``kneighbors`` reports.

A family whose distances need per-item data (e.g. Euclidean search over
additive codes needs each reconstruction's norm,
:func:`~skquant._additive.reconstruction_sq_norms`) would own that data here.

The numerics live in :mod:`skquant._product` and :mod:`skquant._additive`.
"""

import numpy as np

from ._additive import additive_decode, encode_icm, sparse_codebooks_csr
from ._additive import inner_product_tables as additive_inner_product_tables
from ._product import (
    code_dtype,
    decode_product,
    encode_product,
    euclidean_tables,
    float64_codebooks,
)
from ._product import inner_product_tables as product_inner_product_tables

__all__ = ["AdditiveCodebooks", "ProductCodebooks"]

_METRICS = ("euclidean", "inner_product")

# Fixed seed of the ICM sweep orders when encoding new items: encoding must
# not depend on how many items were encoded before (index/add/kneighbors).
_ENCODE_SEED = 0


def _sums_to_distances(sums, metric):
    """Table sums (lower is better) as the distances ``kneighbors`` reports."""
    sums = sums.astype(np.float64)
    if metric == "euclidean":
        # Sums of squared sub-space distances: report the distance itself.
        return np.sqrt(np.maximum(sums, 0.0))
    # Tables hold -<z, c>: 1 + sum = 1 - <z_q, x̂>; clipped at 0 so that graph
    # consumers always see non-negative distances (order is unchanged).
    return np.maximum(1.0 + sums, 0.0)


class _Codebooks:
    """What the families share: shapes, code dtype, metric and distances."""

    @property
    def n_codebooks(self):
        return self.codebooks.shape[0]

    @property
    def n_codewords(self):
        return self.codebooks.shape[1]

    @property
    def code_dtype(self):
        """uint8 when ``n_codewords <= 256``, else uint16."""
        return np.dtype(code_dtype(self.n_codewords))

    def distances(self, sums):
        """Convert table sums to distances.

        Parameters
        ----------
        sums : ndarray
            Sums of :meth:`lookup_tables` entries over codes.

        Returns
        -------
        distances : ndarray, float64
            Euclidean AQD (square root of the sum) or ``1 - <z_q, x̂>``.
        """
        return _sums_to_distances(sums, self.metric)


class ProductCodebooks(_Codebooks):
    """Product codebooks: one codebook per contiguous block, optional rotation.

    A vector ``z`` is quantized as ``z @ rotation`` cut into ``M`` blocks, each
    replaced by its nearest codeword; the reconstruction concatenates the
    codewords and rotates back.

    Parameters
    ----------
    codebooks : ndarray of shape (n_codebooks, n_codewords, dim // n_codebooks)
        Block codebooks (float32), faiss/nanopq layout.
    rotation : ndarray of shape (dim, dim), default=None
        Orthogonal rotation (OPQ), or None.
    metric : {"euclidean", "inner_product"}, default="euclidean"
        What the lookup tables score.
    """

    def __init__(self, codebooks, rotation=None, *, metric="euclidean"):
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}; got {metric!r}.")
        self.codebooks = codebooks
        self.rotation = rotation
        self.metric = metric

    @property
    def dim(self):
        return self.codebooks.shape[0] * self.codebooks.shape[2]

    def _rotate(self, Z):
        # float64: a float32 GEMM rounds a row differently with the batch it
        # shares (and the CPU); the encoder and the tables work in float64.
        if self.rotation is None:
            return Z
        return np.asarray(Z, np.float64) @ self.rotation.astype(np.float64)

    def encode(self, Z):
        """Nearest codeword per block: codes ``(n, n_codebooks)``."""
        return encode_product(self._rotate(Z), self.codebooks)

    def decode(self, codes):
        """Reconstructions ``(n, dim)`` float32, rotated back."""
        decoded = decode_product(codes, self.codebooks)
        if self.rotation is None:
            return decoded
        rotated = decoded.astype(np.float64) @ self.rotation.T.astype(np.float64)
        return rotated.astype(np.float32)

    def lookup_tables(self, Z, metric=None):
        """Tables ``(n, n_codebooks, n_codewords)`` float32, lower is better:
        squared block distances, or negated block inner products
        (``metric``, default the codebooks' own)."""
        Z = self._rotate(Z)
        if (metric or self.metric) == "euclidean":
            return euclidean_tables(Z, self.codebooks, self._codebooks64())
        return product_inner_product_tables(Z, self.codebooks, self._codebooks64())

    def _codebooks64(self):
        """:func:`~skquant._product.float64_codebooks` of the codebooks,
        cached: converting them costs more than one query's tables (not
        pickled)."""
        cached = self.__dict__.get("_c64")
        if cached is None or cached[0] is not self.codebooks:
            cached = (self.codebooks, float64_codebooks(self.codebooks))
            self._c64 = cached
        return cached[1]

    def __getstate__(self):
        state = dict(vars(self))
        state.pop("_c64", None)  # derived: rebuilt on use
        return state

    def residual_terms(self, centroids):
        """Per-cell terms of residual codes, ``(n_lists, M, K)`` float64.

        For an item of cell ``c`` with residual codes ``b``, its
        reconstruction is ``c + r`` with ``r`` the decoded residual, and
        ``||r||^2 + 2 <c, r> = sum_m T[c, m, b_m]`` with
        ``T[c, m, k] = ||C_m[k]||^2 + 2 <(c R)_m, C_m[k]>`` (``R`` the
        rotation, if any): faiss's "precomputed tables" of ``IndexIVFPQ``.
        """
        from ._product_tables import product_dots  # numba: imported on first use

        c = self._rotate(np.asarray(centroids, dtype=np.float64))
        c_t, norms = self._codebooks64()
        # Summed in one order (not a BLAS's): the items' terms, hence the
        # scan's values, are the same on every CPU.
        terms = product_dots(np.ascontiguousarray(c, dtype=np.float64), c_t)
        terms *= 2.0
        terms += norms[None]
        return terms


class AdditiveCodebooks(_Codebooks):
    """Additive codebooks: full-dimensional codewords, one per codebook, summed.

    Encoding is a search (:func:`~skquant._additive.encode_icm`, with a fixed
    seed so that a vector's code does not depend on what was encoded before).
    With sparse codebooks (at most ``sparsity`` non-zeros per codeword) the
    lookup tables come from a CSR copy when that is faster.

    Parameters
    ----------
    codebooks : ndarray of shape (n_codebooks, n_codewords, dim)
        The codebooks (float32).
    sparsity : int, default=None
        Non-zeros per codeword of sparse codebooks, or None.
    n_icm_sweeps : int, default=3
        ICM sweeps when encoding.
    beam_width : int, default=1
        Beam width of the encoding's initial residual assignment.
    metric : {"inner_product"}, default="inner_product"
        What the lookup tables score.

    Attributes
    ----------
    csr : scipy.sparse.csr_array of shape (n_codebooks * n_codewords, dim) or None
        Sparse copy of the codebooks used for the lookup tables (None: dense
        product). Derived from ``codebooks``; not pickled.
    """

    def __init__(
        self, codebooks, *, sparsity=None, n_icm_sweeps=3, beam_width=1,
        metric="inner_product",
    ):
        if metric != "inner_product":
            raise NotImplementedError(
                "Euclidean tables need per-item norms for additive codebooks."
            )
        self.codebooks = codebooks
        self.sparsity = sparsity
        self.n_icm_sweeps = n_icm_sweeps
        self.beam_width = beam_width
        self.metric = metric
        # scipy's sparse product does a multiply-add several times slower than
        # BLAS, so it only beats the dense product for s <= D / 8 (measured in
        # benchmarks/bench_dsq.py); denser codebooks use the dense path.
        dense = sparsity is None or 8 * sparsity > codebooks.shape[2]
        self.csr = None if dense else sparse_codebooks_csr(codebooks)

    @property
    def dim(self):
        return self.codebooks.shape[2]

    def encode(self, Z):
        """Codes ``(n, n_codebooks)`` by beam start and ICM sweeps."""
        codes = encode_icm(
            Z,
            self.codebooks,
            n_sweeps=self.n_icm_sweeps,
            beam_width=self.beam_width,
            random_state=_ENCODE_SEED,
        )
        return codes.astype(self.code_dtype)

    def decode(self, codes):
        """Reconstructions ``(n, dim)`` float32: sums of the chosen codewords."""
        return additive_decode(codes, self.codebooks).astype(np.float32, copy=False)

    def lookup_tables(self, Z):
        """Tables ``(n, n_codebooks, n_codewords)`` float32: ``-<z, c_mk>``."""
        return additive_inner_product_tables(Z, self.codebooks, csr=self.csr, negate=True)

    def __getstate__(self):
        state = dict(vars(self))
        del state["csr"]  # derived: rebuilt on load
        return state

    def __setstate__(self, state):
        self.__init__(
            state["codebooks"], sparsity=state["sparsity"],
            n_icm_sweeps=state["n_icm_sweeps"], beam_width=state["beam_width"],
            metric=state["metric"],
        )
