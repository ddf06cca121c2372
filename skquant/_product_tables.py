"""Lookup tables of product codebooks, compiled with numba.

A query's table entry for sub-space ``m`` and codeword ``k`` is built from
``<q_m, C_m[k]>``, a dot product of ``ds`` (sub-space width) terms. numpy
computed these with a float64 GEMM per sub-space, then cast the tables to
float32. Two reasons for a loop of our own:

* **Results by construction.** A BLAS sums a dot product in an order that
  depends on its kernel: one query (a matrix-vector product) and a batch
  (a matrix product) can round differently, as can two CPUs. Rare as a
  float64 difference that survives the float32 cast is, it could move an
  item across a tie. Here every entry is summed in one order, ``d = 0, 1,
  ...`` left to right, with plain IEEE products and additions (numba emits
  no fused multiply-add without ``fastmath``): the same value for any batch,
  thread count and x86 CPU, and bitwise that of the numpy loop in the tests.
* **Speed.** One query's tables were a dozen numpy calls (~7 us); a batch's
  were three passes over float64 intermediates (M x n x K). Here the loop over
  the codewords vectorizes (the codebooks transposed, ``(M, ds, K)``, so
  that a sub-space dimension's ``K`` coordinates are contiguous) and each
  entry is written once, as float32.
"""

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, inline="always")
def _block_dots(query, codebooks_t, m, dots):
    """``dots[k] = <q_m, C_m[k]>`` in float64 for one query and sub-space
    ``m``: the products summed left to right, the loop over the codewords
    vectorized."""
    _, subspace_dim, n_codewords = codebooks_t.shape
    base = m * subspace_dim
    x = np.float64(query[base])
    for k in range(n_codewords):
        dots[k] = 0.0 + x * codebooks_t[m, 0, k]
    for d in range(1, subspace_dim):
        x = np.float64(query[base + d])
        for k in range(n_codewords):
            dots[k] += x * codebooks_t[m, d, k]


@numba.njit(nogil=True, cache=True)
def product_tables(queries, codebooks_t, code_norms, euclidean, out):
    """Write the queries' lookup tables into ``out`` (n, M, K) float32.

    Parameters
    ----------
    queries : (n, M * ds) float32 or float64
        Queries in the (rotated) quantization space.
    codebooks_t : (M, ds, K) float64, C-contiguous
        The codebooks, transposed.
    code_norms : (M, K) float64
        ``||C_m[k]||^2``, summed left to right (used when ``euclidean``).
    euclidean : bool
        ``||q_m - C_m[k]||^2`` as ``(-2 <q_m, C_m[k]> + ||q_m||^2) +
        ||C_m[k]||^2``, clipped at 0 (the expansion cancels in float32 near
        a codeword, hence float64 before the cast); otherwise
        ``-<q_m, C_m[k]>``.
    out : (n, M, K) float32
    """
    n_subspaces, subspace_dim, n_codewords = codebooks_t.shape
    dots = np.empty(n_codewords)
    for q in range(queries.shape[0]):
        for m in range(n_subspaces):
            _block_dots(queries[q], codebooks_t, m, dots)
            if euclidean:
                query_norm = 0.0
                for d in range(m * subspace_dim, (m + 1) * subspace_dim):
                    x = np.float64(queries[q, d])
                    query_norm += x * x
                for k in range(n_codewords):
                    value = (dots[k] * -2.0 + query_norm) + code_norms[m, k]
                    out[q, m, k] = np.float32(max(value, 0.0))
            else:
                for k in range(n_codewords):
                    out[q, m, k] = np.float32(-dots[k])


@numba.njit(nogil=True, cache=True)
def product_dots(rows, codebooks_t):
    """``<x_m, C_m[k]>`` (n, M, K) float64 of rows ``x`` (float64), summed as
    :func:`product_tables` sums them: the per-cell terms of residual codes
    (:meth:`~skquant._codebooks.ProductCodebooks.residual_terms`) the same
    on every CPU."""
    n_subspaces, _, n_codewords = codebooks_t.shape
    out = np.empty((rows.shape[0], n_subspaces, n_codewords))
    for r in range(rows.shape[0]):
        for m in range(n_subspaces):
            _block_dots(rows[r], codebooks_t, m, out[r, m])
    return out


@numba.njit(nogil=True, cache=True)
def squared_norms(codebooks_t):
    """``||C_m[k]||^2`` (M, K) float64 of transposed codebooks (M, ds, K),
    summed left to right as :func:`product_tables` sums the dot products."""
    n_subspaces, subspace_dim, n_codewords = codebooks_t.shape
    norms = np.zeros((n_subspaces, n_codewords))
    for m in range(n_subspaces):
        for d in range(subspace_dim):
            for k in range(n_codewords):
                c = codebooks_t[m, d, k]
                norms[m, k] += c * c
    return norms
