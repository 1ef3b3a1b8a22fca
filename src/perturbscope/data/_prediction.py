"""The prediction AnnData: how every model and baseline lays out predicted cells and their means.

A prediction has one row per (perturbation, sample, control cell): ``obs["perturbation"]``
(categorical, in the requested order), ``obs["control_cell"]`` (the anchor), ``obs["sample"]``
and the control cells' context columns; rows are named ``"{perturbation}|{control cell}|{sample}"``.
``X`` is on the training scale and ``layers["log1p_norm"]`` is log1p-normalised. Its mean over
cells (``aggregate="mean"``) has one row per perturbation (and context), named
``"{perturbation}|{context}"``, with ``obs["n_cells"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import OUTPUT_KEYS
from ._pseudobulk import pseudobulk


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
    obs = X.index.to_frame(index=False)
    order = list(prediction.obs[OUTPUT_KEYS.PERTURBATION].cat.categories)
    obs[OUTPUT_KEYS.PERTURBATION] = pd.Categorical(obs[OUTPUT_KEYS.PERTURBATION], categories=order)
    obs[OUTPUT_KEYS.N_CELLS] = sizes.reindex(X.index).to_numpy().astype(int)
    obs.index = ["|".join(map(str, row)) if len(groupby) > 1 else str(row) for row in X.index.to_flat_index()]
    sort = np.argsort(obs[OUTPUT_KEYS.PERTURBATION].cat.codes.to_numpy(), kind="stable")
    aggregated = ad.AnnData(
        X=X.to_numpy(dtype=np.float32)[sort], obs=obs.iloc[sort],
        var=pd.DataFrame(index=prediction.var_names.copy()),
        layers={OUTPUT_KEYS.LOG1P_NORM_LAYER: log1p_norm.to_numpy(dtype=np.float32)[sort]},
    )
    aggregated.uns[OUTPUT_KEYS.PROVENANCE_UNS] = prediction.uns.get(OUTPUT_KEYS.PROVENANCE_UNS, {})
    return aggregated
