"""skquant: supervised deep quantization for fast, compact similarity search.

Estimators follow the scikit-learn API (``fit``/``transform``/``kneighbors``)
and search by asymmetric quantizer distance over compact codes.
"""

import sys as _sys

from ._base import BaseQuantizer
from ._deep import _dqn, _dsq, _dsq_losses, _losses, _torch
from ._deep._dqn import DeepQuantizer
from ._deep._dsq import SphericalQuantizer
from ._persistence import InconsistentVersionWarning
from ._pq import ProductQuantizer
from ._version import __version__
from .neighbors import QuantizedKNeighborsTransformer

# A pickle names the module that defined its class: those written before the
# deep estimators moved into skquant._deep name skquant._dqn / skquant._dsq,
# and their networks and heads skquant._torch / _losses / _dsq_losses.
for _old in (_dqn, _dsq, _dsq_losses, _losses, _torch):
    _sys.modules.setdefault(f"{__name__}.{_old.__name__.rpartition('.')[2]}", _old)
del _old

__all__ = [
    "BaseQuantizer",
    "DeepQuantizer",
    "InconsistentVersionWarning",
    "ProductQuantizer",
    "QuantizedKNeighborsTransformer",
    "SphericalQuantizer",
    "__version__",
]
