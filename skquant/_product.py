"""Product codebooks: the numerics of product quantization (PQ) and OPQ.

A product quantizer cuts a vector into ``M`` contiguous blocks and quantizes
each block with its own codebook of ``K`` codewords; the reconstruction is the
concatenation of the chosen codewords. This module holds the sub-space
k-means, exact encoding, decoding, the OPQ alternation and the lookup tables
of both metrics. :class:`~skquant._codebooks.ProductCodebooks` wraps them for
the estimators; :class:`~skquant.DeepQuantizer` also refits its codebooks
with them during training.

Pure numpy/scipy (sklearn for ``KMeans`` and batching): no estimator glue.
"""

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.linalg import orthogonal_procrustes
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state, gen_batches

from ._ivf import nearest

__all__ = [
    "check_codebook_size",
    "code_dtype",
    "decode_product",
    "encode_product",
    "euclidean_tables",
    "float64_codebooks",
    "fit_opq",
    "fit_subspace_codebooks",
    "inner_product_tables",
]

# Rows of Z encoded at once: bounds the (rows, K) distance block per sub-space.
_ENCODE_BATCH = 8192


def check_codebook_size(n_samples, n_features, n_subspaces, n_codewords):
    """Raise a ValueError naming the problem when the codebooks cannot fit the data."""
    if n_features % n_subspaces != 0:
        raise ValueError(
            f"n_codebooks={n_subspaces} must divide the quantized dimension, but "
            f"n_features={n_features} is not a multiple of it. Choose n_codebooks "
            f"among the divisors of {n_features}."
        )
    check_n_codewords(n_samples, n_codewords)


def check_n_codewords(n_samples, n_codewords):
    """Raise a ValueError when there are fewer training samples than codewords.

    Every codebook family (product and additive) starts from k-means, which
    needs at least as many samples as clusters.
    """
    if n_codewords > n_samples:
        raise ValueError(
            f"n_codewords={n_codewords} is larger than the number of training "
            f"samples n_samples={n_samples}: each codebook needs at least as many "
            f"samples as codewords. Use a smaller n_codewords or more data."
        )


def fit_subspace_codebooks(
    Z, n_subspaces, n_codewords, *, init=None, max_iter=100, random_state=None,
    return_n_iter=False,
):
    """K-means codebooks, one per contiguous sub-space of ``Z``.

    Parameters
    ----------
    Z : ndarray or sparse matrix of shape (n_samples, n_features)
        Vectors to quantize; ``n_features`` divisible by ``n_subspaces``.
        A CSR matrix is clustered as such, one sub-space at a time.
    n_subspaces, n_codewords : int
        Number of sub-spaces ``M`` and codewords per codebook ``K``.
    init : ndarray of shape (n_subspaces, n_codewords, n_features // n_subspaces), default=None
        Warm start (e.g. the previous codebooks); k-means++ when None.
    max_iter : int, default=100
        Lloyd iterations per sub-space.
    random_state : int, RandomState instance or None
        Seeds one k-means per sub-space.
    return_n_iter : bool, default=False
        Also return the largest number of Lloyd iterations run.

    Returns
    -------
    codebooks : ndarray of shape (n_subspaces, n_codewords, n_features // n_subspaces), float32
    n_iter : int
        Only when ``return_n_iter=True``.
    """
    rng = check_random_state(random_state)
    n_samples, n_features = Z.shape
    subspace_dim = n_features // n_subspaces
    codebooks = np.empty((n_subspaces, n_codewords, subspace_dim), dtype=np.float32)
    seeds = rng.randint(np.iinfo(np.int32).max, size=n_subspaces)
    n_iter = 0
    for m in range(n_subspaces):
        columns = slice(m * subspace_dim, (m + 1) * subspace_dim)
        # Sparse Z stays sparse (KMeans takes CSR): never densified whole.
        block = Z[:, columns] if sp.issparse(Z) else np.ascontiguousarray(Z[:, columns])
        kmeans = KMeans(
            n_clusters=n_codewords,
            init="k-means++" if init is None else init[m],
            n_init=1,
            max_iter=max_iter,
            random_state=seeds[m],
        )
        with warnings.catch_warnings():
            # Fewer distinct points than codewords (duplicates, tiny data) is
            # legitimate for a quantizer: surplus codewords just go unused.
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans.fit(block)
        codebooks[m] = kmeans.cluster_centers_
        n_iter = max(n_iter, kmeans.n_iter_)
    return (codebooks, n_iter) if return_n_iter else codebooks


def code_dtype(n_codewords):
    """Smallest unsigned integer dtype that holds codes ``0..n_codewords-1``."""
    return np.uint8 if n_codewords <= 2**8 else np.uint16


def encode_product(Z, codebooks):
    """Nearest codeword per sub-space (exact PQ encoding), in row batches.

    Returns codes of shape (n_samples, n_subspaces), uint8 (uint16 when K > 256).
    """
    n_subspaces, n_codewords, subspace_dim = codebooks.shape
    codes = np.empty((len(Z), n_subspaces), dtype=code_dtype(n_codewords))
    norms = np.einsum("mkd,mkd->mk", codebooks, codebooks, dtype=np.float64)
    for batch in gen_batches(len(Z), _ENCODE_BATCH):
        block = np.asarray(Z[batch], dtype=np.float64)
        for m in range(n_subspaces):
            sub = np.ascontiguousarray(block[:, m * subspace_dim : (m + 1) * subspace_dim])

            def exact(rows, m=m):
                # argmin ||z - c||^2 = argmin ||c||^2 - 2 <z, c>, in float64
                return norms[m] - 2.0 * (rows @ codebooks[m].T.astype(np.float64))

            # The float64 argmin, from a certified float32 GEMM.
            codes[batch, m] = nearest(sub, codebooks[m], exact, norms=norms[m])
    return codes


