"""faiss interop: exported indexes search like kneighbors; faiss PQ indexes import."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from skquant import DeepQuantizer, ProductQuantizer

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    # faiss's OpenMP pool oversubscribes small CI machines (10x slower k-means).
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _assert_same_neighbors(quantizer, queries, faiss_dist, faiss_ind, distances):
    """faiss and kneighbors return the same neighbors, up to ties.

    ``distances(queries, items)`` is the estimator's AQD of each query to a set
    of items: both result lists must be the k smallest of it (equal sorted
    distances, and each listed distance is the item's true AQD).
    """
    k = faiss_ind.shape[1]
    dist, ind = quantizer.kneighbors(queries, n_neighbors=k)
    np.testing.assert_allclose(faiss_dist, dist, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        distances(queries, faiss_ind), dist, rtol=1e-4, atol=1e-4
    )
    # Same neighbor sets, except within the tie group at the k-th distance
    # (and the order inside tie groups).
    tol = 1e-4 * (1 + np.abs(dist[:, -1:]))
    closer = dist < dist[:, -1:] - tol
    for row in range(len(ind)):
        assert set(ind[row][closer[row]]) == set(faiss_ind[row][closer[row]])
    return ind


def _euclidean_aqd(quantizer):
    database = quantizer.decode(quantizer.codes_, cells=quantizer.cells_).astype(np.float64)

    def distances(Z, items):
        Z = np.asarray(Z, dtype=np.float64)[:, None, :]
        return np.sqrt(((Z - database[items]) ** 2).sum(-1))

    return distances


@pytest.mark.parametrize("n_codewords", [256, 16, 12])
@pytest.mark.parametrize("rotation", [False, True])
def test_product_quantizer_to_faiss(digits, n_codewords, rotation):
    X, _ = digits
    train, test = X[:1500], X[1500:1600]
    pq = ProductQuantizer(
        n_codebooks=8, n_codewords=n_codewords, rotation=rotation, n_rotation_iter=3,
        random_state=0,
    ).fit(train)
    index = pq.to_faiss()
    expected_type = faiss.IndexPreTransform if rotation else faiss.IndexPQ
    assert isinstance(index, expected_type)
    assert index.ntotal == len(train) and index.d == 64
    dist_f, ind_f = index.search(test, 10)
    _assert_same_neighbors(pq, test, np.sqrt(np.maximum(dist_f, 0)), ind_f, _euclidean_aqd(pq))

    # faiss's own encoder, given our codebooks, gives our codes; its decoder
    # gives our reconstructions (layout and bit packing agree).
    pq_index = faiss.downcast_index(index.index) if rotation else index
    Z = test @ pq.rotation_ if rotation else test
    codes = pq_index.pq.compute_codes(np.ascontiguousarray(Z, dtype=np.float32))
    if n_codewords != 256:  # 16 and 12 codewords: 4 bits per code, packed
        codes = faiss.unpack_bitstrings(codes, 8, 4)
    np.testing.assert_array_equal(codes, pq.encode(test))
    np.testing.assert_allclose(
        index.reconstruct_n(0, 20), pq.decode(pq.codes_[:20]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("loss", ["cosine", "posterior"])
def test_deep_quantizer_to_faiss(digits, loss):
    # The paper's loss is searched by Euclidean AQD, the posterior default by
    # inner-product AQD: the exported IndexPQ uses the same metric.
    X, y = digits
    dqn = DeepQuantizer(
        n_codebooks=2, n_codewords=16, embedding_dim=16, hidden_layer_sizes=(32,),
        max_iter=3, warmup_epochs=1, device="cpu", random_state=0, loss=loss,
    ).fit(X[:1000], y[:1000])
    index = dqn.to_faiss()
    assert isinstance(index, faiss.IndexPQ) and index.d == 16
    queries = X[1000:1100]
    Z = dqn.transform(queries)
    dist_f, ind_f = index.search(Z, 10)

    database = dqn.decode(dqn.codes_).astype(np.float64)

    if loss == "cosine":
        assert index.metric_type == faiss.METRIC_L2

        def distances(_, items):
            diff = Z.astype(np.float64)[:, None] - database[items]
            return np.sqrt((diff**2).sum(-1))

        faiss_dist = np.sqrt(np.maximum(dist_f, 0))
    else:
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT

        def distances(_, items):
            ip = (Z.astype(np.float64)[:, None] * database[items]).sum(-1)
            return np.maximum(1.0 - ip, 0.0)

        faiss_dist = np.maximum(1.0 - dist_f, 0.0)
    _assert_same_neighbors(dqn, queries, faiss_dist, ind_f, distances)


def _spherical_quantizer(digits, **params):
    dsq_module = pytest.importorskip("skquant._deep._dsq")
    X, y = digits
    return dsq_module.SphericalQuantizer(
        n_codebooks=2, n_codewords=16, embedding_dim=16, hidden_layer_sizes=(32,),
        max_iter=3, warmup_epochs=1, device="cpu", random_state=0, **params,
    ).fit(X[:1000], y[:1000])


def _assert_same_inner_product_neighbors(dsq, index, queries):
    Z = dsq.transform(queries)
    scores, ind_f = index.search(Z, 10)
    database = dsq.decode(dsq.codes_).astype(np.float64)

    def distances(_, items):
        ip = (Z.astype(np.float64)[:, None] * database[items]).sum(-1)
        return np.maximum(1.0 - ip, 0.0)

    _assert_same_neighbors(dsq, queries, np.maximum(1.0 - scores, 0.0), ind_f, distances)


def test_spherical_quantizer_to_faiss(digits):
    dsq = _spherical_quantizer(digits)
    index = dsq.to_faiss()
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    _assert_same_inner_product_neighbors(dsq, index, digits[0][1000:1100])


@pytest.mark.parametrize("factory", ["PQ8", "PQ8x4", "OPQ8,PQ8"])
def test_from_faiss(digits, factory):
    X, _ = digits
    train, test = X[:1500], X[1500:1600]
    index = faiss.index_factory(64, factory)
    inner = faiss.downcast_index(index.index) if factory.startswith("OPQ") else index
    # The factory's default polysemous training (centroid re-ordering by
    # simulated annealing) takes a minute and changes nothing here.
    inner.do_polysemous_training = False
    inner.pq.cp.niter = 10
    index.train(train)
    index.add(train)
    pq = ProductQuantizer.from_faiss(index)
    assert pq.n_samples_fit_ == len(train) and pq.n_features_in_ == 64
    assert (pq.rotation_ is not None) == factory.startswith("OPQ")
    dist_f, ind_f = index.search(test, 10)
    _assert_same_neighbors(pq, test, np.sqrt(np.maximum(dist_f, 0)), ind_f, _euclidean_aqd(pq))
    np.testing.assert_allclose(
        pq.decode(pq.codes_[:20]), index.reconstruct_n(0, 20), rtol=1e-5, atol=1e-4
    )
    # And back: the exported index holds the same codes.
    again = pq.to_faiss()
    inner = faiss.downcast_index(again.index) if pq.rotation_ is not None else again
    original = faiss.downcast_index(faiss.downcast_index(index).index) if pq.rotation_ is not None else index
    np.testing.assert_array_equal(
        faiss.vector_to_array(inner.codes), faiss.vector_to_array(original.codes)
    )
    # A labelled database makes it scorable.
    _, y = digits
    assert 0 < pq.index(train, y[:1500]).score(test, y[1500:1600]) <= 1


def test_from_faiss_rejects_other_indexes():
    index = faiss.IndexFlatL2(8)
    with pytest.raises(TypeError, match="IndexPQ"):
        ProductQuantizer.from_faiss(index)
    with pytest.raises(ValueError, match="METRIC_L2"):
        ProductQuantizer.from_faiss(faiss.IndexPQ(8, 2, 4, faiss.METRIC_INNER_PRODUCT))
    with pytest.raises(ValueError, match="not trained"):
        ProductQuantizer.from_faiss(faiss.IndexPQ(8, 2, 4))


@pytest.mark.parametrize("by_residual", [False, True])
@pytest.mark.parametrize("rotation", [False, True])
def test_inverted_file_to_faiss(digits, rotation, by_residual):
    # Residual codes export with by_residual (behind the rotation for OPQ:
    # faiss's residual x R - c R is the one encoded), direct codes without.
    X, _ = digits
    train, test = X[:1500], X[1500:1600]
    pq = ProductQuantizer(
        n_codebooks=8, n_codewords=32, rotation=rotation, n_rotation_iter=2,
        n_lists=8, n_probe=2, by_residual=by_residual, random_state=0,
    ).fit(train)
    index = pq.to_faiss()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert isinstance(ivf, faiss.IndexIVFPQ) and ivf.by_residual == by_residual
    assert ivf.nlist == 8 and ivf.nprobe == 2 and index.ntotal == len(train)
    # Same cells: faiss's list sizes are skquant's cell sizes.
    sizes = [ivf.invlists.list_size(c) for c in range(8)]
    cells = pq.cells_ if by_residual else pq.index_.assign_cells(pq.codes_)
    np.testing.assert_array_equal(sizes, np.bincount(cells, minlength=8))
    # Every cell holds far more than k items, so both probe exactly 2 cells.
    assert min(sizes) > 10
    for n_probe in (2, 8):  # a few cells, and all of them
        ivf.nprobe = n_probe
        pq.set_params(n_probe=n_probe)
        dist_f, ind_f = index.search(test, 10)
        _assert_same_neighbors(pq, test, np.sqrt(np.maximum(dist_f, 0)), ind_f,
                               _euclidean_aqd(pq))


def test_spherical_quantizer_inverted_file_to_faiss(digits):
    dsq = _spherical_quantizer(digits, n_lists=4, n_probe=2)
    index = dsq.to_faiss()  # never a flat index: the inverted file comes along
    assert isinstance(index, faiss.IndexIVFResidualQuantizer) and not index.by_residual
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.nlist == 4 and index.nprobe == 2 and index.ntotal == 1000
    sizes = [index.invlists.list_size(c) for c in range(4)]
    cells = dsq.index_.assign_cells(dsq.codes_)
    np.testing.assert_array_equal(sizes, np.bincount(cells, minlength=4))
    assert min(sizes) > 10  # both probe exactly 2 cells
    _assert_same_inner_product_neighbors(dsq, index, digits[0][1000:1100])


def test_to_faiss_refuses_untrained_cells(digits):
    X, _ = digits
    pq = ProductQuantizer(n_codebooks=8, n_codewords=16, n_lists=8, by_residual=False,
                          random_state=0).fit(X[:500])
    pq.set_params(n_lists=12)
    with pytest.raises(ValueError, match="n_lists=12 but its coarse quantizer has 8 cells"):
        pq.to_faiss()
    index = pq.train_inverted_file().to_faiss()  # concrete type: no downcast needed
    assert isinstance(index, faiss.IndexIVFPQ) and index.nlist == 12
    small = ProductQuantizer(n_codebooks=8, n_codewords=16, n_lists=600,
                             by_residual=False).fit(X[:500])
    with pytest.raises(ValueError, match="has 0 cells: call train_inverted_file"):
        small.to_faiss()
