"""Shared fixtures: the real data folder (skipped when absent), a small simulated screen and a tiny SCVI."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$PERTURBSCOPE_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("PERTURBSCOPE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; tests that use it skip with a reason when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set PERTURBSCOPE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def small_screen():
    """A small simulated screen and its gene embeddings (read-only: copy before mutating)."""
    from perturbscope.data import simulate_perturbseq

    return simulate_perturbseq(
        n_genes=60, n_perturbed_genes=12, n_combinations=6, n_cell_types=2,
        n_cells_per_condition=20, embedding_dim=8, seed=0,
    )


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
def two_state_counts():
    """The counts generator of the SCVI fixtures (for conftests that build their own models)."""
    return _two_state_counts


@pytest.fixture(scope="session")
def train_scvi():
    """``train_scvi(adata, batch_key, n_latent, epochs, seed)``: a small trained SCVI."""
    return _train


@pytest.fixture(scope="session")
def tiny_scvi(two_state_counts, train_scvi):
    """A 2-batch SCVI on 240 cells x 40 genes of two states (``obs['state']``) with a UMAP-like basis."""
    counts, state = two_state_counts(240, 40, seed=0)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"gene{i}" for i in range(40)]
    adata.obs_names = [f"cell{i}" for i in range(240)]
    adata.obs["batch"] = np.where(np.arange(240) % 2 == 0, "b1", "b2")
    adata.obs["state"] = pd.Categorical(np.where(state == 1, "stimulated", "control"))
    model = train_scvi(adata, "batch", n_latent=4, epochs=30, seed=0)
    adata.obsm["X_umap"] = model.get_latent_representation()[:, :2] * 3.0
    return model, adata
