"""Tests of the additive-quantization kernels (skquant._additive)."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import config_context

from skquant._additive import (
    additive_decode,
    codebook_gram,
    codes_to_onehot,
    encode_beam,
    encode_icm,
    inner_product_tables,
    project_sparse,
    quantization_error,
    reconstruction_sq_norms,
    residual_kmeans,
    sparse_codebooks_csr,
    update_codebooks,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 16))
    C = rng.normal(scale=0.5, size=(4, 32, 16))
    return X, C


def _brute_force(X, C):
    """Exhaustive additive encoding (tiny M, K only)."""
    M, K, _ = C.shape
    allcodes = np.array(list(itertools.product(range(K), repeat=M)))
    recon = additive_decode(allcodes, C)
    d = ((X[:, None, :] - recon[None]) ** 2).sum(-1)
    return allcodes[d.argmin(1)], d.min(1)


def test_decode_and_error_match_definition(data):
    X, C = data
    codes = np.random.default_rng(1).integers(0, 32, size=(50, 4))
    expected = np.array([sum(C[m, c[m]] for m in range(4)) for c in codes])
    np.testing.assert_allclose(additive_decode(codes, C), expected)
    np.testing.assert_allclose(
        quantization_error(X[:50], codes, C), ((X[:50] - expected) ** 2).sum(1)
    )
    np.testing.assert_allclose(
        reconstruction_sq_norms(codes, C), (expected**2).sum(1), rtol=1e-12
    )
    G, sq = codebook_gram(C)
    flat = C.reshape(-1, 16)
    np.testing.assert_allclose(G, flat @ flat.T)
    np.testing.assert_allclose(sq, (flat**2).sum(1))
    B = codes_to_onehot(codes, 32)
    np.testing.assert_allclose(B @ flat, expected)


def test_greedy_is_residual_nearest_codeword(data):
    X, C = data
    codes = encode_beam(X, C, beam_width=1)
    R = X.copy()
    for m in range(4):
        d = ((R[:, None, :] - C[m][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes[:, m], d.argmin(1))
        R -= C[m][codes[:, m]]


@pytest.mark.parametrize("method", ["residual", "gram"])
def test_icm_beats_greedy_and_never_worse_than_init(data, method):
    X, C = data
    greedy = encode_beam(X, C)
    err_greedy = quantization_error(X, greedy, C)
    codes, hist = encode_icm(
        X,
        C,
        n_sweeps=4,
        init_codes=greedy,
        random_state=0,
        return_history=True,
        method=method,
    )
    err_icm = quantization_error(X, codes, C)
    # Per point: never worse than its own initialisation.
    assert np.all(err_icm <= err_greedy + 1e-9)
    # On average clearly better on this hard random instance.
    assert err_icm.mean() < 0.97 * err_greedy.mean()
    # Every sweep is non-increasing and the tracked error is the true error.
    assert np.all(np.diff(hist) <= 1e-9)
    assert hist[0] == pytest.approx(err_greedy.mean())
    assert hist[-1] == pytest.approx(err_icm.mean())


@pytest.mark.parametrize("method", ["residual", "gram"])
def test_each_icm_sweep_never_increases_any_point(data, method):
    X, C = data
    prev = encode_beam(X, C)
    prev_err = quantization_error(X, prev, C)
    for s in range(3):
        codes = encode_icm(
            X, C, n_sweeps=1, init_codes=prev, random_state=s, method=method
        )
        err = quantization_error(X, codes, C)
        assert np.all(err <= prev_err + 1e-9)
        prev, prev_err = codes, err


@pytest.mark.parametrize("method", ["residual", "gram"])
def test_icm_is_a_local_optimum(data, method):
    """After convergence no single-codebook change improves a point."""
    X, C = data
    codes = encode_icm(X[:100], C, n_sweeps=30, random_state=0, method=method)
    err = quantization_error(X[:100], codes, C)
    for m in range(4):
        for k in range(32):
            alt = codes.copy()
            alt[:, m] = k
            assert np.all(quantization_error(X[:100], alt, C) >= err - 1e-9)


def test_beam_search_exhaustive_for_two_codebooks():
    rng = np.random.default_rng(3)
    X, C = rng.normal(size=(200, 6)), rng.normal(size=(2, 8, 6))
    _, best = _brute_force(X, C)
    # A beam as wide as K over two codebooks enumerates all K^2 codes.
    np.testing.assert_allclose(
        quantization_error(X, encode_beam(X, C, beam_width=8), C), best
    )
    # ICM and narrow beams are heuristics: never better than the optimum.
    for codes in (encode_icm(X, C, random_state=0), encode_beam(X, C, beam_width=3)):
        assert np.all(quantization_error(X, codes, C) >= best - 1e-9)


def test_wider_beam_helps_on_average(data):
    X, C = data
    e1 = quantization_error(X, encode_beam(X, C, beam_width=1), C).mean()
    e8 = quantization_error(X, encode_beam(X, C, beam_width=8), C).mean()
    assert e8 < e1


def test_icm_methods_agree(data):
    X, C = data
    a, ha = encode_icm(X, C, random_state=0, return_history=True)
    b, hb = encode_icm(X, C, random_state=0, method="gram", return_history=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ha, hb, rtol=1e-10)
    with pytest.raises(ValueError, match="method"):
        encode_icm(X, C, method="exhaustive")


@pytest.mark.parametrize("method", ["residual", "gram"])
def test_icm_reproducible_and_chunking_invariant(data, method):
    X, C = data
    a = encode_icm(X, C, random_state=0, method=method)
    b = encode_icm(X, C, random_state=0, method=method)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, encode_beam(X, C))  # the sweeps did something
    with config_context(working_memory=0.01):  # forces 64-row chunks
        c = encode_icm(X, C, random_state=0, method=method)
        d = encode_beam(X, C, beam_width=4)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(encode_beam(X, C, beam_width=4), d)


def test_ls_update_is_the_ridge_least_squares_optimum(data):
    X, C = data
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, size=(600, 4))
    ridge = 1e-2
    got = update_codebooks(X, codes, 32, ridge=ridge).reshape(-1, 16)
    # Independent: the augmented system [B; sqrt(eps) I] C = [T; 0].
    B = codes_to_onehot(codes, 32).toarray()
    Baug = np.vstack([B, np.sqrt(ridge) * np.eye(128)])
    Taug = np.vstack([X, np.zeros((128, 16))])
    ref = np.linalg.lstsq(Baug, Taug, rcond=None)[0]
    np.testing.assert_allclose(got, ref, atol=1e-10)


def test_ls_update_matches_unregularised_lstsq(data):
    X, _ = data
    codes = np.random.default_rng(1).integers(0, 32, size=(600, 4))
    B = codes_to_onehot(codes, 32).toarray()
    ref = np.linalg.lstsq(B, X, rcond=None)[0]  # minimum-norm solution
    res_ref = ((X - B @ ref) ** 2).sum()
    for ridge in (0.0, 1e-8):
        C = update_codebooks(X, codes, 32, ridge=ridge).reshape(-1, 16)
        assert ((X - B @ C) ** 2).sum() == pytest.approx(res_ref, rel=1e-9)
        # B^T B is singular (M >= 2): a vanishing ridge picks the min-norm one.
        np.testing.assert_allclose(C, ref, atol=1e-5)


def test_ls_update_keeps_previous_for_unused_codewords(data):
    X, C = data
    codes = np.random.default_rng(2).integers(0, 16, size=(600, 4))  # k >= 16 unused
    new = update_codebooks(X, codes, 32, previous=C)
    np.testing.assert_array_equal(new[:, 16:], C[:, 16:])
    fresh = update_codebooks(X, codes, 32)
    np.testing.assert_array_equal(fresh[:, 16:], 0.0)
    np.testing.assert_allclose(new[:, :16], fresh[:, :16])


def test_alternating_ls_and_icm_decreases_error(data):
    X, _ = data
    C, codes = residual_kmeans(X, 4, 32, random_state=0)
    err = quantization_error(X, codes, C).mean()
    for it in range(3):
        C = update_codebooks(X, codes, 32, previous=C, ridge=1e-6)
        e_ls = quantization_error(X, codes, C).mean()
        codes = encode_icm(X, C, init_codes=codes, random_state=it)
        e_icm = quantization_error(X, codes, C).mean()
        assert e_ls <= err + 1e-9 and e_icm <= e_ls + 1e-9
        err = e_icm


def test_residual_kmeans_tiny_input():
    X = np.random.default_rng(0).normal(size=(5, 3))
    C, codes = residual_kmeans(X, 2, 16, random_state=0)
    assert C.shape == (2, 16, 3) and codes.max() < 5
    # The first codebook holds every point: zero error after one codebook.
    np.testing.assert_allclose(quantization_error(X, codes, C), 0.0, atol=1e-12)


def test_project_sparse_keeps_largest_entries(data):
    _, C = data
    P = project_sparse(C, 3)
    assert np.all((P != 0).sum(-1) <= 3)
    # Kept entries are unchanged and dominate the dropped ones in magnitude.
    kept = P != 0
    np.testing.assert_array_equal(P[kept], C[kept])
    smallest_kept = np.where(kept, np.abs(C), np.inf).min(-1)
    largest_dropped = np.where(kept, -np.inf, np.abs(C)).max(-1)
    assert np.all(smallest_kept >= largest_dropped)
    np.testing.assert_array_equal(project_sparse(C, 16), C)
    np.testing.assert_array_equal(project_sparse(C, None), C)


@pytest.mark.parametrize("s", [1, 3, 8])
def test_sparse_update(data, s):
    X, C = data
    codes = encode_icm(X, C, random_state=0)
    ridge = 1e-3
    new, obj = update_codebooks(
        X, codes, 32, sparsity=s, previous=C, ridge=ridge, return_objective=True
    )
    flat = new.reshape(-1, 16)
    # Every codeword has at most s non-zeros.
    assert np.all((flat != 0).sum(1) <= s)
    B = codes_to_onehot(codes, 32).toarray()

    def f(Cf):
        return ((X - B @ Cf) ** 2).sum() + ridge * (Cf**2).sum()

    assert obj == pytest.approx(f(flat))
    # Never worse than thresholding the dense optimum or the previous codebooks.
    dense = update_codebooks(X, codes, 32, ridge=ridge)
    assert f(flat) <= f(project_sparse(dense, s).reshape(-1, 16)) + 1e-9
    assert f(flat) <= f(project_sparse(C, s).reshape(-1, 16)) + 1e-9
    # ...and no better than the unconstrained optimum.
    assert f(flat) >= f(dense.reshape(-1, 16)) - 1e-9
    # On its support it is the exact least-squares solution (column by column).
    supp = flat != 0
    for d in range(16):
        rows = np.flatnonzero(supp[:, d])
        A = np.vstack([B[:, rows], np.sqrt(ridge) * np.eye(rows.size)])
        rhs = np.concatenate([X[:, d], np.zeros(rows.size)])
        ref = np.linalg.lstsq(A, rhs, rcond=None)[0]
        np.testing.assert_allclose(flat[rows, d], ref, atol=1e-8)


@pytest.mark.parametrize("s", [None, 2, 5])
def test_sparse_tables_equal_dense_tables(data, s):
    X, C = data
    P = project_sparse(C, s).astype(np.float32)
    Z = X[:37].astype(np.float32)
    dense = inner_product_tables(Z, P)
    assert dense.shape == (37, 4, 32) and dense.dtype == np.float32
    ref = np.einsum("nd,mkd->nmk", X[:37], project_sparse(C, s))
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-5)
    csr = sparse_codebooks_csr(P)
    assert sp.issparse(csr) and csr.shape == (128, 16)
    if s is not None:
        assert csr.nnz <= 128 * s
    sparse = inner_product_tables(Z, P, csr=csr)
    assert sparse.dtype == np.float32 and sparse.shape == (37, 4, 32)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        inner_product_tables(Z, P, csr=csr, negate=True), -sparse, rtol=1e-6
    )
    # Summing a table over the codes gives <z, x_hat>.
    codes = encode_icm(X, C, random_state=0)[:5]
    scores = dense[:, np.arange(4), codes].sum(-1)  # (37 queries, 5 items)
    np.testing.assert_allclose(
        scores, Z @ additive_decode(codes, P).T, rtol=1e-4, atol=1e-4
    )
