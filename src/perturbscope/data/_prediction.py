"""The prediction AnnData: how every model and baseline lays out predicted cells and their means.

A prediction has one row per (perturbation, sample, control cell): ``obs["perturbation"]``
(categorical, in the requested order), ``obs["control_cell"]`` (the anchor), ``obs["sample"]``
and the control cells' context columns; rows are named ``"{perturbation}|{control cell}|{sample}"``.
``X`` is on the training scale and ``layers["log1p_norm"]`` is log1p-normalised. Its mean over
cells (``aggregate="mean"``) has one row per perturbation (and context), named
``"{perturbation}|{context}"``, with ``obs["n_cells"]``.

Predictions too large for memory are streamed: :class:`PredictionMeans` keeps running sums per
(perturbation, context), so a mean prediction never holds predicted cells, and
:class:`PredictionStore` writes predicted cells in slices to an ``.h5ad`` or ``.zarr`` store
with anndata's own writer (``anndata.io.write_elem``, resizable datasets for ``X`` and the
layer), in the same layout.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import zarr
from anndata.io import write_elem
from scipy import sparse

from .._constants import OUTPUT_KEYS
from ._pseudobulk import pseudobulk


def prediction_obs(perturbations: Sequence[str], control_obs: pd.DataFrame, n_samples: int = 1) -> pd.DataFrame:
    """``obs`` of predicted cells: one row per (perturbation, sample, control cell), in that order.

    Parameters
    ----------
    perturbations
        The predicted labels, in order.
    control_obs
        ``obs`` of the anchor control cells, restricted to the columns to carry over.
    n_samples
        Draws per control cell.

    Returns
    -------
    A DataFrame with ``perturbation`` (categorical), ``control_cell``, ``sample`` and the columns
    of ``control_obs``, indexed ``"{perturbation}|{control cell}|{sample}"``.

    Examples
    --------
    >>> import pandas as pd
    >>> prediction_obs(["A", "B"], pd.DataFrame(index=["c0"]), n_samples=2).index.tolist()
    ['A|c0|0', 'A|c0|1', 'B|c0|0', 'B|c0|1']
    """
    perturbations = [str(p) for p in perturbations]
    n_cells = len(control_obs)
    repeat = len(perturbations) * n_samples
    obs = pd.DataFrame({
        OUTPUT_KEYS.PERTURBATION: pd.Categorical(
            np.repeat(perturbations, n_samples * n_cells), categories=list(dict.fromkeys(perturbations))
        ),
        OUTPUT_KEYS.CONTROL_CELL: np.tile(control_obs.index.astype(str).to_numpy(), repeat),
        OUTPUT_KEYS.SAMPLE: np.tile(np.repeat(np.arange(n_samples), n_cells), len(perturbations)),
    })
    for column in control_obs.columns:
        values = control_obs[column]
        obs[column] = np.tile(values.to_numpy(), repeat)
        if isinstance(values.dtype, pd.CategoricalDtype):
            obs[column] = pd.Categorical(obs[column], categories=values.cat.categories)
    obs.index = [
        f"{p}|{c}|{s}"
        for p, c, s in zip(obs[OUTPUT_KEYS.PERTURBATION], obs[OUTPUT_KEYS.CONTROL_CELL], obs[OUTPUT_KEYS.SAMPLE])
    ]
    return obs


def prediction_anndata(
    perturbations: Sequence[str],
    control_obs: pd.DataFrame,
    X: np.ndarray,
    log1p_norm: np.ndarray,
    var_names: pd.Index,
    n_samples: int = 1,
    provenance: dict | None = None,
) -> ad.AnnData:
    """Lay out predicted cells as an AnnData.

    Parameters
    ----------
    perturbations
        The predicted labels, in order.
    control_obs
        ``obs`` of the anchor control cells, restricted to the columns to carry over (context,
        batch, covariates); its index names the anchors.
    X, log1p_norm
        Predictions ``(perturbations * n_samples * cells, genes)``, perturbation-major, then
        sample, then control cell.
    var_names
        Genes.
    n_samples
        Draws per control cell.
    provenance
        Stored in ``uns["perturbscope"]``.

    Returns
    -------
    The prediction AnnData described in this module's docstring.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> obs = pd.DataFrame({"cell_type": ["t", "t"]}, index=["c0", "c1"])
    >>> pred = prediction_anndata(["A"], obs, np.ones((2, 3)), np.ones((2, 3)), pd.Index(list("xyz")))
    >>> pred.obs_names.tolist(), pred.obs.columns.tolist()
    (['A|c0|0', 'A|c1|0'], ['perturbation', 'control_cell', 'sample', 'cell_type'])
    """
    obs = prediction_obs(perturbations, control_obs, n_samples)
    prediction = ad.AnnData(
        X=np.asarray(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(var_names).copy()),
        layers={OUTPUT_KEYS.LOG1P_NORM_LAYER: np.asarray(log1p_norm, dtype=np.float32)},
    )
    prediction.uns[OUTPUT_KEYS.PROVENANCE_UNS] = dict(provenance or {})
    return prediction


def aggregate_prediction(prediction: ad.AnnData, context_key: str | None = None) -> ad.AnnData:
    """Mean predicted profile of every perturbation (and context): ``X`` and ``log1p_norm``.

    Parameters
    ----------
    prediction
        From :func:`prediction_anndata`.
    context_key
        Context column to keep apart; ignored when ``None`` or absent from ``prediction.obs``.

    Returns
    -------
    One row per perturbation (and context), in the requested perturbation order, with
    ``obs["n_cells"]``; ``uns`` is carried over.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> obs = pd.DataFrame(index=["c0", "c1"])
    >>> pred = prediction_anndata(["B", "A"], obs, np.arange(12.0).reshape(4, 3),
    ...                           np.zeros((4, 3)), pd.Index(list("xyz")))
    >>> mean = aggregate_prediction(pred)
    >>> mean.obs_names.tolist(), mean.X[0].tolist(), mean.obs["n_cells"].tolist()
    (['B', 'A'], [1.5, 2.5, 3.5], [2, 2])
    """
    groupby = [OUTPUT_KEYS.PERTURBATION] + ([context_key] if context_key in prediction.obs else [])
    X = pseudobulk(prediction, groupby)
    log1p_norm = pseudobulk(prediction, groupby, layer=OUTPUT_KEYS.LOG1P_NORM_LAYER)
    sizes = prediction.obs.groupby(groupby, observed=True).size()
    sizes.index = sizes.index.map(lambda key: tuple(map(str, key)) if isinstance(key, tuple) else str(key))
    return _mean_prediction(
        X.index.to_frame(index=False), X.to_numpy(), log1p_norm.to_numpy(), sizes.reindex(X.index).to_numpy(),
        list(prediction.obs[OUTPUT_KEYS.PERTURBATION].cat.categories), prediction.var_names,
        prediction.uns.get(OUTPUT_KEYS.PROVENANCE_UNS, {}),
    )


def _mean_prediction(groups, X, log1p_norm, n_cells, order, var_names, provenance) -> ad.AnnData:
    """The mean-prediction layout: ``groups`` (perturbation and context labels as strings) with their means.

    Rows follow the perturbation ``order``, then the context labels sorted as strings (the order
    of :func:`~perturbscope.data.pseudobulk`).
    """
    obs = groups.reset_index(drop=True)
    obs[OUTPUT_KEYS.PERTURBATION] = pd.Categorical(obs[OUTPUT_KEYS.PERTURBATION], categories=order)
    obs[OUTPUT_KEYS.N_CELLS] = np.asarray(n_cells).astype(int)
    labels = obs.columns[:-1]
    obs.index = ["|".join(map(str, row)) for row in obs[labels].itertuples(index=False)]
    rank = [obs[c].to_numpy(dtype=str) for c in labels[::-1] if c != OUTPUT_KEYS.PERTURBATION]
    sort = np.lexsort([*rank, obs[OUTPUT_KEYS.PERTURBATION].cat.codes.to_numpy()])
    aggregated = ad.AnnData(
        X=np.asarray(X, dtype=np.float32)[sort], obs=obs.iloc[sort],
        var=pd.DataFrame(index=pd.Index(var_names).copy()),
        layers={OUTPUT_KEYS.LOG1P_NORM_LAYER: np.asarray(log1p_norm, dtype=np.float32)[sort]},
    )
    aggregated.uns[OUTPUT_KEYS.PROVENANCE_UNS] = provenance
    return aggregated


class PredictionMeans:
    """Running sums of predicted cells per (perturbation, context): :func:`aggregate_prediction` in a stream.

    Memory is ``perturbations x contexts x genes`` whatever the number of predicted cells.

    Parameters
    ----------
    perturbations
        The predicted labels, in order.
    contexts
        Context label of every control cell (``None``: one group per perturbation).
    context_key
        Name of the context column in the mean prediction.
    n_samples
        Draws per control cell.
    n_genes
        Genes.
    n_layers
        Arrays summed per cell (``X`` and ``log1p_norm`` for a prediction).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> sums = PredictionMeans(["A"], np.array(["t", "u", "t"]), "cell_type", n_samples=1, n_genes=2)
    >>> sums.add(0, slice(0, 2), np.array([[[1.0, 2], [5, 5]]]), np.zeros((1, 2, 2)))
    >>> sums.add(0, slice(2, 3), np.array([[[3.0, 4]]]), np.zeros((1, 1, 2)))
    >>> mean = sums.to_anndata(pd.Index(["x", "y"]))
    >>> mean.obs_names.tolist(), mean.X.tolist(), mean.obs["n_cells"].tolist()
    (['A|t', 'A|u'], [[2.0, 3.0], [5.0, 5.0]], [2, 1])

    Without contexts, one mean per perturbation over every cell added:

    >>> pooled = PredictionMeans(["A"], None, None, n_samples=1, n_genes=2)
    >>> pooled.add(0, slice(0, 2), np.array([[[1.0, 2], [5, 5]]]), np.zeros((1, 2, 2)))
    >>> pooled.add(0, slice(2, 3), np.array([[[3.0, 4]]]), np.zeros((1, 1, 2)))
    >>> pooled.means(0).tolist(), pooled.to_anndata(pd.Index(["x", "y"])).obs["n_cells"].tolist()
    ([[[3.0, 3.6666666666666665]]], [3])
    """

    def __init__(self, perturbations: Sequence[str], contexts: np.ndarray | None, context_key: str | None,
                 n_samples: int, n_genes: int, n_layers: int = 2):
        self.perturbations = [str(p) for p in perturbations]
        self.context_key = context_key if contexts is not None else None
        self.contexts, self._codes = None, None
        if contexts is not None:
            self.contexts, self._codes = np.unique(np.asarray(contexts).astype(str), return_inverse=True)
        n_groups = 1 if self.contexts is None else len(self.contexts)
        self.n_samples = n_samples
        self.counts = np.zeros((len(self.perturbations), n_groups), dtype=np.int64)
        self.sums = np.zeros((n_layers, len(self.perturbations), n_groups, n_genes))

    def add(self, perturbation: int, cells: slice, *values: np.ndarray) -> None:
        """Add predicted cells ``(n_samples, cells, genes)`` of one perturbation, one array per layer."""
        self.counts[perturbation] += self.n_samples * np.bincount(
            self.context_of(cells), minlength=self.counts.shape[1]
        )
        for layer, value in enumerate(values):
            per_cell = value.sum(axis=0, dtype=np.float64)
            if self._codes is None:
                self.sums[layer, perturbation, 0] += per_cell.sum(axis=0)
                continue
            codes = self._codes[cells]
            indicator = sparse.csr_matrix(
                (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(self.sums.shape[2], len(codes))
            )
            self.sums[layer, perturbation] += indicator @ per_cell

    def means(self, layer: int = 0) -> np.ndarray:
        """Means so far, ``(perturbations, contexts, genes)``; contexts in :attr:`contexts` order."""
        return self.sums[layer] / np.maximum(self.counts, 1)[:, :, None]

    def context_of(self, cells: slice) -> np.ndarray:
        """Index into :attr:`contexts` of each control cell in ``cells`` (zeros without contexts)."""
        if self._codes is None:
            return np.zeros(cells.stop - cells.start, dtype=int)
        return self._codes[cells]

    def to_anndata(self, var_names: pd.Index, provenance: dict | None = None) -> ad.AnnData:
        """The mean prediction, laid out as :func:`aggregate_prediction` lays it out."""
        n_perturbations, n_groups = self.sums.shape[1:3]
        groups = pd.DataFrame({OUTPUT_KEYS.PERTURBATION: np.repeat(self.perturbations, n_groups)})
        if self.contexts is not None:
            groups[self.context_key] = np.tile(self.contexts, n_perturbations)
        n_genes = self.sums.shape[-1]
        return _mean_prediction(
            groups, self.means(0).reshape(-1, n_genes), self.means(1).reshape(-1, n_genes),
            self.counts.ravel(), list(dict.fromkeys(self.perturbations)), var_names,
            dict(provenance or {}),
        )


#: Suffixes :class:`PredictionStore` writes, and the anndata format of each.
STORE_FORMATS = {".h5ad": "h5ad", ".zarr": "zarr"}


def check_store_path(path: str | Path) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` after checking it can take a new prediction store.

    Raises
    ------
    ValueError
        If the suffix is not ``.h5ad`` or ``.zarr``, the path exists, or its folder does not.

    Examples
    --------
    >>> check_store_path("predictions.csv")
    Traceback (most recent call last):
    ...
    ValueError: out='predictions.csv' must end in '.h5ad' or '.zarr' (the anndata formats written).
    """
    path = Path(path)
    if path.suffix not in STORE_FORMATS:
        raise ValueError(f"out={str(path)!r} must end in '.h5ad' or '.zarr' (the anndata formats written).")
    if path.exists():
        raise ValueError(f"out={str(path)!r} exists; predictions are never written over a file, pass a new path.")
    if not path.parent.is_dir():
        raise ValueError(f"out={str(path)!r}: the folder {str(path.parent)!r} does not exist.")
    return path


