"""Norman-style genetic-interaction maps from a :func:`perturbscope.tl.genetic_interactions` table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..tl._genetic_interactions import CALLS, THRESHOLDS
from ._figure import check_show_save, finish
from ._labels import place_labels, priority

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: One colour per interaction type.
CALL_COLORS = {
    "synergy": "#d62728",
    "suppression": "#1f77b4",
    "epistasis": "#9467bd",
    "neomorphic": "#ff7f0e",
    "additive": "#7f7f7f",
}


def _check_tables(table: pd.DataFrame, comparison: pd.DataFrame | None) -> None:
    needed = ["double", "coef_first", "coef_second", "mag", "dcor", "call"]
    lacking = [c for c in needed if c not in table.columns]
    if lacking:
        raise KeyError(
            f"table lacks columns {lacking}; pass the output of tl.genetic_interactions."
        )
    if table.empty:
        raise ValueError("table is empty; pass the output of tl.genetic_interactions.")
    if comparison is not None:
        lacking = [c for c in ("double", "mag", "published_mag", "call") if c not in comparison]
        if lacking:
            raise KeyError(
                f"comparison lacks columns {lacking}; pass the matched table of "
                "tl.compare_with_published."
            )


def _label_points(ax: Axes, x, y, names, scores, max_labels: int | None) -> int:
    order = priority(scores)
    if max_labels is not None:
        order = order[:max_labels]
    x, y, names = np.asarray(x)[order], np.asarray(y)[order], np.asarray(names)[order]
    return len(place_labels(ax, x, y, [str(n) for n in names]))


def genetic_interactions(
    table: pd.DataFrame | Mapping,
    comparison: pd.DataFrame | None = None,
    label: bool = True,
    max_labels: int | None = 20,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Interaction map: ``coef_first`` against ``coef_second`` and ``mag`` against ``dcor``.

    The left panel places each double by its two coefficients, with the additive point
    ``(1, 1)``, the diagonal of equal contributions and the arcs ``mag = sqrt(2) (1 +- tolerance)``
    between which a double is neither synergy nor suppression. The right panel shows magnitude
    against the distance correlation of the double with its singles, with the neomorphic
    threshold (left of it: neomorphic) and the same magnitude band. Points are coloured by call;
    a legend names every marker and line. With ``comparison``, a third panel plots our ``mag``
    against the published one (black edge: the calls agree).

    Labels are placed without overlap (adjustText when installed, the optional extra
    ``pip install "perturbscope[plot]"``; else free spots around each point); the doubles
    furthest from additivity (largest ``|mag - sqrt(2)|``) are labelled first, at most
    ``max_labels`` of them per panel.

    Parameters
    ----------
    table
        Output of :func:`perturbscope.tl.genetic_interactions`, or the ``uns`` entry that
        :func:`perturbscope.tl.call_interactions` writes (``adata.uns["genetic_interactions"]``);
        the threshold lines are those the calls were made with.
    comparison
        The matched per-double table of :func:`perturbscope.tl.compare_with_published`.
    label
        Write doubles' names beside their points.
    max_labels
        Most labels per panel; ``None`` tries every double.
    ax
        A sequence of 2 (3 with ``comparison``) matplotlib axes; a new figure when ``None``.
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the list of Axes.

    Returns
    -------
    The list of Axes (the Figure with ``return_fig=True``).

    Raises
    ------
    KeyError
        If ``table`` (or ``comparison``) lacks the needed columns.
    ValueError
        If ``table`` is empty or ``ax`` has the wrong length.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"double": ["A+B", "C+D"], "coef_first": [1.0, 2.0],
    ...     "coef_second": [1.0, 0.4], "mag": [1.41, 2.04], "dcor": [0.9, 0.8],
    ...     "call": ["additive", "epistasis"]})
    >>> axes = genetic_interactions(table, show=False)
    >>> [a.get_xlabel() for a in axes]
    ['coefficient of the first single (c1)', 'distance correlation of the double with its singles (dcor)']
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    check_show_save(show, save, return_fig)
    if isinstance(table, Mapping):  # adata.uns[...] of tl.call_interactions: attrs are kept under "params"
        thresholds = dict(table.get("params", {}).get("thresholds", {}))
        table = table["table"]
    else:
        thresholds = dict(table.attrs.get("thresholds", {}))
    _check_tables(table, comparison)
    n_panels = 2 if comparison is None else 3
    if ax is None:
        fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 5.6))
        axes = list(axes)
    else:
        axes = list(ax)
        if len(axes) != n_panels:
            raise ValueError(f"ax must hold {n_panels} axes, got {len(axes)}.")
        fig = axes[0].figure
    settings = {**THRESHOLDS, **thresholds}
    additive = settings["additive_magnitude"]
    tolerance = settings["magnitude_tolerance"]
    low_mag, high_mag = additive * (1 - tolerance), additive * (1 + tolerance)

    coefficients, fit = axes[0], axes[1]
    for call in CALLS:
        rows = table[table["call"] == call]
        if rows.empty:
            continue
        kwargs = {"color": CALL_COLORS[call], "label": f"{call} ({len(rows)})", "s": 30,
                  "zorder": 3}
        coefficients.scatter(rows["coef_first"], rows["coef_second"], **kwargs)
        fit.scatter(rows["dcor"], rows["mag"], **kwargs)
    top = max(2.0, float(table[["coef_first", "coef_second"]].abs().max().max()) * 1.1)
    angle = np.linspace(0, np.pi / 2, 100)
    for radius in (low_mag, high_mag):
        coefficients.plot(radius * np.cos(angle), radius * np.sin(angle), ls=":", c="0.5", lw=1)
    coefficients.plot([0, top], [0, top], ls="--", c="0.8", lw=1)
    coefficients.scatter([1], [1], marker="+", c="k", s=80, zorder=4)
    coefficients.set(xlabel="coefficient of the first single (c1)",
                     ylabel="coefficient of the second single (c2)",
                     title="double = c1 x first + c2 x second")
    fit.axhspan(low_mag, high_mag, color="0.92", zorder=0)
    fit.axvline(settings["fit_threshold"], ls="--", c=CALL_COLORS["neomorphic"], lw=1)
    fit.set(xlabel="distance correlation of the double with its singles (dcor)",
            ylabel="magnitude sqrt(c1² + c2²)", title="magnitude and fit")
    band = f"{low_mag:.2f} < mag < {high_mag:.2f}: neither synergy nor suppression"
    keys = [
        Line2D([], [], marker="+", color="k", ls="none", markersize=9,
               label="additive point c1 = c2 = 1"),
        Line2D([], [], ls="--", c="0.8", label="equal contributions c1 = c2"),
        Line2D([], [], ls=":", c="0.5", label=f"arcs {band}"),
    ]
    handles, _ = coefficients.get_legend_handles_labels()
    below = {"fontsize": 7, "frameon": False, "loc": "upper center", "bbox_to_anchor": (0.5, -0.14)}
    coefficients.legend(handles=handles + keys, ncol=2, **below)
    fit_keys = [
        Line2D([], [], ls="--", c=CALL_COLORS["neomorphic"],
               label=f"dcor = {settings['fit_threshold']:g}: left of it neomorphic"),
        plt.Rectangle((0, 0), 1, 1, color="0.92", label=f"band {band}"),
    ]
    fit.legend(handles=fit_keys, **below)
    fit.set_xlim(min(0.0, float(table["dcor"].min()) - 0.05), 1.05)
    fit.set_ylim(0, max(float(table["mag"].max()) * 1.25, high_mag * 1.3))
    pad = 0.04 * top  # a point on or below 0 is drawn whole, not cut by the axis
    coefficients.set_xlim(min(0.0, float(table["coef_first"].min())) - pad, top)
    coefficients.set_ylim(min(0.0, float(table["coef_second"].min())) - pad, top)
    if label:
        distance = np.abs(table["mag"].to_numpy() - additive)
        _label_points(coefficients, table["coef_first"], table["coef_second"], table["double"],
                      distance, max_labels)
        _label_points(fit, table["dcor"], table["mag"], table["double"], distance, max_labels)

    if comparison is not None:
        panel = axes[2]
        agree = comparison["call"] == comparison.get("published_call", comparison["call"])
        panel.scatter(
            comparison["published_mag"],
            comparison["mag"],
            c=[CALL_COLORS.get(c, "k") for c in comparison["call"]],
            edgecolors=np.where(agree, "k", "none"),
            s=30,
        )
        low = float(min(comparison["published_mag"].min(), comparison["mag"].min()))
        high = float(max(comparison["published_mag"].max(), comparison["mag"].max()))
        panel.plot([low, high], [low, high], ls="--", c="0.8", lw=1)
        panel.set(xlabel="published magnitude (Norman et al. 2019)", ylabel="our magnitude",
                  title="against Norman et al. 2019")
        panel.legend(handles=[
            Line2D([], [], ls="--", c="0.8", label="equal magnitudes"),
            Line2D([], [], marker="o", ls="none", markerfacecolor="white",
                   markeredgecolor="k", label="black edge: calls agree"),
        ], **below)
        if label:
            gap = np.abs(comparison["mag"].to_numpy() - comparison["published_mag"].to_numpy())
            _label_points(panel, comparison["published_mag"], comparison["mag"],
                          comparison["double"], gap, max_labels)
    return finish(fig, axes, show, save, return_fig)
