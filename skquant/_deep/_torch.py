"""Shared torch machinery of the deep quantizers.

Device resolution, seeding, the default MLP backbone and the embedding
network, input standardisation, mini-batch iteration, batched eval-mode
embedding and a generic epoch loop with sklearn-style verbose output and
robust failure handling. Estimators (``_dqn.py``, ``_dsq.py``) only add their
losses and their codebook steps on top.

Design choices (why):

- ``random_state`` is turned into one integer seed (:func:`torch_seed`); a
  local :class:`torch.Generator` drives batch order and the whole fit runs
  inside :func:`torch_rng_context`, which seeds torch's global stream for
  weight initialisation and dropout and *restores* the caller's global state
  afterwards. CPU fits are bit-reproducible for a fixed ``random_state``
  (same machine, same number of threads). GPU kernels may still be
  non-deterministic; that is documented, not hidden.
- Input standardisation lives inside the network (:class:`Standardize`,
  fixed buffers computed from the training data), so that raw pixels or
  unscaled tabular data work with the defaults and the fitted ``module_`` is
  self-contained.
- After fit the network is kept on the CPU (pickle-safe, loads on a CPU-only
  machine) and moved to the device only for work (:func:`embed`).
"""

import copy
import math
import time
import warnings
import weakref
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.sparsefuncs import mean_variance_axis
from torch import nn

from .._progress import format_seconds
from .._rows import dense_rows

__all__ = [
    "EmbeddingNetwork",
    "L2Normalize",
    "Standardize",
    "build_embedding_network",
    "build_mlp",
    "check_input_shape",
    "embed",
    "inference_dtype",
    "inference_device",
    "check_augment",
    "iter_minibatches",
    "make_generator",
    "make_optimizer",
    "minibatch",
    "prepare_labels",
    "random_shift",
    "resolve_device",
    "torch_rng_context",
    "torch_seed",
    "train_epochs",
    "training_rows",
]


# The default MLP's hidden layers (the estimators' default too): a backbone
# replaces the MLP, so any other value next to a backbone is a mistake.
DEFAULT_HIDDEN_LAYER_SIZES = (256,)

# Constructor parameters every network estimator shares, with one meaning and
# one validation rule (DeepQuantizer, SphericalQuantizer extend this dict).
NETWORK_PARAMETER_CONSTRAINTS = {
    "embedding_dim": [Interval(Integral, 1, None, closed="left")],
    "backbone": [None, torch.nn.Module],
    "hidden_layer_sizes": ["array-like"],
    "input_shape": [None, "array-like"],
    "max_iter": [Interval(Integral, 1, None, closed="left")],
    "warmup_epochs": [Interval(Integral, 0, None, closed="left")],
    "batch_size": [Interval(Integral, 2, None, closed="left")],
    "learning_rate": [Interval(Real, 0, None, closed="neither")],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "weight_averaging": [Interval(Real, 0, 1, closed="both")],
    "augment": [None, StrOptions({"shift"})],
    "dropout": [Interval(Real, 0, 1, closed="left")],
    "device": [str, torch.device],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
}


