"""What ScopeVI's effect prior saw on the training genes, beside what the test genes showed.

    python benchmarks/prior_diagnostics.py [--tasks norman_unseen_single,papalexi_unseen_single]
                                           [--seeds 3] [--data ../shared/data]

For every seed and split of an unseen-gene task, the effect prior is refitted on the split's
training cells as ScopeVI fits it (same cells, same seed: ``tests/benchmark/test_runner.py``
checks that the two agree), without training the VAE. Its held-out predictions of the
*training* genes (``EffectPrior.crossfit_predictions_``) give each candidate's cross-fitted
Pearson delta on the 20 most changed genes and its ``delta_correlation``; the task's saved
``metrics.csv`` (``run_benchmarks.py``) gives the same estimators' scores, as baselines, on that
split's *test* genes, and ScopeVI's. Nothing here feeds back into the model: the test scores
are read only to be printed beside the training ones. Writes the ``prior-diagnostics`` section of
RESULTS.md and ``benchmarks/results/prior_diagnostics.csv`` (one row per seed, split and
estimator).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from _sections import replace_section

from perturbscope.benchmark import TASKS, delta_correlation, load_task
from perturbscope.effects import EffectPrior
from perturbscope.effects._prior import CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
KIND = "unseen_gene"
TASKS_DIAGNOSED = ("norman_unseen_single", "papalexi_unseen_single")
#: Candidates ranked by Pearson delta (no change has no direction to rank).
RANKED = tuple(name for name in CANDIDATES[KIND] if name != "no_change")


def split_rows(task: str, seed: int, split, adata, embeddings, test: pd.DataFrame) -> list[dict]:
    """One row per estimator (the candidates and the blend) of one split."""
    spec = TASKS[task]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prior = EffectPrior(embeddings, seed=seed, keep_crossfit_predictions=True).fit(
            adata[split.train], spec.perturbation_key, control_value=spec.control_value,
            context_key=spec.context_key, data_scale=spec.data_scale,
        )
    if KIND not in prior.crossfit_predictions_:  # too few training genes to cross-fit the kind
        return []
    held = prior.crossfit_predictions_[KIND]
    observed = held.loc["observed"]
    scores = prior.crossfit_scores_.loc[KIND]
    on_split = test[test["split"] == split.name]
    rows = []
    for name in [*CANDIDATES[KIND], "stacked"]:
        if f"{name} (pearson)" not in scores or pd.isna(scores[f"{name} (pearson)"]):
            continue
        model = "scopevi" if name == "stacked" else name
        scored = on_split[on_split["model"] == model]
        rows.append({
            "task": task, "seed": seed, "split": split.name, "estimator": name,
            "weight": (sum(prior.weights_[KIND].values()) if name == "stacked"
                       else prior.weights_[KIND].get(name, 0.0)),
            "crossfit_pearson": float(scores[f"{name} (pearson)"]),
            # what the stacking minimises: squared error over every gene of the held-out shifts
            "crossfit_mse_all_genes": float(np.mean((held.loc[name].loc[observed.index] - observed).to_numpy() ** 2)),
            "crossfit_delta_correlation": delta_correlation(held.loc[name], np.zeros(held.shape[1])),
            "test_pearson": scored.loc[scored["metric"] == "pearson_delta_top_de", "value"].mean(),
            "test_delta_correlation": scored.loc[scored["metric"] == "delta_correlation", "value"].mean(),
            "test_l2": scored.loc[scored["metric"] == "l2_top_expressed", "value"].mean(),
        })
    rows.append({"task": task, "seed": seed, "split": split.name, "estimator": "observed",
                 "crossfit_delta_correlation": delta_correlation(observed, np.zeros(observed.shape[1])),
                 "test_delta_correlation": on_split.loc[(on_split["model"] == "observed")
                                                        & (on_split["metric"] == "delta_correlation"), "value"].mean()})
    return rows


def diagnose(task: str, data: Path, seeds: int, results: Path) -> pd.DataFrame:
    """Rows of every seed and split of ``task``."""
    spec = TASKS[task]
    adata, embeddings = load_task(task, data)
    test = pd.read_csv(results / task / "metrics.csv", keep_default_na=False, na_values=[""])
    test["value"] = pd.to_numeric(test["value"])
    rows = []
    for seed in range(seeds):
        for split in spec.make_splits(adata, seed):
            rows += split_rows(task, seed, split, adata, embeddings, test)
    return pd.DataFrame(rows)


def _firsts(block: pd.DataFrame, column: str) -> pd.Series:
    """Per split, the ranked candidate with the highest ``column``."""
    ranked = block[block["estimator"].isin(RANKED)].dropna(subset=[column])
    return ranked.loc[ranked.groupby(["seed", "split"])[column].idxmax()].set_index(["seed", "split"])["estimator"]


def task_facts(block: pd.DataFrame) -> dict:
    """Means over splits per estimator and the rankings, from one task's rows.

    ``run_benchmarks.py`` reads these too, for the "why" list under the targets.
    """
    means = block.groupby("estimator", sort=False)[
        ["weight", "crossfit_pearson", "crossfit_mse_all_genes", "crossfit_delta_correlation", "test_pearson",
         "test_l2", "test_delta_correlation"]
    ].mean()
    first_cf, first_test = _firsts(block, "crossfit_pearson"), _firsts(block, "test_pearson")
    ranked = [name for name in RANKED if name in means.index]
    return {
        "block": block, "means": means, "first_cf": first_cf, "first_test": first_test, "n": len(first_cf),
        "agree": int((first_cf == first_test.reindex(first_cf.index)).sum()),
        "cf_best": means.loc[ranked, "crossfit_pearson"].idxmax(),
        "test_best": means.loc[ranked, "test_pearson"].idxmax(),
    }


def task_section(task: str, block: pd.DataFrame) -> str:
    """The table and the sentences of one task, every figure computed from ``block``."""
    facts = task_facts(block)
    means, first_cf, first_test = facts["means"], facts["first_cf"], facts["first_test"]
    lines = [
        f"### {task}",
        "",
        "| estimator | mean weight | cross-fitted r (training genes) | cross-fitted MSE, all genes "
        "| cross-fitted delta_correlation | test r | test L2 | test delta_correlation | first by cross-fitted r "
        "| first by test r |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in means.iterrows():
        label = {"stacked": "the blend (test: scopevi)", "observed": "observed"}.get(name, name)
        lines.append(
            f"| {label} | {_fmt(row['weight'])} | {_fmt(row['crossfit_pearson'])} "
            f"| {_fmt(row['crossfit_mse_all_genes'], 5)} | {_fmt(row['crossfit_delta_correlation'])} "
            f"| {_fmt(row['test_pearson'])} | {_fmt(row['test_l2'])} | {_fmt(row['test_delta_correlation'])} "
            f"| {int((first_cf == name).sum()) if name in RANKED else ''} "
            f"| {int((first_test == name).sum()) if name in RANKED else ''} |"
        )
    lines += ["", _ranking_sentence(facts["n"], facts["agree"], facts["cf_best"], facts["test_best"], means)]
    lines += ["", _collapse_sentence(means, facts["test_best"], collapse_splits(block, facts["test_best"]))]
    return "\n".join(lines)


def _ranking_sentence(n: int, agree: int, cf_best: str, test_best: str, means: pd.DataFrame) -> str:
    same = cf_best == test_best
    text = (f"Over the {n} splits, the training genes rank `{cf_best}` first by mean cross-fitted Pearson "
            f"({means.loc[cf_best, 'crossfit_pearson']:.3f}); the test genes rank `{test_best}` first "
            f"({means.loc[test_best, 'test_pearson']:.3f})"
            + (", the same estimator." if same else f", which the training genes put at "
               f"{means.loc[test_best, 'crossfit_pearson']:.3f}.")
            + f" Split by split, the estimator first on the training genes is also first on the test genes "
            f"in {agree} of {n}.")
    errors = means.loc[[n for n in CANDIDATES[KIND] if n in means.index], "crossfit_mse_all_genes"]
    lowest = errors.idxmin()
    mse_blend = means.loc["stacked", "crossfit_mse_all_genes"]
    text += (" Stacking minimises squared error over all genes, and there the blend "
             + ("is lowest" if mse_blend <= errors.min() else "is not lowest")
             + f" on the training genes ({mse_blend:.5f}; `{lowest}` {errors.min():.5f}).")
    blend, best_cf = means.loc["stacked", "crossfit_pearson"], means.loc[cf_best, "crossfit_pearson"]
    relation = "above" if blend > best_cf + 5e-4 else "below" if blend < best_cf - 5e-4 else "level with"
    text += (f" On the training genes the blend ({blend:.3f}) is {relation} the best single candidate; its "
             "figures there are in-sample (its weights were fitted on those predictions), so they flatter it. On "
             f"the test genes ScopeVI scores {means.loc['stacked', 'test_pearson']:.3f} against "
             f"{means.loc[test_best, 'test_pearson']:.3f} for `{test_best}`.")
    return text


def _collapse_sentence(means: pd.DataFrame, test_best: str, below_splits: tuple[int, int]) -> str:
    used = means.loc[[n for n in RANKED if n in means.index and means.loc[n, "weight"] > 0]]
    blend = means.loc["stacked"]
    parts = ", ".join(f"`{n}` {v:.2f}" for n, v in used["crossfit_delta_correlation"].items())
    lowest, highest = used["crossfit_delta_correlation"].min(), used["crossfit_delta_correlation"].max()
    where = ("above every candidate it weighs" if blend["crossfit_delta_correlation"] > highest
             else "below every candidate it weighs" if blend["crossfit_delta_correlation"] < lowest
             else "between the candidates it weighs")
    below, n = below_splits
    return (f"`delta_correlation` (mode collapse) on the training genes: the blend "
            f"{blend['crossfit_delta_correlation']:.2f}, {where} ({parts}); the observed changes "
            f"{means.loc['observed', 'crossfit_delta_correlation']:.2f}. Against `{test_best}`, the test's best "
            f"by Pearson ({means.loc[test_best, 'crossfit_delta_correlation']:.2f} on the training genes), the "
            f"blend is at or below it on {below} of {n} splits. On the test genes ScopeVI has "
            f"{blend['test_delta_correlation']:.2f}, `{test_best}` {means.loc[test_best, 'test_delta_correlation']:.2f}"
            f" and the observed changes {means.loc['observed', 'test_delta_correlation']:.2f}.")


def collapse_splits(block: pd.DataFrame, reference: str) -> tuple[int, int]:
    """``(splits where the blend's cross-fitted delta_correlation is at most reference's, splits)``."""
    wide = block.pivot_table(index=["seed", "split"], columns="estimator", values="crossfit_delta_correlation")
    if reference not in wide or "stacked" not in wide:
        return 0, 0
    return int((wide["stacked"] <= wide[reference] + 1e-12).sum()), len(wide)


def _fmt(value: float, digits: int = 3) -> str:
    return "" if pd.isna(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS_DIAGNOSED))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    frames = [diagnose(task, args.data, args.seeds, args.results) for task in args.tasks.split(",") if task]
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(args.results / "prior_diagnostics.csv", index=False)
    text = "\n\n".join([
        "## The unseen-gene misses: cross-fitting on the training genes against the test genes",
        f"Generated by `python benchmarks/prior_diagnostics.py --seeds {args.seeds}`. For every seed and "
        "split, the effect prior is refitted on the split's training cells as ScopeVI fits it (no VAE; a "
        "test checks that the two agree), and each candidate is scored on the training genes it held out "
        "(`crossfit_predictions_`: Pearson delta on each gene's 20 most changed genes, and "
        "`delta_correlation` over all genes); the test columns are the same estimators as baselines on "
        "the split's test genes, from the task's saved metrics, and the blend's test figures are "
        "ScopeVI's (the blend plus the VAE's correction where cross-fitting kept one). Means over splits (the task "
        "tables above average over perturbations, so they can differ in the third decimal); the last two "
        "columns count the splits where an estimator ranks first. The test figures are "
        "shown, never used to choose.",
        *[task_section(task, block) for task, block in table.groupby("task", sort=False)],
    ])
    replace_section("prior-diagnostics", text)
    print(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
