"""``simulate_perturbseq``: layout, labels, counts, seeds and the simulated effects."""

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from perturbscope.data import simulate_perturbseq

SMALL = dict(n_genes=60, n_perturbed_genes=12, n_combinations=6, n_cell_types=2,
             n_cells_per_condition=20, embedding_dim=8)


def _mean_proportions(adata, condition, cell_type=None):
    """Mean per-cell share of each gene's counts among the cells of one condition."""
    keep = (adata.obs["perturbation"] == condition).to_numpy()
    if cell_type is not None:
        keep &= (adata.obs["cell_type"] == cell_type).to_numpy()
    X = adata.X[keep].toarray()
    return (X / X.sum(axis=1, keepdims=True)).mean(axis=0)


def test_shapes_and_layout(small_screen):
    adata, embeddings = small_screen
    # per cell type: 4 * 20 controls + (12 singles + 6 doubles) * 20 perturbed cells
    assert adata.shape == (2 * (80 + 18 * 20), 60)
    assert sparse.isspmatrix_csr(adata.X)
    assert adata.X.dtype == np.float32
    assert list(adata.var_names[:3]) == ["G00", "G01", "G02"]
    assert adata.var["perturbed_regulator"].sum() == 12
    assert adata.var["perturbed_regulator"].iloc[:12].all()
    assert list(adata.obs["cell_type"].cat.categories) == ["type_0", "type_1"]
    assert embeddings.shape == (12, 8)
    assert list(embeddings.columns) == [f"dim_{i}" for i in range(8)]


def test_labels(small_screen):
    adata, _ = small_screen
    counts = adata.obs.groupby(["cell_type", "perturbation"], observed=True).size()
    labels = adata.obs["perturbation"].astype(str)
    singles = sorted(p for p in labels.unique() if p != "control" and "+" not in p)
    doubles = sorted(p for p in labels.unique() if "+" in p)
    assert singles == [f"G{i:02d}" for i in range(12)]
    assert len(doubles) == 6
    for double in doubles:
        a, b = double.split("+")
        assert a < b
        assert {a, b} <= set(singles)
    assert list(adata.obs["perturbation"].cat.categories) == ["control", *singles, *doubles]
    assert (counts.xs("control", level="perturbation") == 80).all()
    assert (counts.drop("control", level="perturbation") == 20).all()
    interactions = adata.uns["simulation"]["interactions"]
    assert sorted(interactions.index) == doubles


def test_counts_are_non_negative_integers(small_screen):
    adata, _ = small_screen
    values = adata.X.data
    assert (values >= 0).all()
    np.testing.assert_array_equal(values, np.round(values))
    np.testing.assert_allclose(adata.obs["n_counts"], np.asarray(adata.X.sum(axis=1)).ravel())
    # library sizes are lognormal around mean_library_size (3000 by default)
    assert 2600 < np.median(adata.obs["n_counts"]) < 3400


def test_same_seed_same_screen_other_seed_other_screen():
    a, emb_a = simulate_perturbseq(**SMALL, seed=3)
    b, emb_b = simulate_perturbseq(**SMALL, seed=3)
    c, emb_c = simulate_perturbseq(**SMALL, seed=4)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(emb_a, emb_b)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.shape == c.shape
    assert (a.X != c.X).nnz > 0
    assert not np.allclose(emb_a.to_numpy(), emb_c.to_numpy())
    assert emb_a.attrs == {"source": "simulate_perturbseq", "seed": 3}


def test_embeddings_cover_every_perturbed_gene(small_screen):
    adata, embeddings = small_screen
    perturbed = set()
    for label in adata.obs["perturbation"].astype(str).unique():
        if label != "control":
            perturbed.update(label.split("+"))
    assert perturbed == set(embeddings.index)
    assert embeddings.index.name == "gene"
    assert np.isfinite(embeddings.to_numpy()).all()


def test_embeddings_are_a_linear_map_of_the_effects():
    adata, embeddings = simulate_perturbseq(**SMALL, embedding_noise=0.0, seed=1)
    effects = adata.uns["simulation"]["effect_vectors"].loc[embeddings.index].to_numpy()
    # 8 programmes -> 8 dimensions with no noise: embeddings = effects @ mixing exactly
    mixing, *_ = np.linalg.lstsq(effects, embeddings.to_numpy(), rcond=None)
    np.testing.assert_allclose(effects @ mixing, embeddings.to_numpy(), atol=1e-8)


