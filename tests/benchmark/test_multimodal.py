"""Per-modality scoring: the benchmark's metrics, baselines and ceiling on protein and ATAC."""

from __future__ import annotations

import re

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

import perturbscope as ps
from perturbscope.benchmark import modality_cells, score_modalities, unseen_single_split
from perturbscope.data import log1p_expression

md.set_options(pull_on_update=False)


@pytest.fixture(scope="module")
def screen():
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=60, n_perturbed_genes=6, n_combinations=0, n_proteins=12, n_peaks=8, n_cell_types=1,
        n_cells_per_condition=12, embedding_dim=8, missing_protein_fraction=0.2, seed=3,
    )
    split = unseen_single_split(ad.AnnData(obs=mdata.obs[["perturbation"]].copy()), "perturbation",
                                n_folds=3, fold=0, seed=0)
    return mdata, emb, split


def _observed_log(mdata, name: str, names) -> pd.DataFrame:
    cells = modality_cells(mdata, name, "perturbation")
    cells = cells[cells.obs_names.isin(names)]
    frame = pd.DataFrame(log1p_expression(cells), index=cells.obs["perturbation"].to_numpy(),
                         columns=cells.var_names)
    return frame.groupby(level=0).mean()


def _oracle(mdata, split) -> md.MuData:
    """Predictions equal to the observed held-out means of every modality."""
    modalities = {}
    for name in mdata.mod:
        means = _observed_log(mdata, name, split.test).loc[split.perturbations]
        prediction = ad.AnnData(np.zeros(means.shape), obs=pd.DataFrame(
            {"perturbation": means.index.to_numpy()}, index=means.index.to_numpy()),
            var=pd.DataFrame(index=means.columns))
        prediction.layers["log1p_norm"] = means.to_numpy()
        modalities[name] = prediction
    return md.MuData(modalities)


def test_modality_cells_keeps_measured_cells_with_labels(screen):
    mdata, _, _ = screen
    cells = modality_cells(mdata, "adt", "perturbation")
    measured = mdata.obs["has_protein"].to_numpy()
    assert measured.sum() < mdata.n_obs
    assert list(cells.obs_names) == list(mdata.obs_names[measured])
    assert list(cells.obs["perturbation"]) == list(mdata.obs["perturbation"].astype(str)[measured])
    np.testing.assert_array_equal(cells.X.toarray(), mdata["adt"].X.toarray()[measured])
    assert modality_cells(mdata, "rna", "perturbation").n_obs == mdata.n_obs


