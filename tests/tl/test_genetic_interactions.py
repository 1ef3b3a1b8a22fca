"""Genetic-interaction calls: exact fits on synthetic shifts, bad input, and real Norman cells."""

from __future__ import annotations

import re

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from perturbscope.tl import (
    THRESHOLDS,
    classify_interactions,
    compare_with_published,
    distance_correlation,
    fit_interaction,
    genetic_interactions,
)

matplotlib.use("Agg")

N_GENES = 60
BASE = 3.0  # a positive control level, so min_mean keeps every gene


def _cells(
    means: dict[str, np.ndarray], n_cells: int = 3, context: str | None = None
) -> ad.AnnData:
    """Cells whose group means are exactly ``BASE + means[label]``."""
    X = np.vstack([np.tile(BASE + m, (n_cells, 1)) for m in means.values()])
    obs = pd.DataFrame({"perturbation": np.repeat(list(means), n_cells)})
    if context is not None:
        obs["cell_type"] = context
    obs.index = [f"{context}-{i}" for i in range(len(obs))]
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


@pytest.fixture(scope="module")
def shifts():
    rng = np.random.default_rng(0)
    return rng.normal(size=N_GENES), rng.normal(size=N_GENES), rng.normal(size=N_GENES)


@pytest.fixture(scope="module")
def screen(shifts):
    a, b, unrelated = shifts
    c, d = np.random.default_rng(1).normal(size=(2, N_GENES))
    means = {
        "control": np.zeros(N_GENES),
        "A": a,
        "B": b,
        "C": c,
        "D": d,
        "A+B": 2 * a + 0.5 * b,  # A dominates: epistasis
        "B+C": b + c,  # additive
        "A+C": unrelated,  # neomorphic
        "D+C": 1.3 * (d + c),  # synergy: mag = 1.3 * sqrt(2)
    }
    return _cells(means)


