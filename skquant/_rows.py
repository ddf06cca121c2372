"""Rows of the user's data as dense arrays, one slice at a time.

Every public method accepts scipy sparse ``X`` (as
:class:`sklearn.neighbors.NearestNeighbors` does). Networks, codebooks and
lookup tables need dense rows, so sparse data is densified one slice at a
time -- an encoding chunk bounded by ``working_memory``, a mini-batch, a
batch of queries -- and never whole.

Pure numpy/scipy, imports nothing of skquant.
"""

import numpy as np
import scipy.sparse as sp

__all__ = ["dense_rows"]


def dense_rows(X, dtype=np.float32):
    """A fresh, writeable, C-ordered dense copy of rows ``X`` in ``dtype``.

    ``X`` is a slice of the data: a numpy array (possibly a read-only memmap,
    which torch cannot wrap without a warning) or a scipy sparse matrix.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> dense_rows(sp.csr_matrix(np.eye(2)))
    array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    if type(X) is np.ndarray:  # (issparse's class checks cost a microsecond)
        return np.array(X, dtype=dtype, order="C")
    if sp.issparse(X):
        return np.ascontiguousarray(X.toarray(), dtype=dtype)
    return np.array(X, dtype=dtype, order="C")
