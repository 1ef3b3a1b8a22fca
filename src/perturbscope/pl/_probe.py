"""Plots for gradient probes: vector fields, axis-alignment scores and pathway rankings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.axes import Axes


def _axes(ax: Axes | None, figsize: tuple[float, float] = (5.0, 4.5)) -> Axes:
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def gradient_field(
    adata: ad.AnnData,
    gene: str,
    basis: str = "X_umap",
    color: str | None = None,
    n_arrows: int | None = 400,
    seed: int = 0,
    ax: Axes | None = None,
) -> Axes:
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

    Returns
    -------
    The matplotlib Axes.

    Raises
    ------
    ValueError
        If ``basis`` or the projected field ``obsm[f"probe_grad_{gene}_{name}"]`` is missing, or
        ``color`` is not in ``adata.obs``.

    Examples
    --------
    >>> ps.probe.gradient_field(model, adata, "ISG15")  # doctest: +SKIP
    >>> ps.pl.gradient_field(adata, "ISG15", color="condition")  # doctest: +SKIP
    """
    key = f"probe_grad_{gene}_{basis.removeprefix('X_')}"
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
    ax = _axes(ax)
    xy = np.asarray(adata.obsm[basis])[:, :2]
    arrows = np.asarray(adata.obsm[key])
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c="lightgrey", linewidths=0)
    else:
        values = adata.obs[color]
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            for name in pd.Categorical(values).categories:
                mask = (values == name).to_numpy()
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
    ax.set_title(f"latent gradient of log {gene}")
    ax.set_xlabel(f"{basis.removeprefix('X_')} 1")
    ax.set_ylabel(f"{basis.removeprefix('X_')} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def axis_alignment(
    table: pd.DataFrame,
    highlight: Iterable[str] | None = None,
    n_top: int = 20,
    highlight_label: str = "gene set",
    axes: tuple[Axes, Axes] | None = None,
) -> tuple[Axes, Axes]:
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
    axes
        Two Axes to draw on; a new figure when ``None``.

    Returns
    -------
    ``(scatter_axes, bar_axes)``.

    Raises
    ------
    ValueError
        If the table lacks the ``probe_alignment`` or ``mean_expression_baseline`` column.

    Examples
    --------
    >>> table = ps.probe.axis_alignment_scores(model, adata, "condition", "control", "stimulated")  # doctest: +SKIP
    >>> ps.pl.axis_alignment(table, highlight=ifn_genes)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    needed = ["probe_alignment", "mean_expression_baseline"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(
            f"table lacks columns {missing}; pass the table from axis_alignment_scores "
            f"(columns found: {list(table.columns)})"
        )
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
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
    scatter_ax.set_xlabel("mean-expression baseline (m1 - m0) / mean")
    scatter_ax.set_ylabel("gradient alignment (mean cosine)")

    top = table.sort_values("probe_alignment", ascending=False).head(n_top).iloc[::-1]
    colours = ["crimson" if g in set(table.index[marked]) else "steelblue" for g in top.index]
    bar_ax.barh(np.arange(len(top)), top["probe_alignment"], color=colours)
    bar_ax.set_yticks(np.arange(len(top)), [str(g) for g in top.index], fontsize="small")
    bar_ax.set_xlabel("gradient alignment")
    bar_ax.set_title(f"top {len(top)} genes")
    return scatter_ax, bar_ax


def pathway_ranking(table: pd.DataFrame, n_top: int = 15, ax: Axes | None = None) -> Axes:
    """Bar chart of the top pathways from :func:`perturbscope.probe.rank_pathways`.

    Bars are ``-log10`` adjusted p-values, coloured by the sign of the enrichment score.

    Parameters
    ----------
    table
        The DataFrame returned by :func:`perturbscope.probe.rank_pathways`.
    n_top
        Pathways shown (the table's first rows).
    ax
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    The matplotlib Axes.

    Raises
    ------
    ValueError
        If the table lacks the ``pathway``, ``score`` or ``padj`` column.

    Examples
    --------
    >>> ranking = ps.probe.rank_pathways(table, gene_sets)  # doctest: +SKIP
    >>> ps.pl.pathway_ranking(ranking)  # doctest: +SKIP
    """
    missing = [c for c in ("pathway", "score", "padj") if c not in table.columns]
    if missing:
        raise ValueError(
            f"table lacks columns {missing}; pass the table from rank_pathways "
            f"(columns found: {list(table.columns)})"
        )
    ax = _axes(ax, (6.0, 0.3 * min(n_top, len(table)) + 1.2))
    top = table.head(n_top).iloc[::-1]
    height = -np.log10(np.clip(top["padj"].to_numpy(dtype=float), 1e-300, 1.0))
    colours = np.where(top["score"].to_numpy() > 0, "crimson", "steelblue")
    ax.barh(np.arange(len(top)), height, color=colours)
    ax.set_yticks(np.arange(len(top)), top["pathway"].astype(str).tolist(), fontsize="small")
    ax.set_xlabel("-log10 adjusted p-value (red: enriched, blue: depleted)")
    return ax
