import re

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import perturbscope as ps
from perturbscope.data import log1p_normalized, pseudobulk


@pytest.fixture
def screen(small_screen):
    adata, embeddings = small_screen
    return adata.copy(), embeddings.copy()


def _setup(adata, embeddings, **kwargs):
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type", **kwargs)


def _controls(adata):
    return adata[adata.obs["perturbation"] == "control"].copy()


@pytest.fixture(scope="module")
def trained(small_screen):
    scvi.settings.seed = 0
    adata, embeddings = small_screen
    adata = adata.copy()
    _setup(adata, embeddings)
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=32)
    model.train(max_epochs=3, enable_progress_bar=False)
    return model, adata, embeddings


# ---------------------------------------------------------------- setup and registry
def test_setup_writes_only_documented_keys(screen):
    adata, embeddings = screen
    obs_before, X_before = set(adata.obs.columns), adata.X.copy()
    _setup(adata, embeddings)
    assert set(adata.obs.columns) - obs_before == {"_scvi_context", "_scvi_batch"}
    assert set(adata.obsm) == {"_scopevi_perturbation_genes"}
    assert set(adata.uns) - {"simulation"} == {"_scvi_uuid", "_scvi_manager_uuid"}
    assert (X_before != adata.X).nnz == 0
    genes = adata.obsm["_scopevi_perturbation_genes"]
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    assert (genes[labels == "control"] == -1).all()
    first_double = next(label for label in labels if "+" in label)
    a, b = first_double.split("+")
    row = genes[np.flatnonzero(labels == first_double)[0]]
    assert embeddings.index[row].tolist() == [a, b]


def test_setup_control_value_missing(screen):
    adata, embeddings = screen
    with pytest.raises(ValueError, match=r"control_value 'ctrl' not found in adata.obs\['perturbation'\]\. Values found: 'control'"):
        ps.ScopeVI.setup_anndata(adata, "perturbation", control_value="ctrl", gene_embeddings=embeddings)


def test_setup_refuses_one_perturbation_under_two_labels(screen):
    """"control " and "control", or "A+B" and "B+A", would train as one perturbation but be listed,
    predicted and anchored as two."""
    adata, embeddings = screen
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    labels[np.flatnonzero(labels == "control")[:3]] = "control "
    adata.obs["perturbation"] = labels
    with pytest.raises(ValueError, match=re.escape(
            "adata.obs['perturbation'] writes the same perturbation in more than one way: ['control', 'control ']")):
        ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings)
    assert "_scvi_uuid" not in adata.uns


def test_setup_on_a_view_says_which_object_to_copy(screen):
    adata, embeddings = screen
    with pytest.raises(ValueError, match=re.escape(
            "adata is a view of another AnnData; setup registers keys in it, so make it a copy first: "
            "adata = adata.copy().")):
        ps.ScopeVI.setup_anndata(adata[:50], "perturbation", gene_embeddings=embeddings)


def test_setup_missing_perturbation_key(screen):
    adata, embeddings = screen
    with pytest.raises(KeyError, match="perturbation_key 'guide' not found in adata.obs"):
        ps.ScopeVI.setup_anndata(adata, "guide", gene_embeddings=embeddings)


def test_setup_genes_missing_from_embeddings(screen):
    adata, embeddings = screen
    dropped = embeddings.index[:2].tolist()
    with pytest.raises(KeyError, match=rf"Perturbed genes missing from gene_embeddings: \['{dropped[0]}', '{dropped[1]}'\]"):
        _setup(adata, embeddings.drop(index=dropped))


def test_setup_rejects_non_finite_embeddings(screen):
    adata, embeddings = screen
    embeddings.iloc[3, 0] = np.nan
    with pytest.raises(ValueError, match=rf"NaN or infinite values for genes \['{embeddings.index[3]}'\]"):
        _setup(adata, embeddings)


def test_context_without_controls(screen):
    adata, embeddings = screen
    keep = ~((adata.obs["cell_type"] == "type_1") & (adata.obs["perturbation"] == "control"))
    adata = adata[keep].copy()
    with pytest.raises(ValueError, match=r"No control cells \(perturbation == 'control'\) in context 'type_1'"):
        _setup(adata, embeddings)


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1.0, "negative values"), (0.5, "non-integer values"), (np.nan, "NaN or inf values"), (np.inf, "NaN or inf values")],
)
def test_count_likelihood_rejects_bad_counts(screen, value, message):
    adata, embeddings = screen
    counts = adata.X.toarray()
    counts[0, 0] = value
    adata.layers["counts"] = sparse.csr_matrix(counts)
    _setup(adata, embeddings, layer="counts")
    with pytest.raises(ValueError, match=rf"adata.layers\['counts'\] has {message}"):
        ps.ScopeVI(adata, gene_likelihood="nb")


