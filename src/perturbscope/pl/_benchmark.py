"""Plots of benchmark results (the long table of :func:`perturbscope.benchmark.run_benchmark`).

Every plot takes scanpy's ``ax``, ``show``, ``save`` and ``return_fig`` (see
:mod:`perturbscope.pl._figure`). Groups of held-out perturbations (``seen0``, ``seen1``,
``seen2``, ``zero-shot``...) differ in difficulty, so :func:`benchmark_figures` draws each group
in its own titled panel rather than pooling them.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..benchmark import CEILING as _CEILING
from ..benchmark import CLOSEST_TO_ONE, LOWER_IS_BETTER, MODE_COLLAPSE, shot_statistics
from ..benchmark import OBSERVED as _OBSERVED
from ._figure import check_show_save, finish, metric_label, new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BAR_COLOUR, SEED_COLOUR, CEILING_COLOUR = "#9ecae1", "#08519c", "#cb181d"


def _check_columns(results: pd.DataFrame) -> None:
    required = {"task", "group", "model", "perturbation", "metric", "value", "seed"}
    missing = sorted(required - set(results.columns))
    if missing:
        raise KeyError(f"results lacks columns {missing}; pass the output of run_benchmark.")
    if results.empty:
        raise ValueError("results is empty; pass the output of run_benchmark.")


def _select(
    results: pd.DataFrame, metric: str, task: str | None, group: str | None
) -> pd.DataFrame:
    _check_columns(results)
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


def _better(metric: str) -> str:
    if metric in CLOSEST_TO_ONE:
        return "closest to 1 is best"
    return "lower is better" if metric in LOWER_IS_BETTER else "higher is better"


def _wrap(label: str, width: int = 45) -> str:
    return "\n".join(textwrap.wrap(label, width))


def _title(rows: pd.DataFrame, task: str | None, group: str | None) -> str:
    tasks = ", ".join(map(str, pd.unique(rows["task"]))) if task is None else task
    if group is None:
        groups = pd.unique(rows["group"])
        group = str(groups[0]) if len(groups) == 1 else f"{len(groups)} groups pooled"
    n = rows.loc[rows["perturbation"] != "(all)", "perturbation"].nunique()
    seeds = rows["seed"].nunique()
    counts = f"{n} perturbation{'s' * (n != 1)}, " if n else ""
    return f"{tasks}: {group}\n({counts}{seeds} seed{'s' * (seeds != 1)})"


def benchmark_scores(
    results: pd.DataFrame,
    metric: str = "pearson_delta_top_de",
    task: str | None = None,
    group: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Per-seed mean score of each model, with the split-half noise ceiling as a line.

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    metric
        The metric to plot.
    task, group
        Restrict to one task or one group (``seen2``, ``zero-shot``...); without ``group``
        the groups are pooled (the title says so).
    ax
        Matplotlib axes; a new figure when ``None``.
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``): a bar at the mean over seeds, one dot per
    seed, a dashed line at the noise ceiling, the metric and its unit on the y axis.

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
    ...                         seeds=1, distributional=False, progress_bar=False)
    >>> ax = benchmark_scores(results, "pearson_delta_top_de", show=False)
    >>> " ".join(ax.get_ylabel().split())
    'Pearson r of predicted and observed change, top-20 DE genes (unitless); higher is better'
    """
    check_show_save(show, save, return_fig)
    rows = _select(results, metric, task, group)
    rows = rows[rows["model"] != _OBSERVED]
    per_seed = rows.groupby(["model", "seed"])["value"].mean().reset_index()
    models = [m for m in pd.unique(per_seed["model"]) if m != _CEILING]
    ax = new_axes(ax, (1.6 + 0.8 * len(models), 3.4))
    for i, model in enumerate(models):
        values = per_seed.loc[per_seed["model"] == model, "value"].to_numpy()
        ax.bar(i, np.nanmean(values), color=BAR_COLOUR, width=0.6,
               label="mean over seeds" if i == 0 else None)
        ax.scatter(np.full(len(values), i), values, color=SEED_COLOUR, s=12, zorder=3,
                   label="one seed" if i == 0 else None)
    ceiling = per_seed.loc[per_seed["model"] == _CEILING, "value"]
    if len(ceiling):
        ax.axhline(float(ceiling.mean()), color=CEILING_COLOUR, linestyle="--",
                   label="noise ceiling (split-half)")
    ax.legend(frameon=False, fontsize=7, loc="best")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_xlabel("model")
    ax.set_ylabel(_wrap(f"{metric_label(metric)}; {_better(metric)}"), fontsize=8)
    ax.set_title(_title(rows, task, group), fontsize=9)
    return finish(ax.figure, ax, show, save, return_fig)


