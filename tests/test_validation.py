"""Bad input: every estimator fails early with an error that names the problem.

One parametrized test per row of the table of issue 8, run for every
estimator the row applies to. Each case asserts the exception type *and* a
fragment of its message, so an obscure failure deep inside numpy or torch
(or a silent NaN) fails the test. Inputs are never modified in place.
"""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from scipy import sparse
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from skquant import DeepQuantizer, ProductQuantizer
from skquant._deep._dsq import SphericalQuantizer

N_SAMPLES = 120

# Tiny, fast settings: these tests check validation, not quality.
FACTORIES = {
    "PQ": lambda **kw: ProductQuantizer(
        **{"n_codebooks": 4, "n_codewords": 8, "random_state": 0, **kw}
    ),
    "DQN": lambda **kw: DeepQuantizer(
        **{
            "n_codebooks": 2, "n_codewords": 8, "embedding_dim": 8,
            "hidden_layer_sizes": (16,), "max_iter": 2, "warmup_epochs": 1,
            "batch_size": 64, "device": "cpu", "random_state": 0, **kw,
        }
    ),
    "DSQ": lambda **kw: SphericalQuantizer(
        **{
            "n_codebooks": 2, "n_codewords": 8, "embedding_dim": 8,
            "hidden_layer_sizes": (16,), "max_iter": 2, "warmup_epochs": 1,
            "batch_size": 64, "device": "cpu", "random_state": 0, **kw,
        }
    ),
}
ALL = list(FACTORIES)
DEEP = ["DQN", "DSQ"]
# Estimators whose codebooks are cut into sub-spaces ("product" layout).
PRODUCT = ["PQ", "DQN"]


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    return X[:N_SAMPLES], y[:N_SAMPLES]


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    return {name: make().fit(X, y) for name, make in FACTORIES.items()}


def _n_codebooks(est):
    return est.codebooks_.shape[0]


# --------------------------------------------------------------------------
# X: values
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "value, message", [(np.nan, "contains NaN"), (np.inf, "contains infinity")]
)
def test_non_finite_X_at_fit(name, value, message, data):
    X, y = data
    X = X.copy()
    X[3, 5] = value
    with pytest.raises(ValueError, match=message):
        FACTORIES[name]().fit(X, y)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("method", ["transform", "encode", "kneighbors", "index"])
@pytest.mark.parametrize(
    "value, message", [(np.nan, "contains NaN"), (-np.inf, "contains infinity")]
)
def test_non_finite_X_after_fit(name, method, value, message, data, fitted):
    X, _ = data
    Xq = X[:5].copy()
    Xq[1, 2] = value
    est = fitted[name]
    codes = est.codes_
    with pytest.raises(ValueError, match=message):
        getattr(est, method)(Xq)
    assert est.codes_ is codes  # a refused index() leaves the database alone


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("method", ["fit", "kneighbors", "transform"])
def test_values_beyond_float32_range(name, method, data, fitted):
    # Finite in float64, but skquant computes in float32: 1e39 would become
    # inf, then NaN tables and garbage codes. The error must say so.
    X, y = data
    X_big = X * 1e39
    est = FACTORIES[name]() if method == "fit" else fitted[name]
    with pytest.raises(ValueError, match="float32"):
        if method == "fit":
            est.fit(X_big, y)
        else:
            getattr(est, method)(X_big[:3])


# --------------------------------------------------------------------------
# X: shape
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "method", ["transform", "encode", "kneighbors", "index", "add", "score"]
)
def test_wrong_n_features_after_fit(name, method, data, fitted):
    X, y = data
    est = fitted[name]
    args = (X[:5, :10], y[:5]) if method in ("add", "score") else (X[:5, :10],)
    with pytest.raises(ValueError, match="X has 10 features, but .* is expecting 64"):
        getattr(est, method)(*args)


@pytest.mark.parametrize("name", ALL)
def test_1d_X(name, data, fitted):
    X, y = data
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        FACTORIES[name]().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        fitted[name].kneighbors(X[0])


