"""Tests for skquant.datasets: the loaders and the retrieval split."""

import gzip
import importlib.util
import os
import pickle
import struct

import numpy as np
import pytest
from scipy import sparse

import skquant.datasets
from skquant.datasets import (
    _base,
    load_cifar10,
    load_fashion_mnist,
    load_yeast,
    retrieval_split,
)
from skquant.datasets._base import FASHION_MNIST_CLASSES


# --------------------------------------------------------------------------- #
# Fashion-MNIST IDX files
# --------------------------------------------------------------------------- #
def _idx_bytes(array):
    """Serialise a uint8 array in the IDX format, independently of the loader."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.tobytes()


def _write_idx(path, array, compress):
    raw = _idx_bytes(array)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def _write_fashion(folder, rng, n_train=7, n_test=4, compress=(True,) * 4):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for (name, array), gz in zip(arrays.items(), compress, strict=True):
        _write_idx(folder / name, array, gz)
    return {name: a.astype(np.uint8) for name, a in arrays.items()}


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """Hide SKQUANT_DATA and the Debian folder so only data_home is searched."""
    monkeypatch.delenv("SKQUANT_DATA", raising=False)
    monkeypatch.setattr(
        _base, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package"
    )


@pytest.mark.parametrize(
    "compress",
    [(True,) * 4, (False,) * 4, (True, False, False, True)],
    ids=["gz", "raw", "mixed"],
)
def test_fashion_mnist_idx_round_trip(tmp_path, no_default_data, compress):
    rng = np.random.default_rng(0)
    arrays = _write_fashion(tmp_path, rng, compress=compress)
    bunch = load_fashion_mnist(tmp_path)

    images = np.concatenate(
        [arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]]
    )
    labels = np.concatenate(
        [arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]]
    )
    assert bunch.data.shape == (11, 784) and bunch.data.dtype == np.uint8
    np.testing.assert_array_equal(bunch.images, images)
    np.testing.assert_array_equal(bunch.data, images.reshape(11, -1))
    np.testing.assert_array_equal(bunch.target, labels)
    assert bunch.target.dtype == np.int64
    np.testing.assert_array_equal(bunch.is_test, np.arange(11) >= 7)
    assert bunch.target_names == list(FASHION_MNIST_CLASSES)
    assert len(bunch.feature_names) == 784 and bunch.feature_names[29] == "pixel_1_1"
    assert bunch.data_home == str(tmp_path)
    assert "Fashion-MNIST" in bunch.DESCR
    assert bunch.data.flags.writeable

    X, y = load_fashion_mnist(str(tmp_path), return_X_y=True)
    np.testing.assert_array_equal(X, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    env_root = tmp_path / "env"
    env_arrays = _write_fashion(env_root / "fashion-mnist", rng, n_train=3)
    home_arrays = _write_fashion(tmp_path / "home", rng, n_train=5)
    monkeypatch.setenv("SKQUANT_DATA", str(env_root))
    monkeypatch.setattr(_base, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "none")

    # data_home wins over SKQUANT_DATA ...
    bunch = load_fashion_mnist(tmp_path / "home")
    np.testing.assert_array_equal(
        bunch.target[:5], home_arrays["train-labels-idx1-ubyte"]
    )
    # ... an empty data_home falls through to SKQUANT_DATA/fashion-mnist.
    (tmp_path / "empty").mkdir()
    for home in (None, tmp_path / "empty"):
        bunch = load_fashion_mnist(home)
        assert bunch.data_home == str(env_root / "fashion-mnist")
        np.testing.assert_array_equal(
            bunch.target[:3], env_arrays["train-labels-idx1-ubyte"]
        )


def test_fashion_mnist_missing_message(tmp_path, no_default_data):
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_fashion_mnist(empty)
    message = str(excinfo.value)
    assert str(empty) in message
    assert str(tmp_path / "no-debian-package") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data_home" in message and "t10k-images-idx3-ubyte" in message

    # A folder with some files only: the message names the missing ones.
    _write_fashion(empty, np.random.default_rng(0))
    os.remove(empty / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        load_fashion_mnist(empty)


def _corrupt(path, how):
    raw = _idx_bytes(np.zeros((4, 28, 28), np.uint8))
    if how == "truncated":
        path.write_bytes(raw[:-10])
    elif how == "trailing":
        path.write_bytes(raw + b"\x00")
    elif how == "magic":
        path.write_bytes(b"\x00\x00\x42\x03" + raw[4:])
    elif how == "gzip-cut":
        path = path.with_name(path.name + ".gz")
        compressed = gzip.compress(raw)
        path.write_bytes(compressed[: len(compressed) // 2])
    elif how == "not-gzip":
        path = path.with_name(path.name + ".gz")
        path.write_bytes(raw)
    return path


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncated", "is truncated"),
        ("trailing", "trailing bytes"),
        ("magic", "bad magic number 0x00004203"),
        ("gzip-cut", "truncated or corrupt"),
        ("not-gzip", "not a valid gzip file"),
    ],
)
def test_fashion_mnist_corrupt_file(tmp_path, no_default_data, how, match):
    _write_fashion(tmp_path, np.random.default_rng(0), compress=(False,) * 4)
    target = tmp_path / "train-images-idx3-ubyte"
    os.remove(target)
    bad = _corrupt(target, how)
    with pytest.raises(ValueError, match=match) as excinfo:
        load_fashion_mnist(tmp_path)
    assert str(bad) in str(excinfo.value)


def test_fashion_mnist_inconsistent_files(tmp_path, no_default_data):
    rng = np.random.default_rng(0)
    _write_fashion(tmp_path, rng, compress=(False,) * 4)
    # Fewer labels than images.
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3), compress=False)
    with pytest.raises(ValueError, match="holds 7 images but .* holds 3 labels"):
        load_fashion_mnist(tmp_path)
    # An image file where the labels belong.
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((7, 2, 2)), False)
    with pytest.raises(ValueError, match="does not hold labels"):
        load_fashion_mnist(tmp_path)
    # A label outside 0..9.
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(7, 10), False)
    with pytest.raises(ValueError, match="Fashion-MNIST labels are 0..9"):
        load_fashion_mnist(tmp_path)


def _debian_fashion_mnist_present():
    folder = _base.DEBIAN_FASHION_MNIST_DIR
    return all(
        (folder / n).is_file() or (folder / f"{n}.gz").is_file()
        for n in _base._FASHION_MNIST_FILES.values()
    )


def test_fashion_mnist_real_data(monkeypatch):
    if not _debian_fashion_mnist_present():
        pytest.skip(
            "Fashion-MNIST not installed in /usr/share/datasets/fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    monkeypatch.delenv("SKQUANT_DATA", raising=False)
    bunch = load_fashion_mnist()
    assert bunch.data.shape == (70000, 784) and bunch.data.dtype == np.uint8
    assert bunch.images.shape == (70000, 28, 28)
    assert bunch.is_test.sum() == 10000 and not bunch.is_test[:60000].any()
    # Balanced classes: 6,000 per class in train, 1,000 in test.
    np.testing.assert_array_equal(np.bincount(bunch.target[:60000]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(bunch.target[60000:]), [1000] * 10)
    # First labels of each file as published (train: 9 0 0 3 0; test: 9 2 1 1 6)
    # and the mean training intensity 0.2860 * 255 used by common normalisations.
    np.testing.assert_array_equal(bunch.target[:5], [9, 0, 0, 3, 0])
    np.testing.assert_array_equal(bunch.target[60000:60005], [9, 2, 1, 1, 6])
    assert bunch.target_names[bunch.target[0]] == "Ankle boot"
    assert bunch.data[:60000].mean() / 255 == pytest.approx(0.2860, abs=1e-4)


# --------------------------------------------------------------------------- #
# CIFAR-10 python batches
# --------------------------------------------------------------------------- #
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
               b"frog", b"horse", b"ship", b"truck"]  # fmt: skip


def _write_cifar(folder, rng, n_per_batch=3, protocol=2):
    """Write tiny batches in the cifar-10-batches-py format; return the HWC
    images and labels in loader order (5 training batches, then test)."""
    folder.mkdir(parents=True, exist_ok=True)
    all_images, all_labels = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        hwc = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        # The format: each row holds the red plane, then green, then blue.
        data = np.stack(
            [hwc[i, :, :, c].ravel() for i in range(n_per_batch) for c in range(3)]
        ).reshape(n_per_batch, 3072)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        all_images.append(hwc)
        all_labels += labels
    meta = {b"label_names": CIFAR_NAMES, b"num_cases_per_batch": n_per_batch,
            b"num_vis": 3072}  # fmt: skip
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return np.concatenate(all_images), np.array(all_labels)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_round_trip(tmp_path, protocol, parent):
    folder = tmp_path / "cifar-10-batches-py"
    images, labels = _write_cifar(folder, np.random.default_rng(0), protocol=protocol)
    bunch = load_cifar10(tmp_path if parent else folder)

    assert bunch.data.shape == (18, 3072) and bunch.data.dtype == np.uint8
    np.testing.assert_array_equal(bunch.target, labels)
    assert bunch.target.dtype == np.int64
    np.testing.assert_array_equal(bunch.images, images)  # HWC view
    # CHW order: data.reshape(-1, 3, 32, 32) is the channel-first image.
    np.testing.assert_array_equal(
        bunch.data.reshape(-1, 3, 32, 32), images.transpose(0, 3, 1, 2)
    )
    np.testing.assert_array_equal(bunch.is_test, np.arange(18) >= 15)
    assert bunch.target_names == [n.decode() for n in CIFAR_NAMES]
    assert "CIFAR-10" in bunch.DESCR

    X, y = load_cifar10(str(folder), return_X_y=True)
    np.testing.assert_array_equal(X, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, np.random.default_rng(0))
    os.remove(folder / "data_batch_3")
    # Given the parent, the message names the sub-folder and the missing file.
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py: data_batch_3"):
        load_cifar10(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(
    "replace, match",
    [
        ({b"data": _Evil()}, "refusing to load global"),
        ({b"data": np.zeros((3, 3071), np.uint8)}, r"shape \(n, 3072\)"),
        ({b"data": np.zeros((3, 3072), np.float32)}, "must be a uint8 array"),
        ({b"labels": [0, 1]}, "'labels' must be 3 integers"),
        ({b"labels": [0, 1, 10]}, r"labels must lie in 0..9"),
        ({b"labels": None, "drop": b"labels"}, "has no b'labels' entry"),
    ],
)
def test_cifar10_bad_batch(tmp_path, replace, match):
    _write_cifar(tmp_path, np.random.default_rng(0))
    with open(tmp_path / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    replace = dict(replace)
    drop = replace.pop("drop", None)
    batch.update(replace)
    if drop is not None:
        del batch[drop]
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=match) as excinfo:
        load_cifar10(tmp_path)
    assert "data_batch_2" in str(excinfo.value)


# --------------------------------------------------------------------------- #
# Yeast (inside river)
# --------------------------------------------------------------------------- #
def test_yeast_shapes():
    if importlib.util.find_spec("river") is None:
        pytest.skip("river is not installed (pip install river)")
    bunch = load_yeast()
    assert bunch.data.shape == (2417, 103) and bunch.data.dtype == np.float64
    assert bunch.target.shape == (2417, 14)
    assert set(np.unique(bunch.target)) == {0, 1}
    assert bunch.target.sum(axis=1).min() >= 1
    # 4.24 labels per gene on average (MULAN's statistics for Yeast).
    assert bunch.target.sum(axis=1).mean() == pytest.approx(4.237, abs=1e-3)
    assert bunch.feature_names[0] == "Att1" and bunch.target_names[-1] == "Class14"
    # First row of the CSV (checked by reading it here independently).
    path = _base._yeast_path()
    with gzip.open(path, "rt") as f:
        f.readline()
        first = np.array(f.readline().split(","), dtype=float)
    np.testing.assert_array_equal(bunch.data[0], first[:103])
    np.testing.assert_array_equal(bunch.target[0], first[103:])
    X, Y = load_yeast(return_X_y=True)
    np.testing.assert_array_equal(Y, bunch.target)


def test_yeast_without_river(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "river" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install river"):
        load_yeast()


# --------------------------------------------------------------------------- #
# retrieval_split
# --------------------------------------------------------------------------- #
def _check_partition(n, query, train, database, mode):
    for idx in (query, train, database):
        assert idx.dtype == np.intp
        np.testing.assert_array_equal(idx, np.unique(idx))  # sorted, no repeats
    assert np.intersect1d(query, train).size == 0
    assert np.intersect1d(query, database).size == 0
    if mode == "rest":
        np.testing.assert_array_equal(np.union1d(query, database), np.arange(n))
        assert np.isin(train, database).all()
    else:
        assert np.intersect1d(train, database).size == 0
        np.testing.assert_array_equal(
            np.union1d(np.union1d(query, train), database), np.arange(n)
        )


@pytest.mark.parametrize("database", ["rest", "rest_without_train"])
def test_retrieval_split_per_class(database):
    rng = np.random.default_rng(0)
    # Uneven class sizes, string labels.
    y = rng.permutation(np.repeat(np.array(["cat", "dog", "emu"]), [40, 25, 60]))
    query, train, db = retrieval_split(
        y, n_query=4, n_train=6, database=database, random_state=0
    )
    _check_partition(len(y), query, train, db, database)
    for label in ("cat", "dog", "emu"):
        assert (y[query] == label).sum() == 4
        assert (y[train] == label).sum() == 6
    assert len(db) == (125 - 12 if database == "rest" else 125 - 30)


def test_retrieval_split_determinism():
    y = np.repeat(np.arange(5), 30)
    a = retrieval_split(y, n_query=3, n_train=5, random_state=42)
    b = retrieval_split(y, n_query=3, n_train=5, random_state=42)
    c = retrieval_split(y, n_query=3, n_train=5, random_state=43)
    for x, z in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, z)
    assert not np.array_equal(a[0], c[0])
    # The database mode does not change the draw.
    d = retrieval_split(
        y, n_query=3, n_train=5, database="rest_without_train", random_state=42
    )
    np.testing.assert_array_equal(a[0], d[0])
    np.testing.assert_array_equal(a[1], d[1])


def test_retrieval_split_covers_each_class_uniformly():
    # Every item of a class is equally likely to be a query: over many seeds
    # each of the 10 items of class 0 is drawn about 2/10 of the time.
    y = np.repeat([0, 1], 10)
    counts = np.zeros(20)
    for seed in range(400):
        query, _, _ = retrieval_split(y, n_query=2, n_train=3, random_state=seed)
        counts[query] += 1
    np.testing.assert_allclose(counts / 400, 0.2, atol=0.07)


@pytest.mark.parametrize("database", ["rest", "rest_without_train"])
def test_retrieval_split_totals(database):
    y = np.repeat(np.arange(3), [50, 5, 45])
    query, train, db = retrieval_split(
        y, n_query=10, n_train=20, per_class=False, database=database, random_state=0
    )
    assert len(query) == 10 and len(train) == 20
    _check_partition(100, query, train, db, database)


def test_retrieval_split_multilabel():
    rng = np.random.default_rng(0)
    Y = (rng.random((300, 6)) < [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]).astype(int)
    Y[:10] = 0  # items without any label
    query, train, db = retrieval_split(Y, n_query=2, n_train=3, random_state=0)
    _check_partition(300, query, train, db, "rest")
    assert len(query) == 12 and len(train) == 18
    # Each label got its quota of items that carry it.
    assert (Y[query].sum(axis=0) >= 2).all()
    assert (Y[train].sum(axis=0) >= 3).all()
    # Unlabelled items are never drawn.
    assert np.isin(np.arange(10), db).all()
    # Sparse indicator: the same split.
    sparse_split = retrieval_split(
        sparse.csr_matrix(Y), n_query=2, n_train=3, random_state=0
    )
    np.testing.assert_array_equal(sparse_split[0], query)
    np.testing.assert_array_equal(sparse_split[1], train)
    # Totals mode on multi-label y.
    query, train, db = retrieval_split(
        Y, n_query=7, n_train=9, per_class=False, random_state=0
    )
    assert len(query) == 7 and len(train) == 9


def test_retrieval_split_multilabel_rarest_first():
    # Label 1 (items 0..5) is nested in label 0 (items 0..9). Drawing label 0
    # first could leave label 1 fewer than 5 items; rarest first never does.
    Y = np.zeros((12, 2), dtype=int)
    Y[:10, 0] = 1
    Y[:6, 1] = 1
    for seed in range(20):
        query, train, _ = retrieval_split(Y, n_query=2, n_train=3, random_state=seed)
        taken = np.union1d(query, train)
        assert len(taken) == 10 and set(taken) == set(range(10))
        assert Y[query, 1].sum() >= 2 and Y[train, 1].sum() >= 3


def test_retrieval_split_errors():
    y = np.array(["a"] * 10 + ["b"] * 3)
    with pytest.raises(ValueError, match="class 'b' has 3 items available"):
        retrieval_split(y, n_query=2, n_train=2)
    with pytest.raises(ValueError, match="database is empty"):
        retrieval_split(np.repeat([0, 1], 3), n_query=3, n_train=0)
    with pytest.raises(ValueError, match="database is empty"):
        retrieval_split(
            np.repeat([0, 1], 3), n_query=1, n_train=2, database="rest_without_train"
        )
    with pytest.raises(ValueError, match="exceeds the number of samples"):
        retrieval_split(y, n_query=10, n_train=4, per_class=False)
    Y = np.zeros((12, 2), dtype=int)
    Y[:10, 0] = 1
    Y[:4, 1] = 1
    with pytest.raises(ValueError, match=r"label \(column\) 1 has 4 items"):
        retrieval_split(Y, n_query=2, n_train=3)
    with pytest.raises(ValueError, match="0/1 label indicator"):
        retrieval_split(np.full((5, 2), 2), n_query=1, n_train=0)
    with pytest.raises(ValueError, match="got 3-D"):
        retrieval_split(np.zeros((4, 2, 2)), n_query=1, n_train=0)
    with pytest.raises(ValueError, match="database"):
        retrieval_split(y, n_query=1, n_train=1, database="all")
    with pytest.raises(ValueError, match="n_query"):
        retrieval_split(y, n_query=0, n_train=1)


# --------------------------------------------------------------------------- #
# The public namespace
# --------------------------------------------------------------------------- #
def test_public_namespace_holds_only_the_loaders():
    # Regression: the module used to expose np, os, gzip, pickle, ... to tab
    # completion. Only the names of __all__ (and private ones) may be visible.
    public = ["load_cifar10", "load_fashion_mnist", "load_yeast", "retrieval_split"]
    assert sorted(skquant.datasets.__all__) == public
    assert dir(skquant.datasets) == public
    visible = sorted(n for n in vars(skquant.datasets) if not n.startswith("_"))
    assert visible == public
    for name in public:
        assert callable(getattr(skquant.datasets, name))
    namespace = {}
    exec("from skquant.datasets import *", namespace)
    assert sorted(n for n in namespace if n != "__builtins__") == public
