"""Summaries of benchmark results: names, means over seeds, markdown tables, result files.

Plots of the same tables live in :mod:`perturbscope.pl`, a layer above.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._metrics import CLOSEST_TO_ONE, LOWER_IS_BETTER
from ._models import MODELS

CEILING = "noise_ceiling"
OBSERVED = "observed"
MODE_COLLAPSE = "delta_correlation"
#: Columns of the summary table, in order. ``discrimination_score``, ``de_overlap`` and ``mae``
#: are cell-eval's ``discrimination_score_l1``, ``overlap_at_N`` and ``mae`` (the Virtual Cell
#: Challenge's three), so the tables read beside the challenge's.
SUMMARY_METRICS = (
    "pearson_delta_top_de",
    "pearson_delta",
    "pearson_delta_perturbed",
    "l2_top_expressed",
    "mse_top_de",
    "direction_top_de",
    "discrimination_score",
    "de_overlap",
    "mae",
    "energy_distance",
    MODE_COLLAPSE,
)

def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each model's per-seed mean score.

    Within a seed, a metric is averaged over the held-out perturbations of every split of a
    group (``seen2``, ``zero-shot``, ...); the spread is over seeds.

    Parameters
    ----------
    results
        The output of :func:`run_benchmark`.

    Returns
    -------
    A DataFrame indexed by (task, group, model, metric) with columns ``mean``, ``sd`` and
    ``n_seeds``.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=2,
    ...                         distributional=False, progress_bar=False)
    >>> summarize(results).loc[("simulated", "unseen_single", "additive", "pearson_delta"), "n_seeds"]
    np.int64(2)
    """
    per_seed = results.groupby(["task", "group", "model", "metric", "seed"])["value"].mean()
    grouped = per_seed.groupby(level=["task", "group", "model", "metric"])
    return _mean_sd(grouped).rename(columns={"std": "sd", "count": "n_seeds"})


def _mean_sd(grouped) -> pd.DataFrame:
    """``mean``, ``std`` and ``count`` over the finite per-seed values of each group.

    One finite seed has sd 0 (no spread to show); a group without any keeps a NaN mean and sd
    and a count of 0, so that an all-NaN metric is never reported as 0.
    """
    stats = grouped.agg(["mean", "std", "count"])
    stats.loc[stats["count"] == 1, "std"] = 0.0
    return stats


def markdown_table(
    summary: pd.DataFrame,
    metrics: Sequence[str] = SUMMARY_METRICS,
    models: Sequence[str] | None = None,
) -> str:
    """A markdown table per (task, group): models as rows, metrics as ``mean ± sd`` columns.

    Parameters
    ----------
    summary
        The output of :func:`summarize`.
    metrics
        Columns to show.
    models
        Row order; models missing from ``summary`` are shown as "not run" (the ``observed`` row
        is left out when missing). Defaults to the models present, ceiling first.

    Returns
    -------
    Markdown text.

    Examples
    --------
    >>> from perturbscope.benchmark import run_benchmark
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=1,
    ...                         distributional=False, progress_bar=False)
    >>> print(markdown_table(summarize(results), metrics=["pearson_delta"]).splitlines()[2])
    | model | pearson_delta |
    """
    lines = []
    present = list(pd.unique(summary.index.get_level_values("model")))
    if models is None:
        models = [CEILING, *[m for m in MODELS if m in present], OBSERVED]
    for (task, group), block in summary.groupby(level=["task", "group"], sort=False):
        lines += [f"### {task}: {group}", ""]
        lines.append("| model | " + " | ".join(metrics) + " |")
        lines.append("|---" * (len(metrics) + 1) + "|")
        table = block.droplevel(["task", "group"])
        for model in models:
            label = "noise ceiling (split-half)" if model == CEILING else model
            if model not in table.index.get_level_values("model"):
                if model == OBSERVED:
                    continue
                lines.append(f"| {label} | " + " | ".join(["not run"] * len(metrics)) + " |")
                continue
            cells = []
            for metric in metrics:
                if (model, metric) in table.index and np.isfinite(
                    table.loc[(model, metric), "mean"]
                ):
                    row = table.loc[(model, metric)]
                    spread = f" ± {row['sd']:.3f}" if row["n_seeds"] > 1 else ""  # one seed: no spread
                    cells.append(f"{row['mean']:.3f}{spread}")
                else:
                    cells.append("–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    arrows = ", ".join(sorted(m for m in metrics if m in LOWER_IS_BETTER))
    exceptions = [f"{MODE_COLLAPSE} (mode collapse: compare with the observed row)"]
    exceptions += [f"{m} (best at 1)" for m in metrics if m in CLOSEST_TO_ONE]
    lines.append(
        f"Lower is better for: {arrows}; higher for the others, except " + ", ".join(exceptions) + "."
    )
    return "\n".join(lines)


def write_results(results: pd.DataFrame, out: str | os.PathLike, title: str = "") -> Path:
    """Write ``metrics.csv``, ``summary.csv`` and ``results.md`` to ``out``.

    Figures of the same results: :func:`perturbscope.pl.benchmark_figures`.

    Parameters
    ----------
    results
        The output of :func:`run_benchmark`.
    out
        Output folder (created).
    title
        Heading of ``results.md``.

    Returns
    -------
    The folder.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results.to_csv(folder / "metrics.csv", index=False)
    summary = summarize(results)
    summary.to_csv(folder / "summary.csv")
    text = f"# {title}\n\n" if title else ""
    (folder / "results.md").write_text(text + markdown_table(summary) + "\n")
    return folder


def shot_statistics(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and sd over seeds of a metric's per-seed mean, by (task, model, shots).

    The observed row and the mode-collapse figure (perturbation ``"(all)"``) are left out. A
    (task, model, shots) without a finite value keeps a NaN mean and sd.
    """
    rows = results[(results["metric"] == metric) & (results["perturbation"] != "(all)")
                   & (results["model"] != OBSERVED)]
    if rows.empty:
        raise ValueError(f"metric {metric!r} not in results; found {sorted(results['metric'].unique())}.")
    per_seed = rows.groupby(["task", "model", "shots", "seed"])["value"].mean()
    return _mean_sd(per_seed.groupby(level=["task", "model", "shots"]))[["mean", "std"]]


def learning_curve_table(results: pd.DataFrame, metric: str = "pearson_delta_top_de") -> pd.DataFrame:
    """Mean ± sd over seeds of a metric: (task, model) rows, one column per ``k``.

    Within a seed the metric is averaged over every scored (context, perturbation) pair.

    Parameters
    ----------
    results
        The output of :func:`learning_curve`.
    metric
        The metric.

    Returns
    -------
    A DataFrame of ``"mean ± sd"`` strings (``"–"`` where the metric has no finite value).

    Examples
    --------
    >>> results = pd.DataFrame({"task": "t", "seed": [0, 0, 1, 1], "shots": [0, 5, 0, 5],
    ...     "model": "m", "perturbation": "A", "metric": "r", "value": [0.1, 0.5, 0.3, 0.7]})
    >>> learning_curve_table(results, "r").loc[("t", "m"), 5]
    '0.600 ± 0.141'
    """
    stats = shot_statistics(results, metric)
    text = stats.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}" if np.isfinite(r["mean"]) else "–",
                       axis=1).unstack("shots")
    return text