def test_prediction_records_the_layer_it_read(screen):
    """The prediction's provenance names the layer the model was set up with (plots read it)."""
    adata, embeddings = screen
    adata.layers["counts"] = adata.X.copy()
    _setup(adata, embeddings, layer="counts")
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    controls = adata[adata.obs["perturbation"] == "control"]
    provenance = model.predict(controls, ["G00"], aggregate="mean").uns["perturbscope"]
    assert provenance["layer"] == "counts"
    assert provenance["perturbation_key"] == "perturbation"


def test_normal_likelihood_accepts_log_normalised(screen):
    adata, embeddings = screen
    adata.X = log1p_normalized(adata)
    _setup(adata, embeddings)
    model = ps.ScopeVI(adata, gene_likelihood="normal", n_latent=3, n_hidden=16)
    assert model.module.gene_likelihood == "normal"


def test_unknown_likelihood(screen):
    adata, embeddings = screen
    _setup(adata, embeddings)
    with pytest.raises(ValueError, match="gene_likelihood must be one of"):
        ps.ScopeVI(adata, gene_likelihood="gaussian")


def test_no_embeddings_uses_one_hot_with_warning(screen):
    adata, _ = screen
    with pytest.warns(UserWarning, match="one-hot embeddings"):
        ps.ScopeVI.setup_anndata(adata, "perturbation")
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=16)
    n_genes = len({g for p in adata.obs["perturbation"].astype(str) if p != "control" for g in p.split("+")})
    assert model.gene_embeddings.shape == (n_genes, n_genes)


# ---------------------------------------------------------------- prediction
def test_predict_layout_and_input_untouched(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)
    before = controls.copy()
    unseen = embeddings.index[-1]
    pred = model.predict(controls, [embeddings.index[0], f"{embeddings.index[0]}+{unseen}"], n_samples=2)
    assert pred.shape == (2 * 2 * controls.n_obs, adata.n_vars)
    assert pred.var_names.equals(adata.var_names)
    assert pred.obs["perturbation"].cat.categories.tolist() == [embeddings.index[0], f"{embeddings.index[0]}+{unseen}"]
    assert set(pred.obs.columns) >= {"perturbation", "control_cell", "sample", "cell_type"}
    first = pred.obs.iloc[: controls.n_obs]
    assert first["control_cell"].tolist() == controls.obs_names.tolist()
    assert (first["cell_type"].to_numpy() == controls.obs["cell_type"].to_numpy()).all()
    # X is on the count scale at the control cell's library size, consistent with log1p_norm
    # (negative log1p values, possible with the effect prior's additive shift, clip to 0 counts)
    library = np.asarray(controls.X.sum(axis=1)).ravel()
    rows = slice(0, controls.n_obs)
    np.testing.assert_allclose(pred.X[rows], np.clip(np.expm1(pred.layers["log1p_norm"][rows]), 0, None) / 1e4 * library[:, None],
                               rtol=1e-4, atol=1e-4)
    direct = model.predict(controls, [embeddings.index[0]], residual=False)
    np.testing.assert_allclose(direct.X.sum(axis=1), library, rtol=1e-3)
    assert (controls.X != before.X).nnz == 0
    assert controls.obs.equals(before.obs)
    assert list(controls.obsm) == list(before.obsm)
    assert pred.uns["perturbscope"]["model"] == "ScopeVI"


def test_predict_aggregate_mean_is_pseudobulk(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)
    perts = [embeddings.index[1], embeddings.index[2]]
    cells = model.predict(controls, perts, use_prior_mean=True)
    mean = model.predict(controls, perts, aggregate="mean", use_prior_mean=True)
    assert mean.obs["perturbation"].tolist() == [perts[0], perts[0], perts[1], perts[1]]
    assert mean.obs["n_cells"].tolist() == [controls.obs["cell_type"].value_counts()[t] for t in ["type_0", "type_1"]] * 2
    expected = pseudobulk(cells, ["perturbation", "cell_type"], layer="log1p_norm")
    np.testing.assert_allclose(mean.layers["log1p_norm"], expected.loc[list(zip(mean.obs["perturbation"], mean.obs["cell_type"]))].to_numpy(), rtol=1e-5)


