from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.embeddings import expression_embeddings


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    labels = ["control"] * 3 + ["P1"] * 2 + ["P2"] * 2 + ["P3"] * 2 + ["P1+P2"] * 2
    X = rng.normal(size=(len(labels), 5))
    obs = pd.DataFrame(
        {"perturbation": labels, "cell_type": ["a", "b"] * 5 + ["a"]},
        index=[f"c{i}" for i in range(len(labels))],
    )
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(5)]))
    adata.layers["other"] = X * 2
    return adata


def effects_by_hand(adata, groups, X=None):
    X = adata.X if X is None else X
    labels = adata.obs["perturbation"].to_numpy()
    control = X[labels == "control"].mean(0)
    Y = np.stack(
        [X[labels == g].mean(0) - control for g in groups], axis=1
    )  # genes x perturbations
    return Y - Y.mean(axis=1, keepdims=True)


def test_matches_pca_by_hand(tiny):
    emb = expression_embeddings(tiny, "perturbation", "control", n_components=3)
    centred = effects_by_hand(tiny, ["P1", "P1+P2", "P2", "P3"])
    # Four centred profiles have rank 3: three components are exact, E E^T = Y_c Y_c^T.
    np.testing.assert_allclose(emb.to_numpy() @ emb.to_numpy().T, centred @ centred.T, atol=1e-10)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(emb.to_numpy()), np.abs(u[:, :3] * s[:3]), atol=1e-10)
    assert list(emb.index) == list(tiny.var_names)
    assert list(emb.columns) == ["expression_0", "expression_1", "expression_2"]
    assert emb.attrs == {
        "source": "expression_pca",
        "perturbation_key": "perturbation",
        "n_perturbations": 4,
        "n_components": 3,
        "layer": None,
    }


def test_training_subset_and_layer(tiny):
    emb = expression_embeddings(
        tiny, "perturbation", "control", n_components=1, perturbations=["P1", "P3"], layer="other"
    )
    centred = effects_by_hand(tiny, ["P1", "P3"], X=tiny.layers["other"])
    np.testing.assert_allclose(emb.to_numpy() @ emb.to_numpy().T, centred @ centred.T, atol=1e-10)
    assert emb.attrs["n_perturbations"] == 2


def test_context_compares_with_own_control(tiny):
    emb = expression_embeddings(
        tiny,
        "perturbation",
        "control",
        n_components=2,
        perturbations=["P1", "P2"],
        context_key="cell_type",
    )
    X, obs = tiny.X, tiny.obs
    columns = []
    for p in ["P1", "P2"]:
        for ct in ["a", "b"]:
            here = (obs["perturbation"] == p) & (obs["cell_type"] == ct)
            ctrl = (obs["perturbation"] == "control") & (obs["cell_type"] == ct)
            if here.any():
                columns.append(X[here.to_numpy()].mean(0) - X[ctrl.to_numpy()].mean(0))
    Y = np.stack(columns, axis=1)
    centred = Y - Y.mean(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ (u[:, :2] * s[:2]).T
    np.testing.assert_allclose(emb.to_numpy() @ emb.to_numpy().T, best, atol=1e-10)
    assert emb.attrs["n_perturbations"] == len(columns) == 4


def test_simulated_screen(small_screen):
    from perturbscope.data import log1p_normalized

    adata = small_screen[0].copy()
    adata.layers["log1p_norm"] = log1p_normalized(adata)
    emb = expression_embeddings(
        adata,
        "perturbation",
        "control",
        n_components=10,
        layer="log1p_norm",
        context_key="cell_type",
    )
    assert emb.shape == (adata.n_vars, 10)
    assert np.isfinite(emb.to_numpy()).all()


def test_bad_input(tiny):
    with pytest.raises(KeyError, match=r"perturbation_key 'guide' not in adata.obs"):
        expression_embeddings(tiny, "guide", "control")
    with pytest.raises(ValueError, match="control_value 'ctrl' not found in adata.obs"):
        expression_embeddings(tiny, "perturbation", "ctrl")
    with pytest.raises(
        KeyError, match=r"perturbations \['P9'\] are not in adata.obs\['perturbation'\]"
    ):
        expression_embeddings(
            tiny, "perturbation", "control", n_components=1, perturbations=["P1", "P9"]
        )
    with pytest.raises(ValueError, match=r"n_components=5 must be between 1 and .* min\(4, 5\)"):
        expression_embeddings(tiny, "perturbation", "control", n_components=5)
    with pytest.raises(KeyError, match="layer 'counts' not in adata.layers"):
        expression_embeddings(tiny, "perturbation", "control", layer="counts")
    with pytest.raises(ValueError, match="has no perturbation besides the control 'control'"):
        expression_embeddings(tiny, "perturbation", "control", perturbations=[])
    lonely = tiny.copy()
    lonely.obs["cell_type"] = ["x"] * 3 + ["y"] * 8
    with pytest.raises(
        ValueError, match=r"contexts \['y'\] in adata.obs\['cell_type'\] have no 'control' cells"
    ):
        expression_embeddings(
            lonely, "perturbation", "control", n_components=1, context_key="cell_type"
        )
