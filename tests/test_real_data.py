"""Small end-to-end checks on real data that ships offline.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (installed
by ``.ci/run``); Yeast from the ``river`` package. Each test skips cleanly when
its data is missing. Subsets are small so the module runs in seconds; the full
protocol is ``benchmarks/bench_quality.py``.
"""

import numpy as np
import pytest

from skquant import DeepQuantizer, ProductQuantizer
from skquant.datasets import load_fashion_mnist, load_yeast, retrieval_split
from skquant.metrics import mean_average_precision, precision_at_k


def _exact_ranking(Q, D):
    """Brute-force Euclidean ranking, ties by lower index (the reference)."""
    d2 = (Q**2).sum(1)[:, None] - 2 * Q @ D.T + (D**2).sum(1)[None, :]
    return np.argsort(d2, axis=1, kind="stable")


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        return load_fashion_mnist()
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")


@pytest.fixture(scope="module")
def fashion_split(fashion_mnist):
    """3,000 training-file images: 200 queries, 1,000 training, 2,800 database."""
    subset = np.random.RandomState(0).permutation(60_000)[:3000]
    X = fashion_mnist.data[subset].astype(np.float32) / 255
    y = fashion_mnist.target[subset]
    q, tr, db = retrieval_split(y, n_query=20, n_train=100, random_state=0)
    raw_ranking = _exact_ranking(X[q], X[db])
    raw_map = mean_average_precision(y[q], y[db], raw_ranking)
    return X, y, q, tr, db, raw_ranking, raw_map


def test_fashion_mnist_matches_the_published_files(fashion_mnist):
    # Facts of the original release (Xiao et al. 2017): 60k + 10k images,
    # 7,000 per class, first labels, and the usual normalisation mean 0.2860.
    data, target = fashion_mnist.data, fashion_mnist.target
    assert data.shape == (70_000, 784) and data.dtype == np.uint8
    assert np.array_equal(np.bincount(target), np.full(10, 7000))
    assert fashion_mnist.is_test.sum() == 10_000
    assert target[:5].tolist() == [9, 0, 0, 3, 0]
    assert target[60_000:60_005].tolist() == [9, 2, 1, 1, 6]
    assert fashion_mnist.target_names[9] == "Ankle boot"
    assert data[:60_000].mean() / 255 == pytest.approx(0.2860, abs=5e-4)


def test_fashion_mnist_split_follows_the_protocol(fashion_mnist):
    y = fashion_mnist.target
    q, tr, db = retrieval_split(y, n_query=100, n_train=500, random_state=0)
    assert np.array_equal(np.bincount(y[q]), np.full(10, 100))
    assert np.array_equal(np.bincount(y[tr]), np.full(10, 500))
    assert len(db) == 69_000 and np.intersect1d(q, db).size == 0
    assert np.isin(tr, db).all()  # database = rest, training items included


def test_pq_on_fashion_mnist_stays_close_to_exact_pixels(fashion_split):
    X, y, q, tr, db, raw_ranking, raw_map = fashion_split
    # Exact kNN on raw pixels is far above chance (0.1) but far from perfect.
    assert 0.3 < raw_map < 0.6
    pq = ProductQuantizer(n_codebooks=16, n_codewords=64, random_state=0)
    pq.fit(X[tr]).index(X[db], y[db])
    ranking = pq.kneighbors(X[q], n_neighbors=len(db), return_distance=False)
    pq_map = mean_average_precision(y[q], y[db], ranking)
    # 96-bit codes lose little of the pixel geometry (measured: within 0.02).
    assert abs(pq_map - raw_map) < 0.04
    # score() is the same mAP, computed by the library.
    assert pq.score(X[q], y[q]) == pytest.approx(pq_map)
    # Precision of the first neighbours agrees with exact search too.
    assert precision_at_k(y[q], y[db], ranking, 10) == pytest.approx(
        precision_at_k(y[q], y[db], raw_ranking, 10), abs=0.05
    )


@pytest.mark.slow
def test_short_dqn_fit_beats_exact_pixel_knn(fashion_split):
    X, y, q, tr, db, raw_ranking, raw_map = fashion_split
    dqn = DeepQuantizer(
        n_codebooks=4,
        n_codewords=64,
        max_iter=8,
        warmup_epochs=3,
        device="cpu",
        random_state=0,
    )
    dqn.fit(X[tr], y[tr]).index(X[db], y[db])
    ranking = dqn.kneighbors(X[q], n_neighbors=len(db), return_distance=False)
    dqn_map = mean_average_precision(y[q], y[db], ranking)
    # 24-bit codes learned from 1,000 labelled images rank better than exact
    # search on 784 float pixels (measured: about 0.6 vs 0.46).
    assert dqn_map > raw_map + 0.05


@pytest.fixture(scope="module")
def yeast():
    try:
        return load_yeast()
    except ImportError as exc:
        pytest.skip(f"river is not installed: {exc}")


def test_yeast_is_the_mulan_set(yeast):
    X, Y = yeast.data, yeast.target
    assert X.shape == (2417, 103) and Y.shape == (2417, 14)
    # MULAN's statistics: label cardinality 4.237, every gene labelled, the
    # rarest label (Class14) on 34 genes.
    assert Y.sum() / len(Y) == pytest.approx(4.237, abs=1e-3)
    assert Y.sum(axis=1).min() == 1
    assert Y.sum(axis=0).min() == 34
    # Hence the benchmark's random (not per-label) split.
    with pytest.raises(ValueError, match="per_class=False"):
        retrieval_split(Y, n_query=20, n_train=20, random_state=0)


def test_pq_on_yeast_multilabel_relevance(yeast):
    X, Y = yeast.data.astype(np.float32), yeast.target
    q, tr, db = retrieval_split(
        Y, n_query=100, n_train=600, per_class=False, random_state=0
    )
    # 103 is prime: one zero column lets PQ cut 4 sub-spaces, distances unchanged.
    Xp = np.hstack([X, np.zeros((len(X), 1), np.float32)])
    pq = ProductQuantizer(n_codebooks=4, n_codewords=64, random_state=0)
    pq.fit(Xp[tr]).index(Xp[db], Y[db])
    ranking = pq.kneighbors(Xp[q], n_neighbors=len(db), return_distance=False)
    raw_ranking = _exact_ranking(X[q], X[db])
    # Two labels sit on 3/4 of the genes, so 78% of database items are
    # relevant to a typical query and any ranking's mAP@all is close to that
    # share (measured: random 0.782, exact 0.789). The top of the ranking
    # tells more: precision@10 of exact search is 0.845.
    relevant = (Y[q] @ Y[db].T > 0).mean()
    raw_p10 = precision_at_k(Y[q], Y[db], raw_ranking, 10)
    pq_p10 = precision_at_k(Y[q], Y[db], ranking, 10)
    assert raw_p10 > relevant + 0.04
    assert pq_p10 > relevant + 0.02
    assert abs(pq_p10 - raw_p10) < 0.05
    assert pq.score(Xp[q], Y[q]) == pytest.approx(
        mean_average_precision(Y[q], Y[db], ranking)
    )
