"""Retrieval quality of skquant's quantizers on real labelled data.

Data sets (nothing is downloaded; a missing set is skipped with a message):

- **Fashion-MNIST** (70,000 28x28 grey images, 10 classes), from Debian's
  ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``)
  or ``--data-home``. Protocol of DQN/DSQ on CIFAR-10: 100 queries and 500
  training images per class (1,000 queries, 5,000 training images), database =
  every non-query image (69,000, training images included). Pixels scaled to
  [0, 1].
- **Yeast** (2,417 genes x 103 features, 14 labels, multi-label), shipped
  inside the ``river`` package. Relevance: sharing at least one label. The
  rarest label has only 34 genes, so the per-label protocol (100 queries per
  label) cannot be drawn: 500 random queries and 1,200 random training genes
  (``retrieval_split(..., per_class=False)``), database = every non-query gene
  (1,917). PQ/OPQ need a dimension divisible by the number of sub-spaces and
  103 is prime, so PQ/OPQ see the features padded with one zero column (104;
  distances are unchanged).

Methods, each at 16, 32 and 64 bits (256 codewords, 2, 4 or 8 codebooks):
``pq`` and ``opq`` (:class:`skquant.ProductQuantizer`, unsupervised, on the
raw inputs), ``dqn`` (:class:`skquant.DeepQuantizer`) and ``dsq``
(``SphericalQuantizer``), all with their default settings unless ``--params``
overrides some. References: exact float search on the raw inputs (Euclidean)
and on each learned embedding (the metric its AQD search approximates:
inner product for the default posterior embeddings, Euclidean for DQN's
pairwise losses). The bar every supervised row is read against is the
``classifier`` row: the same network (MLP, or the small CNN with ``--cnn``)
trained with cross-entropy alone, the database ranked by the inner product
of its class-probability vectors (per-label sigmoids on Yeast), in float,
uncompressed (Sablayrolles et al., "How should we evaluate supervised
hashing?", ICASSP 2017).

Reported per row: mAP@all (whole database ranked), mAP@1000, precision@100,
P@1, the share of queries whose two best items have the same score (a tie at
rank 1, broken by lower database index), fit time (``fit`` on the training set, which also indexes it), encode time
(``index`` of the database), query time (``kneighbors`` of all queries for
the top 1000, per query, embedding included), and the exact-search mAP@all
of the method's own embedding. Ranking is always the library's
``kneighbors`` (AQD); the metrics are :mod:`skquant.metrics`.

Extras (flags): ``--multilabel`` (Yeast: DeepQuantizer trained on the
multi-label ``y`` vs the same model trained on the first label only, all
evaluated with multi-label relevance) and ``--cnn`` (Fashion-MNIST: a small
convolutional backbone with ``input_shape=(1, 28, 28)`` vs the MLP default,
32 bits; slow on a CPU).

Results are merged into ``benchmarks/results/quality.json`` (so parts can be
rerun) and rendered to ``benchmarks/results/quality.md`` plus the PR and
precision@R plots ``benchmarks/results/quality_<dataset>.png``
(:class:`skquant.metrics.RetrievalCurveDisplay`).

Usage::

    python benchmarks/bench_quality.py                       # everything
    python benchmarks/bench_quality.py --datasets yeast --multilabel
    python benchmarks/bench_quality.py --datasets fashion_mnist --methods dqn \\
        --bits 32 --params "dqn:max_iter=100,learning_rate=3e-3" --tag tuned
    python benchmarks/bench_quality.py --report-only         # re-render md/png

Timings use ``--threads`` threads (torch and BLAS/OpenMP, default 2).
"""

# SPDX-License-Identifier: BSD-3-Clause