def test_doubles_follow_the_interaction_model(small_screen):
    adata, _ = small_screen
    simulation = adata.uns["simulation"]
    effects = simulation["effect_vectors"]
    for name, row in simulation["interactions"].iterrows():
        ea, eb = effects.loc[row["gene_a"]].to_numpy(), effects.loc[row["gene_b"]].to_numpy()
        cosine = ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb))
        assert row["coefficient"] == pytest.approx(1 + 0.6 * cosine)  # interaction_strength=0.6
        expected_type = ("synergy" if row["coefficient"] > 1.2
                         else "buffering" if row["coefficient"] < 0.8 else "additive")
        assert row["type"] == expected_type
        for table in simulation["log_fold_change"].values():
            np.testing.assert_allclose(
                table.loc[name], row["coefficient"] * (table.loc[row["gene_a"]] + table.loc[row["gene_b"]])
            )


def test_true_shifts_differ_between_cell_types(small_screen):
    adata, _ = small_screen
    tables = adata.uns["simulation"]["log_fold_change"]
    assert set(tables) == {"type_0", "type_1"}
    np.testing.assert_array_equal(tables["type_0"].loc["control"], 0.0)
    singles = [f"G{i:02d}" for i in range(12)]
    assert not np.allclose(tables["type_0"].loc[singles], tables["type_1"].loc[singles])


def test_knock_down_lowers_the_regulator_by_its_designed_amount():
    # With no programme effects, a single knock-down only shifts its own log mean by -1.5;
    # the softmax renormalisation then raises every gene's share by 1 / (1 - p (1 - e^-1.5)).
    adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=3, n_combinations=0, n_cell_types=1,
                                   n_cells_per_condition=300, effect_size=0.0, embedding_dim=4, seed=0)
    np.testing.assert_allclose(adata.uns["simulation"]["log_fold_change"]["type_0"].loc["G01"],
                               np.where(np.arange(30) == 1, -1.5, 0.0))
    control = _mean_proportions(adata, "control")
    for i, gene in enumerate(["G00", "G01", "G02"]):
        log_ratio = np.log(_mean_proportions(adata, gene) / control)
        renormalisation = -np.log(1 - control[i] * (1 - np.exp(-1.5)))
        assert log_ratio[i] == pytest.approx(-1.5 + renormalisation, abs=0.25)
        others = np.delete(log_ratio, i)[np.delete(control, i) > 0.005]
        np.testing.assert_allclose(others, renormalisation, atol=0.2)


def test_observed_shifts_track_the_true_shifts(small_screen):
    adata, _ = small_screen
    tables = adata.uns["simulation"]["log_fold_change"]
    for cell_type, table in tables.items():
        control = _mean_proportions(adata, "control", cell_type)
        for perturbation in ["G00", "G03", *adata.uns["simulation"]["interactions"].index[:2]]:
            observed = np.log(_mean_proportions(adata, perturbation, cell_type) + 1e-5) - np.log(control + 1e-5)
            assert np.corrcoef(observed, table.loc[perturbation])[0, 1] > 0.8


def test_invalid_sizes():
    with pytest.raises(ValueError, match="n_perturbed_genes=12 exceeds n_genes=10"):
        simulate_perturbseq(n_genes=10, n_perturbed_genes=12)
    with pytest.raises(ValueError, match="n_combinations=4 exceeds the 3 distinct pairs of 3 perturbed genes"):
        simulate_perturbseq(n_genes=10, n_perturbed_genes=3, n_combinations=4)


# ---------------------------------------------------------------- simulate_multimodal_perturbseq
MULTI = dict(n_genes=80, n_perturbed_genes=8, n_combinations=3, n_cell_types=2, n_cells_per_condition=30,
             embedding_dim=8, n_proteins=16, seed=2)


@pytest.fixture(scope="module")
def multimodal_screen():
    from perturbscope.data import simulate_multimodal_perturbseq

    return simulate_multimodal_perturbseq(**MULTI, n_peaks=20, missing_protein_fraction=0.25)


def test_multimodal_rna_is_the_rna_simulation(multimodal_screen):
    mdata, embeddings = multimodal_screen
    rna, rna_embeddings = simulate_perturbseq(**{k: v for k, v in MULTI.items() if k != "n_proteins"})
    assert (mdata["rna"].X != rna.X).nnz == 0
    pd.testing.assert_frame_equal(embeddings, rna_embeddings)
    assert list(mdata.mod) == ["rna", "adt", "atac"]
    assert mdata["adt"].shape == (rna.n_obs, 16)
    assert mdata["atac"].shape == (rna.n_obs, 20)
    assert list(mdata.obs["perturbation"]) == list(rna.obs["perturbation"].astype(str))


