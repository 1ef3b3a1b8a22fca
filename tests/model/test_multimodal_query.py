"""``load_query_data`` on a multimodal ScopeVI: a new cell type, every modality, the priors kept."""

from __future__ import annotations

import re

import mudata as md
import numpy as np
import pytest
import scvi

import perturbscope as ps
from perturbscope.data import log1p_expression

md.set_options(pull_on_update=False)
MODALITIES = {"rna_layer": "rna", "protein_layer": "adt"}


def _screen(n_cells_per_condition: int, seed: int):
    """A simulated RNA + protein screen over two cell types, its cell types and labels."""
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=60, n_perturbed_genes=6, n_combinations=0, n_proteins=12, n_cell_types=2,
        n_cells_per_condition=n_cells_per_condition, embedding_dim=8, seed=seed,
    )
    return mdata, emb, mdata.obs["cell_type"].astype(str).to_numpy(), mdata.obs["perturbation"].astype(str).to_numpy()


def _trained_reference(reference, emb, max_epochs: int):
    scvi.settings.seed = 0
    ps.ScopeVI.setup_mudata(reference, "perturbation", gene_embeddings=emb, context_key="cell_type",
                            modalities=MODALITIES)
    model = ps.ScopeVI(reference, n_latent=4, n_hidden=16)
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    return model


@pytest.fixture(scope="module")
def reference_and_query():
    mdata, emb, types, labels = _screen(10, seed=0)
    # the query: controls of the new cell type plus a few cells of two genes (few-shot)
    query = mdata[(types == "type_1") & np.isin(labels, ["control", "G01", "G02"])].copy()
    return _trained_reference(mdata[types == "type_0"].copy(), emb, max_epochs=2), query


def test_query_model_decodes_every_modality_and_keeps_the_priors(reference_and_query):
    reference, query = reference_and_query
    model = ps.ScopeVI.load_query_data(query.copy(), reference)
    assert type(model.module).__name__ == "MultimodalScopeVAE"
    assert model.modalities == {"X": "rna", "proteins": "adt"}
    assert model.modality_prior_states_.keys() == reference.modality_prior_states_.keys()
    model.train(max_epochs=2, enable_progress_bar=False)
    # training the query adds its few cells of G01 and G02 to every modality's prior as few-shot
    # groups of the new cell type; the reference's priors are unchanged
    assert model.modality_prior_states_.keys() == reference.modality_prior_states_.keys()
    for prior, before in ((model.effect_prior, reference.effect_prior),
                          (model.modality_prior("proteins"), reference.modality_prior("proteins"))):
        assert [prior.kind(p, "type_1") for p in ("G01", "G02", "G00")] == ["few_shot", "few_shot", "unseen_context"]
        assert before.kind("G01", "type_1") == "unseen_context"
    controls = model.adata[(model.adata.obs["perturbation"].astype(str) == "control").to_numpy()]
    prediction = model.predict(controls, ["G00", "G03"], aggregate="mean", seed=0)
    assert list(prediction.mod) == ["rna", "adt"]
    assert list(prediction["adt"].obs["cell_type"].astype(str)) == ["type_1", "type_1"]
    # the protein mean is the anchors' mean plus the reference's protein prior shift in the new
    # cell type (an unseen-context query of that prior): the prior is used, not dropped
    prior = model.modality_prior("proteins")
    anchors = log1p_expression(controls["adt"]).mean(axis=0)
    expected = anchors + prior.predict_shifts(["G00", "G03"], "type_1").to_numpy()
    np.testing.assert_allclose(prediction["adt"].layers["log1p_norm"], expected, rtol=0, atol=1e-4)