def test_predict_is_seeded(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)[:20]
    saved = dict(model.cell_term_weights_)
    model.cell_term_weights_ = dict.fromkeys(saved, 1.0)  # the prior draws enter through this term
    try:
        a = model.predict(controls, [embeddings.index[0]], seed=3)
        b = model.predict(controls, [embeddings.index[0]], seed=3)
        c = model.predict(controls, [embeddings.index[0]], seed=4)
    finally:
        model.cell_term_weights_ = saved
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)
    # with the validated weights (0 where a kind could not be validated) the draws drop out
    d = model.predict(controls, [embeddings.index[0]], seed=4)
    kind = model.effect_prior.predict_shifts([embeddings.index[0]], "type_0").attrs["kinds"][0]
    assert model.cell_term_weights_[kind] == 0.0
    np.testing.assert_allclose(d.X, model.predict(controls, [embeddings.index[0]], seed=5).X)


def test_predict_different_perturbations_differ(trained):
    model, adata, embeddings = trained
    pred = model.predict(_controls(adata), embeddings.index[:4].tolist(), aggregate="mean", use_prior_mean=True)
    profiles = pred.layers["log1p_norm"]
    assert np.abs(profiles[0] - profiles[2]).max() > 1e-3


def test_predict_bad_inputs(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)
    with pytest.raises(ValueError, match=r"adata.var_names differ from the model's 60 genes \(1 missing, 0 extra"):
        model.predict(controls[:, 1:], [embeddings.index[0]])
    with pytest.raises(KeyError, match=r"Perturbed genes missing from gene_embeddings: \['NOTAGENE'\]"):
        model.predict(controls, ["NOTAGENE"])
    with pytest.raises(ValueError, match="adata_control must hold control cells only"):
        model.predict(adata, [embeddings.index[0]])
    with pytest.raises(ValueError, match="aggregate must be None or 'mean'"):
        model.predict(controls, [embeddings.index[0]], aggregate="median")
    shifted = controls.copy()
    shifted.X = shifted.X * 0.5
    with pytest.raises(ValueError, match=r"adata.X has non-integer values"):
        model.predict(shifted, [embeddings.index[0]])
    # an anchor without counts cannot be normalised: named on entry, whichever chunk it falls in
    empty = controls.copy()
    empty.X = empty.X.toarray() if hasattr(empty.X, "toarray") else empty.X.copy()
    empty.X[7] = 0
    with pytest.raises(ValueError, match=re.escape(f"adata.X has 1 cells without counts (['{empty.obs_names[7]}'])")):
        model.predict(empty, [embeddings.index[0]], batch_size=5)


def test_predict_unseen_context_zero_shot(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)
    controls.obs["cell_type"] = pd.Categorical(["new_line"] * controls.n_obs)
    pred = model.predict(controls, [embeddings.index[0]], aggregate="mean")
    assert pred.obs["cell_type"].tolist() == ["new_line"]


def test_save_load_identical_predictions(trained, tmp_path):
    model, adata, embeddings = trained
    controls = _controls(adata)
    perts = [embeddings.index[0], f"{embeddings.index[1]}+{embeddings.index[-1]}"]
    before = model.predict(controls, perts, seed=1)
    model.save(tmp_path / "scopevi", overwrite=True)
    loaded = ps.ScopeVI.load(tmp_path / "scopevi", adata=adata)
    after = loaded.predict(controls, perts, seed=1)
    np.testing.assert_array_equal(before.X, after.X)
    pd.testing.assert_frame_equal(loaded.gene_embeddings, model.gene_embeddings)
    assert loaded.gene_embeddings.attrs == {"source": "simulate_perturbseq", "seed": 0}


def test_latent_representation(trained):
    model, adata, _ = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 4)
    assert np.isfinite(z).all()


# ---------------------------------------------------------------- accuracy
@pytest.mark.slow
def test_beats_perturbed_mean_on_unseen_genes():
    scvi.settings.seed = 0
    torch.manual_seed(0)
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=100, n_perturbed_genes=30, n_combinations=0, n_cell_types=1,
        n_cells_per_condition=30, embedding_dim=16, seed=3,
    )
    held_out = embeddings.index[::5].tolist()
    is_test = adata.obs["perturbation"].isin(held_out)
    train = adata[~is_test].copy()
    ps.ScopeVI.setup_anndata(train, "perturbation", gene_embeddings=embeddings)
    model = ps.ScopeVI(train, n_latent=8, n_hidden=64)
    model.train(max_epochs=60, batch_size=256, enable_progress_bar=False, plan_kwargs={"lr": 3e-3})
    controls = adata[adata.obs["perturbation"] == "control"].copy()
    pred = model.predict(controls, held_out, aggregate="mean", use_prior_mean=True)

    real = adata.copy()
    real.X = log1p_normalized(adata)
    truth = pseudobulk(real, "perturbation")
    control = truth.loc["control"]
    perturbed_mean = truth.drop(index=["control", *held_out]).mean() - control
    scope, baseline = [], []
    for i, gene in enumerate(held_out):
        delta = truth.loc[gene] - control
        scope.append(np.corrcoef(delta, pred.layers["log1p_norm"][i] - control)[0, 1])
        baseline.append(np.corrcoef(delta, perturbed_mean)[0, 1])
    assert np.mean(scope) > np.mean(baseline) + 0.1, (scope, baseline)


