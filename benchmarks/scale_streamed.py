"""Out-of-core training of ScopeVI: speed of each data path, and peak memory against cells.

Two measurements, printed in one run:

1. **Speed.** One screen of ``--speed-cells`` cells x 2,000 genes, trained (VAE only, NB counts,
   ``batch_size`` 512) for two epochs through each data path: the in-memory default loader
   (``loader="anndata"``), a backed h5ad (``loader="streamed"``) and a local TileDB-SOMA store
   (:func:`perturbscope.data.read_soma`, streamed). The second epoch's wall time (a Lightning
   callback) and cells per second are printed, with the ratios to the in-memory path.
2. **Peak memory.** For each size in ``--sizes`` (default 50k, 200k, 800k cells x 2,000 genes) a
   fresh Python process opens the backed h5ad, sets it up, builds ScopeVI (which checks the
   counts in chunks), runs the effect prior's pseudobulk pass and ``--steps`` training steps of
   the streamed loader (its bounded control bank included), then reports
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. These are the parts that grow with cells; the
   prior's cross-fitting and the validation of the correction weights work on group means and
   on at most 500 controls per context and 200 cells per query, whatever the number of cells,
   and are left out to keep the run short. Target: the peak at the largest size within 1.3x of
   the peak at the smallest.

Data: :func:`perturbscope.data.simulate_perturbseq` simulates one screen of ~6,400 cells (the
simulator costs milliseconds per cell, too slow for 800k cells on a laptop); larger screens tile
it, each copy binomially thinned (p = 0.9) so that no two cells are equal, and are written to the
h5ad chunk by chunk (``anndata.io.sparse_dataset(...).append``), so generating them never holds
more than one copy in memory.

    python benchmarks/scale_streamed.py [--sizes 50000,200000,800000] [--speed-cells 20000]
                                        [--steps 20] [--workdir DIR]

``--sizes ""`` skips the memory series and ``--speed-cells 0`` the speed comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scvi
from scipy import sparse

import perturbscope as ps

N_GENES = 2000
BATCH_SIZE = 512


def _base_screen() -> tuple[ad.AnnData, pd.DataFrame]:
    adata, embeddings = ps.data.simulate_perturbseq(
        n_genes=N_GENES, n_perturbed_genes=40, n_combinations=20, n_cells_per_condition=50,
        mean_library_size=1500.0, seed=0,
    )
    adata.uns.pop("simulation", None)
    return adata, embeddings


def _tile(base: ad.AnnData, copy: int, n: int) -> sparse.csr_matrix:
    """Copy ``copy`` of the base screen's counts (first ``n`` cells), binomially thinned."""
    rng = np.random.default_rng(copy)
    X = base.X[:n].tocsr(copy=True)
    X.data = rng.binomial(X.data.astype(np.int64), 0.9).astype(np.float32)
    X.eliminate_zeros()
    return X


