"""Seeded train/test splits that cannot leak the held-out perturbations.

A :class:`Split` is three arrays of ``obs_names`` and a label per held-out perturbation:

* ``train``: the cells a model may fit on;
* ``control``: the control cells a prediction starts from (always a subset of ``train``);
* ``test``: the held-out perturbed cells that predictions are scored against.

``unseen_single_split`` holds out whole single-gene perturbations (and every combination that
contains a held-out gene), ``combo_split`` holds out two-gene combinations and labels them as
GEARS does by how many of their genes were seen as singles (``seen0``, ``seen1``, ``seen2``),
and ``unseen_context_split`` holds out one cell type or line: zero-shot, only its control cells
are seen; few-shot, ``k`` cells of each held-out perturbation are seen as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from ..data import (
    check_control_present,
    check_no_missing_labels,
    check_one_label_per_perturbation,
    check_unique_names,
    is_control,
    parse_perturbation,
)


@dataclass(frozen=True)
class Split:
    """One train/test split of a screen, given as ``obs_names``.

    Parameters
    ----------
    name
        A short description, e.g. ``"unseen_single fold 0/3"``.
    train
        ``obs_names`` of the cells a model may be fitted on.
    control
        ``obs_names`` of the control cells that predictions start from; a subset of ``train``.
    test
        ``obs_names`` of the held-out perturbed cells.
    labels
        The held-out perturbations (index) and their group, e.g. ``"unseen_single"``,
        ``"seen2"`` or ``"zero-shot"``.
    context
        The held-out context for :func:`unseen_context_split`, else ``None``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> s = Split("toy", np.array(["c1", "a1"]), np.array(["c1"]), np.array(["b1"]),
    ...           pd.Series({"B": "unseen_single"}))
    >>> s.perturbations
    ['B']
    """

    name: str
    train: np.ndarray
    control: np.ndarray
    test: np.ndarray
    labels: pd.Series = field(repr=False)
    context: str | None = None

    @property
    def perturbations(self) -> list[str]:
        """The held-out perturbations, in label order."""
        return [str(p) for p in self.labels.index]


def _labels(adata: ad.AnnData, perturbation_key: str, control_value: str, delimiter: str = "+") -> pd.Series:
    if perturbation_key not in adata.obs.columns:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} not in adata.obs; "
            f"columns are {list(adata.obs.columns)}."
        )
    check_unique_names(adata, axes=("obs_names",))  # a split is a set of obs_names: duplicates could not say which
    check_no_missing_labels(adata.obs, perturbation_key=perturbation_key)
    labels = adata.obs[perturbation_key].astype(str)
    check_control_present(labels, perturbation_key, control_value)
    check_one_label_per_perturbation(labels, perturbation_key, control_value, delimiter)
    return labels


def _gene_sets(labels: pd.Series, control_value: str, delimiter: str) -> dict[str, tuple[str, ...]]:
    return {p: parse_perturbation(p, control_value, delimiter) for p in pd.unique(labels)}


def unseen_single_split(
    adata: ad.AnnData,
    perturbation_key: str,
    control_value: str = "control",
    n_folds: int = 3,
    fold: int = 0,
    seed: int = 0,
    delimiter: str = "+",
) -> Split:
    """Hold out a fold of single-gene perturbations.

    The singles are shuffled with ``seed`` and dealt into ``n_folds`` folds; fold ``fold`` is
    held out. Combinations that contain a held-out gene are left out of training (and of the
    test set), so no training cell saw a held-out gene perturbed.

    Parameters
    ----------
    adata
        The screen.
    perturbation_key
        ``obs`` column of perturbation labels.
    control_value
        The control label.
    n_folds
        Number of folds; ``n_folds`` equal to the number of singles gives leave-one-out.
    fold
        Which fold to hold out, ``0 <= fold < n_folds``.
    seed
        Seed of the shuffle.
    delimiter
        Separator of genes in combination labels.

    Returns
    -------
    A :class:`Split` whose labels are all ``"unseen_single"``.

    Raises
    ------
    ValueError
        If ``fold`` is out of range or there are fewer singles than folds.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=2,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> split = unseen_single_split(adata, "perturbation", n_folds=3, fold=0)
    >>> len(split.perturbations)
    2
    """
    labels = _labels(adata, perturbation_key, control_value, delimiter)
    genes = _gene_sets(labels, control_value, delimiter)
    singles = sorted(p for p, g in genes.items() if len(g) == 1)
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold={fold} is out of range for n_folds={n_folds}.")
    if len(singles) < n_folds:
        raise ValueError(
            f"n_folds={n_folds} exceeds the {len(singles)} single-gene perturbations in "
            f"adata.obs[{perturbation_key!r}]."
        )
    order = np.random.default_rng(seed).permutation(len(singles))
    held_out = sorted(singles[i] for i in np.array_split(order, n_folds)[fold])
    held_genes = {genes[p][0] for p in held_out}
    touches = labels.map(lambda p: bool(set(genes[p]) & held_genes)).to_numpy()
    is_test = labels.isin(held_out).to_numpy()
    return Split(
        name=f"unseen_single fold {fold}/{n_folds} seed {seed}",
        train=adata.obs_names[~touches].to_numpy(),
        control=adata.obs_names[is_control(labels, control_value)].to_numpy(),
        test=adata.obs_names[is_test].to_numpy(),
        labels=pd.Series("unseen_single", index=pd.Index(held_out, name="perturbation")),
    )


def combo_split(
    adata: ad.AnnData,
    perturbation_key: str,
    control_value: str = "control",
    test_fraction: float = 1.0,
    seed: int = 0,
    delimiter: str = "+",
) -> Split:
    """Hold out two-gene combinations, labelled by how many of their genes were seen as singles.

    Parameters
    ----------
    adata
        The screen.
    perturbation_key
        ``obs`` column of perturbation labels.
    control_value
        The control label.
    test_fraction
        Fraction of the combinations held out (chosen with ``seed``); ``1.0`` holds out all of
        them and trains on control cells and singles only.
    seed
        Seed of the choice.
    delimiter
        Separator of genes in combination labels.

    Returns
    -------
    A :class:`Split` whose labels are ``"seen0"``, ``"seen1"`` or ``"seen2"``: the number of the
    combination's genes that are perturbed alone in the training cells.

    Raises
    ------
    ValueError
        If there are no combinations or ``test_fraction`` is not in ``(0, 1]``.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=2,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> combo_split(adata, "perturbation").labels.tolist()
    ['seen2', 'seen2']
    """
    if not 0 < test_fraction <= 1:
        raise ValueError(f"test_fraction must be in (0, 1], got {test_fraction}.")
    labels = _labels(adata, perturbation_key, control_value, delimiter)
    genes = _gene_sets(labels, control_value, delimiter)
    combos = sorted(p for p, g in genes.items() if len(g) >= 2)
    if not combos:
        raise ValueError(
            f"adata.obs[{perturbation_key!r}] has no combinations (labels with {delimiter!r})."
        )
    n_test = max(1, round(test_fraction * len(combos)))
    rng = np.random.default_rng(seed)
    held_out = sorted(combos[i] for i in rng.choice(len(combos), n_test, replace=False))
    is_test = labels.isin(held_out).to_numpy()
    train_labels = set(labels[~is_test])
    seen_singles = {genes[p][0] for p in train_labels if len(genes[p]) == 1}
    groups = {p: f"seen{sum(g in seen_singles for g in genes[p])}" for p in held_out}
    return Split(
        name=f"combo seed {seed}",
        train=adata.obs_names[~is_test].to_numpy(),
        control=adata.obs_names[is_control(labels, control_value)].to_numpy(),
        test=adata.obs_names[is_test].to_numpy(),
        labels=pd.Series(groups, name="group").rename_axis("perturbation"),
    )


def unseen_context_split(
    adata: ad.AnnData,
    perturbation_key: str,
    context_key: str,
    context: str,
    control_value: str = "control",
    k: int = 0,
    seed: int = 0,
    perturbations: Sequence[str] | None = None,
    delimiter: str = "+",
) -> Split:
    """Hold out the perturbed cells of one context (cell type or line).

    Zero-shot (``k=0``): of the held-out context only its control cells are in training.
    Few-shot (``k>0``): ``k`` randomly chosen cells of each held-out perturbation are in training
    too, and the rest are tested.

    Parameters
    ----------
    adata
        The screen.
    perturbation_key
        ``obs`` column of perturbation labels.
    context_key
        ``obs`` column of contexts.
    context
        The context to hold out.
    control_value
        The control label.
    k
        Cells of each held-out perturbation seen in training.
    seed
        Seed of the choice of the ``k`` cells.
    perturbations
        The perturbations to hold out; all non-control perturbations of ``context`` by default.
    delimiter
        Separator of genes in combination labels.

    Returns
    -------
    A :class:`Split` labelled ``"zero-shot"`` or ``"{k}-shot"`` with ``context`` set.

    Raises
    ------
    KeyError
        If ``context_key`` is not a column.
    ValueError
        If ``context`` is absent, has no control cells or no perturbed cells, ``perturbations``
        is empty, a held-out perturbation has ``k`` or fewer cells there (no test cells would be
        left), or the labels write one perturbation in two ways.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                n_cells_per_condition=5)
    >>> split = unseen_context_split(adata, "perturbation", "cell_type", "type_1", k=2)
    >>> split.labels.iloc[0], len(split.test)
    ('2-shot', 15)
    """
    labels = _labels(adata, perturbation_key, control_value, delimiter)
    if context_key not in adata.obs.columns:
        raise KeyError(
            f"context_key {context_key!r} not in adata.obs; columns are {list(adata.obs.columns)}."
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}.")
    check_no_missing_labels(adata.obs, context_key=context_key)
    contexts = adata.obs[context_key].astype(str)
    in_context = (contexts == str(context)).to_numpy()
    if not in_context.any():
        raise ValueError(
            f"context {context!r} not found in adata.obs[{context_key!r}]; "
            f"values are {sorted(pd.unique(contexts))}."
        )
    control_cells = is_control(labels, control_value)
    if not (in_context & control_cells).any():
        raise ValueError(f"context {context!r} has no {control_value!r} cells to predict from.")
    available = labels[in_context & ~control_cells]
    if available.empty:
        raise ValueError(f"context {context!r} has no perturbed cells to hold out, only {control_value!r} cells.")
    held_out = sorted(pd.unique(available)) if perturbations is None else [str(p) for p in perturbations]
    if not held_out:
        raise ValueError("perturbations is empty; pass None to hold out every perturbation of the context.")
    counts = available.value_counts()
    missing = [p for p in held_out if p not in counts.index]
    if missing:
        raise ValueError(f"perturbations {missing} have no cells in context {context!r}.")
    too_few = {p: int(counts[p]) for p in held_out if counts[p] <= k}
    if too_few:
        raise ValueError(
            f"k={k} shot cells leave no test cells for perturbations with {too_few} cells in "
            f"context {context!r}; use k below {min(too_few.values())}."
        )
    rng = np.random.default_rng(seed)
    held = in_context & labels.isin(held_out).to_numpy()
    shots = np.zeros(adata.n_obs, dtype=bool)
    if k:
        for p in held_out:
            where = np.flatnonzero(in_context & (labels == p).to_numpy())
            shots[rng.choice(where, k, replace=False)] = True
    group = "zero-shot" if k == 0 else f"{k}-shot"
    return Split(
        name=f"unseen_context {context} {group} seed {seed}",
        train=adata.obs_names[~held | shots].to_numpy(),
        control=adata.obs_names[in_context & control_cells].to_numpy(),
        test=adata.obs_names[held & ~shots].to_numpy(),
        labels=pd.Series(group, index=pd.Index(held_out, name="perturbation")),
        context=str(context),
    )
