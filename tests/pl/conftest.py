"""A small trained SCVI model for the probe plots (a copy of ``tiny_scvi`` in tests/probe/conftest.py)."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_scvi():
    """A 2-batch SCVI on 240 cells x 40 genes of two states (``obs['state']``) with a UMAP-like basis."""
    import scvi

    counts, state = _two_state_counts(240, 40, seed=0)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"gene{i}" for i in range(40)]
    adata.obs_names = [f"cell{i}" for i in range(240)]
    adata.obs["batch"] = np.where(np.arange(240) % 2 == 0, "b1", "b2")
    adata.obs["state"] = pd.Categorical(np.where(state == 1, "stimulated", "control"))
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=4, n_hidden=32, gene_likelihood="nb")
    model.train(max_epochs=30, accelerator="cpu", batch_size=128, enable_progress_bar=False)
    adata.obsm["X_umap"] = model.get_latent_representation()[:, :2] * 3.0
    return model, adata