# --------------------------------------------------------------------------- #
# Devices and seeding
# --------------------------------------------------------------------------- #
def resolve_device(device):
    """Resolve a ``device`` parameter into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "mps", "xpu"} or str like "cuda:1", or torch.device
        ``"auto"`` picks the first CUDA device when one is available, the CPU
        otherwise.

    Returns
    -------
    device : torch.device

    Raises
    ------
    ValueError
        If an accelerator (CUDA, MPS, XPU) is requested but not available,
        or the device index does not exist, or the string is not a device.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a valid device; use 'auto', 'cpu', "
            "'cuda' or 'cuda:N'."
        ) from exc
    if dev.type == "cpu":
        return dev
    if dev.type not in _ACCELERATORS:
        raise ValueError(
            f"device={device!r} is not supported; use 'auto', 'cpu', "
            + ", ".join(f"'{t}'" for t in _ACCELERATORS)
            + "."
        )
    label, module = _accelerator(dev.type)
    if module is None:
        raise ValueError(
            f"device={device!r} was requested but {label} is not available "
            f"(torch was built without it or no such device is visible); use "
            "device='cpu' or device='auto'."
        )
    count = getattr(module, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"device={device!r} does not exist: only {count} {label} "
            "device(s) are visible."
        )
    return dev


# Device types beyond the CPU: the name users read, and the torch module that
# says whether one is there. Every one is checked the same way, so a missing
# accelerator gives the same clear message instead of torch's own error at
# the first tensor moved there.
_ACCELERATORS = {
    "cuda": ("CUDA", "cuda"),
    "mps": ("Apple MPS", "backends.mps"),
    "xpu": ("Intel XPU", "xpu"),
}


def _accelerator(device_type):
    """``(label, torch module)`` of an accelerator type; the module is None
    when this torch build or machine has no such device available."""
    label, path = _ACCELERATORS.get(device_type, (device_type, device_type))
    module = torch
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return label, None
    return label, (module if module.is_available() else None)


def inference_device(device):
    """Device to run a fitted network on, falling back to the CPU.

    A model fitted on a GPU and unpickled on a CPU-only machine keeps
    ``device_ = cuda``; searching must still work, so this returns the CPU
    with a warning in that case.

    Parameters
    ----------
    device : torch.device or str
        The fitted ``device_``.

    Returns
    -------
    device : torch.device

    Examples
    --------
    >>> inference_device("cpu")
    device(type='cpu')
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        label, module = _accelerator(dev.type)
        if module is None:
            warnings.warn(
                f"The model was fitted on {dev} but {label} is not available "
                "here; computing embeddings on the CPU.",
                UserWarning,
                stacklevel=3,
            )
            return torch.device("cpu")
    if (
        dev.type == "cuda"
        and dev.index is not None
        and dev.index >= torch.cuda.device_count()
    ):
        return torch.device("cuda")
    return dev


def torch_seed(random_state):
    """Derive one integer torch seed from a ``random_state``.

    Parameters
    ----------
    random_state : int, RandomState instance or None
        Passed through :func:`sklearn.utils.check_random_state`; an int gives
        the same seed on every call, a ``RandomState`` is advanced by one draw.

    Returns
    -------
    seed : int in [0, 2**31 - 1)

    Examples
    --------
    >>> torch_seed(0) == torch_seed(0)
    True
    """
    rng = check_random_state(random_state)
    return int(rng.randint(np.iinfo(np.int32).max))


