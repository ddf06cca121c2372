"""DQN ablations on digits: cosine vs inner-product loss, joint vs two-step.

Reproduces the ablation study of the DQN paper (Cao et al., AAAI 2016,
"Empirical Analysis") on scikit-learn's digits with the library defaults:

- ``DQN``      : pairwise cosine loss + product quantization loss, trained
  jointly (``DeepQuantizer()``);
- ``DQN_ip``   : the inner-product loss ``(s_ij - <z_i, z_j> / D)^2``
  instead of the cosine loss (``loss="inner_product"``);
- ``DQN_2+``   : two steps, the embedding learnt with the cosine loss alone,
  then quantized by OPQ (``joint=False``);
- ``PQ`` / ``OPQ`` on the raw pixels, for reference.

Protocol: for each seed, a random permutation of the 1,797 digits gives
1,000 training images, 297 queries and a 500-image database (the rest); mAP
over the whole database (relevance: same digit). Each (method, code length)
is run for several seeds; the table shows medians (and min-max) of the AQD
mAP, the mAP of exact Euclidean and cosine search on the unquantized
embedding, and the fit time.

Run::

    python benchmarks/bench_dqn_ablation.py            # 5 seeds, 12 and 32 bits
    python benchmarks/bench_dqn_ablation.py --seeds 2 --bits 32
"""

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from skquant import DeepQuantizer, ProductQuantizer
from skquant.metrics import mean_average_precision

# bits -> (n_codebooks, n_codewords); 12 bits cannot use K = 256.
CODES = {8: (2, 16), 12: (2, 64), 16: (2, 256), 24: (3, 256), 32: (4, 256)}

METHODS = {
    "DQN": dict(kind="dqn"),
    "DQN_ip": dict(kind="dqn", loss="inner_product"),
    "DQN_2+": dict(kind="dqn", joint=False),
    "PQ (pixels)": dict(kind="pq"),
    "OPQ (pixels)": dict(kind="pq", rotation=True),
}


def _exact_map(Zq, Zd, yq, yd, metric):
    if metric == "cosine":
        Zq = Zq / np.maximum(np.linalg.norm(Zq, axis=1, keepdims=True), 1e-12)
        Zd = Zd / np.maximum(np.linalg.norm(Zd, axis=1, keepdims=True), 1e-12)
    d = (
        (Zq.astype(np.float64) ** 2).sum(1)[:, None]
        - 2 * Zq.astype(np.float64) @ Zd.T.astype(np.float64)
        + (Zd.astype(np.float64) ** 2).sum(1)[None, :]
    )
    return mean_average_precision(yq, yd, np.argsort(d, axis=1, kind="stable"))


def run_one(method, bits, seed, X, y):
    M, K = CODES[bits]
    perm = np.random.RandomState(seed).permutation(len(X))
    tr, q, db = perm[:1000], perm[1000:1297], perm[1297:]
    params = dict(METHODS[method])
    kind = params.pop("kind")
    if kind == "dqn":
        est = DeepQuantizer(
            n_codebooks=M, n_codewords=K, device="cpu", random_state=seed, **params
        )
    else:
        # 64 pixels: the sub-space count must divide 64.
        est = ProductQuantizer(
            n_codebooks=M if 64 % M == 0 else 4, n_codewords=K,
            random_state=seed, **params,
        )
    tic = time.perf_counter()
    est.fit(X[tr], y[tr])
    fit_time = time.perf_counter() - tic
    est.index(X[db], y[db])
    row = {"map": est.score(X[q], y[q]), "time": fit_time}
    if kind == "dqn":
        Zq, Zd = est.transform(X[q]), est.transform(X[db])
        row["exact_euclidean"] = _exact_map(Zq, Zd, y[q], y[db], "euclidean")
        row["exact_cosine"] = _exact_map(Zq, Zd, y[q], y[db], "cosine")
    return row


def _fmt(values):
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.all(np.isnan(values)):
        return "-"
    return f"{np.median(values):.3f} ({values.min():.3f}-{values.max():.3f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds")
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 32],
                        choices=sorted(CODES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for tiny MLPs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    X, y = load_digits(return_X_y=True)

    print(f"digits, 1000 train / 297 queries / 500 database, {args.seeds} seeds; "
          "median (min-max) over seeds\n")
    print("| bits | method | mAP (AQD) | exact Euclidean mAP | exact cosine mAP "
          "| fit time (s) |")
    print("|---|---|---|---|---|---|")
    for bits in args.bits:
        M, K = CODES[bits]
        for method in METHODS:
            rows = [run_one(method, bits, seed, X, y) for seed in range(args.seeds)]
            col = {k: [r.get(k, np.nan) for r in rows]
                   for k in ("map", "exact_euclidean", "exact_cosine", "time")}
            print(
                f"| {bits} (M={M}, K={K}) | {method} | {_fmt(col['map'])} "
                f"| {_fmt(col['exact_euclidean'])} | {_fmt(col['exact_cosine'])} "
                f"| {np.median(col['time']):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
