import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbscope.probe import decoder_jacobian, load_census_scvi


@pytest.fixture(scope="module")
def loaded(census_layout):
    folder, _, query = census_layout
    with pytest.warns(UserWarning, match=r"6 of the model's 60 genes \(10\.0%\) .* zero-filled"):
        model = load_census_scvi(folder, query, gene_id_column="ensembl_id")
    return model


def test_query_is_mapped_reordered_and_zero_filled(census_layout, loaded):
    _, trained, query = census_layout
    new = loaded.adata
    assert list(new.var_names) == list(trained.adata.var_names)
    assert new.var["probe_in_query"].sum() == 54
    missing = ~new.var["probe_in_query"].to_numpy()
    assert sp.csr_matrix(new.X)[:, missing].nnz == 0
    assert (new.var.loc[missing, "gene_symbol"] == "").all()
    # every measured gene keeps its counts under its Ensembl ID
    for symbol, ensembl in zip(query.var_names[:10], query.var["ensembl_id"][:10]):
        column = new[:, ensembl.split(".")[0]].X.toarray().ravel()
        np.testing.assert_array_equal(column, query[:, symbol].X.toarray().ravel())
        assert new.var.loc[ensembl.split(".")[0], "gene_symbol"] == symbol


def test_query_is_not_modified(census_layout):
    folder, _, query = census_layout
    before = query.copy()
    with pytest.warns(UserWarning, match="zero-filled"):
        load_census_scvi(folder, query, gene_id_column="ensembl_id", reference_batch=None)
    assert list(query.var_names) == list(before.var_names)
    assert list(query.obs.columns) == list(before.obs.columns)
    assert list(query.var.columns) == list(before.var.columns)
    assert query.uns.keys() == before.uns.keys()
    assert (query.X != before.X).nnz == 0


def test_weights_and_batches_match_the_trained_model(census_layout, loaded):
    _, trained, _ = census_layout
    batches = sorted(set(trained.adata.obs["batch"]))
    assert loaded.probe_reference_batches_ == batches
    z = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    for name in batches[:2]:
        mine = decoder_jacobian(loaded, z=z, transform_batch=name, progress_bar=False)
        theirs = decoder_jacobian(trained, z=z, transform_batch=name, progress_bar=False)
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    # by default the loaded model decodes through the average over its reference batches
    default = decoder_jacobian(loaded, z=z, output="scale", progress_bar=False)
    per_batch = [
        decoder_jacobian(trained, z=z, output="scale", transform_batch=b, progress_bar=False)
        for b in batches
    ]
    np.testing.assert_allclose(default, np.mean(per_batch, axis=0), rtol=1e-4, atol=1e-8)


def test_named_reference_batch_and_probing_query_cells(census_layout):
    folder, trained, query = census_layout
    name = sorted(set(trained.adata.obs["batch"]))[1]
    with pytest.warns(UserWarning, match="zero-filled"):
        model = load_census_scvi(folder, query, gene_id_column="ensembl_id", reference_batch=name)
    assert model.probe_reference_batches_ == [name]
    assert set(model.adata.obs["batch"]) == {name}
    jac = decoder_jacobian(model, genes=["ENSG00100000003"], progress_bar=False)
    assert jac.shape == (200, 1, 5)
    assert np.isfinite(jac).all()
    assert np.abs(jac).sum() > 0
    assert not model.module.training


def test_ensembl_var_names_without_column(census_layout):
    folder, trained, _ = census_layout
    query = trained.adata[:20].copy()
    query.obs = query.obs[[]]
    model = load_census_scvi(folder, query)
    assert model.adata.n_vars == 60
    assert model.adata.var["probe_in_query"].all()


def test_no_gene_overlap(census_layout):
    folder, _, query = census_layout
    with pytest.raises(ValueError, match="no gene overlap.*gene_id_column"):
        load_census_scvi(folder, query)  # symbols are not Ensembl IDs


def test_unknown_reference_batch_lists_batches(census_layout):
    folder, _, query = census_layout
    with pytest.raises(ValueError, match=r"reference_batch \['nope'\] is not a batch.*dsA_10x"):
        load_census_scvi(folder, query, gene_id_column="ensembl_id", reference_batch="nope")


def test_unknown_gene_id_column(census_layout):
    folder, _, query = census_layout
    with pytest.raises(ValueError, match="gene_id_column 'gene_ids' is not a column.*ensembl_id"):
        load_census_scvi(folder, query, gene_id_column="gene_ids")


def test_unknown_layer(census_layout):
    folder, _, query = census_layout
    with pytest.raises(ValueError, match="layer 'counts' is not in adata.layers"):
        load_census_scvi(folder, query, gene_id_column="ensembl_id", layer="counts")


def test_folder_without_model_pt(tmp_path, census_layout):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        ValueError, match="is not an scVI model folder: it has no model.pt.*notes.txt"
    ):
        load_census_scvi(tmp_path, census_layout[2])


def test_model_pt_that_is_not_scvi(tmp_path, census_layout):
    torch.save({"weights": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is not an scVI model file: expected the keys"):
        load_census_scvi(tmp_path, census_layout[2])


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_census_scvi(tmp_path / "absent", ad.AnnData(np.zeros((2, 2))))
