"""The benchmark runner: every model on every split of a task, beside the noise ceiling.

For each seed and split the observed side (control mean, observed means, DE genes, centroid,
PCA) is computed once by :func:`prepare_reference`; the split-half ceiling is scored with the
same DE genes; every model is fitted on the split's training cells only, predicts the held-out
perturbations from the split's control cells, and is scored by :func:`evaluate`. The result is
one long table: one row per (seed, split, model, perturbation, metric).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import OUTPUT_KEYS
from ._baselines import (
    AdditiveBaseline,
    EmbeddingNeighborsBaseline,
    LinearBaseline,
    MatchingMeanBaseline,
    NoChangeBaseline,
    PerturbedMeanBaseline,
    log1p_expression,
)
from ._ceiling import delta_correlation, noise_ceiling
from ._metrics import (
    CLOSEST_TO_ONE,
    LOWER_IS_BETTER,
    evaluate,
    prepare_reference,
)
from ._pseudobulk import pseudobulk
from ._tasks import BenchmarkTask, _check_task, load_task

BASELINES = ("no_change", "perturbed_mean", "matching_mean", "additive", "embedding_nn", "linear")
MODELS = ("scopevi", *BASELINES)
CEILING = "noise_ceiling"
OBSERVED = "observed"
MODE_COLLAPSE = "delta_correlation"
#: Columns of the summary table, in order.
SUMMARY_METRICS = (
    "pearson_delta_top_de",
    "pearson_delta",
    "pearson_delta_perturbed",
    "l2_top_expressed",
    "mse_top_de",
    "direction_top_de",
    "discrimination_score",
    "de_overlap",
    "energy_distance",
    MODE_COLLAPSE,
)

#: ScopeVI settings of the benchmark (chosen before looking at any test split).
SCOPEVI_DEFAULTS: dict[str, Any] = {
    "model": {"n_latent": 16, "n_hidden": 128, "n_layers": 2, "free_bits": 0.5},
    "train": {"max_epochs": 100, "batch_size": 128},
}


class ScopeVIModel:
    """ScopeVI behind the baselines' ``fit`` / ``predict`` interface.

    Parameters
    ----------
    gene_embeddings
        Genes x dimensions; ``None`` gives ScopeVI's one-hot embeddings (seen perturbations
        only, e.g. Kang's interferon).
    model_kwargs
        Passed to ``ScopeVI(...)``; defaults in :data:`SCOPEVI_DEFAULTS`.
    train_kwargs
        Passed to ``ScopeVI.train``; defaults in :data:`SCOPEVI_DEFAULTS`.
    predict_kwargs
        Passed to ``ScopeVI.predict`` (e.g. ``{"combination": "joint"}``, ``{"n_samples": 3}``).
    seed
        ``scvi.settings.seed`` for training and prediction.

    Examples
    --------
    >>> from perturbscope.benchmark._tasks import simulated_screen
    >>> adata, embeddings = simulated_screen()
    >>> model = ScopeVIModel(embeddings, train_kwargs={"max_epochs": 1})
    >>> model = model.fit(adata, "perturbation")
    >>> control = adata[adata.obs["perturbation"] == "control"]
    >>> model.predict(control, ["G00"], aggregate="mean").n_obs
    1
    """

    name = "scopevi"

    def __init__(
        self,
        gene_embeddings: pd.DataFrame | None = None,
        model_kwargs: dict[str, Any] | None = None,
        train_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        predict_kwargs: dict[str, Any] | None = None,
    ):
        self.gene_embeddings = gene_embeddings
        self.model_kwargs = {**SCOPEVI_DEFAULTS["model"], **(model_kwargs or {})}
        self.train_kwargs = {**SCOPEVI_DEFAULTS["train"], **(train_kwargs or {})}
        self.predict_kwargs = dict(predict_kwargs or {})
        self.seed = seed

    def fit(
        self,
        adata_train: ad.AnnData,
        perturbation_key: str,
        control_value: str = "control",
        context_key: str | None = None,
        layer: str | None = None,
        data_scale: str = "counts",
        delimiter: str = "+",
    ) -> ScopeVIModel:
        """Set up a copy of ``adata_train`` and train ScopeVI on it.

        Parameters
        ----------
        adata_train
            Training cells (not modified).
        perturbation_key, control_value, context_key, layer, delimiter
            As for ``ScopeVI.setup_anndata``.
        data_scale
            ``"log1p_norm"`` trains the ``"normal"`` likelihood, ``"counts"`` the ``"nb"`` one
            (unless ``model_kwargs`` names one).

        Returns
        -------
        ``self``, trained.
        """
        import scvi

        from ..model import ScopeVI

        scvi.settings.seed = self.seed
        adata = adata_train.copy()
        ScopeVI.setup_anndata(
            adata,
            perturbation_key,
            control_value=control_value,
            gene_embeddings=self.gene_embeddings,
            layer=layer,
            context_key=context_key,
            combination_delimiter=delimiter,
        )
        likelihood = "normal" if data_scale == "log1p_norm" else "nb"
        kwargs = {"gene_likelihood": likelihood, **self.model_kwargs}
        self.model_ = ScopeVI(adata, **kwargs)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model_.train(
                enable_progress_bar=False,
                accelerator="cpu",
                enable_model_summary=False,
                **self.train_kwargs,
            )
        return self

    def predict(
        self, adata_control: ad.AnnData, perturbations: Sequence[str], aggregate: str | None = None
    ) -> ad.AnnData:
        """Predict with ``ScopeVI.predict`` (one sample per control cell).

        Parameters
        ----------
        adata_control
            Control cells on the training scale.
        perturbations
            Labels to predict.
        aggregate
            ``None`` or ``"mean"``.

        Returns
        -------
        ScopeVI's prediction AnnData.
        """
        return self.model_.predict(
            adata_control, list(perturbations), aggregate=aggregate, seed=self.seed,
            **self.predict_kwargs,
        )


def make_model(
    name: str,
    gene_embeddings: pd.DataFrame | None = None,
    seed: int = 0,
    scopevi_kwargs: dict[str, Any] | None = None,
):
    """Build a benchmark model by name.

    Parameters
    ----------
    name
        One of :data:`MODELS`.
    gene_embeddings
        Gene embeddings for ``"embedding_nn"``, ``"linear"`` (``None``: the PCA rows of
        measured genes) and ``"scopevi"``.
    seed
        Training seed (ScopeVI).
    scopevi_kwargs
        ``{"model": {...}, "train": {...}, "predict": {...}}`` overriding
        :data:`SCOPEVI_DEFAULTS` and ``ScopeVI.predict``'s defaults.

    Returns
    -------
    An unfitted model with ``fit`` and ``predict``.

    Raises
    ------
    ValueError
        For an unknown name, or ``"embedding_nn"`` without embeddings.

    Examples
    --------
    >>> make_model("additive").name
    'additive'
    """
    simple = {
        "no_change": NoChangeBaseline,
        "perturbed_mean": PerturbedMeanBaseline,
        "matching_mean": MatchingMeanBaseline,
        "additive": AdditiveBaseline,
    }
    if name in simple:
        return simple[name]()
    if name == "embedding_nn":
        if gene_embeddings is None:
            raise ValueError("model 'embedding_nn' needs gene_embeddings.")
        return EmbeddingNeighborsBaseline(gene_embeddings, temperature=0.1)
    if name == "linear":
        return LinearBaseline(gene_embeddings, n_components=10, ridge=0.1)
    if name == "scopevi":
        kwargs = scopevi_kwargs or {}
        return ScopeVIModel(
            gene_embeddings, kwargs.get("model"), kwargs.get("train"), seed=seed,
            predict_kwargs=kwargs.get("predict"),
        )
    raise ValueError(f"Unknown model {name!r}; choose from {list(MODELS)}.")


def _log_anndata(adata: ad.AnnData, task: BenchmarkTask, perturbation_key: str) -> ad.AnnData:
    return ad.AnnData(
        log1p_expression(adata, None, task.data_scale),
        obs=pd.DataFrame(
            {perturbation_key: adata.obs[task.perturbation_key].astype(str).to_numpy()},
            index=adata.obs_names,
        ),
        var=pd.DataFrame(index=adata.var_names),
    )


def _records(scores: pd.DataFrame, **fields) -> list[dict]:
    long = (
        scores.rename_axis("perturbation")
        .reset_index()
        .melt(id_vars="perturbation", var_name="metric", value_name="value")
    )
    for key, value in fields.items():
        long[key] = value
    return long.to_dict("records")


def run_benchmark(
    data: str | os.PathLike | ad.AnnData | None,
    task: str,
    models: Sequence[str] = ("scopevi", "linear", "additive"),
    seeds: int = 3,
    out: str | os.PathLike | None = None,
    *,
    scopevi_kwargs: dict[str, Any] | None = None,
    distributional: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Run models on every split of a task, beside the split-half noise ceiling.

    Parameters
    ----------
    data
        The task's h5ad file, the shared data folder, or an AnnData (see
        :func:`~perturbscope.benchmark.load_task`); ``None`` for ``task="simulated"``.
    task
        A name in :data:`~perturbscope.benchmark.TASKS`.
    models
        Names from ``("scopevi", "no_change", "perturbed_mean", "matching_mean", "additive",
        "embedding_nn", "linear")``. Models the task cannot run are skipped with a warning.
    seeds
        Number of seeds (``0 .. seeds-1``): the fold assignment, few-shot cells, halving of the
        ceiling and ScopeVI's training all change with the seed.
    out
        Folder to write ``metrics.csv`` (every metric), ``summary.csv``, ``results.md`` and
        plots to; nothing is written when ``None``.
    scopevi_kwargs
        ``{"model": {...}, "train": {...}, "predict": {...}}`` overriding ScopeVI's benchmark
        settings.
    distributional
        Also compute the distributional metrics (slower).
    progress
        Show a progress bar.

    Returns
    -------
    A long DataFrame with columns ``task``, ``seed``, ``split``, ``group``, ``model``,
    ``perturbation``, ``metric``, ``value``. The noise ceiling is the model
    ``"noise_ceiling"``; the mode-collapse figure is the metric ``"delta_correlation"``
    (perturbation ``"(all)"``), with the observed figure under the model ``"observed"``.

    Raises
    ------
    ValueError
        For an unknown task or model.

    Examples
    --------
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=1,
    ...                         distributional=False, progress=False)
    >>> sorted(results["model"].unique())
    ['additive', 'noise_ceiling', 'observed']
    """
    from tqdm.auto import tqdm

    spec = _check_task(task)
    models = list(models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"Unknown models {unknown}; choose from {list(MODELS)}.")
    for m in [m for m in models if m in spec.not_applicable]:
        warnings.warn(f"task {task!r} skips model {m!r}: {spec.not_applicable[m]}.", stacklevel=2)
    models = [m for m in models if m not in spec.not_applicable]
    adata, embeddings = load_task(task, data)
    key, control_value = spec.perturbation_key, spec.control_value
    all_log = _log_anndata(adata, spec, key)

    jobs = [(seed, split) for seed in range(seeds) for split in spec.make_splits(adata, seed)]
    bar = tqdm(total=len(jobs) * (len(models) + 1), desc=f"benchmark {task}", disable=not progress)
    records: list[dict] = []
    timings: list[dict] = []
    contexts = None if spec.context_key is None else adata.obs[spec.context_key].astype(str)
    for seed, split in jobs:
        fields = {"task": task, "seed": seed, "split": split.name}
        reference, ceiling = _split_reference(all_log, split, key, control_value, contexts, seed)
        groups = split.labels
        records += _with_groups(_records(ceiling, model=CEILING, **fields), groups)
        records += _collapse_records(
            reference.observed_means, reference.control_mean, groups, model=OBSERVED, **fields
        )
        bar.update()
        for name in models:
            start = time.perf_counter()
            model = make_model(name, embeddings, seed=seed, scopevi_kwargs=scopevi_kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model.fit(
                    adata[split.train],
                    key,
                    control_value=control_value,
                    context_key=spec.context_key,
                    data_scale=spec.data_scale,
                )
                prediction = model.predict(adata[split.control], split.perturbations)
            records += _score_records(
                prediction, reference, groups, distributional, model=name, **fields
            )
            timings.append(
                {
                    "model": name,
                    "seed": seed,
                    "split": split.name,
                    "seconds": time.perf_counter() - start,
                }
            )
            bar.update()
    bar.close()
    results = pd.DataFrame.from_records(records)[
        ["task", "seed", "split", "group", "model", "perturbation", "metric", "value"]
    ]
    results.attrs["timings"] = pd.DataFrame(timings)
    if out is not None:
        write_results(results, out, title=spec.description)
    return results


def _split_reference(
    all_log: ad.AnnData,
    split,
    key: str,
    control_value: str,
    contexts: pd.Series | None,
    seed: int,
):
    """The observed side of a split (:func:`prepare_reference`) and its split-half ceiling.

    Systema's centroid is the mean profile of every perturbation of the split's context (of all
    cells without a context), left undefined when there is only one perturbation, where it would
    be the truth itself.
    """
    labels = all_log.obs[key].astype(str)
    context_cells = (
        np.ones(all_log.n_obs, dtype=bool)
        if split.context is None or contexts is None
        else (contexts == split.context).to_numpy()
    )
    perturbed = all_log[context_cells & (labels != control_value).to_numpy()]
    profiles = pseudobulk(perturbed, key).to_numpy()
    centroid = profiles.mean(axis=0) if len(profiles) > 1 else np.full(all_log.n_vars, np.nan)
    observed, control = all_log[split.test], all_log[split.control]
    reference = prepare_reference(observed, control, key, perturbed_centroid=centroid, seed=seed)
    ceiling = noise_ceiling(
        observed, control, key, de_genes=reference.de_genes, perturbed_centroid=centroid, seed=seed
    )
    return reference, ceiling


def _score_records(
    prediction: ad.AnnData, reference, groups: pd.Series, distributional: bool, **fields
) -> list[dict]:
    """Long records of a prediction's metrics and of its mode-collapse figure.

    ``fields`` (model, task, seed, split, ...) are copied into every record; ``fields["seed"]``
    also seeds the distributional metrics.
    """
    scores = evaluate(prediction, reference, distributional=distributional, seed=fields["seed"])
    records = _with_groups(_records(scores, **fields), groups)
    means = pseudobulk(prediction, OUTPUT_KEYS.PERTURBATION, layer=OUTPUT_KEYS.LOG1P_NORM_LAYER)
    means.index = means.index.astype(str)
    return records + _collapse_records(
        means.loc[reference.observed_means.index], reference.control_mean, groups, **fields
    )


def _with_groups(records: list[dict], groups: pd.Series) -> list[dict]:
    for r in records:
        r["group"] = groups.get(r["perturbation"], "")
    return records


def _collapse_records(
    means: pd.DataFrame, control: np.ndarray, groups: pd.Series, **fields
) -> list[dict]:
    """The mode-collapse figure per group of held-out perturbations (and over all of them)."""
    rows = []
    for group in pd.unique(groups):
        members = [p for p in means.index if groups.get(p) == group]
        if len(members) >= 2:
            rows.append(
                {
                    "group": group,
                    "perturbation": "(all)",
                    "metric": MODE_COLLAPSE,
                    "value": delta_correlation(means.loc[members], control),
                    **fields,
                }
            )
    return rows


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each model's per-seed mean score.

    Within a seed, a metric is averaged over the held-out perturbations of every split of a
    group (``seen2``, ``zero-shot``, ...); the spread is over seeds.

    Parameters
    ----------
    results
        The output of :func:`run_benchmark`.

    Returns
    -------
    A DataFrame indexed by (task, group, model, metric) with columns ``mean``, ``sd`` and
    ``n_seeds``.

    Examples
    --------
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=2,
    ...                         distributional=False, progress=False)
    >>> summarize(results).loc[("simulated", "unseen_single", "additive", "pearson_delta"), "n_seeds"]
    np.int64(2)
    """
    per_seed = results.groupby(["task", "group", "model", "metric", "seed"])["value"].mean()
    grouped = per_seed.groupby(level=["task", "group", "model", "metric"])
    summary = pd.DataFrame(
        {"mean": grouped.mean(), "sd": grouped.std(ddof=1).fillna(0.0), "n_seeds": grouped.size()}
    )
    return summary


def markdown_table(
    summary: pd.DataFrame,
    metrics: Sequence[str] = SUMMARY_METRICS,
    models: Sequence[str] | None = None,
) -> str:
    """A markdown table per (task, group): models as rows, metrics as ``mean ± sd`` columns.

    Parameters
    ----------
    summary
        The output of :func:`summarize`.
    metrics
        Columns to show.
    models
        Row order; models missing from ``summary`` are shown as "not run" (the ``observed`` row
        is left out when missing). Defaults to the models present, ceiling first.

    Returns
    -------
    Markdown text.

    Examples
    --------
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=1,
    ...                         distributional=False, progress=False)
    >>> print(markdown_table(summarize(results), metrics=["pearson_delta"]).splitlines()[2])
    | model | pearson_delta |
    """
    lines = []
    present = list(pd.unique(summary.index.get_level_values("model")))
    if models is None:
        models = [CEILING, *[m for m in MODELS if m in present], OBSERVED]
    for (task, group), block in summary.groupby(level=["task", "group"], sort=False):
        lines += [f"### {task}: {group}", ""]
        lines.append("| model | " + " | ".join(metrics) + " |")
        lines.append("|---" * (len(metrics) + 1) + "|")
        table = block.droplevel(["task", "group"])
        for model in models:
            label = "noise ceiling (split-half)" if model == CEILING else model
            if model not in table.index.get_level_values("model"):
                if model == OBSERVED:
                    continue
                lines.append(f"| {label} | " + " | ".join(["not run"] * len(metrics)) + " |")
                continue
            cells = []
            for metric in metrics:
                if (model, metric) in table.index and np.isfinite(
                    table.loc[(model, metric), "mean"]
                ):
                    row = table.loc[(model, metric)]
                    cells.append(f"{row['mean']:.3f} ± {row['sd']:.3f}")
                else:
                    cells.append("–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    arrows = ", ".join(sorted(m for m in metrics if m in LOWER_IS_BETTER))
    exceptions = [f"{MODE_COLLAPSE} (mode collapse: compare with the observed row)"]
    exceptions += [f"{m} (best at 1)" for m in metrics if m in CLOSEST_TO_ONE]
    lines.append(
        f"Lower is better for: {arrows}; higher for the others, except " + ", ".join(exceptions) + "."
    )
    return "\n".join(lines)


def write_results(results: pd.DataFrame, out: str | os.PathLike, title: str = "") -> Path:
    """Write ``metrics.csv``, ``summary.csv``, ``results.md`` and plots to ``out``.

    Parameters
    ----------
    results
        The output of :func:`run_benchmark`.
    out
        Output folder (created).
    title
        Heading of ``results.md``.

    Returns
    -------
    The folder.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..pl._benchmark import benchmark_mode_collapse, benchmark_scores

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results.to_csv(folder / "metrics.csv", index=False)
    summary = summarize(results)
    summary.to_csv(folder / "summary.csv")
    text = f"# {title}\n\n" if title else ""
    (folder / "results.md").write_text(text + markdown_table(summary) + "\n")
    for metric in ("pearson_delta_top_de", "l2_top_expressed"):
        if metric in set(results["metric"]):
            ax = benchmark_scores(results, metric=metric)
            ax.figure.savefig(folder / f"{metric}.png", dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
    if MODE_COLLAPSE in set(results["metric"]):  # needs two or more held-out perturbations
        ax = benchmark_mode_collapse(results)
        ax.figure.savefig(folder / "delta_correlation.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
    return folder
