"""The benchmark runner: every model on every split of a task, beside the noise ceiling.

For each seed and split the observed side (control mean, observed means, DE genes, centroid,
PCA) is computed once by :func:`prepare_reference`; the split-half ceiling is scored with the
same DE genes; every model is fitted on the split's training cells only, predicts the held-out
perturbations from the split's control cells, and is scored by :func:`evaluate`. The result is
one long table: one row per (seed, split, model, perturbation, metric).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scvi.utils import track

from .._logging import progress_switch
from ._models import MODELS, make_model
from ._scoring import (
    collapse_records,
    log_anndata,
    long_records,
    score_records,
    split_reference,
    with_groups,
)
from ._summaries import CEILING, OBSERVED, write_results
from ._tasks import _check_task, load_task


def run_benchmark(
    data: str | os.PathLike | ad.AnnData | None,
    task: str,
    models: Sequence[str] = ("scopevi", "linear", "additive"),
    seeds: int = 3,
    out: str | os.PathLike | None = None,
    *,
    scopevi_kwargs: dict[str, Any] | None = None,
    distributional: bool = True,
    progress_bar: bool = True,
    progress: bool | None = None,
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
        Names from :data:`~perturbscope.benchmark.MODELS`. Models the task cannot run are
        skipped with a warning.
    seeds
        Number of seeds (``0 .. seeds-1``), at least 1: the fold assignment, few-shot cells,
        halving of the ceiling, ScopeVI's training (``scvi.settings.seed``) and its effect
        prior's cross-fitting folds (``prior_seed``, unless ``scopevi_kwargs["model"]`` sets
        it) change with the seed.
    out
        Folder to write ``metrics.csv`` (every metric), ``summary.csv`` and ``results.md`` to
        (the CLI adds the plots of :func:`benchmark_figures`); nothing is written when ``None``.
    scopevi_kwargs
        ``{"model": {...}, "train": {...}, "predict": {...}}`` overriding ScopeVI's benchmark
        settings.
    distributional
        Also compute the distributional metrics (slower).
    progress_bar
        Show a progress bar over fits.
    progress
        Deprecated name of ``progress_bar``, kept for one release (warns with a
        :class:`FutureWarning`).

    Returns
    -------
    A long DataFrame with columns ``task``, ``seed``, ``split``, ``group``, ``model``,
    ``perturbation``, ``metric``, ``value``; ``attrs["timings"]`` holds one record (a dict)
    per fit, with its ``seconds``. The noise ceiling is the model
    ``"noise_ceiling"``; the mode-collapse figure is the metric ``"delta_correlation"``
    (perturbation ``"(all)"``), with the observed figure under the model ``"observed"``.

    Raises
    ------
    ValueError
        For an unknown task or model, ``seeds`` below 1, or no model the task can run.

    Examples
    --------
    >>> results = run_benchmark(None, "simulated", models=["additive"], seeds=1,
    ...                         distributional=False, progress_bar=False)
    >>> sorted(results["model"].unique())
    ['additive', 'noise_ceiling', 'observed']
    """
    progress_bar = progress_switch(progress_bar, progress, "run_benchmark")
    spec = _check_task(task)
    if isinstance(seeds, bool) or not isinstance(seeds, int | np.integer) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}.")
    models = list(models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"Unknown models {unknown}; choose from {list(MODELS)}.")
    for m in [m for m in models if m in spec.not_applicable]:
        warnings.warn(f"task {task!r} skips model {m!r}: {spec.not_applicable[m]}.", stacklevel=2)
    models = [m for m in models if m not in spec.not_applicable]
    if not models:
        raise ValueError(f"task {task!r} can run none of the models asked for; it skips "
                         f"{sorted(spec.not_applicable)}.")
    adata, embeddings = load_task(task, data)
    key, control_value = spec.perturbation_key, spec.control_value
    all_log = log_anndata(adata, spec, key)

    jobs = [(seed, split) for seed in range(seeds) for split in spec.make_splits(adata, seed)]
    records: list[dict] = []
    timings: list[dict] = []
    contexts = None if spec.context_key is None else adata.obs[spec.context_key].astype(str)
    for seed, split in track(jobs, description=f"benchmark {task}", disable=not progress_bar):
        fields = {"task": task, "seed": seed, "split": split.name}
        reference, ceiling = split_reference(all_log, split, key, control_value, contexts, seed, distributional)
        groups = split.labels
        records += with_groups(long_records(ceiling, model=CEILING, **fields), groups)
        records += collapse_records(
            reference.observed_means, reference.control_mean, groups, model=OBSERVED, **fields
        )
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
            records += score_records(
                prediction, reference, groups, distributional,
                intervals=getattr(model, "intervals_", None), model=name, **fields,
            )
            timings.append(
                {
                    "model": name,
                    "seed": seed,
                    "split": split.name,
                    "seconds": time.perf_counter() - start,
                }
            )
    results = pd.DataFrame.from_records(records)[
        ["task", "seed", "split", "group", "model", "perturbation", "metric", "value"]
    ]
    # plain records: a DataFrame in attrs breaks pandas' concat and merge of two results
    results.attrs["timings"] = timings
    if out is not None:
        write_results(results, out, title=spec.description)
    return results
