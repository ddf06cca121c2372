"""Failures during training of the deep quantizers (DQN and DSQ).

- a loss that becomes NaN / inf, or a network that diverges, stops ``fit``
  with a :class:`FloatingPointError` that suggests a smaller learning rate
  (never a k-means or encoder error about NaN input, never a NaN model);
- a ``KeyboardInterrupt`` during ``fit`` keeps the model of the last
  completed epoch, warns, and leaves a usable estimator (as skorch does);
- CUDA out-of-memory says to lower ``batch_size``.

Failures are simulated on the CPU by backbones that misbehave at their N-th
training forward pass, so every test runs without a GPU.
"""

import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from skquant import DeepQuantizer
from skquant._convergence import collapse_reasons
from skquant._deep._dsq import SphericalQuantizer

N_SAMPLES = 128
BATCH_SIZE = 32  # 4 batches per epoch

COMMON = dict(
    n_codewords=8, embedding_dim=8, max_iter=3, warmup_epochs=1,
    batch_size=BATCH_SIZE, device="cpu", random_state=0,
)
FACTORIES = {
    "DQN": lambda **kw: DeepQuantizer(**{"n_codebooks": 2, **COMMON, **kw}),
    "DSQ": lambda **kw: SphericalQuantizer(**{"n_codebooks": 2, **COMMON, **kw}),
}
DEEP = list(FACTORIES)


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    return X[:N_SAMPLES], y[:N_SAMPLES]


class FaultyBackbone(nn.Module):
    """Linear + ReLU backbone whose ``fail_at``-th *training* forward pass
    misbehaves: raises ``error``, or multiplies its output by ``factor``.

    Eval-mode passes (the dry run that sizes the head, the embeddings used for
    codebook refits, transform) are left alone. The counter lives on the
    instance: estimators deep-copy the backbone, so the copy counts its own
    calls, and a fresh one starts at 0 for every fit.
    """

    def __init__(self, fail_at=None, error=None, factor=None, n_features=64):
        super().__init__()
        with torch.random.fork_rng():  # same initial weights for every instance
            torch.manual_seed(0)
            self.lin = nn.Linear(n_features, 16)
        self.fail_at = fail_at
        self.error = error
        self.factor = factor
        self.calls = 0

    def forward(self, x):
        out = torch.relu(self.lin(x))
        if self.training:
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                if self.error is not None and self.calls == self.fail_at:
                    raise self.error
                if self.factor is not None:
                    out = out * self.factor
        return out


# --------------------------------------------------------------------------
# Non-finite loss / divergence
@pytest.mark.parametrize("name", DEEP)
@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
@pytest.mark.parametrize("fail_at", [1, 6])
def test_non_finite_loss_stops_with_learning_rate_hint(name, factor, fail_at, data):
    # NaN / inf activations from the first batch, or in the middle of epoch 2.
    X, y = data
    est = FACTORIES[name](backbone=FaultyBackbone(fail_at=fail_at, factor=factor))
    with pytest.raises(FloatingPointError, match="smaller learning_rate") as info:
        est.fit(X, y)
    epoch = 1 if fail_at <= 4 else 2
    assert f"epoch {epoch}" in str(info.value)
    assert not hasattr(est, "codes_")  # no half-fitted model is left behind


@pytest.mark.parametrize("name", DEEP)
def test_infinite_loss_value(name, data, monkeypatch):
    # A loss that overflows to +inf (not NaN) is refused the same way.
    X, y = data
    # Both default to loss="posterior", whose cross-entropy each module imports.
    from skquant._deep import _dqn, _dsq

    module = _dqn if name == "DQN" else _dsq
    original = module.posterior_loss
    monkeypatch.setattr(
        module, "posterior_loss", lambda *a, **k: original(*a, **k) * float("inf")
    )
    with pytest.raises(FloatingPointError, match=r"loss became inf .*smaller learning_rate"):
        FACTORIES[name]().fit(X, y)


