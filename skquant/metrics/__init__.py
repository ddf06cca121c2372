"""Retrieval metrics: mAP@R, precision@k, precision-recall curves and their plots."""

from ._plot import RetrievalCurveDisplay
from ._ranking import (
    mean_average_precision,
    precision_at_k,
    retrieval_precision_recall_curve,
)
from ._scorer import make_retrieval_scorer, map_scorer

__all__ = [
    "RetrievalCurveDisplay",
    "make_retrieval_scorer",
    "map_scorer",
    "mean_average_precision",
    "precision_at_k",
    "retrieval_precision_recall_curve",
]