import argparse
import ast
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL_DATASETS = ("fashion_mnist", "yeast")
ALL_METHODS = ("pq", "opq", "classifier", "dqn", "dsq")
ALL_BITS = (16, 32, 64)
N_CODEWORDS = 256
TOP_K = 1000  # mAP@1000 and the query-time cut-off
PRECISION_K = 100
# Points kept of each curve in the json (the full curves have N_db points).
CURVE_POINTS = 400
LABELS = {
    "pq": "PQ",
    "opq": "OPQ",
    "classifier": "classifier (uncompressed)",
    "dqn": "DQN",
    "dsq": "DSQ",
}
# The classifier row: the deep quantizers' network with a class (or label)
# output, trained with cross-entropy alone; the database is ranked by the
# inner product of its class-probability vectors (per-label sigmoids for
# multi-label y), in float, uncompressed. Same schedule as DeepQuantizer's
# defaults (Adam, batch 128, 60 epochs); ``--params classifier:augment=shift``
# trains it on shifted images as the deep quantizers' ``augment="shift"``.
CLASSIFIER = {"max_iter": 60, "learning_rate": 1e-3, "batch_size": 128,
              "weight_decay": 0.0}


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def load_dataset(name, data_home=None, seed=0):
    """Bunch-like dict with the split arrays, or None (and a message) if absent."""
    from skquant.datasets import load_fashion_mnist, load_yeast, retrieval_split

    if name == "fashion_mnist":
        try:
            X, y = load_fashion_mnist(data_home, return_X_y=True)
        except FileNotFoundError as exc:
            print(f"[skip] Fashion-MNIST: {exc}", file=sys.stderr)
            return None
        X = X.astype(np.float32) / 255.0
        q, tr, db = retrieval_split(
            y,
            n_query=100,
            n_train=500,
            per_class=True,
            database="rest",
            random_state=seed,
        )
        split = "100 queries + 500 training images per class; database = rest"
        X_pq = X
    elif name == "yeast":
        try:
            X, y = load_yeast(return_X_y=True)
        except ImportError as exc:
            print(f"[skip] Yeast: {exc}", file=sys.stderr)
            return None
        X = X.astype(np.float32)
        q, tr, db = retrieval_split(
            y,
            n_query=500,
            n_train=1200,
            per_class=False,
            database="rest",
            random_state=seed,
        )
        split = "500 random queries, 1200 random training genes; database = rest"
        # 103 is prime: one zero column lets PQ cut 2, 4 or 8 sub-spaces.
        X_pq = np.hstack([X, np.zeros((len(X), 1), dtype=np.float32)])
    else:
        raise ValueError(name)
    return {
        "name": name,
        "X": X,
        "X_pq": X_pq,
        "y": y,
        "query": q,
        "train": tr,
        "database": db,
        "split": split,
    }


