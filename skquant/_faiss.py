"""faiss interoperability: export skquant indexes to faiss, import faiss PQ indexes.

faiss (optional, ``pip install faiss-cpu``) searches product-quantized codes
with the same asymmetric distance as skquant but does not learn supervised
codebooks. These helpers copy codebooks and codes between the two, so a model
trained with skquant can be served by faiss, and a faiss ``IndexPQ`` can be
searched, scored and plotted with skquant.

Layout correspondence (faiss wiki "Faiss indexes", ``contrib/inspect_tools``):

* block codebooks ``codebooks_`` (M, K, D/M) <-> ``ProductQuantizer.centroids``
  (M * K * D/M floats, the same order); codes (n, M) <-> ``index.codes``, one
  byte per code when K = 256, bit-packed (``faiss.pack_bitstrings``) otherwise;
* an orthogonal rotation ``rotation_`` (quantize ``Z @ R``) <-> a
  ``LinearTransform`` with matrix ``A = R.T`` (faiss applies ``y = A x``) in
  an ``IndexPreTransform``;
* additive codebooks (M, K, D) <-> ``AdditiveQuantizer.codebooks``, searched
  by inner product without norms (``ST_LUT_nonorm``).

faiss needs ``K`` to be a power of two; other sizes are padded with copies of
codeword 0, which no stored code refers to and which never changes a search
result.
"""

# SPDX-License-Identifier: BSD-3-Clause

import numpy as np

from ._codebooks import AdditiveCodebooks, ProductCodebooks

__all__ = ["from_faiss", "to_faiss"]


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "faiss is required for to_faiss()/from_faiss(); install it with "
            "`pip install faiss-cpu` (or faiss-gpu)."
        ) from exc
    return faiss


def _n_bits(n_codewords):
    """Bits per code: faiss stores 2**nbits codewords per codebook."""
    return max(1, int(np.ceil(np.log2(n_codewords))))


def _padded_codebooks(codebooks, n_bits):
    """Pad (M, K, d) codebooks to 2**n_bits codewords with copies of codeword 0."""
    n_codebooks, n_codewords, dim = codebooks.shape
    padded = np.empty((n_codebooks, 2**n_bits, dim), dtype=np.float32)
    padded[:, :n_codewords] = codebooks
    padded[:, n_codewords:] = codebooks[:, :1]
    return padded


def _pack_codes(faiss, codes, n_bits):
    """(n, M) integer codes -> (n, code_size) uint8 in faiss's bit layout."""
    if n_bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    return faiss.pack_bitstrings(np.ascontiguousarray(codes, dtype=np.int32), n_bits)


def _fill_codes(faiss, index, codes, n_bits):
    packed = _pack_codes(faiss, codes, n_bits)
    if packed.shape[1] != index.code_size:  # pragma: no cover - defensive
        raise RuntimeError(
            f"packed codes have {packed.shape[1]} bytes, faiss expects {index.code_size}."
        )
    faiss.copy_array_to_vector(packed.ravel(), index.codes)
    index.ntotal = codes.shape[0]


def _ivf_pq(faiss, estimator, coarse, rotation, n_bits, faiss_metric):
    """An empty IndexIVFPQ with skquant's cells, on residual codes
    (``by_residual``) when the estimator's are, else on direct codes."""
    n_codebooks, _, sub_dim = estimator.codebooks_.shape
    dim = n_codebooks * sub_dim
    centroids = np.asarray(coarse, dtype=np.float32)
    if rotation is not None:
        # Cells are defined in the embedding space; faiss sees rotated vectors,
        # and distances to rotated centroids are the same.
        centroids = centroids @ rotation
    if faiss_metric == faiss.METRIC_L2:
        coarse_index = faiss.IndexFlatL2(dim)
    else:
        coarse_index = faiss.IndexFlatIP(dim)
    coarse_index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFPQ(
        coarse_index, dim, len(centroids), n_codebooks, n_bits, faiss_metric
    )
    index.referenced_objects = [coarse_index]  # faiss does not own the quantizer
    # Residual codes encode x - c (rotated: x R - c R, the residual faiss
    # computes behind the pre-transform); direct codes are the items' own.
    index.by_residual = bool(estimator.index_.by_residual)
    index.nprobe = int(getattr(estimator, "n_probe", 1))
    return index


def _ivf_rq(faiss, coarse, codebooks, n_bits):
    """An empty IndexIVFResidualQuantizer on direct (non-residual) additive
    codes, inner product, with skquant's cells."""
    n_codebooks, _, dim = codebooks.shape
    # skquant's inner-product cells: best centroid = largest <x, c>.
    coarse_index = faiss.IndexFlatIP(dim)
    coarse_index.add(np.ascontiguousarray(coarse, dtype=np.float32))
    index = faiss.IndexIVFResidualQuantizer(
        coarse_index, dim, len(coarse), n_codebooks, n_bits,
        faiss.METRIC_INNER_PRODUCT, faiss.AdditiveQuantizer.ST_LUT_nonorm,
    )
    index.referenced_objects = [coarse_index]  # faiss does not own the quantizer
    # Direct codes of the items (skquant does not encode residuals), scored by
    # <q, x_hat> from lookup tables, as the flat IndexResidualQuantizer.
    index.by_residual = False
    faiss.copy_array_to_vector(codebooks.ravel(), index.rq.codebooks)
    index.rq.is_trained = True
    index.is_trained = True
    return index


