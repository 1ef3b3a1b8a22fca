"""Every plot follows scanpy's contract: ax=, show=, save=, return_fig=, Axes or Figure back."""

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from perturbscope import pl
from perturbscope.model import PerturbationPrograms
from perturbscope.pl._labels import place_labels

PNG = b"\x89PNG\r\n\x1a\n"


def _results() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for group, perts in (("seen1", ["A+B", "C+D"]), ("seen2", ["E+F", "G+H"])):
            for model, base in (("additive", 0.5), ("linear", 0.3), ("noise_ceiling", 0.9)):
                for i, p in enumerate(perts):
                    for metric in ("pearson_delta_top_de", "l2_top_expressed"):
                        rows.append((seed, group, model, p, metric, base + 0.1 * i + 0.01 * seed))
            for model, value in (("additive", 0.4), ("linear", 0.9), ("observed", 0.3)):
                rows.append((seed, group, model, "(all)", "delta_correlation", value))
    table = pd.DataFrame(rows, columns=["seed", "group", "model", "perturbation", "metric", "value"])
    return table.assign(task="toy")


def _interactions() -> pd.DataFrame:
    return pd.DataFrame({"double": ["A+B", "C+D", "E+F"], "coef_first": [1.0, 2.0, 0.3],
                         "coef_second": [1.0, 0.4, 0.2], "mag": [1.41, 2.04, 0.36],
                         "dcor": [0.9, 0.8, 0.4], "call": ["additive", "epistasis", "neomorphic"]})


def _field() -> ad.AnnData:
    rng = np.random.default_rng(0)
    cells = ad.AnnData(np.zeros((20, 2)), obs=pd.DataFrame({"state": ["a", "b"] * 10},
                                                          index=[f"c{i}" for i in range(20)]))
    cells.obsm["X_umap"] = rng.normal(size=(20, 2))
    cells.obsm["X_grad_g_umap"] = rng.normal(size=(20, 2))
    return cells


def _programs() -> PerturbationPrograms:
    shift = pd.DataFrame({"z0": [2.0, 0.0], "z1": [0.1, -1.0]}, index=["A", "B"])
    return PerturbationPrograms(shift, shift, shift.abs() >= 0.5, shift, 0.5)


def _alignment() -> pd.DataFrame:
    return pd.DataFrame({"probe_alignment": np.linspace(1, -1, 8),
                         "mean_expression_baseline": np.linspace(2, -2, 8)},
                        index=[f"g{i}" for i in range(8)])


def _curve() -> pd.DataFrame:
    return pd.DataFrame({"task": "t", "group": "g", "seed": [0, 0, 1, 1], "shots": [0, 5] * 2,
                         "model": "m", "perturbation": "A", "metric": "pearson_delta_top_de",
                         "value": [0.1, 0.5, 0.3, 0.7]})


def _intervals():
    """A two-row mean prediction with 80% intervals, and its control cells."""
    mean = np.array([[1.5, 1.0, 0.5], [1.0, 1.0, 2.0]])
    prediction = ad.AnnData(mean, obs=pd.DataFrame({"perturbation": ["A", "B"], "n_cells": 3}, index=["A", "B"]),
                            var=pd.DataFrame(index=["g0", "g1", "g2"]),
                            layers={"log1p_norm": mean, "log1p_norm_lower_80": mean - 0.2,
                                    "log1p_norm_upper_80": mean + 0.3})
    prediction.uns["perturbscope"] = {"gene_likelihood": "normal"}
    return prediction, ad.AnnData(np.ones((2, 3)), var=prediction.var)


