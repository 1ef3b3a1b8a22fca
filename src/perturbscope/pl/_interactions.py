"""Norman-style genetic-interaction maps from a :func:`perturbscope.tl.genetic_interactions` table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..tl._genetic_interactions import CALLS, THRESHOLDS

#: One colour per interaction type.
CALL_COLORS = {
    "synergy": "#d62728",
    "suppression": "#1f77b4",
    "epistasis": "#9467bd",
    "neomorphic": "#ff7f0e",
    "additive": "#7f7f7f",
}


def genetic_interactions(
    table: pd.DataFrame,
    comparison: pd.DataFrame | None = None,
    label: bool = True,
    axes=None,
):
    """Interaction map: ``coef_first`` against ``coef_second`` and ``mag`` against ``dcor``.

    The left panel places each double by its two coefficients: the additive point ``(1, 1)``,
    the diagonal (equal contributions) and the circles ``mag = sqrt(2) (1 +- tolerance)`` that
    bound synergy and suppression. The right panel shows magnitude against the distance
    correlation of the double with its singles, with the neomorphic threshold. Points are
    coloured by call. With ``comparison``, a third panel plots our ``mag`` against the
    published one.

    Parameters
    ----------
    table
        Output of :func:`perturbscope.tl.genetic_interactions`.
    comparison
        The matched per-double table of :func:`perturbscope.tl.compare_with_published`.
    label
        Write each double's name beside its point.
    axes
        A sequence of 2 (3 with ``comparison``) matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The figure.

    Raises
    ------
    KeyError
        If ``table`` (or ``comparison``) lacks the needed columns.
    ValueError
        If ``axes`` has the wrong length.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"double": ["A+B", "C+D"], "coef_first": [1.0, 2.0],
    ...     "coef_second": [1.0, 0.4], "mag": [1.41, 2.04], "dcor": [0.9, 0.8],
    ...     "call": ["additive", "epistasis"]})
    >>> fig = genetic_interactions(table)
    >>> [ax.get_xlabel() for ax in fig.axes]
    ['coef_first', 'dcor (double vs singles)']
    """
    import matplotlib.pyplot as plt

    needed = ["double", "coef_first", "coef_second", "mag", "dcor", "call"]
    lacking = [c for c in needed if c not in table.columns]
    if lacking:
        raise KeyError(
            f"table lacks columns {lacking}; pass the output of tl.genetic_interactions."
        )
    if comparison is not None:
        lacking = [c for c in ("double", "mag", "published_mag", "call") if c not in comparison]
        if lacking:
            raise KeyError(
                f"comparison lacks columns {lacking}; pass the matched table of "
                "tl.compare_with_published."
            )
    n_panels = 2 if comparison is None else 3
    if axes is None:
        fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 4.0))
    else:
        axes = list(axes)
        if len(axes) != n_panels:
            raise ValueError(f"axes must hold {n_panels} axes, got {len(axes)}.")
        fig = axes[0].figure
    settings = {**THRESHOLDS, **table.attrs.get("thresholds", {})}
    additive = settings["additive_magnitude"]
    tolerance = settings["magnitude_tolerance"]

    coefficients, fit = axes[0], axes[1]
    for call in CALLS:
        rows = table[table["call"] == call]
        if rows.empty:
            continue
        kwargs = {"color": CALL_COLORS[call], "label": call, "s": 30, "zorder": 3}
        coefficients.scatter(rows["coef_first"], rows["coef_second"], **kwargs)
        fit.scatter(rows["dcor"], rows["mag"], **kwargs)
    top = max(2.0, float(table[["coef_first", "coef_second"]].abs().max().max()) * 1.1)
    angle = np.linspace(0, np.pi / 2, 100)
    for radius in (additive * (1 - tolerance), additive * (1 + tolerance)):
        coefficients.plot(radius * np.cos(angle), radius * np.sin(angle), ls=":", c="0.6", lw=1)
    coefficients.plot([0, top], [0, top], ls="--", c="0.8", lw=1)
    coefficients.scatter([1], [1], marker="+", c="k", s=60, zorder=4)
    coefficients.set(xlabel="coef_first", ylabel="coef_second", title="coefficients")
    fit.axhline(additive * (1 + tolerance), ls=":", c="0.6", lw=1)
    fit.axhline(additive * (1 - tolerance), ls=":", c="0.6", lw=1)
    fit.axvline(settings["fit_threshold"], ls="--", c=CALL_COLORS["neomorphic"], lw=1)
    fit.set(xlabel="dcor (double vs singles)", ylabel="mag", title="magnitude and fit")
    if label:
        for _, row in table.iterrows():
            coefficients.annotate(
                row["double"], (row["coef_first"], row["coef_second"]), fontsize=7
            )
            fit.annotate(row["double"], (row["dcor"], row["mag"]), fontsize=7)
    coefficients.legend(fontsize=7, frameon=False)

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
        panel.set(xlabel="published mag", ylabel="mag", title="against Norman et al. 2019")
        if label:
            for _, row in comparison.iterrows():
                panel.annotate(row["double"], (row["published_mag"], row["mag"]), fontsize=7)
    return fig