def _fill_inverted_lists(faiss, estimator, index, codes, n_bits):
    packed = _pack_codes(faiss, codes, n_bits)
    # The cells of residual codes are part of them; direct codes' cells are
    # those of their reconstructions.
    cells = np.asarray(estimator.index_.cells)
    order = np.argsort(cells, kind="stable")
    bounds = np.searchsorted(cells[order], np.arange(index.nlist + 1))
    for cell in range(index.nlist):
        ids = order[bounds[cell] : bounds[cell + 1]].astype(np.int64)
        if ids.size:
            cell_codes = np.ascontiguousarray(packed[ids])
            index.invlists.add_entries(
                cell, ids.size, faiss.swig_ptr(ids), faiss.swig_ptr(cell_codes)
            )
    index.ntotal = codes.shape[0]


def to_faiss(estimator):
    """Build a faiss index holding a fitted quantizer's codebooks and codes.

    Parameters
    ----------
    estimator : fitted skquant quantizer
        :class:`~skquant.ProductQuantizer`, :class:`~skquant.DeepQuantizer`
        (product codebooks, Euclidean AQD) or
        :class:`~skquant.SphericalQuantizer` (additive codebooks, inner product).

    Returns
    -------
    index : faiss.Index
        * product codebooks: ``faiss.IndexPQ`` (``METRIC_L2``: ``search``
          returns squared AQD, the square of ``kneighbors``' distances), inside
          a ``faiss.IndexPreTransform`` when the estimator has a ``rotation_``;
          ``faiss.IndexIVFPQ`` with the same cells, ``nprobe = n_probe`` and
          ``by_residual`` as the estimator's codes (residual codes of
          ``ProductQuantizer(by_residual=True)``, else direct codes) when it
          has an inverted file (``n_lists``); faiss probes exactly
          ``nprobe`` cells, where skquant probes more when they hold fewer
          than ``n_neighbors`` items;
        * additive codebooks with inner product: ``faiss.IndexResidualQuantizer``
          with ``METRIC_INNER_PRODUCT`` and ``ST_LUT_nonorm`` (``search``
          returns ``<z_q, x_hat>``, i.e. ``1 - distance`` of ``kneighbors``);
          ``faiss.IndexIVFResidualQuantizer`` with ``by_residual=False``, the
          same cells and ``nprobe = n_probe`` when it has an inverted file.

        An estimator with ``n_lists`` is always exported with its inverted
        file: when its cells are not trained yet (``n_lists`` changed, or
        larger than the items indexed so far), a ``ValueError`` asks for
        :meth:`train_inverted_file` instead of a flat index being returned.

        Queries must be embedded first: ``index.search(estimator.transform(X), k)``.
        The faiss index is a copy: later ``index``/``add`` calls on the
        estimator do not change it.
    """
    faiss = _import_faiss()
    codebooks = np.ascontiguousarray(estimator.codebooks_, dtype=np.float32)
    codes = np.asarray(estimator.codes_)
    n_codebooks, n_codewords, sub_dim = codebooks.shape
    n_bits = _n_bits(n_codewords)
    padded = _padded_codebooks(codebooks, n_bits)
    quantizer = estimator.quantizer_
    metric = quantizer.metric

    rotation = getattr(estimator, "rotation_", None)
    coarse = getattr(estimator, "coarse_centroids_", None)
    n_lists = getattr(estimator, "n_lists", None)
    if n_lists is not None and (coarse is None or len(coarse) != n_lists):
        # Never export a flat index for an estimator that searches cells.
        trained = 0 if coarse is None else len(coarse)
        raise ValueError(
            f"{type(estimator).__name__} has n_lists={n_lists} but its coarse "
            f"quantizer has {trained} cells: call train_inverted_file() before "
            f"to_faiss(), or set n_lists=None to export a flat index."
        )
    if isinstance(quantizer, ProductCodebooks):
        dim = n_codebooks * sub_dim
        faiss_metric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
        if coarse is None:
            index = faiss.IndexPQ(dim, n_codebooks, n_bits, faiss_metric)
            pq = index.pq
        else:
            index = _ivf_pq(faiss, estimator, coarse, rotation, n_bits, faiss_metric)
            pq = index.pq
        faiss.copy_array_to_vector(padded.ravel(), pq.centroids)
        index.is_trained = True
        if coarse is not None and index.by_residual:
            # faiss's per-cell tables ||r||^2 + 2 <c, r> (what skquant's
            # scan adds per item), built from the copied codebooks.
            index.precompute_table()
        if coarse is None:
            _fill_codes(faiss, index, codes, n_bits)
        else:
            _fill_inverted_lists(faiss, estimator, index, codes, n_bits)
    elif isinstance(quantizer, AdditiveCodebooks) and metric == "inner_product" and (
        coarse is not None
    ):
        dim = sub_dim
        index = _ivf_rq(faiss, coarse, padded, n_bits)
        index.nprobe = int(getattr(estimator, "n_probe", 1))
        _fill_inverted_lists(faiss, estimator, index, codes, n_bits)
    elif isinstance(quantizer, AdditiveCodebooks) and metric == "inner_product":
        dim = sub_dim
        index = faiss.IndexResidualQuantizer(
            dim,
            n_codebooks,
            n_bits,
            faiss.METRIC_INNER_PRODUCT,
            faiss.AdditiveQuantizer.ST_LUT_nonorm,
        )
        faiss.copy_array_to_vector(padded.ravel(), index.rq.codebooks)
        index.rq.is_trained = True
        index.is_trained = True
        _fill_codes(faiss, index, codes, n_bits)
    else:
        raise NotImplementedError(
            f"to_faiss() supports product codebooks and inner-product additive "
            f"codebooks; {type(estimator).__name__} has {type(quantizer).__name__} with a "
            f"{metric} metric (faiss would need the per-item norms)."
        )

    if rotation is None:
        return index
    # skquant quantizes row vectors as Z @ R; faiss maps column vectors y = A x.
    transform = faiss.LinearTransform(dim, dim, False)
    faiss.copy_array_to_vector(
        np.ascontiguousarray(rotation.T, dtype=np.float32).ravel(), transform.A
    )
    transform.is_orthonormal = True
    transform.is_trained = True
    wrapped = faiss.IndexPreTransform(transform, index)
    # The Python wrapper keeps its arguments alive; keep ownership explicit too.
    wrapped.referenced_objects = [transform, index]
    return wrapped


