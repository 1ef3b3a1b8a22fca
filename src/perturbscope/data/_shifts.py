"""The per-context perturbation shift: a perturbation's pseudobulk minus its context's controls.

Baselines, the genetic-interaction fits and the expression embeddings all start from this one
table, computed here once and in one way.
"""

from __future__ import annotations

import anndata as ad
import pandas as pd

from ._checks import check_finite, check_no_missing_labels, preview
from ._perturbations import (
    canonical_labels,
    check_control_present,
    check_delimiter,
    check_one_label_per_perturbation,
)
from ._pseudobulk import pseudobulk

#: The context label of data without a context column.
ALL_CONTEXTS = "all"


def check_obs_keys(obs: pd.DataFrame, **keys: str | None) -> None:
    """Raise a ``KeyError`` for the first ``role=column`` whose column is not in ``obs``.

    Examples
    --------
    >>> import pandas as pd
    >>> check_obs_keys(pd.DataFrame({"p": []}), perturbation_key="p", context_key="line")
    Traceback (most recent call last):
    ...
    KeyError: "context_key 'line' not in adata.obs; columns are ['p']."
    """
    for role, key in keys.items():
        if key is not None and key not in obs.columns:
            raise KeyError(f"{role} {key!r} not in adata.obs; columns are {list(obs.columns)}.")


def context_labels(adata: ad.AnnData, context_key: str | None) -> pd.Series:
    """Each cell's context as a string; :data:`ALL_CONTEXTS` when there is no context column.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> context_labels(ad.AnnData(np.zeros((2, 1))), None).tolist()
    ['all', 'all']
    """
    if context_key is None:
        return pd.Series(ALL_CONTEXTS, index=adata.obs_names)
    return adata.obs[context_key].astype(str)


def perturbation_shifts(
    adata: ad.AnnData,
    perturbation_key: str,
    control_value: str = "control",
    context_key: str | None = None,
    layer: str | None = None,
    delimiter: str = "+",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean shift of every perturbation from the control mean of its context.

    Parameters
    ----------
    adata
        Cells with expression on the scale to average (log1p-normalised for every use in
        perturbscope). Not modified.
    perturbation_key
        ``obs`` column of perturbation labels.
    control_value
        The control label.
    context_key
        ``obs`` column of contexts (cell type, line); ``None`` treats all cells as one context
        named :data:`ALL_CONTEXTS`.
    layer
        Layer to average; ``X`` when ``None``.
    delimiter
        Separator of the genes of a combination, for recognising one perturbation written in
        two ways.

    Returns
    -------
    ``(shifts, control_means)``: ``shifts`` has a ``MultiIndex`` (``perturbation``,
    ``context``) over the measured non-control groups and the genes as columns;
    ``control_means`` has one row per context.

    Raises
    ------
    KeyError
        If a key is not in ``adata.obs`` or ``layer`` not in ``adata.layers``.
    ValueError
        If the control label is absent, some contexts have no control cells (named), the
        matrix holds NaN or infinite values, or one perturbation is written in two ways
        (``"A+B"``/``"B+A"``, ``"control "``/``"control"``; see
        :func:`check_one_label_per_perturbation`). A label that is not genes joined by
        ``delimiter`` (a cytokine ``"IL2+"``) is a name of its own, and is not compared.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> cells = ad.AnnData(np.array([[1.0, 2], [3, 2], [4, 6]]),
    ...                    obs=pd.DataFrame({"p": ["control", "control", "A"]}))
    >>> shifts, control = perturbation_shifts(cells, "p")
    >>> shifts.loc[("A", "all")].tolist(), control.loc["all"].tolist()
    ([2.0, 4.0], [2.0, 2.0])
    """
    check_obs_keys(adata.obs, perturbation_key=perturbation_key, context_key=context_key)
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in adata.layers; layers are {list(adata.layers)}.")
    check_no_missing_labels(adata.obs, perturbation_key=perturbation_key, context_key=context_key)
    labels = adata.obs[perturbation_key].astype(str)
    check_control_present(labels, perturbation_key, control_value)
    check_one_label_per_perturbation(combination_labels(labels, control_value, delimiter), perturbation_key,
                                     control_value, delimiter)
    check_finite(adata.X if layer is None else adata.layers[layer], layer)
    contexts = context_labels(adata, context_key)
    # a light AnnData over the same matrix: no copy of the expression, the input is left alone
    view = ad.AnnData(
        X=adata.X if layer is None else adata.layers[layer],
        obs=pd.DataFrame(
            {"perturbation": labels.to_numpy(), "context": contexts.to_numpy()},
            index=adata.obs_names.astype(str),
        ),
        var=pd.DataFrame(index=adata.var_names.astype(str)),
    )
    means = pseudobulk(view, ["perturbation", "context"])
    return shifts_from_means(means, control_value, context_key)


def combination_labels(labels: pd.Series, control_value: str = "control", delimiter: str = "+") -> list[str]:
    """The distinct labels that read as genes joined by ``delimiter``.

    Others, such as a cytokine ``"IL2+"`` or ``"+/-"`` (an empty name between delimiters), are
    names rather than combinations.

    Examples
    --------
    >>> combination_labels(pd.Series(["control", "A+B", "IL2+", "A"]))
    ['control', 'A+B', 'A']
    """
    check_delimiter(delimiter)  # else every label would fail to parse, and none be compared
    readable = []
    for label in pd.unique(pd.Series(labels, dtype=str)):
        try:
            canonical_labels([label], control_value, delimiter)
        except ValueError:
            continue
        readable.append(label)
    return readable


def shifts_from_means(
    means: pd.DataFrame, control_value: str = "control", context_key: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(shifts, control_means)`` from group means indexed by (``perturbation``, ``context``).

    Parameters
    ----------
    means
        Pseudobulk with a ``MultiIndex`` (``perturbation``, ``context``), controls included.
    control_value
        The control label.
    context_key
        The user's context column, named in the error.

    Raises
    ------
    ValueError
        If some contexts have no control row (named).

    Examples
    --------
    >>> import pandas as pd
    >>> idx = pd.MultiIndex.from_tuples([("A", "x"), ("control", "x")], names=["perturbation", "context"])
    >>> shifts, _ = shifts_from_means(pd.DataFrame({"g": [3.0, 1.0]}, index=idx))
    >>> shifts["g"].tolist()
    [2.0]
    """
    control_value = str(control_value)  # labels are read as strings (an integer control 0 is "0")
    control = means.xs(control_value, level="perturbation")
    lacking = sorted(set(means.index.get_level_values("context")) - set(control.index))
    if lacking:
        raise ValueError(
            f"contexts {preview(lacking)} in adata.obs[{context_key!r}] have no {control_value!r} "
            "cells, so their perturbation shifts cannot be computed."
        )
    perturbed = means.drop(index=control_value, level="perturbation")
    shifts = perturbed - control.loc[perturbed.index.get_level_values("context")].to_numpy()
    return shifts, control
