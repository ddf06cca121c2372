"""Tests for DeepQuantizer (DQN).

sklearn's common checks for DeepQuantizer live in tests/test_common.py.
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from torch import nn

from skquant import ProductQuantizer
from skquant._deep._dqn import DeepQuantizer
from skquant.metrics import mean_average_precision

# Small, fast settings for behaviour tests (not quality tests).
FAST = dict(
    n_codebooks=2,
    n_codewords=8,
    embedding_dim=8,
    hidden_layer_sizes=(16,),
    max_iter=4,
    warmup_epochs=1,
    batch_size=32,
    device="cpu",
    random_state=0,
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny networks: intra-op threads only add synchronisation, which is very
    # slow on a busy machine. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_split():
    """DQN protocol on digits: 1000 train / 297 query / database = the rest."""
    X, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(X))
    train, query, database = perm[:1000], perm[1000:1297], perm[1297:]
    return X, y, train, query, database


@pytest.fixture(scope="module")
def digits_dqn(digits_split):
    X, y, train, _, database = digits_split
    # 32-bit codes, library defaults otherwise.
    est = DeepQuantizer(n_codebooks=4, n_codewords=256, device="cpu", random_state=0)
    est.fit(X[train], y[train])
    est.index(X[database], y[database])
    return est


def _exact_ranking(Zq, Zd, metric="euclidean"):
    Zq = Zq.astype(np.float64)
    if metric == "inner_product":
        return np.argsort(-(Zq @ Zd.T.astype(np.float64)), axis=1, kind="stable")
    d = ((Zq[:, None, :] - Zd[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")


def test_digits_retrieval_quality(digits_split, digits_dqn):
    X, y, train, query, database = digits_split
    dqn_map = digits_dqn.score(X[query], y[query])

    pq = ProductQuantizer(n_codebooks=4, n_codewords=256, random_state=0)
    pq.fit(X[train], y[train]).index(X[database], y[database])
    pq_map = pq.score(X[query], y[query])

    Zq, Zd = digits_dqn.transform(X[query]), digits_dqn.transform(X[database])
    assert digits_dqn.metric_ == "inner_product"  # the posterior default
    exact_map = mean_average_precision(
        y[query], y[database], _exact_ranking(Zq, Zd, "inner_product")
    )

    assert dqn_map >= 0.90, dqn_map
    assert dqn_map >= pq_map + 0.15, (dqn_map, pq_map)
    assert abs(exact_map - dqn_map) <= 0.02, (exact_map, dqn_map)


@pytest.mark.parametrize("loss", ["posterior", "cosine"])
def test_kneighbors_is_aqd_on_the_embedding(digits_split, digits_dqn, loss):
    # Independent computation: decode the database codes by hand and take
    # exact distances from the (unquantized) query embeddings: Euclidean for
    # the paper's losses, 1 - inner product for the posterior embedding.
    X, y, train, query, database = digits_split
    est = digits_dqn
    if loss != "posterior":
        est = DeepQuantizer(**{**FAST, "loss": loss}).fit(X[train], y[train])
        est.index(X[database])
    Zq = est.transform(X[query[:20]]).astype(np.float64)
    C = est.codebooks_
    codes = est.codes_
    Z_hat = np.hstack([C[m][codes[:, m]] for m in range(C.shape[0])])
    if loss == "posterior":
        assert est.metric_ == "inner_product"
        d = np.maximum(1.0 - Zq @ Z_hat.T, 0.0)
    else:
        assert est.metric_ == "euclidean"
        d = np.sqrt(((Zq[:, None, :] - Z_hat[None]) ** 2).sum(-1))
    ind_ref = np.argsort(d, axis=1, kind="stable")[:, :10]
    dist, ind = est.kneighbors(X[query[:20]], n_neighbors=10)
    assert_allclose(dist, np.take_along_axis(d, ind_ref, axis=1), rtol=1e-4, atol=1e-5)
    if loss == "posterior":
        # Posteriors of confident items are near-ties: float32 tables and
        # this float64 reference may order them differently, never by more
        # than rounding.
        assert_allclose(np.take_along_axis(d, ind, axis=1),
                        np.take_along_axis(d, ind_ref, axis=1), atol=1e-6)
    else:
        assert_array_equal(ind, ind_ref)


def test_fitted_attributes(digits_dqn):
    est = digits_dqn
    assert est.codebooks_.shape == (4, 256, 16) and est.codebooks_.dtype == np.float32
    assert est.codes_.dtype == np.uint8 and est.codes_.shape == (500, 4)
    assert est.rotation_ is None
    assert est.n_iter_ == est.max_iter == len(est.history_)
    assert est.device_ == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in est.module_.parameters())
    first, last = est.history_[0], est.history_[-1]
    assert "quantization" not in first  # warm-up: classification loss only
    assert {"loss", "cross_entropy", "quantization", "time"} <= set(last)
    refits = [h for h in est.history_ if "quantization_error" in h]
    expected = len(range(est.warmup_epochs, est.max_iter, est.codebook_update_period))
    assert len(refits) == expected
    # A posterior in an orthonormal basis (norm in [1/sqrt(L), 1]) plus an
    # orthogonal unit vector times tie_break.
    norms = np.linalg.norm(est.transform(np.zeros((3, 64))), axis=1) ** 2
    t2 = est.tie_break**2
    assert np.all((norms <= 1 + t2 + 1e-5) & (norms >= 0.1 + t2 - 1e-5))
    # The posterior part is the network's own classifier: the inner product
    # of two embeddings is that of their posteriors plus tie_break^2 * cosine.
    head = est.module_.head
    assert_allclose(head.basis.numpy() @ head.projection.numpy().T, 0, atol=1e-5)


def test_pickle_round_trip_identical_search(digits_split, digits_dqn):
    X, _, _, query, _ = digits_split
    loaded = pickle.loads(pickle.dumps(digits_dqn))
    d1, i1 = digits_dqn.kneighbors(X[query], n_neighbors=7)
    d2, i2 = loaded.kneighbors(X[query], n_neighbors=7)
    assert_array_equal(i1, i2)
    assert_array_equal(d1, d2)
    assert_array_equal(digits_dqn.transform(X[query]), loaded.transform(X[query]))


def test_gpu_trained_model_searches_on_cpu_only_machine(digits_split, digits_dqn):
    # A model fitted on CUDA keeps device_ = cuda after unpickling; on a
    # machine without CUDA, search must fall back to the CPU with a warning.
    if torch.cuda.is_available():
        pytest.skip("needs a CPU-only machine")
    X, _, _, query, _ = digits_split
    est = pickle.loads(pickle.dumps(digits_dqn))
    est.device_ = torch.device("cuda:0")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        ind = est.kneighbors(X[query[:5]], return_distance=False)
    assert_array_equal(ind, digits_dqn.kneighbors(X[query[:5]], return_distance=False))


def test_reproducible_and_leaves_global_rng_alone():
    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    a = DeepQuantizer(**{**FAST, "dropout": 0.2}).fit(X, y)
    assert torch.equal(torch.rand(3), expected_next)
    b = DeepQuantizer(**{**FAST, "dropout": 0.2}).fit(X, y)
    assert_array_equal(a.codes_, b.codes_)
    assert_array_equal(a.codebooks_, b.codebooks_)
    assert_array_equal(a.transform(X), b.transform(X))
    assert [h["loss"] for h in a.history_] == [h["loss"] for h in b.history_]
    c = DeepQuantizer(**{**FAST, "dropout": 0.2, "random_state": 1}).fit(X, y)
    assert not np.array_equal(a.transform(X), c.transform(X))


def test_multilabel_y():
    X, y = load_digits(return_X_y=True)
    X, y = X[:400], y[:400]
    # Two overlapping labels: the digit's parity and whether it is >= 5.
    Y = np.column_stack([y % 2 == 0, y % 2 == 1, y >= 5]).astype(int)
    est = DeepQuantizer(**{**FAST, "max_iter": 10}).fit(X[:300], Y[:300])
    score = est.score(X[300:], Y[300:])
    pq = ProductQuantizer(n_codebooks=2, n_codewords=8, random_state=0)
    pq_score = pq.fit(X[:300], Y[:300]).score(X[300:], Y[300:])
    assert np.isfinite(score) and score > pq_score
    assert est.database_labels_.shape == (300, 3)


def test_two_step_mode_uses_opq():
    X, y = load_digits(return_X_y=True)
    est = DeepQuantizer(**{**FAST, "joint": False}).fit(X[:300], y[:300])
    R = est.rotation_
    assert R.shape == (8, 8)
    assert_allclose(R @ R.T, np.eye(8), atol=1e-5)
    assert all("quantization" not in h for h in est.history_)
    # codes are the nearest rotated codewords
    Z = est.transform(X[:300]) @ R
    C = est.codebooks_
    for m in range(2):
        d = ((Z[:, None, 4 * m : 4 * m + 4] - C[m][None]) ** 2).sum(-1)
        assert_array_equal(est.codes_[:, m], np.argmin(d, axis=1))


def test_inner_product_loss_and_verbose(capsys):
    X, y = load_digits(return_X_y=True)
    est = DeepQuantizer(**{**FAST, "loss": "inner_product", "verbose": 1})
    est.fit(X[:200], y[:200])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == FAST["max_iter"]
    assert lines[0].startswith(f"[DeepQuantizer] epoch 1/{FAST['max_iter']}, loss = ")
    assert "quantization = " in lines[-1] and "time = " in lines[-1]
    assert np.all(np.isfinite([h["loss"] for h in est.history_]))


def test_conv_backbone_with_input_shape_and_frozen_backbone():
    X, y = load_digits(return_X_y=True)
    X, y = X[:200], y[:200]
    torch.manual_seed(0)
    # BatchNorm: a frozen backbone must stay in eval mode while the head
    # trains, or its running statistics would drift.
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.MaxPool2d(2))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    est = DeepQuantizer(**{**FAST, "backbone": backbone, "input_shape": (1, 8, 8),
                           "backbone_learning_rate": 0.0}).fit(X, y)
    # the parameter is untouched and the frozen copy kept its weights
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.equal(est.module_.backbone.state_dict()[k], before[k])
    assert est.module_.head.in_features == 4 * 3 * 3
    assert est.transform(X).shape == (200, 8)
    with pytest.raises(ValueError, match="product of input_shape"):
        clone(est).set_params(input_shape=(3, 8, 8)).fit(X, y)


@pytest.mark.parametrize(
    "params, y_kind, match",
    [
        ({"embedding_dim": 9}, "ok", "divisible by n_codebooks"),
        ({"n_codewords": 64}, "ok", "larger than the number of training samples"),
        ({}, "one_class", "at least 2 classes"),
        ({}, "none", "requires y"),
        ({"hidden_layer_sizes": (0,)}, "ok", "positive ints"),
        ({"loss": "hinge"}, "ok", "loss"),
        ({"temperature": 0.0}, "ok", "temperature"),
        ({"tie_break": -0.1}, "ok", "tie_break"),
    ],
)
def test_clear_errors(params, y_kind, match):
    X = np.random.RandomState(0).normal(size=(40, 5))
    y = {"ok": np.arange(40) % 3, "one_class": np.zeros(40), "none": None}[y_kind]
    with pytest.raises(ValueError, match=match):
        DeepQuantizer(**{**FAST, **params}).fit(X, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_cuda_requested_without_cuda():
    X = np.random.RandomState(0).normal(size=(40, 5))
    with pytest.raises(ValueError, match="CUDA is not available"):
        DeepQuantizer(**{**FAST, "device": "cuda"}).fit(X, np.arange(40) % 3)


def test_unique_labels_warn_but_stay_finite():
    X = np.random.RandomState(0).normal(size=(40, 5))
    with pytest.warns(UserWarning, match="unique"):
        est = DeepQuantizer(**FAST).fit(X, np.arange(40))
    assert np.all(np.isfinite(est.transform(X)))


class _NaNBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x) * float("nan")


def test_non_finite_loss_suggests_smaller_learning_rate():
    X = np.random.RandomState(0).normal(size=(40, 5))
    est = DeepQuantizer(**{**FAST, "backbone": _NaNBackbone()})
    with pytest.raises(FloatingPointError, match="smaller learning_rate"):
        est.fit(X, np.arange(40) % 3)


class _InterruptingBackbone(nn.Module):
    """Raises KeyboardInterrupt on the n-th training forward pass."""

    calls = 0
    interrupt_at = 10**9

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 16)

    def forward(self, x):
        if self.training:
            type(self).calls += 1
            if type(self).calls == type(self).interrupt_at:
                raise KeyboardInterrupt
        return torch.relu(self.lin(x))


def test_keyboard_interrupt_keeps_last_epoch_and_stays_usable():
    X, y = load_digits(return_X_y=True)
    X, y = X[:320], y[:320]
    _InterruptingBackbone.calls = 0
    _InterruptingBackbone.interrupt_at = 10**9
    torch.manual_seed(0)
    ref = DeepQuantizer(**{**FAST, "backbone": _InterruptingBackbone(), "max_iter": 2})
    ref.fit(X, y)  # 10 batches per epoch: 2 full epochs, as the interrupted fit keeps
    _InterruptingBackbone.calls = 0
    _InterruptingBackbone.interrupt_at = 25  # during epoch 3
    torch.manual_seed(0)
    est = DeepQuantizer(**{**FAST, "backbone": _InterruptingBackbone(), "max_iter": 6})
    with pytest.warns(UserWarning, match="interrupted during epoch 3"):
        est.fit(X, y)
    assert est.n_iter_ == 2 and len(est.history_) == 2
    assert_array_equal(est.transform(X), ref.transform(X))
    assert est.kneighbors(X[:3], n_neighbors=4, return_distance=False).shape == (3, 4)


def test_fit_does_not_warn_on_clean_data():
    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeepQuantizer(**FAST).fit(X[:200], y[:200])


def test_grid_search_tunes_with_score():
    # score is mAP against the indexed fold, so GridSearchCV needs no scorer.
    X, y = load_digits(return_X_y=True)
    grid = GridSearchCV(DeepQuantizer(**FAST), {"loss": ["cosine", "inner_product"]},
                        cv=2).fit(X[:200], y[:200])
    assert grid.best_params_["loss"] in ("cosine", "inner_product")
    assert 0 < grid.best_score_ <= 1
    assert not hasattr(grid.estimator, "module_")  # clone stayed unfitted


@pytest.mark.parametrize("loss", ["posterior", "cosine", "inner_product"])
def test_each_loss_beats_unsupervised_pq(loss):
    # Every selectable objective (the posterior default and the paper's
    # pairwise losses) learns codes that beat PQ on the raw pixels.
    X, y = load_digits(return_X_y=True)
    params = {**FAST, "loss": loss, "n_codewords": 32, "embedding_dim": 16,
              "hidden_layer_sizes": (32,), "max_iter": 15, "warmup_epochs": 3}
    if loss != "posterior":
        # The pairwise losses' previous defaults (the paper mode).
        params.update(learning_rate=3e-3, weight_decay=1e-4, weight_averaging=0.0)
    est = DeepQuantizer(**params).fit(X[:600], y[:600])
    est.index(X[600:1200], y[600:1200])
    pq = ProductQuantizer(n_codebooks=2, n_codewords=32, random_state=0)
    pq.fit(X[:600]).index(X[600:1200], y[600:1200])
    assert est.score(X[1200:], y[1200:]) > pq.score(X[1200:], y[1200:]) + 0.1
    assert est.metric_ == ("inner_product" if loss == "posterior" else "euclidean")


def test_tie_break_orders_equal_posteriors():
    # Without the feature term, confident items share their codes and tie at
    # rank 1 more often (Fashion-MNIST validation, DeepQuantizer's Notes: 1.00
    # -> 0.71; on digits with these small codebooks: 0.985 -> 0.966).
    X, y = load_digits(return_X_y=True)
    params = {**FAST, "n_codebooks": 4, "n_codewords": 32, "embedding_dim": 16,
              "hidden_layer_sizes": (32,), "max_iter": 15, "warmup_epochs": 3}
    ties = []
    for tie_break in (0.0, 0.1):
        est = DeepQuantizer(**params, tie_break=tie_break).fit(X[:600], y[:600])
        est.index(X[600:1200])
        d, _ = est.kneighbors(X[1200:], n_neighbors=2)
        ties.append(np.mean(d[:, 0] == d[:, 1]))
    assert ties[1] < ties[0], ties


def test_shift_augmentation():
    # augment="shift" trains on translated images: a different fit from the
    # same seed, still a working model; it needs the image layout.
    X, y = load_digits(return_X_y=True)
    X, y = X[:200], y[:200]
    params = {**FAST, "input_shape": (1, 8, 8)}
    plain = DeepQuantizer(**params).fit(X, y)
    shifted = DeepQuantizer(**{**params, "augment": "shift"}).fit(X, y)
    assert shifted.transform(X).shape == (200, 8)
    assert not np.allclose(plain.transform(X), shifted.transform(X))
    # No augmentation: the same fit as without the parameter.
    same = DeepQuantizer(**{**params, "augment": None}).fit(X, y)
    np.testing.assert_array_equal(plain.transform(X), same.transform(X))
    with pytest.raises(ValueError, match="input_shape"):
        DeepQuantizer(**{**FAST, "augment": "shift"}).fit(X, y)
    with pytest.raises(ValueError, match="augment"):
        DeepQuantizer(**{**params, "augment": "flip"}).fit(X, y)
