"""Zero- and few-shot learning curves on unseen cell lines (McFaline) and cell types (Kang).

    python benchmarks/learning_curves.py [--seeds 2] [--shots 0,5,10,25,50] [--data ../shared/data]

For every held-out context, ScopeVI is trained once on the zero-shot cells and adapted to the
context with ``ScopeVI.load_query_data`` on its control cells plus ``k`` cells of each
perturbation (``perturbscope.benchmark.learning_curve``); baselines are refitted on the same
cells. Writes the "learning-curves" and "distributions" sections of RESULTS.md, the figure
``benchmarks/figures/learning_curves.png`` and the long table under
``benchmarks/results/learning_curves``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from _sections import replace_section

from perturbscope.benchmark import (
    SCOPEVI_DEFAULTS,
    TASKS,
    learning_curve,
    learning_curve_table,
    load_task,
)
from perturbscope.benchmark._learning_curve import SCOPEVI_QUERY, SCOPEVI_REFERENCE

ROOT = Path(__file__).resolve().parents[1]
CURVE_TASKS = ("mcfaline_unseen_line", "kang_unseen_cell_type")
BASELINES = {
    "mcfaline_unseen_line": ("no_change", "perturbed_mean", "matching_mean", "linear"),
    "kang_unseen_cell_type": ("no_change", "perturbed_mean", "matching_mean"),
}
DISTRIBUTION_COLUMNS = ("variance_ratio", "variance_error", "skewness_error", "kurtosis_error",
                        "histogram_kl", "energy_distance")
FULL = "scopevi_full_fine_tune"
ORDER = ("noise_ceiling", SCOPEVI_QUERY, FULL, SCOPEVI_REFERENCE, "matching_mean", "perturbed_mean",
         "linear", "no_change")


def with_saved_scopevi_rows(curve: pd.DataFrame, saved: Path) -> pd.DataFrame:
    """``curve`` (baselines and ceiling) with the ScopeVI rows of the same seeds from ``saved``."""
    old = pd.read_csv(saved)
    rows = old[old["model"].isin([SCOPEVI_QUERY, FULL, SCOPEVI_REFERENCE]) & old["seed"].isin(set(curve["seed"]))]
    if rows.empty:
        raise SystemExit(f"--reuse-scopevi: no ScopeVI rows for seeds {sorted(set(curve['seed']))} in {saved}")
    merged = pd.concat([curve, rows[curve.columns]], ignore_index=True)
    merged["scopevi_reused"] = merged["model"].isin([SCOPEVI_QUERY, FULL, SCOPEVI_REFERENCE])
    return merged


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(ORDER)}
    keys = sorted(table.index, key=lambda ix: (ix[0], rank.get(ix[1], 99)))
    return table.loc[keys]


def _markdown(table: pd.DataFrame, first: str) -> list[str]:
    header = f"| task | {first} | " + " | ".join(str(c) for c in table.columns) + " |"
    lines = [header, "|---" * (len(table.columns) + 2) + "|"]
    for (task, model), row in table.iterrows():
        lines.append(f"| {task} | {model} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def distribution_table(results: pd.DataFrame, shots: int) -> pd.DataFrame:
    rows = results[(results["shots"] == shots) & results["metric"].isin(DISTRIBUTION_COLUMNS)
                   & (results["perturbation"] != "(all)") & (results["model"] != "observed")]
    per_seed = rows.groupby(["task", "model", "metric", "seed"])["value"].mean()
    mean = per_seed.groupby(level=["task", "model", "metric"]).mean().unstack("metric")
    return _ordered(mean[list(DISTRIBUTION_COLUMNS)].round(3))


def plot(results: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perturbscope.pl import learning_curve as plot_curve

    tasks = list(pd.unique(results["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    for ax, task in zip(np.atleast_1d(axes), tasks):
        plot_curve(results, task=task, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--shots", default="0,5,10,25,50")
    parser.add_argument("--tasks", default=",".join(CURVE_TASKS))
    parser.add_argument("--fine-tune-epochs", type=int, default=100)
    parser.add_argument("--scopevi-epochs", type=int, default=None,
                        help="reference ScopeVI epochs (default: ScopeVI.train's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learning_curves")
    parser.add_argument("--reuse-scopevi", action="store_true",
                        help="rerun the baselines and the ceiling only; ScopeVI's rows come from the task's saved CSV")
    args = parser.parse_args()
    shots = tuple(int(k) for k in args.shots.split(","))
    started = time.perf_counter()
    ran = [t for t in args.tasks.split(",") if t]  # --tasks "": rebuild from the CSVs
    for task in ran:
        spec = TASKS[task]
        adata, embeddings = load_task(task, args.data)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            curve = learning_curve(
                adata, spec.perturbation_key, spec.context_key, shots=shots, scopevi=not args.reuse_scopevi,
                control_value=spec.control_value, gene_embeddings=embeddings,
                data_scale=spec.data_scale, baselines=BASELINES[task], seeds=args.seeds,
                fine_tune_epochs=args.fine_tune_epochs, task=task,
                query_variants={SCOPEVI_QUERY: {}, FULL: {"freeze_decoder": False}},
                scopevi_kwargs={"train": {**SCOPEVI_DEFAULTS["train"], **(
                    {} if args.scopevi_epochs is None else {"max_epochs": args.scopevi_epochs})}},
            )
        print(f"{task}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.reuse_scopevi:
            curve = with_saved_scopevi_rows(curve, args.out / f"metrics_{task}.csv")
        curve.to_csv(args.out / f"metrics_{task}.csv", index=False)
    # tasks run earlier (possibly with other seeds) are kept: one CSV per task
    results = pd.concat([pd.read_csv(f) for f in sorted(args.out.glob("metrics_*.csv"))],
                        ignore_index=True)
    figure = ROOT / "benchmarks" / "figures" / "learning_curves.png"
    plot(results, figure)
    minutes = (time.perf_counter() - started) / 60
    pairs = (results[results["metric"] == "pearson_delta_top_de"]
             .query("model == 'noise_ceiling' and seed == 0")
             .groupby(["task", "shots"])["perturbation"].size().unstack("shots"))
    seeds_text = ", ".join(f"{task} {results.loc[results['task'] == task, 'seed'].nunique()} seed(s)"
                           for task in pd.unique(results["task"]))
    reused = sorted(results.loc[results.get("scopevi_reused", pd.Series(False, index=results.index))
                                .fillna(False).astype(bool), "task"].unique())
    pearson = _ordered(learning_curve_table(results, "pearson_delta_top_de"))
    l2 = _ordered(learning_curve_table(results, "l2_top_expressed"))
    text = [
        "## Learning curves: new cell lines and cell types, zero- and few-shot",
        "",
        f"Generated by `python benchmarks/learning_curves.py` ({seeds_text}; "
        + (f"last run {minutes:.0f} min, CPU). " if ran else "rewritten from the saved per-task CSVs, CPU). ")
        + (f"The ScopeVI rows of {', '.join(reused)} were read back from the run before, on the same "
           "splits and seeds; the baselines and the noise ceiling (whose DE genes now come from its truth "
           "half) were rerun. " if reused else "")
        + "Each context is held out in turn. `scopevi_reference` is trained once on the "
        "zero-shot cells and never sees the context's perturbed cells; `scopevi` is that model "
        "adapted with `ScopeVI.load_query_data` to the context's control cells plus `k` cells of "
        f"each perturbation ({args.fine_tune_epochs} epochs; gene-embedding path and the "
        "decoder's hidden layers frozen, the default; at k = 0 it is fine-tuned on the controls "
        f"alone); `{FULL}` fine-tunes the whole decoder too (`freeze_decoder=False`). "
        "Baselines are refitted on the "
        "same cells; at k > 0 `matching_mean` is the mean of the k given cells, the obvious "
        "few-shot estimate. The given cells are nested (those of k = 5 are among those of "
        "k = 10), a perturbation is scored at k only when at least 10 of its cells remain for "
        "testing, and ScopeVI draws 3 samples per control cell. Mean ± sd over seeds of the mean "
        "over scored (context, perturbation) pairs.",
        "",
        "![learning curves](figures/learning_curves.png)",
        "",
        "**Pearson delta on the top-20 DE genes** (higher is better)",
        "",
        *_markdown(pearson, "model"),
        "",
        "**L2 on the most expressed genes** (lower is better)",
        "",
        *_markdown(l2, "model"),
        "",
        "Scored (context, perturbation) pairs per k: "
        + "; ".join(f"{task}: " + ", ".join(f"k={k} {int(n)}" for k, n in row.dropna().items())
                    for task, row in pairs.iterrows()) + ".",
    ]
    replace_section("learning-curves", "\n".join(text))
    k_few = 10 if 10 in shots else max(shots)
    dist = [
        "## Distribution-aware scores: do predicted cells keep the spread of real cells?",
        "",
        "From the learning-curve runs above (mean over seeds and scored pairs). `variance_ratio` "
        "is the median over genes of predicted over real per-gene variance (1 is right, near 0 "
        "is collapse onto a mean); the other columns are errors (lower is better): mean absolute "
        "per-gene error of variance, skewness and excess kurtosis, histogram KL, and energy "
        "distance in a 20-dimensional PCA of the real cells. ScopeVI scores 3 draws per control "
        "cell; baselines shift each control cell by their predicted mean change.",
        "",
    ]
    for k in sorted({k for k in (0, k_few) if k in shots}):
        dist += [f"**k = {k}**", "", *_markdown(distribution_table(results, k), "model"), ""]
    replace_section("distributions", "\n".join(dist))
    print("\n".join(text + [""] + dist))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
