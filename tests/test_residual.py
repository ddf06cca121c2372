"""Residual codes of ProductQuantizer with an inverted file (by_residual=True):
the kernel's decomposition and the estimator against a brute force over the
reconstructions ``centroid + decoded residual``."""

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import config_context
from sklearn.datasets import make_blobs
from test_ivf import _restricted_reference

from skquant import ProductQuantizer, _search
from skquant._ivf import InvertedLists, coarse_scores, ivf_search


@pytest.fixture(autouse=True)
def _shard_small_problems(monkeypatch):
    monkeypatch.setattr(_search, "_MIN_SHARD_WORK", 1)


@pytest.fixture(scope="module")
def blobs():
    X, _ = make_blobs(n_samples=4000, centers=60, n_features=16, cluster_std=2.0,
                      random_state=0)
    rng = np.random.default_rng(1)
    return X.astype(np.float32), (X[:120] + rng.normal(size=(120, 16))).astype(np.float32)


def test_kernel_add_scores_needs_item_terms():
    ivf = InvertedLists(np.zeros((4, 1), np.uint8), [0, 0, 1, 1], 2)
    with pytest.raises(ValueError, match="item_bias"):
        ivf_search(np.zeros((1, 1, 2), np.float32), np.zeros((1, 2)), ivf, 2,
                   add_scores=True)


def _reconstructions(est):
    return est.decode(est.codes_, cells=est.cells_).astype(np.float64)


@pytest.mark.parametrize("rotation", [False, True])
@pytest.mark.parametrize("n_jobs", [None, 2])
def test_estimator_equals_brute_force_over_probed_cells(blobs, rotation, n_jobs):
    X, Q = blobs
    est = ProductQuantizer(n_codebooks=4, n_codewords=32, rotation=rotation,
                           n_rotation_iter=2, n_lists=12, random_state=0,
                           n_jobs=n_jobs).fit(X)
    assert est.index_.by_residual
    recon = _reconstructions(est)
    # The reconstruction is the cell's centroid plus the decoded residual.
    residual = est.quantizer_.decode(est.codes_).astype(np.float64)
    np.testing.assert_allclose(recon, est.coarse_centroids_[est.cells_] + residual,
                               rtol=1e-6, atol=1e-5)
    exact = np.sqrt(((Q[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1))
    scores = coarse_scores(Q, est.coarse_centroids_)
    for n_probe in (1, 3, 12, 50):
        est.set_params(n_probe=n_probe)
        for queries in (slice(0, 1), slice(0, 3), slice(0, 120)):
            dist, ind = est.kneighbors(Q[queries], n_neighbors=10)
            expected = _restricted_reference(exact[queries], est.cells_, scores[queries],
                                         n_probe, 10)
            # Up to float rounding of near-equal distances: the same distances,
            # and each reported distance is the item's own (decode rounds to float32).
            np.testing.assert_allclose(
                dist, np.take_along_axis(exact[queries], expected, 1), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(
                dist, np.take_along_axis(exact[queries], ind, 1), rtol=1e-6, atol=1e-6
            )
            assert np.mean(ind == expected) > 0.99


def test_residual_codes_reconstruct_and_search_better_than_direct(blobs):
    X, Q = blobs
    kwargs = dict(n_codebooks=4, n_codewords=32, n_lists=30, n_probe=30, random_state=0)
    residual = ProductQuantizer(**kwargs).fit(X)
    direct = ProductQuantizer(by_residual=False, **kwargs).fit(X)
    err_res = np.mean(np.sum((_reconstructions(residual) - X) ** 2, axis=1))
    err_dir = np.mean(np.sum((direct.decode(direct.codes_) - X) ** 2, axis=1))
    assert err_res < 0.8 * err_dir
    exact = np.argsort(((Q[:, None, :] - X[None]) ** 2).sum(-1), axis=1)[:, :10]

    def recall(est):
        ind = est.kneighbors(Q, n_neighbors=10, return_distance=False)
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, exact, strict=True)])

    assert recall(residual) > recall(direct) + 0.05


