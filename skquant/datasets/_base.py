"""The loaders and the retrieval split; the public face is :mod:`skquant.datasets`."""

import gzip
import importlib.util
import os
import pickle
import struct
import zlib
from numbers import Integral
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.utils import Bunch, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

# Where Debian's ``dataset-fashion-mnist`` package puts the four IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_FASHION_MNIST_DESCR = """\
Fashion-MNIST
=============

Zalando's article images: 70,000 grey-scale 28x28 images of 10 clothing classes
(7,000 per class), split by the authors into 60,000 training and 10,000 test
images. Rows ``0..59999`` of ``data`` are the training file, rows
``60000..69999`` the test file (``is_test`` marks them).

:Number of instances: 70,000 (60,000 train + 10,000 test)
:Number of attributes: 784 pixel intensities, uint8 in [0, 255]
:Classes: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker,
    Bag, Ankle boot
:Source: https://github.com/zalandoresearch/fashion-mnist (MIT licence);
    Debian package ``dataset-fashion-mnist``.

Reference: H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST: a Novel Image Dataset
for Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017.
"""

_CIFAR10_DESCR = """\
CIFAR-10
========

60,000 colour 32x32 images of 10 classes (6,000 per class), split by the
authors into 50,000 training images (``data_batch_1`` .. ``data_batch_5``, in
that order) and 10,000 test images (``test_batch``, last; ``is_test`` marks
them). Each row of ``data`` is 3072 uint8 values in channel-first order: the
1024 red values of the 32x32 image in row-major order, then green, then blue,
so ``data.reshape(-1, 3, 32, 32)`` gives (N, C, H, W) images and
``input_shape=(3, 32, 32)`` feeds a convolutional backbone directly.

The DQN/DSQ protocol merges all 60,000 images and draws 100 queries and 500
training images per class (:func:`skquant.datasets.retrieval_split`).

Reference: A. Krizhevsky. Learning Multiple Layers of Features from Tiny
Images. Technical report, University of Toronto, 2009.
"""

_YEAST_DESCR = """\
Yeast (multi-label)
===================

Micro-array expression and phylogenetic profiles of 2,417 yeast genes, each
annotated with a subset of 14 functional classes (4.24 labels per gene on
average). This is the MULAN version (OpenML id 40597), read from the copy that
ships inside the ``river`` package.

:Number of instances: 2,417
:Number of attributes: 103 real-valued features
:Labels: 14 (``target`` is the (2417, 14) 0/1 indicator matrix)

Two genes are relevant to each other in retrieval when they share at least one
label.

Reference: A. Elisseeff, J. Weston. A kernel method for multi-labelled
classification. NeurIPS 2001.
"""

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- #
# IDX files (Fashion-MNIST)
# --------------------------------------------------------------------------- #
def _read_idx(path):
    """Read one IDX file (raw or gzip-compressed) into an ndarray.

    Raises ValueError naming the file when the header is not IDX or when the
    payload size does not match the header (truncated or corrupt file).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        # A cut-off download gives EOFError; a non-gzip file BadGzipFile.
        raise ValueError(
            f"{path} is not a valid gzip file ({exc}); the file is truncated or "
            "corrupt. Reinstall it (apt-get install --reinstall "
            "dataset-fashion-mnist) or copy it again."
        ) from exc

    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(raw)} bytes.")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 followed by a type byte and the number of "
            "dimensions, e.g. 0x00000803 for images)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: the IDX header is incomplete.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "corrupt (trailing bytes)"
        raise ValueError(
            f"{path} is {kind}: the header announces shape {shape} "
            f"({expected} bytes of data) but the file holds {got} bytes."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx_files(folder):
    """Return {key: path} for the 4 Fashion-MNIST files in folder, and the
    list of the base names that are missing. Uncompressed files win over .gz
    (no decompression needed)."""
    found, missing = {}, []
    for key, name in _FASHION_MNIST_FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def _fashion_mnist_candidates(data_home):
    """Folders to search, in order: data_home, $SKQUANT_DATA, Debian's folder.

    data_home and $SKQUANT_DATA may hold the files directly or in a
    ``fashion-mnist`` sub-folder (so one data root serves several sets).
    """
    candidates = []
    for root in (data_home, os.environ.get("SKQUANT_DATA") or None):
        if root is not None:
            root = Path(root).expanduser()
            candidates += [root, root / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST_DIR)
    return candidates


def _check_idx_pair(images, labels, images_path, labels_path):
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path} does not hold images: expected an unsigned-byte "
            f"3-D IDX file (magic 0x00000803), got {images.ndim} dimension(s) "
            f"of {images.dtype}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path} does not hold labels: expected an unsigned-byte "
            f"1-D IDX file (magic 0x00000801), got {labels.ndim} dimension(s) "
            f"of {labels.dtype}."
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} "
            f"holds {labels.shape[0]} labels."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{labels_path} holds label {labels.max()}; Fashion-MNIST labels "
            f"are 0..{len(FASHION_MNIST_CLASSES) - 1}."
        )


