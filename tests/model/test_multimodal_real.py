"""Multimodal ScopeVI on real CITE-seq data: the latent separates protein-defined populations.

Neither data set has perturbations; half of the cells carry a simulated label, so ScopeVI can
be set up and trained, and the test reads only the latent space, which the labels do not shape.
Populations are defined on protein: each cell's largest CLR value among CD3 (T cells), CD19
(B cells) and CD14 (monocytes).
"""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scvi
from sklearn.neighbors import NearestNeighbors

import perturbscope as ps

md.set_options(pull_on_update=False)
pytestmark = pytest.mark.slow


def _top_genes(rna: ad.AnnData, n: int) -> ad.AnnData:
    totals = np.asarray(rna.X.sum(axis=0)).ravel()
    return rna[:, np.sort(np.argsort(-totals)[:n])].copy()


def _groups(proteins: ad.AnnData, markers: list[str]) -> np.ndarray:
    X = proteins.X.toarray() if hasattr(proteins.X, "toarray") else np.asarray(proteins.X)
    logged = np.log1p(X)
    clr = logged - logged.mean(axis=1, keepdims=True)
    columns = [list(proteins.var_names).index(m) for m in markers]
    return np.argmax(clr[:, columns], axis=1)


def _knn_accuracy(latent: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Leave-one-out accuracy of a majority vote among each cell's k nearest other cells."""
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent, return_distance=False)[:, 1:]
    votes = np.array([np.bincount(groups[row], minlength=groups.max() + 1).argmax() for row in neighbours])
    return float((votes == groups).mean())


def _train_and_score(mdata: md.MuData, protein: str, markers: list[str]) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    mdata.obs["perturbation"] = np.where(rng.random(mdata.n_obs) < 0.5, "control", "SIM1")
    embeddings = pd.DataFrame(rng.normal(size=(2, 4)), index=["SIM1", "SIM2"])
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=embeddings,
                            modalities={"rna_layer": "rna", "protein_layer": protein})
    scvi.settings.seed = 0
    model = ps.ScopeVI(mdata, n_latent=10, n_hidden=64, effect_prior=False)
    model.train(max_epochs=40, enable_progress_bar=False)
    groups = _groups(mdata[protein], markers)
    assert min(np.bincount(groups, minlength=3)) >= 10, np.bincount(groups)
    chance = float(np.bincount(groups).max() / len(groups))
    return _knn_accuracy(model.get_latent_representation(mdata), groups), chance


def test_eccite_latent_separates_t_b_and_monocytes(shared_data):
    path = shared_data / "mimitou2019_eccite_pbmc.h5mu"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    source = md.read_h5mu(path)
    mdata = md.MuData({"rna": _top_genes(source["rna"], 1500), "adt": source["adt"].copy(),
                       "hto": source["hto"].copy()})
    accuracy, chance = _train_and_score(mdata, "adt", ["CD3", "CD19", "CD14"])
    assert accuracy > chance + 0.1, (accuracy, chance)


def test_cite_seq_h5ad_latent_separates_t_b_and_monocytes(shared_data):
    path = shared_data / "scvi_pbmc_cite_200cells.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    adata = ad.read_h5ad(path)
    names = [str(n).replace("_TotalSeqB", "") for n in adata.uns["protein_names"]]
    proteins = ad.AnnData(np.asarray(adata.obsm["protein_expression"], dtype=np.float32),
                          obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=names))
    rna = ad.AnnData(adata.X, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))
    mdata = md.MuData({"rna": _top_genes(rna, 1500), "protein": proteins})
    accuracy, chance = _train_and_score(mdata, "protein", ["CD3", "CD19", "CD14"])
    assert accuracy > chance + 0.1, (accuracy, chance)