def test_encode_decode_index_add_semantics(blobs):
    X, Q = blobs
    est = ProductQuantizer(n_codebooks=4, n_codewords=32, n_lists=10, n_probe=4,
                           random_state=0).fit(X[:3000])
    codes, cells = est.encode(X[:3000], return_cells=True)
    np.testing.assert_array_equal(codes, est.codes_)
    np.testing.assert_array_equal(cells, est.cells_)
    np.testing.assert_array_equal(est.encode(X[:5]), codes[:5])
    # Cells are each row's nearest centroid; codes encode the residual.
    np.testing.assert_array_equal(
        cells, np.argmin(coarse_scores(X[:3000], est.coarse_centroids_), axis=1)
    )
    np.testing.assert_array_equal(
        codes, est.quantizer_.encode(X[:3000].astype(np.float64)
                                     - est.coarse_centroids_[cells].astype(np.float64))
    )
    assert est.encode(X[:3], return_cells=True)[1].shape == (3,)
    with pytest.raises(ValueError, match="needs their cells"):
        est.decode(codes)
    with pytest.raises(ValueError, match=r"cells must lie in \[0, 9\]"):
        est.decode(codes[:2], cells=[0, 10])
    with pytest.raises(ValueError, match="cells must be integers of shape"):
        est.decode(codes[:2], cells=[0])
    # add() appends residual codes against the same cells (never retrained).
    centroids = est.coarse_centroids_.copy()
    est.add(X[3000:])
    np.testing.assert_array_equal(est.coarse_centroids_, centroids)
    new_codes, new_cells = est.encode(X[3000:], return_cells=True)
    np.testing.assert_array_equal(est.codes_[3000:], new_codes)
    np.testing.assert_array_equal(est.cells_[3000:], new_cells)
    # index() of a far larger database keeps the cells too.
    big = np.concatenate([X] * 5)
    est.index(big)
    np.testing.assert_array_equal(est.coarse_centroids_, centroids)
    assert est.n_samples_fit_ == len(big)
    # kneighbors() without X queries each item's reconstruction, without itself.
    est.index(X[:500])
    ind = est.kneighbors(n_neighbors=3, return_distance=False)
    assert not np.any(ind == np.arange(500)[:, None])
    recon = _reconstructions(est)
    ref = est.kneighbors(recon[:50], n_neighbors=4, return_distance=False)
    for row in range(50):
        expected = [i for i in ref[row] if i != row][:3]
        np.testing.assert_array_equal(ind[row], expected)


def test_cells_are_part_of_the_model(blobs):
    X, _ = blobs
    est = ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=8, random_state=0).fit(X)
    with pytest.raises(ValueError, match="Refit the model to change the cells"):
        est.train_inverted_file()
    with pytest.raises(ValueError, match="Refit the model to change the cells"):
        est.coarse_centroids_ = est.coarse_centroids_[:4]
    est.set_params(n_lists=16)
    with pytest.raises(ValueError, match="refit to change n_lists"):
        est.kneighbors(X[:2])
    with pytest.raises(ValueError, match="n_lists=40 is larger than the number of training"):
        ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=40).fit(X[:30])
    # Direct codes accept the same (cells wait for a large enough database).
    ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=40, by_residual=False).fit(X[:30])
    # Without n_lists, by_residual changes nothing.
    a = ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0).fit(X)
    b = ProductQuantizer(n_codebooks=4, n_codewords=16, by_residual=False,
                         random_state=0).fit(X)
    np.testing.assert_array_equal(a.codes_, b.codes_)
    assert a.cells_ is None


def test_pickle_sparse_input_and_working_memory(blobs):
    X, Q = blobs
    est = ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=10, n_probe=3,
                           random_state=0).fit(X)
    ref = est.kneighbors(Q, n_neighbors=5)
    clone = pickle.loads(pickle.dumps(est))
    assert clone.index_.by_residual
    for got, expected in zip(clone.kneighbors(Q, n_neighbors=5), ref, strict=True):
        np.testing.assert_array_equal(got, expected)
    with config_context(working_memory=0.01):  # many chunks of queries and items
        for got, expected in zip(est.kneighbors(Q, n_neighbors=5), ref, strict=True):
            np.testing.assert_array_equal(got, expected)
    sparse = ProductQuantizer(n_codebooks=4, n_codewords=16, n_lists=10, n_probe=3,
                              random_state=0).fit(sp.csr_matrix(X))
    np.testing.assert_array_equal(sparse.codes_, est.codes_)
    np.testing.assert_array_equal(sparse.cells_, est.cells_)


def test_cell_terms_sum_in_one_order():
    # T[c, m, k] = ||C_m[k]||^2 + 2 <c_m, C_m[k]>, each sum left to right in
    # float64 (bitwise numpy's elementwise loop): the items' terms, and so
    # the scan's values, do not depend on a BLAS's summation order.
    from skquant._codebooks import ProductCodebooks

    rng = np.random.default_rng(7)
    codebooks = (rng.normal(size=(4, 16, 3)) * 10).astype(np.float32)
    centroids = (rng.normal(size=(9, 12)) * 100).astype(np.float32)
    c = centroids.astype(np.float64).reshape(9, 4, 3)
    cb = codebooks.astype(np.float64)
    dots, norms = 0.0, 0.0
    for d in range(3):
        dots = dots + c[:, :, None, d] * cb[None, :, :, d]
        norms = norms + cb[:, :, d] * cb[:, :, d]
    expected = dots * 2.0 + norms[None]
    np.testing.assert_array_equal(ProductCodebooks(codebooks).residual_terms(centroids),
                                  expected)
