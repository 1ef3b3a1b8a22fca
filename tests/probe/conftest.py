"""Census-layout models for the probe tests (``tiny_scvi`` is in tests/conftest.py)."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


@pytest.fixture(scope="session")
def census_layout(tmp_path_factory, two_state_counts, train_scvi):
    """A Census-layout folder (only model.pt; Ensembl var_names; concatenated batch key).

    Returns ``(folder, trained model, query)`` where the query uses symbols as ``var_names``,
    keeps Ensembl IDs in ``var['ensembl_id']``, lacks 6 of the model's 60 genes and has its
    genes shuffled.
    """
    counts, state = two_state_counts(200, 60, seed=1)
    ensembl = [f"ENSG{100000000 + i:011d}" for i in range(60)]
    symbols = [f"SYM{i}" for i in range(60)]
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = ensembl
    parts = np.where(np.arange(200) % 2 == 0, "dsA", "dsB")
    adata.obs["batch"] = [f"{p}_10x 3' v3_cell_donor{i % 3}" for i, p in enumerate(parts)]
    model = train_scvi(adata, "batch", n_latent=5, epochs=20, seed=1)

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
