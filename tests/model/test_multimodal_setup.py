"""setup_mudata with protein and ATAC: every key, modality and layer checked; the MuData left alone."""

from __future__ import annotations

import re

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import perturbscope as ps
from perturbscope.model._multimodal_setup import check_modalities

md.set_options(pull_on_update=False)


@pytest.fixture(scope="module")
def screen():
    return ps.data.simulate_multimodal_perturbseq(
        n_genes=60, n_perturbed_genes=6, n_combinations=2, n_proteins=10, n_peaks=12, n_cell_types=2,
        n_cells_per_condition=8, embedding_dim=8, missing_protein_fraction=0.2, seed=3,
    )


def fresh(screen):
    mdata, emb = screen
    return mdata.copy(), emb


def setup(mdata, emb, **kwargs):
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=emb, context_key="cell_type", **kwargs)


def test_unknown_modalities_key_lists_the_accepted_ones(screen):
    mdata, emb = fresh(screen)
    with pytest.raises(ValueError, match=re.escape(
        "modalities has unknown key(s) ['protein']; accepted keys are ['rna_layer', 'protein_layer', 'atac_layer']"
    )):
        setup(mdata, emb, modalities={"rna_layer": "rna", "protein": "adt"})


def test_unknown_modality_names_the_ones_there(screen):
    mdata, emb = fresh(screen)
    with pytest.raises(KeyError, match=re.escape(
        "modalities['protein_layer']: modality 'protein' not in the MuData; modalities are "
        "['rna', 'adt', 'atac']. It should hold surface protein (antibody tag) counts."
    )):
        setup(mdata, emb, modalities={"rna_layer": "rna", "protein_layer": "protein"})


def test_missing_rna_modality(screen):
    mdata, emb = fresh(screen)
    with pytest.raises(KeyError, match=r"^\"modalities\['rna_layer'\]: modality 'gex' not in the MuData"):
        setup(mdata, emb, modalities={"rna_layer": "gex"})


def test_modalities_must_be_a_dict_of_names(screen):
    mdata, emb = fresh(screen)
    with pytest.raises(TypeError, match=r"^modalities must be a dict such as"):
        setup(mdata, emb, modalities=["rna", "adt"])
    with pytest.raises(TypeError, match=re.escape("modalities['protein_layer'] must be a modality name (str), got 3.")):
        setup(mdata, emb, modalities={"protein_layer": 3})


def test_one_modality_for_two_keys(screen):
    mdata, emb = fresh(screen)
    with pytest.raises(ValueError, match=r"^modalities names the modality \['adt'\] for more than one key"):
        setup(mdata, emb, modalities={"protein_layer": "adt", "atac_layer": "adt"})


def test_layers_are_checked(screen):
    mdata, emb = fresh(screen)
    with pytest.raises(KeyError, match=re.escape(
        "protein_layer='counts' is not a layer of modality 'adt'; its layers are []."
    )):
        setup(mdata, emb, modalities={"protein_layer": "adt"}, protein_layer="counts")
    with pytest.raises(ValueError, match=re.escape(
        "atac_layer='counts' was given, but modalities has no 'atac_layer' entry"
    )):
        setup(mdata, emb, modalities={"protein_layer": "adt"}, atac_layer="counts")


def test_protein_must_be_counts(screen):
    mdata, emb = fresh(screen)
    mdata.mod["adt"].X = mdata.mod["adt"].X * 0.5
    with pytest.raises(ValueError, match=re.escape(
        "modality 'adt' (protein_layer): adata.X has non-integer values"
    )):
        setup(mdata, emb, modalities={"protein_layer": "adt"})


def test_protein_without_any_counts(screen):
    mdata, emb = fresh(screen)
    mdata.mod["adt"].X = sp.csr_matrix(mdata.mod["adt"].shape, dtype=np.float32)
    with pytest.raises(ValueError, match=re.escape("modality 'adt' (protein_layer) has no counts in any cell.")):
        setup(mdata, emb, modalities={"protein_layer": "adt"})


def test_modalities_must_share_the_cells():
    import anndata as ad

    mdata = md.MuData({"rna": ad.AnnData(np.ones((3, 2))), "adt": ad.AnnData(np.ones((3, 4)))})
    mdata.mod["adt"] = mdata.mod["adt"][::-1].copy()
    with pytest.raises(ValueError, match=r"^modality 'adt' has 3 cells not in the order of the MuData's 3"):
        check_modalities(mdata, {"protein_layer": "adt"}, {})


