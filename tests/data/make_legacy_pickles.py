"""Write the pickles of ``legacy_0.1.0.dev0.pkl`` with the skquant on PYTHONPATH.

Run with the code *before* the codebooks/index split (commit d3b457b)::

    PYTHONPATH=<old checkout> python tests/data/make_legacy_pickles.py

The file holds, per estimator, its pickle and the ``kneighbors`` results it
gave when saved; ``tests/test_persistence.py`` checks that today's code loads
each one and finds exactly the same neighbors.
"""

import pickle
from pathlib import Path

from sklearn.datasets import load_digits

from skquant import DeepQuantizer, ProductQuantizer, SphericalQuantizer


def estimators():
    net = dict(hidden_layer_sizes=(16,), max_epochs=2, warmup_epochs=1,
               device="cpu", random_state=0)
    return {
        "pq": ProductQuantizer(4, 16, random_state=0),
        "opq_ivf": ProductQuantizer(4, 16, rotation=True, n_rotation_iter=2,
                                    n_lists=4, n_probe=2, random_state=0),
        "dqn": DeepQuantizer(2, 8, embedding_dim=8, **net),
        "dsq_sparse": SphericalQuantizer(2, 8, embedding_dim=16, sparsity=2, **net),
    }


def main():
    X, y = load_digits(return_X_y=True)
    X_fit, y_fit, queries = X[:300], y[:300], X[300:310]
    out = {}
    for name, est in estimators().items():
        est.fit(X_fit, y_fit)
        est.kneighbors(queries)  # builds (and so pickles) the derived layouts
        out[name] = {
            "pickle": pickle.dumps(est, protocol=4),
            "kneighbors": est.kneighbors(queries, n_neighbors=5),
            "kneighbors_self": est.kneighbors(n_neighbors=1),
        }
    out["queries"] = queries
    path = Path(__file__).with_name("legacy_0.1.0.dev0.pkl")
    path.write_bytes(pickle.dumps(out, protocol=4))
    print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