def test_own_protein_falls_beyond_its_mrna(multimodal_screen):
    mdata, _ = multimodal_screen
    var = mdata["adt"].var
    protein_lfc = mdata["adt"].uns["simulation"]["log_fold_change"]["type_0"]
    rna_lfc = mdata["rna"].uns["simulation"]["log_fold_change"]["type_0"]
    own = var.index[var["kind"] == "own"]
    assert len(own) == 6  # min(n_perturbed_genes, (n_proteins - n_post) // 2)
    for protein in own:
        gene = var.loc[protein, "source_gene"]
        assert protein_lfc.loc[gene, protein] - rna_lfc.loc[gene, gene] == pytest.approx(-1.0)
        # observed: the knocked-down cells have less of the protein than the controls
        X = mdata["adt"].X.toarray()
        share = X / np.clip(X.sum(axis=1, keepdims=True), 1, None)
        labels = mdata.obs["perturbation"].to_numpy()
        has = mdata.obs["has_protein"].to_numpy()
        column = list(var.index).index(protein)
        assert share[(labels == gene) & has, column].mean() < 0.6 * share[(labels == "control") & has, column].mean()


def test_post_transcriptional_proteins_change_without_their_mrna(multimodal_screen):
    mdata, _ = multimodal_screen
    var = mdata["adt"].var
    post = var.index[var["kind"] == "post_transcriptional"]
    assert len(post) == 4
    for cell_type in ("type_0", "type_1"):
        rna_lfc = mdata["rna"].uns["simulation"]["log_fold_change"][cell_type]
        protein_lfc = mdata["adt"].uns["simulation"]["log_fold_change"][cell_type]
        assert (rna_lfc[var.loc[post, "source_gene"]].to_numpy() == 0).all()
        assert (protein_lfc[post].abs().to_numpy().max(axis=0) > 0.3).all()
    downstream = var.index[var["kind"] == "downstream"]
    rna_lfc = mdata["rna"].uns["simulation"]["log_fold_change"]["type_0"]
    protein_lfc = mdata["adt"].uns["simulation"]["log_fold_change"]["type_0"]
    np.testing.assert_allclose(protein_lfc[downstream].to_numpy(),
                               rna_lfc[var.loc[downstream, "source_gene"]].to_numpy())


def test_missing_protein_rows_are_zero_and_flagged(multimodal_screen):
    mdata, _ = multimodal_screen
    totals = np.asarray(mdata["adt"].X.sum(axis=1)).ravel()
    has = mdata.obs["has_protein"].to_numpy()
    assert (totals[~has] == 0).all()
    assert (totals[has] > 0).all()
    assert 0.15 < 1 - has.mean() < 0.35


def test_peaks_follow_their_linked_gene(multimodal_screen):
    mdata, _ = multimodal_screen
    atac = mdata["atac"]
    rna_lfc = mdata["rna"].uns["simulation"]["log_fold_change"]["type_1"]
    peak_lfc = atac.uns["simulation"]["log_fold_change"]["type_1"]
    np.testing.assert_allclose(peak_lfc.to_numpy(), 0.5 * rna_lfc[atac.var["linked_gene"]].to_numpy())
    values = atac.X.data
    assert np.array_equal(values, np.round(values))
    assert (values > 0).all()


def test_multimodal_invalid_arguments():
    from perturbscope.data import simulate_multimodal_perturbseq

    with pytest.raises(ValueError, match=r"^n_proteins must be a positive integer, got 0\.$"):
        simulate_multimodal_perturbseq(n_proteins=0)
    with pytest.raises(ValueError, match=r"^n_peaks must be a non-negative integer, got -1\.$"):
        simulate_multimodal_perturbseq(n_peaks=-1)
    with pytest.raises(ValueError, match=r"^missing_protein_fraction must lie in \[0, 1\), got 1\.0\.$"):
        simulate_multimodal_perturbseq(missing_protein_fraction=1.0)
    with pytest.raises(ValueError, match=r"^n_proteins=200 needs 50 genes that no programme loads"):
        simulate_multimodal_perturbseq(n_genes=60, n_perturbed_genes=6, n_combinations=2, n_proteins=200)
