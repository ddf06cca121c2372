"""scikit-learn's own estimator checks, for every public estimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skquant import ProductQuantizer

# Small settings: the checks fit on ~20-30 samples, some with a single feature.
ESTIMATORS = [
    ProductQuantizer(n_subspaces=1, n_codewords=4, random_state=0),
    ProductQuantizer(n_subspaces=1, n_codewords=4, rotation=True, n_rotation_iter=2, random_state=0),
]


def _expected_failed_checks(estimator):
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
