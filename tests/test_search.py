"""The AQD engine against brute force on the decoded vectors."""

import numpy as np
import pytest
from sklearn import config_context

from skquant._additive import inner_product_tables as additive_tables
from skquant._product import euclidean_tables
from skquant._product import inner_product_tables as product_tables
from skquant._search import aqd_search


def _reference_topk(distances, k):
    """Exact ranking: by distance, ties by lower index (stable argsort)."""
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def _random_product_problem(rng, n_queries=23, n_items=701, M=4, K=16, ds=3):
    codebooks = rng.normal(size=(M, K, ds)).astype(np.float32)
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8)
    queries = rng.normal(size=(n_queries, M * ds)).astype(np.float32)
    decoded = np.hstack([codebooks[m][codes[:, m]] for m in range(M)]).astype(np.float64)
    return codebooks, codes, queries, decoded


@pytest.mark.parametrize("n_jobs", [None, 2])
@pytest.mark.parametrize("working_memory", [1024, 0.002])
def test_euclidean_search_equals_brute_force(n_jobs, working_memory):
    rng = np.random.default_rng(0)
    codebooks, codes, queries, decoded = _random_product_problem(rng)
    exact = ((queries[:, None, :].astype(np.float64) - decoded[None]) ** 2).sum(-1)
    k = 10
    with config_context(working_memory=working_memory):
        values, indices = aqd_search(
            euclidean_tables(queries, codebooks), np.asfortranarray(codes), k, n_jobs=n_jobs
        )
    ref_values, ref_indices = _reference_topk(exact, k)
    np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-4)
    # Indices agree except where float32 rounding reorders near-equal distances.
    mismatch = indices != ref_indices
    gaps = np.abs(np.take_along_axis(exact, indices, 1) - ref_values)
    assert np.all(gaps[mismatch] < 1e-3)
    assert mismatch.mean() < 0.01


@pytest.mark.parametrize("n_jobs", [None, 2])
def test_inner_product_search_equals_brute_force(n_jobs):
    rng = np.random.default_rng(1)
    M, K, D = 3, 8, 5
    codebooks = rng.normal(size=(M, K, D)).astype(np.float32)
    codes = rng.integers(0, K, size=(400, M)).astype(np.uint8)
    queries = rng.normal(size=(17, D)).astype(np.float32)
    decoded = sum(codebooks[m][codes[:, m]].astype(np.float64) for m in range(M))
    exact = -(queries.astype(np.float64) @ decoded.T)
    with config_context(working_memory=0.001):
        values, indices = aqd_search(
            additive_tables(queries, codebooks, negate=True), codes, 7, n_jobs=n_jobs
        )
    ref_values, ref_indices = _reference_topk(exact, 7)
    np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-4)
    assert np.mean(indices == ref_indices) > 0.99


