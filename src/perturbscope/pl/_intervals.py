"""Which predictions to trust: the widths of ScopeVI's intervals, and one prediction's changes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import OUTPUT_KEYS
from ..data import check_var_names, log1p_expression
from ._figure import check_show_save, finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _bounds(prediction: ad.AnnData, level: int) -> tuple[np.ndarray, np.ndarray]:
    keys = [f"{OUTPUT_KEYS.LOG1P_NORM_LAYER}_{side}_{level}" for side in ("lower", "upper")]
    lacking = [k for k in keys if k not in prediction.layers]
    if lacking:
        raise KeyError(
            f"prediction.layers lacks {lacking}; pass ScopeVI.predict(..., aggregate='mean') of a model with "
            f"the effect prior, whose interval_levels include {level / 100:g}."
        )
    return np.asarray(prediction.layers[keys[0]], dtype=float), np.asarray(prediction.layers[keys[1]], dtype=float)


def _context_columns(prediction: ad.AnnData) -> list[str]:
    return [c for c in prediction.obs.columns if c not in (OUTPUT_KEYS.PERTURBATION, OUTPUT_KEYS.N_CELLS)]


def _cells_of_row(cells: ad.AnnData, prediction: ad.AnnData, row: str, label: str | None, key: str) -> ad.AnnData:
    """``cells`` in the context of prediction row ``row`` (and, with ``label``, of that perturbation)."""
    mask = np.ones(cells.n_obs, dtype=bool)
    for column in _context_columns(prediction):
        if column not in cells.obs:
            raise KeyError(f"{key}.obs has no column {column!r}, the context column of the prediction.")
        mask &= cells.obs[column].astype(str).to_numpy() == str(prediction.obs.loc[row, column])
    if label is not None:
        label_key = _perturbation_key(prediction)
        if label_key not in cells.obs:
            raise KeyError(f"{key}.obs has no column {label_key!r}, the perturbation key the model was set up with "
                           "(uns['perturbscope']['perturbation_key'] of the prediction).")
        mask &= cells.obs[label_key].astype(str).to_numpy() == label
    if not mask.any():
        raise ValueError(f"{key} has no cells for prediction row {row!r}.")
    return cells[mask]


def _perturbation_key(prediction: ad.AnnData) -> str:
    """The ``obs`` column of measured cells that holds their labels: the model's perturbation key."""
    provenance = prediction.uns.get(OUTPUT_KEYS.PROVENANCE_UNS, {})
    return str(provenance.get("perturbation_key", OUTPUT_KEYS.PERTURBATION))


def _mean_log1p(cells: ad.AnnData, prediction: ad.AnnData, key: str) -> np.ndarray:
    """Mean log1p-normalised expression of ``cells``, read as the model read its training cells.

    The layer and the scale come from the prediction's provenance (``uns["perturbscope"]``):
    the layer the model was set up with, counts unless its likelihood is ``"normal"``.
    """
    provenance = prediction.uns.get(OUTPUT_KEYS.PROVENANCE_UNS, {})
    scale = "log1p_norm" if provenance.get("gene_likelihood", "nb") == "normal" else "counts"
    layer = provenance.get("layer")
    if layer is not None and layer not in cells.layers:
        raise KeyError(f"{key}.layers has no {layer!r}, the layer the model was set up with.")
    return log1p_expression(cells, layer, scale).mean(axis=0)


