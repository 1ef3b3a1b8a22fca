"""pl.prediction_intervals: the widths it ranks and the changes it draws are the prediction's."""

import re

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from perturbscope import pl


def prediction_and_cells():
    """A mean prediction over two contexts (rows A|x, A|y, B|x; B|x measured: no interval),
    the control cells (log-normalised: the model's likelihood is "normal") and observed cells."""
    genes = [f"g{i}" for i in range(5)]
    obs = pd.DataFrame({"perturbation": ["A", "A", "B"], "context": ["x", "y", "x"], "n_cells": 4},
                       index=["A|x", "A|y", "B|x"])
    mean = np.array([[2.0, 1.0, 1.5, 1.0, 0.0], [2.0, 3.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 2.5]])
    half = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0], [np.nan] * 5])
    prediction = ad.AnnData(mean.copy(), obs=obs, var=pd.DataFrame(index=genes),
                            layers={"log1p_norm": mean, "log1p_norm_lower_80": mean - half,
                                    "log1p_norm_upper_80": mean + half})
    prediction.uns["perturbscope"] = {"gene_likelihood": "normal"}
    control = ad.AnnData(np.vstack([np.ones((3, 5)), np.full((3, 5), 2.0)]), var=pd.DataFrame(index=genes),
                         obs=pd.DataFrame({"context": ["x"] * 3 + ["y"] * 3}, index=[f"c{i}" for i in range(6)]))
    observed = ad.AnnData(np.array([[3.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 2.0, 1.0, 0.0], [9.0] * 5]),
                          var=pd.DataFrame(index=genes),
                          obs=pd.DataFrame({"perturbation": ["A", "A", "A"], "context": ["x", "x", "y"]},
                                           index=["o0", "o1", "o2"]))
    return prediction, control, observed


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_rows_are_ranked_by_median_interval_width():
    prediction, control, _ = prediction_and_cells()
    left, _ = pl.prediction_intervals(prediction, control, show=False)
    assert [t.get_text() for t in left.get_yticklabels()] == ["A|x", "A|y", "B|x"]
    widths = [bar.get_width() for bar in left.patches]
    np.testing.assert_allclose(widths, [0.6, 2.0, 0.0])  # medians of 2 x half; B|x has none
    assert any("no interval" in t.get_text() for t in left.texts)


def test_changes_are_from_the_rows_context_with_their_intervals_and_the_observed_mean():
    prediction, control, observed = prediction_and_cells()
    _, right = pl.prediction_intervals(prediction, control, row="A|x", observed=observed, n_genes=3, show=False)
    # change from context x's control mean (1): [1, 0, 0.5, 0, -1]; the 3 largest |change|
    assert [t.get_text() for t in right.get_xticklabels()] == ["g0", "g4", "g2"]
    bars = right.containers[0]
    x, y = bars.lines[0].get_data()
    np.testing.assert_allclose(y, [1.0, -1.0, 0.5])
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segments], [(0.9, 1.1), (-1.5, -0.5), (0.2, 0.8)])
    markers = [line for line in right.get_lines() if line.get_marker() == "D"]
    np.testing.assert_allclose(markers[0].get_ydata(), [1.0, -1.0, 0.5])  # mean of o0, o1 minus 1
    # observed cells hold their labels under the model's perturbation key, here "target"
    prediction.uns["perturbscope"]["perturbation_key"] = "target"
    with pytest.raises(KeyError, match=re.escape(
            "observed.obs has no column 'target', the perturbation key the model was set up with")):
        pl.prediction_intervals(prediction, control, row="A|x", observed=observed, show=False)
    observed.obs = observed.obs.rename(columns={"perturbation": "target"})
    _, right = pl.prediction_intervals(prediction, control, row="A|x", observed=observed, n_genes=3, show=False)
    markers = [line for line in right.get_lines() if line.get_marker() == "D"]
    np.testing.assert_allclose(markers[0].get_ydata(), [1.0, -1.0, 0.5])
    _, other = pl.prediction_intervals(prediction, control, row="A|y", n_genes=1, show=False)
    np.testing.assert_allclose(other.containers[0].lines[0].get_ydata(), [1.0])  # 3 - 2, context y


