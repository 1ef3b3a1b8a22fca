import re

import anndata as ad
import numpy as np
import pytest
import scvi
import torch
from scipy import stats

import perturbscope as ps
from perturbscope.data import AnchoredDataSplitter, DeviceDataSplitter, log1p_normalized, pseudobulk
from perturbscope.data import _device as device_module
from perturbscope.data._device import DeviceBatches, format_bytes


@pytest.fixture
def model(small_screen):
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    return ps.ScopeVI(adata, n_latent=3, n_hidden=8, effect_prior=False)


def _control_rows(adata) -> dict[str, set[tuple]]:
    is_control = adata.obs["perturbation"] == "control"
    return {
        ct: {tuple(row) for row in adata[is_control & (adata.obs["cell_type"] == ct)].X.toarray()}
        for ct in adata.obs["cell_type"].cat.categories
    }


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_batches_have_the_default_loaders_keys_dtypes_and_rows(model, layout):
    adata = model.adata
    default = AnchoredDataSplitter(model.adata_manager, batch_size=32, shuffle_set_split=False)
    device = DeviceDataSplitter(model.adata_manager, batch_size=32, shuffle_set_split=False, layout=layout,
                                device="cpu")
    default.setup()
    device.setup()
    expected = next(iter(default.train_dataloader()))
    got = next(iter(device.train_dataloader()))
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].shape == expected[key].shape, key
    # The validation loader is in order: its rows are those of the validation cells, exactly.
    val = list(device.val_dataloader())
    assert len(val) == len(device.val_idx) // 32 + 1
    np.testing.assert_array_equal(torch.cat([b["X"] for b in val]).numpy(), adata.X[device.val_idx].toarray())
    codes = torch.cat([b["context"] for b in val]).numpy().ravel()
    np.testing.assert_array_equal(codes, adata.obs["cell_type"].cat.codes.to_numpy()[device.val_idx])
    controls = _control_rows(adata)
    categories = adata.obs["cell_type"].cat.categories
    for batch in val:
        for row, code in zip(batch["anchor_X"].numpy(), batch["context"].numpy().ravel()):
            assert tuple(row) in controls[categories[int(code)]]


def test_external_indexing_is_honoured_and_training_cells_are_each_seen_once(model):
    rng = np.random.default_rng(0)
    order = rng.permutation(model.adata.n_obs)
    train, val, test = np.sort(order[:200]), np.sort(order[200:260]), np.sort(order[260:])
    splitter = DeviceDataSplitter(model.adata_manager, batch_size=64, external_indexing=[train, val, test],
                                  device="cpu")
    splitter.setup()
    np.testing.assert_array_equal(splitter.train_idx, train)
    np.testing.assert_array_equal(splitter.val_idx, val)
    np.testing.assert_array_equal(splitter.test_idx, test)
    loader = splitter.train_dataloader()
    first, second = loader.rows(0).numpy(), loader.rows(1).numpy()
    np.testing.assert_array_equal(np.sort(first), train)
    assert not np.array_equal(first, second)  # a new permutation each epoch
    assert [len(b["X"]) for b in loader] == [64, 64, 64, 8]
    assert sum(len(b["X"]) for b in splitter.test_dataloader()) == len(test)


def test_anchors_are_uniform_over_the_pairing_group(model):
    adata = model.adata
    splitter = DeviceDataSplitter(model.adata_manager, device="cpu")
    splitter.setup()
    store = splitter.store
    generator = torch.Generator().manual_seed(0)
    cell_type = adata.obs["cell_type"].to_numpy()
    is_control = (adata.obs["perturbation"] == "control").to_numpy()
    for ct in np.unique(cell_type):
        rows = np.flatnonzero(cell_type == ct)
        pool = np.flatnonzero(is_control & (cell_type == ct))
        draws = store.anchors(torch.as_tensor(np.resize(rows, 200 * len(pool))), generator).numpy()
        assert set(draws) <= set(pool)
        frequencies = np.bincount(np.searchsorted(pool, draws), minlength=len(pool))
        assert stats.chisquare(frequencies).pvalue > 1e-3, frequencies


