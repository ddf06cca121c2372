"""skquant: supervised deep quantization for fast, compact similarity search.

Estimators follow the scikit-learn API (``fit``/``transform``/``kneighbors``)
and search by asymmetric quantizer distance over compact codes.
"""

from ._base import BaseQuantizer
from ._deep._dqn import DeepQuantizer
from ._deep._dsq import SphericalQuantizer
from ._persistence import InconsistentVersionWarning
from ._pq import ProductQuantizer
from ._version import __version__
from .neighbors import QuantizedKNeighborsTransformer

__all__ = [
    "BaseQuantizer",
    "DeepQuantizer",
    "InconsistentVersionWarning",
    "ProductQuantizer",
    "QuantizedKNeighborsTransformer",
    "SphericalQuantizer",
    "__version__",
]
