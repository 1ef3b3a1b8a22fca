"""Plots for gradient probes: vector fields, axis-alignment scores and pathway rankings."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..probe import gradient_key
from ._figure import check_show_save, finish, new_axes

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.axes import Axes


def gradient_field(
    adata: ad.AnnData,
    gene: str,
    basis: str = "X_umap",
    color: str | None = None,
    n_arrows: int | None = 400,
    seed: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Draw a gene's gradient field as arrows on a 2-D embedding.

    Parameters
    ----------
    adata
        Cells on which :func:`perturbscope.probe.gradient_field` was run for ``gene`` and
        ``basis``.
    gene
        The gene whose field to draw.
    basis
        Key of the embedding in ``adata.obsm``.
    color
        Column of ``adata.obs`` to colour the points by; ``None`` draws them grey.
    n_arrows
        Arrows drawn, at randomly chosen cells; ``None`` draws one per cell.
    seed
        Seed of that choice.
    ax
        Axes to draw on; a new figure when ``None``.
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``). Arrows point where the gene's log
    expression rises fastest, projected onto the embedding (their length is relative).

    Raises
    ------
    ValueError
        If ``basis`` or the projected field ``obsm[f"X_grad_{gene}_{name}"]`` is missing, or
        ``color`` is not in ``adata.obs``.

    Examples
    --------
    >>> ps.probe.gradient_field(model, adata, "ISG15")  # doctest: +SKIP
    >>> ps.pl.gradient_field(adata, "ISG15", color="condition")  # doctest: +SKIP
    """
    check_show_save(show, save, return_fig)
    key = gradient_key(gene, basis)
    if basis not in adata.obsm:
        raise ValueError(f"basis {basis!r} is not in adata.obsm; keys are {list(adata.obsm)}")
    if key not in adata.obsm:
        raise ValueError(
            f"adata.obsm has no {key!r}; run perturbscope.probe.gradient_field(model, adata, "
            f"{gene!r}, basis={basis!r}) first"
        )
    if color is not None and color not in adata.obs:
        raise ValueError(
            f"color {color!r} is not a column of adata.obs; columns are {list(adata.obs)}"
        )
    ax = new_axes(ax, (5.0, 4.5))
    xy = np.asarray(adata.obsm[basis])[:, :2]
    arrows = np.asarray(adata.obsm[key])
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c="lightgrey", linewidths=0)
    else:
        values = adata.obs[color]
        discrete = not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        if discrete:  # categorical, object, pandas string or boolean columns: one colour per value
            labels = pd.Categorical(values)
            missing = pd.isna(labels)
            if missing.any():  # shown, not dropped
                ax.scatter(xy[missing, 0], xy[missing, 1], s=6, linewidths=0, c="lightgrey", label="NA")
            for name in labels.categories:
                mask = np.asarray(labels == name)
                ax.scatter(xy[mask, 0], xy[mask, 1], s=6, linewidths=0, label=str(name), alpha=0.6)
            ax.legend(markerscale=2, frameon=False, fontsize="small", loc="best")
        else:
            points = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=values, linewidths=0, cmap="viridis")
            ax.figure.colorbar(points, ax=ax, label=color)
    chosen = np.arange(adata.n_obs)
    if n_arrows is not None and n_arrows < adata.n_obs:
        chosen = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_arrows, replace=False))
    ax.quiver(
        xy[chosen, 0],
        xy[chosen, 1],
        arrows[chosen, 0],
        arrows[chosen, 1],
        angles="xy",
        color="black",
        width=0.003,
        alpha=0.8,
    )
    ax.set_title(f"latent gradient of log {gene}\n(arrows: direction of steepest rise, "
                 "relative length)", fontsize=9)
    ax.set_xlabel(f"{basis.removeprefix('X_')} 1")
    ax.set_ylabel(f"{basis.removeprefix('X_')} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return finish(ax.figure, ax, show, save, return_fig)


def axis_alignment(
    table: pd.DataFrame,
    highlight: Iterable[str] | None = None,
    n_top: int = 20,
    highlight_label: str = "gene set",
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Plot axis-alignment scores against the mean-expression baseline, and the top genes.

    Parameters
    ----------
    table
        The DataFrame returned by :func:`perturbscope.probe.axis_alignment_scores`.
    highlight
        Genes to mark (e.g. a pathway) in both panels.
    n_top
        Top-scoring genes listed in the right panel.
    highlight_label
        Legend label of the highlighted genes.
    ax
        Two Axes to draw on; a new figure when ``None``.
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    ``[scatter_axes, bar_axes]`` (the Figure with ``return_fig=True``).

    Raises
    ------
    ValueError
        If the table lacks the ``probe_alignment`` or ``mean_expression_baseline`` column, is
        empty, or ``ax`` does not hold two Axes.

    Examples
    --------
    >>> table = ps.probe.axis_alignment_scores(model, adata, "condition", "control", "stimulated")  # doctest: +SKIP
    >>> ps.pl.axis_alignment(table, highlight=ifn_genes)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    check_show_save(show, save, return_fig)
    needed = ["probe_alignment", "mean_expression_baseline"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(
            f"table lacks columns {missing}; pass the table from axis_alignment_scores "
            f"(columns found: {list(table.columns)})"
        )
    if table.empty:
        raise ValueError("table is empty; pass the table from axis_alignment_scores")
    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
    axes = list(ax)
    if len(axes) != 2:
        raise ValueError(f"ax must hold 2 axes (scatter, bars), got {len(axes)}")
    scatter_ax, bar_ax = axes
    marked = table.index.isin(list(highlight or []))
    scatter_ax.scatter(
        table["mean_expression_baseline"],
        table["probe_alignment"],
        s=5,
        c="lightgrey",
        linewidths=0,
        label="other genes",
    )
    if marked.any():
        scatter_ax.scatter(
            table.loc[marked, "mean_expression_baseline"],
            table.loc[marked, "probe_alignment"],
            s=18,
            c="crimson",
            linewidths=0,
            label=highlight_label,
        )
        scatter_ax.legend(frameon=False, fontsize="small")
    scatter_ax.axhline(0, color="black", lw=0.5)
    scatter_ax.axvline(0, color="black", lw=0.5)
    scatter_ax.set_xlabel("mean-expression baseline (m1 - m0) / mean(m0, m1), unitless")
    scatter_ax.set_ylabel("gradient alignment (mean cosine, unitless)")
    scatter_ax.set_title("decoder gradients against observed change", fontsize=10)

    top = table.sort_values("probe_alignment", ascending=False).head(n_top).iloc[::-1]
    colours = ["crimson" if g in set(table.index[marked]) else "steelblue" for g in top.index]
    bar_ax.barh(np.arange(len(top)), top["probe_alignment"], color=colours)
    bar_ax.set_yticks(np.arange(len(top)), [str(g) for g in top.index], fontsize="small")
    bar_ax.set_xlabel("gradient alignment (mean cosine, unitless)")
    bar_ax.set_title(f"top {len(top)} genes" + (f" (red: {highlight_label})" if marked.any() else ""),
                     fontsize=10)
    return finish(scatter_ax.figure, axes, show, save, return_fig)


def pathway_ranking(
    table: pd.DataFrame,
    n_top: int = 15,
    alpha: float = 0.05,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Top pathways from :func:`perturbscope.probe.rank_pathways`: ``-log10`` adjusted p-values.

    Each pathway is a stem ending in a dot at ``-log10 padj``, coloured by the sign of its
    enrichment score, so a pathway with ``padj = 1`` (height 0) is still drawn as a dot on the
    axis. A dashed line marks the significance threshold ``-log10 alpha``; pathways to its
    right are significant. The legend says both.

    Parameters
    ----------
    table
        The DataFrame returned by :func:`perturbscope.probe.rank_pathways`.
    n_top
        Pathways shown (the table's first rows).
    alpha
        Significance level of the adjusted p-values, drawn as the threshold line.
    ax
        Axes to draw on; a new figure when ``None``.
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
        If the table lacks the ``pathway``, ``score`` or ``padj`` column, is empty, ``n_top``
        is not a positive integer, or ``alpha`` is not in ``(0, 1)``.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"pathway": ["IFN", "TNF"], "score": [2.0, -1.0],
    ...                       "padj": [1e-4, 1.0]})
    >>> ax = pathway_ranking(table, show=False)
    >>> ax.get_xlabel()
    '-log10 adjusted p-value (Benjamini-Hochberg)'
    """
    from matplotlib.lines import Line2D

    check_show_save(show, save, return_fig)
    missing = [c for c in ("pathway", "score", "padj") if c not in table.columns]
    if missing:
        raise ValueError(
            f"table lacks columns {missing}; pass the table from rank_pathways "
            f"(columns found: {list(table.columns)})"
        )
    if table.empty:
        raise ValueError("table is empty; pass the table from rank_pathways")
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    ax = new_axes(ax, (6.5, 0.32 * min(n_top, len(table)) + 1.8))
    top = table.head(n_top).iloc[::-1]
    height = -np.log10(np.clip(top["padj"].to_numpy(dtype=float), 1e-300, 1.0))
    enriched = top["score"].to_numpy() > 0
    colours = np.where(enriched, "crimson", "steelblue")
    rows = np.arange(len(top))
    ax.hlines(rows, 0, height, colors=colours, lw=2)
    ax.scatter(height, rows, c=colours, s=28, zorder=3)
    threshold = -np.log10(alpha)
    ax.axvline(threshold, color="0.3", ls="--", lw=1)
    ax.set_yticks(rows, top["pathway"].astype(str).tolist(), fontsize="small")
    ax.set_xlim(0, max(float(height.max()), threshold) * 1.15)
    ax.set_xlabel("-log10 adjusted p-value (Benjamini-Hochberg)")
    ax.set_title(f"top {len(top)} pathways", fontsize=10)
    ax.legend(handles=[
        Line2D([], [], color="crimson", marker="o", label="enriched (score > 0)"),
        Line2D([], [], color="steelblue", marker="o", label="depleted (score <= 0)"),
        Line2D([], [], color="0.3", ls="--", label=f"padj = {alpha:g}: right of it significant"),
    ], fontsize=7, frameon=False, loc="lower right")
    return finish(ax.figure, ax, show, save, return_fig)
