"""Lightning DDP on two CPU processes: anchors per rank, and the fit matches a single process.

Lightning's DDP (``strategy="ddp_find_unused_parameters_true"``) launches the other rank by
re-running the script, so the fit runs in a subprocess executing a small script; every rank
writes what it saw to a JSON file.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np, scvi
    from lightning.pytorch.callbacks import Callback
    import perturbscope as ps
    from perturbscope.data import log1p_normalized, pseudobulk

    devices, loader, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    scvi.settings.seed = 0
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=60, n_perturbed_genes=12, n_combinations=6, n_cell_types=1,
        n_cells_per_condition=30, embedding_dim=8, seed=3)
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings)
    model = ps.ScopeVI(adata, n_latent=6, n_hidden=32, effect_prior=False)

    class Anchors(Callback):
        """Anchor rows of every training batch of the first epoch."""
        rows = []
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0:
                self.rows.append(batch["anchor_X"].cpu().numpy())

    # Some ScopeVAE parameters (e.g. the unperturbed prior) take no part in an anchored step.
    strategy = {"strategy": "ddp_find_unused_parameters_true"} if devices > 1 else {}
    model.train(max_epochs=10, batch_size=64 // devices, loader=loader, accelerator="cpu", devices=devices,
                enable_progress_bar=False, plan_kwargs={"lr": 3e-3}, callbacks=[Anchors()], **strategy)
    rank = model.trainer.global_rank

    is_control = (adata.obs["perturbation"] == "control").to_numpy()
    control_of_row = {row.tobytes(): int(i) for i, row in zip(np.flatnonzero(is_control),
                                                          adata.X[is_control].toarray().astype(np.float32))}
    anchors = [control_of_row.get(row.tobytes(), -1) for rows in Anchors.rows for row in rows]
    perturbations = model.training_perturbations
    controls = adata[is_control].copy()
    pred = model.predict(controls, perturbations, aggregate="mean", use_prior_mean=True)
    real = adata.copy()
    real.X = log1p_normalized(adata)
    truth = pseudobulk(real, "perturbation")
    control = truth.loc["control"]
    pearson = float(np.mean([np.corrcoef(truth.loc[p] - control, pred.layers["log1p_norm"][i] - control)[0, 1]
                             for i, p in enumerate(perturbations)]))
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump({"anchors": anchors, "n_controls": int(is_control.sum()), "pearson": pearson}, handle)
''')


def _fit(tmp_path, devices: int, loader: str) -> list[dict]:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{loader}-{devices}"
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(devices), loader, str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"{out.name}.rank{rank}.json").read_text()) for rank in range(devices)]


@pytest.mark.parametrize("loader", ["anndata", "device"])
def test_two_process_ddp_draws_anchors_per_rank_and_fits_like_one_process(tmp_path, loader):
    ranks = _fit(tmp_path, 2, loader)
    single = _fit(tmp_path, 1, loader)[0]
    for rank in ranks:
        anchors = np.array(rank["anchors"])
        assert (anchors >= 0).all()  # every anchor is a control cell's row
        # The pool is the whole pairing group: each rank sees far more controls than its shard holds.
        assert len(set(anchors)) > 0.75 * rank["n_controls"]
    assert ranks[0]["anchors"] != ranks[1]["anchors"]
    # The ranks hold one model (DDP keeps the replicas equal), so their predictions agree.
    assert ranks[0]["pearson"] == pytest.approx(ranks[1]["pearson"], abs=1e-3)
    assert single["pearson"] > 0.4
    assert ranks[0]["pearson"] == pytest.approx(single["pearson"], abs=0.05)
