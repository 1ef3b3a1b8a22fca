"""Learning curves for new contexts: zero-shot and k-shot prediction as k grows.

For each held-out context (cell type, cell line) the perturbed cells of that context are left
out of training except, for k-shot, ``k`` cells of each perturbation. The ``k`` cells are
*nested*: the cells given at ``k=5`` are among those given at ``k=10``, and so on, so a larger
``k`` only adds cells. By default the test cells of ``k`` are the cells not given at ``k``, and
a perturbation is scored at ``k`` while enough of its cells remain, so at large ``k`` the test
set shrinks and perturbations with few cells drop out; ``common_test=True`` scores every ``k``
on the same cells (those left at the largest ``k``) and perturbations. ScopeVI is trained once
per context on the zero-shot training cells (the reference) and then adapted to the context
with :meth:`~perturbscope.ScopeVI.load_query_data` on its control cells plus the ``k`` shots
(by default the gene-embedding path and the decoder's hidden layers frozen); baselines are
refitted on the k-shot training cells.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scvi.utils import track

from .._logging import progress_switch, quiet_lightning
from ..data import log1p_expression
from ..model import ScopeVI
from ._models import ScopeVIModel, make_model
from ._scoring import collapse_records, long_records, score_records, split_reference, with_groups
from ._splits import Split, _labels, unseen_context_split
from ._summaries import CEILING, OBSERVED

#: Model names of the learning curve's ScopeVI rows.
SCOPEVI_QUERY = "scopevi"
SCOPEVI_REFERENCE = "scopevi_reference"


def few_shot_splits(
    adata: ad.AnnData,
    perturbation_key: str,
    context_key: str,
    context: str,
    shots: Sequence[int] = (0, 5, 10, 25, 50),
    control_value: str = "control",
    seed: int = 0,
    min_test_cells: int = 10,
    common_test: bool = False,
) -> dict[int, Split]:
    """Nested zero- and few-shot splits of one held-out context.

    Parameters
    ----------
    adata
        The screen.
    perturbation_key, context_key, context, control_value
        As for :func:`~perturbscope.benchmark.unseen_context_split`.
    shots
        Values of ``k``, cells of each held-out perturbation given in training.
    seed
        Seed of the order in which cells are given.
    min_test_cells
        A perturbation is scored at ``k`` only if at least this many of its cells in the context
        remain for testing; with fewer it is left out of that ``k`` (neither trained on nor
        scored there).
    common_test
        Score every ``k`` on the same test cells, those not given at the largest ``k``, and on
        the perturbations with enough of them there.

    Returns
    -------
    ``{k: Split}``, with groups ``"zero-shot"`` and ``"{k}-shot"``; a ``k`` that leaves no
    perturbation to score is absent.

    Raises
    ------
    ValueError
        If ``shots`` is empty or holds a negative or repeated value, if ``min_test_cells`` is
        below 4, or as :func:`~perturbscope.benchmark.unseen_context_split` does.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=3, n_combinations=0,
    ...                                n_cells_per_condition=20)
    >>> splits = few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(0, 2, 5))
    >>> [s.labels.iloc[0] for s in splits.values()], len(splits[5].test)
    (['zero-shot', '2-shot', '5-shot'], 45)
    """
    shots = [int(k) for k in shots]
    if not shots or min(shots) < 0 or len(set(shots)) != len(shots):
        raise ValueError(f"shots must be distinct non-negative integers, got {shots}.")
    if min_test_cells < 4:
        raise ValueError(
            f"min_test_cells must be at least 4 (DE genes and the split-half ceiling need cells "
            f"on both sides), got {min_test_cells}."
        )
    base = unseen_context_split(adata, perturbation_key, context_key, context, control_value, k=0)
    labels = _labels(adata, perturbation_key, control_value)
    in_context = (adata.obs[context_key].astype(str) == str(context)).to_numpy()
    rng = np.random.default_rng(seed)
    order = {
        p: rng.permutation(adata.obs_names[in_context & (labels == p).to_numpy()].to_numpy())
        for p in base.perturbations
    }
    held = set(base.test)
    splits = {}
    largest = max(shots)
    for k in sorted(shots):
        cut = largest if common_test else k
        scored = [p for p in base.perturbations if len(order[p]) >= cut + min_test_cells]
        if not scored:
            warnings.warn(
                f"k={k} leaves fewer than {min_test_cells} test cells for every perturbation of "
                f"context {context!r}; it is skipped.",
                stacklevel=2,
            )
            continue
        given = np.concatenate([order[p][:k] for p in scored])
        test = np.concatenate([order[p][cut:] for p in scored])
        train = np.array([c for c in adata.obs_names if c not in held] + list(given))
        group = "zero-shot" if k == 0 else f"{k}-shot"
        splits[k] = Split(
            name=f"unseen_context {context} {group} seed {seed}",
            train=train,
            control=base.control,
            test=test,
            labels=pd.Series(group, index=pd.Index(scored, name="perturbation")),
            context=str(context),
        )
    return splits


def _adapt_to_context(
    reference: ScopeVIModel, adata_query: ad.AnnData, epochs: int, seed: int,
    query_kwargs: dict[str, Any] | None = None,
) -> Any:
    """``ScopeVI.load_query_data`` on the context's cells, fine-tuned for ``epochs``.

    The fine-tuning uses the reference's ``accelerator`` and ``batch_size`` where its training
    settings name them (the CPU and 128 cells otherwise), and Lightning's loggers are quieted
    only while it runs.
    """
    import scvi

    scvi.settings.seed = seed
    query = ScopeVI.load_query_data(adata_query.copy(), reference.model_, **(query_kwargs or {}))
    settings = reference.train_kwargs
    with warnings.catch_warnings(), quiet_lightning(logging.ERROR):
        warnings.simplefilter("ignore")
        query.train(max_epochs=epochs, batch_size=settings.get("batch_size", 128),
                    accelerator=settings.get("accelerator", "cpu"),
                    enable_progress_bar=False, enable_model_summary=False)
    return query


def learning_curve(
    adata: ad.AnnData,
    perturbation_key: str,
    context_key: str,
    *,
    contexts: Sequence[str] | None = None,
    shots: Sequence[int] = (0, 5, 10, 25, 50),
    control_value: str = "control",
    gene_embeddings: pd.DataFrame | None = None,
    data_scale: str = "log1p_norm",
    baselines: Sequence[str] = ("no_change", "perturbed_mean", "matching_mean"),
    scopevi: bool = True,
    scopevi_kwargs: dict[str, Any] | None = None,
    fine_tune_epochs: int = 100,
    query_variants: dict[str, dict[str, Any]] | None = None,
    n_samples: int = 3,
    seeds: int = 1,
    min_test_cells: int = 10,
    common_test: bool = False,
    distributional: bool = True,
    task: str = "learning_curve",
    progress_bar: bool = True,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Zero- and few-shot scores on held-out contexts as the number of given cells ``k`` grows.

    Parameters
    ----------
    adata
        The screen (not modified), on the scale given by ``data_scale``.
    perturbation_key, context_key, control_value
        ``obs`` columns of perturbations and contexts, and the control label.
    contexts
        Contexts to hold out in turn; all by default.
    shots
        Values of ``k`` (see :func:`few_shot_splits`).
    gene_embeddings
        Gene embeddings for ScopeVI and embedding baselines.
    data_scale
        ``"log1p_norm"`` or ``"counts"``.
    baselines
        Baseline names (see :func:`~perturbscope.benchmark.make_model`). At ``k > 0``
        ``matching_mean`` is the mean of the ``k`` given cells, the obvious few-shot estimate.
    scopevi
        Also run ScopeVI: ``"scopevi_reference"`` (trained on the zero-shot cells, never sees
        the shots) and ``"scopevi"`` (the reference adapted by ``load_query_data`` to the
        context's controls and shots, ``fine_tune_epochs`` epochs).
    scopevi_kwargs
        ``{"model": ..., "train": ...}`` for the reference ScopeVI.
    fine_tune_epochs
        Epochs of the query fine-tuning.
    query_variants
        ``{model name: load_query_data kwargs}``, one adapted ScopeVI per entry; by default
        ``{"scopevi": {}}`` (the decoder's shared layers frozen). E.g.
        ``{"scopevi": {}, "scopevi_full_fine_tune": {"freeze_decoder": False}}``.
    n_samples
        ScopeVI draws per control cell (the distributional metrics score these cells).
    seeds
        Seeds ``0 .. seeds-1``: the order of the given cells, the ceiling's halving, training.
    min_test_cells, common_test
        See :func:`few_shot_splits`.
    distributional
        Also compute the distributional metrics.
    task
        Value of the ``task`` column.
    progress_bar
        Show a progress bar over held-out contexts.
    progress
        Deprecated name of ``progress_bar``, kept for one release (warns with a
        :class:`FutureWarning`).

    Returns
    -------
    The long table of :func:`~perturbscope.benchmark.run_benchmark` (one row per seed, split,
    model, perturbation and metric; the noise ceiling as model ``"noise_ceiling"``) with an
    extra ``shots`` column.

    Raises
    ------
    KeyError
        If ``context_key`` is not a column.
    ValueError
        For bad ``shots``, an unknown baseline, or a context without control cells.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=3, n_combinations=0,
    ...                                n_cells_per_condition=20)
    >>> curve = learning_curve(adata, "perturbation", "cell_type", shots=(0, 5),
    ...                        data_scale="counts", scopevi=False, distributional=False,
    ...                        baselines=["matching_mean"], progress_bar=False)
    >>> sorted(curve["shots"].unique().tolist())
    [0, 5]
    """
    progress_bar = progress_switch(progress_bar, progress, "learning_curve")
    if context_key not in adata.obs.columns:
        raise KeyError(f"context_key {context_key!r} not in adata.obs; columns are {list(adata.obs.columns)}.")
    contexts = sorted(pd.unique(adata.obs[context_key].astype(str))) if contexts is None else list(contexts)
    for name in baselines:  # fail before any training
        make_model(name, gene_embeddings)
    labels = adata.obs[perturbation_key].astype(str)
    all_log = ad.AnnData(
        log1p_expression(adata, None, data_scale),
        obs=pd.DataFrame({perturbation_key: labels.to_numpy()}, index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
    )
    context_labels = adata.obs[context_key].astype(str)
    # every split first, so that bad input fails before any training
    jobs = [
        (seed, context, few_shot_splits(adata, perturbation_key, context_key, context, shots,
                                        control_value, seed, min_test_cells, common_test))
        for seed in range(seeds) for context in contexts
    ]
    records: list[dict] = []
    for seed, context, splits in track(jobs, description="learning curve", disable=not progress_bar):
        reference = None
        if scopevi:
            zero_shot = unseen_context_split(adata, perturbation_key, context_key, context, control_value)
            kwargs = scopevi_kwargs or {}
            reference = ScopeVIModel(gene_embeddings, kwargs.get("model"), kwargs.get("train"), seed=seed,
                                     predict_kwargs={"n_samples": n_samples})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                reference.fit(adata[zero_shot.train], perturbation_key, control_value=control_value,
                              context_key=context_key, data_scale=data_scale)
        in_context = (adata.obs[context_key].astype(str) == context).to_numpy()
        for k, split in splits.items():
            fields = {"task": task, "seed": seed, "split": split.name, "shots": k}
            groups = split.labels
            reference_scores, ceiling = split_reference(
                all_log, split, perturbation_key, control_value, context_labels, seed
            )
            records += with_groups(long_records(ceiling, model=CEILING, **fields), groups)
            records += collapse_records(reference_scores.observed_means, reference_scores.control_mean,
                                         groups, model=OBSERVED, **fields)
            predictions = {}
            for name in baselines:
                model = make_model(name, gene_embeddings, seed=seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    model.fit(adata[split.train], perturbation_key, control_value=control_value,
                              context_key=context_key, data_scale=data_scale)
                    predictions[name] = model.predict(adata[split.control], split.perturbations)
            if reference is not None:
                predictions[SCOPEVI_REFERENCE] = reference.predict(adata[split.control], split.perturbations)
                query_cells = np.isin(adata.obs_names, split.train) & in_context
                for name, kwargs in (query_variants or {SCOPEVI_QUERY: {}}).items():
                    query = _adapt_to_context(reference, adata[query_cells], fine_tune_epochs, seed,
                                              kwargs)
                    predictions[name] = query.predict(
                        adata[split.control], split.perturbations, n_samples=n_samples, seed=seed
                    )
            for name, prediction in predictions.items():
                records += score_records(prediction, reference_scores, groups, distributional,
                                          model=name, **fields)
    columns = ["task", "seed", "split", "shots", "group", "model", "perturbation", "metric", "value"]
    return pd.DataFrame.from_records(records)[columns]
