"""Tests for the shared torch layer (skquant._deep._torch) and the losses (skquant._deep._losses)."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.preprocessing import StandardScaler
from torch import nn

from skquant._deep._losses import (
    label_similarity,
    pairwise_cosine_loss,
    pairwise_inner_product_loss,
    product_quantization_loss,
    product_reconstruction,
)
from skquant._deep._torch import (
    EmbeddingNetwork,
    build_embedding_network,
    build_mlp,
    check_input_shape,
    embed,
    inference_device,
    iter_minibatches,
    make_generator,
    make_optimizer,
    prepare_labels,
    random_shift,
    resolve_device,
    torch_rng_context,
    torch_seed,
    train_epochs,
)


# --------------------------------------------------------------------------- #
# losses against brute-force numpy loops
# --------------------------------------------------------------------------- #
def test_label_similarity_single_label_matches_loop():
    y = np.array([3, 1, 3, 2, 1, 1])
    S = label_similarity(torch.as_tensor(y)).numpy()
    expected = np.array([[1.0 if a == b else -1.0 for b in y] for a in y])
    assert_array_equal(S, expected)


def test_label_similarity_multilabel_share_one_label():
    Y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    S = label_similarity(torch.as_tensor(Y)).numpy()
    expected = np.empty((4, 4))
    for i in range(4):
        for j in range(4):
            shared = np.any((Y[i] > 0) & (Y[j] > 0))
            expected[i, j] = 1.0 if shared or i == j else -1.0
    assert_array_equal(S, expected)
    # two different batches: no diagonal forcing
    S2 = label_similarity(torch.as_tensor(Y[:2]), torch.as_tensor(Y[2:])).numpy()
    assert_array_equal(S2, -np.ones((2, 2)))


def test_pairwise_cosine_loss_matches_loop():
    rng = np.random.RandomState(0)
    Z = rng.normal(size=(7, 5))
    y = rng.randint(3, size=7)
    S = label_similarity(torch.as_tensor(y))
    got = float(pairwise_cosine_loss(torch.as_tensor(Z), S))
    total = 0.0
    for i in range(7):
        for j in range(7):
            cos = Z[i] @ Z[j] / (np.linalg.norm(Z[i]) * np.linalg.norm(Z[j]))
            s = 1.0 if y[i] == y[j] else -1.0
            total += (s - cos) ** 2
    assert got == pytest.approx(total / 49, rel=1e-6)


def test_pairwise_cosine_loss_finite_on_zero_embedding():
    Z = torch.zeros(3, 4, requires_grad=True)
    loss = pairwise_cosine_loss(Z, label_similarity(torch.tensor([0, 1, 0])))
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(Z.grad))


def test_pairwise_inner_product_loss_matches_loop():
    rng = np.random.RandomState(1)
    Z = np.tanh(rng.normal(size=(6, 4)))
    y = rng.randint(2, size=6)
    got = float(pairwise_inner_product_loss(
        torch.as_tensor(Z), label_similarity(torch.as_tensor(y))))
    expected = np.mean([
        ((1.0 if y[i] == y[j] else -1.0) - Z[i] @ Z[j] / 4) ** 2
        for i in range(6) for j in range(6)
    ])
    assert got == pytest.approx(expected, rel=1e-10)


def test_product_reconstruction_and_loss_match_numpy():
    rng = np.random.RandomState(2)
    M, K, d, n = 3, 5, 2, 8
    C = rng.normal(size=(M, K, d))
    codes = rng.randint(K, size=(n, M))
    Z = rng.normal(size=(n, M * d))
    Z_hat = product_reconstruction(torch.as_tensor(C), torch.as_tensor(codes)).numpy()
    expected = np.hstack([C[m][codes[:, m]] for m in range(M)])
    assert_allclose(Z_hat, expected)
    Zt = torch.as_tensor(Z, dtype=torch.float64).requires_grad_(True)
    loss = product_quantization_loss(Zt, torch.as_tensor(expected))
    assert float(loss.detach()) == pytest.approx(np.mean(np.sum((Z - expected) ** 2, axis=1)))
    loss.backward()
    assert_allclose(Zt.grad.numpy(), 2 * (Z - expected) / n)


# --------------------------------------------------------------------------- #
# devices and seeding
# --------------------------------------------------------------------------- #
def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a valid device"):
        resolve_device("gpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_resolve_device_cuda_unavailable_is_clear():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.warns(UserWarning, match="on the CPU"):
        assert inference_device("cuda:0") == torch.device("cpu")


@pytest.mark.parametrize(
    "device, name, available",
    [
        ("mps", "Apple MPS", lambda: torch.backends.mps.is_available()),
        ("xpu", "Intel XPU", lambda: hasattr(torch, "xpu") and torch.xpu.is_available()),
    ],
)
def test_every_unavailable_accelerator_is_as_clear_as_cuda(device, name, available):
    if available():
        pytest.skip(f"{name} is available here")
    with pytest.raises(ValueError, match=f"{name} is not available.*device='cpu'"):
        resolve_device(device)
    with pytest.warns(UserWarning, match=f"{name} is not available here"):
        assert inference_device(device) == torch.device("cpu")


def test_unsupported_device_type_is_named():
    with pytest.raises(ValueError, match="'meta' is not supported; use 'auto'"):
        resolve_device("meta")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs no MPS")
def test_estimator_with_unavailable_device_raises_clearly():
    from sklearn.datasets import load_digits

    from skquant import DeepQuantizer

    X, y = load_digits(return_X_y=True)
    with pytest.raises(ValueError, match="Apple MPS is not available"):
        DeepQuantizer(n_codebooks=2, n_codewords=4, max_iter=1,
                      device="mps").fit(X[:40], y[:40])


def test_hidden_layer_sizes_next_to_a_backbone_warns():
    from sklearn.datasets import load_digits

    from skquant import DeepQuantizer

    X, y = load_digits(return_X_y=True)
    common = dict(n_codebooks=2, n_codewords=4, max_iter=1, random_state=0,
                  backbone=torch.nn.Linear(64, 16))
    with pytest.warns(UserWarning, match=r"hidden_layer_sizes=\(32,\) is ignored"):
        DeepQuantizer(hidden_layer_sizes=(32,), **common).fit(X[:40], y[:40])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DeepQuantizer(**common).fit(X[:40], y[:40])  # default: no warning


def test_verbose_lines_show_progress_and_time_left(capsys):
    from sklearn.datasets import load_digits

    from skquant import DeepQuantizer

    X, y = load_digits(return_X_y=True)
    DeepQuantizer(n_codebooks=2, n_codewords=4, max_iter=3, warmup_epochs=1,
                  random_state=0, verbose=1).fit(X[:60], y[:60])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " epoch " in ln]
    assert [ln.split(",")[0] for ln in lines] == [
        f"[DeepQuantizer] epoch {e}/3" for e in (1, 2, 3)
    ]
    assert all("elapsed = " in ln and "left ~ " in ln for ln in lines)
    assert lines[-1].endswith("left ~ 0.0s")


def test_torch_rng_context_reproducible_and_restores_global_stream():
    torch.manual_seed(123)
    reference = torch.rand(3)
    torch.manual_seed(123)
    with torch_rng_context(torch_seed(0)):
        a = torch.rand(4)
    after = torch.rand(3)
    assert torch.equal(after, reference)  # caller's stream untouched
    with torch_rng_context(torch_seed(0)):
        b = torch.rand(4)
    assert torch.equal(a, b)
    with torch_rng_context(torch_seed(1)):
        c = torch.rand(4)
    assert not torch.equal(a, c)


def test_torch_seed_from_random_state():
    assert torch_seed(0) == torch_seed(0)
    rs = np.random.RandomState(0)
    assert torch_seed(rs) != torch_seed(rs)  # an instance advances


# --------------------------------------------------------------------------- #
# data helpers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n, b", [(10, 3), (10, 5), (1, 4), (7, 6), (9, 4)])
def test_iter_minibatches_partition(n, b):
    batches = list(iter_minibatches(n, b, make_generator(0)))
    allidx = torch.cat(batches).numpy()
    assert_array_equal(np.sort(allidx), np.arange(n))
    if n > 1:
        assert all(len(x) >= 2 for x in batches)  # no singleton batch
    again = torch.cat(list(iter_minibatches(n, b, make_generator(0)))).numpy()
    assert_array_equal(allidx, again)


def test_prepare_labels():
    assert_array_equal(prepare_labels(np.array(["b", "a", "b"])).numpy(), [1, 0, 1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        prepare_labels(np.zeros(5))
    with pytest.raises(ValueError, match="requires y to be passed"):
        prepare_labels(None)
    with pytest.warns(UserWarning, match="unique"):
        prepare_labels(np.arange(4))
    Y = np.array([[1, 0], [1, 1], [1, 0]])
    with pytest.raises(ValueError, match="shared by every sample"):
        prepare_labels(Y)
    out = prepare_labels(np.array([[1, 0], [0, 1], [1, 1]]))
    assert out.dtype == torch.float32 and out.shape == (3, 2)


def test_check_input_shape():
    assert check_input_shape(None, 5) is None
    assert check_input_shape([1, 2, 3], 6) == (1, 2, 3)
    with pytest.raises(ValueError, match="product of input_shape"):
        check_input_shape((3, 8, 8), 64)


def _shifted(image, dy, dx):
    """numpy reference: ``image`` (C, H, W) moved down dy, right dx, 0 fill."""
    out = np.zeros_like(image)
    H, W = image.shape[-2:]
    src_y, dst_y = slice(max(-dy, 0), H - max(dy, 0)), slice(max(dy, 0), H - max(-dy, 0))
    src_x, dst_x = slice(max(-dx, 0), W - max(dx, 0)), slice(max(dx, 0), W - max(-dx, 0))
    out[:, dst_y, dst_x] = image[:, src_y, src_x]
    return out


def test_random_shift_is_an_exact_translation_of_each_image():
    # Every output image is the input moved by one whole-pixel (dy, dx) with
    # |dy|, |dx| <= 2 and zeros moved in; strictly positive distinct inputs
    # make the shift that matches unique.
    shape = (2, 7, 9)
    rng = np.random.RandomState(0)
    X = rng.uniform(1.0, 2.0, size=(200, 2 * 7 * 9)).astype(np.float32)
    out = random_shift(torch.from_numpy(X), shape, generator=make_generator(0)).numpy()
    assert out.shape == X.shape and out.dtype == X.dtype
    seen = set()
    for x, o in zip(X.reshape(-1, *shape), out.reshape(-1, *shape), strict=True):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(o, _shifted(x, dy, dx))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 25  # every shift in [-2, 2]^2 is drawn
    # Reproducible for a seeded generator; no shift returns the input.
    again = random_shift(torch.from_numpy(X), shape, generator=make_generator(0))
    assert np.array_equal(again.numpy(), out)
    assert torch.equal(random_shift(torch.from_numpy(X), shape, max_shift=0),
                       torch.from_numpy(X))


# --------------------------------------------------------------------------- #
# networks
# --------------------------------------------------------------------------- #
def test_standardization_matches_standard_scaler():
    rng = np.random.RandomState(0)
    X = rng.normal(loc=5.0, scale=3.0, size=(50, 4))
    X[:, 2] = 7.0  # constant feature keeps scale 1
    net = build_embedding_network(X, embedding_dim=2, hidden_layer_sizes=())
    got = net.standardize(torch.as_tensor(X, dtype=torch.float32)).numpy()
    assert_allclose(got, StandardScaler().fit_transform(X), atol=1e-5)


def test_standardization_per_channel_with_input_shape():
    rng = np.random.RandomState(0)
    X = np.hstack([rng.normal(1, 2, size=(20, 4)), rng.normal(-3, 5, size=(20, 4))])
    net = build_embedding_network(
        X, embedding_dim=2, hidden_layer_sizes=(), input_shape=(2, 2, 2))
    out = net.standardize(torch.as_tensor(X, dtype=torch.float32)).numpy()
    for c in range(2):
        block = out[:, 4 * c : 4 * (c + 1)]
        assert block.mean() == pytest.approx(0, abs=1e-5)
        assert block.std() == pytest.approx(1, abs=1e-5)


def test_user_backbone_conv_with_input_shape_and_not_modified():
    X = np.random.RandomState(0).rand(6, 2 * 4 * 4).astype(np.float32)
    backbone = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3), nn.ReLU())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch_rng_context(0):
        net = build_embedding_network(
            X, embedding_dim=5, backbone=backbone, input_shape=(2, 4, 4))
    assert net.head.in_features == 3 * 2 * 2
    assert net.backbone is not backbone
    out = embed(net, X, "cpu", batch_size=4)
    assert out.shape == (6, 5) and out.dtype == np.float32
    assert np.all(np.abs(out) <= 1)  # tanh
    # train the copy; the user's module must not change
    opt = make_optimizer(net, learning_rate=0.1)
    net(torch.as_tensor(X)).sum().backward()
    opt.step()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k])


def test_backbone_error_is_clear():
    X = np.zeros((4, 12), dtype=np.float32)
    with pytest.raises(ValueError, match="backbone failed"):
        build_embedding_network(X, embedding_dim=2,
                                backbone=nn.Conv2d(5, 1, 1), input_shape=(3, 2, 2))
    with pytest.raises(ValueError, match="product of input_shape"):
        build_embedding_network(X, embedding_dim=2, input_shape=(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        build_embedding_network(X, embedding_dim=2, backbone="resnet")


def test_l2_output_is_unit_norm():
    X = np.random.RandomState(0).normal(size=(10, 3))
    net = build_embedding_network(X, embedding_dim=4, output="l2")
    Z = embed(net, X, "cpu")
    assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)


def test_make_optimizer_learning_rates():
    net = EmbeddingNetwork(build_mlp(3, (4,)), nn.Linear(4, 2))
    opt = make_optimizer(net, learning_rate=1e-2, backbone_learning_rate=1e-4)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-4, 1e-2]
    sizes = {g["lr"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert sizes[1e-2] == 4 * 2 + 2 and sizes[1e-4] == 3 * 4 + 4
    frozen = make_optimizer(net, learning_rate=1e-2, backbone_learning_rate=0.0)
    assert len(frozen.param_groups) == 1
    assert not any(p.requires_grad for p in net.backbone.parameters())


def test_frozen_backbone_stays_in_eval_mode():
    net = EmbeddingNetwork(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)
    )
    net.train()
    assert net.backbone.training and not net.backbone_frozen
    make_optimizer(net, learning_rate=1e-2, backbone_learning_rate=0.0)
    assert net.backbone_frozen
    net.train()
    assert net.training and net.head.training and not net.backbone.training
    before = net.backbone[1].running_mean.clone()
    net(torch.randn(8, 3) + 5.0)
    assert torch.equal(net.backbone[1].running_mean, before)
    # a parameter-free backbone is not "frozen": dropout inside it still works
    free = EmbeddingNetwork(nn.Dropout(0.5), nn.Linear(3, 2)).train()
    assert free.backbone.training


def test_embed_batch_invariant_and_restores_mode():
    X = np.random.RandomState(0).normal(size=(33, 6))
    net = build_embedding_network(X, embedding_dim=3, dropout=0.5)
    net.train()
    a = embed(net, X, "cpu", batch_size=7)
    b = embed(net, X, "cpu", batch_size=100)
    assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # dropout off in eval mode
    with torch.no_grad():
        net.eval()
        ref = net(torch.as_tensor(X, dtype=torch.float32)).numpy()
        net.train()
    assert_allclose(a, ref, rtol=1e-6, atol=1e-7)
    assert net.training


# --------------------------------------------------------------------------- #
# training loop
# --------------------------------------------------------------------------- #
def _toy_problem(seed=0, epochs=5, **kwargs):
    rng = np.random.RandomState(0)
    X = np.vstack([rng.normal(-2, 1, size=(40, 4)), rng.normal(2, 1, size=(40, 4))])
    y = np.repeat([0, 1], 40)
    labels = prepare_labels(y)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    with torch_rng_context(torch_seed(seed)):
        net = build_embedding_network(X, embedding_dim=4, hidden_layer_sizes=(8,),
                                      dropout=0.2)
        opt = make_optimizer(net, learning_rate=kwargs.pop("learning_rate", 1e-2))
        gen = make_generator(torch_seed(seed))

        def batch_loss(idx):
            z = net(Xt[idx])
            loss = pairwise_cosine_loss(z, label_similarity(labels[idx]))
            return loss, {"similarity": float(loss.detach())}

        history = []
        n = train_epochs(net, opt, len(X), batch_loss, max_iter=epochs,
                         batch_size=16, generator=gen, history=history, **kwargs)
    return net, history, n, X


def test_train_epochs_learns_reproducibly(capsys):
    net, history, n, X = _toy_problem(verbose=1, estimator_name="Toy")
    assert n == 5 and [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < history[0]["loss"]
    assert set(history[0]) == {"epoch", "loss", "similarity", "time"}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 5 and out[0].startswith("[Toy] epoch 1/5, loss = ")
    net2, history2, _, _ = _toy_problem()
    assert_array_equal(embed(net, X, "cpu"), embed(net2, X, "cpu"))  # bit-identical
    assert [h["loss"] for h in history] == [h["loss"] for h in history2]
    net3, _, _, _ = _toy_problem(seed=1)
    assert not np.array_equal(embed(net, X, "cpu"), embed(net3, X, "cpu"))


def test_train_epochs_weight_averaging_is_mean_of_last_epoch_ends():
    # Independent computation: the weights at the end of epochs 3, 4 and 5 of
    # the same seeded run without averaging, averaged by hand
    # (5 epochs, weight_averaging=0.5 -> the last ceil(2.5) = 3 epochs).
    net_avg, _, n, X = _toy_problem(epochs=5, weight_averaging=0.5)
    assert n == 5
    ends = [_toy_problem(epochs=epochs)[0].state_dict() for epochs in (3, 4, 5)]
    for key, value in net_avg.state_dict().items():
        expected = torch.stack([e[key].to(torch.float64) for e in ends]).mean(0)
        assert_allclose(value.to(torch.float64).numpy(), expected.numpy(), rtol=1e-5,
                        atol=1e-6, err_msg=key)
    net_plain = _toy_problem(epochs=5)[0]
    assert not np.array_equal(embed(net_avg, X, "cpu"), embed(net_plain, X, "cpu"))
    # 0 keeps the last step's weights exactly.
    net_zero = _toy_problem(epochs=5, weight_averaging=0.0)[0]
    assert_array_equal(embed(net_zero, X, "cpu"), embed(net_plain, X, "cpu"))


def test_train_epochs_non_finite_loss_raises_clear_error():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def batch_loss(idx):
        return net(torch.ones(len(idx), 2)).sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="smaller learning_rate"):
        train_epochs(net, opt, 8, batch_loss, max_iter=2, batch_size=4,
                     generator=make_generator(0))


def test_train_epochs_keyboard_interrupt_keeps_last_epoch():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = {"n": 0}
    states = []

    def batch_loss(idx):
        calls["n"] += 1
        if calls["n"] == 6:  # second batch of epoch 3
            raise KeyboardInterrupt
        return (net(torch.ones(len(idx), 2)) ** 2).mean(), {}

    def on_epoch_begin(epoch):
        states.append({k: v.clone() for k, v in net.state_dict().items()})

    history = []
    with pytest.warns(UserWarning, match="interrupted during epoch 3"):
        n = train_epochs(net, opt, 8, batch_loss, max_iter=5, batch_size=4,
                         generator=make_generator(0), history=history,
                         on_epoch_begin=on_epoch_begin)
    assert n == 2 and len(history) == 2
    for k, v in net.state_dict().items():  # state at the start of epoch 3
        assert torch.equal(v, states[2][k])


def test_network_pickles_and_gives_same_embedding():
    net, _, _, X = _toy_problem(epochs=1)
    net2 = pickle.loads(pickle.dumps(net))
    assert_array_equal(embed(net, X, "cpu"), embed(net2, X, "cpu"))


def test_no_warnings_from_plain_training():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _toy_problem(epochs=1)


# --------------------------------------------------------------------------- #
# sparse input: densified one batch at a time
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("input_shape", [None, (2, 3, 2)])
def test_sparse_training_data_matches_dense(input_shape):
    import scipy.sparse as sp

    from skquant._deep._torch import (
        _standardization_stats,
        build_embedding_network,
        embed,
        minibatch,
        training_rows,
    )

    rng = np.random.RandomState(0)
    X = rng.rand(40, 12) * (rng.rand(40, 12) < 0.3)
    X_sparse = sp.csr_matrix(X)
    for a, b in zip(_standardization_stats(X, input_shape),
                    _standardization_stats(X_sparse, input_shape), strict=True):
        assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    idx = torch.tensor([5, 0, 39, 5])
    assert torch.equal(minibatch(training_rows(X), idx, "cpu"),
                       minibatch(training_rows(X_sparse), idx, "cpu"))
    torch.manual_seed(0)
    net = build_embedding_network(X, embedding_dim=3, hidden_layer_sizes=(8,))
    assert_array_equal(embed(net, X, "cpu", 7), embed(net, X_sparse, "cpu", 7))
    assert_array_equal(embed(net, X, "cpu", 7), embed(net, X_sparse.tocsc(), "cpu", 40))
