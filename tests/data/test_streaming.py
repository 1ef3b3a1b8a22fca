"""Out-of-core reading: chunked rows, the streamed pseudobulk, the bounded control bank, the loader.

Every streamed result is compared with the in-memory one on the same cells: the pseudobulk bit
for bit, the bank's rows and the loader's batches row by row.
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import perturbscope as ps
from perturbscope.data import (
    AnchoredAnnDataLoader,
    StreamedAnnDataLoader,
    StreamedControlBank,
    bounded_control_sample,
    check_backing,
    check_count_data,
    check_finite,
    iter_row_chunks,
    log1p_expression,
    pseudobulk,
    read_soma,
    streamed_pseudobulk,
    take_rows,
)


def _screen(seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame]:
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=30, n_perturbed_genes=4, n_combinations=1, n_cells_per_condition=12, embedding_dim=8, seed=seed
    )
    adata.uns.pop("simulation", None)
    # two batches, so that pairing groups are context x batch
    adata.obs["lane"] = np.where(np.arange(adata.n_obs) % 2 == 0, "lane_a", "lane_b")
    return adata, embeddings


@pytest.fixture
def backed(tmp_path):
    """``(in-memory AnnData, the same cells opened backed, embeddings)``."""
    adata, embeddings = _screen()
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    opened = ad.read_h5ad(path, backed="r")
    yield adata, opened, embeddings
    opened.file.close()


def _labels(adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame({"perturbation": adata.obs["perturbation"].astype(str).to_numpy(),
                         "context": adata.obs["cell_type"].astype(str).to_numpy()}, index=adata.obs_names)


# ---------------------------------------------------------------- reading rows
def test_iter_row_chunks_covers_every_row_once_in_order(backed):
    adata, opened, _ = backed
    starts, blocks = zip(*iter_row_chunks(opened.X, chunk_size=7), strict=True)
    assert list(starts) == list(range(0, adata.n_obs, 7))
    assert sparse.issparse(blocks[0])
    np.testing.assert_array_equal(sparse.vstack(blocks).toarray(), adata.X.toarray())


def test_take_rows_reads_the_asked_rows(backed):
    adata, opened, _ = backed
    rows = np.array([0, 5, 6, 40, 41, 200])
    np.testing.assert_array_equal(take_rows(opened.X, rows, chunk_size=8), adata.X[rows].toarray())
    with pytest.raises(ValueError, match=r"^rows must be sorted and distinct\.$"):
        take_rows(opened.X, np.array([5, 1]))


# ---------------------------------------------------------------- pseudobulk
@pytest.mark.parametrize("chunk_size", [1, 13, 10_000])
def test_streamed_pseudobulk_equals_in_memory_exactly_on_counts(backed, chunk_size):
    adata, opened, _ = backed
    labels = _labels(adata)
    expected = pseudobulk(ad.AnnData(log1p_expression(adata), obs=labels), ["perturbation", "context"])
    means, counts = streamed_pseudobulk(opened.X, labels, ["perturbation", "context"], "counts", chunk_size)
    assert means.index.equals(expected.index)
    assert np.array_equal(means.to_numpy(), expected.to_numpy())  # bit for bit, not approximately
    expected_counts = labels.groupby(["perturbation", "context"]).size()
    np.testing.assert_array_equal(counts.to_numpy(), expected_counts.to_numpy())


def test_streamed_pseudobulk_equals_in_memory_exactly_on_dense_log_normalised(tmp_path):
    adata, _ = _screen(seed=3)
    adata.X = np.asarray(log1p_expression(adata), dtype=np.float32)  # dense: an HDF5 array when backed
    adata.write_h5ad(tmp_path / "dense.h5ad")
    opened = ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")
    try:
        labels = _labels(adata)
        expected = pseudobulk(ad.AnnData(log1p_expression(adata, None, "log1p_norm"), obs=labels), ["context"])
        means, counts = streamed_pseudobulk(opened.X, labels, ["context"], "log1p_norm", chunk_size=17)
        assert means.index.equals(expected.index)
        assert np.array_equal(means.to_numpy(), expected.to_numpy())
        assert counts.tolist() == labels["context"].value_counts().sort_index().tolist()
    finally:
        opened.file.close()


def test_streamed_pseudobulk_of_a_hand_computed_example():
    matrix = sparse.csr_matrix(np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 0.0]]))
    obs = pd.DataFrame({"g": ["b", "a", "b"]})
    means, counts = streamed_pseudobulk(matrix, obs, ["g"], "counts", chunk_size=2)
    b = (np.log1p([2500.0, 7500.0]) + np.log1p([10_000.0, 0.0])) / 2
    np.testing.assert_allclose(means.loc["b"].to_numpy(), b)
    np.testing.assert_allclose(means.loc["a"].to_numpy(), np.log1p([5000.0, 5000.0]))
    assert counts.to_dict() == {"a": 1, "b": 2}
    # as pseudobulk does: a cell without a label is an error, not a group called "nan"
    with pytest.raises(ValueError, match=re.escape("obs has missing values in the groupby columns {'g': 1}")):
        streamed_pseudobulk(matrix, pd.DataFrame({"g": ["b", None, "b"]}), ["g"], "counts", chunk_size=2)


# ---------------------------------------------------------------- control bank
def test_bounded_control_sample_bounds_every_group_and_keeps_small_ones():
    groups = np.repeat([0, 1, 2], [50, 30, 3])
    is_control = np.ones(83, dtype=bool)
    is_control[50:60] = False  # group 1 has 20 controls
    cells = bounded_control_sample(groups, is_control, max_per_group=10, seed=0)
    sizes = pd.Series(groups[cells]).value_counts().sort_index()
    assert sizes.to_dict() == {0: 10, 1: 10, 2: 3}
    assert is_control[cells].all()
    assert np.all(np.diff(cells) > 0)
    # different seeds sample different cells of the large groups
    assert not np.array_equal(cells, bounded_control_sample(groups, is_control, 10, seed=1))


def test_control_bank_is_bounded_and_samples_every_pairing_group(backed):
    adata, opened, _ = backed
    context = adata.obs["cell_type"].cat.codes.to_numpy()
    lane = (adata.obs["lane"] == "lane_b").to_numpy().astype(int)
    groups = context * 2 + lane
    is_control = (adata.obs["perturbation"] == "control").to_numpy()
    bank = StreamedControlBank(opened.X, groups, is_control, max_per_group=7, seed=0, chunk_size=16)
    assert bank.group_sizes() == {0: 7, 1: 7, 2: 7, 3: 7}  # every context x batch, each bounded
    assert bank.nbytes == 4 * 7 * 4 * adata.n_vars
    assert is_control[bank.cells].all()
    np.testing.assert_array_equal(bank.X.numpy(), adata.X[bank.cells].toarray())
    draws = bank.sampler(seed=0).sample(np.full(400, 3))
    assert set(draws) == set(bank.cells[groups[bank.cells] == 3])  # uniform over the bank's group 3
    np.testing.assert_array_equal(bank.expression(draws[:5]).numpy(), adata.X[draws[:5]].toarray())


# ---------------------------------------------------------------- loader
def _manager(adata, embeddings):
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type",
                             batch_key="lane")
    return ps.ScopeVI(adata, n_latent=3, n_hidden=8, effect_prior=False).adata_manager


def test_streamed_loader_visits_every_cell_once_with_anchors_of_its_group(backed):
    adata, opened, embeddings = backed
    manager = _manager(opened, embeddings)
    indices = np.arange(0, adata.n_obs, 3)
    loader = StreamedAnnDataLoader(manager, indices=indices, shuffle=True, batch_size=10, chunk_size=8,
                                   buffer_chunks=2, seed=0)
    rows = {tuple(r): i for i, r in enumerate(adata.X.toarray())}
    seen, anchors_ok, n_batches = [], True, 0
    for batch in loader:
        n_batches += 1
        cells = [rows[tuple(r)] for r in batch["X"].numpy()]
        seen.extend(cells)
        for cell, anchor in zip(cells, batch["anchor_X"].numpy(), strict=True):
            partner = adata.obs.iloc[rows[tuple(anchor)]]
            own = adata.obs.iloc[cell]
            anchors_ok &= bool(partner["perturbation"] == "control" and partner["cell_type"] == own["cell_type"]
                               and partner["lane"] == own["lane"])
    assert sorted(seen) == indices.tolist()
    assert anchors_ok
    assert n_batches == len(loader) == -(-len(indices) // 10)
    assert seen != sorted(seen)  # shuffled
    second = [rows[tuple(r)] for batch in loader for r in batch["X"].numpy()]
    assert second != seen  # a new block order each pass


def test_streamed_loader_batches_have_the_default_loaders_keys_and_dtypes(backed):
    adata, _, embeddings = backed
    manager = _manager(adata, embeddings)
    default = next(iter(AnchoredAnnDataLoader(manager, batch_size=16, shuffle=False)))
    streamed = next(iter(StreamedAnnDataLoader(manager, batch_size=16, shuffle=False)))
    assert sorted(default) == sorted(streamed)
    for key in default:
        assert default[key].dtype == streamed[key].dtype, key
        assert default[key].shape == streamed[key].shape, key
        if key != "anchor_X":
            assert torch.equal(default[key], streamed[key]), key  # the same first cells, in order


def test_block_shuffling_mixes_at_most_a_buffer_of_blocks(backed):
    adata, opened, embeddings = backed
    manager = _manager(opened, embeddings)
    loader = StreamedAnnDataLoader(manager, shuffle=True, batch_size=16, chunk_size=10, buffer_chunks=2, seed=1)
    rows = {tuple(r): i for i, r in enumerate(adata.X.toarray())}
    batch = next(iter(loader))
    blocks = {rows[tuple(r)] // 10 for r in batch["X"].numpy()}
    assert 1 <= len(blocks) <= 2


def test_distributed_ranks_get_disjoint_equal_shares(backed):
    _, opened, embeddings = backed
    manager = _manager(opened, embeddings)
    shares = []
    for rank in (0, 1):
        loader = StreamedAnnDataLoader(manager, shuffle=True, batch_size=8, chunk_size=10, seed=4)
        loader.rank, loader.world_size = rank, 2
        shares.append(np.concatenate([np.concatenate(b) for b in [loader._block_order()]]))
    assert len(shares[0]) == len(shares[1]) == opened.n_obs // 2
    assert not set(shares[0]) & set(shares[1])


def test_splitter_loaders_share_one_copy_of_the_labels_and_groups(backed):
    adata, opened, embeddings = backed
    manager = _manager(opened, embeddings)
    splitter = ps.data.StreamedDataSplitter(manager, batch_size=16, chunk_size=10, seed=0)
    splitter.setup()
    train, val = splitter.train_dataloader(), splitter.val_dataloader()
    assert sorted(train.tensors) == ["batch", "context", "perturbation_genes"]
    for key, tensor in train.tensors.items():
        assert val.tensors[key] is tensor, key  # one copy, not one per loader
    assert train.groups is val.groups is splitter.control_bank.groups
    # and the shared tensors are the cells' own: each batch's labels match its rows
    rows = {tuple(r): i for i, r in enumerate(adata.X.toarray())}
    codes = adata.obs["lane"].astype("category").cat.codes.to_numpy()
    for batch in val:
        cells = [rows[tuple(r)] for r in batch["X"].numpy()]
        np.testing.assert_array_equal(batch["batch"].numpy().ravel(), codes[cells])


def test_a_control_bank_of_other_cells_is_refused(backed):
    _, opened, embeddings = backed
    manager = _manager(opened, embeddings)
    bank = StreamedControlBank(np.zeros((4, opened.n_vars)), np.zeros(4), np.ones(4, bool))
    with pytest.raises(ValueError, match=rf"^control_bank holds the pairing groups of 4 cells, but the AnnData "
                                         rf"has {opened.n_obs}\.$"):
        StreamedAnnDataLoader(manager, control_bank=bank)


# ---------------------------------------------------------------- SOMA
def test_read_soma_reads_rows_like_the_anndata(tmp_path):
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    adata, _ = _screen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uri = tiledbsoma_io.from_anndata(str(tmp_path / "soma"), adata, "RNA", uns_keys=[])
    soma = read_soma(uri)
    assert soma.shape == adata.shape
    assert list(soma.obs_names) == list(adata.obs_names)
    assert list(soma.var_names) == list(adata.var_names)
    assert soma.obs["perturbation"].astype(str).tolist() == adata.obs["perturbation"].astype(str).tolist()
    dense = adata.X.toarray()
    np.testing.assert_array_equal(soma.X[10:30].toarray(), dense[10:30])
    np.testing.assert_array_equal(soma.X[np.array([40, 3, 3])].toarray(), dense[[40, 3, 3]])
    np.testing.assert_array_equal(soma[np.arange(adata.n_obs) % 5 == 0].X.toarray(), dense[::5])
    with pytest.raises(KeyError, match=r"^\"X layer 'counts' not in measurement 'RNA'; it has \['data'\]\.\"$"):
        read_soma(uri, X_name="counts")
    # reading a few obs columns keeps the cells' names (they were the joinids)
    some = read_soma(uri, obs_column_names=["perturbation"])
    assert list(some.obs_names) == list(adata.obs_names)
    assert list(some.obs.columns) == ["perturbation"]


# ---------------------------------------------------------------- checks
def test_check_backing_rejects_a_backed_csc_matrix_with_the_fix(tmp_path):
    adata, _ = _screen()
    adata.X = sparse.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    opened = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match=(
            r"^adata\.X is a CSC matrix on disk \(backed\), which cannot be streamed by rows; rewrite it as "
            r"CSR once, e\.g\. a = anndata\.read_h5ad\(path\); a\.X = a\.X\.tocsr\(\); a\.write_h5ad\(new_path\), "
            r"then open new_path with backed='r' \(or load adata\.to_memory\(\) before setup\)\.$"
        )):
            check_backing(opened)
    finally:
        opened.file.close()


def test_checks_stream_a_backed_matrix_chunk_by_chunk(tmp_path):
    adata, _ = _screen()
    adata.X = adata.X.toarray()
    adata.X[1500 % adata.n_obs, 3] = 0.5  # one bad value, far from the first chunk
    adata.X[7, 2] = np.inf
    adata.write_h5ad(tmp_path / "bad.h5ad")
    opened = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match=r"^adata\.X has NaN or infinite values in 1 entries; every value"):
            check_finite(opened.X, None)
        with pytest.raises(ValueError, match=r"^adata\.X has NaN or inf values; count likelihoods need finite"):
            check_count_data(opened.X, None)
    finally:
        opened.file.close()


def test_pseudobulk_of_a_backed_anndata_points_to_the_streamed_one(tmp_path):
    adata, _ = _screen()
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(ValueError, match=re.escape("use perturbscope.data.streamed_pseudobulk(matrix, obs, groupby")):
        pseudobulk(backed, "perturbation")