def test_setup_changes_only_documented_keys(screen):
    mdata, emb = fresh(screen)
    before = {name: (mod.obs.copy(), mod.var.copy(), mod.X.copy(), set(mod.layers), set(mod.obsm), set(mod.uns))
              for name, mod in mdata.mod.items()}
    obs_before, obsm_before, uns_before = mdata.obs.copy(), set(mdata.obsm), set(mdata.uns)
    setup(mdata, emb, modalities={"rna_layer": "rna", "protein_layer": "adt", "atac_layer": "atac"})
    for name, (obs, var, X, layers, obsm, uns) in before.items():
        mod = mdata.mod[name]
        assert mod.obs.equals(obs)
        assert mod.var.equals(var)
        assert (mod.X != X).nnz == 0
        assert (set(mod.layers), set(mod.obsm), set(mod.uns)) == (layers, obsm, uns)
    new_obs = set(mdata.obs.columns) - set(obs_before.columns)
    assert new_obs <= {"_scvi_batch", "_scvi_context"}
    assert mdata.obs[list(obs_before.columns)].equals(obs_before)
    assert set(mdata.obsm) - obsm_before == {"_scopevi_perturbation_genes"}
    assert set(mdata.uns) - uns_before <= {"_scvi_uuid", "_scvi_manager_uuid"}


def test_registers_every_modality_and_builds_the_multimodal_module(screen):
    mdata, emb = fresh(screen)
    setup(mdata, emb, modalities={"rna_layer": "rna", "protein_layer": "adt", "atac_layer": "atac"})
    model = ps.ScopeVI(mdata, n_latent=3, n_hidden=8)
    assert model.modalities == {"X": "rna", "proteins": "adt", "atac": "atac"}
    assert type(model.module).__name__ == "MultimodalScopeVAE"
    assert (model.module.n_proteins, model.module.n_peaks) == (10, 12)


def test_rna_only_mudata_keeps_the_rna_model(screen):
    mdata, emb = fresh(screen)
    setup(mdata, emb)
    model = ps.ScopeVI(mdata, n_latent=3, n_hidden=8)
    assert model.modalities == {"X": "rna"}
    assert type(model.module).__name__ == "ScopeVAE"
    # labels and contexts live on the global obs: the default controls, and a MuData of them, read them
    model.train(max_epochs=1, enable_progress_bar=False)
    default = model.predict(None, ["G00"], aggregate="mean")
    assert sorted(default.obs["cell_type"].astype(str)) == ["type_0", "type_1"]
    controls = mdata[(mdata.obs["perturbation"].astype(str) == "control").to_numpy()]
    given = model.predict(controls, ["G00"], aggregate="mean")
    np.testing.assert_array_equal(given.layers["log1p_norm"], default.layers["log1p_norm"])


def test_rna_only_mudata_refuses_controls_whose_rna_rows_are_in_another_order(screen):
    mdata, emb = fresh(screen)
    setup(mdata, emb)
    model = ps.ScopeVI(mdata, n_latent=3, n_hidden=8)
    model.train(max_epochs=1, enable_progress_bar=False)
    rna = mdata["rna"][(mdata.obs["perturbation"].astype(str) == "control").to_numpy()].copy()
    hashtags = ad.AnnData(np.ones((rna.n_obs, 2), dtype=np.float32), obs=pd.DataFrame(index=rna.obs_names))[::-1]
    controls = md.MuData({"hto": hashtags.copy(), "rna": rna})  # the global obs follows the hashtags' order
    controls.obs["perturbation"] = "control"
    controls.obs["cell_type"] = mdata.obs.loc[controls.obs_names, "cell_type"].to_numpy()
    with pytest.raises(ValueError, match=re.escape(
            f"modality 'rna' has {rna.n_obs} cells not in the order of the MuData's {rna.n_obs}; ")):
        model.predict(controls, ["G00"], aggregate="mean")


def test_protein_prior_reads_only_cells_with_protein(screen):
    mdata, emb = fresh(screen)
    setup(mdata, emb, modalities={"protein_layer": "adt"})
    model = ps.ScopeVI(mdata, n_latent=3, n_hidden=8)
    data = model._modality_training_data("proteins")
    assert data.n_obs == int(mdata.obs["has_protein"].sum()) < mdata.n_obs
    assert list(data.obs_names) == list(mdata.obs_names[mdata.obs["has_protein"].to_numpy()])


def test_names_unique_within_each_modality_not_across(screen):
    mdata, emb = fresh(screen)
    mdata.mod["adt"].var_names = list(mdata.mod["rna"].var_names[:10])  # proteins named as their genes
    mdata.update()
    setup(mdata, emb, modalities={"protein_layer": "adt"})
    mdata, emb = fresh(screen)
    mdata.mod["adt"].var_names = ["P00"] * 2 + list(mdata.mod["adt"].var_names[2:])
    mdata.update()
    with pytest.raises(ValueError, match=re.escape("mdata['adt'].var_names has duplicates ['P00']")):
        setup(mdata, emb, modalities={"protein_layer": "adt"})