def test_product_inner_product_tables():
    rng = np.random.default_rng(2)
    codebooks, codes, queries, decoded = _random_product_problem(rng, n_items=50)
    tables = product_tables(queries, codebooks)
    sums = tables[:, np.arange(codes.shape[1]), codes].sum(-1)
    np.testing.assert_allclose(sums, -(queries @ decoded.T), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_jobs", [None, 2])
@pytest.mark.parametrize("k", [1, 5, 300])
def test_ties_are_broken_by_lower_index(n_jobs, k):
    # Small integer tables make sums exact and ties frequent (duplicate codes
    # and equal sums), so the expected order is unambiguous.
    rng = np.random.default_rng(3)
    tables = rng.integers(0, 3, size=(40, 3, 4)).astype(np.float32)
    codes = rng.integers(0, 4, size=(300, 3)).astype(np.uint8)
    sums = tables[:, np.arange(3), codes].sum(-1)
    with config_context(working_memory=0.0005):
        values, indices = aqd_search(tables, codes, k, n_jobs=n_jobs)
    ref_values, ref_indices = _reference_topk(sums, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(values, ref_values)


def test_all_equal_distances():
    tables = np.zeros((3, 2, 4), dtype=np.float32)
    codes = np.zeros((50, 2), dtype=np.uint8)
    values, indices = aqd_search(tables, codes, 5)
    np.testing.assert_array_equal(indices, np.tile(np.arange(5), (3, 1)))
    assert np.all(values == 0)


def test_euclidean_tables_match_direct_computation():
    rng = np.random.default_rng(4)
    codebooks, _, queries, _ = _random_product_problem(rng)
    M, K, ds = codebooks.shape
    direct = (
        (queries.reshape(-1, M, 1, ds) - codebooks[None]) ** 2
    ).sum(-1)
    np.testing.assert_allclose(euclidean_tables(queries, codebooks), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tables_sum_each_entry_in_one_order(dtype):
    # Every entry is float64 products summed left to right, then rounded to
    # float32: bitwise numpy's elementwise loop in that order, for one query
    # as for its row of a batch (a BLAS sums in an order of its own, which
    # may depend on the batch and the CPU).
    rng = np.random.default_rng(11)
    codebooks, _, queries, _ = _random_product_problem(rng)
    queries = (queries * 1e3).astype(dtype)  # (far from float32-exact sums)
    M, K, ds = codebooks.shape
    q = queries.astype(np.float64).reshape(len(queries), M, ds)
    c = codebooks.astype(np.float64)
    dots, q_norms, c_norms = 0.0, 0.0, 0.0
    for d in range(ds):
        dots = dots + q[:, :, None, d] * c[None, :, :, d]
        q_norms = q_norms + q[:, :, d] * q[:, :, d]
        c_norms = c_norms + c[:, :, d] * c[:, :, d]
    squared = np.maximum((dots * -2.0 + q_norms[:, :, None]) + c_norms[None], 0.0)
    for tables, expected in ((euclidean_tables, squared), (product_tables, -dots)):
        got = tables(queries, codebooks)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))
        np.testing.assert_array_equal(tables(queries[3:4], codebooks), got[3:4])


def test_uint16_codes():
    rng = np.random.default_rng(5)
    tables = rng.normal(size=(4, 2, 300)).astype(np.float32)
    codes = rng.integers(0, 300, size=(1000, 2)).astype(np.uint16)
    sums = tables[:, np.arange(2), codes].sum(-1)
    _, indices = aqd_search(tables, codes, 3)
    np.testing.assert_array_equal(indices, _reference_topk(sums, 3)[1])


def test_bad_arguments():
    tables = np.zeros((1, 2, 4), dtype=np.float32)
    codes = np.zeros((5, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="n_neighbors"):
        aqd_search(tables, codes, 6)
    with pytest.raises(ValueError, match="n_neighbors"):
        aqd_search(tables, codes, 0)
    with pytest.raises(ValueError, match="shape"):
        aqd_search(tables, codes[:, :1], 1)


# ---------------------------------------------------------------------------
# Kernels, layouts and dispatch (issue 6)
import pickle  # noqa: E402
import tracemalloc  # noqa: E402

from joblib import parallel_config, register_parallel_backend  # noqa: E402
from joblib._parallel_backends import ThreadingBackend  # noqa: E402

from skquant import _search  # noqa: E402
from skquant._search import CodeLayout  # noqa: E402

KERNELS = ["pairs", "columns", "numpy", "torch"]


def _integer_problem(rng, n_queries, n_items, M, K, high=3):
    """Integer tables: float32 sums are exact, ties are everywhere."""
    tables = rng.integers(0, high, size=(n_queries, M, K)).astype(np.float32)
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8 if K <= 256 else np.uint16)
    sums = tables[:, np.arange(M), codes].sum(-1)
    return tables, codes, sums


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M", [1, 3, 4])
@pytest.mark.parametrize("n_queries", [1, 5, 70])
@pytest.mark.parametrize("n_jobs", [None, 2])
def test_every_kernel_equals_stable_reference(kernel, M, n_queries, n_jobs):
    rng = np.random.default_rng(10 + M + n_queries)
    tables, codes, sums = _integer_problem(rng, n_queries, 537, M, 16)
    # k >= a quarter of a shard takes the batch kernel's dense path (one
    # selection over all items); 537 ranks the whole database.
    for k, working_memory in [(1, 1024), (7, 1024), (7, 0.0005), (40, 0.002),
                              (150, 0.002), (537, 0.002), (537, 1024)]:
        with config_context(working_memory=working_memory):
            values, indices = aqd_search(tables, codes, k, n_jobs=n_jobs, kernel=kernel)
        ref_values, ref_indices = _reference_topk(sums, k)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_array_equal(values, ref_values)


@pytest.mark.parametrize("kernel", ["columns", "numpy", "torch"])
def test_wide_codes_every_kernel(kernel):
    rng = np.random.default_rng(11)
    tables, codes, sums = _integer_problem(rng, 20, 800, 2, 300, high=50)
    _, indices = aqd_search(tables, codes, 6, n_jobs=2, kernel=kernel)
    np.testing.assert_array_equal(indices, _reference_topk(sums, 6)[1])


def test_auto_picks_pairs_for_wide_codes_only_when_they_fit():
    assert _search._choose_kernel(1, 256, "auto") == "pairs"
    assert _search._choose_kernel(1, 300, "auto") == "columns"
    assert _search._choose_kernel(500, 256, "auto") in ("numpy", "torch")


@pytest.mark.parametrize("gather_max", [0, 2**15])  # per-sub-space / one-gather re-sum
@pytest.mark.parametrize("kernel", KERNELS)
def test_float64_resum_reorders_float32_ties(kernel, gather_max, monkeypatch):
    monkeypatch.setattr(_search, "_REFINE_GATHER_MAX", gather_max)
    # In float32, 1 + 2**24 and 0.5 + 2**24 both round to 2**24 (a tie, so
    # item 0 first); their exact sums put item 1 first.
    tables = np.array([[[1.0, 0.5, 2.0**25], [2.0**24, 0.0, 0.0]]] * 13, dtype=np.float32)
    codes = np.array([[0, 0], [1, 0], [2, 1]], dtype=np.uint8)
    values, indices = aqd_search(tables, codes, 3, kernel=kernel)
    np.testing.assert_array_equal(indices, [[1, 0, 2]] * 13)
    np.testing.assert_array_equal(values, [[2.0**24 + 0.5, 2.0**24 + 1, 2.0**25]] * 13)
    _, top2 = aqd_search(tables, codes, 2, kernel=kernel)
    np.testing.assert_array_equal(top2, [[1, 0]] * 13)


def test_sort_rows_orders_by_value_then_column():
    # Negative, signed-zero, tied and infinite values: the 64-bit key sort must
    # equal a lexsort on (value, column).
    rng = np.random.default_rng(14)
    values = rng.choice(
        np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, 7.25, np.inf],
                 dtype=np.float32), size=(20, 300))
    values[:, :5] = rng.normal(size=(20, 5)).astype(np.float32)
    columns = np.arange(300)
    expected = np.lexsort((np.broadcast_to(columns, values.shape), values), axis=1)
    np.testing.assert_array_equal(_search._sort_rows(values, columns, 300), expected)
    # a subset of columns, as after a partition
    subset = np.sort(rng.permutation(300)[:40]) + np.zeros((20, 1), dtype=np.intp)
    sub_values = np.take_along_axis(values, subset, axis=1)
    order = np.lexsort((subset, sub_values), axis=1)
    np.testing.assert_array_equal(
        _search._sort_rows(sub_values, subset, 300), np.take_along_axis(subset, order, 1)
    )


