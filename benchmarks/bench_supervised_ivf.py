"""Direct or residual codes for a supervised estimator's inverted file, at scale.

Issue 15 asks whether residual codes (codebooks refitted on the residuals of
the embedding to its cell centroid, faiss ``IndexIVFPQ``-style) would help a
supervised estimator's mAP at the million scale. This measures it.

Protocol (Fashion-MNIST, bench_quality's split: 500 training images and 100
queries per class, seed 0; 32-bit codes; 1 thread):

1. ``SphericalQuantizer`` with its defaults (32 bits: 4 codebooks of 256) is
   fitted on the 5,000 training images.
2. The database is the other 69,000 images, grown to ``--n-items`` with
   shifted copies (a random translation of 1 to 3 pixels in each direction,
   zero fill; a copy keeps its image's label), generated chunk by chunk.
3. Methods, each with an inverted file of ``--n-lists`` cells:

   * **direct** (skquant's design for the deep estimators): the estimator's
     own, jointly learned codes; cells trained on the indexed database
     (``index`` does it by itself when the database dwarfs the training set).
   * **residual**: the same network's embeddings (``transform``), quantized
     by ``ProductQuantizer(n_codebooks=4, n_lists=...)`` (residual codes,
     its default), fitted on the 5,000 training embeddings.
   * **exact**: the float embeddings, searched exhaustively (the bound).

Metrics per ``n_probe``: mAP@100 and P@10 over the 1,000 queries (relevant:
same class), recall@10 of the exact embedding search's neighbours, and
queries/s of one batch (1,000 queries, median of 3).

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_supervised_ivf.py              # 1,000,000 items
    OMP_NUM_THREADS=1 python benchmarks/bench_supervised_ivf.py --n-items 200000
"""

# SPDX-License-Identifier: BSD-3-Clause

import argparse
import os
import time
from pathlib import Path

import numpy as np
# benchmarks/ is on sys.path when run as a script.
from bench_quality import get_spherical_quantizer, load_dataset
from bench_search import _cpu_model


def shifted_copies(images, labels, n_copies, seed, chunk=50_000):
    """Yield ``(X, y)`` chunks of randomly translated copies of 28x28 images."""
    rng = np.random.default_rng(seed)
    grid = images.reshape(-1, 28, 28)
    for start in range(0, n_copies, chunk):
        n = min(chunk, n_copies - start)
        pick = rng.integers(0, len(images), n)
        dx = rng.choice([-3, -2, -1, 1, 2, 3], n)
        dy = rng.choice([-3, -2, -1, 1, 2, 3], n)
        out = np.zeros((n, 28, 28), dtype=np.float32)
        for sx in range(-3, 4):
            for sy in range(-3, 4):
                rows = np.flatnonzero((dx == sx) & (dy == sy))
                if not rows.size:
                    continue
                src = grid[pick[rows]]
                out[rows, max(sy, 0) : 28 + min(sy, 0), max(sx, 0) : 28 + min(sx, 0)] = src[
                    :, max(-sy, 0) : 28 + min(-sy, 0), max(-sx, 0) : 28 + min(-sx, 0)
                ]
        yield out.reshape(n, -1), labels[pick]


def average_precision_at(ids, y_db, y_q, k):
    """mAP@k and P@10 of ranked database ids (n_queries, >= k)."""
    hits = y_db[ids[:, :k]] == y_q[:, None]
    precision = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    n_hits = hits.sum(axis=1)
    ap = np.where(n_hits > 0, (precision * hits).sum(axis=1) / np.maximum(n_hits, 1), 0.0)
    return float(ap.mean()), float(hits[:, :10].mean())


