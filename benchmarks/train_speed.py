"""Time ScopeVI against plain scvi.model.SCVI per training epoch, in one run.

Both models see the same simulated 20,000 cells x 2,000 genes (NB counts), the same batch
size, hidden width, depth and latent size; the ratio ScopeVI / SCVI seconds per epoch is
printed. Target: at most 1.3x.

    python benchmarks/train_speed.py [--cells 20000] [--genes 2000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time

import scvi
import torch
from lightning.pytorch.callbacks import Callback

import perturbscope as ps


class EpochTimer(Callback):
    """Record the wall time of each training epoch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


def seconds_per_epoch(model, epochs: int, batch_size: int) -> float:
    timer = EpochTimer()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, enable_progress_bar=False,
                callbacks=[timer], check_val_every_n_epoch=None)
    steady = timer.times[1:] or timer.times  # the first epoch pays one-off start-up costs
    return sum(steady) / len(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    scvi.settings.seed = 0
    n_perturbed, n_combinations, n_types = 100, 50, 2
    n_conditions = 1 + n_perturbed + n_combinations
    per_condition = max(1, args.cells // (n_types * (n_conditions + 3)))
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=args.genes, n_perturbed_genes=n_perturbed, n_combinations=n_combinations,
        n_cell_types=n_types, n_cells_per_condition=per_condition, n_control_cells=4 * per_condition,
        embedding_dim=64, seed=0,
    )
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes; torch threads {torch.get_num_threads()}")
    common = {"n_latent": 16, "n_hidden": 128, "n_layers": 2}

    scvi_data = adata.copy()
    scvi.model.SCVI.setup_anndata(scvi_data, batch_key="cell_type")
    scvi_model = scvi.model.SCVI(scvi_data, gene_likelihood="nb", **common)
    scvi_seconds = seconds_per_epoch(scvi_model, args.epochs, args.batch_size)

    scope_data = adata.copy()
    ps.ScopeVI.setup_anndata(scope_data, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    scope_model = ps.ScopeVI(scope_data, gene_likelihood="nb", **common)
    scope_seconds = seconds_per_epoch(scope_model, args.epochs, args.batch_size)

    print(f"SCVI    : {scvi_seconds:.2f} s/epoch")
    print(f"ScopeVI : {scope_seconds:.2f} s/epoch")
    print(f"ratio ScopeVI / SCVI: {scope_seconds / scvi_seconds:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