def test_short_list_is_bitwise_prefix_of_whole_ranking():
    # k = 9 re-sums its winners in one gather, k = n_items sub-space by
    # sub-space (and takes the dense path): same values to the last bit.
    rng = np.random.default_rng(13)
    codebooks, codes, queries, _ = _random_product_problem(rng, 30, 3000, M=6, K=32)
    tables = euclidean_tables(queries, codebooks)
    short = aqd_search(tables, codes, 9)
    whole = aqd_search(tables, codes, len(codes))
    np.testing.assert_array_equal(short[0], whole[0][:, :9])
    np.testing.assert_array_equal(short[1], whole[1][:, :9])


def test_kernels_agree_bitwise_on_float_data():
    # The selected items' values are recomputed in one fixed way, so batch
    # size, kernel and sharding cannot change a single bit of the result.
    rng = np.random.default_rng(12)
    codebooks, codes, queries, _ = _random_product_problem(rng, 40, 3000, M=6, K=32)
    tables = euclidean_tables(queries, codebooks)
    results = [aqd_search(tables, codes, 9, kernel=kernel, n_jobs=n_jobs)
               for kernel in KERNELS for n_jobs in (None, 2)]
    for values, indices in results[1:]:
        np.testing.assert_array_equal(values, results[0][0])
        np.testing.assert_array_equal(indices, results[0][1])


