"""Setup-time and entry checks shared by the model, the baselines and the analyses.

Each check has one implementation and one wording, so the same mistake gets the same message
wherever it is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from ._perturbations import is_control, repeated_spellings
from ._rows import is_out_of_core, iter_row_chunks


def preview(values, limit: int = 10) -> str:
    """``['a', 'b', ...] (and 12 more)``: a bounded listing for error messages."""
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:limit])
    more = f" (and {len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}]{more}"


def check_perturbation_labels(perturbations, control_value: str | None = None, delimiter: str = "+") -> list[str]:
    """The labels to predict, as strings: a non-empty list, each label once.

    With ``control_value``, also each perturbation once: ``"A+B"`` and ``"B+A"`` (or ``"A"``
    and ``"A+control"``) are one perturbation (:func:`canonical_labels`), which would be
    predicted twice under two names.

    Raises
    ------
    TypeError
        If ``perturbations`` is one string (a list of its characters was surely not meant).
    ValueError
        If it is empty or holds a label twice (predictions are keyed by label and context).

    Examples
    --------
    >>> check_perturbation_labels(("G00", "G01+G02"))
    ['G00', 'G01+G02']
    >>> check_perturbation_labels(["G00", "G01", "G00"])
    Traceback (most recent call last):
    ...
    ValueError: perturbations holds labels more than once: ['G00']; give each label once.
    >>> check_perturbation_labels(["G01+G02", "G02+G01"], control_value="control")
    Traceback (most recent call last):
    ...
    ValueError: perturbations writes one perturbation in more than one way: [['G01+G02', 'G02+G01']]; give each perturbation once.
    """
    if isinstance(perturbations, str):
        raise TypeError(
            f"perturbations must be a list of labels, got the string {perturbations!r}; pass [{perturbations!r}]."
        )
    labels = [str(p) for p in perturbations]
    if not labels:
        raise ValueError("perturbations is empty; pass at least one perturbation label.")
    index = pd.Index(labels)
    repeated = index[index.duplicated()].unique()
    if len(repeated):
        raise ValueError(f"perturbations holds labels more than once: {preview(repeated)}; give each label once.")
    if control_value is not None:
        twice = repeated_spellings(labels, control_value, delimiter)
        if twice:
            more = f" (and {len(twice) - 3} more)" if len(twice) > 3 else ""
            raise ValueError(f"perturbations writes one perturbation in more than one way: {twice[:3]}{more}; "
                             "give each perturbation once.")
    return labels


def check_gene_embeddings(df: pd.DataFrame, name: str = "gene embeddings") -> pd.DataFrame:
    """Check that a table is a valid gene embedding and return it as float64.

    Parameters
    ----------
    df
        Genes x dimensions.
    name
        What the table is, used in error messages (for example a file path).

    Returns
    -------
    The same table with float64 values, a string index and string column names; ``.attrs`` are
    kept.

    Raises
    ------
    TypeError
        If ``df`` is not a DataFrame or a column is not numeric (the columns are named).
    ValueError
        If the table is empty, a gene appears more than once, or a value is NaN or infinite
        (the genes are named).

    Examples
    --------
    >>> import pandas as pd
    >>> check_gene_embeddings(pd.DataFrame({"d0": [1, 2]}, index=["A", "B"])).dtypes.tolist()
    [dtype('float64')]
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(
            f"{name} must be a pandas DataFrame (genes x dims), got {type(df).__name__}."
        )
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(
            f"{name} is empty: shape {df.shape}; expected at least one gene and one dimension."
        )
    non_numeric = [
        c
        for c in df.columns
        if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
    ]
    if non_numeric:
        raise TypeError(
            f"{name} has non-numeric columns {preview(non_numeric)}; expected one float column per "
            "dimension with the genes in the index."
        )
    index = df.index.astype(str)
    duplicated = index[index.duplicated()].unique()
    if len(duplicated):
        raise ValueError(
            f"{name} has duplicated genes {preview(duplicated)}; each gene must appear once."
        )
    values = df.to_numpy(dtype=np.float64)
    bad_rows = ~np.isfinite(values).all(axis=1)
    if bad_rows.any():
        raise ValueError(
            f"{name} has NaN or infinite values for genes {preview(index[bad_rows])}; "
            "every value must be finite."
        )
    out = pd.DataFrame(
        values, index=pd.Index(index, name=df.index.name), columns=df.columns.astype(str)
    )
    out.attrs = dict(df.attrs)
    return out


