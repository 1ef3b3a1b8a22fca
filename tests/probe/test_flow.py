import re

import numpy as np
import pytest

from perturbscope.probe import decoder_jacobian, gradient_field, gradient_flow
from perturbscope.probe._flow import _project_onto_embedding


def test_gradient_field_writes_documented_keys(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata[:60].copy()
    before = set(sub.obsm)
    gradient_field(model, sub, "gene2", basis="X_umap", n_neighbors=10, progress_bar=False)
    assert set(sub.obsm) - before == {"X_grad_gene2", "X_grad_gene2_umap"}
    assert sub.obsm["X_grad_gene2"].shape == (60, 4)
    assert sub.obsm["X_grad_gene2_umap"].shape == (60, 2)
    expected = decoder_jacobian(model, sub, genes=["gene2"], progress_bar=False)[:, 0, :]
    np.testing.assert_allclose(sub.obsm["X_grad_gene2"], expected, rtol=1e-5, atol=1e-7)


def test_projection_follows_the_gradient():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3))
    embedding = z[:, :2] * 2.0  # the embedding is a linear view of the latent space
    towards_x = np.tile([1.0, 0.0, 0.0], (300, 1))
    arrows = _project_onto_embedding(z, towards_x, embedding, n_neighbors=20, temperature=0.1)
    assert (arrows[:, 0] > 0).mean() > 0.95
    assert np.abs(arrows[:, 0]).mean() > 3 * np.abs(arrows[:, 1]).mean()
    flipped = _project_onto_embedding(z, -towards_x, embedding, n_neighbors=20, temperature=0.1)
    assert (flipped[:, 0] < 0).mean() > 0.95


def test_projection_leaves_each_cell_out_of_its_neighbours_with_duplicate_latent_points():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 3))
    z[[10, 20]] = z[3]  # three identical latent points: sklearn may list another one first
    embedding = rng.normal(size=(40, 2))
    grad = rng.normal(size=(40, 3))
    arrows = _project_onto_embedding(z, grad, embedding, n_neighbors=5, temperature=0.1)
    # by hand: the 5 nearest others of each duplicate (the other two among them), softmax on cosines
    for cell in (3, 10, 20):
        distance = np.linalg.norm(z - z[cell], axis=1)
        distance[cell] = np.inf
        others = np.argsort(distance, kind="stable")[:5]
        assert cell not in others
        dz = z[others] - z[cell]
        cos = dz @ grad[cell] / (np.linalg.norm(dz, axis=1) * np.linalg.norm(grad[cell]) + 1e-12)
        weights = np.exp((cos - cos.max()) / 0.1)
        weights /= weights.sum()
        de = embedding[others] - embedding[cell]
        de /= np.linalg.norm(de, axis=1, keepdims=True) + 1e-12
        np.testing.assert_allclose(arrows[cell], (weights - 0.2) @ de, atol=1e-10)