def test_query_without_the_reference_modalities_is_refused(reference_and_query):
    reference, query = reference_and_query
    rna = query["rna"].copy()
    rna.obs = query.obs[["perturbation", "cell_type"]].copy()
    with pytest.raises(TypeError, match=re.escape(
        "the reference model was set up with the modalities ['rna', 'adt']; pass the query as a MuData "
        "holding all of them, not a AnnData."
    )):
        ps.ScopeVI.load_query_data(rna, reference)
    only_rna = md.MuData({"rna": query["rna"].copy()})
    only_rna.obs["perturbation"] = query.obs["perturbation"].to_numpy()
    only_rna.obs["cell_type"] = query.obs["cell_type"].to_numpy()
    with pytest.raises(KeyError, match=r"modality 'adt' not in the MuData"):
        ps.ScopeVI.load_query_data(only_rna, reference)


def test_query_proteins_out_of_place_are_refused(reference_and_query):
    """The query decodes proteins with the reference's weights and prior: a reordered or renamed
    protein would have every prediction under another protein's name."""
    reference, query = reference_and_query
    reversed_adt = query.copy()
    reversed_adt.mod["adt"] = reversed_adt["adt"][:, reversed_adt["adt"].var_names[::-1]].copy()
    with pytest.raises(ValueError, match=re.escape(
            "mdata['adt'].var_names differ from the model's 12 proteins (0 missing, 0 extra: same proteins in "
            "another order)")):
        ps.ScopeVI.load_query_data(reversed_adt, reference)
    renamed = query.copy()
    renamed["adt"].var_names = [f"other{i}" for i in range(renamed["adt"].n_vars)]
    with pytest.raises(ValueError, match=r"mdata\['adt'\]\.var_names differ from the model's 12 proteins \(12 missing"):
        ps.ScopeVI.load_query_data(renamed, reference)


def test_query_contexts_without_measured_controls_are_left_out_of_that_modality(reference_and_query):
    """Query controls without a protein measurement (all-zero rows) leave no protein baseline in
    their context: that context's cells join the RNA prior only, with a warning."""
    reference, query = reference_and_query
    query = query.copy()
    controls = (query.obs["perturbation"].astype(str) == "control").to_numpy()
    adt = query["adt"]
    adt.X = adt.X.copy()
    adt.X[controls] = 0
    for name in adt.layers:
        adt.layers[name] = adt.layers[name].copy()
        adt.layers[name][controls] = 0
    model = ps.ScopeVI.load_query_data(query, reference)
    with pytest.warns(UserWarning, match=re.escape(
            "modality 'adt': contexts ['type_1'] of obs['cell_type'] have no measured control cells in the query; "
            "their cells "
            "are left out of that modality's effect prior.")):
        model.train(max_epochs=1, enable_progress_bar=False)
    assert model.effect_prior.kind("G01", "type_1") == "few_shot"
    assert model.modality_prior("proteins").kind("G01", "type_1") == "unseen_context"



def test_query_from_a_folder_uses_the_saved_few_shot_blends(tmp_path):
    """Without the reference's cells (a saved folder), every modality's few-shot blend is the one
    the reference cross-fitted at training for the k nearest the query's group size."""
    mdata, emb, types, labels = _screen(40, seed=1)
    shots = np.concatenate([np.flatnonzero((types == "type_1") & (labels == g))[:8] for g in ("G01", "G02")])
    query = mdata[np.sort(np.r_[np.flatnonzero((types == "type_1") & (labels == "control")), shots])].copy()
    trained = _trained_reference(mdata[types == "type_0"].copy(), emb, max_epochs=1)
    trained.save(tmp_path / "reference", overwrite=True)
    model = ps.ScopeVI.load_query_data(query, tmp_path / "reference")
    model.train(max_epochs=1, enable_progress_bar=False)
    for prior, blends in ((model.effect_prior, trained.few_shot_blends_),
                          (model.modality_prior("proteins"), trained.modality_few_shot_blends_["proteins"])):
        assert sorted(blends) == [5, 10]  # 25 and 50 need groups of 50 and 100 cells
        assert prior.kind("G01", "type_1") == "few_shot"
        assert prior.weights_["few_shot"] == blends[10]["weights"]  # 8 cells per group: k = 10 is nearest