def test_descending_database_keeps_moving_the_threshold():
    # Every block beats the previous one: the running threshold is replaced
    # again and again, the worst case of the threshold selector.
    n, M, K = 5000, 2, 256
    codes = np.zeros((n, M), dtype=np.uint8)
    codes[:, 0] = np.arange(n)[::-1] * 256 // n
    codes[:, 1] = np.arange(n)[::-1] % 256
    tables = np.stack([np.arange(K, dtype=np.float32) * 256, np.arange(K, dtype=np.float32)])
    tables = np.repeat(tables[None], 3, axis=0)
    sums = tables[:, np.arange(M), codes].sum(-1)
    for kernel in KERNELS:
        with config_context(working_memory=0.01):
            _, indices = aqd_search(tables, codes, 25, kernel=kernel, n_jobs=2)
        np.testing.assert_array_equal(indices, _reference_topk(sums, 25)[1])


def test_without_torch_batches_use_numpy(monkeypatch):
    monkeypatch.setattr(_search, "_torch_embedding_bag", lambda: None)
    assert _search._choose_kernel(500, 256, "auto") == "numpy"
    rng = np.random.default_rng(13)
    tables, codes, sums = _integer_problem(rng, 30, 400, 4, 16)
    _, indices = aqd_search(tables, codes, 5)
    np.testing.assert_array_equal(indices, _reference_topk(sums, 5)[1])


def test_engine_modules_do_not_import_torch_at_module_level():
    # torch is only imported lazily, for large batches: the engine works (and
    # single queries stay fast) in a process that never imports it.
    import ast
    import inspect

    from skquant import _ivf

    for module in (_search, _ivf):
        tree = ast.parse(inspect.getsource(module))
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in imports for alias in node.names]
        names += [node.module or "" for node in imports if isinstance(node, ast.ImportFrom)]
        assert not any(name.startswith("torch") for name in names)


def test_code_layout_cache_and_pickle():
    rng = np.random.default_rng(14)
    tables, codes, sums = _integer_problem(rng, 3, 300, 4, 16)
    codes = np.asfortranarray(codes)
    layout = CodeLayout(codes)
    assert np.shares_memory(layout.codes_t, codes)  # a free view of F-ordered codes
    pairs = layout.pair_codes(16)
    assert pairs.dtype == np.uint16 and pairs.shape == (2, 300)
    np.testing.assert_array_equal(pairs[1], codes[:, 2].astype(np.uint16) * 16 + codes[:, 3])
    assert layout.pair_codes(16) is pairs  # cached
    # A stale layout (other codes) is ignored, not used.
    other = np.asfortranarray(codes[::-1])
    _, indices = aqd_search(tables, other, 4, layout=layout)
    np.testing.assert_array_equal(
        indices, _reference_topk(tables[:, np.arange(4), other].sum(-1), 4)[1]
    )
    # Pickling keeps the codes, drops the derived arrays.
    clone = pickle.loads(pickle.dumps(layout))
    assert clone._pair_codes is None and clone._codes_t is None
    np.testing.assert_array_equal(clone.codes, codes)
    np.testing.assert_array_equal(clone.pair_codes(16), pairs)


class _RemoteLikeBackend(ThreadingBackend):
    """A backend the engine does not recognise as local: shards go through joblib."""


def test_non_local_joblib_backend_receives_the_shards(monkeypatch):
    register_parallel_backend("skquant-test", _RemoteLikeBackend)
    calls = []
    original = _search._thread_pool
    monkeypatch.setattr(_search, "_thread_pool", lambda: calls.append(1) or original())
    rng = np.random.default_rng(15)
    tables, codes, sums = _integer_problem(rng, 20, 500, 4, 16)
    with parallel_config(backend="skquant-test"):
        _, indices = aqd_search(tables, codes, 5, n_jobs=3)
    assert not calls
    np.testing.assert_array_equal(indices, _reference_topk(sums, 5)[1])
    aqd_search(tables, codes, 5, n_jobs=3)  # default backend: the engine's pool
    assert calls


