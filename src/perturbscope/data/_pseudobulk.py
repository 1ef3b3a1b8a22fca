"""The one pseudobulk: group means of log1p-normalised expression.

Every metric, baseline, the model and the benchmark runner call :func:`pseudobulk`, so that a
profile is computed once and in one way: a thin wrapper of ``scanpy.get.aggregate(func="mean")``
that returns a labelled DataFrame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

from .._constants import TARGET_SUM
from ._rows import is_out_of_core

DataScale = Literal["counts", "log1p_norm"]


def log1p_normalized(adata: ad.AnnData, layer: str | None = None, target_sum: float = TARGET_SUM):
    """Return log1p of counts normalised to ``target_sum`` per cell, without touching ``adata``.

    Parameters
    ----------
    adata
        Cells with raw counts in ``layer`` (``X`` when ``None``).
    layer
        Layer holding counts.
    target_sum
        Total count each cell is scaled to.

    Returns
    -------
    A matrix of the same type (dense or CSR) as the input.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> log1p_normalized(ad.AnnData(np.array([[1.0, 3.0]])), target_sum=4).round(3)
    array([[0.693, 1.386]])
    """
    X = adata.X if layer is None else adata.layers[layer]
    totals = np.asarray(X.sum(axis=1)).ravel()
    if np.any(totals <= 0):
        bad = adata.obs_names[totals <= 0][:10].tolist()
        raise ValueError(f"Cells with zero total counts cannot be normalised: {bad}.")
    scale = target_sum / totals
    if sparse.issparse(X):
        out = sparse.diags(scale) @ X.tocsr()
        out.data = np.log1p(out.data)
        return out.tocsr()
    return np.log1p(np.asarray(X) * scale[:, None])


def pseudobulk(
    adata: ad.AnnData,
    groupby: str | Sequence[str],
    layer: str | None = None,
) -> pd.DataFrame:
    """Mean expression of each group of cells, by ``scanpy.get.aggregate(func="mean")``.

    Parameters
    ----------
    adata
        Cells, with expression already on the scale to average (log1p-normalised for metrics).
    groupby
        One ``obs`` column, or several; groups are their observed combinations.
    layer
        Layer to average; ``X`` when ``None``.

    Returns
    -------
    A DataFrame (groups x genes) with ``var_names`` as columns; the index is the group label
    (a ``MultiIndex`` for several columns). Groups are sorted.

    Raises
    ------
    KeyError
        If a ``groupby`` column is not in ``adata.obs``.
    ValueError
        If ``adata`` has no cells, a ``groupby`` column has missing values, or the matrix is
        backed (see :func:`streamed_pseudobulk`).

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> a = ad.AnnData(np.array([[1.0, 0], [3, 2], [5, 5]]),
    ...                obs=pd.DataFrame({"g": ["x", "x", "y"]}, index=["a", "b", "c"]))
    >>> pseudobulk(a, "g").to_numpy().tolist()
    [[2.0, 1.0], [5.0, 5.0]]
    """
    keys = [groupby] if isinstance(groupby, str) else list(groupby)
    missing = [k for k in keys if k not in adata.obs.columns]
    if missing:
        raise KeyError(
            f"groupby columns {missing} not in adata.obs; columns are {list(adata.obs.columns)}."
        )
    if adata.n_obs == 0:
        raise ValueError("pseudobulk needs at least one cell; adata has none.")
    check_groups_labelled(adata.obs, keys)
    matrix = adata.X if layer is None else adata.layers[layer]
    if is_out_of_core(matrix):  # scanpy's aggregation needs the matrix in memory
        raise ValueError("pseudobulk needs the expression in memory, and this AnnData is backed; use "
                         "perturbscope.data.streamed_pseudobulk(matrix, obs, groupby, data_scale), which reads "
                         "row chunks, or adata.to_memory().")
    labels = adata.obs[keys].astype(str)
    work = ad.AnnData(
        X=adata.X if layer is None else adata.layers[layer],
        obs=pd.DataFrame({k: pd.Categorical(labels[k]) for k in keys}, index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
    )
    means = sc.get.aggregate(work, keys, func="mean")
    if len(keys) > 1:
        index = pd.MultiIndex.from_frame(means.obs[keys].astype(str))
    else:
        index = pd.Index(means.obs[keys[0]].astype(str).to_numpy(), name=keys[0])
    table = pd.DataFrame(
        np.asarray(means.layers["mean"], dtype=np.float64),
        index=index,
        columns=adata.var_names.copy(),
    )
    return table.sort_index()


def log1p_expression(
    adata: ad.AnnData, layer: str | None = None, data_scale: DataScale = "counts"
) -> np.ndarray:
    """Dense log1p-normalised expression of ``adata``, whatever scale it is stored on.

    Parameters
    ----------
    adata
        Cells.
    layer
        Layer to read; ``X`` when ``None``.
    data_scale
        ``"counts"``: raw counts, normalised to 1e4 and log1p-transformed here.
        ``"log1p_norm"``: already log1p-normalised, used as is.

    Returns
    -------
    A dense ``float64`` array (cells x genes).

    Raises
    ------
    ValueError
        If ``data_scale`` is not one of the two values.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> log1p_expression(ad.AnnData(np.array([[1.0, 3.0]])), data_scale="log1p_norm")
    array([[1., 3.]])
    """
    if data_scale == "counts":
        X = log1p_normalized(adata, layer=layer)
    elif data_scale == "log1p_norm":
        X = adata.X if layer is None else adata.layers[layer]
    else:
        raise ValueError(f"data_scale must be 'counts' or 'log1p_norm', got {data_scale!r}.")
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    return X.astype(np.float64)


def check_groups_labelled(obs: pd.DataFrame, keys: list[str], where: str = "adata.obs") -> None:
    """Raise a ``ValueError`` counting the cells without a label in each ``keys`` column.

    ``astype(str)`` would make them a group called ``"nan"``.

    Examples
    --------
    >>> check_groups_labelled(pd.DataFrame({"g": ["x", None]}), ["g"])
    Traceback (most recent call last):
    ...
    ValueError: adata.obs has missing values in the groupby columns {'g': 1}; every cell needs its group (drop or label those cells).
    """
    unlabelled = {k: int(n) for k, n in obs[keys].isna().sum().items() if n}
    if unlabelled:
        raise ValueError(f"{where} has missing values in the groupby columns {unlabelled}; "
                         "every cell needs its group (drop or label those cells).")