def describe_layer(layer: str | None) -> str:
    """How a layer is named in messages: ``adata.X`` or ``adata.layers['counts']``.

    Examples
    --------
    >>> describe_layer("counts")
    "adata.layers['counts']"
    """
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_count_data(matrix, layer: str | None) -> None:
    """Raise a ``ValueError`` naming the layer if it is not non-negative, finite integers.

    Parameters
    ----------
    matrix
        Dense or sparse expression; an out-of-core matrix (backed or SOMA) is checked chunk by
        chunk, never loaded whole.
    layer
        Where it came from (``None`` for ``X``), for the message.

    Raises
    ------
    ValueError
        For NaN/inf, negative or non-integer values.

    Examples
    --------
    >>> import numpy as np
    >>> check_count_data(np.array([[0.5]]), "counts")
    Traceback (most recent call last):
    ...
    ValueError: adata.layers['counts'] has non-integer values; count likelihoods ('nb', 'zinb', 'poisson') need raw counts. Use a counts layer, or gene_likelihood='normal' for log-normalised input.
    """
    if is_out_of_core(matrix):
        for _, rows in iter_row_chunks(matrix):
            check_count_data(rows, layer)
        return
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    where = describe_layer(layer)
    if not np.isfinite(values).all():
        raise ValueError(f"{where} has NaN or inf values; count likelihoods need finite counts.")
    if (values < 0).any():
        raise ValueError(f"{where} has negative values; count likelihoods need non-negative counts.")
    if not np.array_equal(values, np.round(values)):
        raise ValueError(
            f"{where} has non-integer values; count likelihoods ('nb', 'zinb', 'poisson') need raw "
            "counts. Use a counts layer, or gene_likelihood='normal' for log-normalised input."
        )


def check_non_negative(matrix, layer: str | None, needed_by: str) -> None:
    """Raise a ``ValueError`` naming the layer if it has negative values (``needed_by`` says why not).

    Examples
    --------
    >>> import numpy as np
    >>> check_non_negative(np.array([[1.0, -3.0]]), None, "data_scale='counts' normalises counts per cell")
    Traceback (most recent call last):
    ...
    ValueError: adata.X has negative values, but data_scale='counts' normalises counts per cell; pass counts, or data_scale='log1p_norm' for log-normalised input.
    """
    if is_out_of_core(matrix):
        for _, rows in iter_row_chunks(matrix):
            check_non_negative(rows, layer, needed_by)
        return
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    if values.size and float(np.min(values)) < 0:
        raise ValueError(f"{describe_layer(layer)} has negative values, but {needed_by}; pass counts, or "
                         "data_scale='log1p_norm' for log-normalised input.")


