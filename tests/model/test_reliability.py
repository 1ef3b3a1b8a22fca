"""Bad input is refused where it enters, with the documented exception type and message.

One test per mistake a user can make at setup, construction, prediction or loading. Each asserts
the type *and* the wording, and, where setup raised, that the user's AnnData was left as it was
(no ``_scvi_*`` obs columns, no ``_scopevi_*`` obsm entries). One tiny model, trained for one
epoch on log-normalised data (``gene_likelihood="normal"``), is shared by the module.
"""

from __future__ import annotations

import os
import re
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

import perturbscope as ps
from perturbscope.data import log1p_normalized, simulate_perturbseq
from perturbscope.embeddings import read_gene_embeddings

CONTROL = "control"


def _screen(seed: int = 0):
    """``(counts AnnData, embeddings)``: 90 cells, 30 genes, 4 singles and 1 double, 2 cell types."""
    return simulate_perturbseq(
        n_genes=30, n_perturbed_genes=4, n_combinations=1, n_cells_per_condition=5,
        embedding_dim=8, seed=seed,
    )


def _log_normalized(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.X = log1p_normalized(out)
    return out


def _setup(adata, embeddings, **kwargs):
    kwargs.setdefault("context_key", "cell_type")
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, **kwargs)


def _snapshot(adata: ad.AnnData) -> tuple:
    return list(adata.obs.columns), adata.obs.copy(), sorted(adata.obsm.keys())


def _assert_unchanged(adata: ad.AnnData, before: tuple) -> None:
    columns, obs, obsm_keys = before
    assert list(adata.obs.columns) == columns
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert sorted(adata.obsm.keys()) == obsm_keys


