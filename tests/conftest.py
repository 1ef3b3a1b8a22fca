"""Shared fixtures: the real data folder (skipped when absent), a small simulated screen and a tiny SCVI."""

from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def _capped_address_space(gib: int = 1):
    """Cap this process's address space at its current size plus ``gib`` while fuzzing.

    A flipped byte in a real model file can declare a buffer of many gigabytes (a protocol-5
    bytearray's size, which Python's unpickler allocates before reading; measured before it was
    refused: up to 20 GB resident, which killed a CI run on a 24 GB machine). Under the cap such
    an allocation fails at once with ``MemoryError``, and the fuzz tests fail on it
    (:func:`_ran_out_of_memory`) instead of the machine running out of memory.
    """
    resource = pytest.importorskip("resource", reason="address-space limits need a POSIX system")
    proc = Path("/proc/self/status")
    status = proc.read_text() if proc.exists() else ""
    match = re.search(r"VmSize:\s+(\d+) kB", status)
    if match is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(match.group(1)) * 1024 + gib * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def memory_headroom():
    """A context manager capping the address space at its current size plus ``gib`` (default 1)."""
    return _capped_address_space
