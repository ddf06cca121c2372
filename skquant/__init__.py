"""skquant: supervised deep quantization for fast, compact similarity search.

Estimators follow the scikit-learn API (``fit``/``transform``/``kneighbors``)
and search by asymmetric quantizer distance over compact codes.
"""

from ._base import BaseQuantizer, InconsistentVersionWarning
from ._dqn import DeepQuantizer
from ._dsq import SphericalQuantizer
from ._pq import ProductQuantizer
from .neighbors import QuantizedKNeighborsTransformer

__version__ = "0.1.0.dev0"

__all__ = [
    "BaseQuantizer",
    "DeepQuantizer",
    "InconsistentVersionWarning",
    "ProductQuantizer",
    "QuantizedKNeighborsTransformer",
    "SphericalQuantizer",
    "__version__",
]
