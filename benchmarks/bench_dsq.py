"""DSQ vs DQN vs PQ/OPQ on digits, and sparse DSQ: mAP and lookup-table time.

Protocol (as the tests): ``load_digits``, a fixed-seed permutation, 1000
training items, 297 queries, database = every non-query item (1500, training
items included, the ``database="rest"`` protocol). mAP@all over the whole
database; "exact" is the same model searched with its un-quantized embedding
(inner product for DSQ, Euclidean for DQN and PQ/OPQ), so ``exact - AQD`` is
the quantization gap.

Lookup tables: building the ``(n_queries, M, K)`` inner-product tables of the
fitted DSQ codebooks for the 297 queries at once ("batch") and one query at a
time ("1 query", per query), dense ``Z @ C^T`` (BLAS) vs sparse CSR codebooks,
medians of ``--repeat`` runs, one thread.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_dsq.py            # ~5 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/bench_dsq.py --quick    # fewer epochs
"""

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from skquant import ProductQuantizer
from skquant._additive import (
    inner_product_tables,
    project_sparse,
    sparse_codebooks_csr,
)
from skquant._deep._dsq import SphericalQuantizer
from skquant.metrics import mean_average_precision

try:  # DeepQuantizer may be absent from older checkouts
    from skquant import DeepQuantizer
except ImportError:  # pragma: no cover
    DeepQuantizer = None


def split(seed=0):
    X, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(seed).permutation(len(X))
    train, query = perm[:1000], perm[1000:1297]
    database = np.setdiff1d(perm, query)
    return X, y, train, query, database


def exact_ranking(Zq, Zd, metric):
    if metric == "inner_product":
        score = -(Zq @ Zd.T)
    else:
        score = (Zd**2).sum(1)[None, :] - 2.0 * Zq @ Zd.T
    return np.argsort(score, axis=1, kind="stable")


