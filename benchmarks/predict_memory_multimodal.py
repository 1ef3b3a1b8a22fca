"""Peak memory of a multimodal (RNA + ATAC) ``predict``: the streamed mean against the cells.

A multimodal ScopeVI (effect prior on) is trained for one epoch on a simulated multiome screen
(200 genes, ``--peaks`` ATAC peaks; its 5 simulated proteins are not registered), then saved. For every size ``perturbations x control
cells`` a fresh process loads the model and the control cells and predicts, as
``predict_memory.py`` does (same peak readings): once with ``aggregate="mean"``, which keeps
running sums per (perturbation, context) for every modality, and, for the sizes in
``--cells``, once per cell (``aggregate=None``), which must hold every predicted cell of every
modality in memory (it returns them). Both runs are in the same script run, so the ratio of
their peaks is measured, not estimated. "cells hold" is ``8 x pairs x features`` of ``X`` and
``log1p_norm`` over both modalities.

    python benchmarks/predict_memory_multimodal.py [--sizes 10x500,10x2000] [--cells 10x500] [--peaks 20000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mudata as md
import numpy as np
import scvi
import torch
from predict_memory import _peak_mb, _status_mb, child_arguments, parse_sizes, run_child

import perturbscope as ps

N_GENES = 200
N_PERTURBED = 20


def child(folder: Path, n_perturbations: int, n_controls: int, batch_size: int, aggregate: str | None) -> None:
    """Load, predict and print one JSON line with the peaks (run in a fresh process)."""
    torch.set_num_threads(1)
    model = ps.ScopeVI.load(str(folder / "model"))
    controls = md.read_h5mu(folder / "controls.h5mu")[:n_controls].copy()
    perturbations = model.training_perturbations[:n_perturbations]
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident memory
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = model.predict(controls, perturbations, aggregate=aggregate, batch_size=batch_size, seed=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"before_mb": before, "peak_mb": _status_mb("VmHWM"), "process_peak_mb": _peak_mb(),
                      "seconds": seconds, "rows": int(result.n_obs)}))


def train(folder: Path, n_controls: int, n_peaks: int) -> int:
    """Train and save the model and the control cells; the number of features of both modalities."""
    scvi.settings.seed = 0
    torch.set_num_threads(1)
    mdata, embeddings = ps.data.simulate_multimodal_perturbseq(
        n_genes=N_GENES, n_perturbed_genes=N_PERTURBED, n_combinations=0, n_proteins=5, n_peaks=n_peaks,
        n_cell_types=2, n_cells_per_condition=10, n_control_cells=n_controls // 2 + 1, embedding_dim=16, seed=0,
    )
    labels = mdata.obs["perturbation"].astype(str).to_numpy()
    controls = mdata[labels == "control"].copy()  # before setup: mudata cannot copy setup's views
    order = np.random.default_rng(0).permutation(controls.n_obs)  # both cell types in every prefix
    controls[order].copy().write_h5mu(folder / "controls.h5mu")
    ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=embeddings, context_key="cell_type",
                            modalities={"rna_layer": "rna", "atac_layer": "atac"})
    model = ps.ScopeVI(mdata, n_latent=10, n_hidden=64)
    start = time.perf_counter()
    model.train(max_epochs=1, enable_progress_bar=False)
    print(f"trained on {mdata.n_obs} cells x {N_GENES} genes + {n_peaks} peaks in "
          f"{time.perf_counter() - start:.0f} s")
    model.save(str(folder / "model"), save_anndata=True)
    return N_GENES + n_peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10x500,10x2000", help="comma-separated PERTURBATIONSxCONTROLS")
    parser.add_argument("--cells", default="10x500", help="sizes also predicted per cell, comma-separated")
    parser.add_argument("--peaks", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*child_arguments(args.child))
        return
    sizes, cells = parse_sizes(args.sizes), parse_sizes(args.cells)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_features = train(folder, max(n for _, n in sizes + cells), args.peaks)
        print(f"batch_size {args.batch_size}")
        print(f"{'perturbations':>13} {'controls':>9} {'output':>7} {'process peak MB':>16} {'predict peak MB':>16} "
              f"{'predict adds MB':>16} {'cells hold MB':>14} {'seconds':>8}")
        for p, n, aggregate in [(p, n, "mean") for p, n in sizes] + [(p, n, "none") for p, n in cells]:
            result = run_child(__file__, folder, p, n, args.batch_size, aggregate)
            held = 8 * p * n * n_features / 2**20
            print(f"{p:>13} {n:>9} {'mean' if aggregate == 'mean' else 'cells':>7} "
                  f"{result['process_peak_mb']:>16.0f} {result['peak_mb']:>16.0f} "
                  f"{result['peak_mb'] - result['before_mb']:>16.0f} {held:>14.0f} {result['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