def from_faiss(cls, index):
    """Build a fitted ``cls`` (ProductQuantizer) from a faiss PQ index.

    Parameters
    ----------
    cls : type
        :class:`~skquant.ProductQuantizer` or a subclass.
    index : faiss.IndexPQ or faiss.IndexPreTransform
        A trained ``IndexPQ`` with ``METRIC_L2``, optionally behind one
        orthogonal ``LinearTransform`` (e.g. ``OPQMatrix`` from
        ``index_factory(d, "OPQ8,PQ8np")``).

    Returns
    -------
    estimator : cls
        Fitted: ``codebooks_``, ``rotation_``, the index's codes as ``codes_``
        (no labels: call ``index(X, y)`` to score), ``n_features_in_``.
    """
    faiss = _import_faiss()
    from faiss.contrib.inspect_tools import get_flat_codes, get_pq_centroids

    index = faiss.downcast_index(index)
    rotation = None
    if isinstance(index, faiss.IndexPreTransform):
        if index.chain.size() != 1:
            raise ValueError(
                f"Only one pre-transform is supported, the index has {index.chain.size()}."
            )
        transform = faiss.downcast_VectorTransform(index.chain.at(0))
        if not isinstance(transform, faiss.LinearTransform):
            raise ValueError(
                f"The pre-transform must be a LinearTransform (e.g. OPQMatrix); got "
                f"{type(transform).__name__}."
            )
        if transform.d_in != transform.d_out:
            raise ValueError(
                "The pre-transform changes the dimension "
                f"({transform.d_in} -> {transform.d_out}); only rotations are supported."
            )
        A = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
        bias = faiss.vector_to_array(transform.b) if transform.have_bias else None
        if (bias is not None and np.any(bias)) or not np.allclose(
            A @ A.T, np.eye(len(A)), atol=1e-4
        ):
            raise ValueError("The pre-transform must be an orthogonal rotation without bias.")
        rotation = np.ascontiguousarray(A.T, dtype=np.float32)
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexPQ):
        raise TypeError(
            f"from_faiss() needs a faiss.IndexPQ (optionally in an IndexPreTransform); "
            f"got {type(index).__name__}."
        )
    if index.metric_type != faiss.METRIC_L2:
        raise ValueError("from_faiss() needs an IndexPQ with METRIC_L2.")
    if not index.is_trained:
        raise ValueError("The faiss index is not trained.")

    pq = index.pq
    n_codebooks, n_bits = int(pq.M), int(pq.nbits)
    codebooks = np.ascontiguousarray(get_pq_centroids(pq), dtype=np.float32)
    packed = get_flat_codes(index)
    if n_bits == 8:
        codes = packed.reshape(-1, n_codebooks)
    else:
        codes = faiss.unpack_bitstrings(packed, n_codebooks, n_bits)
    codes = codes.astype(np.uint8 if n_bits <= 8 else np.uint16)

    estimator = cls(
        n_codebooks=n_codebooks, n_codewords=2**n_bits, rotation=rotation is not None
    )
    estimator.quantizer_ = ProductCodebooks(codebooks, rotation)
    estimator.n_iter_ = 0
    estimator.n_features_in_ = int(index.d)
    estimator._set_index(codes, None)
    return estimator