def check_controls_per_context(
    obs: pd.DataFrame, perturbation_key: str, control_value: str, group_keys: Sequence[str]
) -> None:
    """Raise a ``ValueError`` naming every context (and batch) that has no control cells.

    Parameters
    ----------
    obs
        Cell annotations.
    perturbation_key
        Column of perturbation labels.
    control_value
        The control label.
    group_keys
        Columns whose every combination needs control cells (context, batch).

    Raises
    ------
    ValueError
        Naming the groups without controls.

    Examples
    --------
    >>> import pandas as pd
    >>> obs = pd.DataFrame({"p": ["control", "A", "A"], "ct": ["x", "x", "y"]})
    >>> check_controls_per_context(obs, "p", "control", ["ct"])
    Traceback (most recent call last):
    ...
    ValueError: No control cells (p == 'control') in context 'y' of ['ct']; every context needs control cells to anchor predictions.
    """
    if not group_keys:
        return
    control = pd.Series(is_control(obs[perturbation_key], control_value), index=obs.index)
    groups = obs[list(group_keys)].astype(str)
    has_control = control.groupby([groups[k] for k in group_keys], observed=True).any()
    lacking = has_control.index[~has_control.to_numpy()].tolist()
    if lacking:
        names = ", ".join(repr(g) for g in lacking)
        raise ValueError(
            f"No control cells ({perturbation_key} == {control_value!r}) in context {names} of "
            f"{list(group_keys)}; every context needs control cells to anchor predictions."
        )


def check_var_names(var_names: pd.Index, expected: pd.Index, where: str = "adata", features: str = "genes") -> None:
    """Raise a ``ValueError`` unless ``var_names`` are ``expected``, in the same order.

    Parameters
    ----------
    var_names
        The genes given.
    expected
        The genes the model (or baseline) was trained on.
    where
        The name of the AnnData in the message.
    features
        What the names are, in the message: ``"genes"`` (the model's ``var_names``) or, for
        another modality, e.g. ``"proteins"``.

    Raises
    ------
    ValueError
        With the counts of missing and extra genes, and how to subset.

    Examples
    --------
    >>> import pandas as pd
    >>> check_var_names(pd.Index(["b", "a"]), pd.Index(["a", "b"]))
    Traceback (most recent call last):
    ...
    ValueError: adata.var_names differ from the model's 2 genes (0 missing, 0 extra: same genes in another order); subset and order it as adata[:, model.var_names].
    """
    expected = pd.Index(expected).astype(str)
    given = pd.Index(var_names).astype(str)
    if given.equals(expected):
        return
    missing = expected.difference(given)
    extra = given.difference(expected)
    how = f": same {features} in another order" if not len(missing) and not len(extra) else ""
    first = f"; first missing: {list(missing[:5])}" if len(missing) else ""
    like = f"{where}[:, model.var_names]" if features == "genes" else f"the model's {features} were in training"
    raise ValueError(
        f"{where}.var_names differ from the model's {len(expected)} {features} ({len(missing)} missing, "
        f"{len(extra)} extra{how}{first}); subset and order it as {like}."
    )


def check_unique_names(adata, where: str = "adata", axes: tuple[str, ...] = ("var_names", "obs_names")) -> None:
    """Raise a ``ValueError`` naming duplicated ``var_names`` or ``obs_names`` (those of ``axes``).

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     a = ad.AnnData(np.zeros((1, 2)), var=pd.DataFrame(index=["g", "g"]))
    >>> check_unique_names(a)
    Traceback (most recent call last):
    ...
    ValueError: adata.var_names has duplicates ['g']; make them unique, e.g. with adata.var_names_make_unique().
    """
    for attr, fix in (("var_names", "var_names_make_unique"), ("obs_names", "obs_names_make_unique")):
        if attr not in axes:
            continue
        names = pd.Index(getattr(adata, attr))
        duplicated = names[names.duplicated()].unique()
        if len(duplicated):
            raise ValueError(
                f"{where}.{attr} has duplicates {preview(duplicated)}; make them unique, e.g. with "
                f"{where}.{fix}()."
            )