# ---------------------------------------------------------------- transfer to new contexts
def _split_by_type(small_screen):
    adata, embeddings = small_screen
    reference = adata[adata.obs["cell_type"] == "type_0"].copy()
    query = adata[adata.obs["cell_type"] == "type_1"].copy()
    return reference, query, embeddings


def _reference_model_and_query(small_screen):
    """A model trained on type_0, and type_1's controls plus one perturbation as the query."""
    scvi.settings.seed = 0
    reference, query, embeddings = _split_by_type(small_screen)
    ps.ScopeVI.setup_anndata(reference, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(reference, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    query = query[query.obs["perturbation"].isin(["control", embeddings.index[0]])].copy()
    return model, query, embeddings


def test_load_query_data_refuses_one_perturbation_under_two_labels(small_screen):
    model, query, embeddings = _reference_model_and_query(small_screen)
    gene = embeddings.index[0]
    labels = query.obs["perturbation"].astype(str).to_numpy().copy()
    labels[np.flatnonzero(labels == gene)[:2]] = f"{gene}+control"
    query.obs["perturbation"] = labels
    with pytest.raises(ValueError, match=re.escape(
            f"adata.obs['perturbation'] writes the same perturbation in more than one way: ['{gene}', "
            f"'{gene}+control']")):
        ps.ScopeVI.load_query_data(query, model)


def test_load_query_data_freezes_embedding_path_and_decoder(small_screen):
    model, query, embeddings = _reference_model_and_query(small_screen)
    transfer = ps.ScopeVI.load_query_data(query, model, freeze_decoder=True)
    before = {k: v.clone() for k, v in transfer.module.state_dict().items()}
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(before[key], value)
    transfer.train(max_epochs=2, enable_progress_bar=False)
    after = transfer.module.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith(("perturbation_encoder.", "decoder.")) or key == "px_r":
            assert not changed, key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("z_encoder."))
    assert transfer.adata_manager.get_state_registry("context").categorical_mapping.tolist() == ["type_0", "type_1"]
    pred = transfer.predict(query[query.obs["perturbation"] == "control"], [embeddings.index[1]], aggregate="mean")
    assert pred.obs["cell_type"].tolist() == ["type_1"]


@pytest.mark.parametrize("freeze", ["shared", False])
def test_load_query_data_decoder_freezing_modes(small_screen, freeze):
    model, query, embeddings = _reference_model_and_query(small_screen)
    transfer = ps.ScopeVI.load_query_data(query, model, freeze_decoder=freeze)
    before = {k: v.clone() for k, v in transfer.module.state_dict().items()}
    transfer.train(max_epochs=2, enable_progress_bar=False)
    changed = {k for k, v in transfer.module.state_dict().items() if not torch.equal(before[k], v)}
    hidden = {k for k in before if k.startswith("decoder.px_decoder.") and "running" not in k
              and "num_batches" not in k}
    output = {k for k in before if k.startswith("decoder.px_scale_decoder.")}
    assert output <= changed
    assert (hidden & changed == set()) == (freeze == "shared")
    assert not {k for k in changed if k.startswith("perturbation_encoder.")}


def test_load_query_data_controls_only_keeps_the_whole_decoder(small_screen):
    model, query, _ = _reference_model_and_query(small_screen)
    controls = query[query.obs["perturbation"] == "control"].copy()
    transfer = ps.ScopeVI.load_query_data(controls, model)  # "shared" by default
    before = {k: v.clone() for k, v in transfer.module.state_dict().items()}
    transfer.train(max_epochs=2, enable_progress_bar=False)
    changed = {k for k, v in transfer.module.state_dict().items() if not torch.equal(before[k], v)}
    assert not {k for k in changed if k.startswith("decoder.") or k == "px_r"}
    assert {k for k in changed if k.startswith("z_encoder.")}


def test_load_query_data_bad_freeze(small_screen, trained):
    model, _, _ = trained
    _, query, _ = _split_by_type(small_screen)
    with pytest.raises(ValueError, match="freeze_decoder must be True, False or 'shared', got 'all'"):
        ps.ScopeVI.load_query_data(query, model, freeze_decoder="all")


def test_load_query_data_new_batch_starts_as_reference(small_screen, tmp_path):
    scvi.settings.seed = 0
    reference, query, embeddings = _split_by_type(small_screen)
    reference.obs["batch"] = "b0"
    query.obs["batch"] = "b_new"
    reference.obs.loc[reference.obs_names[::2], "batch"] = "b1"
    ps.ScopeVI.setup_anndata(reference, "perturbation", gene_embeddings=embeddings,
                             context_key="cell_type", batch_key="batch")
    model = ps.ScopeVI(reference, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    transfer = ps.ScopeVI.load_query_data(query, model)
    assert transfer.module.covariate_sizes == [3]
    # from the saved folder (new batch category, new context): the same query model
    model.save(tmp_path / "reference", overwrite=True)
    from_folder = ps.ScopeVI.load_query_data(query.copy(), tmp_path / "reference")
    assert from_folder.module.covariate_sizes == [3]
    saved_state = from_folder.module.state_dict()
    for key, value in transfer.module.state_dict().items():
        torch.testing.assert_close(saved_state[key], value, msg=key)
    assert from_folder.correction_weights_ == transfer.correction_weights_
    # every validated weight is inherited, the cell-level term's too (it fell back to 1 for every kind)
    for query_model in (transfer, from_folder):
        assert query_model.cell_term_weights_ == model.cell_term_weights_
        assert query_model.cell_term_scores_.keys() == model.cell_term_scores_.keys()
    z = torch.randn(5, 4)
    p = torch.zeros(5, model.module.perturbation_encoder.n_output)
    library = torch.full((5, 1), 7.0)
    model.module.eval()
    transfer.module.eval()
    with torch.no_grad():
        ref = model.module.generative(z, p, library, torch.zeros(5, 1, dtype=torch.long))["px"].mean
        new = transfer.module.generative(z, p, library, torch.full((5, 1), 2))["px"].mean
        old = transfer.module.generative(z, p, library, torch.zeros(5, 1, dtype=torch.long))["px"].mean
    # the new batch's one-hot weights start at zero and the reference batch is unchanged
    torch.testing.assert_close(ref, old)
    assert new.shape == ref.shape
    controls = query[query.obs["perturbation"] == "control"]
    pred = transfer.predict(controls, [embeddings.index[0]], aggregate="mean")
    assert pred.obs["cell_type"].tolist() == ["type_1"]


def test_load_query_data_few_shot_cells_join_the_prior(tmp_path):
    """k cells per perturbation in a new cell type join the query's prior as few-shot groups;
    on the type's other cells the query beats both the k-cell means and the zero-shot prior."""
    from perturbscope.data import log1p_expression, simulate_perturbseq

    scvi.settings.seed = 0
    adata, embeddings = simulate_perturbseq(n_genes=100, n_perturbed_genes=12, n_combinations=0, n_cell_types=3,
                                            n_cells_per_condition=60, embedding_dim=16, seed=1)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    new = (adata.obs["cell_type"] == "type_2").to_numpy()
    reference = adata[~new].copy()
    _setup(reference, embeddings)
    model = ps.ScopeVI(reference, n_latent=8, n_hidden=64)
    model.train(max_epochs=20, enable_progress_bar=False)
    perturbations = sorted(set(labels) - {"control"})
    rng = np.random.default_rng(0)
    shots = np.concatenate([rng.choice(np.flatnonzero(new & (labels == p)), 10, replace=False) for p in perturbations])
    controls = np.flatnonzero(new & (labels == "control"))
    query = adata[np.sort(np.r_[controls, shots])].copy()
    transfer = ps.ScopeVI.load_query_data(query, model)
    transfer.train(max_epochs=5, enable_progress_bar=False)
    transfer.train(max_epochs=5, enable_progress_bar=False)  # twice: the cells are added once
    prior = transfer.effect_prior
    assert {prior.kind(p, "type_2") for p in perturbations} == {"few_shot"}
    assert {int(prior.counts_.loc[(p, "type_2")]) for p in perturbations} == {10}
    assert prior.n_held_out_["few_shot"] >= 3  # re-cross-fitted on the reference's cells
    assert model.effect_prior.kind(perturbations[0], "type_2") == "unseen_context"  # reference untouched

    log1p = log1p_expression(adata, None, "counts")
    control_mean = log1p[controls].mean(axis=0)
    test = np.setdiff1d(np.flatnonzero(new & (labels != "control")), shots)
    truth = np.vstack([log1p[test[labels[test] == p]].mean(axis=0) for p in perturbations]) - control_mean
    k_means = np.vstack([log1p[shots[labels[shots] == p]].mean(axis=0) for p in perturbations]) - control_mean
    zero_shot = model.effect_prior.predict_shifts(perturbations, "type_2").to_numpy()
    predicted = transfer.predict(query[query.obs["perturbation"] == "control"], perturbations, aggregate="mean").layers["log1p_norm"] - control_mean

    def l2(x):
        return float(np.linalg.norm(x - truth, axis=1).mean())

    assert l2(predicted) < 0.95 * min(l2(k_means), l2(zero_shot)), (l2(predicted), l2(k_means), l2(zero_shot))
    # from a saved folder there are no reference cells: the blend the reference cross-fitted at
    # k = 10 when it was trained (saved with it) answers, and still beats the k-cell means
    assert sorted(model.few_shot_blends_) == [5, 10, 25]  # 50: groups of 60 cells leave too few to score
    model.save(tmp_path / "reference", overwrite=True)
    from_folder = ps.ScopeVI.load_query_data(query.copy(), tmp_path / "reference")
    from_folder.train(max_epochs=1, enable_progress_bar=False)
    assert from_folder.effect_prior.kind(perturbations[0], "type_2") == "few_shot"
    assert from_folder.effect_prior.weights_["few_shot"] == model.few_shot_blends_[10]["weights"]
    from_disk = from_folder.predict(query[query.obs["perturbation"] == "control"], perturbations,
                                    aggregate="mean").layers["log1p_norm"] - control_mean
    assert l2(from_disk) < 0.95 * l2(k_means), (l2(from_disk), l2(k_means))
    # a saved query model stays a query model: training it again adds its cells once, to the
    # reference's prior, rather than refitting a prior on the query's few cells alone
    transfer.save(tmp_path / "query_model", overwrite=True)
    reloaded = ps.ScopeVI.load(tmp_path / "query_model", adata=query.copy())
    reloaded.train(max_epochs=1, enable_progress_bar=False)
    assert {int(reloaded.effect_prior.counts_.loc[(p, "type_2")]) for p in perturbations} == {10}
    assert reloaded.effect_prior.kind(perturbations[0], "type_0") == "seen"


def test_predict_with_batches_and_covariates(small_screen):
    adata, embeddings = small_screen
    adata = adata.copy()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "b0", "b1")
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3, "d0", "d1")
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type",
                             batch_key="batch", categorical_covariate_keys=["donor"])
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    controls = _controls(adata)
    pred = model.predict(controls, [embeddings.index[0]])
    assert pred.obs["batch"].tolist() == controls.obs["batch"].tolist()
    assert pred.obs["donor"].tolist() == controls.obs["donor"].tolist()
    controls.obs["batch"] = "b9"
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] has values not seen in training: \['b9'\]"):
        model.predict(controls, [embeddings.index[0]])


