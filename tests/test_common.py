"""scikit-learn's own estimator checks, for every public estimator.

The checks fit on ~20-30 samples, some with a single feature, so every
estimator runs with small settings (one codebook, few codewords, few epochs).
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skquant import (
    DeepQuantizer,
    ProductQuantizer,
    QuantizedKNeighborsTransformer,
    SphericalQuantizer,
)

_DEEP = dict(
    n_codewords=4,
    embedding_dim=4,
    hidden_layer_sizes=(8,),
    max_iter=3,
    warmup_epochs=1,
    batch_size=16,
    device="cpu",
    random_state=0,
)

ESTIMATORS = [
    ProductQuantizer(n_codebooks=1, n_codewords=4, random_state=0),
    ProductQuantizer(
        n_codebooks=1, n_codewords=4, rotation=True, n_rotation_iter=2, random_state=0
    ),
    DeepQuantizer(n_codebooks=1, **_DEEP),
    SphericalQuantizer(n_codebooks=2, **{**_DEEP, "n_codewords": 8}),
    QuantizedKNeighborsTransformer(
        ProductQuantizer(n_codebooks=1, n_codewords=4, random_state=0), n_neighbors=3
    ),
    QuantizedKNeighborsTransformer(
        ProductQuantizer(
            n_codebooks=1, n_codewords=4, rotation=True, n_rotation_iter=2, random_state=0
        ),
        n_neighbors=2,
        mode="connectivity",
    ),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
