"""Distributional metrics: how predicted cells spread, not only where their mean lies."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from ..data import energy_distance  # noqa: F401  (re-exported with the other metrics)

#: Fixed bin edges (log1p-normalised expression) of :func:`histogram_kl`.
DEFAULT_BINS = np.linspace(0.0, 8.0, 33)


def moment_errors(predicted: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    """Variance ratio and mean absolute per-gene errors of variance, skewness and kurtosis.

    Parameters
    ----------
    predicted, observed
        Cells x genes, log1p-normalised.

    Returns
    -------
    ``{"variance_ratio", "variance_error", "skewness_error", "kurtosis_error"}``. The variance
    ratio is the median over genes that vary in ``observed`` of predicted over observed
    variance: 1 when predictions are as spread as real cells, near 0 when they collapse onto
    their mean. Genes constant in a set have skewness and (excess) kurtosis 0 there.

    Examples
    --------
    >>> pred = np.array([[0.0], [2.0]]); obs = np.array([[0.0], [4.0]])
    >>> errors = moment_errors(pred, obs)
    >>> errors["variance_error"], errors["variance_ratio"]
    (3.0, 0.25)
    """
    variance = [np.var(m, axis=0) for m in (predicted, observed)]
    varies = variance[1] > 0
    ratio = float(np.median(variance[0][varies] / variance[1][varies])) if varies.any() else np.nan
    out = {"variance_ratio": ratio}
    out["variance_error"] = float(np.mean(np.abs(variance[0] - variance[1])))
    for name, fn in (("skewness_error", stats.skew), ("kurtosis_error", stats.kurtosis)):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant genes, handled below
            values = [
                np.where(v > 0, np.nan_to_num(fn(m, axis=0)), 0.0)
                for m, v in zip((predicted, observed), variance)
            ]
        out[name] = float(np.mean(np.abs(values[0] - values[1])))
    return out


def histogram_kl(
    predicted: np.ndarray,
    observed: np.ndarray,
    bins: np.ndarray = DEFAULT_BINS,
    pseudocount: float = 1e-3,
) -> np.ndarray:
    """Per-gene KL divergence ``KL(observed || predicted)`` of histograms over fixed bins.

    Values outside the bins count in the first or last bin. Each histogram is normalised,
    ``pseudocount`` is added to every bin and it is normalised again, so empty bins stay finite.

    Parameters
    ----------
    predicted, observed
        Cells x genes, log1p-normalised.
    bins
        Bin edges, the same for every gene and every model.
    pseudocount
        Probability added to every bin.

    Returns
    -------
    One divergence per gene.

    Examples
    --------
    >>> kl = histogram_kl(np.array([[0.5], [1.5]]), np.array([[0.5], [0.5]]),
    ...                   bins=np.array([0.0, 1, 2]), pseudocount=0.0)
    >>> kl.round(4).tolist()
    [0.6931]
    """
    bins = np.asarray(bins, dtype=np.float64)
    n_bins = len(bins) - 1

    def histograms(x: np.ndarray) -> np.ndarray:
        index = np.clip(np.searchsorted(bins, x, side="right") - 1, 0, n_bins - 1)
        counts = np.stack([np.bincount(index[:, j], minlength=n_bins) for j in range(x.shape[1])])
        p = counts / counts.sum(axis=1, keepdims=True) + pseudocount
        return p / p.sum(axis=1, keepdims=True)

    p, q = histograms(np.asarray(observed)), histograms(np.asarray(predicted))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=1)