def test_load_query_data_rejects_different_genes(small_screen, trained):
    model, adata, _ = trained
    query = adata[:, 2:].copy()
    with pytest.raises(ValueError, match=r"query.var_names differ from the model's 60 genes \(2 missing, 0 extra"):
        ps.ScopeVI.load_query_data(query, model)


def test_load_refuses_code_execution_and_wrong_genes(trained, tmp_path):
    import pickle

    model, adata, _ = trained
    folder = tmp_path / "scopevi"
    model.save(folder, overwrite=True)
    with pytest.raises(ValueError, match=r"adata.var_names differ from the model's 60 genes \(1 missing"):
        ps.ScopeVI.load(folder, adata=adata[:, 1:].copy())

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"attr_dict": {"x": Payload()}, "var_names": [], "model_state_dict": {}}, evil / "model.pt",
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="builtins.print"):
        ps.ScopeVI.load(evil, adata=adata)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ps.ScopeVI.load(tmp_path / "nowhere", adata=adata)


def test_train_uses_scvi_loop_with_validation_and_early_stopping(small_screen):
    adata, embeddings = small_screen
    adata = adata.copy()
    _setup(adata, embeddings)
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=3, early_stopping=True, check_val_every_n_epoch=1, enable_progress_bar=False)
    assert {"elbo_validation", "reconstruction_loss_train", "kl_local_train"} <= set(model.history)
    assert len(model.history["elbo_validation"]) == 3
    assert np.isfinite(model.get_elbo())