@pytest.mark.parametrize("name", ALL)
def test_empty_X(name, data, fitted):
    X, y = data
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        FACTORIES[name]().fit(X[:0], y[:0])
    with pytest.raises(ValueError, match=r"0 feature\(s\)"):
        FACTORIES[name]().fit(X[:, :0], y)
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        fitted[name].kneighbors(X[:0])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse_X_is_accepted_and_equals_dense(name, fmt, data, fitted):
    # As NearestNeighbors: sparse X in every public method, densified one
    # bounded chunk (or mini-batch) at a time, never whole.
    X, y = data
    dense = fitted[name]
    Xs = sparse.csr_matrix(X).asformat(fmt)
    first = sparse.csr_matrix(X[:20]).asformat(fmt)
    for method in ("transform", "encode"):
        assert_array_equal(getattr(dense, method)(first),
                           getattr(dense, method)(X[:20]))
    for a, b in zip(dense.kneighbors(sparse.csr_matrix(X[:7]).asformat(fmt), 4),
                    dense.kneighbors(X[:7], 4), strict=True):
        assert_array_equal(a, b)
    # Training on sparse X gives the model of the dense X (for the networks:
    # bitwise; k-means on CSR may round differently, so PQ is compared by
    # its search through both inputs).
    est = FACTORIES[name]().fit(Xs, y)
    if name != "PQ":
        assert_array_equal(est.codes_, dense.codes_)
    assert_array_equal(est.kneighbors(first, 3)[1], est.kneighbors(X[:20], 3)[1])


@pytest.mark.parametrize("name", ALL)
def test_string_X(name, data, fitted):
    X, y = data
    X_str = np.full(X.shape, "a", dtype=object)
    with pytest.raises(ValueError, match="could not convert string to float"):
        FACTORIES[name]().fit(X_str, y)
    with pytest.raises(ValueError, match="could not convert string to float"):
        fitted[name].kneighbors(X_str[:2])


@pytest.mark.parametrize("name", ALL)
def test_object_X(name, data, fitted):
    X, y = data
    # Numbers stored as objects (e.g. a pandas object column) are converted...
    est = fitted[name]
    assert_array_equal(
        est.kneighbors(X[:4].astype(object), n_neighbors=3)[1],
        est.kneighbors(X[:4], n_neighbors=3)[1],
    )
    # ... and a missing value (None) is reported as such.
    X_none = X.astype(object)
    X_none[2, 3] = None
    with pytest.raises(ValueError, match="contains NaN"):
        FACTORIES[name]().fit(X_none, y)


@pytest.mark.parametrize("name", ALL)
def test_complex_X(name, data):
    X, y = data
    with pytest.raises(ValueError, match="Complex data not supported"):
        FACTORIES[name]().fit(X + 1j, y)


# --------------------------------------------------------------------------
# y
@pytest.mark.parametrize("name", DEEP)
def test_y_with_one_class(name, data):
    X, _ = data
    with pytest.raises(ValueError, match="at least 2 classes"):
        FACTORIES[name]().fit(X, np.zeros(N_SAMPLES))
    # Multi-label: one label on every row -> every pair is similar.
    Y = np.ones((N_SAMPLES, 3), dtype=int)
    Y[:, 1:] = 0
    with pytest.raises(ValueError, match="shared by every sample"):
        FACTORIES[name]().fit(X, Y)


def test_y_with_one_class_unsupervised_pq(data):
    # ProductQuantizer ignores y for learning (only keeps it for score()).
    X, y = data
    one = ProductQuantizer(4, 8, random_state=0).fit(X, np.zeros(N_SAMPLES))
    none = ProductQuantizer(4, 8, random_state=0).fit(X)
    assert_array_equal(one.codes_, none.codes_)
    assert one.score(X[:5], np.zeros(5)) == pytest.approx(1.0)


def _assert_finite_fit(est, X):
    for record in est.history_:
        for key, value in record.items():
            assert np.isfinite(value), (key, record)
    assert np.isfinite(est.transform(X)).all()
    dist, _ = est.kneighbors(X[:5], n_neighbors=3)
    assert np.isfinite(dist).all()


@pytest.mark.parametrize("name", DEEP)
def test_y_all_items_dissimilar_warns_and_stays_finite(name, data):
    # The pairwise losses have no positive pair: warn, never return NaN.
    X, _ = data
    est = FACTORIES[name]()
    with pytest.warns(UserWarning, match="no two samples are similar"):
        est.fit(X, np.arange(N_SAMPLES))
    _assert_finite_fit(est, X)


