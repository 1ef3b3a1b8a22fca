import numpy as np
import pytest
import torch

import perturbscope as ps
from perturbscope.data import AnchoredAnnDataLoader, ControlAnchorSampler


def test_sampler_draws_controls_of_the_same_group():
    groups = np.array([0, 0, 0, 1, 1, 1])
    is_control = np.array([True, True, False, True, False, False])
    sampler = ControlAnchorSampler(groups, is_control, seed=0)
    draws = sampler.sample(np.array([0] * 50 + [1] * 50))
    assert set(draws[:50]) == {0, 1}
    assert set(draws[50:]) == {3}


def test_sampler_group_without_controls():
    sampler = ControlAnchorSampler(np.array([0, 1]), np.array([True, False]))
    with pytest.raises(ValueError, match="Pairing group 1 has no control cells"):
        sampler.sample(np.array([1]))


def test_loader_adds_anchors_from_same_context_and_resamples(small_screen):
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=8)
    loader = AnchoredAnnDataLoader(model.adata_manager, batch_size=64, shuffle=False, seed=0)
    control_rows = {
        ct: {tuple(r) for r in adata[(adata.obs["perturbation"] == "control") & (adata.obs["cell_type"] == ct)].X.toarray()}
        for ct in adata.obs["cell_type"].cat.categories
    }
    first = [batch["anchor_X"].clone() for batch in loader]
    second = [batch["anchor_X"].clone() for batch in loader]
    batch = next(iter(loader))
    for row, code in zip(batch["anchor_X"].numpy(), batch["context"].numpy().ravel()):
        context = adata.obs["cell_type"].cat.categories[int(code)]
        assert tuple(row) in control_rows[context]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