def test_prediction_is_anchor_plus_validated_shift_plus_cell_term(trained):
    """log1p(x) = anchor + s + w (m - s) + (d - m): its mean over a context's anchors is exact."""
    model, adata, embeddings = trained
    controls = _controls(adata)
    gene = embeddings.index[-1]
    pred = model.predict(controls, [gene], use_prior_mean=True)
    anchors_log1p = np.log1p(controls.X.toarray() / controls.X.toarray().sum(1, keepdims=True) * 1e4)
    for context in ("type_0", "type_1"):
        cells = (controls.obs["cell_type"] == context).to_numpy()
        shift = model.effect_prior.predict_shifts([gene], context)
        weight = model.correction_weights_[shift.attrs["kinds"][0]]
        anchors = controls[cells].copy()
        anchors.obs["context"] = context
        learned = model._mean_vae_change(anchors, gene)
        expected = anchors_log1p[cells].mean(0) + shift.to_numpy()[0] + weight * (learned - shift.to_numpy()[0])
        np.testing.assert_allclose(pred.layers["log1p_norm"][cells].mean(0), expected, rtol=1e-4, atol=1e-4)


def test_vae_only_counts_prediction_starts_from_the_anchors_expectation(small_screen):
    """effect_prior=False, count likelihood: at the prior mean the anchor's start is decode(z_0, 0)."""
    scvi.settings.seed = 0
    adata, embeddings = small_screen
    adata = adata.copy()
    _setup(adata, embeddings)
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=32, effect_prior=False)
    model.train(max_epochs=2, enable_progress_bar=False)
    controls = _controls(adata)[:30]
    gene = embeddings.index[2]
    residual = model.predict(controls, [gene], use_prior_mean=True)
    direct = model.predict(controls, [gene], use_prior_mean=True, residual=False)
    np.testing.assert_allclose(residual.layers["log1p_norm"], direct.layers["log1p_norm"], rtol=1e-5, atol=1e-5)
    assert model.effect_prior is None
    with pytest.raises(ValueError, match=r"no effect prior \(effect_prior=False\); no intervals"):
        model.add_prediction_intervals(model.predict(controls, [gene], aggregate="mean"))