def benchmark_scatter(
    results: pd.DataFrame,
    x_model: str,
    y_model: str,
    metric: str = "pearson_delta_top_de",
    task: str | None = None,
    group: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Per-perturbation scores of two models against each other, with the diagonal.

    Points are the mean over seeds of each held-out perturbation's score; a point above the
    diagonal is a perturbation ``y_model`` scores higher on.

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
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``).

    Raises
    ------
    ValueError
        If a model has no rows.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive", "perturbed_mean"],
    ...                         seeds=1, distributional=False, progress_bar=False)
    >>> ax = benchmark_scatter(results, "perturbed_mean", "additive", show=False)
    >>> ax.get_xlabel()
    'perturbed_mean'
    """
    check_show_save(show, save, return_fig)
    rows = _select(results, metric, task, group)
    rows = rows[rows["perturbation"] != "(all)"]
    table = rows.groupby(["model", "perturbation"])["value"].mean().unstack("model")
    for model in (x_model, y_model):
        if model not in table.columns:
            raise ValueError(f"model {model!r} not in results; found {list(table.columns)}.")
    ax = new_axes(ax, (3.8, 3.8))
    x, y = table[x_model], table[y_model]
    ax.scatter(x, y, s=14, color=SEED_COLOUR, label="one perturbation (mean over seeds)")
    low = float(np.nanmin([x.min(), y.min()]))
    high = float(np.nanmax([x.max(), y.max()]))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, label="equal scores")
    ax.set_xlabel(x_model)
    ax.set_ylabel(y_model)
    ax.set_title(f"{metric_label(metric)}\n{_title(rows, task, group)}", fontsize=8)
    ax.legend(frameon=False, fontsize=7, loc="best")
    return finish(ax.figure, ax, show, save, return_fig)


def benchmark_mode_collapse(
    results: pd.DataFrame,
    task: str | None = None,
    group: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Mean pairwise correlation of predicted changes per model, beside the observed one.

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    task, group
        Restrict to one task or one group.
    ax
        Matplotlib axes; a new figure when ``None``.
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``): a bar per model and a dashed line at the
    observed figure. Bars well above the line flag predictions collapsed onto one change.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive", "perturbed_mean"],
    ...                         seeds=1, distributional=False, progress_bar=False)
    >>> " ".join(benchmark_mode_collapse(results, show=False).get_ylabel().split())
    'mean pairwise correlation of changes (unitless)'
    """
    check_show_save(show, save, return_fig)
    rows = _select(results, MODE_COLLAPSE, task, group)
    means = rows.groupby("model")["value"].mean()
    models = [m for m in means.index if m != _OBSERVED]
    ax = new_axes(ax, (1.6 + 0.8 * len(models), 3.4))
    ax.bar(range(len(models)), means.loc[models].to_numpy(), color="#fdae6b", width=0.6,
           label="predicted (mean over seeds)")
    if _OBSERVED in means.index:
        ax.axhline(float(means.loc[_OBSERVED]), color="black", linestyle="--",
                   label="observed changes")
    ax.legend(frameon=False, fontsize=7, loc="best")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_xlabel("model")
    ax.set_ylabel(_wrap(metric_label(MODE_COLLAPSE)), fontsize=8)
    ax.set_title(_title(rows, task, group), fontsize=9)
    return finish(ax.figure, ax, show, save, return_fig)


