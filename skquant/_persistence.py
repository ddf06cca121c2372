"""Persistence: the skquant version and a checksum of the fitted data in pickles.

Every skquant estimator (and :class:`~skquant.QuantizedKNeighborsTransformer`)
pickles through :class:`_VersionedPickleMixin`: loading warns with
:class:`InconsistentVersionWarning` under another skquant version, and refuses
a pickle whose arrays no longer match their checksum.
"""

import warnings
import zlib

import numpy as np
from sklearn.exceptions import InconsistentVersionWarning as _SklearnVersionWarning

from ._version import __version__

__all__ = ["InconsistentVersionWarning"]


class InconsistentVersionWarning(_SklearnVersionWarning):
    """Warning raised when an estimator is unpickled under another skquant version.

    A subclass of scikit-learn's warning of the same name, so filters set for
    scikit-learn's also apply.

    Parameters
    ----------
    estimator_name : str
        Estimator name.
    current_skquant_version : str
        The skquant version that loads the estimator.
    original_skquant_version : str
        The skquant version that pickled it.
    """

    def __init__(self, *, estimator_name, current_skquant_version, original_skquant_version):
        super().__init__(
            estimator_name=estimator_name,
            current_sklearn_version=current_skquant_version,
            original_sklearn_version=original_skquant_version,
        )
        self.current_skquant_version = current_skquant_version
        self.original_skquant_version = original_skquant_version

    def __str__(self):
        return (
            f"Trying to unpickle estimator {self.estimator_name} from skquant "
            f"version {self.original_skquant_version} when using version "
            f"{self.current_skquant_version}. This might lead to breaking code or "
            "invalid results. Use at your own risk; refit the estimator, or load it "
            "with the version that saved it."
        )


def _fitted_data_crc(state):
    """CRC-32 of the numeric data of an estimator's state.

    Covers numpy arrays, scipy sparse arrays, torch tensors and modules
    (their ``state_dict``), inside dicts, lists, tuples and skquant's own
    objects (codebooks, the index and its layouts). Python scalars and strings
    are left out: a flipped byte there breaks the pickle's structure or is
    caught by the unpickler, while one inside array data loads silently.
    """
    crc = 0

    # No deduplication of shared arrays (codes_ and its layout's codes): a
    # pickle keeps them shared, joblib's files store them twice, and the sum
    # must not depend on which wrote it.
    def feed(obj):
        nonlocal crc
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                for item in obj.ravel(order="K"):
                    feed(item)
                return
            if obj.size == 0:
                return
            # C order whatever the memory layout (a loader may change it),
            # a few MiB at a time (codes_ is Fortran-ordered).
            rows = obj.reshape(obj.shape[0], -1) if obj.ndim else obj.reshape(1, 1)
            step = max(1, 2**22 // max(1, rows[:1].nbytes))
            for start in range(0, rows.shape[0], step):
                block = np.ascontiguousarray(rows[start : start + step])
                crc = zlib.crc32(block.view(np.uint8), crc)
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                feed(item)
        elif hasattr(obj, "tocsr") and hasattr(obj, "data"):  # scipy sparse
            for name in ("data", "indices", "indptr", "row", "col", "offsets"):
                feed(getattr(obj, name, None))
        elif type(obj).__module__.startswith("torch"):
            import torch

            if isinstance(obj, torch.nn.Module):
                feed(dict(obj.state_dict()))
            elif isinstance(obj, torch.Tensor):
                feed(obj.detach().cpu().numpy())
        elif type(obj).__module__.startswith("skquant."):
            feed(obj.__getstate__() if hasattr(obj, "__getstate__") else vars(obj))

    feed(state)
    return crc


class _VersionedPickleMixin:
    """Store the skquant version and a checksum of the fitted data in pickles.

    Loading warns under another skquant version, and raises when the
    checksum does not match: a flipped byte inside an array would otherwise
    load silently and change every search result.
    """

    def __getstate__(self):
        # A copy: BaseEstimator.__getstate__ may return the instance __dict__ itself.
        state = dict(super().__getstate__(), _skquant_version=__version__)
        state["_skquant_crc32"] = _fitted_data_crc(state)
        return state

    def __setstate__(self, state):
        state = dict(state)
        expected = state.pop("_skquant_crc32", None)
        # Pickles written before the checksum existed have none to verify.
        if expected is not None and _fitted_data_crc(state) != expected:
            raise ValueError(
                f"The pickled {type(self).__name__} is corrupt: the checksum of "
                "its fitted arrays (codebooks, codes, network weights) does not "
                "match the one stored when it was saved. Load an intact copy or "
                "refit the estimator."
            )
        pickle_version = state.pop("_skquant_version", "unknown")
        if pickle_version != __version__:
            warnings.warn(
                InconsistentVersionWarning(
                    estimator_name=type(self).__name__,
                    current_skquant_version=__version__,
                    original_skquant_version=pickle_version,
                ),
                stacklevel=2,
            )
        super().__setstate__(state)