@pytest.mark.parametrize("name", DEEP)
@pytest.mark.parametrize("warmup_epochs", [0, 1, 5])
def test_diverging_learning_rate_never_passes_silently(name, warmup_epochs, data):
    # A real divergence, no simulation. Whether learning_rate=1e20 ends in
    # NaN (AMD EPYC) or in finite but collapsed weights (Intel Xeon: dead
    # ReLUs, a handful of codes) depends on how the CPU rounds and
    # overflows, so this asserts the contract that holds on every CPU: fit
    # either raises FloatingPointError, or finishes with a ConvergenceWarning;
    # both say to lower learning_rate. Each branch is pinned down by a
    # deterministic test below / above (simulated NaN, constant network).
    # NaN must never reach k-means ("Input X contains NaN") or the model.
    X, y = data
    est = FACTORIES[name](
        hidden_layer_sizes=(16,), learning_rate=1e20, warmup_epochs=warmup_epochs
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            est.fit(X, y)
        except FloatingPointError as exc:
            assert "smaller learning_rate" in str(exc)
            return
    collapse = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert collapse, "a diverged fit finished without any warning"
    assert "smaller learning_rate" in str(collapse[0].message)
    assert np.isfinite(est.transform(X)).all()


class ConstantBackbone(nn.Module):
    """A dead network: every input maps to the same features (as when a
    huge learning rate has killed every ReLU)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 16)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 0.0


@pytest.mark.parametrize("name", DEEP)
def test_collapsed_network_warns_convergence(name, data):
    X, y = data
    est = FACTORIES[name](backbone=ConstantBackbone(), max_iter=4)
    with pytest.warns(ConvergenceWarning, match="1 distinct code for 10 classes"):
        est.fit(X, y)
    assert len(np.unique(est.codes_, axis=0)) == 1


@pytest.mark.parametrize("name", DEEP)
def test_healthy_fit_does_not_warn(name, data):
    X, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        FACTORIES[name](max_iter=6).fit(X, y)


def test_collapse_reasons_loss_never_decreasing():
    codes = np.arange(12, dtype=np.uint8).reshape(6, 2)
    y = np.array([0, 0, 1, 1, 2, 2])
    flat = [{"epoch": e, "loss": 1.0, "similarity": 1.0} for e in range(1, 5)]
    assert collapse_reasons(codes, y, flat, 16) == [
        "the training loss never fell below its first value (1 after 4 epochs)"
    ]
    falling = [dict(r, loss=1.0 / r["epoch"]) for r in flat]
    assert collapse_reasons(codes, y, falling, 16) == []
    # A warm-up phase with other loss terms is not compared with the last one.
    warm = [{"epoch": 1, "loss": 0.1, "similarity": 0.1}]
    later = [{"epoch": e, "loss": 2.0 / e, "similarity": 0.1, "quantization": 0.1}
             for e in range(2, 6)]
    assert collapse_reasons(codes, y, warm + later, 16) == []
    # Two epochs are too few to judge.
    assert collapse_reasons(codes, y, flat[:2], 16) == []
    # Capacity: 2 codebooks x 2 codewords cannot give 5 classes 5 codes.
    y5 = np.arange(60) % 5
    four = np.tile(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.uint8), (15, 1))
    assert collapse_reasons(four, y5, [], 2) == []
    assert collapse_reasons(four, y5, [], 3) == [
        "all 60 training items share 4 distinct codes for 5 classes"
    ]
    # Nearly as many classes as items: few codes per class is no evidence.
    assert collapse_reasons(four[:8], np.arange(8), [], 3) == []


# --------------------------------------------------------------------------
# KeyboardInterrupt
def _fit_reference(name, data, n_epochs):
    X, y = data
    return FACTORIES[name](backbone=FaultyBackbone(), max_iter=n_epochs).fit(X, y)


@pytest.mark.parametrize("name", DEEP)
@pytest.mark.parametrize("interrupt_at, completed", [(7, 1), (11, 2)])
def test_keyboard_interrupt_keeps_last_completed_epoch(name, interrupt_at, completed, data):
    # 4 batches per epoch: call 7 is in epoch 2, call 11 in epoch 3.
    X, y = data
    est = FACTORIES[name](
        backbone=FaultyBackbone(fail_at=interrupt_at, error=KeyboardInterrupt()),
        max_iter=6,
    )
    with pytest.warns(
        UserWarning,
        match=f"interrupted during epoch {completed + 1}; keeping the model of the "
        f"last completed epoch \\({completed}\\)",
    ):
        est.fit(X, y)
    assert est.n_iter_ == completed
    assert [r["epoch"] for r in est.history_] == list(range(1, completed + 1))
    # Usable: same network as a fit that stopped there, searchable, picklable.
    reference = _fit_reference(name, data, completed)
    assert_array_equal(est.transform(X), reference.transform(X))
    dist, ind = est.kneighbors(X[:5], n_neighbors=4)
    assert ind.shape == (5, 4) and np.isfinite(dist).all()
    assert 0.0 <= est.score(X[:20], y[:20]) <= 1.0


@pytest.mark.parametrize("name", DEEP)
def test_keyboard_interrupt_in_first_epoch(name, data):
    # Nothing completed: the initial network is kept, the estimator still
    # works, and the warning says so.
    X, y = data
    est = FACTORIES[name](backbone=FaultyBackbone(fail_at=2, error=KeyboardInterrupt()))
    with pytest.warns(UserWarning, match=r"last completed epoch \(0\)"):
        est.fit(X, y)
    assert est.n_iter_ == 0 and est.history_ == []
    assert np.isfinite(est.transform(X)).all()
    assert est.kneighbors(X[:3], n_neighbors=2, return_distance=False).shape == (3, 2)


def test_keyboard_interrupt_during_codebook_refit(data, monkeypatch):
    # Ctrl-C while k-means refits the codebooks (between network epochs).
    from skquant._deep import _dqn

    X, y = data
    original = _dqn.fit_subspace_codebooks
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the refit at the start of epoch 3
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(_dqn, "fit_subspace_codebooks", interrupted)
    est = FACTORIES["DQN"](max_iter=4, codebook_update_period=1)
    with pytest.warns(UserWarning, match=r"interrupted during epoch 3"):
        est.fit(X, y)
    assert est.n_iter_ == 2
    assert est.kneighbors(X[:3], n_neighbors=2, return_distance=False).shape == (3, 2)


# --------------------------------------------------------------------------
# CUDA out of memory (simulated: torch.cuda.OutOfMemoryError is raised the
# same way on a CPU-only build)
@pytest.mark.parametrize("name", DEEP)
def test_cuda_oom_during_training_suggests_smaller_batch_size(name, data):
    X, y = data
    est = FACTORIES[name](
        backbone=FaultyBackbone(
            fail_at=3, error=torch.cuda.OutOfMemoryError("CUDA out of memory.")
        )
    )
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"batch_size=32; lower batch_size"):
        est.fit(X, y)


class _OOMAtInference(nn.Module):
    """Fine while training; raises CUDA OOM in eval-mode passes once armed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 16)
        self.armed = False

    def forward(self, x):
        if self.armed and not self.training:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return torch.relu(self.lin(x))


@pytest.mark.parametrize("name", DEEP)
def test_cuda_oom_at_inference_suggests_smaller_batch_size(name, data):
    X, y = data
    est = FACTORIES[name](backbone=_OOMAtInference()).fit(X, y)
    est.module_.backbone.armed = True
    for method in (est.transform, est.kneighbors, est.encode):
        with pytest.raises(torch.cuda.OutOfMemoryError, match="lower batch_size"):
            method(X[:4])
    est.module_.backbone.armed = False  # the estimator is still usable afterwards
    assert est.transform(X[:4]).shape == (4, 8)
