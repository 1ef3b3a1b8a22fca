import numpy as np
import pytest
import torch
from scipy import stats

import perturbscope as ps
from perturbscope.data import AnchoredAnnDataLoader, ControlAnchorSampler, ControlBank
from perturbscope.data import _pairing as pairing


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


def test_sampler_is_uniform_within_each_group():
    # Three groups with 3, 5 and 1 control cells, cells interleaved so that order cannot help.
    groups = np.array([0, 1, 2, 0, 1, 0, 1, 1, 1, 0, 2, 1])
    is_control = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    sampler = ControlAnchorSampler(groups, is_control, seed=1)
    requests = np.repeat([0, 1, 2], [3000, 5000, 500])
    rng = np.random.default_rng(0)
    rng.shuffle(requests)
    draws = sampler.sample(requests)
    for group, pool in ((0, [0, 3, 5]), (1, [1, 4, 6, 7]), (2, [2])):
        drawn = draws[requests == group]
        assert set(drawn) == set(pool)
        frequencies = np.array([(drawn == cell).sum() for cell in pool])
        if len(pool) > 1:
            assert stats.chisquare(frequencies).pvalue > 1e-3, frequencies


def test_control_bank_offsets_and_counts():
    bank = ControlBank(np.array([2, 0, 2, 2, 0, 9]), np.array([True, False, True, False, True, False]))
    assert bank.group_ids.tolist() == [0, 2, 9]
    assert bank.cells.tolist() == [4, 0, 2]
    assert bank.offsets.tolist() == [0, 1, 3]
    assert bank.counts.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"^Pairing group 9 has no control cells to anchor on.$"):
        bank.positions(np.array([0, 9]))
    with pytest.raises(ValueError, match=r"^Pairing group 5 has no control cells to anchor on.$"):
        bank.positions(np.array([5]))
    with pytest.raises(ValueError, match=r"^groups and is_control must have one entry per cell, got 2 and 1.$"):
        ControlBank(np.array([0, 1]), np.array([True]))


def test_each_distributed_rank_draws_its_own_anchors(small_screen, monkeypatch):
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=8)
    anchors = []
    for rank in (0, 1):
        monkeypatch.setattr(pairing, "distributed_rank", lambda rank=rank: rank)
        loader = AnchoredAnnDataLoader(model.adata_manager, batch_size=64, shuffle=False, seed=0)
        anchors.append(next(iter(loader))["anchor_X"])
    assert not torch.equal(anchors[0], anchors[1])


def test_anchors_read_from_a_backed_file_stay_in_the_batchs_order(tmp_path, monkeypatch):
    """Without the dense control cache (controls over ``MAX_CACHE_BYTES``), anchors of a backed
    AnnData are read through scvi-tools' dataset, which returns rows sorted; each anchor must
    still be its own cell's, of the cell's context (about half were another type's)."""
    import anndata as ad

    from perturbscope.data import simulate_perturbseq

    adata, emb = simulate_perturbseq(n_genes=20, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
                                     n_cells_per_condition=15, embedding_dim=4, seed=0)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()  # not sorted by type
    adata.X = adata.X.toarray() + np.arange(adata.n_obs)[:, None] * 1000  # each row identifiable
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    ps.ScopeVI.setup_anndata(backed, "perturbation", gene_embeddings=emb, context_key="cell_type")
    model = ps.ScopeVI(backed, n_latent=2, n_hidden=8, effect_prior=False)
    monkeypatch.setattr(pairing, "MAX_CACHE_BYTES", 0)
    loader = AnchoredAnnDataLoader(model.adata_manager, indices=np.arange(backed.n_obs), shuffle=True, batch_size=16)
    assert loader.anchor_cache is None
    types = adata.obs["cell_type"].to_numpy()
    checked = 0
    for batch in loader:
        cells = (batch["X"][:, 0].numpy() // 1000).astype(int)
        anchors = (batch["anchor_X"][:, 0].numpy() // 1000).astype(int)
        assert (adata.obs["perturbation"].to_numpy()[anchors] == "control").all()
        assert (types[anchors] == types[cells]).all()
        checked += len(cells)
    assert checked == backed.n_obs
