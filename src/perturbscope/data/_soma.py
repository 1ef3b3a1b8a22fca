"""TileDB-SOMA experiments (the engine behind CELLxGENE Census) as out-of-core AnnData.

:func:`read_soma` reads a SOMA experiment's ``obs`` and one measurement's ``var`` into memory
and wraps its ``X`` layer (a sparse ND array) in :class:`SomaCSRMatrix`, an
:class:`anndata.abc.CSRDataset` that reads rows from the store on demand, as anndata's own
backed CSR matrix reads them from HDF5. The result is an ordinary :class:`~anndata.AnnData`
that ScopeVI registers and trains on through the streamed loader
(:class:`~perturbscope.data.StreamedDataSplitter`) without loading the expression. Cells and
genes are in ``soma_joinid`` order.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as error:  # an optional dependency
        raise ImportError(
            "Reading TileDB-SOMA needs the tiledbsoma package: pip install 'perturbscope[soma]'."
        ) from error
    return tiledbsoma


def _as_rows(index, n: int) -> np.ndarray:
    """Row positions selected by a slice, an integer array or a boolean mask."""
    if isinstance(index, slice):
        return np.arange(n)[index]
    index = np.asarray(index)
    if index.dtype == bool:
        return np.flatnonzero(index)
    return np.atleast_1d(index).astype(np.int64)


class SomaCSRMatrix(ad.abc.CSRDataset):
    """Rows of a SOMA sparse ND array, read on demand as CSR (an :class:`anndata.abc.CSRDataset`).

    Parameters
    ----------
    uri
        URI of the ``SparseNDArray`` (``experiment.ms[measurement].X[layer].uri``).
    obs_joinids, var_joinids
        ``soma_joinid`` of the rows and columns, in the order they have in the AnnData.
    dtype
        Value type of the array.
    """

    backend = "tiledb"

    def __init__(self, uri: str, obs_joinids: np.ndarray, var_joinids: np.ndarray, dtype):
        self.uri = uri
        self.obs_joinids = np.asarray(obs_joinids, dtype=np.int64)
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        if np.any(np.diff(self.var_joinids) <= 0):
            raise ValueError("var_joinids must be increasing.")
        self.shape = (len(self.obs_joinids), len(self.var_joinids))
        self.dtype = np.dtype(dtype)

    def _read(self, rows: np.ndarray) -> sparse.csr_matrix:
        unique, inverse = np.unique(self.obs_joinids[rows], return_inverse=True)
        if len(unique) == 0:
            return sparse.csr_matrix((len(rows), self.shape[1]), dtype=self.dtype)
        contiguous = unique[-1] - unique[0] == len(unique) - 1
        # one range read for consecutive cells (inclusive bounds in SOMA), points otherwise
        coords = slice(int(unique[0]), int(unique[-1])) if contiguous else unique
        with _tiledbsoma().SparseNDArray.open(self.uri) as array:
            table = array.read(coords=(coords, self.var_joinids)).tables().concat()
        row = np.searchsorted(unique, table["soma_dim_0"].to_numpy())
        col = np.searchsorted(self.var_joinids, table["soma_dim_1"].to_numpy())
        values = table["soma_data"].to_numpy().astype(self.dtype, copy=False)
        block = sparse.csr_matrix((values, (row, col)), shape=(len(unique), self.shape[1]))
        block.sum_duplicates()
        return block if np.array_equal(inverse, np.arange(len(unique))) else block[inverse]

    def __getitem__(self, index):
        rows, columns = index if isinstance(index, tuple) else (index, slice(None))
        if np.isscalar(rows):
            rows = [int(rows)]
        block = self._read(_as_rows(rows, self.shape[0]))
        if not (isinstance(columns, slice) and columns == slice(None)):
            block = block[:, columns]
        return block

    def to_memory(self) -> sparse.csr_matrix:
        """The whole matrix in memory (avoid for data larger than memory)."""
        return self._read(np.arange(self.shape[0]))


def read_soma(
    uri: str,
    measurement_name: str = "RNA",
    X_name: str = "data",
    obs_column_names: list[str] | None = None,
    obs_id_name: str | None = None,
    var_id_name: str | None = None,
) -> ad.AnnData:
    """Open a TileDB-SOMA experiment as an AnnData whose ``X`` stays in the store.

    Parameters
    ----------
    uri
        The experiment (a local path or a cloud URI).
    measurement_name
        The measurement holding expression (``"RNA"`` in CELLxGENE Census).
    X_name
        The ``X`` layer to read (``"raw"`` in Census; ``"data"`` from
        :func:`tiledbsoma.io.from_anndata`).
    obs_column_names
        ``obs`` columns to read; all when ``None``.
    obs_id_name, var_id_name
        Columns used as ``obs_names`` and ``var_names``. ``None``: the index column that
        :func:`tiledbsoma.io.from_anndata` wrote (the AnnData's index name, else ``obs_id`` /
        ``var_id``); the ``soma_joinid`` (as strings) where there is none.

    Returns
    -------
    An AnnData with ``obs`` and ``var`` in memory and ``X`` a :class:`SomaCSRMatrix`.

    Raises
    ------
    KeyError
        Naming the measurement or layer that is not in the experiment.
    TypeError
        If the layer is not a sparse ND array.

    Examples
    --------
    >>> import tempfile, tiledbsoma.io, perturbscope as ps
    >>> adata, _ = ps.data.simulate_perturbseq(n_genes=20, n_perturbed_genes=4,
    ...                                        n_combinations=1, n_cells_per_condition=5)
    >>> uri = tiledbsoma.io.from_anndata(tempfile.mkdtemp() + "/exp", adata, "RNA", uns_keys=[])
    >>> soma = read_soma(uri)
    >>> soma.shape, bool((soma.X[3:5].toarray() == adata.X[3:5].toarray()).all())
    ((90, 20), True)
    """
    soma = _tiledbsoma()
    with soma.Experiment.open(uri) as experiment:
        if measurement_name not in experiment.ms:
            raise KeyError(
                f"measurement {measurement_name!r} not in the SOMA experiment {uri!r}; it has "
                f"{sorted(experiment.ms.keys())}."
            )
        measurement = experiment.ms[measurement_name]
        if X_name not in measurement.X:
            raise KeyError(
                f"X layer {X_name!r} not in measurement {measurement_name!r}; it has {sorted(measurement.X.keys())}."
            )
        array = measurement.X[X_name]
        if not isinstance(array, soma.SparseNDArray):
            raise TypeError(f"X layer {X_name!r} is a {type(array).__name__}; read_soma streams sparse ND arrays.")
        obs_id_name = obs_id_name or _index_column(experiment.obs, "obs_id")
        var_id_name = var_id_name or _index_column(measurement.var, "var_id")
        # the id column is always read: without it the cells would be named by their joinids
        available = set(experiment.obs.schema.names)
        columns = None if obs_column_names is None else list(dict.fromkeys(
            ["soma_joinid", *([obs_id_name] if obs_id_name in available else []), *obs_column_names]))
        obs = experiment.obs.read(column_names=columns).concat().to_pandas()
        var = measurement.var.read().concat().to_pandas()
        X = SomaCSRMatrix(array.uri, np.sort(obs["soma_joinid"].to_numpy()),
                          np.sort(var["soma_joinid"].to_numpy()), array.schema.field("soma_data").type.to_pandas_dtype())
    obs = _frame(obs, obs_id_name)
    var = _frame(var, var_id_name)
    return ad.AnnData(X=X, obs=obs, var=var)


def _index_column(dataframe, default: str) -> str:
    """The column tiledbsoma.io wrote the AnnData index to (recorded in the dataframe's metadata)."""
    original = json.loads(str(dataframe.metadata.get("soma_dataframe_original_index_name", "null")))
    return original or default


def _frame(table: pd.DataFrame, id_name: str) -> pd.DataFrame:
    """A SOMA dataframe in ``soma_joinid`` order, indexed by its id column (strings)."""
    table = table.sort_values("soma_joinid")
    index = table[id_name].astype(str) if id_name in table.columns else table["soma_joinid"].astype(str)
    table = table.drop(columns=[c for c in ("soma_joinid", id_name) if c in table.columns])
    table.index = pd.Index(index.to_numpy(), name=None)
    return table
