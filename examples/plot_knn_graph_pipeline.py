"""
==============================================================
Quantized kNN graphs in pipelines: t-SNE and a kNN classifier
==============================================================

:class:`~skquant.QuantizedKNeighborsTransformer` turns any skquant quantizer
into the sparse k-nearest-neighbors graph that scikit-learn's
``metric="precomputed"`` estimators accept, exactly like
:class:`~sklearn.neighbors.KNeighborsTransformer` does with exact search
(scikit-learn's "Approximate nearest neighbors in TSNE" example shows the
pattern with other libraries).

Here the graph comes from a supervised :class:`~skquant.DeepQuantizer`
storing each digit image in 32 bits. We

1. embed the digits in 2-D with t-SNE on the quantized graph, next to t-SNE
   on the exact graph of the raw pixels;
2. tune a k-nearest-neighbors classifier on the quantized graph with
   ``GridSearchCV``, caching the graph so the network is trained once per
   split, not once per candidate.
"""

# %%
# Data and the quantizer
# ----------------------
# 1,297 training images and 500 held-out test images.
from tempfile import mkdtemp
from time import perf_counter

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.manifold import TSNE, trustworthiness
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer
from sklearn.pipeline import Pipeline, make_pipeline

from skquant import DeepQuantizer, QuantizedKNeighborsTransformer

X, y = load_digits(return_X_y=True)
rng = np.random.RandomState(0)
order = rng.permutation(len(X))
train, test = order[:1297], order[1297:]

# 32-bit codes: 8 sub-spaces of 16 codewords (4 bits each).
dqn = DeepQuantizer(
    n_codebooks=8, n_codewords=16, embedding_dim=32, max_iter=30, random_state=0
)

# %%
# t-SNE on the quantized graph
# ----------------------------
# t-SNE needs ``3 * perplexity + 1`` neighbors per sample. The labels passed
# to ``fit_transform`` train the deep quantizer; t-SNE ignores them.
perplexity = 30
n_neighbors = 3 * perplexity + 1

tsne = TSNE(metric="precomputed", perplexity=perplexity, init="random", random_state=0)
quantized_tsne = make_pipeline(
    QuantizedKNeighborsTransformer(dqn, n_neighbors=n_neighbors), tsne
)
exact_tsne = make_pipeline(KNeighborsTransformer(n_neighbors=n_neighbors), tsne)

t0 = perf_counter()
emb_quantized = quantized_tsne.fit_transform(X[train], y[train])
t1 = perf_counter()
emb_exact = exact_tsne.fit_transform(X[train])
t2 = perf_counter()
print(f"t-SNE on the quantized DQN graph: {t1 - t0:.1f} s (training included)")
print(f"t-SNE on the exact pixel graph:   {t2 - t1:.1f} s")

fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, emb, title in [
    (axes[0], emb_quantized, "quantized DQN graph (32-bit codes)"),
    (axes[1], emb_exact, "exact graph of the pixels"),
]:
    scatter = ax.scatter(emb[:, 0], emb[:, 1], c=y[train], cmap="tab10", s=5)
    trust = trustworthiness(X[train], emb, n_neighbors=10)
    ax.set_title(f"t-SNE on the {title}\ntrustworthiness {trust:.3f}")
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(scatter, ax=axes, label="digit")
plt.show()

# %%
# The quantized graph is built in the supervised embedding, where the
# neighbors of an image are mostly images of the same digit, so its clusters
# follow the labels. Trustworthiness measures how well a layout keeps the
# *pixel* neighborhoods, which the supervised embedding deliberately changes,
# so it is expected to be lower on the left.
#
# A classifier on the quantized graph, tuned with a cache
# --------------------------------------------------------
# The graph step is cached: ``GridSearchCV`` over the classifier's
# ``n_neighbors`` trains the quantizer once per split. The transformer stores
# ``n_neighbors + 1`` neighbors, enough for every candidate.
pipe = Pipeline(
    [
        ("graph", QuantizedKNeighborsTransformer(dqn, n_neighbors=20)),
        ("knn", KNeighborsClassifier(metric="precomputed")),
    ],
    memory=mkdtemp(),
)
search = GridSearchCV(pipe, {"knn__n_neighbors": [1, 5, 10, 20]}, cv=3)
t0 = perf_counter()
search.fit(X[train], y[train])
print(f"grid search: {perf_counter() - t0:.1f} s, best {search.best_params_}")
for params, score in zip(
    search.cv_results_["params"], search.cv_results_["mean_test_score"], strict=True
):
    print(f"  {params}: cross-validated accuracy {score:.3f}")
print(f"test accuracy: {search.score(X[test], y[test]):.3f}")

exact = KNeighborsClassifier(n_neighbors=5).fit(X[train], y[train])
print(f"exact 5-NN on the pixels, test accuracy: {exact.score(X[test], y[test]):.3f}")
