"""Reading rows of an expression matrix in memory or out of core, chunk by chunk.

An AnnData opened with ``backed="r"`` keeps ``X`` on disk (an on-disk CSR matrix or an HDF5
array); :func:`perturbscope.data.read_soma` gives an ``X`` that reads rows from a TileDB-SOMA
store. A contiguous slice of rows is one read for either engine while a random row is a seek
each, so every streamed pass here reads blocks of consecutive rows, in file order.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import h5py
import numpy as np
from scipy import sparse

#: Rows read at a time.
CHUNK_SIZE = 1024


def is_out_of_core(matrix) -> bool:
    """Whether ``matrix`` is read from disk on access (a backed sparse matrix or an HDF5 array).

    Examples
    --------
    >>> import numpy as np
    >>> is_out_of_core(np.zeros((2, 2)))
    False
    """
    return isinstance(matrix, (ad.abc.CSRDataset, ad.abc.CSCDataset, h5py.Dataset))


def out_of_core_source(adata: ad.AnnData, matrix) -> str:
    """Where an out-of-core ``matrix`` of ``adata`` is read from, for messages.

    ``"the backed file '<path>'"`` for an AnnData opened with ``backed="r"``, ``"the TileDB-SOMA
    array '<uri>'"`` for :func:`perturbscope.data.read_soma`'s ``X``.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> out_of_core_source(ad.AnnData(np.zeros((2, 2))), np.zeros((2, 2)))
    'an in-memory ndarray'
    """
    uri = getattr(matrix, "uri", None)
    if isinstance(uri, str):
        return f"the TileDB-SOMA array {uri!r}"
    if adata.isbacked:
        return f"the backed file {str(adata.filename)!r}"
    return f"{'an on-disk' if is_out_of_core(matrix) else 'an in-memory'} {type(matrix).__name__}"


def read_rows(matrix, start: int, stop: int):
    """Rows ``start:stop`` of a dense, CSR or out-of-core matrix, in memory (CSR or ndarray)."""
    block = matrix[start:stop]
    return block.tocsr() if sparse.issparse(block) else np.asarray(block)


def iter_row_chunks(matrix, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, object]]:
    """``(start, rows)`` for consecutive chunks of ``chunk_size`` rows, in file order.

    Examples
    --------
    >>> import numpy as np
    >>> [(start, rows.shape) for start, rows in iter_row_chunks(np.zeros((5, 2)), 2)]
    [(0, (2, 2)), (2, (2, 2)), (4, (1, 2))]
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    n_obs = matrix.shape[0]
    for start in range(0, n_obs, chunk_size):
        yield start, read_rows(matrix, start, min(start + chunk_size, n_obs))


def row_blocks(rows: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Sorted ``rows`` split by the block of ``chunk_size`` file rows that holds them."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows // chunk_size)) + 1
    return np.split(rows, cuts)


def read_block(matrix, rows: np.ndarray):
    """The sorted ``rows`` of one block: one contiguous read of their span, then a selection."""
    span = read_rows(matrix, int(rows[0]), int(rows[-1]) + 1)
    if len(rows) == span.shape[0]:  # every row of the span: no selection to make
        return span
    return span[rows - rows[0]]


def take_rows(matrix, rows: np.ndarray, chunk_size: int = CHUNK_SIZE) -> np.ndarray:
    """Dense float32 expression of the sorted ``rows``, read block by block in file order.

    Examples
    --------
    >>> import numpy as np
    >>> take_rows(np.arange(10.0).reshape(5, 2), np.array([1, 4]), chunk_size=2).tolist()
    [[2.0, 3.0], [8.0, 9.0]]
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be sorted and distinct.")
    out = np.empty((len(rows), matrix.shape[1]), dtype=np.float32)
    done = 0
    for block in row_blocks(rows, chunk_size):
        values = read_block(matrix, block)
        out[done : done + len(block)] = values.toarray() if sparse.issparse(values) else values
        done += len(block)
    return out
