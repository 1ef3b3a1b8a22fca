"""Multimodal ScopeVI on a simulated ECCITE-seq screen with held-out genes.

One multimodal model (RNA + protein) and two RNA-only models (seeds 0 and 1) are trained on the
same training perturbations; eight single genes are held out of training entirely.
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi

import perturbscope as ps
from perturbscope.data import aggregate_prediction, log1p_expression
from perturbscope.effects import NoChangeBaseline, PerturbedMeanBaseline, top_change_scores

md.set_options(pull_on_update=False)
pytestmark = pytest.mark.slow
EPOCHS = 12
N_HELD = 8


@pytest.fixture(scope="module")
def study():
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=120, n_perturbed_genes=30, n_combinations=0, n_proteins=24, n_cell_types=1,
        n_cells_per_condition=30, embedding_dim=16, seed=0,
    )
    genes = [f"G{i:03d}" for i in range(30)]
    held = sorted(np.random.default_rng(0).choice(genes, N_HELD, replace=False))
    labels = mdata.obs["perturbation"].astype(str).to_numpy()
    train = mdata[~np.isin(labels, held)].copy()
    test = mdata[np.isin(labels, held)].copy()
    controls = mdata[labels == "control"].copy()
    scvi.settings.seed = 0
    ps.ScopeVI.setup_mudata(train, "perturbation", gene_embeddings=emb, context_key="cell_type",
                            modalities={"rna_layer": "rna", "protein_layer": "adt"})
    model = ps.ScopeVI(train, n_latent=8, n_hidden=64)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False)
    rna_only = []
    for seed in (0, 1):
        scvi.settings.seed = seed
        rna = train["rna"].copy()
        rna.obs["perturbation"] = train.obs["perturbation"].to_numpy()
        rna.obs["cell_type"] = train.obs["cell_type"].to_numpy()
        ps.ScopeVI.setup_anndata(rna, "perturbation", gene_embeddings=emb, context_key="cell_type")
        rna_model = ps.ScopeVI(rna, n_latent=8, n_hidden=64)
        rna_model.train(max_epochs=EPOCHS, enable_progress_bar=False)
        rna_only.append((rna_model, rna))
    prediction = model.predict(controls, held, aggregate="mean", seed=0)
    return {"mdata": mdata, "train": train, "test": test, "held": held, "model": model,
            "rna_only": rna_only, "controls": controls, "prediction": prediction}


def _modality(data: md.MuData, name: str) -> ad.AnnData:
    modality = data[name]
    return ad.AnnData(modality.X, obs=pd.DataFrame(
        {"perturbation": data.obs["perturbation"].astype(str).to_numpy()}, index=modality.obs_names
    ), var=pd.DataFrame(index=modality.var_names))


def _observed_shift(study, name: str, gene: str) -> np.ndarray:
    train, test = _modality(study["train"], name), _modality(study["test"], name)
    control = log1p_expression(train[train.obs["perturbation"] == "control"]).mean(axis=0)
    return log1p_expression(test[test.obs["perturbation"] == gene]).mean(axis=0) - control


def _predicted_shifts(prediction: ad.AnnData, anchors: ad.AnnData) -> np.ndarray:
    return prediction.layers["log1p_norm"] - log1p_expression(anchors).mean(axis=0)


def test_protein_predictions_beat_the_baselines_on_held_out_genes(study):
    """Pearson delta on the 10 most changed proteins of each held-out gene."""
    proteins = _modality(study["train"], "adt")
    baselines = {"perturbed_mean": PerturbedMeanBaseline().fit(proteins, "perturbation"),
                 "no_change": NoChangeBaseline().fit(proteins, "perturbation")}
    predicted = _predicted_shifts(study["prediction"]["adt"], study["controls"]["adt"])
    scores = {name: [] for name in ("model", *baselines)}
    for i, gene in enumerate(study["held"]):
        observed = _observed_shift(study, "adt", gene)
        scores["model"].append(top_change_scores(predicted[i], observed, n_genes=10)[1])
        for name, baseline in baselines.items():
            shift = baseline.predict_shifts([gene]).to_numpy()[0]
            scores[name].append(top_change_scores(shift, observed, n_genes=10)[1])
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    # measured: model 0.87, perturbed mean 0.34, no change 0.0
    assert means["model"] > means["perturbed_mean"] + 0.2, means
    assert means["model"] > means["no_change"] + 0.2, means


def test_residual_false_decodes_every_modality_from_the_vae_alone(study):
    kwargs = {"aggregate": "mean", "seed": 0, "use_prior_mean": True}
    vae = study["model"].predict(study["controls"], study["held"][:2], residual=False, **kwargs)
    prior = study["model"].predict(study["controls"], study["held"][:2], **kwargs)
    for name in ("rna", "adt"):
        assert not any("_lower_" in layer for layer in vae[name].layers), name  # no prior, no interval
        assert np.abs(vae[name].layers["log1p_norm"] - prior[name].layers["log1p_norm"]).max() > 1e-3, name
    assert any("_lower_80" in layer for layer in prior["adt"].layers)


def test_post_transcriptional_proteins_are_predicted(study):
    """Proteins whose mRNA never changes: predicted shifts correlate with the true ones."""
    var = study["mdata"]["adt"].var
    post = (var["kind"] == "post_transcriptional").to_numpy()
    truth = study["mdata"]["adt"].uns["simulation"]["log_fold_change"]["type_0"]
    predicted = _predicted_shifts(study["prediction"]["adt"], study["controls"]["adt"])
    rna_truth = study["mdata"]["rna"].uns["simulation"]["log_fold_change"]["type_0"]
    assert (rna_truth.loc[study["held"], var.loc[post, "source_gene"]].to_numpy() == 0).all()
    pairs = np.concatenate([predicted[:, post].ravel()]), truth.loc[study["held"]].to_numpy()[:, post].ravel()
    correlation = float(np.corrcoef(*pairs)[0, 1])
    assert correlation > 0.5, correlation  # measured 0.94


def test_rna_predictions_match_the_rna_only_model_within_seed_noise(study):
    def score(prediction: ad.AnnData, anchors: ad.AnnData) -> float:
        predicted = _predicted_shifts(prediction, anchors)
        return float(np.mean([top_change_scores(predicted[i], _observed_shift(study, "rna", gene))[1]
                              for i, gene in enumerate(study["held"])]))

    multimodal = score(study["prediction"]["rna"], study["controls"]["rna"])
    rna_only = []
    for model, rna in study["rna_only"]:
        anchors = rna[rna.obs["perturbation"].astype(str) == "control"]
        rna_only.append(score(model.predict(anchors, study["held"], aggregate="mean", seed=0), anchors))
    seed_noise = abs(rna_only[0] - rna_only[1])
    # measured: multimodal 0.729, RNA-only 0.730 and 0.732
    assert abs(multimodal - np.mean(rna_only)) <= max(3 * seed_noise, 0.02), (multimodal, rna_only)


def test_prediction_layout(study):
    prediction, controls = study["prediction"], study["controls"]
    assert list(prediction.mod) == ["rna", "adt"]
    rna, adt = prediction["rna"], prediction["adt"]
    assert list(adt.var_names) == list(study["train"]["adt"].var_names)
    assert adt.obs.equals(rna.obs)
    assert list(prediction.obs["perturbation"].astype(str)) == study["held"]
    assert {"log1p_norm_lower_80", "log1p_norm_upper_95"} <= set(adt.layers)
    assert (adt.layers["log1p_norm_lower_80"] <= adt.layers["log1p_norm"]).all()
    # X is expected counts at the anchors' protein library size: its log1p-normalised mean is
    # the prior's shift applied to the anchors (the cell-level term averages to zero)
    prior = study["model"].modality_prior("proteins")
    anchors = log1p_expression(controls["adt"]).mean(axis=0)
    np.testing.assert_allclose(adt.layers["log1p_norm"], anchors + prior.predict_shifts(study["held"], "type_0").to_numpy(),
                               rtol=0, atol=1e-4)
    cells = study["model"].predict(controls[:20], study["held"][:2], n_samples=2, seed=0)
    assert cells["adt"].n_obs == 2 * 2 * 20
    # X is on the counts scale at each anchor's own protein library size
    library = np.asarray(controls["adt"][:20].X.sum(axis=1)).ravel()
    np.testing.assert_allclose(np.log1p(cells["adt"].X[:20] / library[:, None] * 1e4),
                               cells["adt"].layers["log1p_norm"][:20], rtol=1e-4, atol=1e-4)
    assert list(cells["adt"].obs["control_cell"][:20]) == list(controls.obs_names[:20])


def test_extra_modalities_in_the_input_are_ignored(study):
    controls = study["controls"]
    extended = md.MuData({**{k: v for k, v in controls.mod.items()},
                          "hto": ad.AnnData(np.ones((controls.n_obs, 2)), obs=pd.DataFrame(index=controls.obs_names))})
    extended.obs["perturbation"] = controls.obs["perturbation"].to_numpy()
    extended.obs["cell_type"] = controls.obs["cell_type"].to_numpy()
    prediction = study["model"].predict(extended, study["held"][:2], aggregate="mean", seed=0)
    assert list(prediction.mod) == ["rna", "adt"]
    np.testing.assert_allclose(prediction["adt"].X, study["prediction"]["adt"].X[:2], rtol=1e-5)


def test_bad_prediction_inputs(study):
    model, controls = study["model"], study["controls"]
    with pytest.raises(TypeError, match=re.escape(
        "this model was set up with the modalities ['rna', 'adt']; pass a MuData of control cells holding "
        "all of them (e.g. mdata[controls]), not a AnnData."
    )):
        model.predict(controls["rna"], ["G000"])
    with pytest.raises(KeyError, match=re.escape("the MuData has no modality ['adt']; the model needs ['rna', 'adt']")):
        model.predict(md.MuData({"rna": controls["rna"].copy()}), ["G000"])
    without = controls.copy()
    counts = without.mod["adt"].X.toarray()
    counts[:3] = 0
    without.mod["adt"].X = sp.csr_matrix(counts)
    rna_passes = []
    original = ps.model._prediction.PredictionMixin.predict

    def counted(*args, **kwargs):
        rna_passes.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # refused before the RNA pass, the long one
        patch.setattr(ps.model._prediction.PredictionMixin, "predict", counted)
        with pytest.raises(ValueError, match=r"^3 of \d+ control cells have no counts in modality 'adt'"):
            model.predict(without, ["G000"])
    assert rna_passes == []
    shuffled = controls.copy()
    shuffled.mod["adt"] = shuffled.mod["adt"][:, ::-1].copy()
    with pytest.raises(ValueError, match=re.escape("mdata['adt'].var_names differ from the model's 24 proteins (0 missing, 0 extra: same proteins in another order); subset and order it as the model's proteins were in training.")):
        model.predict(shuffled, ["G000"])
    with pytest.raises(ValueError, match=r"^out= \(writing predicted cells to a file\) is for RNA-only models"):
        model.predict(controls, ["G000"], out="cells.h5ad")
    # protein rows in another cell order would anchor each cell's protein on another cell
    order = np.random.default_rng(0).permutation(controls.n_obs)
    misaligned = md.MuData({"rna": controls["rna"].copy(), "adt": controls["adt"][order].copy()})
    misaligned.obs = controls.obs.copy()
    with pytest.raises(ValueError, match=r"^modality 'adt' has \d+ cells not in the order of the MuData's \d+"):
        model.predict(misaligned, ["G000"])


def test_save_load_gives_identical_predictions(study, tmp_path):
    model, controls = study["model"], study["controls"]
    model.save(tmp_path, overwrite=True)
    loaded = ps.ScopeVI.load(tmp_path, study["train"])
    # saved with its MuData (scvi-tools writes mdata.h5mu, not adata.h5ad): the file is found and
    # read; mudata 0.3 cannot read back this registered MuData, which is said, not "no saved AnnData"
    model.save(tmp_path / "with_data", overwrite=True, save_anndata=True)
    try:
        n_obs, message = ps.ScopeVI.load(tmp_path / "with_data").adata.n_obs, ""
    except ValueError as error:  # mudata 0.3 cannot read back a MuData that scvi-tools registered
        n_obs, message = study["train"].n_obs, str(error)
    assert n_obs == study["train"].n_obs
    assert not message or re.search(r"mdata\.h5mu could not be read back by mudata .*pass the MuData: "
                                    r"ScopeVI\.load\(folder, mdata\)\.$", message), message
    assert type(loaded.module).__name__ == "MultimodalScopeVAE"
    before = model.predict(controls[:30], study["held"][:3], n_samples=2, seed=4)
    after = loaded.predict(controls[:30], study["held"][:3], n_samples=2, seed=4)
    for name in ("rna", "adt"):
        np.testing.assert_array_equal(before[name].X, after[name].X)
        np.testing.assert_array_equal(before[name].layers["log1p_norm"], after[name].layers["log1p_norm"])
    with pytest.raises(ValueError, match=re.escape("the saved model was set up with modality 'adt'; pass a MuData")):
        ps.ScopeVI.load(tmp_path, md.MuData({"rna": study["train"]["rna"].copy()}))


def test_missing_protein_cells_train_and_atac_is_predicted():
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=60, n_perturbed_genes=6, n_combinations=2, n_proteins=10, n_peaks=15, n_cell_types=2,
        n_cells_per_condition=10, embedding_dim=8, missing_protein_fraction=0.3, seed=1,
    )
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=emb, context_key="cell_type",
                            modalities={"rna_layer": "rna", "protein_layer": "adt", "atac_layer": "atac"})
    model = ps.ScopeVI(mdata, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert set(model.modality_prior_states_) == {"proteins", "atac"}
    controls = mdata[(mdata.obs["perturbation"].astype(str) == "control").to_numpy() & mdata.obs["has_protein"].to_numpy()]
    prediction = model.predict(controls, ["G00", "G01+G02"], aggregate="mean")
    assert list(prediction.mod) == ["rna", "adt", "atac"]
    assert prediction["atac"].shape == (4, 15)
    assert np.isfinite(prediction["atac"].layers["log1p_norm"]).all()
    assert list(prediction["atac"].obs["cell_type"].astype(str)) == ["type_0", "type_1"] * 2
    # by default the training controls measured in every modality anchor the prediction
    default = model.predict(None, ["G00"], aggregate="mean")
    n_measured = int((controls.obs["perturbation"].astype(str) == "control").sum())
    assert default["adt"].obs["n_cells"].sum() == n_measured


def test_a_context_without_measured_protein_controls_is_left_out_of_the_protein_prior():
    """All-zero protein rows mean "not measured": a context whose controls have none has no
    protein baseline, so its cells leave the protein prior (with a warning) and training ends;
    its perturbations are answered there as an unseen context."""
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=40, n_perturbed_genes=6, n_combinations=2, n_proteins=8, n_cell_types=2,
        n_cells_per_condition=8, embedding_dim=6, missing_protein_fraction=0.0, seed=2,
    )
    unmeasured = ((mdata.obs["cell_type"] == "type_1") & (mdata.obs["perturbation"] == "control")).to_numpy()
    adt = mdata["adt"].X.toarray()
    adt[unmeasured] = 0
    mdata.mod["adt"].X = sp.csr_matrix(adt)
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=emb, context_key="cell_type",
                            modalities={"rna_layer": "rna", "protein_layer": "adt"})
    model = ps.ScopeVI(mdata, n_latent=4, n_hidden=16)
    with pytest.warns(UserWarning, match=re.escape(
            "modality 'adt': contexts ['type_1'] of obs['cell_type'] have no measured control cells; their cells "
            "are left out of that modality's effect prior.")):
        model.train(max_epochs=1, enable_progress_bar=False)
    assert model.effect_prior.kind("G00", "type_1") == "few_shot"  # RNA measured it (8 cells)
    assert model.modality_prior("proteins").kind("G00", "type_1") == "unseen_context"
    measured = ((mdata.obs["perturbation"] == "control") & (mdata.obs["cell_type"] == "type_0")).to_numpy()
    prediction = model.predict(mdata[measured], ["G00"], aggregate="mean")
    assert "log1p_norm_lower_80" in prediction["adt"].layers
    # without the effect prior there is no protein prior to leave anything out of, and no warning
    adt[(mdata.obs["perturbation"] == "control").to_numpy()] = 0
    mdata.mod["adt"].X = sp.csr_matrix(adt)
    plain = ps.ScopeVI(mdata, n_latent=4, n_hidden=16, effect_prior=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plain.train(max_epochs=1, enable_progress_bar=False)


def test_a_backed_protein_modality_is_refused_with_the_fix(tmp_path):
    """Only RNA is streamed: a MuData opened with backed=True must load its other modalities."""
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=30, n_perturbed_genes=4, n_combinations=1, n_proteins=6, n_cell_types=1,
        n_cells_per_condition=6, embedding_dim=4, missing_protein_fraction=0.0)
    path = tmp_path / "screen.h5mu"
    mdata.write(path)
    backed = md.read_h5mu(path, backed=True)
    modalities = {"rna_layer": "rna", "protein_layer": "adt"}
    with pytest.raises(ValueError, match=re.escape(
            f"modality 'adt' (protein_layer) is read from disk (the backed file {str(path)!r}); only the RNA "
            "modality is streamed. Load it into memory and set up again: mdata.mod['adt'] = mdata['adt'].to_memory().")):
        ps.ScopeVI.setup_mudata(backed, "perturbation", gene_embeddings=emb, modalities=modalities)
    backed.mod["adt"] = backed["adt"].to_memory()  # the advice works: RNA stays on disk
    ps.ScopeVI.setup_mudata(backed, "perturbation", gene_embeddings=emb, modalities=modalities)
    ps.ScopeVI(backed, n_latent=3, n_hidden=8).train(max_epochs=1, enable_progress_bar=False)


def test_docs_example_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "multimodal.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/multimodal.md", "exec"), namespace)
    assert namespace["protein"].shape == (4, 12)


@pytest.mark.parametrize("residual", [True, False])
def test_streamed_mean_of_every_modality_is_the_mean_of_its_cells(study, residual):
    """aggregate="mean" keeps running sums over chunks of anchors; the draws are those of the
    cells predicted with the same seed and batch size, so the two agree to float rounding."""
    controls, held = study["controls"][:40], study["held"][:3]
    kwargs = {"n_samples": 2, "seed": 3, "batch_size": 7, "residual": residual}
    mean = study["model"].predict(controls, held, aggregate="mean", **kwargs)
    cells = study["model"].predict(controls, held, **kwargs)
    for name in ("rna", "adt"):
        expected = aggregate_prediction(cells[name], "cell_type")
        assert list(mean[name].obs_names) == list(expected.obs_names), name
        assert mean[name].obs["n_cells"].tolist() == [2 * 40] * 3, name
        np.testing.assert_allclose(mean[name].X, expected.X, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(mean[name].layers["log1p_norm"], expected.layers["log1p_norm"],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
    assert any("_lower_80" in layer for layer in mean["adt"].layers) is residual


def test_scvi_tools_methods_read_the_rna_modality_of_a_mudata(study):
    """A MuData's own var_names hold every modality: the columns were 144 names for 120 genes."""
    model, controls = study["model"], study["controls"]
    genes = controls["rna"].var_names
    rho = model.get_normalized_expression(controls, perturbation=study["held"][0])
    assert list(rho.columns) == list(genes)
    assert np.allclose(rho.sum(axis=1), 1.0, atol=1e-4)
    picked = model.get_normalized_expression(controls, gene_list=[genes[3], genes[0]])
    assert list(picked.columns) == [genes[0], genes[3]]
    assert model.posterior_predictive_sample(controls[:20].copy()).shape == (20, len(genes))
    table = model.differential_expression(study["held"][0], controls, n_samples_overall=200, seed=0)
    assert sorted(table.index) == sorted(genes)
    with pytest.raises(ValueError, match=r"^gene_list has genes not in the model: \['P000'\]"):
        model.get_normalized_expression(controls, gene_list=["P000"])