class PredictionStore:
    """Predicted cells written in slices to a new ``.h5ad`` or ``.zarr`` store, in the prediction layout.

    ``obs``, ``var`` and ``uns`` are written first with ``anndata.io.write_elem``; ``X`` and
    ``layers["log1p_norm"]`` are written the same way as empty arrays, resized to their final
    shape and filled by :meth:`write`. Read the result with ``anndata.read_h5ad(path,
    backed="r")`` or ``anndata.read_zarr``. A store that fails while it is being created, or
    whose ``with`` block raises, is deleted (:meth:`discard`).

    Parameters
    ----------
    path
        New file ending in ``.h5ad`` or ``.zarr`` (see :func:`check_store_path`).
    perturbations, control_obs, n_samples
        As in :func:`prediction_obs`.
    var_names
        Genes.
    provenance
        Stored in ``uns["perturbscope"]``.
    rows_per_chunk
        Rows of a storage chunk.

    Examples
    --------
    >>> import tempfile, numpy as np, pandas as pd, anndata as ad
    >>> path = tempfile.mkdtemp() + "/pred.h5ad"
    >>> with PredictionStore(path, ["A"], pd.DataFrame(index=["c0", "c1"]), pd.Index(["x"])) as store:
    ...     store.write(0, slice(0, 2), np.array([[[1.0], [2.0]]]), np.zeros((1, 2, 1)))
    >>> ad.read_h5ad(path).X.tolist()
    [[1.0], [2.0]]
    """

    def __init__(self, path: str | Path, perturbations: Sequence[str], control_obs: pd.DataFrame,
                 var_names: pd.Index, n_samples: int = 1, provenance: dict | None = None, rows_per_chunk: int = 1024):
        self.path = check_store_path(path)
        self.n_cells, self.n_samples = len(control_obs), n_samples
        skeleton = ad.AnnData(obs=prediction_obs(perturbations, control_obs, n_samples),
                              var=pd.DataFrame(index=pd.Index(var_names).copy()))
        skeleton.uns[OUTPUT_KEYS.PROVENANCE_UNS] = dict(provenance or {})
        shape = skeleton.shape
        chunks = (max(1, min(rows_per_chunk, shape[0])), max(1, shape[1]))
        empty = np.zeros((0, shape[1]), dtype=np.float32)
        if STORE_FORMATS[self.path.suffix] == "h5ad":
            self._file = h5py.File(self.path, "w-")
            kwargs = {"maxshape": (None, shape[1]), "chunks": chunks}
        else:
            self._file = zarr.open_group(self.path, mode="w-", zarr_format=ad.settings.zarr_write_format)
            kwargs = {"chunks": chunks}
        try:
            write_elem(self._file, "/", skeleton)
            write_elem(self._file, "X", empty, dataset_kwargs=kwargs)
            write_elem(self._file["layers"], OUTPUT_KEYS.LOG1P_NORM_LAYER, empty, dataset_kwargs=kwargs)
            self._arrays = [self._file["X"], self._file["layers"][OUTPUT_KEYS.LOG1P_NORM_LAYER]]
            for array in self._arrays:
                array.resize(shape)
        except BaseException:  # e.g. an obs column h5py cannot write: leave no half-made file behind
            self.discard()
            raise

    def write(self, perturbation: int, cells: slice, X: np.ndarray, log1p_norm: np.ndarray) -> None:
        """Write predicted cells ``(n_samples, cells, genes)`` of one perturbation."""
        for sample in range(self.n_samples):
            start = (perturbation * self.n_samples + sample) * self.n_cells + cells.start
            rows = slice(start, start + cells.stop - cells.start)
            for array, values in zip(self._arrays, (X, log1p_norm)):
                array[rows] = np.asarray(values[sample], dtype=np.float32)

    def close(self) -> None:
        """Finish the store (zarr metadata is consolidated, as ``AnnData.write_zarr`` does)."""
        if isinstance(self._file, h5py.File):
            self._file.close()
        else:
            zarr.consolidate_metadata(str(self.path))

    def discard(self) -> None:
        """Close the store and delete what was written (after an error)."""
        if isinstance(self._file, h5py.File):
            self._file.close()
        shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink(missing_ok=True)

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, error_type, *exc) -> None:
        self.discard() if error_type is not None else self.close()
