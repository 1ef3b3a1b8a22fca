"""scvi-tools' expression API on ScopeVI: normalised expression, posterior predictive samples, DE."""

import numpy as np
import pandas as pd
import pytest
import scvi

import perturbscope as ps
from perturbscope.data import log1p_normalized
from perturbscope.model._scvi_api import ScviApiMixin, expected_fdr_calls

# ScopeVI itself once it lists the mixin among its bases (before scvi's BaseModelClass, whose
# methods of the same names raise NotImplementedError); until then a subclass that does
_ScopeVI = ps.ScopeVI if issubclass(ps.ScopeVI, ScviApiMixin) else type("_ScopeVI", (ScviApiMixin, ps.ScopeVI), {})


def _screen():
    """One cell type, six regulators with strong effects (the truth is in uns['simulation'])."""
    return ps.data.simulate_perturbseq(
        n_genes=40, n_perturbed_genes=6, n_combinations=0, n_cell_types=1, n_cells_per_condition=80,
        effect_size=2.0, embedding_dim=8, seed=1,
    )


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    adata, embeddings = _screen()
    _ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings)
    model = _ScopeVI(adata, n_latent=6, n_hidden=32, effect_prior=False)
    model.train(max_epochs=40, enable_progress_bar=False)
    return model, adata


def _controls(adata):
    return adata[(adata.obs["perturbation"] == "control").to_numpy()].copy()


def test_normalized_expression_sums_to_the_library_size(trained):
    model, adata = trained
    rho = model.get_normalized_expression(indices=np.arange(20), seed=0)
    assert rho.shape == (20, adata.n_vars)
    assert rho.index.tolist() == adata.obs_names[:20].tolist()
    assert rho.columns.tolist() == adata.var_names.tolist()
    np.testing.assert_allclose(rho.sum(axis=1), 1.0, atol=1e-5)
    scaled = model.get_normalized_expression(indices=np.arange(20), seed=0, library_size=1e4)
    np.testing.assert_allclose(scaled.to_numpy(), 1e4 * rho.to_numpy(), rtol=1e-5)
    # the expected counts at each cell's observed library size sum to that library size
    latent = model.get_normalized_expression(indices=np.arange(20), seed=0, library_size="latent")
    np.testing.assert_allclose(latent.sum(axis=1), np.asarray(adata.X[:20].sum(axis=1)).ravel(), rtol=1e-4)
    genes = ["G33", "G01"]
    subset = model.get_normalized_expression(indices=np.arange(20), seed=0, gene_list=genes)
    assert subset.columns.tolist() == ["G01", "G33"]  # var_names order, as in scvi-tools
    np.testing.assert_array_equal(subset.to_numpy(), rho[["G01", "G33"]].to_numpy())


def test_normalized_expression_samples_and_seed(trained):
    model, _ = trained
    draws = model.get_normalized_expression(indices=np.arange(10), n_samples=3, return_mean=False, seed=2)
    assert isinstance(draws, np.ndarray)
    assert draws.shape == (3, 10, 40)
    mean = model.get_normalized_expression(indices=np.arange(10), n_samples=3, seed=2)
    np.testing.assert_allclose(mean.to_numpy(), draws.mean(axis=0), rtol=1e-6)
    again = model.get_normalized_expression(indices=np.arange(10), n_samples=3, return_mean=False, seed=2)
    np.testing.assert_array_equal(draws, again)
    assert not np.allclose(draws, model.get_normalized_expression(
        indices=np.arange(10), n_samples=3, return_mean=False, seed=3))


def test_expression_under_a_perturbation_is_the_decoded_prediction(trained):
    """Under a perturbation, expected counts equal predict's decode(z_p, p) for the same draws."""
    model, adata = trained
    controls = _controls(adata)
    before = controls.copy()
    latent = model.get_normalized_expression(controls, perturbation="G00", library_size="latent", seed=4,
                                             batch_size=16)
    predicted = model.predict(controls, ["G00"], residual=False, seed=4, batch_size=16)
    np.testing.assert_allclose(latent.to_numpy(), predicted.X, rtol=1e-4, atol=1e-4)
    assert list(controls.uns) == list(before.uns)
    assert controls.obs.equals(before.obs)
    # the perturbation changes the decoded expression; the control label is "no perturbation"
    none = model.get_normalized_expression(controls, perturbation="control", seed=4)
    rho = model.get_normalized_expression(controls, perturbation="G00", seed=4)
    assert np.abs(np.log(rho["G33"] / none["G33"])).mean() > 1.0


