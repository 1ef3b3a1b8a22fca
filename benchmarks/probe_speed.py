"""Speed and memory of decoder Jacobians: vectorised (torch.func) vs a per-gene autograd loop.

A Census-shaped scVI decoder (n_latent=50, 8,000 genes, 2 hidden layers, NB) is built with
random weights for each hidden size (128 and 512). For ``--cells`` latent points (2,000 by
default) the full ``(cells, 8000, 50)`` Jacobian of ``log px_scale`` is computed

* vectorised: :mod:`perturbscope.probe`'s chunked ``jacfwd`` path, all cells;
* naively: one ``torch.autograd.grad`` call per gene, each over the same chunk of cells, which
  is what a hand-written loop does. The full loop would take hours on a CPU, so it is timed on
  one chunk of ``--batch-size`` cells and ``--naive-genes`` genes and extrapolated linearly to
  8,000 genes and to per-cell throughput (each call's cost does not depend on the gene).

Chunks are reduced and discarded (as ``axis_alignment_scores`` does), so the peak memory shown
is that of the computation: the rise in resident memory over the level before the run (sampled
every 2 ms, after returning freed heap memory to the OS with ``malloc_trim``). It is measured
for several chunk sizes and cell counts to show that it follows the chunk size, not the number
of cells.

Run: ``python benchmarks/probe_speed.py [--cells 2000] [--hidden 128 512]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import threading
import time
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

N_GENES, N_LATENT = 8000, 50


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim() -> None:
    # without glibc the figures include memory the allocator kept
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak rise in resident memory (MB) while the block runs."""

    def __enter__(self):
        _trim()
        self.start = _rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rise = self.peak - self.start


def census_shaped_model(n_hidden: int):
    import scvi

    rng = np.random.default_rng(0)
    counts = sp.random(64, N_GENES, density=0.05, random_state=0, format="csr", dtype=np.float32)
    counts.data = rng.poisson(3, counts.nnz).astype(np.float32) + 1
    adata = ad.AnnData(counts)
    adata.var_names = [f"ENSG{i:011d}" for i in range(N_GENES)]
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(
        adata, n_latent=N_LATENT, n_hidden=n_hidden, n_layers=2, gene_likelihood="nb"
    )
    model.module.eval()
    return model


def vectorised(model, z: np.ndarray, batch_size: int) -> float:
    """Full Jacobians through perturbscope's chunked torch.func path; returns a checksum."""
    from perturbscope.probe._jacobian import _eval_mode, _iter_jacobian, _make_probe

    probe, _ = _make_probe(model, None, z, None, 1e4, batch_size)
    total = 0.0
    with _eval_mode(model.module):
        for _, jac in _iter_jacobian(
            probe, np.arange(len(z)), None, "log_scale", batch_size, progress_bar=False
        ):
            total += float(jac[:, :, 0].sum())
    return total


def naive(model, z: np.ndarray, n_genes: int) -> float:
    """One autograd call per gene, each giving that gene's gradient for every cell."""
    module = model.module
    zt = torch.as_tensor(z).requires_grad_(True)
    library = torch.full((len(z), 1), float(np.log(1e4)))
    batch = torch.zeros((len(z), 1), dtype=torch.long)
    log_scale = torch.log(module.generative(zt, library, batch)["px"].scale)
    total = 0.0
    for gene in range(n_genes):
        (grad,) = torch.autograd.grad(log_scale[:, gene].sum(), zt, retain_graph=True)
        total += float(grad[:, 0].sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--naive-genes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--memory-chunks", type=int, nargs="+", default=[16, 64, 128])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(args.cells, N_LATENT)).astype(np.float32)
    print(
        f"Census-shaped decoder: n_latent={N_LATENT}, {N_GENES} genes, 2 hidden layers; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for n_hidden in args.hidden:
        model = census_shaped_model(n_hidden)
        vectorised(model, z[:8], args.batch_size)  # warm-up
        with PeakMemory() as memory:
            start = time.perf_counter()
            vectorised(model, z, args.batch_size)
            fast = time.perf_counter() - start
        start = time.perf_counter()
        naive(model, z[: args.batch_size], args.naive_genes)
        measured = time.perf_counter() - start
        slow_per_cell = measured * (N_GENES / args.naive_genes) / args.batch_size
        fast_rate, slow_rate = args.cells / fast, 1.0 / slow_per_cell
        print(f"\nn_hidden={n_hidden}")
        print(
            f"  vectorised (jacfwd, chunks of {args.batch_size}): {args.cells} cells in "
            f"{fast:.1f} s = {fast_rate:.1f} cells/s, peak memory +{memory.rise:.0f} MB"
        )
        print(
            f"  naive per-gene autograd loop: timed {args.naive_genes} genes x {args.batch_size} "
            f"cells in {measured:.1f} s; extrapolated to {N_GENES} genes: {slow_rate:.2f} cells/s "
            f"({args.cells} cells would take {args.cells * slow_per_cell / 60:.0f} min)"
        )
        print(f"  speed-up: {fast_rate / slow_rate:.0f}x")
        if n_hidden == args.hidden[0]:
            print("  peak memory vs chunk size and cell count (vectorised):")
            one_chunk = N_GENES * N_LATENT * 4 / 2**20
            for chunk in args.memory_chunks:
                for n_cells in (chunk, 3 * chunk):
                    with PeakMemory() as memory:
                        vectorised(model, z[:n_cells], chunk)
                    print(
                        f"    chunk {chunk:4d}, {n_cells:5d} cells: +{memory.rise:6.0f} MB "
                        f"(one Jacobian block = {chunk * one_chunk:.0f} MB)"
                    )


if __name__ == "__main__":
    main()
