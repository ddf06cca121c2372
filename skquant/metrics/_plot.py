"""Precision-recall and precision@top-R curves of retrieval, as sklearn Displays."""

# SPDX-License-Identifier: BSD-3-Clause

from sklearn.utils._optional_dependencies import check_matplotlib_support

from ._ranking import _curve_kernel, _validate
from ._scorer import _estimator_curve

_KINDS = ("precision_recall", "precision_at_k")


def _check_kind(kind):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")


class RetrievalCurveDisplay:
    """Retrieval curve visualization: precision-recall or precision@top-R.

    The two curves of the deep hashing/quantization papers, averaged over
    queries (see :func:`~skquant.metrics.retrieval_precision_recall_curve`).
    Create it with :meth:`from_estimator` or :meth:`from_predictions`; all
    parameters are stored as attributes. Several displays can share one axis
    (pass ``ax=display.ax_``) to compare estimators, each named in the legend.

    Parameters
    ----------
    precision : ndarray of shape (n_ranked,)
        Mean precision at cut-offs ``ranks``.

    recall : ndarray of shape (n_ranked,)
        Mean recall at cut-offs ``ranks``.

    ranks : ndarray of shape (n_ranked,)
        The cut-offs (number of retrieved items), ``1, ..., n_ranked``.

    kind : {"precision_recall", "precision_at_k"}, default="precision_recall"
        ``"precision_recall"`` plots precision against recall;
        ``"precision_at_k"`` plots precision against the number of retrieved
        items R (the precision@top-R curve).

    mean_ap : float, default=None
        Mean average precision over the ``n_ranked`` items (mAP@n_ranked),
        shown in the legend. None shows no value.

    name : str, default=None
        Name of the curve in the legend. None shows no name.

    n_database : int, default=None
        Number of items in the database that was ranked. When the rankings
        hold fewer items (``n_ranked < n_database``), `mean_ap` is the mAP of
        truncated rankings and the legend says ``mAP@n_ranked``, e.g.
        "mAP@2000"; otherwise it says "mAP". None: the rankings are taken to
        cover the whole database.

    Attributes
    ----------
    line_ : matplotlib Line2D
        The curve.

    ax_ : matplotlib Axes
        Axes with the curve.

    figure_ : matplotlib Figure
        Figure containing the curve.

    See Also
    --------
    retrieval_precision_recall_curve : Compute the curves.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skquant.metrics import RetrievalCurveDisplay
    >>> rng = np.random.RandomState(0)
    >>> y_database = rng.randint(3, size=50)
    >>> y_query = rng.randint(3, size=5)
    >>> ranking = np.argsort(rng.rand(5, 50), axis=1)
    >>> display = RetrievalCurveDisplay.from_predictions(
    ...     y_query, y_database, ranking, name="random")
    >>> display.ax_.get_xlabel()
    'Recall'
    """

    def __init__(
        self,
        *,
        precision,
        recall,
        ranks,
        kind="precision_recall",
        mean_ap=None,
        name=None,
        n_database=None,
    ):
        self.precision = precision
        self.recall = recall
        self.ranks = ranks
        self.kind = kind
        self.mean_ap = mean_ap
        self.name = name
        self.n_database = n_database

    def plot(self, ax=None, *, name=None, **kwargs):
        """Plot the curve.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to plot on; None creates a new figure and axes.

        name : str, default=None
            Legend name; None uses the `name` attribute.

        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot` (they override the
            defaults, e.g. ``label``).

        Returns
        -------
        display : RetrievalCurveDisplay
            Object that stores the computed values and the plot.
        """
        check_matplotlib_support(f"{type(self).__name__}.plot")
        import matplotlib.pyplot as plt

        _check_kind(self.kind)
        if ax is None:
            _, ax = plt.subplots()
        name = self.name if name is None else name

        label = None
        if self.mean_ap is not None:
            label = f"{self._metric_name()} = {self.mean_ap:0.3f}"
            if name is not None:
                label = f"{name} ({label})"
        elif name is not None:
            label = name
        line_kwargs = {} if label is None else {"label": label}
        line_kwargs.update(kwargs)

        if self.kind == "precision_recall":
            x, xlabel, xlim = self.recall, "Recall", (-0.01, 1.01)
        else:
            x, xlabel, xlim = self.ranks, "Number of retrieved items", None
        (self.line_,) = ax.plot(x, self.precision, **line_kwargs)
        ax.set(xlabel=xlabel, ylabel="Precision", ylim=(-0.01, 1.01))
        if xlim is not None:
            ax.set_xlim(xlim)
        if line_kwargs.get("label") is not None:
            ax.legend(loc="best")

        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    def _metric_name(self):
        # AP@R normalises by the hits within the top R, so a truncated
        # ranking's score is not the mAP of the whole database: name its R.
        n_ranked = len(self.ranks)
        if self.n_database is not None and n_ranked < self.n_database:
            return f"mAP@{n_ranked}"
        return "mAP"

    @classmethod
    def from_predictions(
        cls,
        y_query,
        y_database,
        ranking,
        *,
        kind="precision_recall",
        name=None,
        ax=None,
        **kwargs,
    ):
        """Plot a retrieval curve from labels and a ranking.

        Parameters
        ----------
        y_query : array-like of shape (n_queries,) or (n_queries, n_labels)
            Query labels: class labels, or a 0/1 indicator matrix.

        y_database : array-like of shape (n_database,) or (n_database, n_labels)
            Database labels, of the same kind as `y_query`.

        ranking : array-like of int of shape (n_queries, n_ranked)
            Indices into the database, best first. When ``n_ranked`` is
            smaller than the database, the legend shows mAP@n_ranked.

        kind : {"precision_recall", "precision_at_k"}, default="precision_recall"
            Which curve to plot.

        name : str, default=None
            Legend name.

        ax : matplotlib Axes, default=None
            Axes to plot on; None creates a new figure and axes.

        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : RetrievalCurveDisplay
        """
        check_matplotlib_support(f"{cls.__name__}.from_predictions")
        _check_kind(kind)
        yq, yd, ranking = _validate(y_query, y_database, ranking)
        precision, recall, ranks, mean_ap = _curve_kernel(yq, yd, ranking)
        display = cls(
            precision=precision,
            recall=recall,
            ranks=ranks,
            kind=kind,
            mean_ap=mean_ap,
            name=name,
            n_database=yd.shape[0],
        )
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y,
        *,
        kind="precision_recall",
        n_ranked=None,
        name=None,
        ax=None,
        **kwargs,
    ):
        """Plot a retrieval curve of a fitted search estimator.

        Each row of `X` queries the estimator's indexed database through
        ``estimator.kneighbors`` (in chunks bounded by sklearn's
        ``working_memory``); relevance compares `y` with the labels the
        database was indexed with (``estimator.database_labels_``).

        Parameters
        ----------
        estimator : fitted estimator
            Has ``kneighbors``, ``n_samples_fit_`` and ``database_labels_``.

        X : array-like of shape (n_queries, n_features)
            Queries.

        y : array-like of shape (n_queries,) or (n_queries, n_labels)
            Query labels, of the same kind as the database labels.

        kind : {"precision_recall", "precision_at_k"}, default="precision_recall"
            Which curve to plot.

        n_ranked : int, default=None
            Number of retrieved items per query (largest cut-off). None ranks
            the whole database, so that recall reaches 1, and the legend
            shows the mAP; a smaller value shows mAP@n_ranked.

        name : str, default=None
            Legend name; None uses the estimator's class name.

        ax : matplotlib Axes, default=None
            Axes to plot on; None creates a new figure and axes.

        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : RetrievalCurveDisplay
        """
        check_matplotlib_support(f"{cls.__name__}.from_estimator")
        _check_kind(kind)
        precision, recall, ranks, mean_ap, n_database = _estimator_curve(
            estimator, X, y, n_ranked=n_ranked
        )
        name = type(estimator).__name__ if name is None else name
        display = cls(
            precision=precision,
            recall=recall,
            ranks=ranks,
            kind=kind,
            mean_ap=mean_ap,
            name=name,
            n_database=n_database,
        )
        return display.plot(ax=ax, **kwargs)
