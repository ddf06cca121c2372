"""Pure torch loss functions for supervised deep quantization.

Numeric kernels only: no estimator glue and no scikit-learn imports. Every
function works on whatever device its tensors live on and is differentiable
with respect to the embeddings.

Conventions
-----------
- ``Z`` is a float tensor of embeddings, shape ``(b, D)``.
- ``S`` is a pairwise similarity target in ``{-1, +1}``, shape ``(b, b)``
  (or ``(b, b')`` for two different batches), as built by
  :func:`label_similarity`.
- Pairwise losses are **means over all b x b entries** (the diagonal included),
  as in the authors' DQN code; the weight of the quantization term is relative
  to these means (see ``methods.md`` section 1.3).
- :class:`PosteriorEmbedding` (a module without trained parameters) and
  :func:`posterior_loss` serve the classification-style objective
  (``loss="posterior"``) of both deep quantizers.
"""

import torch

__all__ = [
    "label_similarity",
    "pairwise_cosine_loss",
    "pairwise_inner_product_loss",
    "mean_squared_distance",
    "product_quantization_loss",
    "product_reconstruction",
    "posterior_basis",
    "PosteriorEmbedding",
    "posterior_loss",
]


def label_similarity(y_a, y_b=None):
    """Pairwise similarity targets in {-1, +1} from labels.

    Parameters
    ----------
    y_a : torch.Tensor
        Either 1-D integer class labels of shape ``(b,)`` (two items are
        similar when their labels are equal) or a 2-D 0/1 indicator matrix of
        shape ``(b, L)`` (multi-label: two items are similar when they share at
        least one label, ``S = 2 * min(Y Y^T, 1) - 1`` as in DQN's code).
    y_b : torch.Tensor, default=None
        Labels of a second batch, same kind as ``y_a``. ``None`` compares
        ``y_a`` with itself; the diagonal is then forced to +1 (an item is
        always similar to itself, even a multi-label row with no label).

    Returns
    -------
    S : torch.Tensor of shape (b, b') and dtype float32
        +1 for similar pairs, -1 for dissimilar pairs.

    Examples
    --------
    >>> import torch
    >>> label_similarity(torch.tensor([0, 1, 0]))
    tensor([[ 1., -1.,  1.],
            [-1.,  1., -1.],
            [ 1., -1.,  1.]])
    """
    same = y_b is None
    if same:
        y_b = y_a
    if y_a.ndim == 1:
        sim = y_a[:, None] == y_b[None, :]
    elif y_a.ndim == 2:
        y_a = y_a.to(torch.float32)
        y_b = y_b.to(torch.float32)
        sim = (y_a @ y_b.T) > 0
    else:
        raise ValueError(f"labels must be 1-D or 2-D, got {y_a.ndim} dimensions")
    S = sim.to(torch.float32) * 2.0 - 1.0
    if same:
        S.fill_diagonal_(1.0)
    return S


def pairwise_cosine_loss(Z, S, eps=1e-8):
    """DQN's pairwise cosine loss, ``mean((S - cos(z_i, z_j)) ** 2)``.

    The cosine lies in [-1, 1] like the targets, which is why the DQN paper
    calls this loss well specified (unlike the raw inner product).

    Parameters
    ----------
    Z : torch.Tensor of shape (b, D)
        Embeddings of a mini-batch.
    S : torch.Tensor of shape (b, b)
        Similarity targets in {-1, +1}.
    eps : float, default=1e-8
        Added to the norms so that all-zero embeddings (possible early in
        training with a tanh output) give a finite loss and gradient.

    Returns
    -------
    loss : torch.Tensor, scalar

    Examples
    --------
    >>> import torch
    >>> Z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, -1.0]])
    >>> S = label_similarity(torch.tensor([0, 0, 1]))
    >>> round(float(pairwise_cosine_loss(Z, S)), 4)  # 4 of 9 pairs miss by 1
    0.4444
    """
    norms = torch.linalg.vector_norm(Z, dim=1, keepdim=True) + eps
    U = Z / norms
    cos = U @ U.T
    return torch.mean((S - cos) ** 2)


def pairwise_inner_product_loss(Z, S):
    """Inner-product pairwise loss of the DQN_ip ablation.

    ``mean((S - <z_i, z_j> / D) ** 2)``: the "previous works" loss of the DQN
    paper (KSH / AAAI'14 style), where the inner product of two tanh
    embeddings in [-1, 1]^D is divided by the dimension D so that it lies in
    [-1, 1]. Unlike the cosine, it is only matched to the targets when the
    embeddings saturate at +-1, which is what the DQN paper calls the
    inconsistency of the inner-product loss.

    Parameters
    ----------
    Z : torch.Tensor of shape (b, D)
    S : torch.Tensor of shape (b, b)

    Returns
    -------
    loss : torch.Tensor, scalar

    Examples
    --------
    >>> import torch
    >>> Z = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    >>> S = label_similarity(torch.tensor([0, 0, 1]))
    >>> float(pairwise_inner_product_loss(Z, S))
    0.0
    """
    ip = (Z @ Z.T) / Z.shape[1]
    return torch.mean((S - ip) ** 2)