@pytest.fixture
def screen():
    """A fresh counts screen and its embeddings, never set up."""
    return _screen()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(model, fresh log-normalised AnnData, counts AnnData, embeddings, saved folder)``."""
    scvi.settings.seed = 0
    counts, embeddings = _screen()
    fresh = _log_normalized(counts)
    adata = fresh.copy()
    _setup(adata, embeddings)
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, gene_likelihood="normal")
    model.train(max_epochs=1, enable_progress_bar=False)
    folder = tmp_path_factory.mktemp("reliability") / "model"
    model.save(str(folder), overwrite=True)
    return model, fresh, counts, embeddings, folder


def _controls(adata: ad.AnnData) -> ad.AnnData:
    return adata[adata.obs["perturbation"] == CONTROL].copy()


def _tampered_copy(folder, tmp_path, edit) -> os.PathLike:
    """A copy of a saved model whose registry was edited by ``edit(registry)`` (our own file)."""
    target = tmp_path / "tampered"
    shutil.copytree(folder, target)
    path = target / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=False)  # our own test file
    edit(payload["attr_dict"]["registry_"])
    torch.save(payload, path)
    return target


# ---------------------------------------------------------------- expression matrix
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_x_normal_refused_at_construction(screen, bad):
    counts, embeddings = screen
    adata = _log_normalized(counts)
    adata.X = adata.X.toarray()
    adata.X[3, 2] = bad
    adata.X[5, 7] = bad
    _setup(adata, embeddings)
    with pytest.raises(ValueError, match=r"^adata\.X has NaN or infinite values in 2 entries; every value must be finite\.$"):
        ps.ScopeVI(adata, n_latent=4, n_hidden=16, gene_likelihood="normal")


def test_raw_counts_to_normal_model_predict(trained):
    model, _, counts, _, _ = trained
    raw = _controls(counts)
    with pytest.raises(ValueError, match=r"^adata\.X looks like raw counts \(integers up to \d+\), but the model was "
                       r"trained on log-normalised values \(gene_likelihood='normal'\); pass log1p-normalised"):
        model.predict(raw, ["G00"])


def test_raw_counts_to_a_normal_model_are_refused_at_construction(screen):
    adata, embeddings = screen
    _setup(adata, embeddings)
    with pytest.raises(ValueError, match=r"^adata\.X looks like raw counts \(integers up to \d+\)"):
        ps.ScopeVI(adata, n_latent=4, n_hidden=16, gene_likelihood="normal")


def test_backed_log_normalised_controls_are_checked_chunk_by_chunk(trained, tmp_path):
    """The raw-counts check reads a backed matrix row chunk by row chunk (it raised a TypeError)."""
    model, fresh, counts, _, _ = trained
    _controls(fresh).write_h5ad(tmp_path / "log.h5ad")
    backed = ad.read_h5ad(tmp_path / "log.h5ad", backed="r")
    assert model.predict(backed, ["G00"], aggregate="mean").n_obs >= 1
    _controls(counts).write_h5ad(tmp_path / "raw.h5ad")
    with pytest.raises(ValueError, match=r"^adata\.X looks like raw counts"):
        model.predict(ad.read_h5ad(tmp_path / "raw.h5ad", backed="r"), ["G00"])


# ---------------------------------------------------------------- names and storage
def test_duplicate_var_names(screen):
    adata, embeddings = screen
    names = adata.var_names.tolist()
    names[5] = names[4]
    adata.var_names = names
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=rf"^adata\.var_names has duplicates \['{names[4]}'\]; make them unique, "
                       r"e\.g\. with adata\.var_names_make_unique\(\)\.$"):
        _setup(adata, embeddings)
    _assert_unchanged(adata, before)


def test_duplicate_obs_names(screen):
    adata, embeddings = screen
    names = adata.obs_names.tolist()
    names[1] = names[0]
    adata.obs_names = names
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=rf"^adata\.obs_names has duplicates \['{names[0]}'\]; make them unique, "
                       r"e\.g\. with adata\.obs_names_make_unique\(\)\.$"):
        _setup(adata, embeddings)
    _assert_unchanged(adata, before)


def test_backed_anndata(screen, tmp_path):
    """A backed AnnData is set up for streaming: only the documented setup keys, in memory; the file is untouched."""
    adata, embeddings = screen
    adata.uns.pop("simulation", None)  # nested ground truth is irrelevant here
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    on_disk = path.read_bytes()
    backed = ad.read_h5ad(path, backed="r")
    try:
        columns, obs, obsm_keys = _snapshot(backed)
        _setup(backed, embeddings)
        assert backed.isbacked
        assert isinstance(backed.X, ad.abc.CSRDataset)
        assert list(backed.obs.columns) == [*columns, "_scvi_context", "_scvi_batch"]
        pd.testing.assert_frame_equal(backed.obs[columns], obs)
        assert sorted(backed.obsm.keys()) == sorted([*obsm_keys, "_scopevi_perturbation_genes"])
        assert {"_scvi_uuid", "_scvi_manager_uuid"} <= set(backed.uns)
    finally:
        backed.file.close()
    assert path.read_bytes() == on_disk  # setup writes to the in-memory obs/obsm/uns only


# ---------------------------------------------------------------- labels
def test_only_control_cells(screen):
    adata, embeddings = screen
    adata = _controls(adata)
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=r"^adata\.obs\['perturbation'\] holds only control cells \('control'\); "
                       r"ScopeVI needs perturbed cells .*load_query_data"):
        _setup(adata, embeddings)
    _assert_unchanged(adata, before)


def test_no_cells_or_no_genes_are_named_at_setup(screen):
    """An empty AnnData was told it held only controls; one without genes trained."""
    adata, embeddings = screen
    with pytest.raises(ValueError, match=r"^adata has no cells\.$"):
        _setup(adata[:0].copy(), embeddings)
    with pytest.raises(ValueError, match=re.escape("adata has no genes (features); the model needs expression")):
        _setup(adata[:, :0].copy(), embeddings)


def test_cells_without_counts_are_named_at_construction(screen, tmp_path):
    """They failed inside train(), and a backed file named them by their row within a chunk."""
    adata, embeddings = screen
    counts = adata.X.toarray()
    counts[[5, 40]] = 0
    adata.X = sp.csr_matrix(counts)
    names = [adata.obs_names[5], adata.obs_names[40]]
    _setup(adata, embeddings)
    message = re.escape(f"adata.X has 2 cells without counts ({names})")
    with pytest.raises(ValueError, match=message):
        ps.ScopeVI(adata, n_latent=4, n_hidden=16)
    fresh = adata.copy()
    fresh.write_h5ad(tmp_path / "zero.h5ad")
    backed = ad.read_h5ad(tmp_path / "zero.h5ad", backed="r")
    _setup(backed, embeddings)
    with pytest.raises(ValueError, match=message):
        ps.ScopeVI(backed, n_latent=4, n_hidden=16)


def test_nan_perturbation_label(screen):
    adata, embeddings = screen
    labels = adata.obs["perturbation"].astype(object)
    labels.iloc[[7, 50]] = np.nan
    adata.obs["perturbation"] = labels
    first = [str(adata.obs_names[7]), str(adata.obs_names[50])]
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=re.escape(
        f"adata.obs['perturbation'] (perturbation_key) has 2 missing labels (first cells: {first}); label every cell."
    )):
        _setup(adata, embeddings)
    _assert_unchanged(adata, before)


def test_nan_context_label(screen):
    adata, embeddings = screen
    contexts = adata.obs["cell_type"].copy()
    contexts.iloc[11] = np.nan
    adata.obs["cell_type"] = contexts
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=re.escape(
        f"adata.obs['cell_type'] (context_key) has 1 missing labels (first cells: ['{adata.obs_names[11]}'])"
    )):
        _setup(adata, embeddings)
    _assert_unchanged(adata, before)


def test_int_perturbation_column_with_int_control(screen):
    adata, embeddings = screen
    adata.obs["perturbation"] = adata.obs["perturbation"].cat.codes.astype(int)  # control is code 0
    before = _snapshot(adata)
    with pytest.raises(TypeError, match=re.escape(
        "control_value must be a string label, got int 0; convert the column first: "
        "adata.obs['perturbation'] = adata.obs['perturbation'].astype(str), and pass control_value='0'."
    )):
        _setup(adata, embeddings, control_value=0)
    _assert_unchanged(adata, before)


# ---------------------------------------------------------------- gene embeddings at setup
def test_embeddings_without_columns(screen):
    adata, embeddings = screen
    empty = pd.DataFrame(index=embeddings.index)
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=r"^gene_embeddings is empty: shape \(\d+, 0\); expected at least one gene "
                       r"and one dimension\.$"):
        _setup(adata, empty)
    _assert_unchanged(adata, before)


@pytest.mark.parametrize("kind", ["numeric strings", "booleans"])
def test_embeddings_non_numeric_columns(screen, kind):
    adata, embeddings = screen
    bad = embeddings.astype(str) if kind == "numeric strings" else embeddings > 0
    before = _snapshot(adata)
    with pytest.raises(TypeError, match=r"^gene_embeddings has non-numeric columns \[.*\]; expected one float "
                       r"column per dimension with the genes in the index\.$"):
        _setup(adata, bad)
    _assert_unchanged(adata, before)


# ---------------------------------------------------------------- predict arguments
def test_every_method_taking_an_anndata_refuses_genes_in_another_order(trained):
    """scvi-tools compares only the number of genes; reversed genes gave another latent (0.41 apart)."""
    model, fresh, _, _, _ = trained
    controls = _controls(fresh)
    reversed_genes = controls[:, controls.var_names[::-1]].copy()
    message = re.escape("adata.var_names differ from the model's 30 genes (0 missing, 0 extra: same genes in "
                        "another order); subset and order it as adata[:, model.var_names].")
    with pytest.raises(ValueError, match=message):
        model.get_latent_representation(reversed_genes)
    with pytest.raises(ValueError, match=message):
        ps.tl.scopevi_latent(model, reversed_genes)
    assert "X_scopevi" not in reversed_genes.obsm


def test_predict_bare_string(trained):
    model, fresh, *_ = trained
    with pytest.raises(TypeError, match=re.escape(
        "perturbations must be a list of labels, got the string 'G00'; pass ['G00']."
    )):
        model.predict(_controls(fresh), "G00")


def test_predict_repeated_label(trained):
    """A label asked twice is an error (predictions are keyed by label and context)."""
    model, fresh, *_ = trained
    with pytest.raises(ValueError, match=re.escape(
        "perturbations holds labels more than once: ['G00']; give each label once."
    )):
        model.predict(_controls(fresh), ["G00", "G01", "G00"])
    # one perturbation under two names would be predicted twice
    with pytest.raises(ValueError, match=re.escape(
        "perturbations writes one perturbation in more than one way: [['G00+G01', 'G01+G00'], ['G02', "
        "'G02+control']]; give each perturbation once."
    )):
        model.predict(_controls(fresh), ["G00+G01", "G01+G00", "G02", "G02+control"])


def test_predict_refuses_anchors_with_one_name(trained):
    """obs["control_cell"] names each prediction's anchor: two anchors of one name could not be told apart."""
    model, fresh, *_ = trained
    controls = _controls(fresh).copy()
    controls.obs_names = [controls.obs_names[0]] * 2 + list(controls.obs_names[2:])
    with pytest.raises(ValueError, match=re.escape(
            f"adata_control.obs_names has duplicates ['{controls.obs_names[0]}']; make them unique, e.g. with "
            "adata_control.obs_names_make_unique().")):
        model.predict(controls, ["G00"])
    # mean rows name no anchor: concatenated lanes that repeat barcodes still predict
    assert model.predict(controls, ["G00"], aggregate="mean").n_obs == 2  # one row per cell type


