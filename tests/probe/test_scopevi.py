"""The probes on perturbscope's own model: the decoder at each cell's registered perturbation."""

import copy

import numpy as np
import pytest
import torch

import perturbscope as ps
from perturbscope.probe import decoder_jacobian, gradient_flow
from perturbscope.probe._jacobian import _make_probe, _select


@pytest.fixture(scope="module")
def scopevi(small_screen):
    import scvi

    scvi.settings.seed = 0
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(
        adata, "perturbation", gene_embeddings=embeddings.copy(), context_key="cell_type"
    )
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=32)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model, adata


def test_jacobian_matches_finite_differences(scopevi):
    model, adata = scopevi
    model64 = copy.copy(model)
    model64.module = copy.deepcopy(model.module).double()
    sub = adata[:10].copy()
    z = np.random.default_rng(0).normal(size=(10, 4))
    jac = decoder_jacobian(model64, sub, z=z, progress_bar=False)

    def decoded(points):
        probe, _ = _make_probe(model64, sub, points, None, 1e4, 64)
        with torch.no_grad():
            return _select(*probe.decode(probe.z, np.arange(10)), "log_scale", None).numpy()

    eps = 1e-6
    fd = np.stack(
        [(decoded(z + eps * e) - decoded(z - eps * e)) / (2 * eps) for e in np.eye(4)], -1
    )
    assert jac.shape == (10, adata.n_vars, 4)
    assert np.abs(jac - fd).max() / np.abs(fd).max() < 1e-3


def test_gradient_flow_on_scopevi(scopevi):
    model, adata = scopevi
    gene = str(adata.var_names[0])
    flow = gradient_flow(model, adata[:20].copy(), gene, direction=1, n_steps=3, progress_bar=False)
    assert flow.shape == (20, adata.n_vars)
    trajectory = np.stack([flow.layers[f"step_{t}"][:, 0] for t in range(4)])
    assert (np.diff(trajectory, axis=0) > 0).mean() > 0.95


def test_probes_on_a_sparse_model(small_screen):
    import scvi

    scvi.settings.seed = 0
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings.copy())
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, perturbation_effect="sparse")
    model.train(max_epochs=1, enable_progress_bar=False)
    sub = adata[:8].copy()
    jac = decoder_jacobian(model, sub, progress_bar=False)
    assert jac.shape == (8, adata.n_vars, 4)
    assert np.isfinite(jac).all()
    # the sparse decoder ignores the perturbation vector: its effect is in z
    z = torch.randn(3, 4)
    library = torch.zeros(3, 1)
    with torch.inference_mode():
        a = model.module.generative(z, torch.randn(3, 64), library)["px_scale"]
        b = model.module.generative(z, torch.zeros(3, 64), library)["px_scale"]
    torch.testing.assert_close(a, b)
