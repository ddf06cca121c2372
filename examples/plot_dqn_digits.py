"""
==============================================================
Deep Quantization Network (DQN) on digits, against PQ and OPQ
==============================================================

:class:`~skquant.DeepQuantizer` learns a neural embedding -- by default its
own classifier's class posterior (``loss="posterior"``; ``loss="cosine"`` is
the paper's pairwise cosine loss) -- together with product-quantization
codebooks on that embedding, so that each image is
stored in 4 bytes (32 bits: 4 sub-spaces x 256 codewords) and searched by
asymmetric quantizer distance. :class:`~skquant.ProductQuantizer` compresses
the raw pixels to the same 32 bits without using labels (PQ, and OPQ with a
learnt rotation).

We follow the retrieval protocol of the deep quantization papers: 1000
training images, 297 queries, and the remaining 500 images as the searchable
database; a database image is relevant to a query when they show the same
digit. The plots are the precision-recall and precision@top-R curves of the
DQN paper.
"""

# %%
# Data and split
# --------------
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

from skquant import DeepQuantizer, ProductQuantizer
from skquant.metrics import RetrievalCurveDisplay

X, y = load_digits(return_X_y=True)
perm = np.random.RandomState(0).permutation(len(X))
train, query, database = perm[:1000], perm[1000:1297], perm[1297:]

# %%
# Fit the three quantizers at 32 bits
# -----------------------------------
# ``fit`` learns the model on the training images; ``index`` then replaces
# the searchable database with the codes of the database images. The deep
# model standardises the pixels itself and trains on the CPU here (``"auto"``
# would use a GPU when one is available).
models = {
    "DQN": DeepQuantizer(n_codebooks=4, n_codewords=256, random_state=0),
    "PQ (pixels)": ProductQuantizer(n_codebooks=4, n_codewords=256, random_state=0),
    "OPQ (pixels)": ProductQuantizer(
        n_codebooks=4, n_codewords=256, rotation=True, random_state=0
    ),
}
for name, model in models.items():
    tic = time.perf_counter()
    model.fit(X[train], y[train])
    model.index(X[database], y[database])
    print(
        f"{name:>12}: fit {time.perf_counter() - tic:5.1f} s, "
        f"mAP = {model.score(X[query], y[query]):.3f}, "
        f"{model.codes_.nbytes // len(database)} bytes per image"
    )

# %%
# The training history: the network's own loss (cross-entropy by default,
# the pairwise cosine loss with ``loss="cosine"``) during the warm-up, then
# with the quantization loss once the codebooks are fit.
dqn = models["DQN"]
epochs = [h["epoch"] for h in dqn.history_]
fig, ax = plt.subplots(figsize=(5, 3.5))
main_loss = "similarity" if dqn.loss in ("cosine", "inner_product") else "cross_entropy"
ax.plot(epochs, [h[main_loss] for h in dqn.history_], label=main_loss.replace("_", "-"))
ax.plot(
    epochs,
    [h.get("quantization", np.nan) for h in dqn.history_],
    label="quantization loss",
)
ax.axvline(dqn.warmup_epochs + 0.5, color="grey", ls=":", label="first codebooks")
ax.set(xlabel="epoch", ylabel="loss (epoch mean)", yscale="log")
ax.legend()
fig.tight_layout()

# %%
# Precision-recall and precision@top-R curves
# -------------------------------------------
# Each query ranks the whole database by AQD (``kneighbors``); the curves
# average over the 297 queries. DQN's codes separate the digits far better
# than the unsupervised codes of the pixels.
fig, (ax_pr, ax_pk) = plt.subplots(1, 2, figsize=(10, 4))
for name, model in models.items():
    RetrievalCurveDisplay.from_estimator(
        model, X[query], y[query], kind="precision_recall", name=name, ax=ax_pr
    )
    RetrievalCurveDisplay.from_estimator(
        model, X[query], y[query], kind="precision_at_k", name=name, ax=ax_pk
    )
ax_pr.set_title("Precision-recall, 32-bit codes")
ax_pk.set_title("Precision@top-R, 32-bit codes")
fig.tight_layout()

# %%
# What a search returns
# ---------------------
# The eight nearest database images of a few queries, by AQD on DQN's codes
# (first column: the query).
shown = query[:5]
neighbors = dqn.kneighbors(X[shown], n_neighbors=8, return_distance=False)
fig, axes = plt.subplots(len(shown), 9, figsize=(9, 5.5))
for row, (q, ind) in enumerate(zip(shown, neighbors, strict=True)):
    images = [X[q]] + [X[database[i]] for i in ind]
    for col, image in enumerate(images):
        ax = axes[row, col]
        ax.imshow(image.reshape(8, 8), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(f"query {y[q]}")
        elif y[database[ind[col - 1]]] != y[q]:
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=2)
axes[0, 0].set_title("query")
fig.suptitle("Nearest neighbors by AQD (red: a different digit)")
fig.tight_layout()
plt.show()