def test_views_of_the_registered_mudata_work(study):
    """mudata could not copy a view holding setup's integer obsm ("cannot convert float NaN to integer"),
    so differential_expression's default controls and every view of the training MuData failed."""
    model, train = study["model"], study["train"]
    genes = train.obsm["_scopevi_perturbation_genes"]
    assert genes.dtype == np.float32
    assert np.array_equal(genes, np.round(genes))
    table = model.differential_expression(study["held"][0], n_samples_overall=100, seed=0)
    assert sorted(table.index) == sorted(train["rna"].var_names)
    assert model.get_latent_representation(train[:10]).shape == (10, 8)
    assert model.get_normalized_expression(train[:10]).shape == (10, train["rna"].n_vars)


def test_reordered_proteins_are_refused_by_the_latent(study):
    """Only the RNA order was checked: permuted proteins gave another latent without an error."""
    model, controls = study["model"], study["controls"]
    shuffled = controls.copy()
    shuffled.mod["adt"] = shuffled.mod["adt"][:, ::-1].copy()
    with pytest.raises(ValueError, match=re.escape(
            "mdata['adt'].var_names differ from the model's 24 proteins (0 missing, 0 extra: same proteins in "
            "another order); subset and order it as the model's proteins were in training.")):
        model.get_latent_representation(shuffled)
