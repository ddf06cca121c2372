"""Did a supervised fit learn anything? Collapse diagnostics after training.

A training run can fail without a single NaN: a learning rate far too large
can kill every ReLU (a constant network), or push the outputs into the flat
tails of ``tanh``; the loss then stays where it started and every item gets
one of a handful of codes. Whether such a run ends in NaN or in finite
garbage depends on how the CPU rounds and overflows, so the estimators must
not rely on NaN to notice it. This module looks at the *outcome* -- the
codes of the training set and the loss history -- and warns with
:class:`~sklearn.exceptions.ConvergenceWarning`, saying what to try.

Pure numpy: used by the estimator glue after ``fit``, imports nothing of
skquant.
"""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

__all__ = ["collapse_reasons", "warn_if_collapsed"]


def _n_label_sets(y):
    """Number of distinct classes (1-D) or distinct label sets (2-D)."""
    y = np.asarray(y)
    if y.ndim == 1:
        return len(np.unique(y))
    return len(np.unique(y, axis=0))


def _loss_never_decreased(history):
    """True when the loss of the last training phase never went below its start.

    A phase is a run of epochs whose records have the same loss terms: the
    deep estimators add their quantization term after a warm-up, which
    changes the scale of the total loss, so only epochs of one phase are
    compared. Needs at least three epochs in the phase to judge.
    """
    records = [r for r in history if "loss" in r]
    if not records:
        return False

    def terms(r):
        return frozenset(k for k, v in r.items() if k not in ("epoch", "time")
                         and isinstance(v, float))

    last = terms(records[-1])
    phase = []
    for r in reversed(records):
        if terms(r) != last:
            break
        phase.append(float(r["loss"]))
    phase.reverse()
    if len(phase) < 3:
        return False
    return min(phase[1:]) >= phase[0]


def collapse_reasons(codes, y, history, n_codewords):
    """Why a supervised training run looks collapsed (empty when it does not).

    Parameters
    ----------
    codes : ndarray of shape (n_samples, n_codebooks)
        Codes of the training items under the fitted model.
    y : ndarray of shape (n_samples,) or (n_samples, n_labels)
        Their labels.
    history : list of dict
        Per-epoch records with a ``"loss"`` entry (the fitted ``history_``).
    n_codewords : int
        Codewords per codebook.

    Returns
    -------
    reasons : list of str

    Examples
    --------
    >>> import numpy as np
    >>> codes = np.zeros((30, 2), dtype=np.uint8)
    >>> collapse_reasons(codes, np.arange(30) % 3, [], 4)
    ['all 30 training items share 1 distinct code for 3 classes']
    """
    reasons = []
    n_samples = codes.shape[0]
    n_distinct = len(np.unique(codes, axis=0)) if n_samples else 0
    n_classes = _n_label_sets(y)
    # Fewer distinct codes than classes (where the codes could have told
    # them apart: K**M of them) *and* few codes for the items. Both, as a
    # good supervised model may well give one class few codes, and data
    # with nearly as many classes as items cannot be judged this way.
    capacity = min(n_classes, n_codewords ** codes.shape[1])
    if n_samples > 1 and n_distinct < capacity and n_distinct <= 0.1 * n_samples:
        reasons.append(
            f"all {n_samples} training items share {n_distinct} distinct "
            f"code{'s' if n_distinct != 1 else ''} for {n_classes} classes"
        )
    if _loss_never_decreased(history):
        reasons.append(
            f"the training loss never fell below its first value "
            f"({history[-1]['loss']:.4g} after {len(history)} epochs)"
        )
    return reasons


def warn_if_collapsed(estimator, codes, y):
    """Warn with :class:`ConvergenceWarning` when ``estimator``'s fit collapsed.

    Parameters
    ----------
    estimator : fitted deep quantizer
        Has ``history_``, ``n_codewords`` and ``learning_rate``.
    codes : ndarray of shape (n_samples, n_codebooks)
        Codes of the training items.
    y : ndarray
        Their labels.
    """
    reasons = collapse_reasons(codes, y, estimator.history_, estimator.n_codewords)
    if not reasons:
        return
    warnings.warn(
        f"{type(estimator).__name__}: training did not converge to a useful "
        f"model: {'; '.join(reasons)}. Try a smaller learning_rate (it is "
        f"{estimator.learning_rate:g}), more max_iter, or check that y "
        "separates the items.",
        ConvergenceWarning,
        # warn_if_collapsed <- fit <- sklearn's _fit_context <- the caller
        stacklevel=4,
    )
