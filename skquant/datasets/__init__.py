"""Loaders for labelled retrieval data and the query / training / database split.

Nothing here downloads anything. The loaders read data that is already on disk:

- :func:`load_fashion_mnist` reads the original IDX files (as installed by the
  Debian package ``dataset-fashion-mnist``, or from a folder you give);
- :func:`load_cifar10` reads a local copy of the CIFAR-10 "python version"
  batches;
- :func:`load_yeast` reads the multi-label Yeast set that ships inside the
  optional PyPI package ``river``.

:func:`retrieval_split` draws the query / training / database split of the
deep-quantization evaluation protocol (DQN, AAAI 2016; DSQ, CVPR 2019), for
single-label and multi-label targets.
"""

# The implementation lives in the private module ``_base`` so that this
# namespace holds the public loaders only (no ``np``, ``os``, ``gzip``, ...),
# as in ``sklearn.datasets``.
from ._base import load_cifar10, load_fashion_mnist, load_yeast, retrieval_split

__all__ = [
    "load_cifar10",
    "load_fashion_mnist",
    "load_yeast",
    "retrieval_split",
]


def __dir__():
    # Tab completion and dir() list the public loaders, not the ``_base``
    # submodule or the module's dunder attributes (as ``sklearn.__dir__``).
    return list(__all__)
