"""Scoring every modality of a multimodal screen: the benchmark's metrics, baselines and ceiling.

Each modality (RNA, surface protein, ATAC peaks) is scored as the RNA benchmark scores RNA,
with the same functions: its counts are log1p-normalised (1e4 per cell, the scale of
ScopeVI's per-modality effect priors and predictions), the observed side and its split-half
noise ceiling come from :func:`~perturbscope.benchmark._scoring.split_reference`, and every
prediction is scored by :func:`~perturbscope.benchmark._scoring.score_records`
(:func:`~perturbscope.benchmark.evaluate`'s metrics: Pearson delta on all features and on the
top DE features, L2 on the most expressed, ...). The baselines are the benchmark's own
(:func:`~perturbscope.benchmark.make_model`), fitted on the modality's training counts.

A cell without a measurement of a modality (an all-zero row, MultiVI's convention) is left out
of that modality's observed profiles, controls and baselines, as it is of ScopeVI's effect
prior.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ..data import log1p_expression
from ._models import BASELINES, make_model
from ._scoring import collapse_records, long_records, score_records, split_reference, with_groups
from ._splits import Split
from ._summaries import CEILING, OBSERVED

#: Columns of :func:`score_modalities`' long table.
MODALITY_COLUMNS = ["modality", "seed", "split", "group", "model", "perturbation", "metric", "value"]


def modality_cells(
    mdata: Any,
    modality: str,
    perturbation_key: str,
    context_key: str | None = None,
    layer: str | None = None,
) -> ad.AnnData:
    """One modality's counts with the MuData's labels, cells measured in it only.

    Parameters
    ----------
    mdata
        A :class:`mudata.MuData` whose global ``obs`` holds the labels.
    modality
        Name of the modality in ``mdata.mod`` (e.g. ``"adt"``).
    perturbation_key
        Global ``obs`` column of perturbation labels.
    context_key
        Global ``obs`` column of contexts, carried along when given.
    layer
        Layer of the modality holding counts; ``X`` when ``None``.

    Returns
    -------
    A new AnnData: the counts in ``X``, ``obs`` with ``perturbation_key`` (and ``context_key``),
    the modality's ``var_names``; cells whose row has no counts (not measured) are left out.

    Raises
    ------
    KeyError
        If ``modality`` is not in the MuData, a key is not in its global ``obs`` or ``layer`` is
        not a layer of the modality.
    ValueError
        If no cell has counts in the modality.

    Examples
    --------
    >>> from perturbscope.data import simulate_multimodal_perturbseq
    >>> mdata, _ = simulate_multimodal_perturbseq(n_genes=60, n_perturbed_genes=6, n_combinations=0,
    ...     n_proteins=12, n_cells_per_condition=5, missing_protein_fraction=0.2)
    >>> cells = modality_cells(mdata, "adt", "perturbation")
    >>> cells.n_obs == int(mdata.obs["has_protein"].sum()), list(cells.obs.columns)
    (True, ['perturbation'])
    """
    if modality not in mdata.mod:
        raise KeyError(f"modality {modality!r} is not in the MuData; its modalities are {list(mdata.mod)}.")
    columns = [perturbation_key] + ([context_key] if context_key is not None else [])
    missing = [c for c in columns if c not in mdata.obs.columns]
    if missing:
        raise KeyError(f"{missing} not in the MuData's global obs; its columns are {list(mdata.obs.columns)}.")
    data = mdata.mod[modality]
    if layer is not None and layer not in data.layers:
        raise KeyError(f"layer {layer!r} is not a layer of modality {modality!r}; layers are {list(data.layers)}.")
    counts = data.X if layer is None else data.layers[layer]
    measured = np.asarray(counts.sum(axis=1)).ravel() > 0
    if not measured.any():
        raise ValueError(f"no cell has counts in modality {modality!r}.")
    unknown = data.obs_names.difference(mdata.obs_names)
    if len(unknown):
        raise ValueError(f"modality {modality!r} has cells that are not in the MuData's obs: {list(unknown[:5])}.")
    # labels by cell name: the modality's rows may be in another order, or a subset, of the global obs
    labels = mdata.obs.loc[data.obs_names, columns]
    obs = pd.DataFrame({c: labels[c].astype(str).to_numpy() for c in columns}, index=data.obs_names.copy())
    cells = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=data.var_names.copy()))
    return cells[measured].copy()


def _restricted(split: Split, names: pd.Index) -> Split:
    """The split on the cells in ``names`` (those measured in a modality)."""
    return dataclasses.replace(
        split, **{part: np.asarray([n for n in getattr(split, part) if n in names])
                  for part in ("train", "control", "test")}
    )


def score_modalities(
    mdata: Any,
    split: Split,
    predictions: Mapping[str, Any],
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    context_key: str | None = None,
    modalities: Sequence[str] | None = None,
    baselines: Sequence[str] = ("no_change", "perturbed_mean", "additive", "linear"),
    gene_embeddings: pd.DataFrame | None = None,
    seed: int = 0,
    distributional: bool = False,
) -> pd.DataFrame:
    """Score every modality's predictions, the baselines and the noise ceiling on one split.

    Parameters
    ----------
    mdata
        The screen, as a :class:`mudata.MuData` of counts (global ``obs`` with the labels).
    split
        The split (cells named by ``obs_names``, e.g. from
        :func:`~perturbscope.benchmark.unseen_single_split` on ``mdata``'s RNA with the global
        labels); per modality only its measured cells are used.
    predictions
        ``{model name: MuData}`` of predictions of the split's held-out perturbations, one
        modality per name (as :meth:`perturbscope.ScopeVI.predict` returns them), each with
        ``obs["perturbation"]`` and the log1p-normalised ``layers["log1p_norm"]``.
    perturbation_key, control_value, context_key
        The screen's labels.
    modalities
        Modality names to score; ``None``: every modality of ``mdata`` that every prediction has.
    baselines
        Names from :data:`~perturbscope.benchmark.BASELINES`, each fitted per modality on its
        training counts and predicted from the split's measured control cells.
    gene_embeddings
        Gene embeddings for ``"embedding_nn"`` and ``"linear"`` (``None``: ``"linear"`` uses its
        PCA rows).
    seed
        Seed of the halving of the ceiling and of the distributional metrics.
    distributional
        Also the distributional metrics (needs predicted cells, not means).

    Returns
    -------
    A long DataFrame with the columns of :data:`MODALITY_COLUMNS`. The ceiling is the model
    ``"noise_ceiling"``; the observed mode-collapse figure is the model ``"observed"``. With the
    modality as the task, :func:`~perturbscope.benchmark.summarize` and
    :func:`~perturbscope.benchmark.markdown_table` summarise it:
    ``summarize(table.rename(columns={"modality": "task"}))``.

    Raises
    ------
    ValueError
        If ``predictions`` is empty, a modality is not in ``mdata`` or lacks from a prediction,
        or a baseline name is unknown; and whatever the scoring refuses (e.g. a perturbation
        observed but not predicted, fewer than 4 held-out cells of a perturbation).

    Examples
    --------
    >>> table = score_modalities(mdata, split, {"scopevi": prediction})  # doctest: +SKIP
    >>> table.groupby(["modality", "model", "metric"])["value"].mean()  # doctest: +SKIP
    """
    if not predictions:
        raise ValueError("predictions is empty; give at least one {name: MuData} of predictions.")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}.")
    if modalities is None:
        modalities = [m for m in mdata.mod if all(m in p.mod for p in predictions.values())]
    for m in modalities:
        lacking = [name for name, p in predictions.items() if m not in p.mod]
        if m not in mdata.mod or lacking:
            where = "the screen" if m not in mdata.mod else f"the predictions {lacking}"
            raise ValueError(f"modality {m!r} is not in {where}; the screen has {list(mdata.mod)}.")
    records: list[dict] = []
    fields = {"seed": seed, "split": split.name}
    for m in modalities:
        counts = modality_cells(mdata, m, perturbation_key, context_key)
        all_log = ad.AnnData(log1p_expression(counts), obs=counts.obs[[perturbation_key]].copy(),
                             var=counts.var.copy())
        part = _restricted(split, counts.obs_names)
        contexts = None if context_key is None else counts.obs[context_key]
        reference, ceiling = split_reference(all_log, part, perturbation_key, control_value, contexts, seed)
        groups = split.labels
        records += with_groups(long_records(ceiling, model=CEILING, modality=m, **fields), groups)
        records += collapse_records(reference.observed_means, reference.control_mean, groups,
                                    model=OBSERVED, modality=m, **fields)
        for name in baselines:
            model = make_model(name, gene_embeddings, seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model.fit(counts[part.train], perturbation_key, control_value=control_value,
                          context_key=context_key, data_scale="counts")
                predicted = model.predict(counts[part.control], split.perturbations,
                                          aggregate=None if distributional else "mean")
            records += score_records(predicted, reference, groups, distributional,
                                     model=name, modality=m, **fields)
        for name, prediction in predictions.items():
            records += score_records(prediction.mod[m], reference, groups, distributional,
                                     model=name, modality=m, **fields)
    return pd.DataFrame.from_records(records)[MODALITY_COLUMNS]

