"""Model selection and pipelines: GridSearchCV/RandomizedSearchCV, scorers, set_output."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import randint
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, KFold, RandomizedSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from skquant import DeepQuantizer, ProductQuantizer, QuantizedKNeighborsTransformer
from skquant.metrics import make_retrieval_scorer, map_scorer, mean_average_precision

CV = KFold(n_splits=3, shuffle=True, random_state=0)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X, y


# Two clearly different settings: 1 bit per item against 40 bits per item.
COARSE = dict(n_codebooks=1, n_codewords=2)
FINE = dict(n_codebooks=8, n_codewords=32)
GRID = [{key: [value] for key, value in params.items()} for params in (COARSE, FINE)]


def _fold_map(estimator, X, y, train, test):
    """mAP of one CV split, computed independently of score()."""
    est = estimator.fit(X[train], y[train])
    ranking = est.kneighbors(X[test], n_neighbors=len(train), return_distance=False)
    return mean_average_precision(y[test], y[train], ranking)


def test_grid_search_default_score_picks_finer_pq(digits):
    X, y = digits
    search = GridSearchCV(
        ProductQuantizer(random_state=0),
        param_grid=GRID,
        cv=CV,
    )
    search.fit(X, y)
    assert search.best_params_ == FINE
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0] + 0.2, scores
    # score() is the mAP of the validation fold against the training fold.
    train, test = next(CV.split(X))
    expected = _fold_map(ProductQuantizer(random_state=0, **FINE), X, y, train, test)
    assert search.cv_results_["split0_test_score"][1] == pytest.approx(expected)
    # The refit estimator indexes the whole data.
    assert search.best_estimator_.n_samples_fit_ == len(X)


@pytest.mark.parametrize(
    "scoring",
    [
        map_scorer,
        make_retrieval_scorer("map", top_k=50),
        make_retrieval_scorer("precision_at_k", k=10),
        {"map": map_scorer, "p@10": make_retrieval_scorer("precision_at_k", k=10)},
    ],
    ids=["map", "map@50", "p@10", "multimetric"],
)
def test_grid_search_with_retrieval_scorers(digits, scoring):
    X, y = digits
    X, y = X[:900], y[:900]
    refit = "p@10" if isinstance(scoring, dict) else True
    search = GridSearchCV(
        ProductQuantizer(random_state=0),
        param_grid=GRID,
        scoring=scoring,
        refit=refit,
        cv=CV,
    )
    search.fit(X, y)
    assert search.best_params_ == FINE


def test_randomized_search_in_pipeline(digits):
    X, y = digits
    X, y = X[:900], y[:900]
    pipe = Pipeline([("scale", StandardScaler()), ("pq", ProductQuantizer(random_state=0))])
    search = RandomizedSearchCV(
        pipe,
        param_distributions={
            "pq__n_codebooks": [1, 8],
            "pq__n_codewords": randint(2, 33),
        },
        n_iter=3,
        cv=CV,
        random_state=0,
    )
    search.fit(X, y)
    results = search.cv_results_
    # Each split's score is the mAP of the scaled validation fold against the
    # scaled training fold (Pipeline.score -> ProductQuantizer.score).
    train, test = next(CV.split(X))
    params = results["params"][search.best_index_]
    fold = clone(pipe).set_params(**params).fit(X[train], y[train])
    ranking = fold[-1].kneighbors(
        fold[0].transform(X[test]), n_neighbors=len(train), return_distance=False
    )
    expected = mean_average_precision(y[test], y[train], ranking)
    assert results["split0_test_score"][search.best_index_] == pytest.approx(expected)


def test_grid_search_tunes_deep_quantizer(digits):
    X, y = digits
    X, y = X[:900], y[:900]
    # 4 epochs only: the default learning_rate (1e-3, chosen for the default
    # 60 epochs) is too slow for so short a fit; 3e-3 converges in time.
    base = DeepQuantizer(
        embedding_dim=16, hidden_layer_sizes=(64,), max_iter=4, warmup_epochs=1,
        learning_rate=3e-3, device="cpu", random_state=0,
    )
    search = GridSearchCV(
        base,
        param_grid=[
            {"n_codebooks": [1], "n_codewords": [2]},
            {"n_codebooks": [2], "n_codewords": [16]},
        ],
        cv=KFold(n_splits=2, shuffle=True, random_state=0),
    )
    search.fit(X, y)
    assert search.best_params_ == {"n_codebooks": 2, "n_codewords": 16}
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0] + 0.2, scores


def test_grid_search_over_graph_pipeline_with_cache(digits, tmp_path):
    X, y = digits
    pipe = Pipeline(
        [
            ("graph", QuantizedKNeighborsTransformer(ProductQuantizer(random_state=0), n_neighbors=10)),
            ("knn", KNeighborsClassifier(metric="precomputed")),
        ],
        memory=str(tmp_path),
    )
    search = GridSearchCV(
        pipe,
        param_grid={
            "graph__quantizer__n_codebooks": [1, 8],
            "graph__quantizer__n_codewords": [2, 32],
            "knn__n_neighbors": [1, 5],
        },
        cv=CV,
    )
    search.fit(X, y)
    assert search.best_params_["graph__quantizer__n_codebooks"] == 8
    assert search.best_params_["graph__quantizer__n_codewords"] == 32
    assert search.best_score_ > 0.9
    # The cached graphs were reused: fewer cache entries than fits.
    cached = list(tmp_path.rglob("output.pkl"))
    assert 0 < len(cached) < 3 * len(search.cv_results_["params"])


# ----------------------------------------------------------------- set_output, names
def test_feature_names_and_pandas_output(digits):
    X, y = digits
    columns = [f"pixel_{i}" for i in range(X.shape[1])]
    df = pd.DataFrame(X[:300], columns=columns)
    pq = ProductQuantizer(n_codebooks=4, n_codewords=8, random_state=0)
    pq.set_output(transform="pandas").fit(df, y[:300])
    np.testing.assert_array_equal(pq.feature_names_in_, columns)
    out = pq.transform(df)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == [f"productquantizer{i}" for i in range(64)]
    assert list(out.columns) == list(pq.get_feature_names_out())
    np.testing.assert_array_equal(out.index, df.index)
    np.testing.assert_array_equal(out.to_numpy(), X[:300].astype(np.float32))

    pipe = make_pipeline(StandardScaler(), ProductQuantizer(4, 8, random_state=0))
    out = pipe.set_output(transform="pandas").fit(df).transform(df)
    assert isinstance(out, pd.DataFrame) and out.shape == (300, 64)
    assert list(pipe.get_feature_names_out()) == list(out.columns)


def test_deep_quantizer_feature_names(digits):
    X, y = digits
    dqn = DeepQuantizer(
        n_codebooks=2, n_codewords=4, embedding_dim=8, hidden_layer_sizes=(),
        max_iter=1, warmup_epochs=0, device="cpu", random_state=0,
    ).set_output(transform="pandas")
    out = dqn.fit(X[:200], y[:200]).transform(X[:5])
    assert list(out.columns) == [f"deepquantizer{i}" for i in range(8)]
    assert out.dtypes.unique().tolist() == [np.float32]
