"""Epoch time and cells/s of SCVI and of ScopeVI on each of its in-memory training paths, in one run.

Paths, all with the same architecture (n_latent 16, n_hidden 128, 2 layers, NB) on the same
simulated screen (``simulate_perturbseq``), at each batch size:

- ``SCVI``: ``scvi.model.SCVI`` with scvi-tools' own loader (the reference);
- ``ScopeVI anchored``: ScopeVI with its default loader,
  :class:`perturbscope.data.AnchoredDataSplitter` (``loader="anndata"``: host-side batches,
  control anchors added);
- ``ScopeVI device``: ScopeVI with :class:`perturbscope.data.DeviceDataSplitter`
  (``loader="device"``: data, batches and anchors on the training device);
- ``ScopeVI device+compile`` (with ``--compile``): the device path with ScopeVI's training plan,
  :class:`perturbscope.model.ScopeTrainingPlan`, compiling the forward pass (``compile=True``;
  ``mode="reduce-overhead"``, i.e. CUDA graphs, on a GPU and ``"default"`` on CPU; the first,
  untimed epoch pays the compilation, and the one recompilation for the smaller last batch). A
  row whose compilation failed and fell back to the eager module is marked ``(eager fallback)``.

ScopeVI is built with ``effect_prior=False`` so that both models train on every cell
(``train_size=1.0``) and only the training loop is timed; the first epoch pays one-off start-up
costs and is left out of the average. Ratio = ScopeVI s/epoch / SCVI s/epoch (target <= 1.3x).
Runs unchanged on CPU and on a GPU: training uses ``accelerator="auto"`` (the first CUDA
device when there is one), the device loader puts the data on the trainer's device, and epoch
times are taken after ``torch.cuda.synchronize()``. Streamed (backed / SOMA) paths and
peak memory are measured by ``benchmarks/scale_streamed.py``.

    python benchmarks/scale.py [--cells 20000] [--genes 2000] [--epochs 3] [--batch-sizes 128 1024]
                               [--compile]
"""

from __future__ import annotations

import argparse
import time

import scvi
import torch
from lightning.pytorch.callbacks import Callback

import perturbscope as ps

ARCHITECTURE = {"n_latent": 16, "n_hidden": 128, "n_layers": 2, "gene_likelihood": "nb"}


class EpochTimer(Callback):
    """Wall time of each training epoch (synchronised with the accelerator)."""

    def __init__(self):
        self.times: list[float] = []

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def seconds_per_epoch(model, epochs: int, batch_size: int, **train_kwargs) -> float:
    """Mean wall time of the epochs after the first."""
    timer = EpochTimer()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, enable_progress_bar=False,
                callbacks=[timer], check_val_every_n_epoch=None, **train_kwargs)
    steady = timer.times[1:]
    return sum(steady) / len(steady)


def simulated_screen(n_cells: int, n_genes: int):
    """A screen of about ``n_cells`` cells: 100 single and 50 double perturbations in 2 cell types."""
    n_perturbed, n_combinations, n_types = 100, 50, 2
    n_conditions = 1 + n_perturbed + n_combinations
    per_condition = max(1, n_cells // (n_types * (n_conditions + 3)))
    return ps.data.simulate_perturbseq(
        n_genes=n_genes, n_perturbed_genes=n_perturbed, n_combinations=n_combinations,
        n_cell_types=n_types, n_cells_per_condition=per_condition, n_control_cells=4 * per_condition,
        embedding_dim=64, seed=0,
    )


def scopevi(adata, embeddings):
    """A fresh ScopeVI on its own copy of ``adata``."""
    data = adata.copy()
    ps.ScopeVI.setup_anndata(data, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    return ps.ScopeVI(data, effect_prior=False, **ARCHITECTURE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--compile", action="store_true", help="also time the compiled training plan")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")

    scvi.settings.seed = 0
    adata, embeddings = simulated_screen(args.cells, args.genes)
    accelerator = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes; {accelerator}; "
          f"torch threads {torch.get_num_threads()}; {args.epochs - 1} timed epochs per row")

    print(f"{'path':<24}{'batch':>7}{'s/epoch':>10}{'cells/s':>10}{'vs SCVI':>9}", flush=True)

    def report(name: str, batch_size: int, seconds: float, reference: float) -> None:
        print(f"{name:<24}{batch_size:>7}{seconds:>10.2f}{adata.n_obs / seconds:>10.0f}"
              f"{seconds / reference:>8.2f}x", flush=True)

    for batch_size in args.batch_sizes:
        scvi_data = adata.copy()
        scvi.model.SCVI.setup_anndata(scvi_data, batch_key="cell_type")
        reference = seconds_per_epoch(scvi.model.SCVI(scvi_data, **ARCHITECTURE), args.epochs, batch_size)
        report("SCVI", batch_size, reference, reference)
        paths = [("ScopeVI anchored", {"loader": "anndata"}), ("ScopeVI device", {"loader": "device"})]
        if args.compile:
            paths.append(("ScopeVI device+compile", {"loader": "device", "plan_kwargs": {"compile": True}}))
        for name, kwargs in paths:
            model = scopevi(adata, embeddings)
            seconds = seconds_per_epoch(model, args.epochs, batch_size, **kwargs)
            if "plan_kwargs" in kwargs and not model.trainer.lightning_module.is_compiled:
                name += " (eager fallback)"
            report(name, batch_size, seconds, reference)
    print("target: ScopeVI / SCVI <= 1.3x at every batch size")


if __name__ == "__main__":
    main()