def test_predict_zero_samples(trained):
    model, fresh, *_ = trained
    with pytest.raises(ValueError, match=r"^n_samples must be a positive integer, got 0\.$"):
        model.predict(_controls(fresh), ["G00"], n_samples=0)


def test_predict_zero_batch_size(trained):
    model, fresh, *_ = trained
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer or None, got 0\.$"):
        model.predict(_controls(fresh), ["G00"], batch_size=0)


def test_predict_refuses_the_control_label(trained):
    """The control label would be answered as an unseen gene (a non-zero change)."""
    model, fresh, *_ = trained
    with pytest.raises(ValueError, match=re.escape(
            "perturbations ['control'] are the control label: the control cells are the anchors")):
        model.predict(_controls(fresh), ["G00", "control"], aggregate="mean")


def test_predict_refuses_missing_contexts_and_unfitted_levels_before_running(trained, tmp_path):
    model, fresh, *_ = trained
    controls = _controls(fresh)
    column = model._context_column
    controls.obs[column] = controls.obs[column].astype(object)
    controls.obs.iloc[:3, controls.obs.columns.get_loc(column)] = np.nan
    with pytest.raises(ValueError, match=re.escape(f"adata_control.obs[{column!r}] has 3 missing values")):
        model.predict(controls, ["G00"], aggregate="mean")
    out = tmp_path / "pred.h5ad"
    with pytest.raises(ValueError, match=re.escape("interval_levels [0.9] were not fitted; the model's levels are [0.8, 0.95].")):
        model.predict(_controls(fresh), ["G00"], aggregate="mean", out=out, interval_levels=(0.9,))
    assert not out.exists()  # refused before anything was written


