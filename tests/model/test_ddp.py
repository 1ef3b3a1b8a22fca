"""Lightning DDP on two CPU processes: anchors per rank, shards, and a fit as good as one process.

Lightning's DDP launcher starts the other rank by re-running the script, so the fits run in a
subprocess executing a small script, launched once: the launching process first fits the
single-process reference (before any process group exists), then both ranks fit through the
default loader and through the device loader, in turn, each under
``strategy="ddp_find_unused_parameters_true"``. Every rank writes what it saw (the cells and the
anchors of its first epoch's batches) and the quality of its model on held-out combinations to
a JSON file.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np, scvi
    from lightning.pytorch.callbacks import Callback
    import perturbscope as ps
    from perturbscope.data import log1p_normalized, pseudobulk

    out = sys.argv[1]
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=60, n_perturbed_genes=12, n_combinations=6, n_cell_types=1,
        n_cells_per_condition=30, embedding_dim=8, seed=3)
    adata.uns.pop("simulation", None)
    held_out = adata.obs["perturbation"].str.contains("+", regex=False).to_numpy()
    train, test = adata[~held_out].copy(), adata[held_out].copy()
    cell_of_row = {row.tobytes(): i for i, row in enumerate(train.X.toarray().astype(np.float32))}
    is_control = (train.obs["perturbation"] == "control").to_numpy()
    combinations = sorted(set(test.obs["perturbation"]))

    def log1p_pseudobulk(data):
        frame = data.copy()
        frame.X = log1p_normalized(data)
        return pseudobulk(frame, "perturbation")

    truth = log1p_pseudobulk(adata)
    control = truth.loc["control"].to_numpy()

    class FirstEpoch(Callback):
        """Cells and anchors (as cell indices) of every training batch of the first epoch."""
        def __init__(self):
            self.cells, self.anchors = [], []
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0:
                self.cells += [cell_of_row.get(r.tobytes(), -1) for r in batch["X"].cpu().numpy()]
                self.anchors += [cell_of_row.get(r.tobytes(), -1) for r in batch["anchor_X"].cpu().numpy()]

    def fit(devices, loader):
        scvi.settings.seed = 0
        data = train.copy()
        ps.ScopeVI.setup_anndata(data, "perturbation", gene_embeddings=embeddings)
        model = ps.ScopeVI(data, n_latent=6, n_hidden=32, effect_prior=False)
        seen = FirstEpoch()
        # Some ScopeVAE parameters (e.g. the unperturbed prior) take no part in an anchored step.
        strategy = {"strategy": "ddp_find_unused_parameters_true"} if devices > 1 else {}
        model.train(max_epochs=25, batch_size=64 // devices, loader=loader, accelerator="cpu", devices=devices,
                    enable_progress_bar=False, enable_model_summary=False, logger=False,
                    plan_kwargs={"lr": 3e-3}, callbacks=[seen], **strategy)
        # held-out combinations: mean Pearson of predicted and observed shifts from the controls
        predicted = model.predict(train[is_control].copy(), combinations, aggregate="mean", use_prior_mean=True)
        pearson = np.mean([np.corrcoef(truth.loc[p].to_numpy() - control,
                                       predicted.layers["log1p_norm"][i] - control)[0, 1]
                           for i, p in enumerate(predicted.obs["perturbation"])])
        return model, {"pearson": float(pearson), "cells": seen.cells, "anchors": seen.anchors,
                       "train_indices": [int(i) for i in model.train_indices]}

    # the baseline a fit must beat: every held-out combination predicted as the training perturbations' mean shift
    mean_shift = np.mean([truth.loc[p].to_numpy() - control for p in set(train.obs["perturbation"]) - {"control"}], 0)
    baseline = np.mean([np.corrcoef(truth.loc[p].to_numpy() - control, mean_shift)[0, 1] for p in combinations])
    results = {"controls": np.flatnonzero(is_control).tolist(), "baseline": float(baseline)}
    if "LOCAL_RANK" not in os.environ:  # the launching process, before any process group exists
        results["single"] = fit(1, "anndata")[1]
    for loader in ("anndata", "device"):
        model, results[loader] = fit(2, loader)
    with open(f"{out}.rank{model.trainer.global_rank}.json", "w") as handle:
        json.dump(results, handle)
''')


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks wrote; rank 0 also holds the single-process reference."""
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "fit.py"
    script.write_text(SCRIPT)
    # one thread per process; NUMBA_NUM_THREADS too, since numba's OpenMP layer (loaded by dcor)
    # otherwise resets torch's thread count to every core
    env = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(folder / "fit")], cwd=folder,
                            capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((folder / f"fit.rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("loader", ["anndata", "device"])
def test_each_rank_draws_anchors_from_the_whole_pairing_group(ranks, loader):
    controls = set(ranks[0]["controls"])
    for rank in ranks:
        anchors = rank[loader]["anchors"]
        assert set(anchors) <= controls  # every anchor is a control cell's row
        # The pool is the whole pairing group: each rank sees far more controls than its shard holds.
        assert len(set(anchors)) > 0.75 * len(controls)
    assert ranks[0][loader]["anchors"] != ranks[1][loader]["anchors"]  # each rank its own draws


@pytest.mark.parametrize("loader", ["anndata", "device"])
def test_ranks_share_the_training_cells_between_them(ranks, loader):
    cells = [rank[loader]["cells"] for rank in ranks]
    training = set(ranks[0][loader]["train_indices"])
    assert ranks[1][loader]["train_indices"] == ranks[0][loader]["train_indices"]  # one split
    assert len(cells[0]) == len(cells[1]) == -(-len(training) // 2)  # equal shards, padded
    assert set(cells[0]) | set(cells[1]) == training
    assert len(set(cells[0]) & set(cells[1])) <= 1  # at most the padding cell is repeated


@pytest.mark.parametrize("loader", ["anndata", "device"])
def test_two_process_fit_predicts_held_out_combinations_like_one_process(ranks, loader):
    single = ranks[0]["single"]["pearson"]
    assert "single" not in ranks[1]  # the reference ran once, in the launching process only
    assert single > ranks[0]["baseline"] + 0.3  # the reference learnt the combinations
    # The ranks hold one model (DDP keeps the replicas equal), so their predictions agree.
    assert ranks[0][loader]["pearson"] == pytest.approx(ranks[1][loader]["pearson"], abs=1e-3)
    assert ranks[0][loader]["pearson"] == pytest.approx(single, abs=0.05)
