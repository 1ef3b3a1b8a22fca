"""The baselines read their inputs as fitted, refuse what they cannot answer, and never invent a group."""

import re
import warnings

import numpy as np
import pytest

from perturbscope.data import log1p_expression, simulate_perturbseq
from perturbscope.effects import (
    AdditiveBaseline,
    EmbeddingNeighborsBaseline,
    InteractionBaseline,
    LinearBaseline,
    MatchingMeanBaseline,
    NoChangeBaseline,
    PerturbedMeanBaseline,
)


@pytest.fixture(scope="module")
def screen():
    return simulate_perturbseq(n_genes=30, n_perturbed_genes=8, n_combinations=4, n_cell_types=2,
                               n_cells_per_condition=20, embedding_dim=8, seed=0)


def _controls(adata):
    return adata[adata.obs["perturbation"] == "control"].copy()


def test_predict_reads_the_layer_the_baseline_was_fitted_on(screen):
    """Fitted on layers["counts"] with log values in X: predict read X as counts."""
    adata, _ = screen
    layered = adata.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = log1p_expression(layered, None, "counts")
    plain = AdditiveBaseline().fit(adata, "perturbation", context_key="cell_type")
    from_layer = AdditiveBaseline().fit(layered, "perturbation", context_key="cell_type", layer="counts")
    expected = plain.predict(_controls(adata), ["G00"], aggregate="mean").layers["log1p_norm"]
    got = from_layer.predict(_controls(layered), ["G00"], aggregate="mean").layers["log1p_norm"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    without = _controls(layered)
    del without.layers["counts"]
    with pytest.raises(KeyError, match=re.escape("layer 'counts' (the layer the baseline was fitted on) not in")):
        from_layer.predict(without, ["G00"])


def test_fit_means_reads_log1p_means_whatever_was_fitted_before(screen):
    adata, _ = screen
    means = AdditiveBaseline().fit(adata, "perturbation").means_
    reused = AdditiveBaseline().fit(adata, "perturbation").fit_means(means)
    assert (reused.data_scale_, reused.layer_) == ("log1p_norm", None)


def test_missing_labels_and_values_are_refused(screen):
    adata, _ = screen
    unlabelled = adata.copy()
    labels = unlabelled.obs["perturbation"].astype(object)
    labels.iloc[:3] = np.nan
    unlabelled.obs["perturbation"] = labels
    with pytest.raises(ValueError, match=re.escape("adata.obs['perturbation'] (perturbation_key) has 3 missing labels")):
        PerturbedMeanBaseline().fit(unlabelled, "perturbation")
    model = AdditiveBaseline().fit(adata, "perturbation", context_key="cell_type")
    controls = _controls(adata)
    types = controls.obs["cell_type"].astype(object)
    types.iloc[0] = np.nan
    controls.obs["cell_type"] = types
    with pytest.raises(ValueError, match=re.escape("adata.obs['cell_type'] (context_key) has 1 missing labels")):
        model.predict(controls, ["G00"])
    broken = adata.copy()
    broken.X = broken.X.toarray()
    broken.X[0, 0] = np.nan
    with pytest.raises(ValueError, match=re.escape("adata.X has NaN or infinite values in 1 entries")):
        PerturbedMeanBaseline().fit(broken, "perturbation")
    with pytest.raises(ValueError, match=re.escape("adata.X has NaN or infinite values in 1 entries")):
        model.predict(broken[broken.obs["perturbation"] == "control"].copy(), ["G00"])


def test_the_control_label_moves_nothing_in_every_baseline(screen):
    """The linear and matching-mean baselines answered it with the perturbed mean."""
    adata, emb = screen
    for model in (NoChangeBaseline(), PerturbedMeanBaseline(), MatchingMeanBaseline(), AdditiveBaseline(),
                  InteractionBaseline(), LinearBaseline(emb), EmbeddingNeighborsBaseline(emb)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the interaction baseline: too few doubles
            model.fit(adata, "perturbation")
        assert np.abs(model.predict_shifts(["control"]).to_numpy()).max() == 0.0, model.name


def test_a_combination_with_a_gene_without_embedding_falls_back_with_a_warning(screen):
    adata, emb = screen
    model = LinearBaseline(emb).fit(adata, "perturbation")
    with pytest.warns(UserWarning, match=re.escape("'G01+NOTAGENE' has no embedding row")):
        shifts = model.predict_shifts(["G01", "G01+NOTAGENE"])
    np.testing.assert_allclose(shifts.loc["G01+NOTAGENE"].to_numpy(), model.b_)  # not G01's shift in disguise
    assert model.fallbacks_ == {"G01+NOTAGENE"}


def test_bad_calls_are_named(screen):
    adata, _ = screen
    model = AdditiveBaseline().fit(adata, "perturbation")
    with pytest.raises(ValueError, match="perturbations is empty"):
        model.predict_shifts([])
    with pytest.raises(ValueError, match=re.escape("adata_control has no cells; pass at least one control cell")):
        model.predict(_controls(adata)[:0], ["G00"])
    with pytest.raises(ValueError, match=re.escape("means has no row of the control label 'ctrl'")):
        AdditiveBaseline().fit_means(model.means_, control_value="ctrl")
    with pytest.raises(ValueError, match=re.escape("n_components must be a positive integer, got 0.")):
        LinearBaseline(n_components=0)
    with pytest.raises(ValueError, match=re.escape("ridge must be a finite number >= 0, got -1.")):
        LinearBaseline(ridge=-1)