def exact_topk(Q, D, k, chunk=200_000):
    """Exhaustive top-k by Euclidean distance over float embeddings."""
    best_d = np.full((len(Q), k), np.inf)
    best_i = np.zeros((len(Q), k), dtype=np.int64)
    q_norms = np.einsum("nd,nd->n", Q, Q)
    for start in range(0, len(D), chunk):
        block = D[start : start + chunk]
        d = q_norms[:, None] - 2.0 * (Q @ block.T) + np.einsum("nd,nd->n", block, block)
        d = np.concatenate([best_d, d], axis=1)
        i = np.concatenate([best_i, np.arange(start, start + len(block))[None, :]
                            .repeat(len(Q), 0)], axis=1)
        top = np.argpartition(d, k - 1, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def timed_batch(func, reps=3):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-items", type=int, default=1_000_000)
    parser.add_argument("--n-lists", type=int, default=1024)
    parser.add_argument("--n-probe", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                               / "supervised_ivf.md"))
    args = parser.parse_args()

    from skquant import ProductQuantizer

    data = load_dataset("fashion_mnist")
    if data is None:
        raise SystemExit("Fashion-MNIST is not installed (Debian: dataset-fashion-mnist).")
    X, y = data["X"], data["y"]
    Xq, yq = X[data["query"]], y[data["query"]]
    Xtr, ytr = X[data["train"]], y[data["train"]]
    Xdb, ydb = X[data["database"]], y[data["database"]]
    log = [f"CPU: {_cpu_model()}, {os.cpu_count()} visible, OMP_NUM_THREADS="
           f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load at start "
           + ", ".join(f"{v:.1f}" for v in os.getloadavg())]
    print(log[0], flush=True)

    t0 = time.perf_counter()
    dsq = get_spherical_quantizer()(n_codebooks=4, n_codewords=256, n_lists=args.n_lists,
                                    random_state=0).fit(Xtr, ytr)
    t_fit = time.perf_counter() - t0
    # The database in chunks: originals first, then shifted copies.
    t0 = time.perf_counter()
    dsq.index(Xdb, ydb)
    embeddings, labels = [dsq.transform(Xdb)], [ydb]
    for Xc, yc in shifted_copies(Xdb, ydb, args.n_items - len(Xdb), seed=1):
        dsq.add(Xc, yc)
        embeddings.append(dsq.transform(Xc))
        labels.append(yc)
    dsq.train_inverted_file()  # the cells fitted to the whole database
    t_direct = time.perf_counter() - t0
    E_db = np.concatenate(embeddings).astype(np.float32)
    y_all = np.concatenate(labels)
    del embeddings
    E_q = dsq.transform(Xq).astype(np.float32)
    E_tr = dsq.transform(Xtr).astype(np.float32)
    print(f"fit {t_fit:.0f} s; direct index of {len(y_all):,} items {t_direct:.0f} s",
          flush=True)

    t0 = time.perf_counter()
    residual = ProductQuantizer(n_codebooks=4, n_codewords=256, n_lists=args.n_lists,
                                random_state=0).fit(E_tr)
    residual.index(E_db, y_all)
    t_residual = time.perf_counter() - t0
    print(f"residual fit + index {t_residual:.0f} s", flush=True)

    exact, t_exact = timed_batch(lambda: exact_topk(E_q, E_db, args.k), reps=1)
    map_exact, p10_exact = average_precision_at(exact, y_all, yq, args.k)
    rows = [("exact (float embeddings)", "-", map_exact, p10_exact, 1.0,
             len(Xq) / t_exact)]
    for n_probe in args.n_probe:
        for name, est in (("direct (DSQ codes)", dsq), ("residual (PQ of embeddings)", residual)):
            est.set_params(n_probe=n_probe)
            (_, ids), t = timed_batch(lambda est=est: est.kneighbors(Xq if est is dsq else E_q,
                                                                     n_neighbors=args.k))
            m, p10 = average_precision_at(ids, y_all, yq, args.k)
            recall = np.mean([len(np.intersect1d(a[:10], b[:10])) / 10
                              for a, b in zip(ids, exact, strict=True)])
            rows.append((name, n_probe, m, p10, recall, len(Xq) / t))
            print(f"{name} n_probe={n_probe}: mAP@{args.k} {m:.4f}, P@10 {p10:.4f}, "
                  f"recall@10 {recall:.3f}, {len(Xq) / t:.0f} q/s", flush=True)

    table = [f"| method | n_probe | mAP@{args.k} | P@10 | recall@10 vs exact | q/s (batch) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {n} | {p} | {m:.4f} | {p10:.4f} | {r:.3f} | {q:,.0f} |"
              for n, p, m, p10, r, q in rows]
    text = "\n".join([
        "## Direct or residual codes for a supervised inverted file "
        "(`benchmarks/bench_supervised_ivf.py`)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_supervised_ivf.py --n-items "
        f"{args.n_items} --n-lists {args.n_lists}`. {log[0]}.",
        "",
        f"SphericalQuantizer (defaults, 32 bits) fitted on 5,000 Fashion-MNIST images in "
        f"{t_fit:.0f} s; database: the other 69,000 images and "
        f"{args.n_items - len(Xdb):,} shifted copies ({len(y_all):,} items); "
        f"{args.n_lists} cells; 1,000 queries. Direct: the estimator's codes, cells "
        f"trained on the database ({t_direct:.0f} s to index); residual: "
        f"ProductQuantizer(n_codebooks=4, n_lists={args.n_lists}) on the same embeddings, "
        f"fitted on the training embeddings ({t_residual:.0f} s fit + index).",
        "",
        *table,
        "",
    ])
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