def evaluate(model, X, y, query, database, metric):
    model.index(X[database], y[database])
    ind = model.kneighbors(X[query], n_neighbors=len(database), return_distance=False)
    aqd = mean_average_precision(y[query], y[database], ind)
    Zq = model.transform(X[query]).astype(np.float64)
    Zd = model.transform(X[database]).astype(np.float64)
    exact = mean_average_precision(y[query], y[database], exact_ranking(Zq, Zd, metric))
    return aqd, exact


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def table_times(model, X_query, repeat):
    """Median times, dense vs sparse (CSR) codebooks of one fitted model.

    Returns (LUT batch ms dense, sparse; LUT 1 query us dense, sparse;
    kneighbors(k=10) of the whole query batch ms dense, sparse). Sparse
    entries are NaN for dense codebooks.
    """
    C = model.codebooks_
    dense_model = model.sparsity is None
    csr = None if dense_model else sparse_codebooks_csr(C)
    Z = np.ascontiguousarray(model.transform(X_query), dtype=np.float32)
    one = Z[:1]
    n1 = max(repeat * 10, 50)

    def both(fn, n):
        d = median_time(lambda: fn(None), n)
        return d, (np.nan if csr is None else median_time(lambda: fn(csr), n))

    lut = both(lambda c: inner_product_tables(Z, C, csr=c, negate=True), repeat)
    lut1 = both(lambda c: inner_product_tables(one, C, csr=c, negate=True), n1)
    saved = model.quantizer_.csr

    def knn(c):
        model.quantizer_.csr = c
        model.kneighbors(X_query, n_neighbors=10)

    try:
        kn = both(knn, max(repeat // 2, 3))
    finally:
        model.quantizer_.csr = saved
    return [
        lut[0] * 1e3,
        lut[1] * 1e3,
        lut1[0] * 1e6,
        lut1[1] * 1e6,
        kn[0] * 1e3,
        kn[1] * 1e3,
    ]


def kernel_table(repeat, seed=0):
    """LUT build on random s-sparse codebooks (M K = 1024), no training."""
    rng = np.random.default_rng(seed)
    lines = [
        "| D | s | queries | dense | sparse (CSR) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for D in (64, 256):
        C = rng.standard_normal((4, 256, D)).astype(np.float32)
        for s in (2, 8, 16, 32):
            Cs = project_sparse(C, s)
            csr = sparse_codebooks_csr(Cs)
            for n in (1, 297):
                Z = rng.standard_normal((n, D)).astype(np.float32)
                r = repeat if n > 1 else repeat * 10
                d = median_time(
                    lambda Z=Z, Cs=Cs: inner_product_tables(Z, Cs, negate=True), r
                )
                sp_ = median_time(
                    lambda Z=Z, Cs=Cs, csr=csr: inner_product_tables(
                        Z, Cs, csr=csr, negate=True
                    ),
                    r,
                )
                unit, f = ("us", 1e6) if n == 1 else ("ms", 1e3)
                lines.append(
                    f"| {D} | {s} | {n} | {d * f:.3g} {unit} | {sp_ * f:.3g} {unit} "
                    f"| {d / sp_:.2f}x |"
                )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    X, y, train, query, database = split(args.seed)
    epochs = 20 if args.quick else 50
    rows = []

    def add(method, bits, sparsity, model, metric, fit_s, times=None):
        aqd, exact = evaluate(model, X, y, query, database, metric)
        rows.append((method, bits, sparsity, aqd, exact, fit_s, times))
        print(
            f"  {method} {bits} bits s={sparsity}: mAP {aqd:.4f} (exact {exact:.4f})",
            flush=True,
        )

    def fit(model):
        tic = time.perf_counter()
        model.fit(X[train], y[train])
        return model, time.perf_counter() - tic

    for bits in (16, 32, 64):
        M = bits // 8
        for rotation, name in ((False, "PQ"), (True, "OPQ")):
            m, t = fit(
                ProductQuantizer(M, 256, rotation=rotation, random_state=args.seed)
            )
            add(name, bits, "", m, "euclidean", t)
        if DeepQuantizer is not None:
            m, t = fit(
                DeepQuantizer(
                    M,
                    256,
                    embedding_dim=64,
                    max_iter=max(epochs, 20),
                    warmup_epochs=min(10, epochs // 4),
                    device="cpu",
                    random_state=args.seed,
                )
            )
            add("DQN", bits, "", m, "euclidean", t)
        m, t = fit(
            SphericalQuantizer(
                M, 256, max_iter=epochs, device="cpu", random_state=args.seed
            )
        )
        add(
            "DSQ",
            bits,
            "64/64",
            m,
            "inner_product",
            t,
            table_times(m, X[query], args.repeat),
        )

    for s in (32, 16, 8, 4, 2):
        m, t = fit(
            SphericalQuantizer(
                4,
                256,
                sparsity=s,
                max_iter=epochs,
                device="cpu",
                random_state=args.seed,
            )
        )
        add(
            "sparse DSQ",
            32,
            f"{s}/64",
            m,
            "inner_product",
            t,
            table_times(m, X[query], args.repeat),
        )

    print()
    print(
        "| method | bits | non-zeros per codeword | mAP@all AQD | mAP@all exact | gap "
        "| fit s | LUT 297 q dense ms | sparse ms | speed-up "
        "| LUT 1 q dense us | sparse us | speed-up | kneighbors 297 q dense ms "
        "| sparse ms |"
    )
    print("|" + "---|" * 15)
    for method, bits, sparsity, aqd, exact, fit_s, times in rows:
        cells = [
            method,
            bits,
            sparsity,
            f"{aqd:.4f}",
            f"{exact:.4f}",
            f"{exact - aqd:+.4f}",
            f"{fit_s:.1f}",
        ]
        if times is None:
            cells += [""] * 8
        else:
            db, sb, d1, s1, dk, sk = times
            if np.isnan(sb):
                cells += [f"{db:.3f}", "", "", f"{d1:.1f}", "", "", f"{dk:.1f}", ""]
            else:
                cells += [
                    f"{db:.3f}",
                    f"{sb:.3f}",
                    f"{db / sb:.2f}x",
                    f"{d1:.1f}",
                    f"{s1:.1f}",
                    f"{d1 / s1:.2f}x",
                    f"{dk:.1f}",
                    f"{sk:.1f}",
                ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()
    print("Lookup-table kernel alone, random s-sparse codebooks, M K = 1024, medians:")
    print()
    print(kernel_table(args.repeat, args.seed))


if __name__ == "__main__":
    main()