def learning_curve(
    results: pd.DataFrame,
    metric: str = "pearson_delta_top_de",
    task: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
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
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``).

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
    ...                   progress_bar=False)
    >>> learning_curve(curve, show=False).get_xlabel()
    'cells given per perturbation (k)'
    """
    check_show_save(show, save, return_fig)
    if "shots" not in results.columns:
        raise KeyError("results lacks a 'shots' column; pass the output of benchmark.learning_curve.")
    # one colour per model across every task of ``results``, so panels can be compared
    models = sorted(set(results["model"]) - {_CEILING, _OBSERVED})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    rows = _select(results, metric, task, None)
    stats = shot_statistics(rows.assign(task=""), metric).droplevel("task")
    ax = new_axes(ax, (4.8, 3.4))
    for model, block in stats.groupby(level="model", sort=False):
        block = block.droplevel("model")
        style = ({"color": "grey", "linestyle": "--"} if model == _CEILING
                 else {"marker": "o", "color": colours[model]})
        label = "noise ceiling (split-half)" if model == _CEILING else model
        ax.errorbar(block.index, block["mean"], yerr=block["std"], label=label, capsize=2, **style)
    ax.set_xlabel("cells given per perturbation (k)")
    ax.set_ylabel(_wrap(metric_label(metric)), fontsize=8)
    tasks = ", ".join(map(str, pd.unique(rows["task"]))) if task is None else task
    ax.set_title(f"{tasks} (mean ± sd over seeds)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return finish(ax.figure, ax, show, save, return_fig)


def benchmark_figures(results: pd.DataFrame, out: str | os.PathLike) -> list[Path]:
    """Save the standard figures of benchmark results as PNGs in ``out``, one panel per group.

    ``pearson_delta_top_de.png`` and ``l2_top_expressed.png`` (:func:`benchmark_scores`) and,
    when two or more perturbations were held out, ``delta_correlation.png``
    (:func:`benchmark_mode_collapse`). Each file has one titled panel per (task, group) of
    held-out perturbations (``seen0``, ``seen1``, ``seen2``, ``zero-shot``...), sharing the y
    axis, since the groups differ in difficulty and pooling them would hide that. The tables of
    the same results are written by :func:`perturbscope.benchmark.write_results`.

    Parameters
    ----------
    results
        Long results from :func:`~perturbscope.benchmark.run_benchmark`.
    out
        Output folder (created).

    Returns
    -------
    The paths written.

    Raises
    ------
    KeyError
        If ``results`` lacks the columns of the runner's table.
    ValueError
        If ``results`` is empty.

    Examples
    --------
    >>> import tempfile
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=1,
    ...                         distributional=False, progress_bar=False)
    >>> [p.name for p in benchmark_figures(results, tempfile.mkdtemp())]
    ['pearson_delta_top_de.png', 'l2_top_expressed.png', 'delta_correlation.png']
    """
    import matplotlib.pyplot as plt

    _check_columns(results)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = set(results["metric"])
    drawers = [
        (metric, lambda ax, t, g, m=metric: benchmark_scores(results, m, t, g, ax=ax, show=False))
        for metric in ("pearson_delta_top_de", "l2_top_expressed") if metric in metrics
    ]
    if MODE_COLLAPSE in metrics:  # needs two or more held-out perturbations
        drawers.append((MODE_COLLAPSE, lambda ax, t, g: benchmark_mode_collapse(
            results, t, g, ax=ax, show=False)))
    written = []
    for name, draw in drawers:
        rows = results[results["metric"] == name]
        panels = list(rows[["task", "group"]].drop_duplicates().itertuples(index=False))
        n_models = rows.loc[~rows["model"].isin([_CEILING, _OBSERVED]), "model"].nunique()
        fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False,
                                 figsize=(len(panels) * (1.6 + 0.6 * n_models), 3.8))
        for ax, (task, group) in zip(axes[0], panels):
            draw(ax, task, group)
            ax.get_legend().remove()
        for ax in axes[0][1:]:
            ax.set_ylabel("")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=len(labels), frameon=False, fontsize=8)
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