@validate_params(
    {"data_home": [str, os.PathLike, None], "return_X_y": ["boolean"]},
    prefer_skip_nested_validation=True,
)
def load_fashion_mnist(data_home=None, *, return_X_y=False):
    """Load the Fashion-MNIST image classification set (70,000 images, 10 classes).

    Reads the original IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (each either uncompressed or gzipped with a ``.gz`` suffix). Nothing is
    downloaded. The folders searched, in order, are:

    1. ``data_home`` (or its ``fashion-mnist`` sub-folder), when given;
    2. the folder named by the ``SKQUANT_DATA`` environment variable (or its
       ``fashion-mnist`` sub-folder), when set;
    3. ``/usr/share/datasets/fashion-mnist/``, where the Debian package
       ``dataset-fashion-mnist`` installs the files
       (``apt-get install dataset-fashion-mnist``).

    The first folder holding all four files is used.

    Parameters
    ----------
    data_home : str or path-like, default=None
        A folder holding the four IDX files.

    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        data : ndarray of shape (70000, 784), dtype uint8
            The pixel intensities in [0, 255], one flattened 28x28 image a
            row: the 60,000 training images first, then the 10,000 test
            images. Kept as uint8 (55 MB rather than 439 MB in float64);
            convert with ``data.astype(np.float32) / 255`` before fitting.
        target : ndarray of shape (70000,), dtype int64
            The class index of each image, in 0..9.
        images : ndarray of shape (70000, 28, 28), dtype uint8
            The same pixels as 2-D images (a view of ``data``).
        is_test : ndarray of shape (70000,), dtype bool
            True for the rows that come from the authors' test files.
        feature_names : list of str
            ``"pixel_<row>_<col>"`` for the 784 columns.
        target_names : list of str
            The 10 class names, indexed by ``target``.
        data_home : str
            The folder the files were read from.
        DESCR : str
            A description of the data set.

    (data, target) : tuple if ``return_X_y`` is True
        The two arrays described above.

    Raises
    ------
    FileNotFoundError
        When no searched folder holds all four files; the message lists the
        folders searched and how to get the data.
    ValueError
        When a file is truncated or is not a valid IDX file.

    See Also
    --------
    retrieval_split : The query / training / database split of the
        deep-quantization protocol.

    Examples
    --------
    >>> from skquant.datasets import load_fashion_mnist
    >>> fmnist = load_fashion_mnist()  # doctest: +SKIP
    >>> fmnist.data.shape, fmnist.data.dtype  # doctest: +SKIP
    ((70000, 784), dtype('uint8'))
    >>> fmnist.target_names[fmnist.target[0]]  # doctest: +SKIP
    'Ankle boot'
    >>> int(fmnist.is_test.sum())  # doctest: +SKIP
    10000
    """
    searched, partial = [], []
    for folder in _fashion_mnist_candidates(data_home):
        if folder in searched:
            continue
        searched.append(folder)
        if not folder.is_dir():
            continue
        files, missing = _find_idx_files(folder)
        if not missing:
            break
        if len(missing) < len(_FASHION_MNIST_FILES):
            partial.append(f"{folder} lacks {', '.join(missing)}")
    else:
        details = "".join(f"\n  - {p}" for p in partial)
        raise FileNotFoundError(
            "Fashion-MNIST IDX files not found. Searched: "
            + ", ".join(str(f) for f in searched)
            + "."
            + (f" Incomplete folders:{details}" if details else "")
            + "\nNothing is downloaded. Get the data with `apt-get install "
            "dataset-fashion-mnist` (Debian/Ubuntu, installs into "
            f"{DEBIAN_FASHION_MNIST_DIR}), or pass data_home= (or set "
            "SKQUANT_DATA to) a folder holding train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            "t10k-labels-idx1-ubyte (each optionally .gz) from "
            "https://github.com/zalandoresearch/fashion-mnist."
        )

    parts = {key: _read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        _check_idx_pair(
            parts[f"{split}_images"],
            parts[f"{split}_labels"],
            files[f"{split}_images"],
            files[f"{split}_labels"],
        )
    if parts["train_images"].shape[1:] != parts["test_images"].shape[1:]:
        raise ValueError(
            f"Training images are {parts['train_images'].shape[1:]} but test "
            f"images are {parts['test_images'].shape[1:]}."
        )

    height, width = parts["train_images"].shape[1:]
    n_train, n_test = len(parts["train_labels"]), len(parts["test_labels"])
    # np.concatenate copies, so the result is writable (frombuffer is not).
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    data = images.reshape(n_train + n_test, height * width)
    target = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(
        np.int64
    )
    if return_X_y:
        return data, target

    is_test = np.zeros(n_train + n_test, dtype=bool)
    is_test[n_train:] = True
    return Bunch(
        data=data,
        target=target,
        images=images,
        is_test=is_test,
        feature_names=[f"pixel_{i}_{j}" for i in range(height) for j in range(width)],
        target_names=list(FASHION_MNIST_CLASSES),
        data_home=str(folder),
        DESCR=_FASHION_MNIST_DESCR,
    )


# --------------------------------------------------------------------------- #
# CIFAR-10 python batches
# --------------------------------------------------------------------------- #
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")

# Globals a CIFAR-10 batch may reference: numpy array reconstruction (the
# original Python 2 files use numpy.core.multiarray._reconstruct; files
# re-pickled by numpy 2 use numpy._core, protocol 5 uses _frombuffer) and
# _codecs.encode, which Python 3 uses to pickle bytes at protocol <= 2.
_CIFAR10_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(
        (f"{numpy_core}.multiarray", name)
        for numpy_core in ("numpy.core", "numpy._core")
        for name in ("_reconstruct", "scalar")
    ),
    *(
        (f"{numpy_core}.numeric", "_frombuffer")
        for numpy_core in ("numpy.core", "numpy._core")
    ),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers.

    A pickle can run arbitrary code on load; CIFAR-10 batches never need more
    than numpy arrays, so anything else is refused.
    """

    def find_class(self, module, name):
        if (module, name) in _CIFAR10_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a CIFAR-10 batch only "
            "holds numpy arrays, lists, bytes and numbers."
        )


def _load_cifar_pickle(path):
    try:
        with open(path, "rb") as f:
            # The original files were written by Python 2: keys and strings
            # are byte strings, hence encoding="bytes".
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} is not a valid CIFAR-10 python batch ({exc})."
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} is not a valid CIFAR-10 python batch: expected a dict, "
            f"got {type(obj).__name__}."
        )
    return obj


def _get_key(batch, key, path):
    # Accept str keys too (files re-pickled by Python 3 code).
    for k in (key, key.decode()):
        if k in batch:
            return batch[k]
    raise ValueError(f"{path} has no {key!r} entry (keys: {sorted(map(str, batch))}).")


def _resolve_cifar10_folder(path):
    path = Path(path).expanduser()
    for folder in (path, path / "cifar-10-batches-py"):
        if folder.is_dir() and all((folder / f).is_file() for f in _CIFAR10_FILES):
            return folder
    folder = (
        path / "cifar-10-batches-py"
        if (path / "cifar-10-batches-py").is_dir()
        else path
    )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 folder {path} does not exist. Pass the folder that holds "
            f"{', '.join(_CIFAR10_FILES)} (the cifar-10-batches-py folder of "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) "
            "or the folder that contains cifar-10-batches-py. Nothing is downloaded."
        )
    missing = [f for f in _CIFAR10_FILES if not (folder / f).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 python batches missing in {folder}: {', '.join(missing)}. "
        f"Pass the folder that holds {', '.join(_CIFAR10_FILES)} (the "
        "cifar-10-batches-py folder of cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html) or the folder that "
        "contains cifar-10-batches-py. Nothing is downloaded."
    )


@validate_params(
    {"path": [str, os.PathLike], "return_X_y": ["boolean"]},
    prefer_skip_nested_validation=True,
)
def load_cifar10(path, *, return_X_y=False):
    """Load a local copy of CIFAR-10 (the "python version" batches).

    Reads ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
    ``batches.meta`` as distributed in ``cifar-10-python.tar.gz``. Nothing is
    downloaded. Only numpy arrays, lists, bytes and numbers are unpickled; a
    file that references anything else is refused.

    Parameters
    ----------
    path : str or path-like
        The ``cifar-10-batches-py`` folder, or the folder that contains it.

    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        data : ndarray of shape (n_samples, 3072), dtype uint8
            One image a row, channel-first: 1024 red, 1024 green, 1024 blue
            values, each 32x32 plane in row-major order, so
            ``data.reshape(-1, 3, 32, 32)`` is (N, C, H, W) and estimators
            take ``input_shape=(3, 32, 32)``. The five training batches come
            first (in order), then the test batch. Kept as uint8; convert with
            ``data.astype(np.float32) / 255`` before fitting.
        target : ndarray of shape (n_samples,), dtype int64
            The class index of each image.
        images : ndarray of shape (n_samples, 32, 32, 3), dtype uint8
            The same pixels, height x width x channel for
            ``matplotlib.pyplot.imshow`` (a view of ``data``).
        is_test : ndarray of shape (n_samples,), dtype bool
            True for the rows of ``test_batch``.
        target_names : list of str
            The class names from ``batches.meta``, indexed by ``target``.
        DESCR : str
            A description of the data set.

    (data, target) : tuple if ``return_X_y`` is True
        The two arrays described above.

    Raises
    ------
    FileNotFoundError
        When the folder or one of the seven files is missing.
    ValueError
        When a file is not a valid batch (wrong layout, sizes or labels).

    See Also
    --------
    retrieval_split : The query / training / database split; the DQN protocol
        on CIFAR-10 draws 100 queries and 500 training images per class.

    Examples
    --------
    >>> from skquant.datasets import load_cifar10, retrieval_split
    >>> cifar = load_cifar10("~/data/cifar-10-batches-py")  # doctest: +SKIP
    >>> cifar.data.shape  # doctest: +SKIP
    (60000, 3072)
    >>> query, train, database = retrieval_split(
    ...     cifar.target, n_query=100, n_train=500, random_state=0
    ... )  # doctest: +SKIP
    >>> len(query), len(train), len(database)  # doctest: +SKIP
    (1000, 5000, 59000)
    """
    folder = _resolve_cifar10_folder(path)

    meta_path = folder / "batches.meta"
    names = _get_key(_load_cifar_pickle(meta_path), b"label_names", meta_path)
    target_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if not target_names:
        raise ValueError(f"{meta_path} lists no label names.")

    datas, targets, is_test = [], [], []
    for name in (*_CIFAR10_TRAIN_BATCHES, "test_batch"):
        batch_path = folder / name
        batch = _load_cifar_pickle(batch_path)
        data = np.asarray(_get_key(batch, b"data", batch_path))
        labels = np.asarray(_get_key(batch, b"labels", batch_path))
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise ValueError(
                f"{batch_path}: 'data' must be a uint8 array of shape (n, 3072), "
                f"got {data.dtype} {data.shape}."
            )
        if labels.shape != (data.shape[0],) or (
            labels.size and not np.issubdtype(labels.dtype, np.integer)
        ):
            raise ValueError(
                f"{batch_path}: 'labels' must be {data.shape[0]} integers, got "
                f"{labels.dtype} {labels.shape}."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(target_names)):
            raise ValueError(
                f"{batch_path}: labels must lie in 0..{len(target_names) - 1} "
                f"(batches.meta lists {len(target_names)} names)."
            )
        datas.append(data)
        targets.append(labels.astype(np.int64))
        is_test.append(np.full(len(labels), name == "test_batch"))

    data = np.concatenate(datas)
    target = np.concatenate(targets)
    if return_X_y:
        return data, target
    return Bunch(
        data=data,
        target=target,
        images=data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
        is_test=np.concatenate(is_test),
        target_names=target_names,
        DESCR=_CIFAR10_DESCR,
    )


# --------------------------------------------------------------------------- #
# Yeast (inside the river package)
# --------------------------------------------------------------------------- #
_YEAST_N_FEATURES = 103
_YEAST_N_LABELS = 14


def _yeast_path():
    # find_spec locates river without importing it (importing river.datasets
    # costs over a second).
    spec = importlib.util.find_spec("river")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "load_yeast reads the Yeast set shipped inside the optional "
            "dependency river, which is not installed: pip install river"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "yeast.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "river is installed but holds no datasets/yeast.csv.gz (searched "
        f"{list(spec.submodule_search_locations)}); install a river release "
        "that ships it (pip install 'river>=0.22')."
    )


@validate_params({"return_X_y": ["boolean"]}, prefer_skip_nested_validation=True)
def load_yeast(*, return_X_y=False):
    """Load the multi-label Yeast gene-function set (2417 genes, 14 labels).

    Reads ``river/datasets/yeast.csv.gz`` from the installed ``river``
    package (an optional dependency: ``pip install river``); nothing is
    downloaded.

    Parameters
    ----------
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        data : ndarray of shape (2417, 103), dtype float64
            The expression and phylogenetic-profile features.
        target : ndarray of shape (2417, 14), dtype int64
            The 0/1 label indicator matrix (every gene has at least one
            label); relevance in retrieval is "shares at least one label".
        feature_names : list of str
            ``"Att1"`` .. ``"Att103"``.
        target_names : list of str
            ``"Class1"`` .. ``"Class14"``.
        DESCR : str
            A description of the data set.

    (data, target) : tuple if ``return_X_y`` is True
        The two arrays described above.

    Raises
    ------
    ImportError
        When river is not installed.

    See Also
    --------
    retrieval_split : The query / training / database split, also for
        multi-label targets.

    Examples
    --------
    >>> from skquant.datasets import load_yeast
    >>> X, Y = load_yeast(return_X_y=True)  # doctest: +SKIP
    >>> X.shape, Y.shape  # doctest: +SKIP
    ((2417, 103), (2417, 14))
    """
    path = _yeast_path()
    with gzip.open(path, "rt", encoding="ascii") as f:
        columns = f.readline().strip().split(",")
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    expected = [f"Att{i}" for i in range(1, _YEAST_N_FEATURES + 1)] + [
        f"Class{i}" for i in range(1, _YEAST_N_LABELS + 1)
    ]
    if columns != expected or table.shape[1] != len(expected):
        raise ValueError(
            f"{path} does not have the expected layout (103 columns Att1..Att103 "
            "then 14 columns Class1..Class14); the installed river release ships "
            "a different file."
        )
    data = np.ascontiguousarray(table[:, :_YEAST_N_FEATURES])
    labels = table[:, _YEAST_N_FEATURES:]
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: the label columns must hold only 0 and 1.")
    target = labels.astype(np.int64)
    if return_X_y:
        return data, target
    return Bunch(
        data=data,
        target=target,
        feature_names=columns[:_YEAST_N_FEATURES],
        target_names=columns[_YEAST_N_FEATURES:],
        DESCR=_YEAST_DESCR,
    )


# --------------------------------------------------------------------------- #
# The query / training / database split
# --------------------------------------------------------------------------- #
def _label_members(y):
    """Indices of the items carrying each label, in drawing order.

    Returns (members, names, multilabel, n_samples). Single-label: classes in sorted
    order. Multi-label: labels from the rarest to the most frequent (ties by
    column), so that rare labels get their quota before the frequent labels
    use up their items.
    """
    if sparse.issparse(y):
        y = y.toarray()
    y = np.asarray(y)
    if y.ndim == 1:
        if y.shape[0] == 0:
            raise ValueError("y is empty.")
        classes, inverse = np.unique(y, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        return np.split(order, bounds), classes.tolist(), False, y.shape[0]
    if y.ndim == 2:
        if y.shape[0] == 0 or y.shape[1] == 0:
            raise ValueError(f"y is empty (shape {y.shape}).")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(
                "A 2-D y must be a 0/1 label indicator matrix (multi-label); "
                "pass a 1-D array for single-label targets."
            )
        y = y.astype(bool)
        counts = y.sum(axis=0)
        order = np.argsort(counts, kind="stable")
        members = [np.flatnonzero(y[:, j]) for j in order]
        return members, [int(j) for j in order], True, y.shape[0]
    raise ValueError(f"y must be 1-D labels or a 2-D indicator matrix, got {y.ndim}-D.")


@validate_params(
    {
        "y": ["array-like", "sparse matrix"],
        "n_query": [Interval(Integral, 1, None, closed="left")],
        "n_train": [Interval(Integral, 0, None, closed="left")],
        "per_class": ["boolean"],
        "database": [StrOptions({"rest", "rest_without_train"})],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def retrieval_split(
    y, *, n_query, n_train, per_class=True, database="rest", random_state=None
):
    """Draw the query / training / database split of the retrieval protocol.

    Deep quantization and hashing papers (DQN, AAAI 2016; DSQ, CVPR 2019)
    evaluate on one labelled pool, split three ways: *query* items are
    searched for, *training* items fit the model, and the *database* is what
    is encoded and searched. On CIFAR-10 (60,000 images, all 10 classes) the
    protocol draws 100 queries and 500 training images per class
    (``n_query=100, n_train=500``); the database is every non-query image,
    training images included (59,000 images, ``database="rest"``, the 2016
    DQN/DHN protocol) or the non-query, non-training images (54,000 images,
    ``database="rest_without_train"``, the later DeepHash library).

    Parameters
    ----------
    y : array-like of shape (n_samples,) or (n_samples, n_labels)
        Class labels (any type), or a 0/1 label indicator matrix (dense or
        sparse) for multi-label data.

    n_query : int
        Number of query items: per class (or label) when ``per_class`` is
        True, in total otherwise. At least 1.

    n_train : int
        Number of training items, per class (or label) when ``per_class`` is
        True, in total otherwise. May be 0.

    per_class : bool, default=True
        If True, draw ``n_query`` then ``n_train`` distinct items from each
        class. For multi-label ``y`` the labels are visited from the rarest to
        the most frequent, and each draws its items among those that carry it
        and were not taken by a rarer label; every label is thus represented
        by ``n_query`` queries and ``n_train`` training items, and the totals
        are ``n_labels * n_query`` and ``n_labels * n_train`` (the NUS-WIDE
        protocol: 100 queries and 500 training images per concept). Items
        with no label are never drawn and stay in the database. If False,
        draw ``n_query`` queries and ``n_train`` training items uniformly at
        random from all items (the MIRFlickr protocol: 1,000 and 4,000).

    database : {"rest", "rest_without_train"}, default="rest"
        ``"rest"``: every item that is not a query (training items
        included). ``"rest_without_train"``: every item that is neither a
        query nor a training item.

    random_state : int, RandomState instance or None, default=None
        Seed of the draw; pass an int for a reproducible split.

    Returns
    -------
    query_idx : ndarray of shape (n_query_total,), dtype intp
        Sorted indices of the query items.

    train_idx : ndarray of shape (n_train_total,), dtype intp
        Sorted indices of the training items, disjoint from ``query_idx``.

    database_idx : ndarray of shape (n_database,), dtype intp
        Sorted indices of the database items, disjoint from ``query_idx``
        (and from ``train_idx`` when ``database="rest_without_train"``).

    Raises
    ------
    ValueError
        When a class (or label) has fewer than ``n_query + n_train`` items
        left to draw from, or when the database would be empty.

    See Also
    --------
    load_fashion_mnist : Fashion-MNIST, 70,000 images of 10 classes.
    load_cifar10 : A local copy of CIFAR-10.
    load_yeast : The multi-label Yeast set (14 labels).

    Examples
    --------
    >>> import numpy as np
    >>> from skquant.datasets import retrieval_split
    >>> y = np.repeat([0, 1, 2], 10)
    >>> query, train, database = retrieval_split(
    ...     y, n_query=2, n_train=3, random_state=0
    ... )
    >>> np.bincount(y[query]), np.bincount(y[train])
    (array([2, 2, 2]), array([3, 3, 3]))
    >>> len(database)  # every non-query item
    24
    >>> _, _, database = retrieval_split(
    ...     y, n_query=2, n_train=3, database="rest_without_train", random_state=0
    ... )
    >>> len(database)
    15
    """
    rng = check_random_state(random_state)
    members, names, multilabel, n_samples = _label_members(y)
    need = n_query + n_train

    if per_class:
        taken = np.zeros(n_samples, dtype=bool)
        queries, trains = [], []
        for name, items in zip(names, members, strict=True):
            # Single-label classes are disjoint, so this only filters for
            # multi-label y (items already drawn for a rarer label).
            available = items[~taken[items]]
            if len(available) < need:
                what = "label (column)" if multilabel else "class"
                extra = (
                    f" ({len(items)} carry it, the others were drawn for rarer labels)"
                    if multilabel and len(available) < len(items)
                    else ""
                )
                raise ValueError(
                    f"{what} {name!r} has {len(available)} items available"
                    f"{extra}, fewer than n_query + n_train = {need}. Lower "
                    "n_query or n_train, or use per_class=False."
                )
            drawn = rng.choice(available, size=need, replace=False)
            queries.append(drawn[:n_query])
            trains.append(drawn[n_query:])
            taken[drawn] = True
        query_idx = np.concatenate(queries)
        train_idx = np.concatenate(trains)
    else:
        if need > n_samples:
            raise ValueError(
                f"n_query + n_train = {need} exceeds the number of samples "
                f"({n_samples})."
            )
        drawn = rng.choice(n_samples, size=need, replace=False)
        query_idx, train_idx = drawn[:n_query], drawn[n_query:]

    excluded = np.zeros(n_samples, dtype=bool)
    excluded[query_idx] = True
    if database == "rest_without_train":
        excluded[train_idx] = True
    database_idx = np.flatnonzero(~excluded)
    if database_idx.size == 0:
        raise ValueError(
            f"The database is empty: all {n_samples} samples are queries"
            + (" or training items" if database == "rest_without_train" else "")
            + ". Lower n_query or n_train."
        )
    return (
        np.sort(query_idx).astype(np.intp, copy=False),
        np.sort(train_idx).astype(np.intp, copy=False),
        database_idx.astype(np.intp, copy=False),
    )