def test_modality_cells_label_each_row_by_its_own_cell(screen):
    """A modality whose rows are in another order, or a subset, of the global obs: each row keeps
    its own cell's label (they were taken by position: 3 in 4 rows mislabelled)."""
    mdata, _, _ = screen
    order = np.random.default_rng(0).permutation(mdata.n_obs)
    shuffled = md.MuData({"rna": mdata["rna"].copy(), "adt": mdata["adt"][order].copy()})
    shuffled.obs["perturbation"] = mdata.obs["perturbation"].reindex(shuffled.obs_names)
    cells = modality_cells(shuffled, "adt", "perturbation")
    expected = mdata.obs["perturbation"].astype(str).reindex(cells.obs_names)
    assert list(cells.obs["perturbation"]) == list(expected)
    subset = md.MuData({"rna": mdata["rna"].copy(), "adt": mdata["adt"][: mdata.n_obs // 2].copy()})
    subset.obs["perturbation"] = mdata.obs["perturbation"].reindex(subset.obs_names)
    half = modality_cells(subset, "adt", "perturbation")
    assert set(half.obs_names) <= set(mdata.obs_names[: mdata.n_obs // 2])
    assert list(half.obs["perturbation"]) == list(mdata.obs["perturbation"].astype(str).reindex(half.obs_names))


def test_modality_cells_refuses_bad_input(screen):
    mdata, _, _ = screen
    with pytest.raises(KeyError, match=re.escape("modality 'protein' is not in the MuData; its modalities are "
                                                 "['rna', 'adt', 'atac']")):
        modality_cells(mdata, "protein", "perturbation")
    with pytest.raises(KeyError, match=re.escape("['condition'] not in the MuData's global obs")):
        modality_cells(mdata, "adt", "condition")
    with pytest.raises(KeyError, match=re.escape("layer 'counts' is not a layer of modality 'adt'")):
        modality_cells(mdata, "adt", "perturbation", layer="counts")
    empty = md.MuData({"adt": ad.AnnData(np.zeros((3, 2)), obs=pd.DataFrame(index=list("abc")))})
    empty.obs["perturbation"] = ["control", "A", "A"]
    with pytest.raises(ValueError, match=r"^no cell has counts in modality 'adt'\.$"):
        modality_cells(empty, "adt", "perturbation")


def test_scores_per_modality_against_hand_computed_values(screen):
    mdata, emb, split = screen
    table = score_modalities(mdata, split, {"oracle": _oracle(mdata, split)},
                             baselines=("no_change", "linear"), gene_embeddings=emb)
    assert sorted(table["modality"].unique()) == ["adt", "atac", "rna"]
    assert set(table["model"]) == {"noise_ceiling", "observed", "oracle", "no_change", "linear"}
    per_perturbation = table[table["perturbation"] != "(all)"]  # "(all)": the mode-collapse rows
    scores = per_perturbation.pivot_table(index=["modality", "model", "perturbation"], columns="metric",
                                          values="value")
    # the oracle predicts the observed means: perfect correlation, no distance
    oracle = scores.xs("oracle", level="model")
    np.testing.assert_allclose(oracle["pearson_delta"], 1.0)
    np.testing.assert_allclose(oracle["l2_top_expressed"], 0.0, atol=1e-12)
    # no change: the control mean of the measured control cells; its L2 is computed here by hand
    control = _observed_log(mdata, "adt", split.control).loc["control"].to_numpy()
    for p in split.perturbations:
        observed = _observed_log(mdata, "adt", split.test).loc[p].to_numpy()
        assert scores.loc[("adt", "no_change", p), "pearson_delta"] == 0.0
        assert scores.loc[("adt", "no_change", p), "l2_top_expressed"] == pytest.approx(
            np.linalg.norm(observed - control), rel=1e-6)
    # every modality has its own split-half ceiling, and a model that knows the perturbed
    # genes' embeddings beats no change on protein
    assert scores.xs("noise_ceiling", level="model").groupby(level="modality").size().to_dict() == {
        m: len(split.perturbations) for m in ("adt", "atac", "rna")}
    linear = scores.xs("linear", level="model")["pearson_delta_top_de"]
    assert linear.loc["adt"].mean() > 0.3, linear


def test_score_modalities_refuses_bad_input(screen):
    mdata, _, split = screen
    oracle = _oracle(mdata, split)
    with pytest.raises(ValueError, match=r"^predictions is empty"):
        score_modalities(mdata, split, {})
    with pytest.raises(ValueError, match=re.escape("unknown baselines ['mean']; choose from")):
        score_modalities(mdata, split, {"oracle": oracle}, baselines=["mean"])
    rna_only = md.MuData({"rna": oracle["rna"].copy()})
    with pytest.raises(ValueError, match=re.escape(
        "modality 'adt' is not in the predictions ['rna_only']; the screen has ['rna', 'adt', 'atac']"
    )):
        score_modalities(mdata, split, {"rna_only": rna_only}, modalities=["adt"], baselines=())
    partial = md.MuData({m: oracle[m][1:].copy() for m in oracle.mod})
    with pytest.raises(ValueError, match=r"perturbations \['G0\d'\] are observed but not predicted"):
        score_modalities(mdata, split, {"partial": partial}, modalities=["adt"], baselines=())