def product_reconstruction(codebooks, codes):
    """Reconstruction ``C h`` of product-quantization codes.

    Parameters
    ----------
    codebooks : torch.Tensor of shape (M, K, D // M)
        One codebook per sub-space (block-diagonal ``C``).
    codes : torch.Tensor of shape (n, M), integer
        Index of the chosen codeword in each sub-space.

    Returns
    -------
    Z_hat : torch.Tensor of shape (n, D)
        Concatenation of the chosen codewords.

    Examples
    --------
    >>> import torch
    >>> C = torch.arange(8.0).reshape(2, 2, 2)  # M=2, K=2, d=2
    >>> product_reconstruction(C, torch.tensor([[1, 0]]))
    tensor([[2., 3., 4., 5.]])
    """
    n_subspaces = codebooks.shape[0]
    sub = torch.arange(n_subspaces, device=codebooks.device)
    return codebooks[sub, codes.long()].reshape(codes.shape[0], -1)


def product_quantization_loss(Z, Z_hat):
    """Quantization loss ``mean_i ||z_i - C h_i||^2``.

    The squared error is summed over the D dimensions and averaged over the
    batch, as in DQN's code. ``Z_hat`` is treated as a constant target when it
    does not require gradients (codebooks and codes fixed during the network
    step), so the gradient with respect to ``z_i`` is ``2 (z_i - C h_i) / b``.

    Parameters
    ----------
    Z : torch.Tensor of shape (b, D)
    Z_hat : torch.Tensor of shape (b, D)
        Reconstructions, e.g. from :func:`product_reconstruction`.

    Returns
    -------
    loss : torch.Tensor, scalar

    Examples
    --------
    >>> import torch
    >>> float(product_quantization_loss(torch.ones(2, 3), torch.zeros(2, 3)))
    3.0
    """
    return mean_squared_distance(Z, Z_hat)


def mean_squared_distance(A, B, mask=None):
    """``mean_i ||a_i - b_i||^2`` (summed over dimensions), optionally masked.

    Used for quantization losses (``B`` = reconstructions) and DSQ's centre
    loss (``B`` = class centres); ``B`` is a constant target when it does not
    require gradients.

    Parameters
    ----------
    A, B : torch.Tensor of shape (b, D)
    mask : torch.Tensor of shape (b,), bool, default=None
        Rows to include (e.g. items that have a class centre).

    Returns
    -------
    loss : torch.Tensor, scalar

    Examples
    --------
    >>> import torch
    >>> float(mean_squared_distance(torch.ones(2, 3), torch.zeros(2, 3)))
    3.0
    """
    sq = torch.sum((A - B) ** 2, dim=1)
    if mask is not None:
        if not bool(mask.any()):
            return sq.sum() * 0.0
        sq = sq[mask]
    return sq.mean()


# --------------------------------------------------------------------------- #
# Posterior embedding (classification-style objective)
# --------------------------------------------------------------------------- #
def posterior_basis(n_outputs, embedding_dim, seed=0):
    """Fixed ``(n_outputs, embedding_dim)`` basis the posterior is written in.

    Rows are orthonormal when ``embedding_dim >= n_outputs`` (QR of a seeded
    Gaussian matrix), so inner products and distances between embeddings
    equal those between posterior vectors exactly. With more outputs than
    dimensions the rows are random unit vectors (a Johnson-Lindenstrauss
    projection: inner products are approximated). A random rotation rather
    than zero padding spreads the posterior over every sub-space of a product
    quantizer instead of leaving most of them constant.

    Parameters
    ----------
    n_outputs : int
        Number of classes (or labels).
    embedding_dim : int
    seed : int, default=0

    Returns
    -------
    basis : torch.Tensor of shape (n_outputs, embedding_dim), float32

    Examples
    --------
    >>> B = posterior_basis(3, 5)
    >>> bool(torch.allclose(B @ B.T, torch.eye(3), atol=1e-5))
    True
    """
    gen = torch.Generator().manual_seed(int(seed))
    G = torch.randn(int(embedding_dim), int(n_outputs), generator=gen,
                    dtype=torch.float64)
    if embedding_dim >= n_outputs:
        Q, _ = torch.linalg.qr(G)
        return Q.T.contiguous().to(torch.float32)
    return (G / torch.linalg.vector_norm(G, dim=0, keepdim=True)).T.contiguous().to(
        torch.float32
    )


