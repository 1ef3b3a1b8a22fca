"""Small trained SCVI models shared by the probe tests (trained once per session)."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def _two_state_counts(n_cells: int, n_genes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts from two cell states that differ in a block of 10 'response' genes."""
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 2, n_cells)
    base = rng.gamma(2.0, 1.0, n_genes)
    means = np.tile(base, (n_cells, 1))
    means[state == 1, :10] *= 6.0
    library = rng.uniform(0.7, 1.3, (n_cells, 1))
    return rng.poisson(means * library).astype(np.float32), state


def _train(adata: ad.AnnData, batch_key: str | None, n_latent: int, epochs: int, seed: int):
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_latent=n_latent, n_hidden=32, gene_likelihood="nb")
    model.train(max_epochs=epochs, accelerator="cpu", batch_size=128, enable_progress_bar=False)
    return model


@pytest.fixture(scope="session")
def tiny_scvi():
    """A 2-batch SCVI on 240 cells x 40 genes of two states (``obs['state']``) with a UMAP-like basis."""
    counts, state = _two_state_counts(240, 40, seed=0)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"gene{i}" for i in range(40)]
    adata.obs_names = [f"cell{i}" for i in range(240)]
    adata.obs["batch"] = np.where(np.arange(240) % 2 == 0, "b1", "b2")
    adata.obs["state"] = pd.Categorical(np.where(state == 1, "stimulated", "control"))
    model = _train(adata, "batch", n_latent=4, epochs=30, seed=0)
    adata.obsm["X_umap"] = model.get_latent_representation()[:, :2] * 3.0
    return model, adata


@pytest.fixture(scope="session")
def census_layout(tmp_path_factory):
    """A Census-layout folder (only model.pt; Ensembl var_names; concatenated batch key).

    Returns ``(folder, trained model, query)`` where the query uses symbols as ``var_names``,
    keeps Ensembl IDs in ``var['ensembl_id']``, lacks 6 of the model's 60 genes and has its
    genes shuffled.
    """
    counts, state = _two_state_counts(200, 60, seed=1)
    ensembl = [f"ENSG{100000000 + i:011d}" for i in range(60)]
    symbols = [f"SYM{i}" for i in range(60)]
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = ensembl
    parts = np.where(np.arange(200) % 2 == 0, "dsA", "dsB")
    adata.obs["batch"] = [f"{p}_10x 3' v3_cell_donor{i % 3}" for i, p in enumerate(parts)]
    model = _train(adata, "batch", n_latent=5, epochs=20, seed=1)

    folder = tmp_path_factory.mktemp("census") / "homo_sapiens"
    model.save(str(folder), save_anndata=False)
    for path in folder.iterdir():
        if path.name != "model.pt":
            path.unlink() if path.is_file() else shutil.rmtree(path)

    rng = np.random.default_rng(2)
    kept = np.sort(rng.permutation(60)[6:])
    order = rng.permutation(kept)
    query = ad.AnnData(sp.csr_matrix(counts[:, order]))
    query.var_names = [symbols[i] for i in order]
    query.var["ensembl_id"] = [f"{ensembl[i]}.7" for i in order]  # versioned IDs are accepted
    query.obs["state"] = pd.Categorical(np.where(state == 1, "stimulated", "control"))
    query.obs_names = [f"q{i}" for i in range(200)]
    return folder, model, query
