"""Plots of benchmark results (the long table of :func:`perturbscope.benchmark.run_benchmark`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..benchmark import CEILING as _CEILING
from ..benchmark import MODE_COLLAPSE, shot_statistics
from ..benchmark import OBSERVED as _OBSERVED


def _select(
    results: pd.DataFrame, metric: str, task: str | None, group: str | None
) -> pd.DataFrame:
    required = {"task", "group", "model", "perturbation", "metric", "value", "seed"}
    missing = sorted(required - set(results.columns))
    if missing:
        raise KeyError(f"results lacks columns {missing}; pass the output of run_benchmark.")
    rows = results[results["metric"] == metric]
    if rows.empty:
        raise ValueError(
            f"metric {metric!r} not in results; found {sorted(results['metric'].unique())}."
        )
    if task is not None:
        rows = rows[rows["task"] == task]
    if group is not None:
        rows = rows[rows["group"] == group]
    if rows.empty:
        raise ValueError(f"no rows for task={task!r}, group={group!r}.")
    return rows


def benchmark_scores(
    results: pd.DataFrame,
    metric: str = "pearson_delta_top_de",
    task: str | None = None,
    group: str | None = None,
    ax=None,
):
    """Per-seed mean score of each model, with the split-half noise ceiling as a line.

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    metric
        The metric to plot.
    task, group
        Restrict to one task or one group (``seen2``, ``zero-shot``...).
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes: one dot per seed, a bar at the mean, a dashed line at the ceiling.

    Raises
    ------
    KeyError
        If ``results`` lacks the columns of the runner's table.
    ValueError
        If ``metric`` (or the task/group) has no rows.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive", "perturbed_mean"],
    ...                         seeds=1, distributional=False, progress=False)
    >>> ax = benchmark_scores(results, "pearson_delta_top_de")
    >>> ax.get_ylabel()
    'pearson_delta_top_de'
    """
    import matplotlib.pyplot as plt

    rows = _select(results, metric, task, group)
    rows = rows[rows["model"] != _OBSERVED]
    per_seed = rows.groupby(["model", "seed"])["value"].mean().reset_index()
    models = [m for m in pd.unique(per_seed["model"]) if m != _CEILING]
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.8 * len(models), 3.2))
    for i, model in enumerate(models):
        values = per_seed.loc[per_seed["model"] == model, "value"].to_numpy()
        ax.bar(i, np.nanmean(values), color="#9ecae1", width=0.6)
        ax.scatter(np.full(len(values), i), values, color="#08519c", s=12, zorder=3)
    ceiling = per_seed.loc[per_seed["model"] == _CEILING, "value"]
    if len(ceiling):
        ax.axhline(float(ceiling.mean()), color="#cb181d", linestyle="--", label="noise ceiling")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_ylabel(metric)
    title = " / ".join(str(x) for x in (task, group) if x is not None)
    if title:
        ax.set_title(title)
    return ax


def benchmark_scatter(
    results: pd.DataFrame,
    x_model: str,
    y_model: str,
    metric: str = "pearson_delta_top_de",
    task: str | None = None,
    group: str | None = None,
    ax=None,
):
    """Per-perturbation scores of two models against each other, with the diagonal.

    Points are the mean over seeds of each held-out perturbation's score; a point above the
    diagonal is a perturbation ``y_model`` predicts better (for higher-is-better metrics).

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    x_model, y_model
        Models to compare (``"noise_ceiling"`` is allowed).
    metric
        The metric.
    task, group
        Restrict to one task or group.
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes.

    Raises
    ------
    ValueError
        If a model has no rows.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive", "perturbed_mean"],
    ...                         seeds=1, distributional=False, progress=False)
    >>> ax = benchmark_scatter(results, "perturbed_mean", "additive")
    >>> ax.get_xlabel()
    'perturbed_mean'
    """
    import matplotlib.pyplot as plt

    rows = _select(results, metric, task, group)
    rows = rows[rows["perturbation"] != "(all)"]
    table = rows.groupby(["model", "perturbation"])["value"].mean().unstack("model")
    for model in (x_model, y_model):
        if model not in table.columns:
            raise ValueError(f"model {model!r} not in results; found {list(table.columns)}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(3.4, 3.4))
    x, y = table[x_model], table[y_model]
    ax.scatter(x, y, s=14, color="#08519c")
    low = float(np.nanmin([x.min(), y.min()]))
    high = float(np.nanmax([x.max(), y.max()]))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
    ax.set_xlabel(x_model)
    ax.set_ylabel(y_model)
    ax.set_title(metric)
    return ax


def benchmark_mode_collapse(results: pd.DataFrame, task: str | None = None, ax=None):
    """Mean pairwise correlation of predicted changes per model, beside the observed one.

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    task
        Restrict to one task.
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes: a bar per model and a dashed line at the observed figure. Bars well above the
    line flag predictions collapsed onto one common change.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive", "perturbed_mean"],
    ...                         seeds=1, distributional=False, progress=False)
    >>> benchmark_mode_collapse(results).get_ylabel()
    'mean pairwise correlation of changes'
    """
    import matplotlib.pyplot as plt

    rows = _select(results, "delta_correlation", task, None)
    means = rows.groupby("model")["value"].mean()
    models = [m for m in means.index if m != _OBSERVED]
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.8 * len(models), 3.2))
    ax.bar(range(len(models)), means.loc[models].to_numpy(), color="#fdae6b", width=0.6)
    if _OBSERVED in means.index:
        ax.axhline(float(means.loc[_OBSERVED]), color="black", linestyle="--", label="observed")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_ylabel("mean pairwise correlation of changes")
    return ax


def learning_curve(
    results: pd.DataFrame,
    metric: str = "pearson_delta_top_de",
    task: str | None = None,
    ax=None,
):
    """Score against the number of given cells ``k``, one line per model, ceiling dashed.

    Parameters
    ----------
    results
        The output of :func:`~perturbscope.benchmark.learning_curve`.
    metric
        The metric to plot (mean over scored pairs within a seed; error bars: sd over seeds).
    task
        Restrict to one task.
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes.

    Raises
    ------
    KeyError
        If ``results`` lacks a ``shots`` column.
    ValueError
        If ``metric`` (or the task) has no rows.

    Examples
    --------
    >>> from perturbscope.benchmark import learning_curve as run_curve
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=3, n_combinations=0,
    ...                                n_cells_per_condition=20)
    >>> curve = run_curve(adata, "perturbation", "cell_type", shots=(0, 5), data_scale="counts",
    ...                   scopevi=False, baselines=["matching_mean"], distributional=False,
    ...                   progress=False)
    >>> learning_curve(curve).get_xlabel()
    'cells given per perturbation (k)'
    """
    import matplotlib.pyplot as plt

    if "shots" not in results.columns:
        raise KeyError("results lacks a 'shots' column; pass the output of benchmark.learning_curve.")
    # one colour per model across every task of ``results``, so panels can be compared
    models = sorted(set(results["model"]) - {_CEILING, _OBSERVED})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    rows = _select(results, metric, task, None)
    stats = shot_statistics(rows.assign(task=""), metric).droplevel("task")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    for model, block in stats.groupby(level="model", sort=False):
        block = block.droplevel("model")
        style = ({"color": "grey", "linestyle": "--"} if model == _CEILING
                 else {"marker": "o", "color": colours[model]})
        label = "noise ceiling (split-half)" if model == _CEILING else model
        ax.errorbar(block.index, block["mean"], yerr=block["std"], label=label, capsize=2, **style)
    ax.set_xlabel("cells given per perturbation (k)")
    ax.set_ylabel(metric)
    if task is not None:
        ax.set_title(task)
    ax.legend(fontsize=7, frameon=False)
    return ax


def benchmark_figures(results: pd.DataFrame, out: str | os.PathLike) -> list[Path]:
    """Save the standard figures of benchmark results as PNGs in ``out``.

    ``pearson_delta_top_de.png`` and ``l2_top_expressed.png`` (:func:`benchmark_scores`) and,
    when two or more perturbations were held out, ``delta_correlation.png``
    (:func:`benchmark_mode_collapse`). The tables of the same results are written by
    :func:`perturbscope.benchmark.write_results`.

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    out
        Output folder (created).

    Returns
    -------
    The paths written.

    Examples
    --------
    >>> import tempfile
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=1,
    ...                         distributional=False, progress=False)
    >>> [p.name for p in benchmark_figures(results, tempfile.mkdtemp())]
    ['pearson_delta_top_de.png', 'l2_top_expressed.png', 'delta_correlation.png']
    """
    import matplotlib.pyplot as plt

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    title = ", ".join(map(str, pd.unique(results["task"])))
    drawers = [
        (metric, lambda m=metric: benchmark_scores(results, metric=m))
        for metric in ("pearson_delta_top_de", "l2_top_expressed")
        if metric in set(results["metric"])
    ]
    if MODE_COLLAPSE in set(results["metric"]):  # needs two or more held-out perturbations
        drawers.append((MODE_COLLAPSE, lambda: benchmark_mode_collapse(results)))
    written = []
    for name, draw in drawers:
        ax = draw()
        ax.set_title(title)
        path = folder / f"{name}.png"
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
    return written