# ---------------------------------------------------------------- MuData
def test_setup_mudata_train_predict_save_load(small_screen, tmp_path):
    import mudata as md

    scvi.settings.seed = 0
    adata, embeddings = small_screen
    mdata = md.MuData({"rna": adata.copy()})
    mdata.obs["perturbation"] = adata.obs["perturbation"].to_numpy()
    mdata.obs["cell_type"] = adata.obs["cell_type"].to_numpy()
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(mdata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert model.var_names.equals(adata.var_names)
    pred = model.predict(perturbations=[embeddings.index[0]], aggregate="mean", seed=2)
    assert pred.shape == (2, adata.n_vars)  # one row per perturbation and cell type
    controls = mdata["rna"][(mdata.obs["perturbation"] == "control").to_numpy()]
    before = model.predict(controls, [embeddings.index[1]], seed=2)
    model.save(tmp_path / "mu", overwrite=True)
    loaded = ps.ScopeVI.load(tmp_path / "mu", adata=mdata)
    np.testing.assert_array_equal(before.X, loaded.predict(controls, [embeddings.index[1]], seed=2).X)


def test_setup_mudata_bad_input(small_screen):
    import mudata as md

    adata, embeddings = small_screen
    mdata = md.MuData({"gex": adata.copy()})
    mdata.obs["perturbation"] = adata.obs["perturbation"].to_numpy()
    with pytest.raises(KeyError, match=r"modality 'rna' not in the MuData; modalities are \['gex'\]"):
        ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=embeddings)
    with pytest.raises(TypeError, match="setup_mudata needs a mudata.MuData, got AnnData"):
        ps.ScopeVI.setup_mudata(adata.copy(), "perturbation", gene_embeddings=embeddings)
    md.set_options(pull_on_update=False)
    viewed = md.MuData({"rna": adata.copy()})
    viewed.obs["perturbation"] = adata.obs["perturbation"].to_numpy()
    viewed.mod["rna"] = viewed["rna"][:, :50]
    with pytest.raises(ValueError, match=re.escape(
            "mdata['rna'] is a view of another AnnData; setup registers keys in it, so make it a copy first: "
            "mdata.mod['rna'] = mdata['rna'].copy().")):
        ps.ScopeVI.setup_mudata(viewed, "perturbation", gene_embeddings=embeddings)