def decode_product(codes, codebooks):
    """Concatenate the selected codewords: (n_samples, n_subspaces * subspace_dim)."""
    n_subspaces, n_codewords, subspace_dim = codebooks.shape
    # One gather of (item, sub-space) rows from the stacked codebooks.
    flat = codes.astype(np.intp)
    flat += np.arange(n_subspaces) * n_codewords
    decoded = codebooks.reshape(n_subspaces * n_codewords, subspace_dim)[flat]
    return decoded.reshape(len(codes), -1).astype(np.float32, copy=False)


def fit_opq(Z, n_subspaces, n_codewords, *, n_iter=10, max_iter=100, random_state=None):
    """Non-parametric OPQ (Ge et al., 2013): alternate PQ and an orthogonal rotation.

    Minimises ``||Z R - decode(encode(Z R))||^2`` over the rotation ``R`` and the
    codebooks: k-means per sub-space (warm-started after the first round), then
    ``R`` by orthogonal Procrustes between ``Z`` and the current reconstruction.

    Returns
    -------
    rotation : ndarray of shape (n_features, n_features), float32
    codebooks : ndarray of shape (n_subspaces, n_codewords, n_features // n_subspaces), float32
    """
    rng = check_random_state(random_state)
    # A rotation mixes every feature: rotated sparse data is dense, so OPQ
    # densifies the training set (PQ without rotation does not).
    Z = Z.toarray() if sp.issparse(Z) else Z
    Z = np.asarray(Z, dtype=np.float64)
    rotation = np.eye(Z.shape[1])
    codebooks = None
    for _ in range(n_iter):
        rotated = Z @ rotation
        codebooks = fit_subspace_codebooks(
            rotated, n_subspaces, n_codewords, init=codebooks,
            max_iter=max_iter, random_state=rng,
        )
        reconstruction = decode_product(encode_product(rotated, codebooks), codebooks)
        # argmin_R ||Z R - Y||_F over orthogonal R
        rotation, _ = orthogonal_procrustes(Z, reconstruction.astype(np.float64))
    # Codebooks matching the final rotation.
    codebooks = fit_subspace_codebooks(
        Z @ rotation, n_subspaces, n_codewords, init=codebooks,
        max_iter=max_iter, random_state=rng,
    )
    return rotation.astype(np.float32), codebooks


def float64_codebooks(codebooks):
    """``(c_t, norms)``: the codebooks transposed (M, ds, K) as float64,
    C-contiguous, and their squared norms (M, K), summed left to right: the
    operands of the compiled tables (:mod:`skquant._product_tables`)."""
    from ._product_tables import squared_norms  # numba: imported on first use

    c_t = np.ascontiguousarray(np.asarray(codebooks, dtype=np.float64).transpose(0, 2, 1))
    return c_t, squared_norms(c_t)


def _tables(queries, codebooks, codebooks64, euclidean):
    from ._product_tables import product_tables  # numba: imported on first use

    if codebooks64 is None:
        codebooks64 = float64_codebooks(codebooks)
    c_t, norms = codebooks64
    queries = np.asarray(queries)
    if queries.dtype not in (np.float32, np.float64):
        queries = queries.astype(np.float64)
    n_subspaces, n_codewords, _ = codebooks.shape
    tables = np.empty((len(queries), n_subspaces, n_codewords), dtype=np.float32)
    product_tables(queries, c_t, norms, euclidean, tables)
    return tables


def euclidean_tables(queries, codebooks, codebooks64=None):
    """Squared Euclidean lookup tables for product (block) codebooks.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_subspaces * subspace_dim)
        Query vectors in the (possibly rotated) quantization space.
    codebooks : ndarray of shape (n_subspaces, n_codewords, subspace_dim)
        One codebook per contiguous sub-space.
    codebooks64 : tuple of ndarray, default=None
        :func:`float64_codebooks` of ``codebooks``, when already at hand.

    Returns
    -------
    tables : ndarray of shape (n_queries, n_subspaces, n_codewords), float32
        ``tables[q, m, k] = ||queries[q, m-th block] - codebooks[m, k]||^2``,
        computed in float64 as ``||q||^2 - 2 q.c + ||c||^2`` (which cancels
        badly in float32 when q is close to a codeword), each sum in one
        order (:mod:`skquant._product_tables`), then cast down.
    """
    return _tables(queries, codebooks, codebooks64, euclidean=True)


def inner_product_tables(queries, codebooks, codebooks64=None):
    """Negated inner-product lookup tables for product (block) codebooks.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_subspaces * subspace_dim)
        Query vectors in the (possibly rotated) quantization space.
    codebooks : ndarray of shape (n_subspaces, n_codewords, subspace_dim)
        One codebook per contiguous sub-space.
    codebooks64 : tuple of ndarray, default=None
        :func:`float64_codebooks` of ``codebooks``, when already at hand.

    Returns
    -------
    tables : ndarray of shape (n_queries, n_subspaces, n_codewords), float32
        ``-<query's m-th block, codebooks[m, k]>``, so that summing the tables
        gives ``-<query, reconstruction>``: float64 dot products summed in
        one order, whatever the batch and the CPU
        (:mod:`skquant._product_tables`), rounded once at the end.
    """
    return _tables(queries, codebooks, codebooks64, euclidean=False)
