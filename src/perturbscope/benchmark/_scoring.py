"""Scoring one prediction of one split: the observed side, the ceiling and long records.

The runner and the learning curve both call these, so a split is scored in one way.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import OUTPUT_KEYS
from ..data import is_control, log1p_expression, pseudobulk
from ._ceiling import delta_correlation, noise_ceiling
from ._metrics import evaluate, prepare_reference
from ._summaries import MODE_COLLAPSE
from ._tasks import BenchmarkTask


def log_anndata(adata: ad.AnnData, task: BenchmarkTask, perturbation_key: str) -> ad.AnnData:
    return ad.AnnData(
        log1p_expression(adata, None, task.data_scale),
        obs=pd.DataFrame(
            {perturbation_key: adata.obs[task.perturbation_key].astype(str).to_numpy()},
            index=adata.obs_names,
        ),
        var=pd.DataFrame(index=adata.var_names),
    )


def long_records(scores: pd.DataFrame, **fields) -> list[dict]:
    long = (
        scores.rename_axis("perturbation")
        .reset_index()
        .melt(id_vars="perturbation", var_name="metric", value_name="value")
    )
    for key, value in fields.items():
        long[key] = value
    return long.to_dict("records")


def split_reference(
    all_log: ad.AnnData,
    split,
    key: str,
    control_value: str,
    contexts: pd.Series | None,
    seed: int,
    distributional: bool = True,
):
    """The observed side of a split (:func:`prepare_reference`) and its split-half ceiling.

    Systema's centroid is the mean profile of every perturbation of the split's context (of all
    cells without a context), left undefined when there is only one perturbation, where it would
    be the truth itself.
    """
    labels = all_log.obs[key].astype(str)
    context_cells = (
        np.ones(all_log.n_obs, dtype=bool)
        if split.context is None or contexts is None
        else (contexts == split.context).to_numpy()
    )
    perturbed = all_log[context_cells & ~is_control(labels, control_value)]
    profiles = pseudobulk(perturbed, key).to_numpy()
    centroid = profiles.mean(axis=0) if len(profiles) > 1 else np.full(all_log.n_vars, np.nan)
    observed, control = all_log[split.test], all_log[split.control]
    reference = prepare_reference(observed, control, key, perturbed_centroid=centroid, seed=seed)
    ceiling = noise_ceiling(  # its DE genes come from its truth half, not from every test cell
        observed, control, key, perturbed_centroid=centroid, seed=seed, distributional=distributional,
    )
    return reference, ceiling


def score_records(
    prediction: ad.AnnData,
    reference,
    groups: pd.Series,
    distributional: bool,
    intervals: ad.AnnData | None = None,
    **fields,
) -> list[dict]:
    """Long records of a prediction's metrics, its mode-collapse figure and interval coverage.

    ``fields`` (model, task, seed, split, ...) are copied into every record; ``fields["seed"]``
    also seeds the distributional metrics. ``intervals``, a mean prediction with
    ``log1p_norm_lower_<L>`` / ``log1p_norm_upper_<L>`` layers, adds the metrics
    ``coverage_<L>``: the share of genes whose observed mean lies in the interval.
    """
    means = pseudobulk(prediction, OUTPUT_KEYS.PERTURBATION, layer=OUTPUT_KEYS.LOG1P_NORM_LAYER)
    means.index = means.index.astype(str)
    scores = evaluate(prediction, reference, distributional=distributional, seed=fields["seed"],
                      predicted_means=means)
    if intervals is not None:
        scores = scores.join(interval_coverage(intervals, reference.observed_means))
    records = with_groups(long_records(scores, **fields), groups)
    return records + collapse_records(
        means.loc[reference.observed_means.index], reference.control_mean, groups, **fields
    )


def with_groups(records: list[dict], groups: pd.Series) -> list[dict]:
    for r in records:
        r["group"] = groups.get(r["perturbation"], "")
    return records


def collapse_records(
    means: pd.DataFrame, control: np.ndarray, groups: pd.Series, **fields
) -> list[dict]:
    """The mode-collapse figure per group of held-out perturbations (and over all of them)."""
    rows = []
    for group in pd.unique(groups):
        members = [p for p in means.index if groups.get(p) == group]
        if len(members) >= 2:
            rows.append(
                {
                    "group": group,
                    "perturbation": "(all)",
                    "metric": MODE_COLLAPSE,
                    "value": delta_correlation(means.loc[members], control),
                    **fields,
                }
            )
    return rows


def interval_coverage(intervals: ad.AnnData, observed_means: pd.DataFrame) -> pd.DataFrame:
    """Share of genes whose observed mean lies inside each perturbation's interval.

    Parameters
    ----------
    intervals
        Mean prediction with ``log1p_norm_lower_<L>`` / ``log1p_norm_upper_<L>`` layers (one
        row per perturbation; rows of other contexts must not be present).
    observed_means
        Observed pseudobulk (perturbations x genes).

    Returns
    -------
    A DataFrame (perturbations x ``coverage_<L>``); ``NaN`` where the interval is undefined.

    Examples
    --------
    >>> import numpy as np
    >>> mean = ad.AnnData(np.zeros((1, 2)), obs=pd.DataFrame({"perturbation": ["A"]}, index=["A"]))
    >>> mean.layers["log1p_norm_lower_80"] = np.array([[0.0, 0.0]])
    >>> mean.layers["log1p_norm_upper_80"] = np.array([[1.0, 1.0]])
    >>> interval_coverage(mean, pd.DataFrame([[0.5, 2.0]], index=["A"])).loc["A", "coverage_80"]
    np.float64(0.5)
    """
    labels = intervals.obs[OUTPUT_KEYS.PERTURBATION].astype(str).to_numpy()
    out = {}
    for layer in intervals.layers:
        if not layer.startswith("log1p_norm_lower_"):
            continue
        tag = layer.rsplit("_", 1)[1]
        lower = pd.DataFrame(intervals.layers[layer], index=labels)
        upper = pd.DataFrame(intervals.layers[f"log1p_norm_upper_{tag}"], index=labels)
        column = {}
        for p in observed_means.index:
            if p not in lower.index:
                continue
            lo, hi = lower.loc[p].to_numpy(), upper.loc[p].to_numpy()
            obs = observed_means.loc[p].to_numpy()
            column[p] = np.nan if np.isnan(lo).all() else float(np.mean((obs >= lo) & (obs <= hi)))
        out[f"coverage_{tag}"] = pd.Series(column, dtype=float)
    return pd.DataFrame(out)
