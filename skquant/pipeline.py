"""Serving a tuned pipeline: a :class:`~sklearn.pipeline.Pipeline` that searches.

``GridSearchCV(make_pipeline(MinMaxScaler(), ProductQuantizer()))`` tunes
preprocessing and quantizer together, but its ``best_estimator_`` is a plain
``Pipeline``: it has ``score`` and ``transform``, not ``index``,
``kneighbors`` or ``add``, so the tuned model could not serve queries without
taking the pipeline apart by hand. :class:`QuantizerPipeline` is a
``Pipeline`` whose last step is a skquant quantizer and which offers the
quantizer's search methods, each applying the preprocessing steps first.
"""

from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.utils.validation import check_is_fitted

__all__ = ["QuantizerPipeline", "make_quantizer_pipeline"]

class QuantizerPipeline(Pipeline):
    """A pipeline ending in a quantizer, searchable like the quantizer itself.

    Everything a :class:`~sklearn.pipeline.Pipeline` does (``fit``,
    ``transform``, ``score``, ``get_params``, use in ``GridSearchCV``), plus
    the final quantizer's ``index``, ``add``, ``kneighbors``,
    ``kneighbors_graph`` and ``encode``: the input goes through the fitted
    preprocessing steps, then to the quantizer. ``decode`` is the
    quantizer's own (codes live in its embedding space).

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        As for :class:`~sklearn.pipeline.Pipeline`; the last estimator must be
        a skquant quantizer (``ProductQuantizer``, ``DeepQuantizer``,
        ``SphericalQuantizer``, or anything with ``index`` and
        ``kneighbors``).
    transform_input, memory, verbose
        As for :class:`~sklearn.pipeline.Pipeline`.

    See Also
    --------
    make_quantizer_pipeline : Build one without naming the steps.

    Notes
    -----
    To serve a plain pipeline that is already fitted (e.g. the
    ``best_estimator_`` of a search over a ``make_pipeline``), wrap its steps:
    ``QuantizerPipeline(best.steps)``; nothing is refitted.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sklearn.preprocessing import MinMaxScaler
    >>> from skquant import ProductQuantizer
    >>> from skquant.pipeline import make_quantizer_pipeline
    >>> X, y = load_digits(return_X_y=True)
    >>> pipe = make_quantizer_pipeline(
    ...     MinMaxScaler(), ProductQuantizer(n_codebooks=4, n_codewords=16,
    ...                                      random_state=0))
    >>> search = GridSearchCV(
    ...     pipe, {"productquantizer__n_codewords": [8, 16]}, cv=2
    ... ).fit(X[:500], y[:500])
    >>> best = search.best_estimator_.index(X[500:], y[500:])
    >>> dist, ind = best.kneighbors(X[:3], n_neighbors=5)
    >>> ind.shape
    (3, 5)
    """

    def _fitted_final_step(self, method):
        """The final quantizer, checked to have ``method`` and to be fitted."""
        final = self._final_estimator
        if not hasattr(final, method):
            raise TypeError(
                f"The last step of this pipeline, {type(final).__name__}, has no "
                f"{method}(): QuantizerPipeline needs a skquant quantizer last."
            )
        check_is_fitted(final)
        return final

    def _preprocess(self, X):
        """``X`` through every fitted step but the last."""
        if X is None or len(self.steps) == 1:
            return X
        return self[:-1].transform(X)

    def index(self, X, y=None):
        """Preprocess ``X``, then replace the quantizer's database with it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like, default=None
            Labels of the items, kept for :meth:`score`.

        Returns
        -------
        self : QuantizerPipeline
        """
        final = self._fitted_final_step("index")
        final.index(self._preprocess(X), y)
        return self

    def add(self, X, y=None):
        """Preprocess ``X``, then append it to the quantizer's database.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like, default=None

        Returns
        -------
        self : QuantizerPipeline
        """
        final = self._fitted_final_step("add")
        final.add(self._preprocess(X), y)
        return self

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Nearest database items of the preprocessed queries.

        Same parameters and results as the quantizer's ``kneighbors``
        (``X=None``: the database against itself, without each item).

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors)
            Only when ``return_distance`` is True.
        indices : ndarray of shape (n_queries, n_neighbors)
        """
        final = self._fitted_final_step("kneighbors")
        return final.kneighbors(
            self._preprocess(X), n_neighbors=n_neighbors, return_distance=return_distance
        )

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """Sparse kNN graph of the preprocessed queries (see ``kneighbors``).

        Returns
        -------
        graph : scipy.sparse.csr_matrix of shape (n_queries, n_samples_fit)
        """
        final = self._fitted_final_step("kneighbors_graph")
        return final.kneighbors_graph(
            self._preprocess(X), n_neighbors=n_neighbors, mode=mode
        )

    def encode(self, X):
        """Codes of the preprocessed ``X``.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_codebooks)
        """
        final = self._fitted_final_step("encode")
        return final.encode(self._preprocess(X))

    def decode(self, codes, cells=None):
        """The quantizer's reconstruction of ``codes`` (its embedding space).

        ``cells``: the cells of residual codes (see the quantizer's
        ``decode``).

        Returns
        -------
        X_hat : ndarray of shape (n_codes, n_features_out)
        """
        final = self._fitted_final_step("decode")
        return final.decode(codes, cells=cells)


def make_quantizer_pipeline(*steps, memory=None, transform_input=None, verbose=False):
    """Build a :class:`QuantizerPipeline` from estimators, naming the steps.

    Like :func:`sklearn.pipeline.make_pipeline` (lower-cased class names as
    step names).

    Parameters
    ----------
    *steps : estimators
        Preprocessing steps, then a skquant quantizer.
    memory, transform_input, verbose
        As for :func:`sklearn.pipeline.make_pipeline`.

    Returns
    -------
    pipeline : QuantizerPipeline

    Examples
    --------
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skquant import ProductQuantizer
    >>> make_quantizer_pipeline(StandardScaler(), ProductQuantizer(n_codebooks=2))
    QuantizerPipeline(steps=[('standardscaler', StandardScaler()),
                             ('productquantizer', ProductQuantizer(n_codebooks=2))])
    """
    plain = make_pipeline(
        *steps, memory=memory, transform_input=transform_input, verbose=verbose
    )
    return QuantizerPipeline(
        plain.steps, memory=memory, transform_input=transform_input, verbose=verbose
    )
