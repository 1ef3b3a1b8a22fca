import re

import anndata as ad
import numpy as np
import pandas as pd
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


def test_backed_query_is_read_in_chunks_of_rows(census_layout, loaded, tmp_path):
    folder, _, query = census_layout
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")  # scipy could not convert its X ("dtype object")
    with pytest.warns(UserWarning, match=r"6 of the model's 60 genes"):
        model = load_census_scvi(folder, backed, gene_id_column="ensembl_id")
    assert (sp.csr_matrix(model.adata.X) != sp.csr_matrix(loaded.adata.X)).nnz == 0
    pd.testing.assert_frame_equal(model.adata.var, loaded.adata.var)
    backed.file.close()


def test_query_is_not_modified(census_layout):
    folder, _, query = census_layout
    query = query.copy()
    query.uns["params"] = {"n_neighbors": 15}
    query.uns["vector"] = np.zeros(3)
    before = query.copy()
    with pytest.warns(UserWarning, match="zero-filled"):
        model = load_census_scvi(folder, query, gene_id_column="ensembl_id", reference_batch=None)
    # the model's copy holds no object of the query's: editing it leaves the query as it was
    model.adata.uns["params"]["n_neighbors"] = 99
    model.adata.uns["vector"][0] = 7.0
    assert query.uns["params"] == {"n_neighbors": 15}
    np.testing.assert_array_equal(query.uns["vector"], np.zeros(3))
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


def test_integer_reference_batch_empty_query_and_obsm_types(census_layout):
    folder, _, query = census_layout
    with pytest.raises(ValueError, match=r"reference_batch \[0\] is not a batch.*dsA_10x"):
        load_census_scvi(folder, query, gene_id_column="ensembl_id", reference_batch=0)
    with pytest.raises(ValueError, match="adata has no cells; pass the query cells to probe"):
        load_census_scvi(folder, query[:0].copy(), gene_id_column="ensembl_id")
    rich = query.copy()
    rich.obsm["sparse"] = sp.random(rich.n_obs, 3, density=0.5, format="csr", random_state=0)
    rich.obsm["frame"] = pd.DataFrame(np.ones((rich.n_obs, 2)), index=rich.obs_names, columns=["CD3", "CD4"])
    with pytest.warns(UserWarning, match="zero-filled"):
        model = load_census_scvi(folder, rich, gene_id_column="ensembl_id")
    assert sp.issparse(model.adata.obsm["sparse"])
    assert (model.adata.obsm["sparse"] != rich.obsm["sparse"]).nnz == 0
    assert list(model.adata.obsm["frame"].columns) == ["CD3", "CD4"]


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


# --- load_scvi_model: the general safe loader ---------------------------------------------

from perturbscope.probe import axis_alignment_scores, load_model_file, load_scvi_model  # noqa: E402


def test_general_loader_keeps_the_query_batches(census_layout):
    folder, trained, _ = census_layout
    query = trained.adata[:30].copy()
    model = load_scvi_model(folder, query)
    assert list(model.adata.obs["batch"]) == list(query.obs["batch"])
    np.testing.assert_allclose(
        model.get_latent_representation(), trained.get_latent_representation(query), atol=1e-5
    )
    assert model.history_.keys() == trained.history_.keys()


def test_general_loader_without_adata(census_layout):
    folder, trained, _ = census_layout
    model = load_scvi_model(folder)
    assert model.adata.n_obs == 1
    with pytest.raises(ValueError, match=re.escape(  # not a Jacobian of the all-zero placeholder cell
            "the model was loaded without cells (its one cell is an all-zero placeholder): pass adata or z")):
        decoder_jacobian(model, progress_bar=False)
    assert list(model.adata.var_names) == list(trained.adata.var_names)
    z = np.zeros((3, 5), dtype=np.float32)
    np.testing.assert_allclose(
        decoder_jacobian(model, z=z, progress_bar=False),
        decoder_jacobian(
            trained, z=z, transform_batch=model.probe_reference_batches_, progress_bar=False
        ),
        rtol=1e-5,
        atol=1e-7,
    )


