import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.quiver import Quiver

from perturbscope.pl._probe import axis_alignment, gradient_field, pathway_ranking
from perturbscope.probe import gradient_field as probe_gradient_field


@pytest.fixture(scope="module")
def field_adata(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata[:80].copy()
    probe_gradient_field(model, sub, "gene0", n_neighbors=10, progress_bar=False)
    return sub


def test_gradient_field_draws_one_arrow_per_chosen_cell(field_adata):
    ax = gradient_field(field_adata, "gene0", color="state", n_arrows=30)
    quivers = [c for c in ax.collections if isinstance(c, Quiver)]
    assert len(quivers) == 1
    assert quivers[0].N == 30
    assert len([c for c in ax.collections if isinstance(c, PathCollection)]) == 2  # one per state
    assert "gene0" in ax.get_title()
    ax_all = gradient_field(field_adata, "gene0", n_arrows=None)
    assert [c for c in ax_all.collections if isinstance(c, Quiver)][0].N == 80
    plt.close("all")


def test_gradient_field_colours_string_and_boolean_columns_by_value(field_adata):
    data = field_adata.copy()
    data.obs["as_string"] = data.obs["state"].astype(str).astype("string")  # crashed in scatter(c=...)
    data.obs.loc[data.obs_names[:5], "as_string"] = pd.NA
    data.obs["flag"] = np.arange(data.n_obs) % 2 == 0
    ax = gradient_field(data, "gene0", color="as_string", n_arrows=10)
    labels = sorted(text.get_text() for text in ax.get_legend().get_texts())
    assert labels == sorted(["NA", *map(str, data.obs["state"].astype(str).unique())])  # missing shown, not dropped
    ax = gradient_field(data, "gene0", color="flag", n_arrows=10)
    assert sorted(text.get_text() for text in ax.get_legend().get_texts()) == ["False", "True"]
    plt.close("all")


def test_gradient_field_errors(field_adata):
    with pytest.raises(
        ValueError,
        match=r"adata.obsm has no 'X_grad_gene9_umap'; run perturbscope.probe.gradient_field",
    ):
        gradient_field(field_adata, "gene9")
    with pytest.raises(ValueError, match="basis 'X_pca' is not in adata.obsm"):
        gradient_field(field_adata, "gene0", basis="X_pca")
    with pytest.raises(ValueError, match="color 'cell_type' is not a column of adata.obs"):
        gradient_field(field_adata, "gene0", color="cell_type")


def test_axis_alignment_plot():
    table = pd.DataFrame(
        {
            "probe_alignment": np.linspace(1, -1, 50),
            "mean_expression_baseline": np.linspace(2, -2, 50),
        },
        index=[f"g{i}" for i in range(50)],
    )
    scatter_ax, bar_ax = axis_alignment(table, highlight=["g0", "g3", "g40"], n_top=10)
    assert len(bar_ax.patches) == 10
    assert [t.get_text() for t in bar_ax.get_yticklabels()][-1] == "g0"
    highlighted = scatter_ax.collections[1].get_offsets()
    assert len(highlighted) == 3
    assert sum(p.get_facecolor()[0] > 0.7 for p in bar_ax.patches) == 2  # g0 and g3 in red
    with pytest.raises(ValueError, match=r"table lacks columns \['mean_expression_baseline'\]"):
        axis_alignment(table[["probe_alignment"]])
    plt.close("all")


def test_pathway_ranking_plot():
    table = pd.DataFrame(
        {"pathway": ["a", "b", "c"], "score": [2.0, -1.0, 0.5], "padj": [1e-5, 0.01, 0.5]}
    )
    ax = pathway_ranking(table, n_top=2, show=False)
    heights = ax.collections[1].get_offsets()[:, 0]  # dots at -log10 padj, bottom row first
    np.testing.assert_allclose(heights, [2.0, 5.0])
    with pytest.raises(ValueError, match=r"table lacks columns \['padj'\]"):
        pathway_ranking(table[["pathway", "score"]])
    plt.close("all")
