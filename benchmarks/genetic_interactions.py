"""Genetic-interaction calls on real Norman 2019 cells and on model predictions.

For the doubles of the devel Norman data whose two singles are measured, fit Norman et al.
(2019)'s model (``perturbscope.tl.genetic_interactions``) to

* the real cells;
* the predictions of the ``additive`` and ``linear`` baselines and of ScopeVI, trained on
  control and single-gene cells only, no double (ScopeVI composes doubles additively by default,
  so its untrained interaction term predicts additivity; ``combination="joint"`` decodes the
  summed perturbation vector instead);
* ScopeVI trained leave-one-double-out: on controls, singles and every *other* double, so the
  interaction term has learned from combinations, then asked for the held-out double; and the
  same for the interaction estimator of the effect prior (``InteractionBaseline``: the singles'
  sum scaled by ``a + b cos``, with ``(a, b)`` fitted on the other doubles).

The singles and doubles fed to the fit are all the model's own predictions, each on the real
control cells;

and compare each table with Norman's published fits (``norman2019_gi_fits.csv``): Spearman
rank correlation of ``coef_first``, ``coef_second`` and ``mag``, and call agreement.

Run: ``python benchmarks/genetic_interactions.py [--no-scopevi] [--data ../shared/data]``.
Writes the "genetic-interactions" section of RESULTS.md, and
``benchmarks/results/genetic_interactions/results.md`` and ``.csv`` files.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _sections import replace_section

from perturbscope.benchmark import load_task, make_model
from perturbscope.data import parse_perturbation
from perturbscope.effects import InteractionBaseline
from perturbscope.tl import compare_with_published, genetic_interactions

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = "norman2019_gi_fits.csv"
KEY, CONTROL = "condition", "control"


def fit_table(adata: ad.AnnData, doubles: list[str], layer: str | None) -> pd.DataFrame:
    return genetic_interactions(
        adata, doubles=doubles, perturbation_key=KEY, control_value=CONTROL, layer=layer
    )


def predicted_cells(model, control: ad.AnnData, labels: list[str]) -> ad.AnnData:
    """Real control cells plus the model's predicted cells, all in ``layers["log1p_norm"]``."""
    prediction = model.predict(control, labels)
    prediction = ad.AnnData(
        X=np.asarray(prediction.layers["log1p_norm"], dtype=np.float64),
        obs=pd.DataFrame({KEY: prediction.obs["perturbation"].astype(str).to_numpy()}),
        var=pd.DataFrame(index=control.var_names),
    )
    reference = ad.AnnData(
        X=control.X.toarray() if hasattr(control.X, "toarray") else np.asarray(control.X),
        obs=pd.DataFrame({KEY: [CONTROL] * control.n_obs}),
        var=pd.DataFrame(index=control.var_names),
    )
    cells = ad.concat([reference, prediction], index_unique="-")
    cells.layers["log1p_norm"] = cells.X
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "genetic_interactions"
    )
    parser.add_argument("--no-scopevi", action="store_true")
    parser.add_argument("--scopevi-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()

    cells, embeddings = load_task("norman_combo", args.data)
    labels = cells.obs[KEY].astype(str)
    present = set(labels)
    genes_of = {p: parse_perturbation(p, CONTROL) for p in present}
    singles = sorted(p for p in present if len(genes_of[p]) == 1)
    doubles = sorted(
        p for p in present if len(genes_of[p]) == 2 and all(g in present for g in genes_of[p])
    )
    skipped = sorted(p for p in present if len(genes_of[p]) == 2 and p not in doubles)
    print(f"{len(doubles)} doubles with both singles measured: {doubles}")
    print(f"{len(skipped)} doubles skipped (a single is not measured): {skipped}")

    all_doubles = sorted(p for p in present if len(genes_of[p]) == 2)
    # models predict every double of the devel data; its singles are predicted too, measured or not
    gene_labels = sorted({g for p in all_doubles for g in genes_of[p]} | set(singles))
    published = pd.read_csv(args.data / PUBLISHED)
    train = cells[labels.isin(singles + [CONTROL]).to_numpy()].copy()
    control = cells[(labels == CONTROL).to_numpy()].copy()

    tables = {"real cells": fit_table(cells, doubles, None)}
    scopevi_train = {"train": {"max_epochs": args.scopevi_epochs}}
    # source -> (model, predict kwargs); the joint-combination source reuses the trained ScopeVI
    models = {"additive": ("additive", {}), "linear": ("linear", {})}
    if not args.no_scopevi:
        models["scopevi"] = ("scopevi", {})
        models["scopevi, joint combinations"] = ("scopevi", {"combination": "joint"})
    fitted = {}
    all_tables = {}  # every devel double, for models that can predict unmeasured singles
    for source, (name, predict_kwargs) in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name not in fitted:
                fitted[name] = make_model(name, embeddings, seed=args.seed, scopevi_kwargs=scopevi_train)
                fitted[name].fit(train, KEY, control_value=CONTROL, data_scale="log1p_norm")
            model = fitted[name]
            if name == "scopevi":
                model.predict_kwargs = predict_kwargs
            targets = gene_labels + all_doubles if name != "additive" else singles + doubles
            predicted = predicted_cells(model, control, targets)
        table = fit_table(predicted, all_doubles if name != "additive" else doubles, "log1p_norm")
        tables[source] = table[table["double"].isin(doubles)]
        if name != "additive":
            all_tables[source] = table
        print(f"{source}: fitted and predicted ({time.time() - start:.0f} s)")
    lodo_sources = {"interaction, other doubles in training": "interaction"}
    if not args.no_scopevi:
        lodo_sources["scopevi, other doubles in training"] = "scopevi"
    for source, name in lodo_sources.items():
        rows = []
        for double in all_doubles:  # trained on every other double
            if name == "interaction" and double not in doubles:
                continue  # it predicts only doubles whose singles were measured
            keep = (labels != double).to_numpy()
            model = (InteractionBaseline() if name == "interaction"
                     else make_model(name, embeddings, seed=args.seed, scopevi_kwargs=scopevi_train))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(cells[keep].copy(), KEY, control_value=CONTROL, data_scale="log1p_norm")
                predicted = predicted_cells(model, control, sorted(genes_of[double]) + [double])
            rows.append(fit_table(predicted, [double], "log1p_norm"))
        lodo = pd.concat(rows, ignore_index=True)
        if name != "interaction":
            all_tables[source] = lodo
        tables[source] = lodo[lodo["double"].isin(doubles)]
        print(f"{source} ({time.time() - start:.0f} s)")

    summary, per_double = compare_all(tables, published)
    summary_all, per_double_all = compare_all(all_tables, published)

    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / "summary.csv")
    per_double.to_csv(args.out / "per_double.csv", index=False)
    summary_all.to_csv(args.out / "summary_all_doubles.csv")
    per_double_all.to_csv(args.out / "per_double_all_doubles.csv", index=False)
    markdown = _table_md(summary)
    calls = per_double.pivot(index="double", columns="source", values="call")
    calls["published"] = per_double.drop_duplicates("double").set_index("double")["published_call"]
    calls_md = calls.to_markdown() if _has_tabulate() else calls.to_string()
    text = (
        "## Genetic-interaction calls against Norman et al. 2019's published fits\n\n"
        f"Generated by `python benchmarks/genetic_interactions.py` (seed {args.seed}). "
        f"Doubles with both singles measured in the devel data: {len(doubles)} "
        f"({', '.join(doubles)}); the other devel doubles have a single that was not measured, "
        "so no fit of real cells exists for them. Unless stated, models were trained on control "
        "and single-gene cells only; `scopevi, other doubles in training` was trained on "
        "controls, singles and all other doubles of the devel data (leave-one-double-out), "
        "and so was `interaction, other doubles in training`, the effect prior's interaction "
        "estimator alone (the sum of the singles scaled by `a + b cos` of the two single "
        "shifts, `(a, b)` fitted on the other doubles whose singles were measured). "
        "The singles and doubles fitted are each model's predictions. Least-squares fits "
        "compared with Norman's `coef_first`, `coef_second`, `coef_norm2`; published calls "
        "are the same thresholds applied to the published coefficients and `dcor`. A "
        "correlation is `nan` when one side is constant (the additive baseline's coefficients "
        "are exactly 1 for every double).\n\n"
        f"{markdown}\n\n### Calls per double\n\n{calls_md}\n\n"
        f"### All {len(all_doubles)} devel doubles, model predictions only\n\n"
        "Models that can predict a gene that was never measured alone (from its GO embedding) "
        "can be fitted on every devel double; real cells cannot, for want of a measured single.\n\n"
        f"{_table_md(summary_all)}\n\n"
        f"Runtime: {time.time() - start:.0f} s.\n"
    )
    (args.out / "results.md").write_text(text)
    replace_section("genetic-interactions", text)
    print(text)


def compare_all(tables: dict[str, pd.DataFrame], published: pd.DataFrame):
    """Summary (one row per source) and matched per-double rows against the published fits."""
    rows, per_double = [], []
    for source, table in tables.items():
        summary, matched = compare_with_published(table, published)
        rows.append({"source": source, **summary})
        per_double.append(matched.assign(source=source))
    return pd.DataFrame(rows).set_index("source"), pd.concat(per_double, ignore_index=True)


def _table_md(summary: pd.DataFrame) -> str:
    shown = summary.round(2).astype(object)
    shown["n_doubles"] = summary["n_doubles"].astype(int).astype(str)
    return shown.to_markdown() if _has_tabulate() else shown.to_string()


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
