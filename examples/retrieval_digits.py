"""
Supervised quantization for retrieval on the digits images
==========================================================

The main job of skquant in one script: learn compact codes for the 8x8 digit
images of :func:`sklearn.datasets.load_digits` (shipped with scikit-learn),
index a database, search it by asymmetric quantizer distance (AQD), and print
retrieval quality (mAP over the whole database) and query speed for the
unsupervised baselines (PQ, OPQ) and the supervised deep quantizers (DQN, DSQ),
all at 32-bit codes.

Protocol (DQN's, scaled to digits), drawn by
:func:`skquant.datasets.retrieval_split`: 100 training images and 30 queries
per digit (1000 and 300), the remaining 497 images as the database; two items
are relevant when they show the same digit.
"""

import time

import numpy as np
from sklearn.datasets import load_digits

import skquant
from skquant.datasets import retrieval_split

X, y = load_digits(return_X_y=True)
# The database excludes the training images: with database="rest" (the 2016
# DQN protocol) the supervised models would also be scored on images they
# were trained on.
query, train, database = retrieval_split(
    y, n_query=30, n_train=100, database="rest_without_train", random_state=0
)

# 32-bit codes: 4 codebooks of 256 codewords (4 bytes per database item).
candidates = {
    "PQ": skquant.ProductQuantizer(n_codebooks=4, n_codewords=256, random_state=0),
    "OPQ": skquant.ProductQuantizer(
        n_codebooks=4, n_codewords=256, rotation=True, random_state=0
    ),
}
if hasattr(skquant, "DeepQuantizer"):
    candidates["DQN"] = skquant.DeepQuantizer(
        n_codebooks=4, n_codewords=256, random_state=0
    )
if hasattr(skquant, "SphericalQuantizer"):
    candidates["DSQ"] = skquant.SphericalQuantizer(
        n_codebooks=4, n_codewords=256, random_state=0
    )

print(
    f"skquant {skquant.__version__}: digits, {len(train)} train / "
    f"{len(query)} queries / {len(database)} database items, 32-bit codes\n"
)
print(f"{'method':<6} {'mAP@all':>8} {'fit s':>7} {'batch q/s':>10} {'1-query ms':>11}")
for name, estimator in candidates.items():
    start = time.perf_counter()
    estimator.fit(X[train], y[train])
    fit_seconds = time.perf_counter() - start
    estimator.index(X[database], y[database])  # the searchable database

    mean_ap = estimator.score(X[query], y[query])  # mAP, whole database ranked

    start = time.perf_counter()
    estimator.kneighbors(X[query], n_neighbors=10)
    batch_qps = len(query) / (time.perf_counter() - start)
    latencies = []
    for row in X[query[:50]]:
        start = time.perf_counter()
        estimator.kneighbors(row[None], n_neighbors=10)
        latencies.append(time.perf_counter() - start)
    print(
        f"{name:<6} {mean_ap:8.3f} {fit_seconds:7.2f} {batch_qps:10.0f} "
        f"{1e3 * np.median(latencies):11.2f}"
    )
