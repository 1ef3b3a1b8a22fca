"""Peak memory of ``ScopeVI.predict(..., aggregate="mean")`` at a few sizes, each in a fresh process.

A ScopeVI (effect prior on, NB counts) is trained for one epoch on a simulated screen of 2,000
genes and 100 perturbed genes, then saved. For every size ``perturbations x control cells`` a
new Python process loads the model and the control cells, records its peak resident memory
(``resource.getrusage``), then resets the peak to the current resident memory (Linux
``/proc/self/clear_refs``), predicts, and records the peaks again: "process peak" is the whole
process's (``getrusage``, loading included), "predict peak" the peak while predicting
(``VmHWM`` after the reset: the process with the model and the control cells loaded), "predict
adds" the predict peak minus the resident memory just before predicting. Per-cell prediction in memory would hold ``X`` and
``log1p_norm`` for every (perturbation, control cell) pair: 8 bytes x pairs x genes, printed
as "cells would need". Target: 100 perturbations x 10,000 controls x 2,000 genes peaks under 2 GB.

    python benchmarks/predict_memory.py [--sizes 10x1000,100x1000,100x10000] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch

import perturbscope as ps

N_GENES = 2_000
N_PERTURBED = 100


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _status_mb(field: str) -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields[field].split()[0]) / 1024


def child(folder: Path, n_perturbations: int, n_controls: int, batch_size: int, aggregate: str | None) -> None:
    """Load, predict and print one JSON line with the peaks (run in a fresh process)."""
    torch.set_num_threads(1)
    model = ps.ScopeVI.load(str(folder / "model"))
    controls = ad.read_h5ad(folder / "controls.h5ad")[:n_controls].copy()
    perturbations = model.training_perturbations[:n_perturbations]
    load_peak = _peak_mb()
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident memory
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    out = None if aggregate == "mean" else folder / f"cells_{n_perturbations}x{n_controls}_{time.time_ns()}.h5ad"
    result = model.predict(controls, perturbations, aggregate=aggregate, batch_size=batch_size, out=out, seed=0)
    seconds = time.perf_counter() - start
    rows = result.n_obs if aggregate == "mean" else ad.read_h5ad(result, backed="r").n_obs
    # getrusage keeps the peak of exited threads (loading starts some), so the reset peak is read
    # from VmHWM, which clear_refs resets; getrusage's is the whole process's
    print(json.dumps({"load_peak_mb": load_peak, "before_mb": before, "peak_mb": _status_mb("VmHWM"),
                      "process_peak_mb": _peak_mb(), "seconds": seconds, "rows": rows}))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"10x1000,100x1000"`` as ``[(10, 1000), (100, 1000)]``."""
    return [tuple(map(int, size.split("x"))) for size in text.split(",") if size]


def child_arguments(values: list[str]) -> tuple:
    """``--child FOLDER P N BATCH AGGREGATE`` as the arguments of ``child``."""
    folder, p, n, batch, aggregate = values
    return Path(folder), int(p), int(n), int(batch), None if aggregate == "none" else aggregate


def run_child(script: str, folder: Path, p: int, n: int, batch_size: int, aggregate: str) -> dict:
    """Run ``script --child`` in a fresh process and return the JSON line it prints."""
    command = [sys.executable, script, "--child", str(folder), str(p), str(n), str(batch_size), aggregate]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10x1000,100x1000,100x10000",
                        help="comma-separated PERTURBATIONSxCONTROLS")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cells-to-disk", default="10x1000",
                        help="sizes also predicted per cell into an .h5ad (out=), comma-separated")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*child_arguments(args.child))
        return

    sizes, to_disk = parse_sizes(args.sizes), parse_sizes(args.cells_to_disk)
    n_controls = max(n for _, n in sizes + to_disk)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scvi.settings.seed = 0
        torch.set_num_threads(1)
        adata, embeddings = ps.data.simulate_perturbseq(
            n_genes=N_GENES, n_perturbed_genes=N_PERTURBED, n_combinations=0, n_cell_types=2,
            n_cells_per_condition=10, n_control_cells=n_controls // 2 + 1, embedding_dim=32, seed=0,
        )
        ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
        model = ps.ScopeVI(adata, n_latent=10, n_hidden=128)
        start = time.perf_counter()
        model.train(max_epochs=1, enable_progress_bar=False)
        print(f"trained on {adata.n_obs} cells x {adata.n_vars} genes in {time.perf_counter() - start:.0f} s; "
              f"batch_size {args.batch_size}")
        model.save(str(folder / "model"), save_anndata=True)
        controls = adata[(adata.obs["perturbation"] == "control").to_numpy()]
        order = np.random.default_rng(0).permutation(controls.n_obs)  # both cell types in every prefix
        controls[order].copy().write_h5ad(folder / "controls.h5ad")

        runs = [(p, n, "mean") for p, n in sizes] + [(p, n, "none") for p, n in to_disk]
        print(f"{'perturbations':>13} {'controls':>9} {'output':>13} {'process peak MB':>16} {'predict peak MB':>16} "
              f"{'predict adds':>13} {'cells would need':>17} {'seconds':>8}")
        for p, n, aggregate in runs:
            result = run_child(__file__, folder, p, n, args.batch_size, aggregate)
            in_memory = 8 * p * n * N_GENES / 2**20
            output = "mean" if aggregate == "mean" else "cells (h5ad)"
            print(f"{p:>13} {n:>9} {output:>13} {result['process_peak_mb']:>16.0f} {result['peak_mb']:>16.0f} "
                  f"{result['peak_mb'] - result['before_mb']:>13.0f} {in_memory:>14.0f} MB {result['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