# --------------------------------------------------------------------------- #
# Estimators
# --------------------------------------------------------------------------- #
def small_cnn():
    """Two conv blocks for 28x28 grey images (about 1.2 M multiply-adds).

    BatchNorm matters for DQN here: without it the same network's embedding
    scored mAP@all 0.750 (60 epochs; 0.702 at 30, 0.737 at 120, 0.668 with
    learning_rate=1e-3, 0.715 with 1e-2), with it 0.767 (exact search on the
    embedding, this protocol, seed 0).
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
    )


def make_estimator(method, bits, *, seed, device, params):
    import skquant

    n_books = bits // 8  # 256 codewords = 8 bits per codebook
    if method in ("pq", "opq"):
        return skquant.ProductQuantizer(
            n_codebooks=n_books,
            n_codewords=N_CODEWORDS,
            rotation=method == "opq",
            random_state=seed,
            **params,
        )
    if method == "dqn":
        return skquant.DeepQuantizer(
            n_codebooks=n_books,
            n_codewords=N_CODEWORDS,
            device=device,
            random_state=seed,
            **params,
        )
    if method == "dsq":
        return get_spherical_quantizer()(
            n_codebooks=n_books,
            n_codewords=N_CODEWORDS,
            device=device,
            random_state=seed,
            **params,
        )
    raise ValueError(method)


def get_spherical_quantizer():
    import skquant

    if hasattr(skquant, "SphericalQuantizer"):
        return skquant.SphericalQuantizer
    from skquant._deep._dsq import SphericalQuantizer

    return SphericalQuantizer


def parse_params(specs):
    """``["dqn:max_iter=100,learning_rate=3e-3", ...]`` -> {method: {..}}."""
    out = {}
    for spec in specs or []:
        method, _, body = spec.partition(":")
        kv = out.setdefault(method.strip(), {})
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            try:
                kv[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kv[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #
def full_ranking(est, X_query, n_database, chunk=100):
    """Whole-database AQD ranking of every query (int32), via kneighbors."""
    out = np.empty((len(X_query), n_database), dtype=np.int32)
    for start in range(0, len(X_query), chunk):
        stop = min(start + chunk, len(X_query))
        out[start:stop] = est.kneighbors(
            X_query[start:stop], n_neighbors=n_database, return_distance=False
        )
    return out


def exact_ranking(Q, D, metric="euclidean", chunk=100):
    """Exact float ranking (stable: ties by lower index), chunked over queries."""
    Q = np.asarray(Q, dtype=np.float32)
    D = np.asarray(D, dtype=np.float32)
    sq = np.einsum("ij,ij->i", D, D)
    out = np.empty((len(Q), len(D)), dtype=np.int32)
    for start in range(0, len(Q), chunk):
        G = Q[start : start + chunk] @ D.T
        # Squared distance up to the per-query constant ||q||^2.
        score = sq - 2 * G if metric == "euclidean" else -G
        out[start : start + chunk] = np.argsort(score, axis=1, kind="stable")
    return out


def _curve_sample(n):
    """Ranks (1-based) kept for the stored curves: dense up to TOP_K, then
    geometric to the end."""
    head = np.unique(np.linspace(1, min(n, TOP_K), CURVE_POINTS // 2).astype(int))
    tail = np.unique(np.geomspace(min(n, TOP_K), n, CURVE_POINTS // 2).astype(int))
    return np.unique(np.concatenate([head, tail, [n]]))


def ranking_metrics(y_query, y_database, ranking):
    from skquant.metrics import (
        mean_average_precision,
        precision_at_k,
        retrieval_precision_recall_curve,
    )

    top = min(TOP_K, ranking.shape[1])
    res = {
        "map_all": mean_average_precision(y_query, y_database, ranking),
        "map_1000": mean_average_precision(y_query, y_database, ranking, top_k=top),
        "p_100": precision_at_k(y_query, y_database, ranking, PRECISION_K),
    }
    precision, recall, ranks = retrieval_precision_recall_curve(
        y_query, y_database, ranking
    )
    keep = _curve_sample(len(ranks)) - 1
    res["curve"] = {
        "ranks": ranks[keep].tolist(),
        "precision": np.round(precision[keep], 5).tolist(),
        "recall": np.round(recall[keep], 5).tolist(),
    }
    return {k: (float(v) if k != "curve" else v) for k, v in res.items()}


def relevant_share(data):
    """Mean share of the database relevant to a query: the precision (and
    about the mAP) of a random ranking."""
    y, q, db = data["y"], data["query"], data["database"]
    if y.ndim == 1:
        counts = np.bincount(y[db], minlength=y.max() + 1)
        return float(np.mean(counts[y[q]] / len(db)))
    return float(np.mean((y[q] @ y[db].T) > 0))


def run_exact_raw(data):
    X, y = data["X"], data["y"]
    q, db = data["query"], data["database"]
    start = time.perf_counter()
    ranking = exact_ranking(X[q], X[db])
    elapsed = time.perf_counter() - start
    res = ranking_metrics(y[q], y[db], ranking)
    res.update(
        method="exact_raw",
        label="exact float, raw inputs",
        bits=32 * X.shape[1],
        fit_s=0.0,
        encode_s=0.0,
        query_ms=1000 * elapsed / len(q),
        params={},
        timing_note="full ranking incl. sort",
    )
    return res


def fit_classifier(X, y, *, seed, device, params):
    """The bar: the same network trained with cross-entropy only.

    Returns a function mapping inputs to class-probability vectors (softmax;
    per-label sigmoids for a 2-D indicator ``y``).
    """
    import torch
    from torch.nn import functional as F

    from skquant._deep._torch import (
        build_embedding_network,
        embed,
        iter_minibatches,
        make_generator,
        make_optimizer,
        prepare_labels,
        random_shift,
        resolve_device,
        torch_rng_context,
        torch_seed,
    )

    cfg = dict(CLASSIFIER, **params)
    labels = prepare_labels(y)
    multilabel = labels.ndim == 2
    n_out = labels.shape[1] if multilabel else int(labels.max()) + 1
    device = resolve_device(device)
    seed = torch_seed(seed)
    X32 = np.require(X, np.float32, ["C", "W"])
    Xt = torch.from_numpy(X32)
    with torch_rng_context(seed, device):
        net = build_embedding_network(
            X32,
            embedding_dim=n_out,
            backbone=cfg.get("backbone"),
            hidden_layer_sizes=cfg.get("hidden_layer_sizes", (256,)),
            input_shape=cfg.get("input_shape"),
            output="identity",
        ).to(device)
        opt = make_optimizer(
            net, learning_rate=cfg["learning_rate"], weight_decay=cfg["weight_decay"]
        )
        gen = make_generator(seed)
        shift_gen = make_generator(seed + 1)
        lab = labels.to(device)
        for _ in range(cfg["max_iter"]):
            net.train()
            for idx in iter_minibatches(len(X32), cfg["batch_size"], gen):
                x = Xt[idx].to(device)
                if cfg.get("augment") == "shift":
                    # The deep quantizers' augment="shift", same network.
                    x = random_shift(x, cfg["input_shape"], generator=shift_gen)
                logits = net(x)
                target = lab[idx.to(device)]
                if multilabel:
                    loss = F.binary_cross_entropy_with_logits(logits, target)
                else:
                    loss = F.cross_entropy(logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.cpu().eval()

    def predict_proba(X_new):
        logits = torch.from_numpy(embed(net, X_new, "cpu", 512))
        P = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
        return P.numpy()

    return predict_proba


def top_tie_share(scores_top2):
    """Share of queries whose two best database items have the same score."""
    return float(np.mean(scores_top2[:, 0] == scores_top2[:, 1]))


def run_classifier(data, *, seed, device, params, label=None):
    from skquant.metrics import precision_at_k

    X, y = data["X"], data["y"]
    q, tr, db = data["query"], data["train"], data["database"]
    start, cpu_start = time.perf_counter(), time.process_time()
    predict_proba = fit_classifier(X[tr], y[tr], seed=seed, device=device, params=params)
    fit_s = time.perf_counter() - start
    fit_cpu_s = time.process_time() - cpu_start
    start = time.perf_counter()
    P_db = predict_proba(X[db])
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    P_q = predict_proba(X[q])
    ranking = exact_ranking(P_q, P_db, "inner_product")
    query_ms = 1000 * (time.perf_counter() - start) / len(q)
    res = ranking_metrics(y[q], y[db], ranking)
    res["p_1"] = float(precision_at_k(y[q], y[db], ranking, 1))
    top2 = np.take_along_axis(
        P_q.astype(np.float32) @ P_db.astype(np.float32).T, ranking[:, :2], axis=1
    )
    res["tie_share_1"] = top_tie_share(top2)
    res.update(
        method="classifier",
        label=label or LABELS["classifier"],
        bits=32 * P_db.shape[1],
        fit_s=fit_s,
        fit_cpu_s=fit_cpu_s,
        encode_s=encode_s,
        query_ms=query_ms,
        params={k_: repr(v) for k_, v in params.items()},
        n_iter=CLASSIFIER["max_iter"],
        timing_note="full ranking incl. sort",
    )
    return res


def run_method(data, method, bits, *, seed, device, params, train_y=None, label=None):
    """Fit on the training split, index the database, rank all queries."""
    X = data["X_pq"] if method in ("pq", "opq") else data["X"]
    y = data["y"]
    q, tr, db = data["query"], data["train"], data["database"]
    est = make_estimator(method, bits, seed=seed, device=device, params=params)
    y_fit = y[tr] if train_y is None else train_y
    if method in ("pq", "opq"):
        y_fit = None  # unsupervised

    start, cpu_start = time.perf_counter(), time.process_time()
    est.fit(X[tr], y_fit)
    fit_s = time.perf_counter() - start
    # CPU seconds of all the process's threads: less sensitive than wall time
    # to other jobs on a shared machine (wall ~ cpu / threads when alone).
    fit_cpu_s = time.process_time() - cpu_start

    start = time.perf_counter()
    est.index(X[db], y[db])
    encode_s = time.perf_counter() - start

    k = min(TOP_K, len(db))
    start = time.perf_counter()
    est.kneighbors(X[q], n_neighbors=k, return_distance=False)
    query_ms = 1000 * (time.perf_counter() - start) / len(q)

    ranking = full_ranking(est, X[q], len(db))
    res = ranking_metrics(y[q], y[db], ranking)
    del ranking
    from skquant.metrics import precision_at_k

    top = est.kneighbors(X[q], n_neighbors=2, return_distance=False)
    res["p_1"] = float(precision_at_k(y[q], y[db], top, 1))
    # Ties from the AQD scores themselves (reported inner-product distances
    # are clipped at 0, which would count false ties): float64 scores of the
    # two best reconstructions; identical codes give identical scores.
    Zq = est.transform(X[q]).astype(np.float64)
    best = [est.decode(est.codes_[top[:, j]]).astype(np.float64) for j in (0, 1)]
    if est.quantizer_.metric == "euclidean":
        top2 = np.stack([((Zq - b) ** 2).sum(1) for b in best], axis=1)
    else:
        top2 = np.stack([(Zq * b).sum(1) for b in best], axis=1)
    res["tie_share_1"] = top_tie_share(top2)

    if method in ("dqn", "dsq"):
        metric = est.quantizer_.metric
        Zq, Zdb = est.transform(X[q]), est.transform(X[db])
        exact = ranking_metrics(y[q], y[db], exact_ranking(Zq, Zdb, metric))
        res["exact_embedding_map_all"] = exact["map_all"]
    res.update(
        method=method,
        label=label or LABELS[method],
        bits=bits,
        fit_s=fit_s,
        fit_cpu_s=fit_cpu_s,
        encode_s=encode_s,
        query_ms=query_ms,
        params={k_: repr(v) for k_, v in params.items()},
        n_iter=getattr(est, "n_iter_", None),
    )
    return res


# --------------------------------------------------------------------------- #
# Results store and report
# --------------------------------------------------------------------------- #
def load_store(path):
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}}


def record(store, dataset, res, tag):
    key = f"{dataset}|{res['method']}|{res['bits']}|{tag or ''}"
    res = dict(
        res, dataset=dataset, tag=tag or "", when=time.strftime("%Y-%m-%d %H:%M")
    )
    store["runs"][key] = res
    return key


def _fmt(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def _fit_time(r):
    cpu = r.get("fit_cpu_s")
    return f"{r['fit_s']:.1f}" + ("" if cpu is None else f" ({cpu:.0f})")


def _method_label(r):
    label = r["label"]
    if r.get("tag"):
        label += f" [{r['tag']}]"
    if r.get("params") and r["method"] in LABELS:
        label += " (" + ", ".join(f"{k}={v}" for k, v in r["params"].items()) + ")"
    return label


def _table(rows):
    lines = [
        "| method | bits | mAP@all | mAP@1000 | P@100 | P@1 | ties at rank 1 "
        "| exact mAP@all of its embedding "
        "| fit s (CPU s) | encode s (database) | query ms/query (top-1000) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bits = "float" if r["method"] in ("exact_raw", "classifier") else r["bits"]
        lines.append(
            f"| {_method_label(r)} | {bits} | {_fmt(r['map_all'])} | "
            f"{_fmt(r['map_1000'])} | {_fmt(r['p_100'])} | {_fmt(r.get('p_1'))} | "
            f"{_fmt(r.get('tie_share_1'), 2)} | "
            f"{_fmt(r.get('exact_embedding_map_all'))} | {_fit_time(r)} | "
            f"{r['encode_s']:.1f} | {r['query_ms']:.2f} |"
        )
    return "\n".join(lines)


def _order(r):
    order = {"exact_raw": 0, "pq": 1, "opq": 2, "classifier": 3, "dqn": 4, "dsq": 5}
    return (order.get(r["method"], 9), r.get("tag", ""), r["bits"], r["label"])


def _get(runs, dataset, method, bits, tag=""):
    return runs.get(f"{dataset}|{method}|{bits}|{tag}")


def _must_show(runs):
    """The issue's 'Must show' checks, from whatever has been run."""
    out = []
    clf = _classifier_row(runs, "fashion_mnist", "")
    for method in ("dqn", "dsq"):
        r = _get(runs, "fashion_mnist", method, 32)
        opq64 = _get(runs, "fashion_mnist", "opq", 64)
        if r is None:
            continue
        line = (
            f"- Fashion-MNIST, {LABELS[method]} 32 bits, defaults: mAP@all "
            f"{r['map_all']:.3f}"
        )
        if clf is not None:
            bar = clf["map_all"] + 0.02
            line += (
                f" (target: the classifier row {clf['map_all']:.3f} + 0.02 = "
                f"{bar:.3f}: {'met' if r['map_all'] >= bar else 'MISSED'})"
            )
        line += (
            f", fit {r['fit_s']:.0f} s (target <= 180 s: "
            f"{'met' if r['fit_s'] <= 180 else 'MISSED'})"
        )
        if opq64 is not None:
            line += (
                f"; OPQ 64 bits {opq64['map_all']:.3f} "
                f"({'beaten' if r['map_all'] > opq64['map_all'] else 'NOT beaten'})"
            )
        out.append(line + ".")
    for (dataset, tag), rows in _tags(runs).items():
        if dataset != "fashion_mnist" or not tag or "previous defaults" in tag:
            continue
        for r in rows:
            line = (
                f"- Fashion-MNIST, {_method_label(r)}, {r['bits']} bits: mAP@all "
                f"{r['map_all']:.3f}, fit {r['fit_s']:.0f} s"
            )
            mlp = _get(runs, "fashion_mnist", r["method"], r["bits"])
            bar = _classifier_row(runs, "fashion_mnist", tag)
            if r["method"] != "classifier" and bar is not None:
                line += (
                    f"; its classifier row {bar['map_all']:.3f} "
                    f"({'beaten' if r['map_all'] > bar['map_all'] else 'NOT beaten'})"
                )
            if tag == "cnn" and mlp is not None and r["method"] != "classifier":
                beats = r["map_all"] > mlp["map_all"]
                line += (
                    f"; the MLP default {mlp['map_all']:.3f} "
                    f"({'beaten' if beats else 'NOT beaten'})"
                )
            out.append(line + ".")
    raw = _get(runs, "fashion_mnist", "exact_raw", 32 * 784)
    if raw is not None:
        out.append(
            f"- Fashion-MNIST exact kNN on raw pixels: mAP@all {raw['map_all']:.3f}."
        )
    ml, first = (
        _get(runs, "yeast", "dqn", 32, t) for t in ("multi-label", "first-label")
    )
    pq = _get(runs, "yeast", "pq", 32)
    if ml and first:
        line = (
            f"- Yeast, DQN 32 bits: multi-label y {ml['map_all']:.3f} vs first label "
            f"only {first['map_all']:.3f}"
        )
        if pq:
            line += f", PQ on raw features {pq['map_all']:.3f}"
        verdict = ml["map_all"] > first["map_all"] and (
            pq is None or ml["map_all"] > pq["map_all"]
        )
        out.append(line + f" ({'met' if verdict else 'MISSED'}).")
    return out


