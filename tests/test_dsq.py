"""Tests of SphericalQuantizer (DSQ)."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from skquant import ProductQuantizer
from skquant._additive import encode_beam, quantization_error
from skquant._deep._dsq import SphericalQuantizer
from skquant.metrics import mean_average_precision

SMALL = dict(
    n_codebooks=2,
    n_codewords=8,
    embedding_dim=4,
    hidden_layer_sizes=(8,),
    max_iter=3,
    warmup_epochs=1,
    batch_size=16,
    device="cpu",
    random_state=0,
)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(X))
    train, query, rest = perm[:1000], perm[1000:1297], perm[1297:]
    return X, y, train, query, rest


@pytest.fixture(scope="module")
def fitted(digits):
    X, y, train, _, _ = digits
    torch.set_num_threads(1)
    # 32-bit codes: 4 codebooks of 256 codewords.
    model = SphericalQuantizer(
        n_codebooks=4, n_codewords=256, max_iter=30, device="cpu", random_state=0
    )
    return model.fit(X[train], y[train])


def _maps(model, X, y, query, database):
    """mAP@all of AQD search, and of exact inner-product search on z."""
    model.index(X[database], y[database])
    ind = model.kneighbors(X[query], n_neighbors=len(database), return_distance=False)
    aqd = mean_average_precision(y[query], y[database], ind)
    Zq, Zd = model.transform(X[query]), model.transform(X[database])
    exact = np.argsort(-(Zq @ Zd.T), axis=1, kind="stable")
    return aqd, mean_average_precision(y[query], y[database], exact)


@pytest.mark.parametrize("database", ["rest", "rest_without_train"])
def test_digits_map_and_quantization_gap(digits, fitted, database):
    X, y, train, query, rest = digits
    db = np.concatenate([train, rest]) if database == "rest" else rest
    aqd, exact = _maps(fitted, X, y, query, db)
    assert aqd >= 0.90
    assert exact - aqd <= 0.02


def test_fitted_attributes_and_embedding(digits, fitted):
    X, y, train, query, _ = digits
    m = fitted
    assert m.codebooks_.shape == (4, 256, 64) and m.codebooks_.dtype == np.float32
    assert m.class_centers_.shape == (10, 64)
    np.testing.assert_array_equal(m.classes_, np.arange(10))
    assert m.n_iter_ == 30 and len(m.history_) == 30
    # Warm-up epochs have no quantization term; later ones do.
    assert "quantization" not in m.history_[0]
    assert "quantization_error" in m.history_[-1]
    Z = m.transform(X[query])
    assert Z.dtype == np.float32 and Z.shape == (297, 64)
    # The default embedding is a class posterior in an orthonormal basis
    # (squared norm between 1/L, uniform, and 1, one-hot) plus tie_break
    # times a unit vector orthogonal to it.
    sq_norms = np.linalg.norm(Z.astype(np.float64), axis=1) ** 2 - m.tie_break**2
    assert np.all((sq_norms <= 1 + 1e-5) & (sq_norms >= 0.1 - 1e-5))
    assert m.classifier_ is None
    # 32-bit additive codes reconstruct the posterior closely (its squared
    # norm is at most 1).
    qe = [h["quantization_error"] for h in m.history_ if "quantization_error" in h]
    assert qe[-1] < 1e-2


def test_kneighbors_is_one_minus_inner_product(digits, fitted):
    X, y, train, query, rest = digits
    fitted.index(X[rest], y[rest])
    dist, ind = fitted.kneighbors(X[query[:20]], n_neighbors=7)
    # Brute force: decode every item, rank by 1 - <z_q, x_hat>.
    x_hat = fitted.decode(fitted.codes_).astype(np.float64)
    ref = 1.0 - fitted.transform(X[query[:20]]).astype(np.float64) @ x_hat.T
    ref_ind = np.argsort(ref, axis=1, kind="stable")[:, :7]
    # The base clips distances at 0 (|x_hat| can exceed 1) for graph consumers.
    expected = np.maximum(np.take_along_axis(ref, ref_ind, 1), 0.0)
    np.testing.assert_allclose(dist, expected, atol=1e-5)
    np.testing.assert_array_equal(ind, ref_ind)


def test_encoder_beats_greedy_on_fitted_codebooks(digits, fitted):
    X, y, _, _, rest = digits
    Z = fitted.transform(X[rest]).astype(np.float64)
    C = fitted.codebooks_.astype(np.float64)
    icm = fitted.encode(X[rest])
    assert icm.dtype == np.uint8
    err_icm = quantization_error(Z, icm, C)
    err_greedy = quantization_error(Z, encode_beam(Z, C), C)
    assert np.all(err_icm <= err_greedy + 1e-6)
    assert err_icm.mean() < err_greedy.mean()


def test_pickle_round_trip(digits, fitted):
    X, y, _, query, rest = digits
    fitted.index(X[rest], y[rest])
    clone = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(clone.transform(X[query]), fitted.transform(X[query]))
    np.testing.assert_array_equal(clone.codes_, fitted.codes_)
    d1, i1 = fitted.kneighbors(X[query], n_neighbors=5)
    d2, i2 = clone.kneighbors(X[query], n_neighbors=5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_reproducible_and_seed_dependent(digits):
    X, y, train, query, _ = digits
    params = dict(SMALL, n_codewords=16, embedding_dim=8, max_iter=4)
    a = SphericalQuantizer(**params).fit(X[train[:300]], y[train[:300]])
    b = SphericalQuantizer(**params).fit(X[train[:300]], y[train[:300]])
    c = SphericalQuantizer(**dict(params, random_state=1)).fit(
        X[train[:300]], y[train[:300]]
    )
    np.testing.assert_array_equal(a.codebooks_, b.codebooks_)
    np.testing.assert_array_equal(a.codes_, b.codes_)
    np.testing.assert_array_equal(a.transform(X[query]), b.transform(X[query]))
    assert not np.array_equal(a.codebooks_, c.codebooks_)


@pytest.mark.parametrize("sparsity", [2, 5])
def test_sparse_codebooks(digits, sparsity):
    # embedding_dim=16: s=2 searches through CSR codebooks, s=5 (> D / 8)
    # through the dense product of the sparse codebooks.
    X, y, train, query, rest = digits
    model = SphericalQuantizer(
        **dict(SMALL, n_codewords=16, embedding_dim=16, max_iter=4, sparsity=sparsity)
    ).fit(X[train[:400]], y[train[:400]])
    nnz = (model.codebooks_ != 0).sum(axis=2)
    assert nnz.max() <= sparsity
    if sparsity == 2:
        assert model.quantizer_.csr.nnz == nnz.sum()
    else:
        assert model.quantizer_.csr is None
    # Sparse tables equal dense tables computed from the projected codebooks.
    Z = model.transform(X[query])
    sparse = model.quantizer_.lookup_tables(Z)
    dense = -np.einsum("nd,mkd->nmk", Z, model.codebooks_)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)
    # And the search still ranks by 1 - <z, x_hat>.
    model.index(X[rest], y[rest])
    dist, ind = model.kneighbors(X[query[:10]], n_neighbors=3)
    x_hat = model.decode(model.codes_).astype(np.float64)
    ref = 1.0 - Z[:10].astype(np.float64) @ x_hat.T
    ref = np.maximum(ref, 0.0)  # the base clips distances at 0
    np.testing.assert_allclose(dist, np.take_along_axis(ref, ind, 1), atol=1e-5)
    np.testing.assert_allclose(dist, np.sort(ref, axis=1)[:, :3], atol=1e-5)


def test_sparsity_at_least_dim_is_dense(digits):
    X, y, train, _, _ = digits
    params = dict(SMALL, n_codewords=16, embedding_dim=6, max_iter=2)
    dense = SphericalQuantizer(**params).fit(X[train[:200]], y[train[:200]])
    full = SphericalQuantizer(**dict(params, sparsity=6)).fit(
        X[train[:200]], y[train[:200]]
    )
    assert full.quantizer_.csr is None
    np.testing.assert_array_equal(dense.codebooks_, full.codebooks_)


def test_multilabel_y(digits):
    X, y, train, query, rest = digits
    # Two labels per item: the digit and whether it is even.
    Y = np.zeros((len(y), 11), dtype=int)
    Y[np.arange(len(y)), y] = 1
    Y[:, 10] = y % 2 == 0
    params = dict(SMALL, n_codewords=16, embedding_dim=16, hidden_layer_sizes=(64,))
    model = SphericalQuantizer(
        **dict(params, max_iter=20, warmup_epochs=2, batch_size=32)
    ).fit(X[train[:500]], Y[train[:500]])
    assert model.class_centers_.shape == (11, 16)
    np.testing.assert_array_equal(model.classes_, np.arange(11))
    model.index(X[rest], Y[rest])
    score = model.score(X[query], Y[query])
    # Relevance is "shares a label" (every even digit is relevant to an even
    # query); a random ranking scores 0.31 here, this model 0.84 (10 epochs
    # are too few for the per-label sigmoids at learning_rate=1e-3: 0.61).
    assert score > 0.7


def test_two_step_when_warmup_covers_training(digits):
    X, y, train, _, _ = digits
    model = SphericalQuantizer(
        **dict(SMALL, n_codewords=16, max_iter=2, warmup_epochs=5)
    ).fit(X[train[:200]], y[train[:200]])
    assert all("quantization" not in h for h in model.history_)
    assert model.codebooks_.shape == (2, 16, 4)
    assert model.codes_.shape == (200, 2)


def test_conv_backbone_with_input_shape(digits):
    X, y, train, query, _ = digits
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2)
    )
    model = SphericalQuantizer(
        **dict(SMALL, backbone=backbone, input_shape=(1, 8, 8), n_codewords=16)
    ).fit(X[train[:200]], y[train[:200]])
    assert model.transform(X[query[:3]]).shape == (3, 4)
    # The user's module is copied, not trained in place.
    assert model.module_.backbone is not backbone


def test_verbose_prints_epochs(digits, capsys):
    X, y, train, _, _ = digits
    SphericalQuantizer(**dict(SMALL, verbose=1)).fit(X[train[:100]], y[train[:100]])
    out = capsys.readouterr().out
    assert out.count("[SphericalQuantizer] epoch") == 3
    assert "quantization_error" in out


def test_requires_y(digits):
    X, y, train, _, _ = digits
    with pytest.raises(ValueError, match="requires y"):
        SphericalQuantizer(**SMALL).fit(X[:50])


@pytest.mark.parametrize("loss", ["posterior", "dsq"])
def test_each_loss_beats_unsupervised_pq(digits, loss):
    # Both objectives (the posterior default and the survey's DSQ objective)
    # learn codes that beat PQ on the raw pixels.
    X, y, train, query, rest = digits
    params = dict(SMALL, loss=loss, n_codewords=32, embedding_dim=16,
                  hidden_layer_sizes=(32,), max_iter=15, warmup_epochs=3)
    model = SphericalQuantizer(**params).fit(X[train[:600]], y[train[:600]])
    model.index(X[rest], y[rest])
    pq = ProductQuantizer(n_codebooks=2, n_codewords=32, random_state=0)
    pq.fit(X[train[:600]]).index(X[rest], y[rest])
    assert model.score(X[query], y[query]) > pq.score(X[query], y[query]) + 0.1
    Z = model.transform(X[query])
    if loss == "dsq":  # the paper's spherical embedding and its classifier
        np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)
        assert model.classifier_ is not None
        # The joint training pulls z towards its codes: the quantization
        # error shrinks after the codebooks are first fitted.
        qe = [h["quantization_error"] for h in model.history_
              if "quantization_error" in h]
        assert qe[-1] < qe[0]
    else:
        assert model.classifier_ is None


@pytest.mark.parametrize("params, match", [({"loss": "arcface"}, "loss"),
                                            ({"temperature": -1.0}, "temperature"),
                                            ({"tie_break": -1.0}, "tie_break")])
def test_invalid_loss_parameters(digits, params, match):
    X, y, train, _, _ = digits
    with pytest.raises(ValueError, match=match):
        SphericalQuantizer(**dict(SMALL, **params)).fit(X[train[:50]], y[train[:50]])


def test_shift_augmentation(digits):
    # augment="shift" trains on translated images: a different fit from the
    # same seed, still a working model; it needs the image layout.
    X, y, train, query, _ = digits
    params = dict(SMALL, input_shape=(1, 8, 8), n_codewords=16)
    plain = SphericalQuantizer(**params).fit(X[train[:200]], y[train[:200]])
    shifted = SphericalQuantizer(**dict(params, augment="shift"))
    shifted.fit(X[train[:200]], y[train[:200]])
    assert shifted.transform(X[query[:3]]).shape == (3, 4)
    assert not np.allclose(plain.transform(X[query]), shifted.transform(X[query]))
    with pytest.raises(ValueError, match="input_shape"):
        SphericalQuantizer(**dict(SMALL, augment="shift")).fit(X[train[:50]], y[train[:50]])
    with pytest.raises(ValueError, match="augment"):
        SphericalQuantizer(**dict(params, augment="flip")).fit(X[train[:50]], y[train[:50]])
