"""Persistence: pickles round-trip exactly and record the skquant version."""

import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.base import clone as sklearn_clone
from sklearn.datasets import load_digits
from sklearn.exceptions import InconsistentVersionWarning as SklearnVersionWarning

import skquant
from skquant import (
    DeepQuantizer,
    InconsistentVersionWarning,
    ProductQuantizer,
    QuantizedKNeighborsTransformer,
)
from skquant._index import QuantizedIndex


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:400], y[:400]


def _estimators():
    return [
        ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0),
        ProductQuantizer(n_codebooks=4, n_codewords=16, rotation=True, n_rotation_iter=2, random_state=0),
        DeepQuantizer(
            n_codebooks=2, n_codewords=8, embedding_dim=8, hidden_layer_sizes=(16,),
            max_iter=2, warmup_epochs=1, device="cpu", random_state=0,
        ),
        QuantizedKNeighborsTransformer(ProductQuantizer(4, 16, random_state=0), n_neighbors=3),
    ]


def _outputs(est, X):
    if isinstance(est, QuantizedKNeighborsTransformer):
        return [est.transform(X).toarray()]
    return [est.transform(X), est.encode(X), *est.kneighbors(X, n_neighbors=4)]


@pytest.mark.parametrize("est", _estimators(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_round_trip_is_exact(est, dump, digits, tmp_path):
    X, y = digits
    est.fit(X, y)
    if dump == "pickle":
        loaded = pickle.loads(pickle.dumps(est))
    else:
        joblib.dump(est, tmp_path / "model.joblib")
        loaded = joblib.load(tmp_path / "model.joblib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same version: no warning
        loaded = pickle.loads(pickle.dumps(loaded))
    assert "_skquant_version" not in vars(loaded) and "_skquant_version" not in vars(est)
    for a, b in zip(_outputs(est, X[:50]), _outputs(loaded, X[:50]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("est", _estimators(), ids=lambda e: type(e).__name__)
def test_pickle_records_version_and_warns_on_mismatch(est, digits):
    X, y = digits
    est.fit(X, y)
    state = est.__getstate__()
    assert state["_skquant_version"] == skquant.__version__
    state["_skquant_version"] = "0.0.1"
    clone = type(est).__new__(type(est))
    with pytest.warns(InconsistentVersionWarning, match="from skquant version 0.0.1") as record:
        clone.__setstate__(state)
    warning = record[0].message
    assert isinstance(warning, SklearnVersionWarning)  # sklearn's filters apply too
    assert warning.original_skquant_version == "0.0.1"
    assert warning.current_skquant_version == skquant.__version__
    np.testing.assert_array_equal(_outputs(clone, X[:20])[0], _outputs(est, X[:20])[0])


def test_pickle_without_version_warns(digits):
    X, y = digits
    est = ProductQuantizer(4, 16, random_state=0).fit(X)
    state = dict(est.__dict__)  # what an old pickle held
    clone = ProductQuantizer.__new__(ProductQuantizer)
    with pytest.warns(InconsistentVersionWarning, match="version unknown"):
        clone.__setstate__(state)


# Pickles written by skquant before the codebook and index objects existed
# (d3b457b; see tests/data/make_legacy_pickles.py): codebooks_, codes_, ... were
# plain attributes and the inverted file's cells sat in a scan layout.
LEGACY_PICKLES = Path(__file__).parent / "data" / "legacy_0.1.0.dev0.pkl"


@pytest.mark.parametrize("name", ["pq", "opq_ivf", "dqn", "dsq_sparse"])
def test_pickles_from_before_the_index_object_search_the_same(name, monkeypatch):
    saved = pickle.loads(LEGACY_PICKLES.read_bytes())
    assigned = []
    original = QuantizedIndex.assign_cells
    monkeypatch.setattr(
        QuantizedIndex, "assign_cells",
        lambda self, codes: assigned.append(len(codes)) or original(self, codes),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = pickle.loads(saved[name]["pickle"])
    assert isinstance(est.index_, QuantizedIndex)
    assert est.index_.quantizer is est.quantizer_
    # Parameters renamed since (n_subspaces -> n_codebooks, max_epochs ->
    # max_iter) read under today's names; get_params and clone work.
    params = est.get_params()
    assert params["n_codebooks"] == est.quantizer_.n_codebooks
    assert "n_subspaces" not in est.__dict__ and "max_epochs" not in est.__dict__
    if name == "dsq_sparse":
        assert params["loss"] == "dsq"  # the objective it was trained with
    if name == "opq_ivf":
        # Written before residual codes: it holds direct codes, and says so.
        assert params["by_residual"] is False and not est.index_.by_residual
    sklearn_clone(est)
    for got, expected in [
        (est.kneighbors(saved["queries"], n_neighbors=5), saved[name]["kneighbors"]),
        (est.kneighbors(n_neighbors=1), saved[name]["kneighbors_self"]),
    ]:
        # Distances to float32 rounding: the queries' OPQ rotation, networks
        # and tables now run in float64 (batch- and CPU-independent), where
        # the old code used float32 GEMMs, and the tables' float64 sums are
        # summed in one order (left to right) where a BLAS chose its own: a
        # table entry may round to the neighbouring float32. Compared as
        # squared distances (what the tables sum), to float32 rounding of
        # the largest: sqrt would magnify it near 0. The neighbours are the
        # same.
        scale = float(np.max(expected[0] ** 2))
        np.testing.assert_allclose(got[0] ** 2, expected[0] ** 2,
                                   rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_array_equal(got[1], expected[1])
    assert assigned == []  # the inverted file's cells came with the old pickle
    # Saved again, it round-trips in today's format.
    clone = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(
        clone.kneighbors(saved["queries"])[1], est.kneighbors(saved["queries"])[1]
    )