def test_ranks_take_disjoint_shards_and_draw_their_own_anchors(model):
    splitter = DeviceDataSplitter(model.adata_manager, device="cpu", batch_size=16)
    splitter.setup()
    ranks = [DeviceBatches(splitter.store, splitter.train_idx, 16, shuffle=True, drop_last=False, seed=3,
                           rank=rank, world_size=2) for rank in (0, 1)]
    shards = [r.rows(0).numpy() for r in ranks]
    n_train = len(splitter.train_idx)
    assert len(shards[0]) == len(shards[1]) == -(-n_train // 2)
    assert set(shards[0]) | set(shards[1]) == set(splitter.train_idx)
    assert len(set(shards[0]) & set(shards[1])) == 2 * len(shards[0]) - n_train  # padding only
    rows = torch.as_tensor(shards[0][:50])
    a0 = splitter.store.anchors(rows, ranks[0].anchor_generator)
    a1 = splitter.store.anchors(rows, ranks[1].anchor_generator)
    assert not torch.equal(a0, a1)


def test_too_big_for_the_device(model, monkeypatch):
    monkeypatch.setattr(device_module, "available_memory", lambda device: 10_000)
    adata = model.adata
    n, g = adata.shape
    # CSR expression (12 bytes a stored value, 8 a row pointer) plus 8 bytes for each of the
    # 4 other registered columns (2 perturbation genes, context, batch) and 2 index columns.
    needed = adata.X.nnz * 12 + (n + 1) * 8 + n * 8 * 6
    with pytest.raises(MemoryError, match=(
        rf"^DeviceDataSplitter: the registered data need {format_bytes(needed)} on cpu \(CSR expression "
        rf"of {n} cells x {g} genes\), but memory_fraction=0.8 of the 9.77 KiB free there allows "
        r"7.81 KiB. Train with the default anchored loader instead.$")):
        DeviceDataSplitter(model.adata_manager, device="cpu")


def test_bad_arguments(model):
    with pytest.raises(TypeError, match=r"^DeviceDataSplitter got unexpected keyword arguments \['shuffle'\].$"):
        DeviceDataSplitter(model.adata_manager, shuffle=True)
    with pytest.raises(ValueError, match=r"^layout must be 'auto', 'dense' or 'csr', got 'coo'.$"):
        DeviceDataSplitter(model.adata_manager, layout="coo")
    with pytest.raises(ValueError, match=r"^memory_fraction must be in \(0, 1\], got 0.$"):
        DeviceDataSplitter(model.adata_manager, memory_fraction=0)


def test_backed_expression_is_refused_on_entry(small_screen, tmp_path):
    adata, embeddings = small_screen
    adata = adata.copy()
    adata.uns.pop("simulation", None)
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        ps.ScopeVI.setup_anndata(backed, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
        manager = ps.ScopeVI(backed, n_latent=3, n_hidden=8, effect_prior=False).adata_manager
        with pytest.raises(ValueError, match=(
            r"^DeviceDataSplitter copies all the expression to the device, but the registered expression is "
            rf"read from the backed file {re.escape(repr(str(path)))}; train with loader='streamed', or load it "
            r"into memory with adata\.to_memory\(\) and set it up again\.$"
        )):
            DeviceDataSplitter(manager, device="cpu")
        assert isinstance(backed.X, ad.abc.CSRDataset)  # nothing was loaded
    finally:
        backed.file.close()


def _shift_pearson(loader: str, seed: int) -> float:
    """Mean Pearson, over the screen's perturbations, of predicted vs observed shifts from control."""
    scvi.settings.seed = seed
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=60, n_perturbed_genes=12, n_combinations=6, n_cell_types=1,
        n_cells_per_condition=30, embedding_dim=8, seed=3,
    )
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings)
    model = ps.ScopeVI(adata, n_latent=6, n_hidden=32, effect_prior=False)
    model.train(max_epochs=15, batch_size=64, loader=loader, enable_progress_bar=False, plan_kwargs={"lr": 3e-3})
    perturbations = model.training_perturbations
    controls = adata[adata.obs["perturbation"] == "control"].copy()
    pred = model.predict(controls, perturbations, aggregate="mean", use_prior_mean=True)
    real = adata.copy()
    real.X = log1p_normalized(adata)
    truth = pseudobulk(real, "perturbation")
    control = truth.loc["control"]
    return float(np.mean([np.corrcoef(truth.loc[p] - control, pred.layers["log1p_norm"][i] - control)[0, 1]
                          for i, p in enumerate(perturbations)]))


def test_device_path_predicts_as_well_as_the_default_path():
    default = [_shift_pearson("anndata", seed) for seed in (0, 1)]
    device = _shift_pearson("device", 0)
    seed_noise = abs(default[0] - default[1])
    assert device > 0.5, (device, default)
    assert abs(device - np.mean(default)) <= max(3 * seed_noise, 0.05), (device, default)


def test_sparse_protein_and_atac_batches_match_the_default_loader():
    """The simulator and real ECCITE-seq store protein and ATAC as CSR; the device store holds them
    densely, and its validation batches carry the same rows as the default loader's."""
    import mudata as md

    md.set_options(pull_on_update=False)
    mdata, emb = ps.data.simulate_multimodal_perturbseq(
        n_genes=30, n_perturbed_genes=4, n_combinations=1, n_proteins=6, n_peaks=8, n_cells_per_condition=6,
        embedding_dim=4)
    assert mdata["adt"].X.format == "csr"
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=emb, context_key="cell_type",
                            modalities={"rna_layer": "rna", "protein_layer": "adt", "atac_layer": "atac"})
    model = ps.ScopeVI(mdata, n_latent=3, n_hidden=8, effect_prior=False)
    device = DeviceDataSplitter(model.adata_manager, batch_size=16, shuffle_set_split=False, device="cpu")
    device.setup()
    val = list(device.val_dataloader())
    for key, name in (("proteins", "adt"), ("atac", "atac")):
        got = torch.cat([b[key] for b in val]).numpy()
        np.testing.assert_array_equal(got, mdata[name].X[device.val_idx].toarray())
