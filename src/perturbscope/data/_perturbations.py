"""Parsing perturbation labels such as ``"control"``, ``"KLF1"`` or ``"SET+KLF1"`` into gene sets."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


def check_delimiter(delimiter: object) -> None:
    """Raise a ``ValueError`` unless ``delimiter`` is a non-empty string.

    Examples
    --------
    >>> check_delimiter("")
    Traceback (most recent call last):
    ...
    ValueError: delimiter must be a non-empty string such as '+', got ''.
    """
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"delimiter must be a non-empty string such as '+', got {delimiter!r}.")


def parse_perturbation(label: str, control_value: str = "control", delimiter: str = "+") -> tuple[str, ...]:
    """Split one perturbation label into the tuple of perturbed genes.

    Parameters
    ----------
    label
        A perturbation label, e.g. ``"KLF1"`` or ``"SET+KLF1"``.
    control_value
        The label of control cells; it parses to the empty tuple. Tokens equal to it inside a
        combination (``"KLF1+control"``, as some screens write singles) are dropped.
    delimiter
        The separator between genes in a combination.

    Returns
    -------
    The perturbed genes in the order they appear, without duplicates.

    Raises
    ------
    ValueError
        If the label has an empty token (``"A++B"``, ``"+A"``), or ``delimiter`` is not a
        non-empty string.

    Examples
    --------
    >>> parse_perturbation("SET+KLF1")
    ('SET', 'KLF1')
    >>> parse_perturbation("control")
    ()
    """
    check_delimiter(delimiter)
    label, control_value = str(label), str(control_value)  # labels are read as strings everywhere
    if label == control_value:
        return ()
    tokens = [token.strip() for token in label.split(delimiter)]
    if any(token == "" for token in tokens):
        raise ValueError(
            f"Perturbation label {label!r} has an empty gene name between {delimiter!r} delimiters."
        )
    genes = [token for token in tokens if token != control_value]
    return tuple(dict.fromkeys(genes))


def canonical_labels(labels: Iterable[str], control_value: str = "control", delimiter: str = "+") -> np.ndarray:
    """Each label as the package keys it: its genes sorted and joined by ``delimiter``, control tokens dropped.

    Screens that write singles as ``"KLF1+control"`` then share their labels with those that
    write ``"KLF1"``, and a combination is the same group in either gene order (``"SET+KLF1"``
    and ``"KLF1+SET"`` are both ``"KLF1+SET"``): the order of the guides in a label carries no
    meaning for the package. Outputs keep the labels the user gave.

    Examples
    --------
    >>> canonical_labels(["KLF1+control", "control", "SET+KLF1", " KLF1 ", "KLF1+SET"]).tolist()
    ['KLF1', 'control', 'KLF1+SET', 'KLF1', 'KLF1+SET']

    Raises
    ------
    ValueError
        If a label has an empty gene name (``"A++B"``), as :func:`parse_perturbation` does.
    """
    # parse each distinct label once: a screen has millions of cells but few labels
    if isinstance(labels, pd.Series) and isinstance(labels.dtype, pd.CategoricalDtype) and (labels.cat.codes >= 0).all():
        codes, distinct = labels.cat.codes.to_numpy(), labels.cat.categories.astype(str)
    else:
        values = labels if isinstance(labels, pd.Series | np.ndarray) else list(labels)
        codes, distinct = pd.factorize(np.asarray(values, dtype=str))
    genes = [parse_perturbation(label, control_value, delimiter) for label in distinct]
    mapped = np.array([delimiter.join(sorted(parsed)) or control_value for parsed in genes], dtype=str)
    return mapped[codes] if len(codes) else np.array([], dtype=str)


def repeated_spellings(labels: Iterable[str], control_value: str = "control", delimiter: str = "+") -> list[list[str]]:
    """Groups of distinct labels that write one perturbation (:func:`canonical_labels`), each sorted.

    Examples
    --------
    >>> repeated_spellings(["B+A", "A", "A+B", "C", "A+control"])
    [['A+B', 'B+A'], ['A', 'A+control']]
    """
    distinct = pd.unique(pd.Series(list(labels), dtype=str))
    canonical = pd.Series(canonical_labels(distinct, control_value, delimiter), index=distinct)
    spellings = canonical.groupby(canonical.to_numpy(), sort=False).apply(lambda group: sorted(group.index))
    return [names for names in spellings if len(names) > 1]


def check_one_label_per_perturbation(labels: Iterable[str], key: str, control_value: str = "control",
                                     delimiter: str = "+", where: str = "adata") -> None:
    """Refuse labels that write one perturbation in two ways (``"A+B"``/``"B+A"``, ``"A"``/``"A+control"``).

    A split that holds out one spelling while the other stays in training would leak the
    perturbation into training, and an analysis that keys groups by their genes would keep one
    spelling's cells and drop the other's; rewrite the column with :func:`canonical_labels` first.

    ``where`` names the object in the message (``"adata"``, ``"mdata"``).

    Raises
    ------
    ValueError
        Naming ``key`` and the first such groups of labels, with the rewrite that fixes them.

    Examples
    --------
    >>> check_one_label_per_perturbation(["control", "A+B", "A"], "perturbation")
    >>> check_one_label_per_perturbation(["A+B", "B+A"], "perturbation")
    Traceback (most recent call last):
    ...
    ValueError: adata.obs['perturbation'] writes the same perturbation in more than one way: ['A+B', 'B+A']; one perturbation must have one label, e.g. adata.obs['perturbation'] = perturbscope.data.canonical_labels(adata.obs['perturbation']).
    >>> check_one_label_per_perturbation(["KLF1", "KLF1_ctrl"], "guide", "ctrl", "_", where="mdata")
    Traceback (most recent call last):
    ...
    ValueError: mdata.obs['guide'] writes the same perturbation in more than one way: ['KLF1', 'KLF1_ctrl']; one perturbation must have one label, e.g. mdata.obs['guide'] = perturbscope.data.canonical_labels(mdata.obs['guide'], control_value='ctrl', delimiter='_').
    """
    repeated = repeated_spellings(labels, control_value, delimiter)
    if repeated:
        shown = "; ".join(str(names) for names in repeated[:3])
        more = f" (and {len(repeated) - 3} more)" if len(repeated) > 3 else ""
        options = "".join([f", control_value={control_value!r}" if control_value != "control" else "",
                           f", delimiter={delimiter!r}" if delimiter != "+" else ""])
        column = f"{where}.obs[{key!r}]"
        raise ValueError(
            f"{column} writes the same perturbation in more than one way: {shown}{more}; one perturbation must "
            f"have one label, e.g. {column} = perturbscope.data.canonical_labels({column}{options})."
        )


def canonical_means(
    means: pd.DataFrame, counts: pd.Series | None = None, control_value: str = "control", delimiter: str = "+"
) -> tuple[pd.DataFrame, pd.Series | None]:
    """Group means (``MultiIndex`` perturbation, context) keyed by :func:`canonical_labels`.

    Tables saved before labels were made canonical may key a group ``"KLF1+control"``; rows
    whose labels become the same group are merged, weighted by ``counts`` (equally without).
    Already canonical tables are returned as they are.

    Raises
    ------
    ValueError
        If the index lacks the ``perturbation`` or ``context`` level, or a label has an empty
        gene name.

    Examples
    --------
    >>> index = pd.MultiIndex.from_tuples([("control", "all"), ("A+control", "all"), ("A", "all")],
    ...                                   names=["perturbation", "context"])
    >>> means, counts = canonical_means(pd.DataFrame({"g": [0.0, 1.0, 4.0]}, index=index),
    ...                                 pd.Series([5, 3, 1], index=index))
    >>> means["g"].tolist(), counts.tolist()
    ([0.0, 1.75], [5, 4])
    """
    lacking = [level for level in ("perturbation", "context") if level not in (means.index.names or [])]
    if lacking:
        raise ValueError(f"means must have a MultiIndex with levels 'perturbation' and 'context'; "
                         f"{lacking} missing from its index names {list(means.index.names)}.")
    labels = means.index.get_level_values("perturbation").astype(str)
    canonical = canonical_labels(labels, control_value, delimiter)
    if (canonical == np.asarray(labels)).all():
        return means, counts
    contexts = means.index.get_level_values("context")
    keys = pd.MultiIndex.from_arrays([canonical, contexts], names=["perturbation", "context"])
    weights = pd.Series(1.0 if counts is None else counts.reindex(means.index).to_numpy(dtype=float), index=keys)
    summed = means.set_axis(keys).mul(weights, axis=0).groupby(level=[0, 1], sort=False).sum()
    total = weights.groupby(level=[0, 1], sort=False).sum()
    merged = summed.div(total, axis=0)
    merged.columns = means.columns
    return merged, (None if counts is None else total.round().astype(counts.dtype))


def perturbation_gene_sets(
    labels: Iterable[str], control_value: str = "control", delimiter: str = "+"
) -> dict[str, tuple[str, ...]]:
    """Parse every distinct perturbation label once.

    Parameters
    ----------
    labels
        Perturbation labels, typically ``adata.obs[perturbation_key]``.
    control_value
        The control label.
    delimiter
        The separator between genes in a combination.

    Returns
    -------
    ``{label: genes}`` for each distinct label, in order of first appearance.

    Examples
    --------
    >>> perturbation_gene_sets(["control", "A", "A+B", "A"])
    {'control': (), 'A': ('A',), 'A+B': ('A', 'B')}
    """
    distinct = pd.unique(pd.Series(list(labels), dtype=str))
    return {label: parse_perturbation(label, control_value, delimiter) for label in distinct}


def check_control_present(labels: pd.Series, key: str, control_value: str) -> None:
    """Raise a ``ValueError`` naming ``key`` if no label equals ``control_value``.

    Parameters
    ----------
    labels
        The perturbation column.
    key
        Its name in ``adata.obs``, used in the message.
    control_value
        The expected control label.

    Raises
    ------
    ValueError
        If ``control_value`` is absent; the message lists up to 10 of the values found.

    Examples
    --------
    >>> import pandas as pd
    >>> check_control_present(pd.Series(["control", "A"]), "perturbation", "control")
    """
    values = pd.unique(labels.astype(str))
    if str(control_value) not in set(values):  # labels are compared as strings, as is_control does
        shown = ", ".join(repr(v) for v in values[:10])
        more = f" (and {len(values) - 10} more)" if len(values) > 10 else ""
        raise ValueError(
            f"control_value {control_value!r} not found in adata.obs[{key!r}]. "
            f"Values found: {shown}{more}."
        )


def is_control(labels: pd.Series | np.ndarray, control_value: str) -> np.ndarray:
    """Boolean mask of control cells from their perturbation labels.

    The one test of "is this a control cell" on labels; the registered form
    (:func:`perturbscope.data.control_mask`) tests the padded gene indices instead.

    Parameters
    ----------
    labels
        Perturbation labels (any dtype; compared as strings).
    control_value
        The control label.

    Returns
    -------
    A ``bool`` array, ``True`` for control cells.

    Examples
    --------
    >>> import pandas as pd
    >>> is_control(pd.Series(["control", "A", "control"]), "control").tolist()
    [True, False, True]
    """
    return (pd.Series(np.asarray(labels)).astype(str) == str(control_value)).to_numpy()
