"""Choose DeepQuantizer / SphericalQuantizer defaults on validation splits.

The defaults of the deep estimators are chosen here, never on the queries of
``bench_quality.py``: the 5,000 Fashion-MNIST training images of its protocol
(500 per class, seed 0) are cut, per split seed, into 350 images per class to
fit, 50 validation queries and 100 validation database items per class. Each
setting is fitted on three such splits (seeds 0, 1, 2) and reported as the
mean mAP@all, P@1 and share of queries with a tie at rank 1 (two best items at
the same distance) of the library's ``kneighbors``.

Ties at rank 1 only show in a large database, so ``--fitted-in-database``
also indexes the 3,500 fitted images (4,500 items); use it to choose settings
that act on ties (``tie_break``), and the plain split for everything else.

Usage::

    python benchmarks/validate_defaults.py dqn '{"defaults": {}, "T2": {"temperature": 2}}'
    python benchmarks/validate_defaults.py dsq '{"tb0": {"tie_break": 0}}' --fitted-in-database

``--cnn`` fits every setting with ``bench_quality.py``'s small CNN backbone
(``input_shape=(1, 28, 28)``), as its ``--cnn`` rows; about 2 minutes a fit
on one CPU thread.

Prints one line per setting (and the CPU model and thread count). Use 1
thread on a shared machine (``--threads 1``): fits are small.
"""

# SPDX-License-Identifier: BSD-3-Clause

import argparse
import json
import time

import numpy as np
# benchmarks/ is on sys.path when run as a script.
from bench_quality import load_dataset, small_cnn
from bench_search import _cpu_model


def validation_splits(y_train, seed):
    """(fit, queries, database) positions within the 5,000 training images."""
    rng = np.random.RandomState(seed)
    fit, queries, database = [], [], []
    for c in np.unique(y_train):
        idx = rng.permutation(np.flatnonzero(y_train == c))
        fit += list(idx[:350])
        queries += list(idx[350:400])
        database += list(idx[400:500])
    return np.array(fit), np.array(queries), np.array(database)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("dqn", "dsq"))
    parser.add_argument("settings", help='JSON: {"name": {param: value, ...}, ...}')
    parser.add_argument("--fitted-in-database", action="store_true")
    parser.add_argument("--cnn", action="store_true",
                        help="bench_quality's small CNN backbone, input_shape=(1, 28, 28)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from skquant import DeepQuantizer, SphericalQuantizer
    from skquant.metrics import mean_average_precision, precision_at_k

    torch.set_num_threads(args.threads)
    print(f"CPU: {_cpu_model()}, torch threads: {args.threads}")
    # The training images of bench_quality's protocol (its split, seed 0).
    data = load_dataset("fashion_mnist")
    if data is None:
        raise SystemExit("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    X_train, y_train = data["X"][data["train"]], data["y"][data["train"]]
    estimator = {"dqn": DeepQuantizer, "dsq": SphericalQuantizer}[args.method]
    for name, params in json.loads(args.settings).items():
        rows, start = [], time.perf_counter()
        for seed in args.seeds:
            fit, queries, database = validation_splits(y_train, seed)
            if args.fitted_in_database:
                database = np.r_[database, fit]
            if args.cnn:
                params = dict(params, backbone=small_cnn(), input_shape=(1, 28, 28))
            est = estimator(random_state=seed, **params).fit(X_train[fit], y_train[fit])
            est.index(X_train[database], y_train[database])
            dist, ranking = est.kneighbors(X_train[queries], n_neighbors=len(database))
            y_q, y_db = y_train[queries], y_train[database]
            rows.append((
                mean_average_precision(y_q, y_db, ranking),
                precision_at_k(y_q, y_db, ranking, 1),
                np.mean(dist[:, 0] == dist[:, 1]),
            ))
        m_ap, p1, ties = np.mean(rows, axis=0)
        print(f"{args.method}{' cnn' if args.cnn else ''} {name:24s} mAP@all {m_ap:.4f}  P@1 {p1:.3f}  "
              f"ties@1 {ties:.2f}  per split {np.round([r[0] for r in rows], 4)}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