def test_distance_correlation_known_values():
    x = np.linspace(-1, 1, 41)
    assert distance_correlation(x, 2 * x - 3) == pytest.approx(1.0)
    assert distance_correlation(x, np.zeros_like(x)) == 0.0
    # a symmetric non-linear dependence: Pearson is 0, distance correlation is not
    assert np.corrcoef(x, x**2)[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert distance_correlation(x, x**2) > 0.4
    with pytest.raises(ValueError, match="same number of observations, got 3 and 2"):
        distance_correlation(np.ones(3), np.ones(2))


def test_fit_recovers_coefficients_exactly(shifts):
    a, b, _ = shifts
    for method in ("ols", "theil_sen"):
        fit = fit_interaction(a, b, 2 * a + 0.5 * b, method=method)
        assert fit["coef_first"] == pytest.approx(2.0, abs=1e-6)
        assert fit["coef_second"] == pytest.approx(0.5, abs=1e-6)
        assert fit["mag"] == pytest.approx(np.sqrt(4.25), abs=1e-6)
        assert fit["dominance"] == pytest.approx(np.log10(4), abs=1e-6)
        assert fit["corr_fit"] == pytest.approx(1.0)
        assert fit["dcor_fit"] == pytest.approx(1.0)


def test_calls_on_synthetic_screen(screen):
    table = genetic_interactions(screen).set_index("double")
    assert list(table.index) == ["A+B", "B+C", "A+C", "D+C"]
    assert table.loc["A+B", ["coef_first", "coef_second"]].tolist() == pytest.approx([2.0, 0.5])
    assert table.loc["B+C", ["coef_first", "coef_second"]].tolist() == pytest.approx([1.0, 1.0])
    # order follows the label: D+C's first gene is D
    assert table.loc["D+C", ["first", "second"]].tolist() == ["D", "C"]
    assert table.loc["D+C", "mag"] == pytest.approx(1.3 * np.sqrt(2))
    assert table["call"].to_dict() == {
        "A+B": "epistasis",
        "B+C": "additive",
        "A+C": "neomorphic",
        "D+C": "synergy",
    }
    assert table.loc["A+B", "dominant"] == "A"
    assert table.loc["A+C", "dcor"] < THRESHOLDS["fit_threshold"]
    assert table.attrs["method"] == "ols"


def test_suppression_and_threshold_boundaries():
    tol, add = THRESHOLDS["magnitude_tolerance"], THRESHOLDS["additive_magnitude"]
    calls = classify_interactions(
        [0.5, 1.0, 1.0 * (1 + tol) + 0.01, 1.0 * (1 - tol) - 0.01, 1.0],
        [0.5, 1.0, 1.0 * (1 + tol) + 0.01, 1.0 * (1 - tol) - 0.01, 2.01],
        [0.9, 0.59, 0.9, 0.9, 0.9],
    )
    assert calls.tolist() == ["suppression", "neomorphic", "synergy", "suppression", "epistasis"]
    assert add == pytest.approx(np.sqrt(2))
    # a ratio of exactly 2 is not yet epistasis (strictly greater than log10(2))
    assert classify_interactions(1.0, 2.0, 0.9, dominance_threshold=np.log10(2) + 1e-9)[0] != (
        "epistasis"
    )
    with pytest.raises(ValueError, match="magnitude_tolerance must be in"):
        classify_interactions(1, 1, 1, magnitude_tolerance=1.5)


def test_input_not_mutated_and_sparse_layer_and_contexts(shifts):
    a, b, _ = shifts
    means = {"control": np.zeros(N_GENES), "A": a, "B": b, "A+B": a + b}
    both = ad.concat([_cells(means, context="x"), _cells(means, context="y")])
    both.layers["counts_like"] = sparse.csr_matrix(both.X)
    before = both.copy()
    table = genetic_interactions(both, layer="counts_like", context_key="cell_type")
    assert table[["context", "call"]].to_numpy().tolist() == [["x", "additive"], ["y", "additive"]]
    assert both.obs.equals(before.obs)
    assert np.array_equal(both.X, before.X)
    assert list(both.layers) == ["counts_like"]


def test_thresholds_can_be_overridden(screen):
    table = genetic_interactions(screen, dominance_threshold=1.0)
    assert table.set_index("double").loc["A+B", "call"] == "synergy"  # mag 2.06 > 1.77
    assert table.attrs["thresholds"]["dominance_threshold"] == 1.0


def test_bad_inputs(screen, shifts):
    with pytest.raises(KeyError, match="perturbation_key 'guide' not in adata.obs"):
        genetic_interactions(screen, perturbation_key="guide")
    with pytest.raises(KeyError, match="context_key 'line' not in adata.obs"):
        genetic_interactions(screen, context_key="line")
    with pytest.raises(KeyError, match="layer 'log1p_norm' not in adata.layers"):
        genetic_interactions(screen, layer="log1p_norm")
    with pytest.raises(ValueError, match="control_value 'NT' not found"):
        genetic_interactions(screen, control_value="NT")
    with pytest.raises(ValueError, match=r"doubles \['A\+D'\] are not labels"):
        genetic_interactions(screen, doubles=["A+D"])
    with pytest.raises(ValueError, match=r"doubles \['A'\] are not two-gene"):
        genetic_interactions(screen, doubles=["A"])
    with pytest.raises(ValueError, match=r"singles \['A\+B'\] are not single-gene"):
        genetic_interactions(screen, singles=["A+B"])
    with pytest.raises(ValueError, match=r"singles \['E'\] are not labels"):
        genetic_interactions(screen, singles=["E"])
    with pytest.raises(
        ValueError, match=r"absent from the data \(or from singles\): A\+B: \['B'\]"
    ):
        genetic_interactions(screen, singles=["A", "C"], doubles=["A+B"])
    with pytest.raises(ValueError, match="method must be 'ols' or 'theil_sen', got 'huber'"):
        genetic_interactions(screen, method="huber")
    with pytest.raises(ValueError, match=r"unknown thresholds \['mag_threshold'\]"):
        genetic_interactions(screen, mag_threshold=2.0)
    with pytest.raises(ValueError, match="only 0 genes pass min_mean=100"):
        genetic_interactions(screen, min_mean=100)
    with pytest.raises(ValueError, match="at least 3 genes"):
        fit_interaction([1.0, 2], [1.0, 0], [2.0, 2])


def test_one_perturbation_written_two_ways_is_refused(shifts):
    """``"A+ctrl"`` and ``"ctrl+A"`` (or ``"A+B"`` and ``"B+A"``) are one perturbation; keying
    singles by gene would keep one spelling's cells and drop the other's, by row order."""
    a, b, _ = shifts
    means = {"ctrl": np.zeros(N_GENES), "A+ctrl": a, "ctrl+A": 3 * a, "B+ctrl": b, "A+B": 2 * a + b}
    cells = _cells(means)
    with pytest.raises(ValueError, match=re.escape(
            "adata.obs['perturbation'] writes the same perturbation in more than one way: ['A+ctrl', 'ctrl+A']")):
        genetic_interactions(cells, control_value="ctrl")
    swapped = _cells({"control": np.zeros(N_GENES), "A": a, "B": b, "A+B": a + b, "B+A": 2 * a})
    with pytest.raises(ValueError, match=re.escape("more than one way: ['A+B', 'B+A']")):
        genetic_interactions(swapped)


def test_calls_need_finite_inputs_and_thresholds_in_range():
    with pytest.raises(ValueError, match=re.escape(
            "coefficients and dcor must be finite to call an interaction; positions [0, 1] are NaN or infinite.")):
        classify_interactions([np.nan, 1.0], [1.0, np.nan], [0.9, 0.9])
    with pytest.raises(ValueError, match=re.escape(
            "coef_first, coef_second and dcor must have one value per double, got lengths 2, 1 and 2.")):
        classify_interactions([1.0, 1.0], [1.0], [0.9, 0.9])
    with pytest.raises(ValueError, match=re.escape("fit_threshold must be in [0, 1] (a distance correlation), got 1.5.")):
        classify_interactions([1.0], [1.0], [0.9], fit_threshold=1.5)


def test_missing_singles_by_default_are_skipped_with_warning(shifts):
    a, b, _ = shifts
    means = {"control": np.zeros(N_GENES), "A": a, "B": b, "A+B": a + b, "A+D": a}
    with pytest.warns(UserWarning, match=r"skipped because their single-gene .* \['A\+D'\]"):
        table = genetic_interactions(_cells(means))
    assert table["double"].tolist() == ["A+B"]
    with pytest.raises(ValueError, match=r"absent from the data.*A\+D: \['D'\]"):
        genetic_interactions(_cells(means), doubles=["A+B", "A+D"])
    only_missing = {"control": np.zeros(N_GENES), "A": a, "A+D": a}
    with (
        pytest.warns(UserWarning, match=r"\['A\+D'\]"),
        pytest.raises(ValueError, match="no double perturbation"),
    ):
        genetic_interactions(_cells(only_missing))


def test_a_context_without_control_is_an_error(shifts):
    a, b, _ = shifts
    means = {"control": np.zeros(N_GENES), "A": a, "B": b, "A+B": a + b}
    no_control = {k: v for k, v in means.items() if k != "control"}
    both = ad.concat([_cells(means, context="x"), _cells(no_control, context="y")])
    with pytest.raises(
        ValueError, match="contexts \\['y'\\] in adata.obs\\['cell_type'\\] have no 'control'"
    ):
        genetic_interactions(both, context_key="cell_type")


def test_compare_with_published_swaps_order(screen):
    table = genetic_interactions(screen)
    published = pd.DataFrame(
        {
            # Norman's order B_A for our A+B: his coefficients are swapped to ours
            "name": ["B_A", "B_C", "A_C", "C_D", "Z_Y"],
            "coef_first": [0.5, 1.0, 0.3, 1.0, 1.0],
            "coef_second": [2.0, 1.0, 0.2, 1.0, 1.0],
            "coef_norm2": [2.06, 1.41, 0.36, 1.41, 1.41],
            "dcor": [0.9, 0.9, 0.3, 0.9, 0.9],
        }
    )
    summary, matched = compare_with_published(table, published)
    assert summary["n_doubles"] == 4  # C_D matches D+C (in the other order); Z_Y matches nothing
    matched = matched.set_index("double")
    assert matched.loc["A+B", ["published_coef_first", "published_coef_second"]].tolist() == [
        2.0,
        0.5,
    ]
    assert matched["published_call"].to_dict() == {
        "A+B": "epistasis",
        "B+C": "additive",
        "A+C": "neomorphic",
        "D+C": "additive",
    }
    assert summary["call_agreement"] == pytest.approx(0.75)  # D+C: synergy vs additive
    assert summary["spearman_mag"] == pytest.approx(0.9487, abs=1e-3)  # one tie (1.41)
    ts = table.copy()
    ts.attrs = {"method": "theil_sen"}
    with pytest.raises(KeyError, match=r"published fits lack columns \['ts_coef_first'"):
        compare_with_published(ts, published)
    with pytest.raises(ValueError, match="is in the published fits"):
        compare_with_published(table, published.iloc[[4]])
    with pytest.raises(KeyError, match=r"table lacks columns \['call'\]"):
        compare_with_published(table.drop(columns="call"), published)
    two = pd.concat([table.assign(context="x"), table.assign(context="y")])
    with pytest.raises(ValueError, match=re.escape("table holds 2 contexts (['x', 'y']); Norman's fits are of one screen")):
        compare_with_published(two, published)


def test_plot_returns_figure_with_panels(screen):
    from perturbscope.pl._interactions import genetic_interactions as plot

    table = genetic_interactions(screen)
    fig = plot(table, show=False, return_fig=True)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].collections) >= 4  # one scatter per call present, plus the (1, 1) mark
    published = pd.DataFrame(
        {
            "name": ["A_B"],
            "coef_first": [2.0],
            "coef_second": [0.5],
            "coef_norm2": [2.06],
            "dcor": [0.9],
        }
    )
    _, matched = compare_with_published(table, published)
    axes = plot(table, comparison=matched, label=False, show=False)
    assert axes[2].get_xlabel() == "published magnitude (Norman et al. 2019)"
    with pytest.raises(KeyError, match=r"table lacks columns \['mag'\]"):
        plot(table.drop(columns="mag"))
    with pytest.raises(ValueError, match=r"^ax must hold 2 axes, got 1\.$"):
        plot(table, ax=[fig.axes[0]])


def test_real_norman_cells_agree_with_published_fits(shared_data):
    cells = ad.read_h5ad(shared_data / "perturbench_devel.h5ad")
    cells = cells[cells.obs["dataset"] == "norman19"]
    before = cells.obs.copy()
    with pytest.warns(UserWarning, match="10 doubles are skipped"):
        table = genetic_interactions(cells, perturbation_key="condition")
    assert cells.obs.equals(before)
    assert sorted(table["double"]) == [
        "KLF1+MAP2K6",
        "KLF1+TGFBR2",
        "MAP2K3+MAP2K6",
        "MAP2K3+SLC38A2",
        "MAPK1+TGFBR2",
    ]
    summary, _ = compare_with_published(table, shared_data / "norman2019_gi_fits.csv")
    # measured (least squares, 5 doubles): coef_first 0.9, coef_second 0.3, mag 0.6, calls 0.4
    assert summary["n_doubles"] == 5
    assert summary["spearman_coef_first"] >= 0.7
    assert summary["spearman_mag"] >= 0.4
    assert summary["call_agreement"] >= 0.2