def test_general_loader_refuses_unknown_query_batches(census_layout):
    folder, trained, _ = census_layout
    query = trained.adata[:4].copy()
    query.obs["batch"] = "new_lab"
    with pytest.raises(
        ValueError,
        match=r"adata.obs\['batch'\] holds batches the model was not "
        r"trained on: \['new_lab'\]",
    ):
        load_scvi_model(folder, query)


def _rewrite(folder, tmp_path, change):
    payload = load_model_file(folder / "model.pt")
    change(payload)
    target = tmp_path / "edited"
    target.mkdir()
    torch.save(payload, target / "model.pt")
    return target


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda p: p["attr_dict"]["registry_"].update(model_name="TOTALVI"),
            r"holds a 'TOTALVI' model; this loader reads \['SCVI'\] models",
        ),
        (
            lambda p: p["attr_dict"]["registry_"].update(setup_method_name="setup_mudata"),
            r"the registry's setup_method_name is 'setup_mudata'; only 'setup_anndata'",
        ),
        (
            lambda p: p["attr_dict"]["registry_"]["setup_args"].update(rna_layer="counts"),
            r"setup argument 'rna_layer' is not a parameter of SCVI.setup_anndata",
        ),
        (
            lambda p: p["attr_dict"]["init_params_"]["non_kwargs"].update(n_latent=10**6),
            r"init parameter n_latent=1000000 is outside 1..1024, perturbscope's cap",
        ),
        (
            lambda p: p["attr_dict"]["init_params_"]["non_kwargs"].update(
                n_hidden=4096, n_layers=64
            ),
            r"the model would have about .* weights \(n_hidden=4096, n_layers=64.*over the cap of 5e\+08",
        ),
        (
            lambda p: p["attr_dict"]["init_params_"]["kwargs"].update(x={"registry": {}}),
            r"init parameter 'registry' is not a parameter of scvi.model.SCVI or its module",
        ),
        (
            lambda p: p["attr_dict"]["init_params_"]["kwargs"].update(x={"var_activation": "exp"}),
            r"init parameter 'var_activation' is not a parameter",
        ),
        (
            lambda p: p.update(var_names=np.array([f"g{i}" for i in range(200_001)])),
            r"the model has 200001 genes .*; perturbscope reads models with 1 to 200000 genes",
        ),
        (
            lambda p: p.update(var_names=np.array(["g0", "g1"])),
            r"the registry records 60 genes but var_names has 2",
        ),
        (
            lambda p: p["model_state_dict"].update(
                {"z_encoder.mean_encoder.weight": torch.zeros(3, 3)}
            ),
            r"the saved weights do not fit the model its init parameters describe",
        ),
        (
            lambda p: p["attr_dict"].pop("registry_"),
            r"the attr_dict has neither 'registry_' nor 'scvi_setup_dict_'",
        ),
    ],
)
def test_file_never_chooses_the_code_or_sizes(census_layout, tmp_path, change, match):
    folder, trained, _ = census_layout
    with pytest.raises(ValueError, match=match):
        load_scvi_model(_rewrite(folder, tmp_path, change), trained.adata[:5].copy())


def test_registry_without_setup_method_name_and_obsolete_init_params(census_layout, tmp_path):
    folder, trained, _ = census_layout

    def old(payload):
        payload["attr_dict"]["registry_"].pop("setup_method_name", None)
        payload["attr_dict"]["init_params_"]["non_kwargs"]["use_gpu"] = None

    model = load_scvi_model(_rewrite(folder, tmp_path, old), trained.adata[:5].copy())
    assert model.is_trained_