def prediction_intervals(
    prediction: ad.AnnData,
    control: ad.AnnData,
    row: str | None = None,
    observed: ad.AnnData | None = None,
    level: int = 80,
    n_genes: int = 20,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """How far to trust each prediction, and one prediction's changes with their intervals.

    The left panel ranks the rows of a mean prediction (perturbation and context) by the median
    width of their ``level``% intervals over genes: the narrower, the more the training data
    backs the prediction (an unseen gene far from every training gene gets wide intervals). Rows
    without intervals (measured perturbations, or kinds with too few training perturbations to
    calibrate) are listed at the bottom as such. The right panel shows, for ``row``, the
    ``n_genes`` genes with the largest predicted change from the control mean of its context:
    the predicted change with its interval and, given ``observed`` cells, the observed change.

    Parameters
    ----------
    prediction
        ``ScopeVI.predict(..., aggregate="mean")`` with the effect prior: one row per
        perturbation and context, with ``layers["log1p_norm"]`` and the interval layers.
    control
        The control cells the prediction started from, with the context column; read from the
        layer and on the scale the model was set up with (``uns["perturbscope"]``), their mean
        per context is the reference of every change.
    row
        The prediction row (``obs_names``, ``"perturbation|context"``) of the right panel; the
        first row when ``None``.
    observed
        Optional measured cells of the same genes and scale, with the context column and their
        labels in the column the model was set up with (the prediction's
        ``uns["perturbscope"]["perturbation_key"]``, ``"perturbation"`` when it has none); the
        mean of those of ``row`` is drawn as the observed change.
    level
        Interval level in percent (a ``predict`` ``interval_levels`` entry times 100).
    n_genes
        Genes in the right panel.
    ax
        Two Axes to draw on; a new figure when ``None``.
    show, save, return_fig
        As in scanpy: show the figure, save it to a path, return the Figure instead of the Axes.

    Returns
    -------
    The two Axes (or the Figure with ``return_fig=True``).

    Raises
    ------
    KeyError
        If the interval layers are missing, ``row`` is not a prediction row, a context column or
        the model's layer is missing from ``control`` or ``observed``, or the perturbation key
        from ``observed``.
    ValueError
        If ``control`` or ``observed`` have no cells for ``row`` or other genes (or another gene
        order) than the prediction, ``n_genes`` is below 1, or ``ax`` does not hold two Axes.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np, pandas as pd, anndata as ad
    >>> prediction = ad.AnnData(np.ones((2, 3)), obs=pd.DataFrame(
    ...     {"perturbation": ["A", "B"], "n_cells": [5, 5]}, index=["A", "B"]))
    >>> prediction.var_names = ["g0", "g1", "g2"]
    >>> prediction.uns["perturbscope"] = {"gene_likelihood": "normal"}
    >>> prediction.layers["log1p_norm"] = np.array([[1.5, 1.0, 0.5], [1.0, 1.0, 1.0]])
    >>> prediction.layers["log1p_norm_lower_80"] = prediction.layers["log1p_norm"] - [[0.1], [0.4]]
    >>> prediction.layers["log1p_norm_upper_80"] = prediction.layers["log1p_norm"] + [[0.1], [0.4]]
    >>> control = ad.AnnData(np.ones((4, 3)), var=prediction.var)
    >>> left, right = prediction_intervals(prediction, control, n_genes=2)
    >>> [t.get_text() for t in left.get_yticklabels()]  # narrowest first
    ['A', 'B']
    """
    check_show_save(show, save, return_fig)
    import matplotlib.pyplot as plt

    lower, upper = _bounds(prediction, level)
    row = str(prediction.obs_names[0]) if row is None else str(row)
    if row not in prediction.obs_names:
        raise KeyError(f"row {row!r} is not a prediction row; rows are {list(prediction.obs_names[:10])}.")
    if not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}.")
    if ax is not None and len(ax) != 2:
        raise ValueError(f"ax must hold two Axes (ranking, one prediction), got {len(ax)}.")
    for key, cells in (("control", control), ("observed", observed)):
        if cells is not None:  # the same genes in the same order, as the model reads its cells
            check_var_names(cells.var_names, prediction.var_names, key)
    created = ax is None
    if created:
        _, ax = plt.subplots(1, 2, figsize=(11, max(3.0, 0.3 * prediction.n_obs + 1.5)),
                               gridspec_kw={"width_ratios": [1, 1.6]})
    left, right = ax
    _draw_widths(left, prediction, upper - lower, level)
    _draw_changes(right, prediction, control, observed, row, lower, upper, level, n_genes)
    if created:
        left.figure.tight_layout()
    return finish(left.figure, [left, right], show, save, return_fig)


def _draw_widths(ax: Axes, prediction: ad.AnnData, widths: np.ndarray, level: int) -> None:
    median = pd.Series([float(np.nanmedian(w)) if np.isfinite(w).any() else np.nan for w in widths],
                       index=prediction.obs_names.astype(str))
    order = median.sort_values(na_position="last").index
    values = median.loc[order].to_numpy()
    positions = np.arange(len(order))
    ax.barh(positions, np.nan_to_num(values), color="#4c72b0")
    for position, value in zip(positions, values):
        if np.isnan(value):
            ax.text(0, position, " measured or uncalibrated: no interval", va="center", fontsize=8, color="0.4")
    ax.set_yticks(positions, list(order))
    ax.invert_yaxis()
    ax.set_xlabel(f"median {level}% interval width over genes\n(log1p-normalised expression; narrower: more backed)")
    ax.set_title("How far to trust each prediction")


def _draw_changes(ax: Axes, prediction, control, observed, row, lower, upper, level, n_genes) -> None:
    index = prediction.obs_names.get_loc(row)
    reference = _mean_log1p(_cells_of_row(control, prediction, row, None, "control"), prediction, "control")
    mean = np.asarray(prediction.layers[OUTPUT_KEYS.LOG1P_NORM_LAYER][index], dtype=float).ravel()
    change = mean - reference
    genes = np.argsort(-np.abs(change), kind="stable")[:n_genes]
    x = np.arange(len(genes))
    low, high = lower[index, genes] - reference[genes], upper[index, genes] - reference[genes]
    has_interval = ~np.isnan(low)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.errorbar(x[has_interval], change[genes][has_interval],
                yerr=[change[genes][has_interval] - low[has_interval], high[has_interval] - change[genes][has_interval]],
                fmt="o", color="#4c72b0", capsize=3, label=f"predicted, {level}% interval")
    ax.plot(x[~has_interval], change[genes][~has_interval], "o", color="#4c72b0",
            label="predicted (no interval)" if (~has_interval).any() else None)
    if observed is not None:
        label = str(prediction.obs.loc[row, OUTPUT_KEYS.PERTURBATION])
        cells = _cells_of_row(observed, prediction, row, label, "observed")
        ax.plot(x, (_mean_log1p(cells, prediction, "observed") - reference)[genes], "D", color="#dd8452",
                label="observed")
    ax.set_xticks(x, list(prediction.var_names[genes]), rotation=90)
    ax.set_xlabel("gene (by predicted change)")
    ax.set_ylabel("change from the control mean\n(log1p-normalised expression)")
    ax.set_title(f"{row}: the {len(genes)} genes it changes most")
    ax.legend(loc="best", fontsize=8)