#: name -> (call(**kwargs), number of axes it draws on)
PLOTS = {
    "benchmark_scores": (lambda **kw: pl.benchmark_scores(_results(), **kw), 1),
    "benchmark_scatter": (lambda **kw: pl.benchmark_scatter(_results(), "linear", "additive", **kw), 1),
    "benchmark_mode_collapse": (lambda **kw: pl.benchmark_mode_collapse(_results(), **kw), 1),
    "learning_curve": (lambda **kw: pl.learning_curve(_curve(), **kw), 1),
    "genetic_interactions": (lambda **kw: pl.genetic_interactions(_interactions(), **kw), 2),
    "gradient_field": (lambda **kw: pl.gradient_field(_field(), "g", color="state", **kw), 1),
    "axis_alignment": (lambda **kw: pl.axis_alignment(_alignment(), **kw), 2),
    "pathway_ranking": (lambda **kw: pl.pathway_ranking(
        pd.DataFrame({"pathway": ["p", "q"], "score": [1.0, -1.0], "padj": [0.01, 1.0]}), **kw), 1),
    "perturbation_programs": (lambda **kw: pl.perturbation_programs(_programs(), **kw), 1),
    "prediction_intervals": (lambda **kw: pl.prediction_intervals(*_intervals(), **kw), 2),
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def shown(monkeypatch):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    return calls


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_returns_axes_or_figure_and_saves(name, tmp_path, shown):
    draw, n_axes = PLOTS[name]
    result = draw(show=False)
    axes = [result] if n_axes == 1 else list(result)
    assert len(axes) == n_axes
    assert all(isinstance(a, Axes) for a in axes)
    for a in axes:  # every panel is titled and labelled
        assert a.get_title()
        assert a.get_xlabel()
    fig = draw(show=False, return_fig=True)
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    draw(save=path)  # show=None with save: nothing shown
    assert path.read_bytes()[:8] == PNG
    draw(save=str(tmp_path / f"{name}.pdf"), show=False)
    assert (tmp_path / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    assert shown == []
    draw(show=True)
    assert shown == [1]


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_draws_on_the_given_axes(name):
    draw, n_axes = PLOTS[name]
    fig, axes = plt.subplots(1, n_axes)
    given = axes if n_axes > 1 else [axes]
    result = draw(ax=axes if n_axes > 1 else axes, show=False)
    got = list(result) if n_axes > 1 else [result]
    assert got == list(given)
    assert draw(ax=axes, show=False, return_fig=True) is fig


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_bad_show_save_and_return_fig(name):
    draw, _ = PLOTS[name]
    with pytest.raises(TypeError, match=r"^show must be True, False or None, got 'yes'\.$"):
        draw(show="yes")
    with pytest.raises(TypeError, match=r"^save must be a file path \(str or Path\) or None, got 3\.$"):
        draw(save=3)
    with pytest.raises(ValueError, match=r"^save is an empty path; pass a file name such as 'figure.png'\.$"):
        draw(save="")
    with pytest.raises(TypeError, match=r"^return_fig must be True or False, got 1\.$"):
        draw(return_fig=1)


def test_benchmark_figures_one_titled_panel_per_group(tmp_path):
    written = pl.benchmark_figures(_results(), tmp_path)
    assert [p.name for p in written] == ["pearson_delta_top_de.png", "l2_top_expressed.png",
                                         "delta_correlation.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG
    assert plt.get_fignums() == []  # figures are closed after writing


def test_benchmark_scores_titles_the_group_and_counts():
    ax = pl.benchmark_scores(_results(), "l2_top_expressed", group="seen2", show=False)
    assert ax.get_title() == "toy: seen2\n(2 perturbations, 2 seeds)"
    assert ax.get_ylabel().replace("\n", " ") == (
        "L2 distance, top expressed genes (log1p-normalised expression); lower is better")
    # bar = mean over seeds and perturbations of the additive model: (0.5 + 0.6 + 0.51 + 0.61) / 4
    assert ax.patches[0].get_height() == pytest.approx(0.555)
    assert ax.lines[0].get_ydata()[0] == pytest.approx(0.955)  # the noise ceiling
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["one seed", "noise ceiling (split-half)", "mean over seeds"]
    pooled = pl.benchmark_scores(_results(), show=False)
    assert pooled.get_title() == "toy: 2 groups pooled\n(4 perturbations, 2 seeds)"


def test_interaction_legend_explains_lines_and_markers():
    axes = pl.genetic_interactions(_interactions(), show=False)
    coefficients = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert coefficients == [
        "neomorphic (1)", "epistasis (1)", "additive (1)", "additive point c1 = c2 = 1",
        "equal contributions c1 = c2",
        "arcs 1.06 < mag < 1.77: neither synergy nor suppression",
    ]
    fit = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert fit == ["dcor = 0.6: left of it neomorphic",
                   "band 1.06 < mag < 1.77: neither synergy nor suppression"]


def test_interaction_points_at_or_below_zero_are_drawn_whole():
    table = _interactions()
    table.loc[2, "coef_second"] = -0.075  # a suppressed second gene: its marker sat cut by the x axis
    coefficients, _ = pl.genetic_interactions(table, show=False)
    top = max(2.0, 2.0 * 1.1)
    assert coefficients.get_ylim()[0] == pytest.approx(-0.075 - 0.04 * top)
    assert coefficients.get_xlim()[0] == pytest.approx(-0.04 * top)


def test_labels_do_not_overlap_and_are_limited():
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    x = np.full(30, 0.5)
    texts = place_labels(ax, x, x, [f"double{i}" for i in range(30)], use_adjust_text=False)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert 1 <= len(texts) <= 8  # one spot per offset around a single point
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    table = pd.concat([_interactions()] * 10, ignore_index=True)
    axes = pl.genetic_interactions(table, max_labels=5, show=False)
    assert len(axes[0].texts) <= 5


def test_pathway_ranking_draws_padj_one_and_the_threshold():
    table = pd.DataFrame({"pathway": ["p", "q"], "score": [1.0, -1.0], "padj": [0.001, 1.0]})
    ax = pl.pathway_ranking(table, alpha=0.01, show=False)
    dots = ax.collections[1].get_offsets()
    np.testing.assert_allclose(dots[:, 0], [0.0, 3.0])  # padj 1 is a dot at 0, bottom row
    assert ax.lines[0].get_xdata()[0] == pytest.approx(2.0)  # -log10 0.01
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == (
        "padj = 0.01: right of it significant")
    with pytest.raises(ValueError, match=r"^alpha must be in \(0, 1\), got 1\.5$"):
        pl.pathway_ranking(table, alpha=1.5)
    with pytest.raises(ValueError, match=r"^table is empty; pass the table from rank_pathways$"):
        pl.pathway_ranking(table.iloc[:0])


def test_programs_colourbar_has_a_unit():
    ax = pl.perturbation_programs(_programs(), show=False)
    assert ax.images[0].colorbar.ax.get_ylabel() == "latent shift (sd of control basal states)"