def _classifier_row(runs, dataset, tag):
    for r in runs.values():
        if (r["dataset"], r["method"], r.get("tag", "")) == (dataset, "classifier", tag):
            return r
    return None


def _tags(runs):
    groups = {}
    for r in runs.values():
        groups.setdefault((r["dataset"], r.get("tag", "")), []).append(r)
    return groups


TITLES = {
    "fashion_mnist": "Fashion-MNIST (70,000 images, 10 classes)",
    "yeast": "Yeast (2,417 genes, 14 labels, multi-label: relevant = share a label)",
}


def write_report(store, out_dir, context):
    runs = store["runs"]
    md = [
        "# Retrieval quality on real data",
        "",
        "Written by `benchmarks/bench_quality.py` (see its docstring for the protocol);",
        "edit the script, not this file. Ranking is the library's `kneighbors` (AQD",
        "over codes of 256 codewords: 16/32/64 bits = 2/4/8 codebooks); metrics from",
        "`skquant.metrics` (mAP counts queries with no relevant item as 0). 'exact mAP@all",
        "of its embedding' ranks the database by exact float distance on the method's",
        "own embedding (the metric of its AQD: inner product for the posterior",
        "embeddings, Euclidean for DQN's pairwise losses), i.e. without quantization.",
        "The `classifier` row (the same network trained with cross-entropy, database",
        "ranked by the inner product of class-probability vectors, uncompressed) is the",
        "bar. P@1 and 'ties at rank 1' (share of queries whose two best items score the",
        "same; ties go to the lower database index) show the top of the list.",
        "Fit = `fit` on the training split; encode = `index` of the",
        "database; query = `kneighbors` of all queries for the top 1000, per query.",
        "Rows tagged 'previous defaults' were measured before issue 14's defaults",
        "(DQN: loss='cosine', learning_rate=3e-3; DSQ: loss='dsq').",
        "",
        f"Machine: {context['machine']}. {context['note']}",
        "",
    ]
    checks = _must_show(runs)
    if checks:
        md += ["## The issue's targets", ""] + checks + [""]
    for (dataset, tag), rows in sorted(_tags(runs).items()):
        rows = sorted(rows, key=_order)
        title = TITLES.get(dataset, dataset)
        if tag:
            title += f" — {tag}"
        n = {k: rows[0].get(k) for k in ("n_query", "n_train", "n_database", "split")}
        md += [f"## {title}", ""]
        if n["split"]:
            md += [
                f"Split: {n['split']} ({n['n_query']} queries, {n['n_train']} "
                f"training, {n['n_database']} database items; seed 0). A random "
                f"ranking scores about {rows[0].get('chance', float('nan')):.3f} "
                "(the mean share of the database relevant to a query).",
                "",
            ]
        md += [_table(rows), ""]
        if not tag:
            md += [f"Plot: `quality_{dataset}.png` (PR and precision@R curves).", ""]
    md += ["## Commands", "", "```"] + store.get("commands", []) + ["```", ""]
    (out_dir / "quality.md").write_text("\n".join(md))
    print(f"wrote {out_dir / 'quality.md'}")
    plot_curves(runs, out_dir)