def test_predict_without_the_label_column_says_every_cell_is_taken_as_a_control(trained):
    model, fresh, *_ = trained
    controls = _controls(fresh)
    del controls.obs["perturbation"]
    with pytest.warns(UserWarning, match="adata_control.obs has no column 'perturbation': every cell is taken"):
        model.predict(controls, ["G00"], aggregate="mean")


# ---------------------------------------------------------------- query and load
def test_query_context_without_controls(trained):
    model, fresh, *_ = trained
    query = fresh.copy()
    new = (query.obs["cell_type"] == "type_1").to_numpy()
    query.obs["cell_type"] = np.where(new, "type_new", query.obs["cell_type"].astype(str))
    query = query[~(new & (query.obs["perturbation"] == CONTROL).to_numpy())].copy()
    before = _snapshot(query)
    with pytest.raises(ValueError, match=r"^No control cells \(perturbation == 'control'\) in context .*type_new.* of "
                       r"\['cell_type'\]; every context needs control cells to anchor predictions\.$"):
        ps.ScopeVI.load_query_data(query, model)
    _assert_unchanged(query, before)


def test_load_refuses_other_setup_method(trained, tmp_path, monkeypatch):
    _, fresh, _, _, folder = trained
    tampered = _tampered_copy(folder, tmp_path, lambda r: r.__setitem__("setup_method_name", "save"))
    calls = []
    monkeypatch.setattr(ps.ScopeVI, "save", lambda *a, **k: calls.append((a, k)))
    adata = fresh.copy()
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=re.escape(
        f"{tampered / 'model.pt'} names the setup method 'save'; only ['setup_anndata', 'setup_mudata'] are allowed."
    )):
        ps.ScopeVI.load(tampered, adata)
    assert calls == []  # the named method never ran
    _assert_unchanged(adata, before)


def test_load_refuses_unknown_setup_args(trained, tmp_path):
    _, fresh, _, _, folder = trained
    tampered = _tampered_copy(folder, tmp_path, lambda r: r["setup_args"].__setitem__("bogus_key", 1))
    adata = fresh.copy()
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=re.escape(
        f"{tampered / 'model.pt'} passes arguments ['bogus_key'] that ScopeVI.setup_anndata does not take."
    )):
        ps.ScopeVI.load(tampered, adata)
    _assert_unchanged(adata, before)