@pytest.mark.parametrize("name", DEEP)
def test_multilabel_y_no_shared_label_warns_and_stays_finite(name, data):
    X, _ = data
    est = FACTORIES[name]()
    with pytest.warns(UserWarning, match="no pair is similar"):
        est.fit(X, np.zeros((N_SAMPLES, 4), dtype=int))
    _assert_finite_fit(est, X)


@pytest.mark.parametrize("name", DEEP)
def test_multilabel_y_with_all_zero_rows(name, data):
    # Items without any label are dissimilar to every item; training and
    # search stay finite, and score() treats them as having no relevant item.
    X, y = data
    Y = np.zeros((N_SAMPLES, 3), dtype=int)
    Y[np.arange(N_SAMPLES), y % 3] = 1
    Y[::4] = 0
    Y_orig = Y.copy()
    est = FACTORIES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit(X, Y)
    assert_array_equal(Y, Y_orig)
    _assert_finite_fit(est, X)
    score = est.score(X[:8], Y[:8])
    assert 0.0 <= score <= 1.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("method", ["fit", "index", "add", "score"])
def test_y_length_mismatch(name, method, data, fitted):
    X, y = data
    if name == "PQ" and method == "fit":
        pytest.skip("unsupervised fit ignores y, as NearestNeighbors.fit does "
                    "(tests/test_nn_contract.py)")
    est = FACTORIES[name]() if method == "fit" else fitted[name]
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples|y has 9 samples but X has 10"):
        getattr(est, method)(X[:10], y[:9])


@pytest.mark.parametrize("name", ALL)
def test_y_2d_not_an_indicator(name, data, fitted):
    X, _ = data
    # Unsupervised fit ignores a y that is no labels; index() stores labels
    # and refuses it for every estimator.
    est = FACTORIES[name]() if name != "PQ" else fitted[name]
    method = est.fit if name != "PQ" else est.index
    with pytest.raises(ValueError, match="0/1"):
        method(X, np.full((N_SAMPLES, 3), 3))
    with pytest.raises(ValueError, match="1-D labels or a 2-D indicator"):
        method(X, np.zeros((N_SAMPLES, 2, 2)))


# --------------------------------------------------------------------------
# Hyper-parameters against the data
@pytest.mark.parametrize("name", PRODUCT)
def test_n_codebooks_must_divide_dimension(name, data):
    X, y = data
    with pytest.raises(ValueError, match="n_codebooks=3 must divide|divisible by n_codebooks=3"):
        FACTORIES[name](n_codebooks=3).fit(X, y)


@pytest.mark.parametrize("name", ALL)
def test_n_codewords_larger_than_n_samples(name, data):
    # One rule for every estimator (DSQ used to train silently, repeating
    # codewords): the codebooks start from k-means.
    X, y = data
    with pytest.raises(ValueError, match="n_codewords=64 is larger than .* n_samples=30"):
        FACTORIES[name](n_codewords=64).fit(X[:30], y[:30])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_neighbors", [0, -1])
def test_n_neighbors_not_positive(name, n_neighbors, data, fitted):
    X, y = data
    with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
        fitted[name].kneighbors(X[:3], n_neighbors=n_neighbors)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
        fitted[name].kneighbors_graph(X[:3], n_neighbors=n_neighbors)
    with pytest.raises(InvalidParameterError, match="'n_neighbors' parameter"):
        FACTORIES[name](n_neighbors=n_neighbors).fit(X, y)


@pytest.mark.parametrize("name", ALL)
def test_n_neighbors_not_an_integer(name, data, fitted):
    X, _ = data
    with pytest.raises(TypeError, match="n_neighbors does not take"):
        fitted[name].kneighbors(X[:3], n_neighbors=2.0)