class PosteriorEmbedding(torch.nn.Module):
    """Classifier head whose output embedding is the class posterior.

    ``logits = W h + b`` for the backbone features ``h``; the embedding is
    ``z = p @ basis + tie_break * u`` with ``p`` the softmax of
    ``logits / temperature`` (per-label sigmoids when multi-label) and ``u``
    a unit vector: a fixed random projection of ``h`` onto the directions
    orthogonal to the basis rows. With orthonormal basis rows,
    ``<z_q, z_x> = <p_q, p_x> + tie_break^2 <u_q, u_x>``: for calibrated
    single-label posteriors the first term is the probability that the two
    items share their class, i.e. the ranking that maximises expected
    precision at every rank; the second, small term orders items whose
    posteriors are (nearly) equal by the similarity of their features, so
    that confident items of one class do not all tie.

    Parameters
    ----------
    n_features : int
        Width of the backbone features ``h``.
    basis : torch.Tensor of shape (n_outputs, embedding_dim)
        From :func:`posterior_basis`; stored as a buffer (saved and moved
        with the module, never trained).
    multilabel : bool, default=False
        Sigmoid per label instead of softmax.
    temperature : float, default=1.0
        The embedding uses the posterior of ``logits / temperature`` (the
        training loss sees ``logits``). Above 1 it softens the near one-hot
        posteriors of confident items, which otherwise collapse onto the same
        codewords.
    tie_break : float, default=0.0
        Weight of the feature term ``u`` (0 when ``embedding_dim`` leaves no
        direction orthogonal to the basis).
    seed : int, default=0
        Seeds the random projection of ``u`` (fixed, never trained).

    Examples
    --------
    >>> head = PosteriorEmbedding(3, posterior_basis(2, 4))
    >>> _ = torch.nn.init.zeros_(head.classifier.bias)
    >>> z = head(torch.zeros(1, 3))  # equal logits: p = (0.5, 0.5)
    >>> round(float(z.norm()), 4)  # 1 / sqrt(2)
    0.7071
    """

    def __init__(self, n_features, basis, multilabel=False, temperature=1.0,
                 tie_break=0.0, seed=0):
        super().__init__()
        basis = basis.to(torch.float32).clone()
        self.classifier = torch.nn.Linear(int(n_features), basis.shape[0])
        self.register_buffer("basis", basis)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        G = torch.randn(int(n_features), basis.shape[1], generator=gen)
        # Only directions the posterior does not use: <z_q, z_x> keeps the
        # posterior term exactly (orthonormal basis rows).
        self.register_buffer("projection", G - (G @ basis.T) @ basis)
        self.multilabel = bool(multilabel)
        self.temperature = float(temperature)
        self.tie_break = float(tie_break)

    @property
    def in_features(self):
        return self.classifier.in_features

    def logits(self, h):
        """Class (or label) logits of backbone features ``h``."""
        return self.classifier(h)

    def probabilities(self, logits):
        """Softmax (or per-label sigmoid) of ``logits / temperature``."""
        logits = logits / self.temperature
        if self.multilabel:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    def embed(self, logits, h):
        """The embedding, given the logits of ``h`` (saves a second pass)."""
        z = self.probabilities(logits) @ self.basis
        if self.tie_break > 0:
            u = h @ self.projection
            u = u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + 1e-12)
            z = z + self.tie_break * u
        return z

    def forward(self, h):
        return self.embed(self.logits(h), h)


def posterior_loss(logits, labels):
    """Cross-entropy of the classifier behind :class:`PosteriorEmbedding`.

    1-D ``labels``: softmax cross-entropy. 2-D 0/1 indicator ``labels``:
    binary cross-entropy of each label's sigmoid, summed over labels and
    averaged over rows (items without any label still teach the network that
    they have none). Both are per-item losses, so a ``weight_decay`` means
    the same for the two heads; averaging over L labels as well would make
    the data term L times weaker against it (Yeast, 14 labels, with
    ``weight_decay=1e-2``: mAP@all 0.829 instead of 0.87).

    Parameters
    ----------
    logits : torch.Tensor of shape (b, L)
    labels : torch.Tensor of shape (b,) int64 or (b, L) float

    Returns
    -------
    loss : torch.Tensor, scalar

    Examples
    --------
    >>> logits = torch.zeros(2, 2)
    >>> round(float(posterior_loss(logits, torch.tensor([0, 1]))), 4)
    0.6931
    >>> round(float(posterior_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))), 4)
    1.3863
    """
    if labels.ndim == 1:
        return torch.nn.functional.cross_entropy(logits, labels.long())
    per_label = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype), reduction="none"
    )
    return per_label.sum(dim=1).mean()