def check_backing(adata, where: str = "adata") -> None:
    """Raise a ``ValueError`` unless ``adata.X`` can be read, in memory or streamed by rows.

    In memory, or out of core with rows that can be read in contiguous chunks (an AnnData opened
    with ``backed="r"`` whose ``X`` is CSR or dense, or :func:`perturbscope.data.read_soma`):
    accepted. An out-of-core CSC matrix cannot be read by rows without reading all of it, so it
    is rejected with the conversion to make.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> check_backing(ad.AnnData(np.zeros((1, 1))))
    """
    matrix = getattr(adata, "X", None)
    if isinstance(matrix, ad.abc.CSCDataset):
        raise ValueError(
            f"{where}.X is a CSC matrix on disk (backed), which cannot be streamed by rows; rewrite it "
            f"as CSR once, e.g. a = anndata.read_h5ad(path); a.X = a.X.tocsr(); a.write_h5ad(new_path), "
            f"then open new_path with backed='r' (or load {where}.to_memory() before setup)."
        )


def check_labels(obs: pd.DataFrame, perturbation_key: str, control_value, **keys: str | None) -> None:
    """Setup checks of the label columns: a string control, no missing labels, some perturbations.

    Parameters
    ----------
    obs
        Cell annotations.
    perturbation_key
        Column of perturbation labels.
    control_value
        The control label; must be a string.
    **keys
        Further label columns by role (``context_key="cell_type"``); ``None`` entries are skipped.

    Raises
    ------
    TypeError
        If ``control_value`` is not a string.
    ValueError
        If there are no cells, a label column has missing values, or every cell is a control.

    Examples
    --------
    >>> import pandas as pd
    >>> check_labels(pd.DataFrame({"p": ["control", None]}), "p", "control")
    Traceback (most recent call last):
    ...
    ValueError: adata.obs['p'] (perturbation_key) has 1 missing labels (first cells: ['1']); label every cell.
    """
    if not isinstance(control_value, str):
        raise TypeError(
            f"control_value must be a string label, got {type(control_value).__name__} {control_value!r}; "
            f"convert the column first: adata.obs[{perturbation_key!r}] = "
            f"adata.obs[{perturbation_key!r}].astype(str), and pass control_value={str(control_value)!r}."
        )
    if len(obs) == 0:
        raise ValueError("adata has no cells.")
    check_no_missing_labels(obs, perturbation_key=perturbation_key, **keys)
    if is_control(obs[perturbation_key], control_value).all():
        raise ValueError(
            f"adata.obs[{perturbation_key!r}] holds only control cells ({control_value!r}); ScopeVI "
            "needs perturbed cells to learn from (use ScopeVI.load_query_data for a controls-only query)."
        )


def check_no_missing_labels(obs: pd.DataFrame, **keys: str | None) -> None:
    """Raise a ``ValueError`` naming the column (and its role) that has missing labels.

    ``astype(str)`` would otherwise make them a group ``"nan"``.

    Parameters
    ----------
    obs
        Cell annotations.
    **keys
        Label columns by role (``perturbation_key="perturbation"``); ``None`` entries and
        absent columns are skipped.

    Raises
    ------
    ValueError
        Naming the first column with missing values, its role and up to 5 of its cells.

    Examples
    --------
    >>> import pandas as pd
    >>> check_no_missing_labels(pd.DataFrame({"c": ["x", None]}), context_key="c")
    Traceback (most recent call last):
    ...
    ValueError: adata.obs['c'] (context_key) has 1 missing labels (first cells: ['1']); label every cell.
    """
    for role, key in keys.items():
        if key is None or key not in obs.columns:
            continue
        missing = obs[key].isna().to_numpy()
        if missing.any():
            raise ValueError(
                f"adata.obs[{key!r}] ({role}) has {int(missing.sum())} missing labels (first cells: "
                f"{[str(c) for c in obs.index[missing][:5]]}); label every cell."
            )


