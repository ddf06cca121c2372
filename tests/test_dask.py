"""A database on a dask cluster (DaskIndex): same results as the in-memory index.

One module-scoped LocalCluster with two worker processes (one thread each);
small data. Every search is compared bit for bit (indices and distances) with
the same estimator indexed with the in-memory array.
"""

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import load_digits

from skquant import (
    DeepQuantizer,
    ProductQuantizer,
    QuantizedKNeighborsTransformer,
    SphericalQuantizer,
    _dask_index,
)
from skquant._dask_index import DaskIndex
from skquant._index import QuantizedIndex

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

FACTORIES = {
    "PQ": lambda **kw: ProductQuantizer(n_codebooks=4, n_codewords=16, random_state=0, **kw),
    "DQN": lambda **kw: DeepQuantizer(
        n_codebooks=4, n_codewords=16, max_iter=3, random_state=0, device="cpu", **kw
    ),
    "DSQ": lambda **kw: SphericalQuantizer(
        n_codebooks=4, n_codewords=16, max_iter=3, random_state=0, device="cpu", **kw
    ),
}
# Uneven chunks, one of them smaller than the neighbors asked for.
CHUNKS = (300, 7, 250, 443)


@pytest.fixture(scope="module")
def client():
    # No work stealing: a task runs where the scheduler placed it (next to
    # its chunk), so the tests can check where work ran whatever the load.
    with dask.config.set({"distributed.scheduler.work-stealing": False}), \
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster, distributed.Client(cluster) as client:
        yield client


def _holders(client, array):
    """Workers holding each chunk of a persisted dask array, by chunk key."""
    futures = distributed.futures_of(array)
    holders = {key: set(workers) for key, workers in client.who_has(futures).items()}
    assert len(holders) == len(futures) == array.npartitions and all(holders.values())
    return holders


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    # The database repeats 200 items (exact ties) across chunks.
    X_db = np.r_[X[:800], X[:200]]
    y_db = np.r_[y[:800], y[:200]]
    return X[:400], y[:400], X_db, y_db, X[1000:1100], y[1000:1100]


@pytest.fixture(scope="module", params=list(FACTORIES))
def fitted(request, digits):
    X, y = digits[:2]
    return request.param, FACTORIES[request.param]().fit(X, y)


def _results(est, queries, k=10):
    """Everything a search answers: many queries (batch kernel), few queries
    (per-query kernel), the database itself, the graph and the score."""
    return [
        *est.kneighbors(queries, n_neighbors=k),
        *est.kneighbors(queries[:3], n_neighbors=k),
        *est.kneighbors(n_neighbors=5),
        est.kneighbors_graph(queries[:20], n_neighbors=4, mode="distance").toarray(),
    ]


def _assert_all_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert_array_equal(x, y)


@pytest.mark.parametrize("n_lists", [None, 12], ids=["exhaustive", "ivf"])
def test_same_results_as_in_memory(client, fitted, digits, n_lists):
    name, est = fitted
    _, _, X_db, y_db, Q, yq = digits
    est.set_params(n_lists=n_lists, n_probe=3)
    est.index(X_db, y_db)
    expected = _results(est, Q)
    expected_score = est.score(Q, yq)
    codes, centroids = est.codes_, est.coarse_centroids_

    est.index(da.from_array(X_db, chunks=(CHUNKS, -1)), da.from_array(y_db, chunks=500))
    assert isinstance(est.index_, DaskIndex)
    # The database lives on the workers, in the chunks of X.
    assert isinstance(est.codes_, da.Array) and est.codes_.chunks[0] == CHUNKS
    assert isinstance(est.database_labels_, da.Array)
    assert est.database_labels_.chunks[0] == CHUNKS
    assert est.n_samples_fit_ == len(X_db)
    # Encoding a chunk on a worker gives the codes of the whole array at once.
    assert_array_equal(est.codes_.compute(), codes)
    assert_array_equal(est.database_labels_.compute(), y_db)
    if n_lists:
        # Cells trained on the same sample of the database.
        assert_array_equal(est.coarse_centroids_, centroids)
    _assert_all_equal(_results(est, Q), expected)
    assert est.score(Q, yq) == expected_score
    est.set_params(n_lists=None)