@pytest.mark.parametrize("name", [
    "predict",            # a method replaced by an allow-listed class
    "_check_if_trained",  # a private hook
    "history_",           # a data name given a callable
])
def test_load_refuses_attributes_that_would_choose_code(trained, tmp_path, name):
    import collections

    _, fresh, _, _, folder = trained
    target = tmp_path / "tampered_attrs"
    shutil.copytree(folder, target)
    path = target / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=False)  # our own test file
    payload["attr_dict"][name] = collections.OrderedDict
    torch.save(payload, path)
    with pytest.raises(ValueError, match=re.escape(
            f"the saved model sets the attribute {name!r}, which is not a data attribute")):
        ps.ScopeVI.load(target, fresh.copy())


@pytest.mark.parametrize("payload", [[1], {"a": 1}, {"model_state_dict": {}, "var_names": [], "attr_dict": {"registry_": [1]}}])
def test_load_names_a_file_that_is_not_a_saved_model(tmp_path, trained, payload):
    _, fresh, *_ = trained
    (tmp_path / "bad").mkdir()
    torch.save(payload, tmp_path / "bad" / "model.pt")
    with pytest.raises(ValueError, match=re.escape("is not a saved model")):
        ps.ScopeVI.load(tmp_path / "bad", fresh.copy())


def test_load_unseen_context(trained):
    _, fresh, _, _, folder = trained
    adata = fresh.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories({"type_1": "type_new"})
    with pytest.raises(ValueError, match=r"^adata has categories the saved model was not trained on \(.*\)\. A saved "
                       r"model predicts only the categories it was trained on; for a new context or batch use "
                       r"ScopeVI\.load_query_data\(adata, model\) and fine-tune\.$"):
        ps.ScopeVI.load(folder, adata)


def test_load_unseen_context_leaves_adata_unchanged(trained):
    _, fresh, _, _, folder = trained
    adata = fresh.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories({"type_1": "type_new"})
    before = _snapshot(adata)
    with pytest.raises(ValueError, match="load_query_data"):
        ps.ScopeVI.load(folder, adata)
    _assert_unchanged(adata, before)


def test_load_query_data_from_a_saved_folder_with_a_new_context(trained):
    """A saved reference is read onto a query with a new context, as the in-memory one is."""
    model, fresh, _, _, folder = trained
    query = fresh[fresh.obs["cell_type"] == "type_1"].copy()
    query.obs["cell_type"] = query.obs["cell_type"].cat.rename_categories({"type_1": "type_new"})
    before = _snapshot(model.adata)
    transfer = ps.ScopeVI.load_query_data(query, folder)
    contexts = transfer.adata_manager.get_state_registry("context").categorical_mapping
    assert list(contexts) == ["type_0", "type_1", "type_new"]
    assert transfer.effect_prior_state_ is not None
    in_memory = ps.ScopeVI.load_query_data(query.copy(), model)
    for key, value in in_memory.module.state_dict().items():
        torch.testing.assert_close(transfer.module.state_dict()[key], value, msg=key)
    _assert_unchanged(model.adata, before)


def test_load_unknown_keyword(trained):
    _, fresh, _, _, folder = trained
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'unknown_kw'"):
        ps.ScopeVI.load(folder, fresh.copy(), unknown_kw=1)


# ---------------------------------------------------------------- embedding files
class _MkdirPayload:
    """Unpickling this would create a folder: proof that a reader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_read_pt_with_pickled_object(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "emb.pt"
    torch.save({"G00": _MkdirPayload(marker)}, path)
    with pytest.raises(ValueError, match=re.escape(
        f"Could not read {str(path)!r} as a torch file holding {{gene: 1-D tensor}}"
    )) as info:
        read_gene_embeddings(path)
    assert "weights_only=False" not in str(info.value)
    assert info.value.__cause__ is None  # torch's advice is not chained in either
    assert info.value.__suppress_context__
    assert not marker.exists()


def test_read_npz_with_object_array(tmp_path):
    path = tmp_path / "emb.npz"
    np.savez(path, genes=np.array(["G00", "G01"], dtype=object), embeddings=np.ones((2, 3)))
    with pytest.raises(ValueError, match=re.escape(
        f"{str(path)!r} holds object arrays, which would need unpickling; store 'genes' and 'columns' as string "
        "arrays and 'embeddings' as a numeric array."
    )):
        read_gene_embeddings(path)