@pytest.mark.parametrize("name", ALL)
def test_n_neighbors_larger_than_database(name, data, fitted):
    X, _ = data
    est = fitted[name]
    with pytest.raises(ValueError, match="n_neighbors <= n_samples_fit"):
        est.kneighbors(X[:3], n_neighbors=N_SAMPLES + 1)
    # X=None excludes each item itself: at most n_samples_fit - 1 neighbors.
    with pytest.raises(ValueError, match="n_neighbors < n_samples_fit"):
        est.kneighbors(n_neighbors=N_SAMPLES)
    # The limits themselves work: the whole database, each item once.
    ind = est.kneighbors(X[:3], n_neighbors=N_SAMPLES, return_distance=False)
    assert_array_equal(np.sort(ind, axis=1), np.tile(np.arange(N_SAMPLES), (3, 1)))
    ind = est.kneighbors(n_neighbors=N_SAMPLES - 1, return_distance=False)
    assert not (ind == np.arange(N_SAMPLES)[:, None]).any()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "method",
    ["transform", "encode", "decode", "kneighbors", "kneighbors_graph", "index",
     "add", "score", "to_faiss"],
)
def test_unfitted(name, method, data):
    X, y = data
    est = FACTORIES[name]()
    args = {
        "decode": (np.zeros((2, 2), dtype=np.uint8),),
        "add": (X[:2], y[:2]),
        "score": (X[:2], y[:2]),
        "to_faiss": (),
    }.get(method, (X[:2],))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        getattr(est, method)(*args)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "codes, message",
    [
        ("too_large", r"codes must lie in \[0, 7\]"),
        ("negative", r"codes must lie in \[0, 7\]"),
        ("float", "codes must be integers"),
        ("bool", "codes must be integers"),
        ("wrong_width", r"codes must have shape \(n_samples, 2\)|\(n_samples, 4\)"),
        ("1d", r"codes must have shape"),
    ],
)
def test_decode_bad_codes(name, codes, message, fitted):
    est = fitted[name]
    m = _n_codebooks(est)
    bad = {
        "too_large": np.full((2, m), 8),
        "negative": np.full((2, m), -1),
        "float": np.ones((2, m)),
        "bool": np.ones((2, m), dtype=bool),
        "wrong_width": np.zeros((2, m + 1), dtype=np.uint8),
        "1d": np.zeros(m, dtype=np.uint8),
    }[codes]
    with pytest.raises(ValueError, match=message):
        est.decode(bad)


@pytest.mark.parametrize("name", DEEP)
def test_input_shape_incompatible_with_n_features(name, data):
    X, y = data
    with pytest.raises(ValueError, match=r"input_shape=\(1, 7, 7\) holds 49 values .* 64 features"):
        FACTORIES[name](input_shape=(1, 7, 7)).fit(X, y)
    with pytest.raises(ValueError, match="input_shape must hold positive ints"):
        FACTORIES[name](input_shape=(1, -8, -8)).fit(X, y)


# --------------------------------------------------------------------------
# Inputs are never modified in place
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_inputs_not_modified(name, dtype, order, data):
    X, y = data
    X = np.asarray(X, dtype=dtype, order=order)
    Y = np.zeros((N_SAMPLES, 3), dtype=int)
    Y[np.arange(N_SAMPLES), y % 3] = 1
    X_copy, y_copy, Y_copy = X.copy(order="K"), y.copy(), Y.copy()
    est = FACTORIES[name]().fit(X, y)
    codes = est.encode(X[:10])
    codes_copy = codes.copy()
    est.transform(X)
    est.decode(codes)
    est.kneighbors(X[:10], n_neighbors=4)
    est.kneighbors_graph(X[:10], n_neighbors=4)
    est.score(X[:10], y[:10])
    est.index(X, y)
    est.add(X[:10], y[:10])
    est.index(X, Y)
    est.score(X[:10], Y[:10])
    assert_array_equal(X, X_copy)
    assert_array_equal(y, y_copy)
    assert_array_equal(Y, Y_copy)
    assert_array_equal(codes, codes_copy)
    # The estimator keeps no reference to the caller's arrays either.
    assert not np.shares_memory(est.database_labels_, Y)


@pytest.mark.parametrize("name", ALL)
def test_read_only_inputs(name, data):
    # e.g. joblib memory-mapped arrays: no method may need to write to them.
    X, y = data
    X = np.array(X, dtype=np.float32)
    y = np.array(y)
    X.setflags(write=False)
    y.setflags(write=False)
    with warnings.catch_warnings():
        # e.g. torch's "The given NumPy array is not writable" (emitted once
        # per process, so only the first offender in a session is caught).
        warnings.simplefilter("error")
        est = FACTORIES[name]().fit(X, y)
        codes = est.encode(X[:5])
        codes.setflags(write=False)
        est.decode(codes)
        est.kneighbors(X[:5], n_neighbors=3)
        est.add(X[:5], y[:5])
    assert est.n_samples_fit_ == N_SAMPLES + 5