def check_cells_have_counts(matrix, obs_names: pd.Index, layer: str | None, counts_too: bool = False) -> None:
    """Raise a ``ValueError`` naming the cells whose counts sum to zero (they cannot be normalised).

    With ``counts_too``, also :func:`check_count_data`, in the same pass over the rows (one read
    of a backed matrix instead of two).

    Parameters
    ----------
    matrix
        Cells x genes counts, in memory or out of core (read row chunk by row chunk).
    obs_names
        The cells' names, for the message.
    layer
        The layer the matrix came from (``None``: ``X``), for the message.

    Raises
    ------
    ValueError
        Naming up to 10 cells whose counts sum to zero.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> check_cells_have_counts(np.array([[1.0, 0.0], [0.0, 0.0]]), pd.Index(["a", "b"]), None)
    Traceback (most recent call last):
    ...
    ValueError: adata.X has 1 cells without counts (['b']); every cell needs at least one count (filter them, e.g. sc.pp.filter_cells(adata, min_counts=1)).
    """
    chunks = iter_row_chunks(matrix) if is_out_of_core(matrix) else [(0, matrix)]
    found = []
    for start, rows in chunks:
        if counts_too:
            check_count_data(rows, layer)
        found.append(start + np.flatnonzero(np.asarray(rows.sum(axis=1)).ravel() <= 0))
    empty = np.concatenate(found)
    if len(empty):
        raise ValueError(
            f"{describe_layer(layer)} has {len(empty)} cells without counts ({[str(obs_names[i]) for i in empty[:10]]}); "
            "every cell needs at least one count (filter them, e.g. sc.pp.filter_cells(adata, min_counts=1))."
        )


def check_finite(matrix, layer: str | None) -> None:
    """Raise a ``ValueError`` naming the layer if it holds NaN or infinite values.

    Examples
    --------
    >>> import numpy as np
    >>> check_finite(np.array([[np.nan]]), None)
    Traceback (most recent call last):
    ...
    ValueError: adata.X has NaN or infinite values in 1 entries; every value must be finite.
    """
    if is_out_of_core(matrix):  # chunk by chunk, counting every bad entry
        bad = sum(_n_not_finite(rows) for _, rows in iter_row_chunks(matrix))
    else:
        bad = _n_not_finite(matrix)
    if bad:
        raise ValueError(
            f"{describe_layer(layer)} has NaN or infinite values in {bad} entries; every "
            "value must be finite."
        )


def _n_not_finite(matrix) -> int:
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    return int((~np.isfinite(values)).sum())


_MODEL_EXPECTS_LOG = "the model was trained on log-normalised values (gene_likelihood='normal')"


def check_log_normalized(matrix, layer: str | None, limit: float = 30.0, expects: str = _MODEL_EXPECTS_LOG) -> None:
    """Raise a ``ValueError`` if values meant to be log-normalised look like raw counts.

    log1p of counts normalised to 1e4 stays below about 10; integer values above ``limit``
    are counts. ``expects`` says, in the message, who needs log-normalised values.

    Examples
    --------
    >>> import numpy as np
    >>> check_log_normalized(np.array([[0.0, 250.0]]), None)
    Traceback (most recent call last):
    ...
    ValueError: adata.X looks like raw counts (integers up to 250), but the model was trained on log-normalised values (gene_likelihood='normal'); pass log1p-normalised expression, e.g. sc.pp.normalize_total(adata, 1e4); sc.pp.log1p(adata).
    """
    check_finite(matrix, layer)
    chunks = (rows for _, rows in iter_row_chunks(matrix)) if is_out_of_core(matrix) else [matrix]
    largest, integers = -np.inf, True  # one pass over row chunks for backed or streamed data
    for chunk in chunks:
        values = chunk.data if sparse.issparse(chunk) else np.asarray(chunk)
        if values.size:
            largest = max(largest, float(values.max()))
            integers = integers and bool(np.array_equal(values, np.round(values)))
    if largest > limit and integers:
        raise ValueError(
            f"{describe_layer(layer)} looks like raw counts (integers up to {largest:.0f}), but {expects}; "
            "pass log1p-normalised expression, e.g. sc.pp.normalize_total(adata, 1e4); sc.pp.log1p(adata)."
        )