@pytest.mark.parametrize("kernel", KERNELS)
def test_scratch_memory_stays_under_working_memory(kernel):
    # numpy reports its allocations to tracemalloc; derived layouts are built
    # first (they are a cache of the index, not search scratch).
    rng = np.random.default_rng(16)
    n_items, M, K, n_queries = 200_000, 8, 256, 64 if kernel in ("numpy", "torch") else 2
    codes = np.asfortranarray(rng.integers(0, K, size=(n_items, M)).astype(np.uint8))
    tables = rng.random((n_queries, M, K), dtype=np.float32)
    layout = CodeLayout(codes)
    layout.pair_codes(K)
    working_memory = 1  # MiB, per job
    with config_context(working_memory=working_memory):
        aqd_search(tables, codes, 10, layout=layout, kernel=kernel, n_jobs=2)
        tracemalloc.start()
        aqd_search(tables, codes, 10, layout=layout, kernel=kernel, n_jobs=2)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Per job: the working-memory budget; plus the tables' transposed or
    # pair copies (1 MiB per query at M=8, K=256 for pairs) and the results.
    allowance = 2 * working_memory * 2**20 + 4 * tables.size
    if kernel == "pairs":
        allowance += n_queries * (M // 2) * K * K * 4
    # (+1 MiB for small per-call arrays: results, candidates, index lists.)
    assert peak < allowance + 2**20, (peak, allowance)


@pytest.fixture(autouse=True)
def _shard_small_problems(monkeypatch):
    """Tests use small databases: let them split into shards anyway, so that
    the multi-shard paths (dispatch, merge) are what n_jobs=2 exercises."""
    monkeypatch.setattr(_search, "_MIN_SHARD_WORK", 1)


def test_small_problems_stay_in_one_thread(monkeypatch):
    monkeypatch.setattr(_search, "_MIN_SHARD_WORK", 2**16)
    shard_counts = []
    original = _search._run_shards
    monkeypatch.setattr(
        _search, "_run_shards",
        lambda func, shards, args_of: shard_counts.append(len(shards))
        or original(func, shards, args_of),
    )
    rng = np.random.default_rng(17)
    tables, codes, _ = _integer_problem(rng, 1, 10_000, 4, 16)
    aqd_search(tables, codes, 5, n_jobs=2)  # 10k pairs of work: one shard
    tables, codes, _ = _integer_problem(rng, 1, 200_000, 4, 16)
    aqd_search(tables, codes, 5, n_jobs=2)  # one query over 200k: two shards
    aqd_search(tables, codes, 5)  # n_jobs=None: one
    tables, codes, _ = _integer_problem(rng, 20, 200_000, 4, 16)
    aqd_search(tables, codes, 5, n_jobs=2)  # a batch: two shards
    assert shard_counts == [1, 2, 1, 2]


@pytest.mark.parametrize("kernel", ["pairs", "columns"])
@pytest.mark.parametrize("M", [3, 4, 8])
def test_partial_sum_pruning_is_exact(kernel, M):
    # Selective tables (a few cheap codewords per sub-space, like a query in a
    # cluster): after the first blocks most items are dropped on half their
    # look-ups. Integer tables keep every sum exact, so the order must match.
    rng = np.random.default_rng(18 + M)
    K, n_items = 16, 60_000
    tables = rng.integers(50, 1000, size=(3, M, K)).astype(np.float32)
    tables[:, :, :2] = rng.integers(0, 5, size=(3, M, 2))
    codes = rng.integers(0, K, size=(n_items, M)).astype(np.uint8)
    sums = tables[:, np.arange(M), codes].sum(-1)
    for k in (1, 10):
        values, indices = aqd_search(tables, codes, k, kernel=kernel, n_jobs=2)
        ref_values, ref_indices = _reference_topk(sums, k)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_array_equal(values, ref_values)