def test_gradient_field_errors(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(
        ValueError, match=r"basis 'X_tsne' is not in adata.obsm; keys are \['X_umap'\]"
    ):
        gradient_field(model, adata, "gene2", basis="X_tsne")
    with pytest.raises(ValueError, match=r"genes \['CD4'\] are not decoded"):
        gradient_field(model, adata, "CD4")


@pytest.mark.parametrize("direction", [-1, 1])
def test_gradient_flow_moves_the_gene_and_returns_a_new_anndata(tiny_scvi, direction):
    model, adata = tiny_scvi
    sub = adata[:50].copy()
    obs_before, obsm_before = list(sub.obs.columns), set(sub.obsm)
    flow = gradient_flow(
        model, sub, "gene1", direction=direction, step_size=0.2, n_steps=4, progress_bar=False
    )
    assert flow is not sub
    assert flow.shape == (50, 40)
    assert list(flow.layers) == [f"step_{t}" for t in range(5)]
    np.testing.assert_array_equal(flow.X, flow.layers["step_4"])
    assert set(flow.var.columns) == {"probe_flow_log2fc", "probe_flow_delta"}
    assert flow.obsm["probe_flow_latent"].shape == (50, 4)
    assert flow.uns["probe_flow"] == {
        "gene": "gene1",
        "direction": direction,
        "step_size": 0.2,
        "n_steps": 4,
    }
    np.testing.assert_allclose(flow.layers["step_0"].sum(axis=1), 1e4, rtol=1e-4)
    # the walked gene changes in the asked direction, step after step, in almost every cell
    trajectory = np.stack([flow.layers[f"step_{t}"][:, 1] for t in range(5)])
    assert (np.sign(np.diff(trajectory, axis=0)) == direction).mean() > 0.95
    assert np.sign(flow.var.loc["gene1", "probe_flow_log2fc"]) == direction
    ranked = flow.var["probe_flow_log2fc"].abs().sort_values(ascending=False)
    assert "gene1" in ranked.index[:10]
    # each step moves each cell by exactly step_size in latent space
    z0 = model.get_latent_representation(sub)
    distance = np.linalg.norm(flow.obsm["probe_flow_latent"] - z0, axis=1)
    assert (distance <= 4 * 0.2 + 1e-4).all()
    assert (distance > 0.5).all()
    assert list(sub.obs.columns) == obs_before
    assert set(sub.obsm) == obsm_before
    assert not any(c.startswith("_scvi") for c in flow.obs.columns)


def test_gradient_flow_errors(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(
        ValueError, match=r"direction must be -1 \(knock-down\) or \+1 \(over-expression\), got 0"
    ):
        gradient_flow(model, adata, "gene1", direction=0)
    with pytest.raises(ValueError, match=re.escape("step_size must be a finite number > 0, got -0.1")):
        gradient_flow(model, adata, "gene1", step_size=-0.1)
    with pytest.raises(ValueError, match="n_steps must be a positive integer, got 0"):
        gradient_flow(model, adata, "gene1", n_steps=0)
    with pytest.raises(ValueError, match=r"genes \['XIST'\] are not decoded"):
        gradient_flow(model, adata, "XIST")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gene": ["gene1"]}, "gene must be one gene name (a non-empty string), got ['gene1']"),
        ({"gene": ""}, "gene must be one gene name (a non-empty string), got ''"),
        ({"n_neighbors": 0}, "n_neighbors must be a positive integer, got 0"),
        ({"n_neighbors": 1}, "n_neighbors must be at least 2, got 1"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ],
)
def test_gradient_field_bad_inputs(tiny_scvi, kwargs, message):
    model, adata = tiny_scvi
    args = {"gene": "gene2"} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        gradient_field(model, adata[:10].copy(), **args)


def test_gradient_field_needs_three_cells_and_a_2d_basis(tiny_scvi):
    model, adata = tiny_scvi
    # two cells have one neighbour each, and every arrow was exactly zero
    with pytest.raises(ValueError, match=re.escape(
        "adata has 2 cells; at least 3 are needed to project onto the embedding through latent neighbours"
    )):
        gradient_field(model, adata[:2].copy(), "gene2")
    sub = adata[:10].copy()
    sub.obsm["X_line"] = np.zeros((10, 1))
    with pytest.raises(ValueError, match=re.escape(
        "adata.obsm['X_line'] must have at least 2 columns, got shape (10, 1)"
    )):
        gradient_field(model, sub, "gene2", basis="X_line")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_steps": 2.5}, "n_steps must be a positive integer, got 2.5"),
        ({"step_size": float("inf")}, "step_size must be a finite number > 0, got inf"),
        ({"step_size": None}, "step_size must be a finite number > 0, got None"),
        ({"n_steps": None}, "n_steps must be a positive integer, got None"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"gene": None}, "gene must be one gene name (a non-empty string), got None"),
    ],
)
def test_gradient_flow_bad_inputs(tiny_scvi, kwargs, message):
    model, adata = tiny_scvi
    args = {"gene": "gene1"} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        gradient_flow(model, adata[:10].copy(), **args)