# ---------------------------------------------------------------- combinations and programmes
def test_predict_combination_modes(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)[:20]
    a, b = embeddings.index[0], embeddings.index[3]
    kwargs = {"use_prior_mean": True, "residual": False}

    def log1p(labels, **extra):
        return model.predict(controls, labels, **kwargs, **extra).layers["log1p_norm"]

    additive, joint = log1p([f"{a}+{b}"]), log1p([f"{a}+{b}"], combination="joint")
    assert np.abs(additive - joint).max() > 1e-3
    for g in (a, b):  # singles are the same under both
        np.testing.assert_allclose(log1p([g], combination="joint"), log1p([g]), rtol=1e-5, atol=1e-5)
    # without the learned interaction, the additive double is base + the sum of single changes
    interaction = model.module.perturbation_encoder.interaction[-1].weight
    saved = interaction.detach().clone()
    try:
        with torch.no_grad():
            interaction.zero_()
        x = torch.as_tensor(controls.X.toarray())
        with torch.inference_mode():
            p0 = torch.zeros(len(x), model.module.perturbation_encoder.n_output)
            scale = model.module.generative(model.module.prior(x, p0).loc, p0, torch.log(x.sum(1, keepdim=True)))
        base = np.log1p(scale["px_scale"].numpy() * 1e4)
        expected = base + (log1p([a]) - base) + (log1p([b]) - base)
        np.testing.assert_allclose(log1p([f"{a}+{b}"]), expected, rtol=1e-4, atol=1e-4)
    finally:
        with torch.no_grad():
            interaction.copy_(saved)
    with pytest.raises(ValueError, match="combination must be 'additive' or 'joint', got 'sum'"):
        model.predict(controls, [f"{a}+{b}"], combination="sum")


def test_perturbation_programs_sparse_model(small_screen, tmp_path):
    scvi.settings.seed = 0
    adata, embeddings = small_screen
    adata = adata.copy()
    _setup(adata, embeddings)
    model = ps.ScopeVI(adata, n_latent=6, n_hidden=32, perturbation_effect="sparse", sparsity_weight=0.05)
    model.train(max_epochs=5, enable_progress_bar=False)
    controls = _controls(adata)
    genes = list(embeddings.index[:3])
    programs = model.get_perturbation_programs(controls, genes, threshold=0.2)
    assert isinstance(programs, ps.model.PerturbationPrograms)
    assert programs.latent_shift.shape == (3, 6)
    assert list(programs.latent_shift.columns[:2]) == ["z0", "z1"]
    # standardised by the spread of the anchors' basal states; active = |standardised| >= 0.2
    with torch.inference_mode():
        x = torch.as_tensor(controls.X.toarray(), dtype=torch.float32)
        spread = model.module.basal_state(x).numpy().std(axis=0)
        shift = model.module.latent_shift(x, torch.as_tensor(model.encode_perturbations([genes[1]])).expand(len(x), -1))
    np.testing.assert_allclose(programs.latent_shift.loc[genes[1]], shift.numpy().mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(programs.standardized_shift.loc[genes[1]], shift.numpy().mean(0) / spread, rtol=1e-4)
    assert (programs.active == (programs.standardized_shift.abs() >= 0.2)).all().all()
    top = programs.top_genes(genes[1], 5)
    assert len(top) == 5
    assert top.abs().is_monotonic_decreasing
    assert programs.active_dimensions(genes[1]) == [
        d for d in programs.standardized_shift.loc[genes[1]].abs().sort_values(ascending=False).index
        if programs.active.loc[genes[1], d]]
    with pytest.raises(KeyError, match=r"perturbation 'nope' is not in these programmes"):
        programs.top_genes("nope")
    with pytest.raises(ValueError, match="threshold must be >= 0, got -1"):
        model.get_perturbation_programs(threshold=-1)
    # a sparse model saves and loads with its setting
    model.save(tmp_path / "sparse", overwrite=True)
    loaded = ps.ScopeVI.load(tmp_path / "sparse", adata=adata)
    assert loaded.module.perturbation_effect == "sparse"
    pd.testing.assert_frame_equal(loaded.get_perturbation_programs(controls, genes).latent_shift,
                                  programs.latent_shift, atol=1e-5)


def test_perturbation_programs_gene_effects_are_mean_changes(trained):
    model, adata, embeddings = trained
    controls = _controls(adata)[:25]
    gene = embeddings.index[1]
    programs = model.get_perturbation_programs(controls, [gene])
    direct = model.predict(controls, [gene], use_prior_mean=True, residual=False)
    x = controls.X.toarray()
    with torch.inference_mode():
        module = model.module
        x_t = torch.as_tensor(x, dtype=torch.float32)
        p0 = torch.zeros(len(x), module.perturbation_encoder.n_output)
        basal = module.generative(module.prior(x_t, p0).loc, p0, torch.log(x_t.sum(1, keepdim=True)))["px_scale"]
    expected = (direct.layers["log1p_norm"] - np.log1p(basal.numpy() * 1e4)).mean(0)
    np.testing.assert_allclose(programs.gene_effects.loc[gene], expected, rtol=1e-4, atol=1e-4)