def plot_curves(runs, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[skip] plots: matplotlib is not installed", file=sys.stderr)
        return
    from skquant.metrics import RetrievalCurveDisplay

    for dataset in sorted({r["dataset"] for r in runs.values()}):
        # Default settings, plus the CNN-backbone variants (32 bits).
        rows = [
            r
            for r in runs.values()
            if r["dataset"] == dataset and r.get("tag", "") in ("", "cnn")
        ]
        refs = ("exact_raw", "classifier")  # drawn in every code-length panel
        bits = sorted({r["bits"] for r in rows if r["method"] not in refs})
        if not bits:
            continue
        raw = [r for r in rows if r["method"] in refs]
        fig, axes = plt.subplots(
            len(bits), 2, figsize=(11, 4.2 * len(bits)), squeeze=False
        )
        for i, b in enumerate(bits):
            sel = raw + sorted((r for r in rows if r["bits"] == b), key=_order)
            for r in sel:
                c = r["curve"]
                style = (
                    {"linestyle": "--", "color": "0.4"}
                    if r["method"] == "exact_raw"
                    else {"linestyle": ":", "color": "k"}
                    if r["method"] == "classifier"
                    else {}
                )
                for j, kind in enumerate(("precision_recall", "precision_at_k")):
                    RetrievalCurveDisplay(
                        precision=np.asarray(c["precision"]),
                        recall=np.asarray(c["recall"]),
                        ranks=np.asarray(c["ranks"]),
                        kind=kind,
                        mean_ap=r["map_all"],
                        name=r["label"],
                    ).plot(ax=axes[i, j], **style)
            axes[i, 0].set_title(
                f"{TITLES.get(dataset, dataset).split(' (')[0]}, {b} bits: precision-recall"
            )
            axes[i, 1].set_title(f"{b} bits: precision@top-R")
            axes[i, 1].set_xlim(0, min(TOP_K, max(sel[0]["curve"]["ranks"])))
            for ax in axes[i]:
                ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"quality_{dataset}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        print(f"wrote {path}")


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=list(ALL_DATASETS), choices=ALL_DATASETS
    )
    parser.add_argument(
        "--methods", nargs="*", default=list(ALL_METHODS), choices=ALL_METHODS
    )
    parser.add_argument(
        "--bits", nargs="+", type=int, default=list(ALL_BITS), choices=ALL_BITS
    )
    parser.add_argument(
        "--no-raw", action="store_true", help="skip the exact raw-input reference"
    )
    parser.add_argument(
        "--multilabel",
        action="store_true",
        help="Yeast: DQN on multi-label y vs on the first label only",
    )
    parser.add_argument(
        "--cnn",
        action="store_true",
        help="Fashion-MNIST: small CNN backbone (32 bits), slow on CPU",
    )
    parser.add_argument(
        "--params",
        action="append",
        default=[],
        help='overrides, e.g. "dqn:max_iter=100,learning_rate=3e-3"',
    )
    parser.add_argument(
        "--tag", default="", help="name of a variant (kept apart from the default rows)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-home", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--note", default="", help="free text about the machine load, put in the report"
    )
    args = parser.parse_args(argv)

    # Before torch/BLAS spin up their pools.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")

    args.out.mkdir(parents=True, exist_ok=True)
    store_path = args.out / "quality.json"
    store = load_store(store_path)
    store.setdefault("commands", [])
    context = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} threads, device {args.device}",
        "note": args.note or store.get("note", ""),
    }
    store["note"] = context["note"]
    if args.report_only and args.note:
        store_path.write_text(json.dumps(store, separators=(",", ":")))

    if not args.report_only:
        params = parse_params(args.params)
        written = []
        cmd = "python benchmarks/bench_quality.py " + " ".join(
            f'"{a}"' if (" " in a or "," in a) else a for a in (argv or sys.argv[1:])
        )
        if cmd not in store["commands"]:
            store["commands"].append(cmd)

        def save():
            # Merge into what is on disk now: another run may have added rows.
            disk = load_store(store_path)
            disk["runs"].update({k: store["runs"][k] for k in written})
            disk["commands"] = list(
                dict.fromkeys(disk.get("commands", []) + store["commands"])
            )
            disk["note"] = store["note"]
            store_path.write_text(json.dumps(disk, separators=(",", ":")))
            store.update(disk)

        for name in args.datasets:
            data = load_dataset(name, args.data_home, seed=args.seed)
            if data is None:
                continue
            sizes = {
                "n_query": len(data["query"]),
                "n_train": len(data["train"]),
                "n_database": len(data["database"]),
                "split": data["split"],
                "chance": relevant_share(data),
            }
            print(f"== {name}: {sizes}", flush=True)
            if not args.no_raw and not args.tag:
                res = run_exact_raw(data)
                written.append(record(store, name, dict(res, **sizes), ""))
                print(f"exact raw: mAP@all {res['map_all']:.4f}", flush=True)
                save()
            jobs = [
                (m, b, "", None, params.get(m, {}))
                for m in args.methods
                if m != "classifier"
                for b in args.bits
            ]
            if "classifier" in args.methods:
                # Uncompressed: one row, whatever the code lengths.
                jobs.insert(0, ("classifier", 0, "", None, params.get("classifier", {})))
            if args.multilabel and name == "yeast":
                y_first = data["y"][data["train"], 0]
                for b in args.bits:
                    p = params.get("dqn", {})
                    jobs.append(("dqn", b, "multi-label", None, p))
                    jobs.append(("dqn", b, "first-label", y_first, p))
            if args.cnn and name == "fashion_mnist":
                for m in ("classifier", "dqn", "dsq"):
                    p = dict(
                        params.get(m, {}), backbone=small_cnn(), input_shape=(1, 28, 28)
                    )
                    jobs.append((m, 32, "cnn", None, p))
            for method, bits, tag, train_y, p in jobs:
                tag = tag or args.tag
                label = LABELS[method]
                if tag == "first-label":
                    label += " trained on label 1 only"
                elif tag == "cnn":
                    label += " + small CNN backbone"
                shown = {k: v for k, v in p.items() if k != "backbone"}
                print(f"-- {label} {bits} bits {tag} {shown}", flush=True)
                if method == "classifier":
                    res = run_classifier(
                        data, seed=args.seed, device=args.device, params=p, label=label
                    )
                else:
                    res = run_method(
                        data,
                        method,
                        bits,
                        seed=args.seed,
                        device=args.device,
                        params=p,
                        train_y=train_y,
                        label=label,
                    )
                res["params"] = {k: repr(v) for k, v in shown.items()}
                written.append(record(store, name, dict(res, **sizes), tag))
                print(
                    f"   mAP@all {res['map_all']:.4f} mAP@1000 {res['map_1000']:.4f} "
                    f"P@100 {res['p_100']:.4f} P@1 {res['p_1']:.4f} "
                    f"ties@1 {res['tie_share_1']:.3f} exact-emb "
                    f"{res.get('exact_embedding_map_all', float('nan')):.4f} "
                    f"fit {res['fit_s']:.1f}s encode {res['encode_s']:.1f}s "
                    f"query {res['query_ms']:.2f}ms",
                    flush=True,
                )
                save()
    write_report(store, args.out, context)


if __name__ == "__main__":
    main()