@pytest.mark.parametrize("rotation", [False, True], ids=["pq", "opq"])
@pytest.mark.parametrize("by_residual", [True, False], ids=["residual", "direct"])
def test_product_ivf_same_results_as_in_memory(client, digits, by_residual, rotation):
    # ProductQuantizer fitted with n_lists: residual codes (the default) are
    # assigned to the model's cells and encoded on the workers, their
    # per-item terms computed there; direct codes keep their own cells.
    X, y, X_db, y_db, Q, yq = digits
    pq = FACTORIES["PQ"](n_lists=12, n_probe=3, by_residual=by_residual,
                         rotation=rotation).fit(X, y)
    pq.index(X_db, y_db)
    assert pq.index_.by_residual == by_residual
    expected = _results(pq, Q)
    expected_all = _results(pq.set_params(n_probe=12), Q)
    expected_score = pq.score(Q, yq)
    codes, cells = pq.codes_, pq.cells_

    Xd = da.from_array(X_db, chunks=(CHUNKS, -1))
    with distributed.get_task_stream(client) as stream:
        pq.index(Xd, y_db)
    # One encoding task per chunk (codes and cells of residual codes together).
    keys = [str(task["key"]) for task in stream.data]
    assert sum("_encode_" in k for k in keys) == len(CHUNKS)
    assert isinstance(pq.index_, DaskIndex) and pq.index_.by_residual == by_residual
    assert_array_equal(pq.codes_.compute(), codes)
    assert isinstance(pq.cells_, da.Array)
    assert_array_equal(pq.cells_.compute(), cells)
    _assert_all_equal(_results(pq, Q), expected_all)
    pq.set_params(n_probe=3)
    _assert_all_equal(_results(pq, Q), expected)
    assert pq.score(Q, yq) == expected_score
    # encode/decode of a dask X: the codes and cells the index stores.
    dcodes, dcells = pq.encode(Xd, return_cells=True)
    assert_array_equal(dcodes.compute(), codes)
    if by_residual:
        assert_array_equal(dcells.compute(), cells)
        assert_array_equal(pq.decode(codes[:50], cells=cells[:50]),
                           pq.decode(dcodes[:50].compute(), cells=dcells[:50].compute()))
    else:
        assert dcells is None


def test_residual_add_pickle_and_back_to_memory(client, digits):
    X, y, X_db, y_db, Q, _ = digits
    pq = FACTORIES["PQ"](n_lists=10, n_probe=2).fit(X, y)
    assert pq.index_.by_residual
    pq.index(X_db, y_db)
    expected = _results(pq, Q)
    # In memory -> cluster by add (the indexed items, with their cells,
    # become the first chunks), then an in-memory add becomes a chunk.
    pq.index(X_db[:500], y_db[:500])
    pq.add(da.from_array(X_db[500:800], chunks=150), y_db[500:800])
    assert isinstance(pq.index_, DaskIndex) and pq.index_.by_residual
    pq.add(X_db[800:], y_db[800:])
    assert pq.n_samples_fit_ == len(X_db) and len(pq.codes_.chunks[0]) > 3
    _assert_all_equal(_results(pq, Q), expected)
    loaded = pickle.loads(pickle.dumps(pq))
    assert type(loaded.index_) is QuantizedIndex and loaded.index_.by_residual
    _assert_all_equal(_results(loaded, Q), expected)
    # Cells are part of the model: not retrained, not replaceable.
    with pytest.raises(ValueError, match="Refit"):
        pq.train_inverted_file()
    with pytest.raises(ValueError, match="cell of every item"):
        pq.codes_ = pq.codes_
    pq.index(X_db, y_db)  # back to memory
    assert type(pq.index_) is QuantizedIndex and pq.index_.by_residual
    _assert_all_equal(_results(pq, Q), expected)


def test_ties_across_chunks_go_to_the_lower_index(client, digits):
    X, y, X_db, *_ = digits
    pq = FACTORIES["PQ"]().fit(X, y)
    # Items 0..199 and 800..999 are the same rows: every query on them ties.
    pq.index(da.from_array(X_db, chunks=(CHUNKS, -1)))
    dist, ind = pq.kneighbors(X_db[:50], n_neighbors=30)
    # Equal distances (many: 16 codewords) are ordered by index, across chunks.
    tied = np.diff(dist, axis=1) == 0
    assert tied.sum() > 100
    assert (np.diff(ind, axis=1)[tied] > 0).all()
    # Item i and its copy 800 + i (another chunk) tie; the copy comes later.
    rows, cols = np.nonzero(ind >= 800)
    assert len(rows)
    for r, c in zip(rows, cols, strict=True):
        assert ind[r, c] - 800 in ind[r, :c]