def test_legacy_scvi_0_14_folder_layout(census_layout, tmp_path):
    """``model_params.pt`` + ``var_names.csv`` + ``attr.pkl`` with an ``_scvi`` setup dict."""
    import pickle

    folder, trained, _ = census_layout
    payload = load_model_file(folder / "model.pt")
    registry = payload["attr_dict"]["registry_"]
    batches = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    setup_dict = {
        "scvi_version": "0.14.6",
        "categorical_mappings": {
            "_scvi_batch": {"original_key": "batch", "mapping": batches},
            "_scvi_labels": {"original_key": "_scvi_labels", "mapping": np.array([0])},
        },
        "data_registry": {
            "X": {"attr_name": "X", "attr_key": None},
            "batch_indices": {"attr_name": "obs", "attr_key": "_scvi_batch"},
            "labels": {"attr_name": "obs", "attr_key": "_scvi_labels"},
        },
        "summary_stats": {"n_batch": len(batches), "n_cells": 200, "n_vars": 60, "n_labels": 1},
    }
    attr = {k: v for k, v in payload["attr_dict"].items() if k != "registry_"}
    attr["scvi_setup_dict_"] = setup_dict
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(payload["model_state_dict"], legacy / "model_params.pt")
    (legacy / "var_names.csv").write_text("\n".join(payload["var_names"]) + "\n")
    (legacy / "attr.pkl").write_bytes(pickle.dumps(attr, protocol=2))
    query = trained.adata[:20].copy()
    model = load_scvi_model(legacy, query)
    np.testing.assert_allclose(
        model.get_latent_representation(), trained.get_latent_representation(query), atol=1e-5
    )


def test_legacy_attr_pkl_payload_is_refused(tmp_path, capfd):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({}, tmp_path / "model_params.pt")
    (tmp_path / "var_names.csv").write_text("a\n")
    (tmp_path / "attr.pkl").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ValueError, match=r"refusing to load .*attr\.pkl.*`builtins\.print`"):
        load_scvi_model(tmp_path)
    assert "pwned" not in capfd.readouterr().out


# --- a real published model: scArches' pancreas SCVI (scvi-tools 0.16.1, pandas 1.x) ----------


@pytest.fixture(scope="module")
def pancreas_dir(shared_data):
    folder = shared_data / "models" / "scarches_pancreas_scvi"
    if not (folder / "model.pt").is_file():
        pytest.skip(f"{folder / 'model.pt'} is absent from the real data folder")
    return folder


def test_real_pancreas_model_loads_and_probes(pancreas_dir):
    placeholder = load_scvi_model(pancreas_dir)
    genes = list(placeholder.adata.var_names)
    assert len(genes) == 1000
    assert placeholder.module.n_latent == 10
    assert placeholder.probe_reference_batches_ == [
        "Pancreas CelSeq",
        "Pancreas Fluidigm C1",
        "Pancreas inDrop",
    ]
    assert placeholder.history_["elbo_train"].index.dtype == np.int64  # was an Int64Index
    jac = decoder_jacobian(
        placeholder, z=np.zeros((2, 10), np.float32), genes=genes[:4], progress_bar=False
    )
    assert jac.shape == (2, 4, 10)
    assert np.isfinite(jac).all()

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.5, (60, 1000)).astype(np.float32)
    counts[30:, :20] = rng.poisson(8.0, (30, 20))  # a 'stimulated' programme on 20 genes
    query = ad.AnnData(sp.csr_matrix(counts))
    query.var_names = genes
    query.obs["condition"] = ["control"] * 30 + ["stimulated"] * 30
    query.obs["study"] = "Pancreas inDrop"
    model = load_scvi_model(pancreas_dir, query, reference_batch="Pancreas inDrop")
    assert not model.module.training
    jac = decoder_jacobian(model, genes=genes[:5], progress_bar=False)
    assert jac.shape == (60, 5, 10)
    assert np.isfinite(jac).all()
    assert np.abs(jac).sum() > 0
    table = axis_alignment_scores(
        model, model.adata, "condition", "control", "stimulated", n_cells=20, progress_bar=False
    )
    assert len(table) == 1000
    assert table["probe_alignment"].between(-1, 1).all()
    # the 20 up-regulated genes align with the control-to-stimulated axis more than the rest
    programme = table["probe_alignment"].index.isin(genes[:20])
    assert table["probe_alignment"][programme].mean() > table["probe_alignment"][~programme].mean()
