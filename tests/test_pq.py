"""ProductQuantizer / OPQ: codebooks, codes, exactness limits."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestNeighbors

from skquant import ProductQuantizer
from skquant._product import decode_product, encode_product, fit_subspace_codebooks


def _correlated_data(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    mixing = rng.normal(size=(4, d))
    return latent @ mixing + 0.1 * rng.normal(size=(n, d))


def test_one_codeword_per_point_reproduces_exact_search():
    # With as many codewords as samples in every cell, k-means puts a codeword
    # on each point: the codes are lossless and AQD equals exact distances.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6))
    queries = rng.normal(size=(15, 6))
    pq = ProductQuantizer(n_codebooks=3, n_codewords=40, random_state=0).fit(X)
    np.testing.assert_allclose(pq.decode(pq.codes_), X, atol=1e-5)
    dist, ind = pq.kneighbors(queries, n_neighbors=7)
    ref_dist, ref_ind = NearestNeighbors(n_neighbors=7).fit(X).kneighbors(queries)
    np.testing.assert_array_equal(ind, ref_ind)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
    # X=None: neighbors of the indexed points without themselves.
    ind_train = pq.kneighbors(n_neighbors=4, return_distance=False)
    ref_train = NearestNeighbors(n_neighbors=4).fit(X).kneighbors(return_distance=False)
    np.testing.assert_array_equal(ind_train, ref_train)


def test_opq_reconstruction_error_not_worse_than_pq():
    X = _correlated_data()
    errors = {}
    for rotation in (False, True):
        pq = ProductQuantizer(
            n_codebooks=4, n_codewords=16, rotation=rotation, random_state=0
        ).fit(X)
        errors[rotation] = np.mean(np.sum((pq.decode(pq.codes_) - X) ** 2, axis=1))
        if rotation:
            R = pq.rotation_
            np.testing.assert_allclose(R @ R.T, np.eye(X.shape[1]), atol=1e-5)
    assert errors[True] <= errors[False]


def test_encoding_is_nearest_codeword_per_subspace():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(200, 8)).astype(np.float32)
    codebooks = fit_subspace_codebooks(Z, 2, 8, random_state=0)
    codes = encode_product(Z, codebooks)
    for m in range(2):
        block = Z[:, 4 * m : 4 * m + 4]
        brute = ((block[:, None, :] - codebooks[m][None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(codes[:, m], brute)
    np.testing.assert_array_equal(
        decode_product(codes, codebooks)[:, 4:], codebooks[1][codes[:, 1]]
    )


def test_code_dtype_follows_codebook_size():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 2))
    assert ProductQuantizer(1, 256, random_state=0).fit(X).codes_.dtype == np.uint8
    codes = ProductQuantizer(1, 257, max_iter=5, random_state=0).fit(X).encode(X)
    assert codes.dtype == np.uint16


def test_reproducible_and_input_untouched():
    X, y = load_digits(return_X_y=True)
    X_copy, y_copy = X.copy(), y.copy()
    a = ProductQuantizer(4, 16, rotation=True, n_rotation_iter=3, random_state=0).fit(X, y)
    b = ProductQuantizer(4, 16, rotation=True, n_rotation_iter=3, random_state=0).fit(X, y)
    np.testing.assert_array_equal(a.codes_, b.codes_)
    np.testing.assert_array_equal(a.codebooks_, b.codebooks_)
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(y, y_copy)


def test_supervision_is_ignored():
    X, y = load_digits(return_X_y=True)
    a = ProductQuantizer(4, 16, random_state=0).fit(X)
    b = ProductQuantizer(4, 16, random_state=0).fit(X, y)
    np.testing.assert_array_equal(a.codes_, b.codes_)


@pytest.mark.parametrize(
    "params, n_samples, n_features, match",
    [
        ({"n_codebooks": 3}, 50, 8, "n_codebooks=3 must divide"),
        ({"n_codebooks": 2, "n_codewords": 64}, 50, 8, "n_codewords=64 is larger"),
        ({"n_codebooks": 1, "n_codewords": 2}, 1, 3, "n_samples=1"),
    ],
)
def test_codebook_sizes_that_do_not_fit_raise(params, n_samples, n_features, match):
    X = np.random.default_rng(0).normal(size=(n_samples, n_features))
    with pytest.raises(ValueError, match=match):
        ProductQuantizer(**params).fit(X)
