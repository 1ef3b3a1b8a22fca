"""ScopeVI trained on data that stay on disk: a backed h5ad and a TileDB-SOMA store.

The same simulated screen is trained in memory (two seeds, for the seed noise), from a backed
h5ad and from a local SOMA store built with ``tiledbsoma.io.from_anndata``; the streamed models
must predict held-out genes about as well as the in-memory one (Pearson delta within the seed
noise), with the very same effect prior (its pseudobulks are streamed, and equal).
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import perturbscope as ps
from perturbscope.data import log1p_expression, pseudobulk
from perturbscope.effects import EffectPrior
from perturbscope.model._effect_correction import _fit_prior_streamed

HELD_OUT = ["G01", "G04", "G07"]
TRAIN = {"max_epochs": 3, "batch_size": 128, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """``(training cells, held-out cells, embeddings, backed h5ad path, SOMA uri)``."""
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=40, n_perturbed_genes=10, n_combinations=3, n_cells_per_condition=25, embedding_dim=8, seed=0
    )
    adata.uns.pop("simulation", None)
    held = adata.obs["perturbation"].isin(HELD_OUT).to_numpy()
    train, test = adata[~held].copy(), adata[held].copy()
    folder = tmp_path_factory.mktemp("out_of_core")
    train.write_h5ad(folder / "train.h5ad")
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uri = tiledbsoma_io.from_anndata(str(folder / "soma"), train, "RNA", uns_keys=[])
    return train, test, embeddings, folder / "train.h5ad", uri


def _fit(adata, embeddings, seed: int, **train):
    scvi.settings.seed = seed
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=16)
    model.train(**{**TRAIN, **train})
    return model


def _pearson_delta(model, train: ad.AnnData, test: ad.AnnData) -> float:
    """Mean Pearson correlation of predicted and observed shifts from controls, held-out genes x contexts."""
    controls = train[train.obs["perturbation"] == "control"].copy()
    predicted = model.predict(controls, HELD_OUT, aggregate="mean")
    observed = pseudobulk(ad.AnnData(log1p_expression(test), obs=test.obs), ["perturbation", "cell_type"])
    baseline = pseudobulk(ad.AnnData(log1p_expression(controls), obs=controls.obs), "cell_type")
    scores = []
    for row, (p, c) in enumerate(zip(predicted.obs["perturbation"], predicted.obs["cell_type"], strict=True)):
        truth = observed.loc[(p, c)].to_numpy() - baseline.loc[c].to_numpy()
        guess = predicted.layers["log1p_norm"][row] - baseline.loc[c].to_numpy()
        scores.append(np.corrcoef(truth, guess)[0, 1])
    assert len(scores) == len(HELD_OUT) * 2
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def in_memory(screen):
    """Pearson delta of the in-memory model at seeds 0 and 1, and the seed-0 model."""
    train, test, embeddings, _, _ = screen
    models = [_fit(train.copy(), embeddings, seed) for seed in (0, 1)]
    return [_pearson_delta(m, train, test) for m in models], models[0]


def _tolerance(scores: list[float]) -> float:
    return max(2 * abs(scores[0] - scores[1]), 0.02)


def test_training_from_a_backed_h5ad_matches_in_memory(screen, in_memory):
    train, test, embeddings, path, _ = screen
    (score, other), reference = in_memory
    on_disk = path.read_bytes()
    backed = ad.read_h5ad(path, backed="r")
    try:
        columns = list(backed.obs.columns)
        model = _fit(backed, embeddings, seed=0)
        assert isinstance(backed.X, ad.abc.CSRDataset)  # never loaded
        # the effect prior is the in-memory one exactly: its pseudobulks were streamed, not approximated
        assert np.array_equal(model.effect_prior.means_.to_numpy(), reference.effect_prior.means_.to_numpy())
        assert model.effect_prior.choices_ == reference.effect_prior.choices_
        # validation perturbations held out of the VAE on the streamed path too
        held = {q.split("|")[0] for queries in model.validation_perturbations_.values() for q in queries}
        validation = backed.obs["perturbation"].to_numpy()[model.validation_indices]
        assert held
        assert set(validation) <= held
        assert len(model.train_indices) + len(model.validation_indices) == backed.n_obs
        delta = _pearson_delta(model, train, test)
        assert list(backed.obs.columns) == [*columns, "_scvi_context", "_scvi_batch"]
    finally:
        backed.file.close()
    assert path.read_bytes() == on_disk
    assert abs(delta - score) <= _tolerance([score, other]), (delta, score, other)


def test_training_from_a_soma_store_matches_in_memory(screen, in_memory):
    train, test, embeddings, _, uri = screen
    (score, other), reference = in_memory
    soma = ps.data.read_soma(uri)
    model = _fit(soma, embeddings, seed=0)
    assert isinstance(soma.X, ps.data.SomaCSRMatrix)
    assert np.array_equal(model.effect_prior.means_.to_numpy(), reference.effect_prior.means_.to_numpy())
    delta = _pearson_delta(model, train, test)
    assert abs(delta - score) <= _tolerance([score, other]), (delta, score, other)


def test_streamed_prior_equals_the_in_memory_fit(screen):
    train, _, embeddings, path, _ = screen
    backed = ad.read_h5ad(path, backed="r")
    try:
        ps.ScopeVI.setup_anndata(backed, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
        expression = ps.ScopeVI(backed, n_latent=4, n_hidden=16)._training_expression()
        streamed = EffectPrior(embeddings, seed=0)
        _fit_prior_streamed(streamed, expression, "perturbation", "control", "context", "counts", "+")
    finally:
        backed.file.close()
    memory = ad.AnnData(train.X, obs=pd.DataFrame({"perturbation": train.obs["perturbation"].astype(str),
                                                   "context": train.obs["cell_type"].astype(str)}))
    fitted = EffectPrior(embeddings, seed=0).fit(memory, "perturbation", "control", "context")
    assert np.array_equal(streamed.means_.to_numpy(), fitted.means_.to_numpy())
    assert streamed.means_.index.equals(fitted.means_.index)
    pd.testing.assert_series_equal(streamed.counts_, fitted.counts_, check_names=False)
    assert streamed.choices_ == fitted.choices_
    pd.testing.assert_frame_equal(streamed.crossfit_scores_, fitted.crossfit_scores_)


def test_a_context_without_controls_is_refused_at_setup(tmp_path):
    adata, embeddings = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
                                                    n_cells_per_condition=5, embedding_dim=8)
    adata.uns.pop("simulation", None)
    adata = adata[~((adata.obs["perturbation"] == "control") & (adata.obs["cell_type"] == "type_1"))].copy()
    adata.write_h5ad(tmp_path / "no_controls.h5ad")
    backed = ad.read_h5ad(tmp_path / "no_controls.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match=(
            r"^No control cells \(perturbation == 'control'\) in context 'type_1' of \['cell_type'\]; every "
            r"context needs control cells to anchor predictions\.$"
        )):
            ps.ScopeVI.setup_anndata(backed, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    finally:
        backed.file.close()


def test_loader_choices_are_checked_on_entry(screen):
    _, _, embeddings, path, _ = screen
    backed = ad.read_h5ad(path, backed="r")
    try:
        ps.ScopeVI.setup_anndata(backed, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
        model = ps.ScopeVI(backed, n_latent=4, n_hidden=16)
        with pytest.raises(ValueError, match=r"^loader must be one of \['auto', 'anndata', 'device', 'streamed'\], "
                                             r"got 'disk'\.$"):
            model.train(max_epochs=1, loader="disk")
        with pytest.raises(ValueError, match=r"^loader='device' copies all the expression to the device, but the "
                                             rf"registered expression is out of core \(the backed file "
                                             rf"{re.escape(repr(str(path)))}\); use "
                                             r"loader='streamed', or load it with adata\.to_memory\(\) and set it up "
                                             r"again\.$"):
            model.train(max_epochs=1, loader="device")
        assert not model.is_trained_
        assert model._splitter_class("auto") is ps.data.StreamedDataSplitter
        assert model._splitter_class("anndata") is ps.data.AnchoredDataSplitter
        assert "_data_splitter_cls" not in model.__dict__  # the class default is left alone
    finally:
        backed.file.close()
    in_memory = screen[0].copy()
    ps.ScopeVI.setup_anndata(in_memory, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(in_memory, n_latent=4, n_hidden=16)
    assert model._splitter_class("auto") is ps.data.AnchoredDataSplitter
    assert model._splitter_class("device") is ps.data.DeviceDataSplitter
    assert model._splitter_class("streamed") is ps.data.StreamedDataSplitter


def test_the_device_splitter_refuses_a_soma_store_on_entry(screen):
    _, _, embeddings, _, uri = screen
    soma = ps.data.read_soma(uri)
    ps.ScopeVI.setup_anndata(soma, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(soma, n_latent=4, n_hidden=16, effect_prior=False)
    array = f"file://{uri}/ms/RNA/X/data"  # the X layer inside the store
    with pytest.raises(ValueError, match=(
        r"^DeviceDataSplitter copies all the expression to the device, but the registered expression is read "
        rf"from the TileDB-SOMA array {re.escape(repr(array))}; train with loader='streamed', or load it "
        r"into memory with adata\.to_memory\(\) and set it up again\.$"
    )):
        ps.data.DeviceDataSplitter(model.adata_manager, device="cpu")


def test_a_backed_query_adds_its_cells_to_the_prior(tmp_path):
    """A few-shot query opened with ``backed="r"`` trains, and its prior equals the in-memory one."""
    adata, embeddings = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
                                                    n_cells_per_condition=30, embedding_dim=8, seed=1)
    adata.uns.pop("simulation", None)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    reference = adata[types == "type_0"].copy()
    g00 = np.flatnonzero((types == "type_1") & (labels == "G00"))[:6]
    query = adata[np.sort(np.r_[np.flatnonzero((types == "type_1") & (labels == "control")), g00])].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    model = _fit(reference, embeddings, seed=0, max_epochs=1)
    priors = []
    for cells in (query, ad.read_h5ad(tmp_path / "query.h5ad", backed="r")):
        transfer = ps.ScopeVI.load_query_data(cells, model)
        transfer.train(max_epochs=1, enable_progress_bar=False)
        priors.append(transfer.effect_prior)
    assert [p.kind("G00", "type_1") for p in priors] == ["few_shot", "few_shot"]
    np.testing.assert_allclose(priors[1].means_.to_numpy(), priors[0].means_.to_numpy(), rtol=0, atol=1e-10)
