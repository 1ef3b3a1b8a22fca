"""Regenerate benchmarks/RESULTS.md: every task, every model, beside the split-half noise ceiling.

    python benchmarks/run_benchmarks.py                 # all tasks, ScopeVI and all baselines
    python benchmarks/run_benchmarks.py --no-scopevi    # baselines and ceiling only (minutes)

Options: --data (the shared data folder, default ../shared/data), --seeds (3), --out
(per-task CSVs and plots, default benchmarks/results), --scopevi-epochs, --tasks, and
--reuse-others (tasks not in --tasks are read back from their metrics.csv under --out, and their
runtime rows from the previous RESULTS.md, instead of being left out).

The sections other scripts own (learning curves, variants, genetic interactions; see
``_sections.py``) are kept as they are.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _sections import sections

import perturbscope
from perturbscope.benchmark import (
    MODELS,
    SCOPEVI_DEFAULTS,
    TASKS,
    EmbeddingNeighborsBaseline,
    PerturbedMeanBaseline,
    evaluate,
    markdown_table,
    noise_ceiling,
    prepare_reference,
    run_benchmark,
    summarize,
    write_results,
)
from perturbscope.benchmark import SUMMARY_METRICS
from perturbscope.benchmark._tasks import GO_ANNOTATIONS, go_gene_embeddings

ROOT = Path(__file__).resolve().parents[1]
REAL_TASKS = (
    "norman_unseen_single",
    "norman_combo",
    "mcfaline_unseen_line",
    "kang_unseen_cell_type",
)


def cross_check(data: Path) -> str:
    """The issue's protocol: leave-one-out over the 18 Norman singles, top-20 t-test DE genes."""
    adata = ad.read_h5ad(data / "perturbench_devel.h5ad")
    norman = adata[adata.obs["dataset"] == "norman19"]
    labels = norman.obs["condition"].astype(str)
    singles = sorted(p for p in labels.unique() if p != "control" and "+" not in p)
    cells = norman[labels.isin([*singles, "control"]).to_numpy()].copy()
    labels = cells.obs["condition"].astype(str)
    control = cells[(labels == "control").to_numpy()]
    observed = cells[(labels != "control").to_numpy()]
    reference = prepare_reference(observed, control, "condition")
    ceilings = [
        noise_ceiling(observed, control, "condition", de_genes=reference.de_genes, seed=s)
        for s in range(3)
    ]
    ceiling = pd.concat(ceilings).groupby(level=0).mean()
    embeddings = go_gene_embeddings(str(data / GO_ANNOTATIONS), tuple(singles))
    rows = {}
    for name, make in (
        ("perturbed_mean", PerturbedMeanBaseline),
        ("embedding_nn", lambda: EmbeddingNeighborsBaseline(embeddings, 0.1)),
    ):
        predictions = []
        for p in singles:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model = make().fit(
                    cells[(labels != p).to_numpy()], "condition", data_scale="log1p_norm"
                )
                predictions.append(model.predict(control, [p], aggregate="mean"))
        rows[name] = evaluate(ad.concat(predictions), reference, distributional=False)
    with_go = [p for p in singles if p in embeddings.index]
    lines = [
        "| protocol | top-20 DE Pearson delta (ours) | the issue |",
        "|---|---|---|",
        f"| perturbed mean, LOO over {len(singles)} singles | "
        f"{rows['perturbed_mean']['pearson_delta_top_de'].mean():.3f} | about 0.46 |",
        f"| split-half ceiling, {len(singles)} singles (mean of 3 halvings) | "
        f"{ceiling['pearson_delta_top_de'].mean():.3f} | about 0.94 |",
        f"| GO nearest neighbours (128 dims, T=0.1), {len(with_go)} singles with GO terms | "
        f"{rows['embedding_nn'].loc[with_go, 'pearson_delta_top_de'].mean():.3f} | about 0.49 |",
        f"| perturbed mean on the same {len(with_go)} singles | "
        f"{rows['perturbed_mean'].loc[with_go, 'pearson_delta_top_de'].mean():.3f} | about 0.40 |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--tasks", default=",".join(REAL_TASKS))
    parser.add_argument("--no-scopevi", action="store_true", help="baselines and ceiling only")
    parser.add_argument("--reuse-others", action="store_true",
                        help="read tasks not in --tasks back from --out instead of leaving them out")
    parser.add_argument(
        "--scopevi-epochs", type=int, default=SCOPEVI_DEFAULTS["train"]["max_epochs"]
    )
    args = parser.parse_args()

    models = [m for m in MODELS if not (args.no_scopevi and m == "scopevi")]
    scopevi_kwargs = {"train": {"max_epochs": args.scopevi_epochs}}
    started = time.perf_counter()
    task_sections, timings = [], []
    previous = args.results.read_text().splitlines() if args.results.is_file() else []
    run = [t for t in args.tasks.split(",") if t]  # --tasks "" --reuse-others: rewrite only
    tasks = [t for t in REAL_TASKS if t in run or args.reuse_others] + [
        t for t in run if t not in REAL_TASKS
    ]
    for task in tasks:
        spec = TASKS[task]
        if task not in run:
            results = pd.read_csv(args.out / task / "metrics.csv", keep_default_na=False,
                                  na_values=[""])
            results["value"] = pd.to_numeric(results["value"])
            timings += [line for line in previous if line.startswith(f"| {task} |")][:1]
        else:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results = run_benchmark(
                    args.data, task, models=models, seeds=args.seeds, scopevi_kwargs=scopevi_kwargs
                )
            write_results(results, args.out / task, title=spec.description)
            perturbscope.pl.benchmark_figures(results, args.out / task)
            elapsed = time.perf_counter() - t0
            per_model = results.attrs["timings"].groupby("model")["seconds"].mean()
            timings.append(
                f"| {task} | {elapsed / 60:.1f} | "
                + ", ".join(f"{m} {s:.1f}" for m, s in per_model.items())
                + " |"
            )
        table = markdown_table(
            summarize(results),
            metrics=SUMMARY_METRICS,
            models=[
                "noise_ceiling",
                *[m for m in MODELS if m not in spec.not_applicable],
                "observed",
            ],
        )
        skipped = "".join(
            f"\n`{m}` does not apply here: {why}." for m, why in spec.not_applicable.items()
        )
        task_sections.append(f"## {task}\n\n{spec.description}.{skipped}\n\n{table}\n")
    check = cross_check(args.data)
    total = (time.perf_counter() - started) / 60
    # with --reuse-others the tasks' own runtimes (from the runtime table) are the cost
    task_minutes = sum(float(line.split("|")[2]) for line in timings)

    scopevi_note = (
        'ScopeVI was **not run** for this file (`--no-scopevi`); its rows read "not run". '
        "Regenerate with `python benchmarks/run_benchmarks.py` to fill them in."
        if args.no_scopevi
        else f"ScopeVI settings: {SCOPEVI_DEFAULTS['model']}, {args.scopevi_epochs} epochs, "
        '`"normal"` likelihood on the log-normalised data; fixed before any test split was scored.'
    )
    header = (
        f"""# Benchmark results

Generated by `python benchmarks/run_benchmarks.py{" --no-scopevi" if args.no_scopevi else ""}` \
({task_minutes:.0f} min of task runs on {platform.machine()}, CPU only; perturbscope {perturbscope.__version__}, \
{args.seeds} seeds).

Every number is the mean ± standard deviation over seeds of the mean over held-out
perturbations. **Read each row against the noise ceiling**: the same metric scoring one random
half of each perturbation's real cells against the other half. The `observed` row's
`delta_correlation` is the mean pairwise correlation of the *true* changes across the held-out
perturbations; a model far above it has collapsed onto one common change (the perturbed mean
is 1 by construction).

Protocol: metrics on pseudobulks of log1p-normalised expression; DE genes are the top 20 by
|t| of scanpy's `rank_genes_groups` (Welch t-test) against the control cells of the split;
L2 over the 1,000 most expressed genes (all 500 measured genes for Norman and McFaline);
Systema's reference is the centroid of all perturbations of the context; energy distance is
Euclidean in a 20-dimensional PCA of observed cells. Baselines predict cells as control cells
shifted by the predicted mean change. {scopevi_note}

**Gene embeddings.** ESM2 weights cannot be had here (no network, no protein sequences), so
every embedding-based model (ScopeVI, `embedding_nn`, `linear`) uses GO-derived embeddings:
128 SVD dimensions of tf-idf-weighted direct GO annotations
(`perturbscope.embeddings.go_embeddings`, `propagate=False`). `IER5L` has no GO annotation and
is left out of the Norman tasks for every model. Only one Norman target gene is among the 500
measured genes, so the linear model's perturbation embeddings `P` come from GO, not from the
PCA. Kang's perturbation (interferon) is not a gene: there ScopeVI uses a one-hot embedding and
the embedding baselines do not apply.

## Cross-check against the issue's numbers

{check}

Our split-half ceiling (about 0.90) is below the issue's 0.94. We score 50 cells against the
other 50 with DE genes fixed from all cells; a protocol that scores a half against all cells, or
averages more cells, gives a higher ceiling. The same holds for L2: on the `seen2` doubles our
ceiling L2 (half against half) is about 0.49, the issue's 0.24. The baselines themselves match
(perturbed mean 0.457 against 0.46; additive on `seen2` 0.931 and L2 0.446 against 0.93 and
0.45; Kang transfer 0.848 against 0.85; McFaline zero-shot transfer, the matching mean, 0.070
against 0.07). GO nearest neighbours reach 0.469 here against 0.49 in the issue, with the same
ordering over the perturbed mean on the 17 singles with GO terms (0.436 here, 0.40 there).

## Runtime

| task | minutes | mean seconds per fit + predict + score |
|---|---|---|
"""
        + "\n".join(timings)
        + "\n\n"
    )
    findings = ROOT / "benchmarks" / "SCOPEVI_FINDINGS.md"
    if findings.is_file() and not args.no_scopevi:
        header += findings.read_text() + "\n"
    reused = [t for t in tasks if t not in run]
    if reused:
        header += (f"\nTasks {', '.join(reused)} were read back from their saved metrics "
                   "(`--reuse-others`) rather than rerun.\n")
    kept_sections = sections(args.results)  # read now: other scripts may have written meanwhile
    args.results.write_text(header + "\n".join(task_sections) + "\n" + "\n".join(kept_sections))
    print(f"wrote {args.results} in {total:.1f} min")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