def test_bad_input_is_named():
    prediction, control, observed = prediction_and_cells()
    with pytest.raises(KeyError, match=re.escape(
            "prediction.layers lacks ['log1p_norm_lower_95', 'log1p_norm_upper_95']; pass "
            "ScopeVI.predict(..., aggregate='mean') of a model with the effect prior, whose "
            "interval_levels include 0.95.")):
        pl.prediction_intervals(prediction, control, level=95)
    with pytest.raises(KeyError, match=re.escape("row 'C|x' is not a prediction row; rows are ['A|x', 'A|y', 'B|x'].")):
        pl.prediction_intervals(prediction, control, row="C|x")
    with pytest.raises(ValueError, match=r"^n_genes must be a positive integer, got 0\.$"):
        pl.prediction_intervals(prediction, control, n_genes=0)
    with pytest.raises(KeyError, match=re.escape("control.obs has no column 'context', the context column of the prediction.")):
        pl.prediction_intervals(prediction, control[:, :].copy().__class__(control.X, var=control.var))
    with pytest.raises(ValueError, match=re.escape("observed has no cells for prediction row 'B|x'.")):
        pl.prediction_intervals(prediction, control, row="B|x", observed=observed)
    with pytest.raises(ValueError, match=r"^ax must hold two Axes \(ranking, one prediction\), got 1\.$"):
        pl.prediction_intervals(prediction, control, ax=[plt.gca()])


def test_cells_with_other_genes_or_another_gene_order_are_refused():
    """A control (or observed) AnnData in another gene order would put its means under the wrong
    genes; one with an extra gene would be normalised over other genes than the model's."""
    prediction, control, observed = prediction_and_cells()
    reordered = control[:, ::-1].copy()
    with pytest.raises(ValueError, match=re.escape(
            "control.var_names differ from the model's 5 genes (0 missing, 0 extra: same genes in another order)")):
        pl.prediction_intervals(prediction, reordered, show=False)
    extra = ad.concat([control, ad.AnnData(np.ones((6, 1)), obs=control.obs, var=pd.DataFrame(index=["g5"]))],
                      axis=1, merge="same")
    with pytest.raises(ValueError, match=re.escape("observed.var_names differ from the model's 5 genes (0 missing, 1 extra")):
        pl.prediction_intervals(prediction, control, observed=ad.concat(
            [observed, ad.AnnData(np.ones((3, 1)), obs=observed.obs, var=pd.DataFrame(index=["g5"]))],
            axis=1, merge="same"), show=False)
    assert extra.n_vars == 6


def test_cells_are_read_from_the_layer_the_model_was_set_up_with():
    """A model set up on ``layers["counts"]`` (log-normalised ``X``, as scanpy keeps them) records
    the layer in the prediction; the plot reads the control and observed cells from it."""
    prediction, control, observed = prediction_and_cells()
    prediction.uns["perturbscope"] = {"gene_likelihood": "normal", "layer": "counts"}
    for cells in (control, observed):
        cells.layers["counts"] = cells.X.copy()
        cells.X = np.full(cells.shape, 50.0)  # not what the model read
    _, right = pl.prediction_intervals(prediction, control, row="A|x", observed=observed, n_genes=3, show=False)
    np.testing.assert_allclose(right.containers[0].lines[0].get_ydata(), [1.0, -1.0, 0.5])
    markers = [line for line in right.get_lines() if line.get_marker() == "D"]
    np.testing.assert_allclose(markers[0].get_ydata(), [1.0, -1.0, 0.5])
    del control.layers["counts"]
    with pytest.raises(KeyError, match=re.escape("control.layers has no 'counts', the layer the model was set up with.")):
        pl.prediction_intervals(prediction, control, row="A|x")