def test_one_scan_task_per_chunk_and_the_model_sent_once(client, digits):
    X, y, X_db, *_ = digits
    pq = FACTORIES["PQ"]().fit(X, y)
    Xd = da.from_array(X_db, chunks=(CHUNKS, -1))
    with distributed.get_task_stream(client) as stream:
        pq.index(Xd)
    keys = [str(task["key"]) for task in stream.data]
    encode_tasks = [k for k in keys if "_encode_chunk" in k]
    assert len(encode_tasks) == len(CHUNKS)
    # The estimator (without its database) is one key of the graph.
    assert sum("skquant-ProductQuantizer" in k for k in keys) <= 1
    assert sum("skquant-ProductQuantizer" in str(k) for k in dict(pq.encode(Xd).dask)) == 1
    pq.kneighbors(X[:5])  # builds the per-chunk scan objects
    with distributed.get_task_stream(client) as stream:
        pq.kneighbors(X[:5])
    keys = [str(task["key"]) for task in stream.data]
    assert sum("skquant-scan" in k for k in keys) == len(CHUNKS)
    assert sum("skquant-merge" in k for k in keys) >= 1
    # Each chunk was scanned by a worker that held its codes (the codes never
    # moved; which workers hold chunks is the scheduler's choice at index).
    holders = set().union(*_holders(client, pq.codes_).values())
    scanners = {task["worker"] for task in stream.data if "skquant-scan" in str(task["key"])}
    assert scanners <= holders


@pytest.mark.parametrize("name", ["PQ", "DSQ"])
def test_encode_and_transform_are_lazy_and_chunk_independent(client, digits, name):
    X, y, X_db, *_ = digits
    est = FACTORIES[name]().fit(X, y)
    for chunks in [(1000,), (1, 499, 500), (333, 333, 334)]:
        Xd = da.from_array(X_db, chunks=(chunks, -1))
        codes, Z = est.encode(Xd), est.transform(Xd)
        assert isinstance(codes, da.Array) and isinstance(Z, da.Array)
        assert codes.chunks[0] == chunks and Z.chunks[0] == chunks
        assert codes.dtype == est.encode(X_db[:2]).dtype and Z.dtype == np.float32
        assert_array_equal(codes.compute(), est.encode(X_db))
        assert_array_equal(Z.compute(), est.transform(X_db))


def test_transform_and_encode_run_nothing_until_computed(client, digits):
    X, y, X_db, *_ = digits
    pq = FACTORIES["PQ"]().fit(X, y)

    def explode(block):
        raise RuntimeError("computed")

    lazy = da.from_array(X_db, chunks=100).map_blocks(explode, dtype=X_db.dtype)
    codes, Z = pq.encode(lazy), pq.transform(lazy)  # no error: nothing ran
    with pytest.raises(RuntimeError, match="computed"):
        codes.compute()
    with pytest.raises(RuntimeError, match="computed"):
        Z.compute()


