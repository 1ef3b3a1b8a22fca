"""The probes per modality: protein (and ATAC) decoders of multimodal ScopeVI and of TOTALVI."""

from __future__ import annotations

import copy
import re

import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch

import perturbscope as ps
from perturbscope._constants import REGISTRY_KEYS
from perturbscope.probe import axis_alignment_scores, decoder_jacobian

md.set_options(pull_on_update=False)
N_LATENT = 4


def _screen(seed: int = 0):
    return ps.data.simulate_multimodal_perturbseq(
        n_genes=60, n_perturbed_genes=4, n_combinations=0, n_proteins=12, n_peaks=10, n_cell_types=1,
        n_cells_per_condition=8, embedding_dim=8, missing_protein_fraction=0.15, seed=seed,
    )


@pytest.fixture(scope="module")
def multimodal():
    mdata, emb = _screen()
    scvi.settings.seed = 0
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=emb,
                            modalities={"rna_layer": "rna", "protein_layer": "adt", "atac_layer": "atac"})
    model = ps.ScopeVI(mdata, n_latent=N_LATENT, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model, mdata


@pytest.fixture(scope="module")
def totalvi():
    mdata, _ = _screen(seed=1)
    mdata.mod["adt"].X = mdata.mod["adt"].X.toarray()  # TOTALVI's protein prior needs dense counts
    keep = mdata.obs["has_protein"].to_numpy()
    mdata = mdata[keep].copy()
    scvi.settings.seed = 0
    scvi.model.TOTALVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "protein_layer": "adt"})
    model = scvi.model.TOTALVI(mdata, n_latent=N_LATENT, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model, mdata


def _double(model):
    model64 = copy.copy(model)
    model64.module = copy.deepcopy(model.module).double().eval()
    return model64


def _finite_differences(f, z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return np.stack([(f(z + eps * e) - f(z - eps * e)) / (2 * eps) for e in np.eye(z.shape[1])], -1)


def _scope_protein(model, mdata, output: str):
    """Protein output of multimodal ScopeVI by hand: the NB mixture's mean at library 1e4."""
    genes = torch.as_tensor(
        np.asarray(model.adata_manager.get_from_registry(REGISTRY_KEYS.PERTURBATION_KEY)), dtype=torch.long
    )
    module = model.module

    def f(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            zt = torch.as_tensor(z)
            vector = module.perturbation_encoder(genes).double()
            library = torch.full((len(z), 1), np.log(1e4), dtype=torch.float64)
            mixture = module.decode_modality("proteins", zt, vector, library)
            w = torch.sigmoid(mixture.mixture_logits)
            mean = w * mixture.mu1 + (1 - w) * mixture.mu2
            scale = mean / mean.sum(-1, keepdim=True)
            return {"rate": mean, "scale": scale, "log_scale": scale.log()}[output].numpy()

    return f


def _totalvi_protein(model, output: str):
    """totalVI's foreground protein expression by hand, its background at exp(back_alpha)."""
    module = model.module

    def f(z: torch.Tensor) -> torch.Tensor:
        n = len(z)
        out = module.generative(z, torch.full((n, 1), 1e4), torch.zeros((n, 1), dtype=torch.long),
                                torch.zeros((n, 1), dtype=torch.long))
        py = out["py_"]
        fore = (1 - torch.sigmoid(py["mixing"])) * py["back_alpha"].exp() * py["fore_scale"]
        scale = fore / fore.sum(-1, keepdim=True)
        return {"rate": fore, "scale": scale, "log_scale": scale.log()}[output]

    return f


def _per_cell_autograd(f, z: np.ndarray) -> np.ndarray:
    """``d f_n / d z_n`` by plain autograd (the cells are independent in eval mode)."""
    full = torch.autograd.functional.jacobian(f, torch.as_tensor(z, dtype=torch.float32))
    n = len(z)
    return full[torch.arange(n), :, torch.arange(n)].numpy()  # (cells, features, latent)


@pytest.mark.parametrize("output", ["log_scale", "scale", "rate"])
def test_scopevi_protein_jacobian_matches_finite_differences(multimodal, output):
    model, mdata = multimodal
    model64 = _double(model)
    z = np.random.default_rng(0).normal(size=(mdata.n_obs, N_LATENT))
    jac = decoder_jacobian(model64, mdata, z=z, output=output, modality="protein", progress_bar=False)
    fd = _finite_differences(_scope_protein(model64, mdata, output), z)
    assert jac.shape == (mdata.n_obs, 12, N_LATENT)
    assert np.abs(jac - fd).max() / np.abs(fd).max() < 1e-5
    if output == "scale":  # a profile that sums to one: its derivatives sum to zero
        assert np.abs(jac.sum(axis=1)).max() < 1e-10


@pytest.mark.parametrize("output", ["log_scale", "rate"])
def test_totalvi_protein_jacobian_matches_autograd_and_finite_differences(totalvi, output):
    # TOTALVAE builds float32 one-hot batches itself, so it cannot run in float64: the Jacobian
    # is checked against plain autograd of the hand-written output (float32 exact) and against
    # central differences at float32 precision
    model, mdata = totalvi
    model.module.eval()
    z = np.random.default_rng(1).normal(size=(mdata.n_obs, N_LATENT)).astype(np.float32)
    jac = decoder_jacobian(model, mdata, z=z, output=output, modality="protein", progress_bar=False)
    f = _totalvi_protein(model, output)
    assert jac.shape == (mdata.n_obs, 12, N_LATENT)
    exact = _per_cell_autograd(f, z)
    np.testing.assert_allclose(jac, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())

    def numeric(points):
        with torch.no_grad():
            return f(torch.as_tensor(points, dtype=torch.float32)).double().numpy()

    # float32 central differences: rounding (about 1e-7 / eps) and the decoder's ReLU kinks
    # within +-eps of a few points bound their agreement, so most entries, not all, must agree
    fd = _finite_differences(numeric, z.astype(np.float64), eps=1e-3)
    relative = np.abs(jac - fd) / np.abs(fd).max()
    assert np.quantile(relative, 0.95) < 1e-2, np.quantile(relative, [0.5, 0.95, 1.0])
    # deterministic although totalVI draws its background: a second call is identical
    again = decoder_jacobian(model, mdata, z=z, output=output, modality="protein", progress_bar=False)
    np.testing.assert_array_equal(jac, again)


def test_totalvi_rna_jacobian_is_the_gene_decoder(totalvi):
    model, _ = totalvi
    model.module.eval()
    z = np.random.default_rng(2).normal(size=(5, N_LATENT)).astype(np.float32)

    def f(points: torch.Tensor) -> torch.Tensor:
        out = model.module.generative(points, torch.full((5, 1), 1e4), torch.zeros((5, 1), dtype=torch.long),
                                      torch.zeros((5, 1), dtype=torch.long))
        return out["px_"]["scale"].log()

    jac = decoder_jacobian(model, z=z, progress_bar=False)
    assert jac.shape == (5, 60, N_LATENT)
    exact = _per_cell_autograd(f, z)
    np.testing.assert_allclose(jac, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())


def test_features_shapes_and_order(multimodal):
    model, mdata = multimodal
    full = decoder_jacobian(model, mdata, modality="protein", progress_bar=False)
    chosen = decoder_jacobian(model, mdata, genes=["P03", "P01"], modality="protein", progress_bar=False)
    np.testing.assert_allclose(chosen, full[:, [3, 1]], rtol=1e-5, atol=1e-7)
    peaks = decoder_jacobian(model, mdata, modality="atac", progress_bar=False)
    assert peaks.shape == (mdata.n_obs, mdata["atac"].n_vars, N_LATENT)
    assert np.isfinite(peaks).all()
    assert np.abs(peaks).max() > 0
    rna = decoder_jacobian(model, mdata, progress_bar=False)  # the default: the gene decoder
    assert rna.shape == (mdata.n_obs, mdata["rna"].n_vars, N_LATENT)


def test_alignment_on_proteins(multimodal):
    model, mdata = multimodal
    rna_columns = list(mdata["rna"].var.columns)
    table = axis_alignment_scores(model, mdata, "perturbation", "control", "G00", modality="protein",
                                  progress_bar=False)
    assert table.index.name == "protein"
    assert sorted(table.index) == sorted(mdata["adt"].var_names)
    assert table["probe_alignment"].between(-1, 1).all()
    written = mdata["adt"].var["probe_alignment"]
    np.testing.assert_allclose(written.loc[table.index].to_numpy(), table["probe_alignment"].to_numpy())
    assert list(mdata["rna"].var.columns) == rna_columns
    # the mean baseline is over the cells measured in protein only, computed here by hand
    counts = mdata["adt"].X.toarray()
    labels = mdata.obs["perturbation"].astype(str).to_numpy()
    rows = (labels == "control") & (counts.sum(1) > 0)
    assert rows.sum() < (labels == "control").sum()  # some controls have no protein
    expected = (counts[rows] / counts[rows].sum(1, keepdims=True) * 1e4).mean(0)
    np.testing.assert_allclose(table.loc[mdata["adt"].var_names, "mean_reference"], expected, rtol=1e-5)


def test_alignment_on_totalvi_proteins(totalvi):
    model, mdata = totalvi
    table = axis_alignment_scores(model, mdata, "perturbation", "control", "G01", modality="protein",
                                  n_cells=30, progress_bar=False)
    assert sorted(table.index) == sorted(mdata["adt"].var_names)
    assert np.isfinite(table["probe_alignment"]).all()


def test_unknown_modalities_are_refused(multimodal, totalvi, tiny_scvi):
    model, mdata = multimodal
    with pytest.raises(ValueError, match=re.escape(
        "modality 'adt' is not decoded by this ScopeVI; its modalities are ['rna', 'protein', 'atac']"
    )):
        decoder_jacobian(model, mdata, modality="adt")
    tv, tv_data = totalvi
    with pytest.raises(ValueError, match=re.escape(
        "modality 'atac' is not decoded by this TOTALVI; its modalities are ['rna', 'protein']"
    )):
        axis_alignment_scores(tv, tv_data, "perturbation", "control", "G01", modality="atac")
    scvi_model, adata = tiny_scvi
    with pytest.raises(ValueError, match=r"^modality 'protein' is not decoded by this SCVI; its "
                       r"modalities are \['rna'\]$"):
        decoder_jacobian(scvi_model, adata, modality="protein")


def test_bad_protein_inputs(multimodal):
    model, mdata = multimodal
    with pytest.raises(ValueError, match=re.escape(
        "genes ['G00'] are not decoded by the model (12 proteins, e.g. ['P00', 'P01', 'P02', 'P03', 'P04'])"
    )):
        decoder_jacobian(model, mdata, genes=["G00"], modality="protein")
    modalities = {name: data.copy() for name, data in mdata.mod.items()}
    modalities["adt"] = modalities["adt"][:, ::-1].copy()
    shuffled = md.MuData(modalities)
    shuffled.obs["perturbation"] = mdata.obs["perturbation"].to_numpy()
    with pytest.raises(ValueError, match=re.escape(
        "mdata['adt'] has the model's 12 proteins in another order (position 0 holds 'P11' where the "
        "model has 'P00')"
    )):
        decoder_jacobian(model, shuffled, modality="protein")
    modalities = {name: data.copy() for name, data in mdata.mod.items()}
    counts = modalities["adt"].X.toarray()
    counts[mdata.obs["perturbation"].astype(str).to_numpy() == "G02"] = 0
    modalities["adt"].X = sp.csr_matrix(counts)
    unmeasured = md.MuData(modalities)  # (mudata cannot copy a MuData holding setup's obsm)
    unmeasured.obs["perturbation"] = mdata.obs["perturbation"].to_numpy()
    with pytest.raises(ValueError, match=re.escape(
        "no cell of group 'G02' was measured in modality 'protein' (every one has zero counts)"
    )):
        axis_alignment_scores(model, unmeasured, "perturbation", "control", "G02", modality="protein")


def test_rna_only_scopevi_has_rna_only(small_screen):
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings.copy())
    model = ps.ScopeVI(adata, n_latent=N_LATENT, n_hidden=8)
    with pytest.raises(ValueError, match=re.escape(
        "modality 'protein' is not decoded by this ScopeVI; its modalities are ['rna']"
    )):
        decoder_jacobian(model, adata, modality="protein")


def test_totalvi_on_an_anndata_with_proteins_in_obsm():
    mdata, _ = _screen(seed=2)
    keep = mdata.obs["has_protein"].to_numpy()
    adata = mdata["rna"][keep].copy()
    adata.obs["perturbation"] = mdata.obs["perturbation"].astype(str).to_numpy()[keep]
    adata.obsm["protein"] = mdata["adt"][keep].to_df()  # a DataFrame: its columns name the proteins
    scvi.settings.seed = 0
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein")
    model = scvi.model.TOTALVI(adata, n_latent=N_LATENT, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    columns = list(adata.var.columns)
    table = axis_alignment_scores(model, adata, "perturbation", "control", "G01", modality="protein",
                                  n_cells=20, progress_bar=False)
    assert sorted(table.index) == sorted(adata.obsm["protein"].columns)
    assert list(adata.var.columns) == columns  # proteins in obsm: nothing is written to var
    jac = decoder_jacobian(model, adata[:7].copy(), modality="protein", progress_bar=False)
    assert jac.shape == (7, 12, N_LATENT)