def make_generator(seed):
    """A CPU :class:`torch.Generator` seeded with ``seed`` (batch order).

    Examples
    --------
    >>> g = make_generator(0)
    >>> torch.randperm(3, generator=g).tolist() == torch.randperm(
    ...     3, generator=make_generator(0)).tolist()
    True
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


@contextmanager
def torch_rng_context(seed, device=None):
    """Seed torch's global RNG for a block, then restore the caller's state.

    Weight initialisation and dropout draw from torch's global stream (their
    API has no generator argument); forking it keeps fits reproducible
    without changing the random numbers the caller sees afterwards. Not
    thread-safe: two fits in threads of one process share the global stream
    (use processes, e.g. joblib's default loky backend, for parallel fits).

    Parameters
    ----------
    seed : int
    device : torch.device, default=None
        When a CUDA device, its RNG is forked and seeded too.

    Examples
    --------
    >>> with torch_rng_context(0):
    ...     a = torch.rand(2)
    >>> with torch_rng_context(0):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b))
    True
    """
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        dev = torch.device(device)
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


# --------------------------------------------------------------------------- #
# Networks
# --------------------------------------------------------------------------- #
class Standardize(nn.Module):
    """Fixed affine input standardisation ``(x - mean) / scale``.

    The statistics are buffers (saved in ``state_dict``, moved with the
    module, never trained).

    Parameters
    ----------
    mean, scale : torch.Tensor
        Broadcastable to the flat input ``(n, n_features)``.
    """

    def __init__(self, mean, scale):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.scale


class L2Normalize(nn.Module):
    """Project each row onto the unit sphere (``eps`` avoids 0 / 0)."""

    def __init__(self, eps=1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return nn.functional.normalize(x, p=2.0, dim=1, eps=self.eps)


_OUTPUTS = ("tanh", "identity", "l2")


class EmbeddingNetwork(nn.Module):
    """Standardise -> reshape -> backbone -> flatten -> linear head -> output.

    Parameters
    ----------
    backbone : nn.Module
        Any module; its output is flattened to ``(n, -1)``.
    head : nn.Linear
        Maps the flattened backbone output to the embedding.
    standardize : nn.Module or None
        Applied to the flat 2-D input first.
    input_shape : tuple of int or None
        Each row is reshaped to ``input_shape`` before the backbone.
    output : {"tanh", "identity", "l2"}
        Output activation: ``"tanh"`` (DQN's fcb layer), ``"identity"``, or
        ``"l2"`` (identity then L2-normalisation, DSQ).
    """

    def __init__(self, backbone, head, *, standardize=None, input_shape=None,
                 output="tanh"):
        super().__init__()
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        self.standardize = standardize if standardize is not None else nn.Identity()
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.backbone = backbone
        self.head = head
        self.output = {
            "tanh": nn.Tanh(), "identity": nn.Identity(), "l2": L2Normalize()
        }[output]

    @property
    def backbone_frozen(self):
        """True when the backbone has parameters and none of them is trained.

        ``backbone_learning_rate=0`` (see :func:`make_optimizer`) or a user's
        own ``requires_grad_(False)`` freezes it.
        """
        params = list(self.backbone.parameters())
        return bool(params) and not any(p.requires_grad for p in params)

    def train(self, mode=True):
        # A frozen backbone is a fixed feature extractor: keep it in eval mode
        # while the head trains, or its BatchNorm running statistics would
        # still drift (and its dropout stay on) although no weight is learned.
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    def features(self, x):
        """Flattened backbone output (before the head)."""
        x = self.standardize(x)
        if self.input_shape is not None:
            x = x.reshape(x.shape[0], *self.input_shape)
        return torch.flatten(self.backbone(x), start_dim=1)

    def forward(self, x):
        return self.output(self.head(self.features(x)))


def build_mlp(n_features, hidden_layer_sizes=(256,), dropout=0.0):
    """Default backbone: ``[Linear -> ReLU -> Dropout] * len(hidden_layer_sizes)``.

    Parameters
    ----------
    n_features : int
    hidden_layer_sizes : tuple of int, default=(256,)
        An empty tuple gives a flatten-only backbone (linear embedding).
    dropout : float, default=0.0
        Dropout probability after each hidden layer (omitted when 0).

    Returns
    -------
    backbone : nn.Sequential
        Starts with ``nn.Flatten`` so that it also accepts reshaped input.

    Examples
    --------
    >>> build_mlp(8, (16,), dropout=0.5)
    Sequential(
      (0): Flatten(start_dim=1, end_dim=-1)
      (1): Linear(in_features=8, out_features=16, bias=True)
      (2): ReLU()
      (3): Dropout(p=0.5, inplace=False)
    )
    """
    layers = [nn.Flatten()]
    n_in = int(n_features)
    for width in hidden_layer_sizes:
        layers.append(nn.Linear(n_in, int(width)))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(float(dropout)))
        n_in = int(width)
    return nn.Sequential(*layers)


def check_input_shape(input_shape, n_features):
    """Validate ``input_shape`` against the number of features.

    Returns the shape as a tuple of ints, or None.

    Raises
    ------
    ValueError
        When the product of ``input_shape`` differs from ``n_features``.

    Examples
    --------
    >>> check_input_shape((1, 8, 8), 64)
    (1, 8, 8)
    """
    if input_shape is None:
        return None
    shape = tuple(int(s) for s in input_shape)
    if any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must hold positive ints, got {input_shape!r}")
    if math.prod(shape) != n_features:
        raise ValueError(
            f"input_shape={shape} holds {math.prod(shape)} values per sample but X "
            f"has {n_features} features; each row of X is reshaped to input_shape, "
            "so the product of input_shape must equal n_features."
        )
    return shape


def _standardization_stats(X, input_shape=None):
    """Mean and scale for :class:`Standardize` from training data.

    Without ``input_shape``: per feature, like ``StandardScaler`` (constant
    features keep scale 1). With ``input_shape`` (images): per channel (the
    first axis of ``input_shape``), like the usual image normalisation, so
    that one rare non-zero pixel cannot be blown up by a tiny std.
    """
    if sp.issparse(X):
        # Per-feature moments without densifying (a TF-IDF matrix may not
        # fit in memory dense); per-channel ones follow from them.
        mean, var = mean_variance_axis(sp.csr_matrix(X, dtype=np.float64), axis=0)
        if input_shape is not None:
            n_channels = input_shape[0]
            mean_f, var_f = mean.reshape(n_channels, -1), var.reshape(n_channels, -1)
            per = mean_f.shape[1]
            mean_c = mean_f.mean(axis=1)
            var_c = (var_f + mean_f**2).mean(axis=1) - mean_c**2
            mean = np.repeat(mean_c, per)
            var = np.repeat(np.maximum(var_c, 0.0), per)
        std = np.sqrt(var)
    elif input_shape is None:
        X = np.asarray(X)
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
    else:
        X = np.asarray(X)
        n_channels = input_shape[0]
        Xc = X.reshape(X.shape[0], n_channels, -1)
        mean_c = Xc.mean(axis=(0, 2), dtype=np.float64)
        std_c = Xc.std(axis=(0, 2), dtype=np.float64)
        per = Xc.shape[2]
        mean = np.repeat(mean_c, per)
        std = np.repeat(std_c, per)
    # Same rule as sklearn's _handle_zeros_in_scale: near-constant -> 1.
    tiny = 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)
    std = np.where(std < tiny, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def build_embedding_network(
    X,
    *,
    embedding_dim,
    backbone=None,
    hidden_layer_sizes=DEFAULT_HIDDEN_LAYER_SIZES,
    dropout=0.0,
    input_shape=None,
    output="tanh",
    standardize=True,
):
    """Build the embedding network for training data ``X``.

    Call it inside :func:`torch_rng_context` so that initialisation is
    seeded.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Training data, used for the standardisation statistics and to infer
        the backbone's output size (one eval-mode forward pass on 2 rows).
    embedding_dim : int
    backbone : nn.Module or None
        ``None`` builds :func:`build_mlp`. A user module is deep-copied (the
        estimator parameter is never modified).
    hidden_layer_sizes, dropout
        Used when ``backbone`` is None.
    input_shape : tuple of int or None
        Reshape each row before the backbone; validated with
        :func:`check_input_shape`.
    output : {"tanh", "identity", "l2"}
    standardize : bool, default=True
        Put a :class:`Standardize` layer first.

    Returns
    -------
    network : EmbeddingNetwork (on the CPU, in train mode)

    Examples
    --------
    >>> import numpy as np
    >>> net = build_embedding_network(np.ones((4, 3)), embedding_dim=2,
    ...                               hidden_layer_sizes=(5,))
    >>> net(torch.zeros(1, 3)).shape
    torch.Size([1, 2])
    """
    n_features = X.shape[1]
    input_shape = check_input_shape(input_shape, n_features)
    if backbone is None:
        body = build_mlp(n_features, hidden_layer_sizes, dropout)
    else:
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"backbone must be a torch.nn.Module or None, got {type(backbone)!r}"
            )
        if tuple(hidden_layer_sizes) != DEFAULT_HIDDEN_LAYER_SIZES:
            warnings.warn(
                f"hidden_layer_sizes={tuple(hidden_layer_sizes)!r} is ignored "
                "because a backbone is given (it only shapes the default "
                "MLP); leave it at its default, or set backbone=None.",
                UserWarning,
                stacklevel=4,
            )
        body = copy.deepcopy(backbone).cpu()
    std_layer = None
    if standardize:
        mean, scale = _standardization_stats(X, input_shape)
        std_layer = Standardize(mean, scale)
    network = EmbeddingNetwork(
        body,
        nn.Identity(),
        standardize=std_layer,
        input_shape=input_shape,
        output=output,
    )
    # Infer the backbone's flattened output width with a dry run on real rows
    # (eval mode: no dropout, no BatchNorm statistics update).
    # A copy: torch warns when wrapping read-only memory (joblib memmaps).
    sample = torch.as_tensor(dense_rows(X[:2], np.float32))
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            n_out = network.features(sample).shape[1]
    except Exception as exc:
        raise ValueError(
            f"The backbone failed on a batch of input shape "
            f"{tuple(sample.shape) if input_shape is None else (2, *input_shape)}: "
            f"{exc}. Check input_shape and the backbone's expected input."
        ) from exc
    finally:
        body.train(was_training)
    network.head = nn.Linear(n_out, int(embedding_dim))
    return network


def make_optimizer(
    network,
    *,
    learning_rate,
    backbone_learning_rate=None,
    weight_decay=0.0,
    solver="adam",
):
    """Optimizer with a separate learning rate for the backbone.

    Parameters
    ----------
    network : EmbeddingNetwork
    learning_rate : float
        Rate of the head (and of the backbone when ``backbone_learning_rate``
        is None).
    backbone_learning_rate : float or None
        Rate of ``network.backbone``; a smaller value fine-tunes a pretrained
        backbone gently, as the per-layer rates of DQN (new layer 10x).
        ``0`` freezes the backbone.
    weight_decay : float, default=0.0
        L2 penalty on all trainable parameters.
    solver : {"adam", "sgd"}
        Adam, or SGD with momentum 0.9 (the papers' optimizer).

    Returns
    -------
    optimizer : torch.optim.Optimizer
    """
    if backbone_learning_rate is None:
        backbone_learning_rate = learning_rate
    backbone_params = [p for p in network.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone_params}
    other_params = [
        p for p in network.parameters() if p.requires_grad and id(p) not in backbone_ids
    ]
    groups = [{"params": other_params, "lr": float(learning_rate)}]
    if backbone_params and backbone_learning_rate > 0:
        groups.append({"params": backbone_params, "lr": float(backbone_learning_rate)})
    elif backbone_params:
        for p in backbone_params:
            p.requires_grad_(False)
    if solver == "adam":
        return torch.optim.Adam(groups, weight_decay=float(weight_decay))
    if solver == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=float(weight_decay))
    raise ValueError(f"solver must be 'adam' or 'sgd', got {solver!r}")


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def prepare_labels(y, *, estimator_name="estimator"):
    """Turn validated ``y`` into a torch tensor for :func:`label_similarity`.

    Parameters
    ----------
    y : ndarray of shape (n,) or (n, L)
        1-D class labels of any type, or a 2-D 0/1 indicator matrix.

    Returns
    -------
    labels : torch.Tensor
        int64 of shape (n,) (label indices) or float32 of shape (n, L).

    Raises
    ------
    ValueError
        When ``y`` is None, or every pair of samples is similar (one class, or
        one label shared by all rows): the pairwise losses would then have
        nothing to learn.

    Warns
    -----
    UserWarning
        When no two samples are similar (every label is unique): training
        only pushes samples apart.

    Examples
    --------
    >>> prepare_labels(np.array(["a", "b", "a"]))
    tensor([0, 1, 0])
    """
    if y is None:
        raise ValueError(
            f"{estimator_name} requires y to be passed, but the target y is None: "
            "it is supervised and learns from class labels or a multi-label "
            "indicator matrix."
        )
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()
    if y.ndim == 1:
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        if counts.size < 2:
            raise ValueError(
                f"{estimator_name} needs at least 2 classes in y to learn a "
                f"similarity; got 1 class."
            )
        if counts.max() < 2:
            warnings.warn(
                f"Every label in y is unique: no two samples are similar, so "
                f"{estimator_name} can only push samples apart.",
                UserWarning,
                stacklevel=3,
            )
        return torch.as_tensor(inverse.astype(np.int64))
    if y.ndim == 2:
        Y = (y != 0).astype(np.float32)
        per_label = Y.sum(axis=0)
        if np.any(per_label == Y.shape[0]):
            raise ValueError(
                f"{estimator_name} needs dissimilar pairs: one label of the "
                "multi-label y is shared by every sample, so all pairs are similar."
            )
        if per_label.max(initial=0) < 2:
            warnings.warn(
                f"No label of y is shared by two samples: no pair is similar, so "
                f"{estimator_name} can only push samples apart.",
                UserWarning,
                stacklevel=3,
            )
        return torch.as_tensor(Y)
    raise ValueError(f"y must be 1-D or 2-D, got {y.ndim} dimensions")


def training_rows(X):
    """The training data in the form :func:`minibatch` reads it from.

    Dense ``X``: one float32 tensor (sharing memory with a float32 C-ordered
    ``X``); sparse ``X``: a CSR matrix, whose mini-batches are densified one
    at a time.

    Examples
    --------
    >>> minibatch(training_rows(np.eye(3)), torch.tensor([2, 0]), "cpu")
    tensor([[0., 0., 1.],
            [1., 0., 0.]])
    """
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    # Writeable: torch warns when wrapping read-only memory (joblib memmaps).
    return torch.from_numpy(np.require(X, np.float32, ["C", "W"]))


def minibatch(rows, idx, device):
    """Rows ``idx`` (a CPU LongTensor) of :func:`training_rows` on ``device``."""
    if isinstance(rows, torch.Tensor):
        return rows[idx].to(device, non_blocking=True)
    return torch.from_numpy(dense_rows(rows[idx.numpy()])).to(device)


# Largest translation, in pixels, of ``augment="shift"``.
SHIFT_PIXELS = 2


def check_augment(augment, input_shape):
    """Validate ``augment`` against ``input_shape`` (estimators' ``fit``).

    Raises
    ------
    ValueError
        ``augment="shift"`` without an ``input_shape`` of at least two
        spatial axes: translations need an image layout.
    """
    if augment == "shift" and (input_shape is None or len(tuple(input_shape)) < 2):
        raise ValueError(
            "augment='shift' translates images, so it needs input_shape with "
            "the image layout, e.g. (1, 28, 28) or (3, 32, 32); got "
            f"input_shape={input_shape!r}."
        )


def random_shift(x, input_shape, max_shift=SHIFT_PIXELS, generator=None):
    """Translate each image of a flat batch by a random whole number of pixels.

    Each row of ``x`` is read as an image of ``input_shape`` (the last two
    axes are height and width) and moved by ``(dy, dx)``, each drawn
    uniformly from ``-max_shift, ..., max_shift`` per row; pixels moved in
    from outside the image are 0 (the background of raw, unstandardised
    inputs, as ``RandomCrop(padding=max_shift)`` of torchvision).

    Parameters
    ----------
    x : torch.Tensor of shape (b, prod(input_shape))
        Raw rows (before the network's standardisation).
    input_shape : tuple of int
        At least two axes.
    max_shift : int, default=SHIFT_PIXELS
    generator : torch.Generator or None
        CPU generator of the shifts.

    Returns
    -------
    shifted : torch.Tensor, same shape, dtype and device as ``x``

    Examples
    --------
    >>> x = torch.arange(1.0, 10.0).reshape(1, 9)  # one 3x3 image
    >>> g = make_generator(0)
    >>> random_shift(x, (3, 3), max_shift=0, generator=g).equal(x)
    True
    """
    b = x.shape[0]
    shape = tuple(int(s) for s in input_shape)
    h, w = shape[-2], shape[-1]
    s = int(max_shift)
    if s == 0 or b == 0:
        return x
    images = x.reshape(b, -1, h, w)
    padded = nn.functional.pad(images, (s, s, s, s))
    # Top-left corner of each crop in the padded image: s - shift.
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    offsets = offsets.to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (b, h)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (b, w)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(x.shape)


def iter_minibatches(n_samples, batch_size, generator=None):
    """Yield index tensors of mini-batches.

    Parameters
    ----------
    n_samples : int
    batch_size : int
    generator : torch.Generator or None
        Shuffles the order when given; sequential batches otherwise.

    Yields
    ------
    idx : torch.LongTensor (on the CPU)
        A final batch of a single sample is merged into the previous one:
        pairwise losses and BatchNorm both need at least 2 samples.

    Examples
    --------
    >>> [b.tolist() for b in iter_minibatches(5, 2)]
    [[0, 1], [2, 3, 4]]
    """
    if generator is not None:
        order = torch.randperm(n_samples, generator=generator)
    else:
        order = torch.arange(n_samples)
    batch_size = max(int(batch_size), 1)
    starts = list(range(0, n_samples, batch_size))
    if len(starts) > 1 and n_samples - starts[-1] < 2:
        starts.pop()
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else n_samples
        yield order[start:stop]


# float64 inference copies of networks, keyed by the module (weakly). A copy
# costs milliseconds (more than a single query's search), so it is reused
# until the module changes: the key holds every tensor's storage and version
# counter (an optimiser step bumps them), every submodule's identity, and
# every plain attribute (flags such as a dropout rate or a user's switch).
_INFERENCE_COPIES = weakref.WeakKeyDictionary()
_PLAIN = (bool, int, float, str, bytes, type(None))


def _state_key(module, device):
    key = [str(device)]
    for t in (*module.parameters(), *module.buffers()):
        key.append((t.data_ptr(), t._version, tuple(t.shape)))
    for m in module.modules():
        key.append(id(m))
        key.extend(
            (k, v) for k, v in vars(m).items()
            if isinstance(v, _PLAIN) and k != "training"
        )
    return tuple(key)


def _inference_copy(module, device, dtype):
    """An eval-mode copy of ``module`` in ``dtype`` on ``device``.

    The caller's module is never touched (not moved, not cast, mode kept), so
    concurrent ``transform``/``kneighbors`` calls from threads are safe.
    """
    key = (dtype, *_state_key(module, device))
    cached = _INFERENCE_COPIES.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    copy_ = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    _INFERENCE_COPIES[module] = (key, copy_)
    return copy_


def inference_dtype(device):
    """Floating-point type of eval-mode forward passes on ``device``.

    float64 wherever torch supports it. Why: float32 kernels (oneDNN/MKL GEMM
    and convolution) give a row results that depend, in the last bits, on
    which other rows share its batch and where it sits in it -- differently
    on Intel and AMD CPUs and across thread counts. Evaluating in float64 and
    rounding the result to float32 makes a row's embedding a function of that
    row alone (the float64 differences, ~1e-16, vanish in the rounding), so
    embeddings, codes and neighbours do not change with batch composition,
    query order or the CPU. MPS has no float64: float32 there.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def embed(module, X, device, batch_size=256):
    """Batched eval-mode forward pass, returned as float32 numpy.

    The pass runs on an eval-mode float64 copy of ``module`` on ``device``
    (see :func:`inference_dtype` for why), so each row's embedding depends on
    that row only: not on the batch it shares, its position in it, the
    number of threads or the CPU's instruction set. ``module`` itself is left
    as it is (device, dtype, train/eval mode).

    Parameters
    ----------
    module : nn.Module
    X : array-like of shape (n_samples, n_features)
    device : torch.device or str
    batch_size : int, default=256

    Returns
    -------
    Z : ndarray of shape (n_samples, embedding_dim), float32

    Raises
    ------
    FloatingPointError
        When an embedding is NaN or infinite (a diverged network).

    Examples
    --------
    >>> net = torch.nn.Linear(3, 2)
    >>> embed(net, np.zeros((5, 3)), "cpu", batch_size=2).shape
    (5, 2)
    """
    device = torch.device(device)
    dtype = inference_dtype(device)
    network = _inference_copy(module, device, dtype)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, X.shape[0], max(int(batch_size), 1)):
                chunk = dense_rows(X[start : start + batch_size], np_dtype)
                out = network(torch.from_numpy(chunk).to(device))
                chunks.append(out.to("cpu", torch.float32).numpy())
    except torch.cuda.OutOfMemoryError as exc:
        raise _oom_error(exc, batch_size) from exc
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    Z = np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)
    if not np.isfinite(Z).all():
        # Otherwise k-means, the encoders or the search fail later with an
        # error about their own input.
        raise FloatingPointError(
            "The network produced non-finite embeddings (NaN or inf). During "
            "fit this means the optimisation diverged: use a smaller "
            "learning_rate. Also check X for extreme values."
        )
    return Z


def _oom_error(exc, batch_size):
    return torch.cuda.OutOfMemoryError(
        f"{exc}\nCUDA ran out of memory with batch_size={batch_size}; lower "
        "batch_size (or use a smaller backbone / input size)."
    )


# --------------------------------------------------------------------------- #
# Training loop
# --------------------------------------------------------------------------- #
def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_epochs(
    module,
    optimizer,
    n_samples,
    batch_loss,
    *,
    max_iter,
    batch_size,
    generator,
    estimator_name="estimator",
    verbose=0,
    history=None,
    on_epoch_begin=None,
    first_epoch=0,
    total_epochs=None,
    weight_averaging=0.0,
):
    """Generic mini-batch training loop with sklearn-style logging.

    Parameters
    ----------
    module : nn.Module
        Already on its training device; set to train mode here.
    optimizer : torch.optim.Optimizer
    n_samples : int
    batch_loss : callable ``(idx) -> (loss, parts)``
        ``idx`` is a CPU LongTensor of sample indices; ``loss`` a scalar
        tensor to minimise and ``parts`` a dict of named float components
        (e.g. ``{"similarity": 0.3, "quantization": 0.01}``) that are averaged
        over the epoch (weighted by batch size) and logged.
    max_iter : int
        Number of epochs to run.
    batch_size : int
    generator : torch.Generator
        Batch order.
    estimator_name : str
        Prefix of the verbose lines, ``[EstimatorName]``.
    verbose : int
        > 0 prints one line per epoch.
    history : list or None
        Per-epoch records (dicts with ``epoch``, ``loss``, the parts and
        ``time``) are appended to it.
    on_epoch_begin : callable ``(epoch) -> dict or None``, optional
        Called before each epoch (e.g. to refit codebooks); a returned dict is
        merged into that epoch's record.
    first_epoch : int, default=0
        Number of the first epoch (for messages when called in phases).
    total_epochs : int, default=None
        Epochs of the whole fit, for the ``epoch 3/60`` and time-left parts
        of verbose lines; ``first_epoch + max_iter`` when None.
    weight_averaging : float in [0, 1), default=0.0
        Stochastic weight averaging (Izmailov et al., UAI 2018): the weights
        (and buffers) at the end of each of the last
        ``ceil(weight_averaging * max_iter)`` epochs are averaged, and the
        average is loaded into ``module`` when training ends. ``0`` keeps the
        weights of the last step.

    Returns
    -------
    n_completed : int
        Epochs completed. Less than ``max_iter`` only when interrupted by
        ``KeyboardInterrupt``: the weights of the last completed epoch are
        restored and a warning is emitted, so the caller can finish fitting.

    Raises
    ------
    FloatingPointError
        When a loss becomes NaN or infinite (suggests a smaller
        ``learning_rate``).
    torch.cuda.OutOfMemoryError
        Re-raised with a hint to lower ``batch_size``.
    """
    history = [] if history is None else history
    n_total = first_epoch + max_iter if total_epochs is None else int(total_epochs)
    last_good = _snapshot(module)
    completed = 0
    started = time.perf_counter()
    # torch's AveragedModel keeps the running mean (use_buffers: BatchNorm
    # statistics are averaged with the weights, so no extra pass over the
    # data is needed to refresh them).
    n_averaged_epochs = math.ceil(float(weight_averaging) * max_iter)
    averaged = None
    for e in range(max_iter):
        epoch = first_epoch + e
        tic = time.perf_counter()
        try:
            extra = on_epoch_begin(epoch) if on_epoch_begin is not None else None
            module.train()
            total = 0.0
            sums = {}
            seen = 0
            for idx in iter_minibatches(n_samples, batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss, parts = batch_loss(idx)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"{estimator_name}: the training loss became {value} at "
                        f"epoch {epoch + 1}. The optimisation diverged; use a "
                        "smaller learning_rate (and check X for extreme values)."
                    )
                loss.backward()
                optimizer.step()
                b = int(idx.shape[0])
                total += value * b
                for key, val in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(val) * b
                seen += b
        except KeyboardInterrupt:
            module.load_state_dict(last_good)
            warnings.warn(
                f"{estimator_name}: training interrupted during epoch {epoch + 1}; "
                f"keeping the model of the last completed epoch ({epoch}).",
                UserWarning,
                stacklevel=2,
            )
            break
        except torch.cuda.OutOfMemoryError as exc:
            raise _oom_error(exc, batch_size) from exc
        record = {"epoch": epoch + 1, "loss": total / max(seen, 1)}
        for key, val in sums.items():
            record[key] = val / max(seen, 1)
        if extra:
            record.update(extra)
        record["time"] = time.perf_counter() - tic
        history.append(record)
        completed += 1
        last_good = _snapshot(module)
        if e >= max_iter - n_averaged_epochs:
            if averaged is None:
                averaged = torch.optim.swa_utils.AveragedModel(module, use_buffers=True)
            averaged.update_parameters(module)
        if verbose:
            parts_txt = "".join(
                f", {k} = {v:.6g}"
                for k, v in record.items()
                if k not in ("epoch", "loss", "time") and isinstance(v, float)
            )
            elapsed = time.perf_counter() - started
            left = elapsed / completed * max(n_total - epoch - 1, 0)
            print(
                f"[{estimator_name}] epoch {epoch + 1}/{n_total}, "
                f"loss = {record['loss']:.6g}{parts_txt}, "
                f"time = {record['time']:.2f}s, elapsed = {format_seconds(elapsed)}, "
                f"left ~ {format_seconds(left)}",
                flush=True,
            )
    if averaged is not None:
        module.load_state_dict(averaged.module.state_dict())
    return completed

