"""Torch loss terms of Deep Spherical Quantization (DSQ).

Numeric kernels only (no estimator glue, no scikit-learn). Every term is a
mean over the mini-batch, so the weights ``lambda_1..3`` of the objective

    CE + lambda_1 ||z - C b||^2 + lambda_2 ||z - phi_y||^2 + lambda_3 ||phi_y - C b||^2

are relative to the mean cross-entropy (the convention of the DQN code,
``methods.md`` pitfall 4).
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "CosineClassifier",
    "label_targets",
    "softmax_loss",
]


class CosineClassifier(nn.Module):
    """Linear classifier on unit vectors with unit-norm class weights.

    ``logits = scale * <z, w_c / ||w_c||>``: with ``||z|| = 1`` the logits
    are cosines in ``[-scale, scale]``. Without the scale, softmax on unit
    vectors cannot get confident and training stalls (NormFace; ``methods.md``
    section 2.3 and pitfall 13).

    Parameters
    ----------
    n_features : int
    n_classes : int
    scale : float
        Softmax temperature inverse ``s``.

    Examples
    --------
    >>> import torch
    >>> clf = CosineClassifier(3, 2, scale=10.0)
    >>> clf(torch.eye(3)).shape
    torch.Size([3, 2])
    """

    def __init__(self, n_features, n_classes, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(int(n_classes), int(n_features)))
        self.scale = float(scale)

    def forward(self, z):
        return self.scale * (z @ F.normalize(self.weight, dim=1).T)


def label_targets(labels, n_classes):
    """Class-probability targets: one-hot rows, or ``y / |y|_1`` for multi-label.

    Parameters
    ----------
    labels : torch.Tensor
        int64 ``(n,)`` class indices, or float ``(n, L)`` 0/1 indicator.
    n_classes : int

    Returns
    -------
    P : torch.Tensor of shape (n, n_classes), float32
        Rows sum to 1, except all-zero rows for items without any label.

    Examples
    --------
    >>> import torch
    >>> label_targets(torch.tensor([[1.0, 1.0, 0.0]]), 3)
    tensor([[0.5000, 0.5000, 0.0000]])
    """
    if labels.ndim == 1:
        return F.one_hot(labels.long(), int(n_classes)).to(torch.float32)
    Y = labels.to(torch.float32)
    return Y / Y.sum(dim=1, keepdim=True).clamp_min(1.0)


def softmax_loss(logits, labels):
    """Softmax cross-entropy, single- or multi-label.

    1-D ``labels``: the usual cross-entropy. 2-D indicator ``labels``: the
    cross-entropy against the normalised label vector ``y / |y|_1`` (which
    equals the single-label loss for one-hot rows); rows without any label
    are left out of the mean.

    Parameters
    ----------
    logits : torch.Tensor of shape (b, L)
    labels : torch.Tensor of shape (b,) int64 or (b, L) float

    Returns
    -------
    loss : torch.Tensor, scalar

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> a = softmax_loss(logits, torch.tensor([0, 1]))
    >>> b = softmax_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> bool(torch.isclose(a, b))
    True
    """
    if labels.ndim == 1:
        return F.cross_entropy(logits, labels.long())
    P = label_targets(labels, logits.shape[1])
    has = P.sum(dim=1) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    per_row = -(P * F.log_softmax(logits, dim=1)).sum(dim=1)
    return per_row[has].mean()