def write_screen(path: Path, n_cells: int, base: ad.AnnData) -> None:
    """Write ``n_cells`` cells (tiled copies of ``base``) to ``path`` chunk by chunk."""
    n_copies = -(-n_cells // base.n_obs)
    sizes = [min(base.n_obs, n_cells - k * base.n_obs) for k in range(n_copies)]
    obs = pd.concat([_tile_obs(base, k, n) for k, n in enumerate(sizes)])
    ad.AnnData(obs=obs, var=base.var).write_h5ad(path)  # obs, var; X is appended below
    with h5py.File(path, "a") as handle:
        for k, n in enumerate(sizes):
            X = _tile(base, k, n)
            if k == 0:
                ad.io.write_elem(handle, "X", X)
            else:
                ad.io.sparse_dataset(handle["X"]).append(X)


def _tile_obs(base: ad.AnnData, copy: int, n: int) -> pd.DataFrame:
    obs = base.obs.iloc[:n].copy()
    obs.index = [f"c{copy}_{name}" for name in obs.index]
    return obs


class EpochTimer(pl.Callback):
    """Wall time of every training epoch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self._start)


def _epoch_time(adata, embeddings, loader: str) -> float:
    scvi.settings.seed = 0
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(adata, effect_prior=False)
    timer = EpochTimer()
    model.train(max_epochs=2, batch_size=BATCH_SIZE, loader=loader, train_size=1.0, callbacks=[timer],
                enable_progress_bar=False, enable_model_summary=False, logger=False)
    return timer.times[-1]


def speed(workdir: Path, n_cells: int, base: ad.AnnData, embeddings: pd.DataFrame) -> None:
    path = workdir / f"speed_{n_cells}.h5ad"
    write_screen(path, n_cells, base)
    memory = ad.read_h5ad(path)
    import tiledbsoma.io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uri = tiledbsoma.io.from_anndata(str(workdir / f"soma_{n_cells}"), memory, "RNA", uns_keys=[])
    times = {"in memory (anndata loader)": _epoch_time(memory.copy(), embeddings, "anndata")}
    backed = ad.read_h5ad(path, backed="r")
    times["backed h5ad (streamed)"] = _epoch_time(backed, embeddings, "streamed")
    backed.file.close()
    times["TileDB-SOMA (streamed)"] = _epoch_time(ps.data.read_soma(uri), embeddings, "streamed")
    reference = times["in memory (anndata loader)"]
    print(f"\nSpeed: {n_cells} cells x {N_GENES} genes, batch_size {BATCH_SIZE}, second epoch")
    print(f"{'path':<30}{'epoch s':>10}{'cells/s':>10}{'vs memory':>11}")
    for name, seconds in times.items():
        print(f"{name:<30}{seconds:>10.1f}{n_cells / seconds:>10.0f}{seconds / reference:>10.2f}x")


def child(path: str, steps: int) -> None:
    """One size, in this fresh process: every pass that grows with cells; print peak RSS.

    Setup, ScopeVI's construction (the count check, streamed), the effect prior's pseudobulk
    pass (:func:`perturbscope.data.streamed_pseudobulk`, as ``train`` runs it) and ``steps``
    training steps of the streamed loader (which builds the bounded control bank).
    """
    embeddings = pd.read_pickle(Path(path).with_suffix(".embeddings.pkl"))
    start = time.perf_counter()
    scvi.settings.seed = 0
    backed = ad.read_h5ad(path, backed="r")
    ps.ScopeVI.setup_anndata(backed, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(backed, effect_prior=False)
    expression = model._training_expression()
    means, _ = ps.data.streamed_pseudobulk(expression.X, expression.obs, ["perturbation", "context"], "counts")
    model.train(max_epochs=1, batch_size=BATCH_SIZE, max_steps=steps, limit_val_batches=2,
                enable_progress_bar=False, enable_model_summary=False, logger=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_cells": backed.n_obs, "peak_mb": peak_mb, "seconds": time.perf_counter() - start,
                      "groups": len(means)}))


def memory(workdir: Path, sizes: list[int], steps: int, base: ad.AnnData, embeddings: pd.DataFrame) -> None:
    rows = []
    for n in sizes:
        path = workdir / f"screen_{n}.h5ad"
        start = time.perf_counter()
        write_screen(path, n, base)
        embeddings.to_pickle(path.with_suffix(".embeddings.pkl"))
        written = time.perf_counter() - start
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        result = subprocess.run([sys.executable, __file__, "--child", str(path), "--steps", str(steps)],
                                check=True, capture_output=True, text=True, env=env)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row.update(file_gb=path.stat().st_size / 2**30, write_s=written)
        print(f"  measured {json.dumps(row)}", flush=True)
        rows.append(row)
        path.unlink()
    print(f"\nPeak RSS, backed h5ad, {N_GENES} genes: setup + ScopeVI (count check) + prior pseudobulk pass + "
          f"{steps} streamed training steps, each size in a fresh process")
    print(f"{'cells':>9}{'file GB':>9}{'peak MB':>9}{'vs first':>10}{'run s':>8}")
    for row in rows:
        print(f"{row['n_cells']:>9}{row['file_gb']:>9.2f}{row['peak_mb']:>9.0f}"
              f"{row['peak_mb'] / rows[0]['peak_mb']:>9.2f}x{row['seconds']:>8.0f}")
    ratio = rows[-1]["peak_mb"] / rows[0]["peak_mb"]
    verdict = "met" if ratio <= 1.3 else "missed"
    print(f"Target: peak at {rows[-1]['n_cells']} cells within 1.3x of {rows[0]['n_cells']}: {ratio:.2f}x ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,200000,800000")
    parser.add_argument("--speed-cells", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        child(args.child, args.steps)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scale_streamed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, embeddings = _base_screen()
    if args.sizes:
        memory(workdir, [int(s) for s in args.sizes.split(",")], args.steps, base, embeddings)
    if args.speed_cells:
        speed(workdir, args.speed_cells, base, embeddings)


if __name__ == "__main__":
    main()