def test_posterior_predictive_sample(trained):
    model, adata = trained
    one = model.posterior_predictive_sample(indices=np.arange(8), seed=0)
    assert one.shape == (8, 40)
    np.testing.assert_array_equal(one, np.round(one))
    assert (one >= 0).all()
    many = model.posterior_predictive_sample(indices=np.arange(8), n_samples=300, seed=0)
    assert many.shape == (8, 40, 300)
    np.testing.assert_array_equal(many[..., 0], model.posterior_predictive_sample(
        indices=np.arange(8), n_samples=300, seed=0)[..., 0])
    # the rates sum to each cell's library size, so the mean sampled total is close to it
    library = np.asarray(adata.X[:8].sum(axis=1)).ravel()
    np.testing.assert_allclose(many.sum(axis=1).mean(axis=1), library, rtol=0.05)
    under = model.posterior_predictive_sample(_controls(adata)[:8], perturbation="G00", seed=0)
    assert under.shape == (8, 40)


def test_differential_expression_finds_the_simulated_effects(trained):
    model, adata = trained
    truth = adata.uns["simulation"]["log_fold_change"]["type_0"].loc["G00"]
    de = model.differential_expression("G00", seed=0, n_samples_overall=2000)
    assert de.columns[:3].tolist() == ["proba_de", "proba_not_de", "bayes_factor"]
    assert {"lfc_mean", "lfc_median", "scale1", "scale2", "is_de_fdr_0.05"} <= set(de.columns)
    assert (de["comparison"] == "G00 vs control").all()
    assert de["proba_de"].is_monotonic_decreasing
    strongest = truth.abs().idxmax()  # simulated log fold change -4.95
    assert de.loc[strongest, "is_de_fdr_0.05"]
    assert abs(de.loc[strongest, "lfc_mean"]) > 1.0
    assert np.sign(de.loc[strongest, "lfc_mean"]) == np.sign(truth[strongest])
    controls = _controls(adata)
    untouched = truth[truth == 0].index
    busiest = untouched[np.argmax(np.asarray(controls[:, untouched].X.mean(axis=0)).ravel())]
    assert not de.loc[busiest, "is_de_fdr_0.05"]
    assert abs(de.loc[busiest, "lfc_mean"]) < 0.25


def test_expected_fdr_calls_by_hand():
    proba = pd.Series([0.9, 0.99, 0.2, 0.96], index=list("abcd"))
    # sorted: b .99, d .96, a .9, c .2 -> mean(1 - p) of the top k: .01, .025, .05, .2375
    assert expected_fdr_calls(proba, 0.06).tolist() == [True, True, False, True]
    assert expected_fdr_calls(proba, 0.03).tolist() == [False, True, False, True]
    assert not expected_fdr_calls(proba, 0.005).any()


def test_bad_input(trained):
    model, adata = trained
    controls = _controls(adata)
    with pytest.raises(ValueError, match=r"^library_size must be a positive number or 'latent', got 0\.$"):
        model.get_normalized_expression(library_size=0)
    with pytest.raises(ValueError, match=r"^gene_list has genes not in the model: \['NOPE'\]\.$"):
        model.get_normalized_expression(gene_list=["G01", "NOPE"])
    with pytest.raises(ValueError, match=r"^n_samples must be a positive integer, got 0\.$"):
        model.posterior_predictive_sample(n_samples=0)
    with pytest.raises(KeyError, match=r"NOTAGENE"):
        model.get_normalized_expression(controls, perturbation="NOTAGENE")
    with pytest.raises(ValueError, match=r"^perturbation must be a perturbation label other than the control "):
        model.differential_expression("control")
    with pytest.raises(ValueError, match=r"^mode must be 'change' or 'vanilla', got 'median'\.$"):
        model.differential_expression("G00", mode="median")
    with pytest.raises(ValueError, match=r"^fdr_target must be in \(0, 1\), got 1\.5\.$"):
        model.differential_expression("G00", fdr_target=1.5)
    with pytest.raises(ValueError, match=r"^adata_control has no cells; pass at least one control cell\.$"):
        model.differential_expression("G00", controls[:0])
    with pytest.raises(ValueError, match=r"^adata_control must hold control cells only"):
        model.differential_expression("G00", adata)


def test_normal_likelihood_has_no_normalised_expression():
    adata, embeddings = _screen()
    adata.X = log1p_normalized(adata)
    _ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings)
    model = _ScopeVI(adata, gene_likelihood="normal", n_latent=3, n_hidden=16)
    with pytest.raises(ValueError, match=r"^get_normalized_expression needs a count likelihood .* is 'normal'"):
        model.get_normalized_expression()
    with pytest.raises(ValueError, match=r"^differential_expression needs a count likelihood"):
        model.differential_expression("G00")
