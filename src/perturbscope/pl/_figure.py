"""What every plot shares: scanpy's ``ax`` / ``show`` / ``save`` / ``return_fig`` contract.

Every function of :mod:`perturbscope.pl` draws on the ``ax`` it is given (a new figure when
``None``), then :func:`finish` saves the figure to ``save`` (a path, any format matplotlib
writes), shows it when ``show`` says so, and returns the Axes, or the Figure with
``return_fig=True``. ``show=None`` shows only when matplotlib is in interactive mode (IPython,
Jupyter) and nothing was saved, so a script never blocks on a window it did not ask for.
Metric names are turned into axis labels with units by :func:`metric_label`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Axis label (with unit) of each benchmark metric; others are shown by name.
METRIC_LABELS: dict[str, str] = {
    "pearson_delta": "Pearson r of predicted and observed change, all genes (unitless)",
    "pearson_delta_top_de": "Pearson r of predicted and observed change, top-20 DE genes (unitless)",
    "pearson_delta_perturbed": "Pearson r of change from the perturbed centroid (Systema), all genes (unitless)",
    "mse_top_de": "MSE, top-20 DE genes (log1p-normalised expression²)",
    "l2_top_expressed": "L2 distance, top expressed genes (log1p-normalised expression)",
    "direction_top_de": "sign agreement, top-20 DE genes (fraction)",
    "de_overlap": "overlap of predicted and observed DE genes (fraction)",
    "discrimination_score": "discrimination score (1 - rank fraction, 1 best)",
    "change_norm_ratio": "predicted / observed change norm (ratio, 1 best)",
    "delta_correlation": "mean pairwise correlation of changes (unitless)",
    "energy_distance": "energy distance (log1p-normalised expression)",
    "histogram_kl": "histogram KL divergence (nats)",
    "variance_ratio": "predicted / observed variance (ratio, 1 best)",
    "variance_error": "variance error (log1p-normalised expression²)",
    "skewness_error": "skewness error (unitless)",
    "kurtosis_error": "kurtosis error (unitless)",
    "coverage_80": "coverage of 80% intervals (fraction)",
    "coverage_95": "coverage of 95% intervals (fraction)",
}


def metric_label(metric: str) -> str:
    """Axis label, with its unit, of a benchmark metric (the name itself when unknown).

    Parameters
    ----------
    metric
        A metric name of :func:`perturbscope.benchmark.run_benchmark`'s table.

    Returns
    -------
    The label.

    Examples
    --------
    >>> metric_label("l2_top_expressed")
    'L2 distance, top expressed genes (log1p-normalised expression)'
    >>> metric_label("my_metric")
    'my_metric'
    """
    return METRIC_LABELS.get(metric, metric)


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """``ax``, or the Axes of a new figure of ``figsize`` inches."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def check_show_save(show: Any, save: Any, return_fig: Any) -> None:
    """Raise on entry (before drawing) for a bad ``show``, ``save`` or ``return_fig``."""
    if show is not None and not isinstance(show, bool):
        raise TypeError(f"show must be True, False or None, got {show!r}.")
    if save is not None and not isinstance(save, str | os.PathLike):
        raise TypeError(f"save must be a file path (str or Path) or None, got {save!r}.")
    if save is not None and not str(save):
        raise ValueError("save is an empty path; pass a file name such as 'figure.png'.")
    if not isinstance(return_fig, bool):
        raise TypeError(f"return_fig must be True or False, got {return_fig!r}.")


def finish(
    fig: Figure,
    result: Any,
    show: bool | None,
    save: str | os.PathLike | None,
    return_fig: bool,
) -> Any:
    """Save and/or show ``fig``; return ``fig`` (``return_fig``) or ``result`` (the Axes)."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show is None:
        show = save is None and matplotlib.is_interactive()
    if show:
        plt.show()
    return fig if return_fig else result