def test_skquant_imports_and_works_without_dask():
    code = (
        "import sys; sys.modules['dask'] = None\n"
        "import numpy as np, skquant\n"
        "X = np.random.default_rng(0).normal(size=(60, 8))\n"
        "pq = skquant.ProductQuantizer(n_codebooks=2, n_codewords=4).fit(X)\n"
        "assert pq.kneighbors(X[:2], 3)[1].shape == (2, 3)\n"
        "assert 'dask.array' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("by_residual", [True, False], ids=["residual", "direct"])
def test_worker_lost_between_two_queries_changes_no_result(client, digits, by_residual):
    X, y, X_db, *_ = digits
    pq = FACTORIES["PQ"](n_lists=8, n_probe=2, by_residual=by_residual).fit(X, y)
    # A lost chunk is recomputed from its graph: X must be recomputable.
    pq.index(da.from_array(X_db, chunks=(CHUNKS, -1)))
    before = pq.kneighbors(X[:30], n_neighbors=6)
    # A worker that alone holds chunks of the codes (under load the scheduler
    # may have put them all on one). A chunk or a scan object (built by the
    # first query) with a copy on the other worker is not lost: which are
    # depends on placement (a worker busy compiling the scan loop may leave a
    # chunk's scan object to the other one), so it is read, not assumed.
    holders = _holders(client, pq.codes_)
    sole = sorted(next(iter(ws)) for ws in holders.values() if len(ws) == 1)
    worker = sole[0] if sole else sorted(set().union(*holders.values()))[0]
    codes_lost = any(ws == {worker} for ws in holders.values())
    scans = client.who_has(distributed.futures_of(pq.index_._chunks[3]))
    scans_lost = any(set(ws) == {worker} for ws in scans.values())
    with distributed.get_task_stream(client) as stream:
        client.restart_workers([worker])
        after = pq.kneighbors(X[:30], n_neighbors=6)
    _assert_all_equal(after, before)
    # The lost chunks were encoded again (residual codes: with their cells;
    # direct codes: their cells assigned again) and the lost scan objects
    # (with the per-item terms of residual codes) rebuilt, as soon as the
    # worker left or by the query.
    keys = [str(task["key"]) for task in stream.data]
    if codes_lost and by_residual:
        assert any("_encode_cells_chunk" in k for k in keys)
    elif codes_lost:
        assert any("_encode_chunk" in k for k in keys)
        assert any("_assign_chunk" in k for k in keys)
    if scans_lost:
        assert any("_make_chunk" in k for k in keys)
    assert_array_equal(pq.codes_.compute(), pq.encode(X_db))


def test_add_mixes_in_memory_and_dask(client, digits):
    X, y, X_db, y_db, Q, _ = digits
    pq = FACTORIES["PQ"]().fit(X, y)
    pq.index(X_db[:600], y_db[:600]).add(X_db[600:], y_db[600:])
    expected = _results(pq, Q)

    # An in-memory index becomes a dask one; its items, the first chunks (of
    # the size of the new ones).
    pq.index(X_db[:600], y_db[:600])
    pq.add(da.from_array(X_db[600:800], chunks=150), da.from_array(y_db[600:800], chunks=150))
    assert isinstance(pq.index_, DaskIndex)
    assert pq.codes_.chunks[0] == (150,) * 4 + (150, 50)
    # An in-memory array appended to a dask index goes to the cluster.
    pq.add(X_db[800:], y_db[800:])
    assert isinstance(pq.codes_, da.Array) and pq.n_samples_fit_ == len(X_db)
    assert_array_equal(pq.database_labels_.compute(), y_db)
    _assert_all_equal(_results(pq, Q), expected)

    # Labels must follow the index's: none given to a labelled index.
    with pytest.raises(ValueError, match="needs y"):
        pq.add(da.from_array(X_db[:10], chunks=5))
    # index() of an in-memory array brings the database back.
    pq.index(X_db, y_db)
    assert isinstance(pq.index_, QuantizedIndex) and not isinstance(pq.index_, DaskIndex)
    _assert_all_equal(_results(pq, Q), expected)


def test_add_keeps_cells_and_matches_in_memory_ivf(client, digits):
    X, y, X_db, _, Q, _ = digits
    pq = FACTORIES["PQ"](n_lists=10, n_probe=2).fit(X, y)
    pq.index(X_db[:700]).add(X_db[700:])
    expected = pq.kneighbors(Q, n_neighbors=8)
    pq.index(da.from_array(X_db[:700], chunks=300))
    pq.kneighbors(Q[:2])  # cells assigned on the workers
    pq.add(da.from_array(X_db[700:], chunks=200))
    _assert_all_equal(pq.kneighbors(Q, n_neighbors=8), expected)


def test_pickle_gathers_into_an_in_memory_index(client, digits, monkeypatch):
    X, y, X_db, y_db, Q, _ = digits
    pq = FACTORIES["PQ"](n_lists=8, n_probe=2).fit(X, y)
    pq.index(da.from_array(X_db, chunks=(CHUNKS, -1)), y_db)
    expected = pq.kneighbors(Q)
    loaded = pickle.loads(pickle.dumps(pq))
    assert type(loaded.index_) is QuantizedIndex
    assert type(copy.deepcopy(pq).index_) is QuantizedIndex
    assert isinstance(loaded.codes_, np.ndarray)
    assert_array_equal(loaded.database_labels_, y_db)
    _assert_all_equal(loaded.kneighbors(Q), expected)
    # The estimator itself still searches on the cluster.
    assert isinstance(pq.codes_, da.Array)

    monkeypatch.setattr(_dask_index, "MAX_GATHER_BYTES", 1000)
    with pytest.raises(ValueError, match="MAX_GATHER_BYTES"):
        pickle.dumps(pq)
    with pytest.raises(ValueError, match=r"to_faiss\(\) needs the whole database"):
        pq.to_faiss()


def test_to_faiss_of_a_dask_index_gathers(client, digits):
    faiss = pytest.importorskip("faiss")
    X, y, X_db, *_ = digits
    pq = FACTORIES["PQ"]().fit(X, y).index(X_db)
    # to_faiss returns the concrete index; a downcast_index proxy of a
    # temporary would not own it and read freed memory once it is collected.
    in_memory = pq.to_faiss()
    pq.index(da.from_array(X_db, chunks=(CHUNKS, -1)))
    index = pq.to_faiss()
    assert isinstance(index, faiss.IndexPQ)
    assert index.ntotal == len(X_db)
    assert_array_equal(faiss.vector_to_array(index.codes),
                       faiss.vector_to_array(in_memory.codes))


def test_knn_transformer_on_a_dask_index(client, digits):
    X = digits[2]
    pq = FACTORIES["PQ"]()
    transformer = QuantizedKNeighborsTransformer(pq, n_neighbors=5).fit(X)
    expected = transformer.transform(X[:100])
    transformer.quantizer_.index(da.from_array(X, chunks=(CHUNKS, -1)))
    graph = transformer.transform(X[:100])
    assert (graph != expected).nnz == 0


def test_bad_dask_input_is_refused_clearly(client, digits):
    X, y, X_db, y_db, *_ = digits
    pq = FACTORIES["PQ"]()
    with pytest.raises(TypeError, match="fit on an in-memory sample"):
        pq.fit(da.from_array(X, chunks=100), y)
    pq.fit(X, y)
    with pytest.raises(ValueError, match="2-D dask array"):
        pq.index(da.from_array(X_db[:, 0], chunks=100))
    with pytest.raises(ValueError, match="expecting 64 features"):
        pq.index(da.from_array(X_db[:, :10], chunks=100))
    Xd = da.from_array(X_db, chunks=100)
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        pq.index(Xd[Xd[:, 0] >= 0])
    with pytest.raises(ValueError, match="y has 999 samples but X has 1000"):
        pq.index(Xd, da.from_array(y_db[:999], chunks=100))
    with pytest.raises(TypeError, match="X is not"):
        pq.index(X_db, da.from_array(y_db, chunks=100))
    with pytest.raises(ValueError, match="must hold numbers"):
        pq.encode(da.from_array(X_db.astype(str), chunks=100))
    # A chunk with a NaN fails on its worker; index() raises it.
    X_nan = X_db.copy()
    X_nan[950, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pq.index(da.from_array(X_nan, chunks=100))


def test_codes_setter_keeps_the_database_where_it_is(client, digits):
    X, y, X_db, *_ = digits
    pq = FACTORIES["PQ"]().fit(X, y)
    codes = pq.encode(X_db)
    with pytest.raises(TypeError, match="in memory, so codes_ takes an in-memory array"):
        pq.codes_ = da.from_array(codes, chunks=100)
    pq.index(da.from_array(X_db, chunks=(CHUNKS, -1)))
    with pytest.raises(TypeError, match="on a dask cluster, so codes_ takes a dask array"):
        pq.codes_ = codes
    pq.codes_ = da.from_array(codes[::-1], chunks=250)
    assert isinstance(pq.codes_, da.Array) and pq.codes_.chunks[0] == (250,) * 4
    assert_array_equal(pq.kneighbors(X[:5])[1],
                       FACTORIES["PQ"]().fit(X, y).index(X_db[::-1]).kneighbors(X[:5])[1])


def test_synchronous_scheduler_without_a_cluster(digits):
    # No distributed client: the same graphs run in this process.
    X, y, X_db, y_db, Q, _ = digits
    pq = FACTORIES["PQ"](n_lists=6, n_probe=2).fit(X, y).index(X_db, y_db)
    expected = _results(pq, Q)
    with dask.config.set(scheduler="synchronous"):
        pq.index(da.from_array(X_db, chunks=(CHUNKS, -1)), y_db)
        _assert_all_equal(_results(pq, Q), expected)
        # Dask queries are computed (results are in-memory arrays anyway).
        _assert_all_equal(pq.kneighbors(da.from_array(Q, chunks=30), n_neighbors=10),
                          expected[:2])
