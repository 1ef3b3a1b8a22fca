"""Genetic-interaction calls: Norman et al. (2019)'s linear model of a double perturbation.

Design
------
1. **Shifts.** With the package's one :func:`~perturbscope.data.pseudobulk`, each
   perturbation's mean log1p-normalised expression minus its context's control mean.
2. **Genes.** Like Norman's "abundant genes", the fit uses genes whose mean expression over the
   four groups involved (control, both singles, the double) exceeds ``min_mean``; the perturbed
   genes themselves (CRISPRa targets) are left out, since their own induction is not a
   downstream effect. Genes with no expression in those groups carry no information and would
   drag a robust estimator to zero.
3. **Fit.** The double's shift is regressed on the two single shifts without intercept,
   ``delta_ab = c1 * delta_a + c2 * delta_b + e``, by least squares (``method="ols"``, the
   estimator behind ``coef_first``/``coef_second`` of Norman's published table) or by the
   robust Theil-Sen estimator (``method="theil_sen"``, Norman's ``ts_coef_*``). Least squares is
   the default: on sparse data most genes have a near-zero shift, and Theil-Sen's median of
   pairwise exact solutions then collapses to zero.
4. **Statistics.** ``mag = sqrt(c1^2 + c2^2)``; ``dominance = |log10(|c1| / |c2|)|``; the fit's
   Pearson and Spearman correlation with the double; distance correlations of the double with
   the singles (``dcor``, Norman's), with the fit (``dcor_fit``) and between the singles.
5. **Calls**, first match wins (see :func:`classify_interactions`): ``neomorphic`` when the
   singles explain the double poorly (``dcor < fit_threshold``); ``epistasis`` when one gene
   dominates (``dominance > dominance_threshold``); ``synergy`` / ``suppression`` when ``mag``
   is above / below the additive magnitude ``sqrt(2)`` (``c1 = c2 = 1``) by more than the
   relative ``magnitude_tolerance``; else ``additive``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats

from ..data import parse_perturbation, perturbation_shifts
from ..data._shifts import context_labels

Method = Literal["ols", "theil_sen"]

#: The interaction types, in the order the rules are tried.
CALLS = ("neomorphic", "epistasis", "synergy", "suppression", "additive")

#: Default thresholds of :func:`classify_interactions` (calibration in docs/interactions.md).
THRESHOLDS: dict[str, float] = {
    "fit_threshold": 0.6,
    "dominance_threshold": float(np.log10(2.0)),
    "magnitude_tolerance": 0.25,
    "additive_magnitude": float(np.sqrt(2.0)),
}



def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Distance correlation of Székely, Rizzo & Bakirov (2007) between two samples.

    Parameters
    ----------
    x, y
        Arrays with the same number of observations (rows); 1-D arrays are one variable.

    Returns
    -------
    ``dcor.distance_correlation(x, y)``: the distance correlation in ``[0, 1]`` (the square
    root of dCor², as Norman et al. report it); 0 when either sample is constant. ``dcor``
    needs O(n^2) memory (O(n log n) time for one variable each), not O(n^2 d).

    Raises
    ------
    ValueError
        If the numbers of observations differ.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(10.0)
    >>> round(distance_correlation(x, 3 * x + 1), 6)
    1.0
    >>> round(distance_correlation(x, np.ones(10)), 6)
    0.0
    """
    import dcor  # third-party; the module has a ``dcor`` argument elsewhere

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x.reshape(len(x), -1)
    y = y.reshape(len(y), -1)
    if len(x) != len(y):
        raise ValueError(
            f"x and y need the same number of observations, got {len(x)} and {len(y)}."
        )
    return float(dcor.distance_correlation(x, y))


def classify_interactions(
    coef_first: np.ndarray | pd.Series | float,
    coef_second: np.ndarray | pd.Series | float,
    dcor: np.ndarray | pd.Series | float,
    fit_threshold: float = THRESHOLDS["fit_threshold"],
    dominance_threshold: float = THRESHOLDS["dominance_threshold"],
    magnitude_tolerance: float = THRESHOLDS["magnitude_tolerance"],
    additive_magnitude: float = THRESHOLDS["additive_magnitude"],
) -> np.ndarray:
    """Call interaction types from Norman's model coefficients; the first matching rule wins.

    1. ``neomorphic``: ``dcor < fit_threshold``, the singles explain the double poorly;
    2. ``epistasis``: ``|log10(|c1| / |c2|)| > dominance_threshold``, one gene dominates;
    3. ``synergy``: ``mag > additive_magnitude * (1 + magnitude_tolerance)``;
    4. ``suppression``: ``mag < additive_magnitude * (1 - magnitude_tolerance)``;
    5. ``additive`` otherwise. ``mag = sqrt(c1^2 + c2^2)``, ``sqrt(2)`` for a sum (``c1 = c2 = 1``).

    Parameters
    ----------
    coef_first, coef_second
        Coefficients of the first and second single.
    dcor
        Distance correlation of the double's shift with the two singles' shifts.
    fit_threshold, dominance_threshold, magnitude_tolerance, additive_magnitude
        The thresholds; defaults in :data:`THRESHOLDS`.

    Returns
    -------
    An array of calls (strings from :data:`CALLS`).

    Raises
    ------
    ValueError
        If a threshold is out of range, the three inputs differ in length, or an input is NaN
        or infinite (no rule can be applied there).

    Examples
    --------
    >>> classify_interactions([1.0, 2.0, 1.6, 0.5], [1.0, 0.5, 1.6, 0.5], [0.9, 0.9, 0.9, 0.3])
    array(['additive', 'epistasis', 'synergy', 'neomorphic'], dtype='<U11')
    """
    if not 0 <= fit_threshold <= 1:
        raise ValueError(f"fit_threshold must be in [0, 1] (a distance correlation), got {fit_threshold}.")
    if not 0 <= magnitude_tolerance < 1:
        raise ValueError(f"magnitude_tolerance must be in [0, 1), got {magnitude_tolerance}.")
    if dominance_threshold < 0 or additive_magnitude <= 0:
        raise ValueError(
            "dominance_threshold must be >= 0 and additive_magnitude > 0, got "
            f"{dominance_threshold} and {additive_magnitude}."
        )
    c1 = np.atleast_1d(np.asarray(coef_first, dtype=np.float64))
    c2 = np.atleast_1d(np.asarray(coef_second, dtype=np.float64))
    fit = np.atleast_1d(np.asarray(dcor, dtype=np.float64))
    if not len(c1) == len(c2) == len(fit):
        raise ValueError(f"coef_first, coef_second and dcor must have one value per double, got lengths "
                         f"{len(c1)}, {len(c2)} and {len(fit)}.")
    not_finite = np.flatnonzero(~(np.isfinite(c1) & np.isfinite(c2) & np.isfinite(fit)))
    if len(not_finite):
        raise ValueError(f"coefficients and dcor must be finite to call an interaction; positions "
                         f"{not_finite[:10].tolist()} are NaN or infinite.")
    mag = np.hypot(c1, c2)
    dominance = _dominance(c1, c2)
    return np.select(
        [
            fit < fit_threshold,
            dominance > dominance_threshold,
            mag > additive_magnitude * (1 + magnitude_tolerance),
            mag < additive_magnitude * (1 - magnitude_tolerance),
        ],
        list(CALLS[:4]),
        default=CALLS[4],
    )


def _dominance(c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(np.log10(np.abs(c1) / np.abs(c2)))
    both_zero = (c1 == 0) & (c2 == 0)
    return np.where(both_zero, 0.0, ratio)


def _fit(singles: np.ndarray, double: np.ndarray, method: Method, random_state: int) -> np.ndarray:
    if method == "ols":
        coef, *_ = np.linalg.lstsq(singles, double, rcond=None)
        return coef
    from sklearn.linear_model import TheilSenRegressor

    model = TheilSenRegressor(fit_intercept=False, random_state=random_state, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny inputs
        return model.fit(singles, double).coef_


def fit_interaction(
    first: np.ndarray,
    second: np.ndarray,
    double: np.ndarray,
    method: Method = "ols",
    random_state: int = 0,
) -> dict[str, float]:
    """Fit Norman's model to one double from its shift and the two single shifts.

    Parameters
    ----------
    first, second, double
        Shifts from control (one value per gene) of the two singles and the double.
    method
        ``"ols"`` (least squares) or ``"theil_sen"`` (robust), both without intercept.
    random_state
        Seed of the Theil-Sen subsampling.

    Returns
    -------
    ``coef_first``, ``coef_second``, ``mag``, ``dominance``, ``corr_fit`` (Pearson of fit and
    double), ``spearman_fit``, ``dcor`` (double vs both singles), ``dcor_fit`` (double vs fit),
    ``dcor_singles`` and ``n_genes``.

    Raises
    ------
    ValueError
        For an unknown ``method``, arrays of different lengths, or fewer than 3 genes.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=50), rng.normal(size=50)
    >>> fit = fit_interaction(a, b, 2 * a + 0.5 * b)
    >>> round(fit["coef_first"], 6), round(fit["coef_second"], 6)
    (2.0, 0.5)
    """
    if method not in ("ols", "theil_sen"):
        raise ValueError(f"method must be 'ols' or 'theil_sen', got {method!r}.")
    first, second, double = (
        np.asarray(v, dtype=np.float64).ravel() for v in (first, second, double)
    )
    if not len(first) == len(second) == len(double):
        raise ValueError(
            f"shifts must have equal lengths, got {len(first)}, {len(second)} and {len(double)}."
        )
    if len(double) < 3:
        raise ValueError(f"the fit needs at least 3 genes, got {len(double)}.")
    singles = np.column_stack([first, second])
    c1, c2 = _fit(singles, double, method, random_state)
    fitted = singles @ np.array([c1, c2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant inputs: correlation undefined -> nan
        pearson = stats.pearsonr(fitted, double)[0] if np.ptp(fitted) > 0 else np.nan
        spearman = stats.spearmanr(fitted, double)[0] if np.ptp(fitted) > 0 else np.nan
    return {
        "coef_first": float(c1),
        "coef_second": float(c2),
        "mag": float(np.hypot(c1, c2)),
        "dominance": float(_dominance(np.array([c1]), np.array([c2]))[0]),
        "corr_fit": float(pearson),
        "spearman_fit": float(spearman),
        "dcor": distance_correlation(singles, double),
        "dcor_fit": distance_correlation(fitted, double),
        "dcor_singles": distance_correlation(first, second),
        "n_genes": len(double),
    }


def _resolve(
    labels: pd.Series,
    singles: Sequence[str] | None,
    doubles: Sequence[str] | None,
    control_value: str,
    delimiter: str,
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """``{gene: single label}`` and ``[(double, first gene, second gene)]``, checked."""
    present = list(pd.unique(labels))
    genes_of = {p: parse_perturbation(p, control_value, delimiter) for p in present}
    if singles is None:
        single_labels = [p for p in present if len(genes_of[p]) == 1]
    else:
        single_labels = [str(s) for s in singles]
        absent = [s for s in single_labels if s not in genes_of]
        if absent:
            raise ValueError(f"singles {absent} are not labels in the data.")
        wrong = [s for s in single_labels if len(genes_of[s]) != 1]
        if wrong:
            raise ValueError(f"singles {wrong} are not single-gene perturbations.")
    gene_to_single = {genes_of[s][0]: s for s in single_labels}

    explicit = doubles is not None
    if doubles is None:
        double_labels = [p for p in present if len(genes_of[p]) == 2]
    else:
        double_labels = [str(d) for d in doubles]
        absent = [d for d in double_labels if d not in genes_of]
        if absent:
            raise ValueError(f"doubles {absent} are not labels in the data.")
        wrong = [d for d in double_labels if len(genes_of[d]) != 2]
        if wrong:
            raise ValueError(f"doubles {wrong} are not two-gene perturbations.")
    missing = {d: [g for g in genes_of[d] if g not in gene_to_single] for d in double_labels}
    missing = {d: genes for d, genes in missing.items() if genes}
    if missing and explicit:
        listed = "; ".join(f"{d}: {genes}" for d, genes in missing.items())
        raise ValueError(
            "single-gene perturbations needed to fit these doubles are absent from the data "
            f"(or from singles): {listed}."
        )
    if missing:
        warnings.warn(
            f"{len(missing)} doubles are skipped because their single-gene perturbations are "
            f"absent: {sorted(missing)}.",
            stacklevel=3,
        )
    fitted = [(d, *genes_of[d]) for d in double_labels if d not in missing]
    if not fitted:
        raise ValueError(
            "no double perturbation with both single-gene perturbations present; labels found: "
            f"{present[:10]}."
        )
    return gene_to_single, fitted


def genetic_interactions(
    adata: ad.AnnData,
    singles: Sequence[str] | None = None,
    doubles: Sequence[str] | None = None,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    delimiter: str = "+",
    layer: str | None = None,
    context_key: str | None = None,
    method: Method = "ols",
    min_mean: float = 0.0,
    exclude_targets: bool = True,
    random_state: int = 0,
    **thresholds: float,
) -> pd.DataFrame:
    """Fit Norman et al. (2019)'s interaction model to every double and call its type.

    Parameters
    ----------
    adata
        Cells on the log1p-normalised scale: real cells, or predictions (e.g. from
        ``ScopeVI.predict`` with ``layer="log1p_norm"``) concatenated with control cells, since
        shifts are taken from the control mean. Not modified.
    singles
        Single-gene perturbation labels to use; all one-gene labels when ``None``.
    doubles
        Two-gene labels to fit. When ``None``, every two-gene label whose singles are present;
        the others are skipped with a warning. Given explicitly, a double whose singles are
        absent is an error.
    perturbation_key
        ``obs`` column of perturbation labels.
    control_value
        The control label.
    delimiter
        Separator of genes in combination labels.
    layer
        Layer holding log1p-normalised expression; ``X`` when ``None``.
    context_key
        ``obs`` column of contexts (cell type, line); shifts and fits are per context.
    method
        ``"ols"`` or ``"theil_sen"`` (see the module docstring for why ``"ols"`` is the default).
    min_mean
        Genes whose mean expression over control, the two singles and the double is not above
        this are left out of that double's fit.
    exclude_targets
        Leave the two perturbed genes out of the fit.
    random_state
        Seed of the Theil-Sen subsampling.
    **thresholds
        Overrides of :data:`THRESHOLDS`, passed to :func:`classify_interactions`.

    Returns
    -------
    A new DataFrame, one row per double (and context): ``double``, ``first``, ``second`` (genes
    in label order), ``context`` (with ``context_key``), the statistics of
    :func:`fit_interaction`, ``dominant`` (the gene with the larger absolute coefficient) and
    ``call``. ``attrs`` holds the method and thresholds.

    Raises
    ------
    KeyError
        If ``perturbation_key``, ``context_key`` or ``layer`` is missing.
    ValueError
        If the control label is absent (from a context), one perturbation is written in two ways
        (``"A+B"`` and ``"B+A"``, ``"A"`` and ``"A+control"``), a requested label is absent or of the
        wrong kind, the singles of an explicitly requested double are absent, no double can be
        fitted, a threshold name is unknown, or a fit has fewer than 3 genes.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=40), rng.normal(size=40)
    >>> means = {"control": 0 * a, "A": a, "B": b, "A+B": 2 * a + 0.5 * b}
    >>> X = np.vstack([np.tile(m, (3, 1)) for m in means.values()]) + 5
    >>> cells = ad.AnnData(X, obs=pd.DataFrame({"perturbation": np.repeat(list(means), 3)}))
    >>> table = genetic_interactions(cells)
    >>> table[["double", "coef_first", "coef_second", "call"]].round(3).to_numpy().tolist()
    [['A+B', 2.0, 0.5, 'epistasis']]
    """
    unknown = sorted(set(thresholds) - set(THRESHOLDS))
    if unknown:
        raise ValueError(f"unknown thresholds {unknown}; choose from {sorted(THRESHOLDS)}.")
    if method not in ("ols", "theil_sen"):
        raise ValueError(f"method must be 'ols' or 'theil_sen', got {method!r}.")
    shifts, controls = perturbation_shifts(adata, perturbation_key, control_value, context_key, layer, delimiter)
    labels = adata.obs[perturbation_key].astype(str)
    gene_to_single, to_fit = _resolve(labels, singles, doubles, control_value, delimiter)
    contexts = context_labels(adata, context_key)
    genes = shifts.columns
    rows = []
    for context in pd.unique(contexts):
        control = controls.loc[context].to_numpy()
        for double, gene_a, gene_b in to_fit:
            groups = [gene_to_single[gene_a], gene_to_single[gene_b], double]
            absent = [g for g in groups if (g, context) not in shifts.index]
            if absent:
                if context_key is None:
                    raise ValueError(f"perturbations {absent} have no cells.")
                continue  # this double is not measured in this context
            changes = shifts.loc[[(g, context) for g in groups]].to_numpy()
            keep = np.vstack([changes + control, control]).mean(axis=0) > min_mean
            if exclude_targets:
                keep &= ~genes.isin([gene_a, gene_b])
            if keep.sum() < 3:
                raise ValueError(
                    f"only {int(keep.sum())} genes pass min_mean={min_mean} for {double!r}; "
                    "lower min_mean."
                )
            fit = fit_interaction(*changes[:, keep], method=method, random_state=random_state)
            row = {"double": double, "first": gene_a, "second": gene_b}
            if context_key is not None:
                row["context"] = context
            row.update(fit)
            row["dominant"] = (
                gene_a if abs(fit["coef_first"]) >= abs(fit["coef_second"]) else gene_b
            )
            rows.append(row)
    if not rows:
        raise ValueError("no double has both singles and control cells in any context.")
    table = pd.DataFrame(rows)
    undefined = table.loc[~np.isfinite(table[["coef_first", "coef_second", "dcor"]]).all(axis=1), "double"]
    if len(undefined):
        raise ValueError(f"the fits of doubles {sorted(set(undefined))} are not finite (a single or double "
                         "whose shift is constant over the fitted genes, e.g. predicted as no change); "
                         "no interaction can be called for them.")
    settings = {**THRESHOLDS, **thresholds}
    table["call"] = classify_interactions(
        table["coef_first"], table["coef_second"], table["dcor"], **settings
    )
    table.attrs = {"method": method, "min_mean": min_mean, "exclude_targets": exclude_targets,
                   "random_state": random_state, "thresholds": settings}
    return table


def _published_name(
    gene_a: str, gene_b: str, names: set[str], separator: str
) -> tuple[str, bool] | None:
    forward, backward = f"{gene_a}{separator}{gene_b}", f"{gene_b}{separator}{gene_a}"
    if forward in names:
        return forward, False
    if backward in names:
        return backward, True
    return None


def compare_with_published(
    table: pd.DataFrame,
    published: pd.DataFrame | str | os.PathLike,
    separator: str = "_",
    gene_aliases: dict[str, str] | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Rank agreement of a :func:`genetic_interactions` table with Norman's published fits.

    Doubles are matched by gene names in either order; where Norman's order differs from ours
    his coefficients are swapped. The table's method picks the published columns: least squares
    (``coef_first``, ``coef_second``, ``coef_norm2``) or Theil-Sen (``ts_coef_first``,
    ``ts_coef_second``, ``ts_norm2``). Published calls are made by
    :func:`classify_interactions` with the table's thresholds from the published coefficients
    and ``dcor`` (Norman published the statistics, not a call per pair).

    Parameters
    ----------
    table
        Output of :func:`genetic_interactions` (one context).
    published
        Norman's ``regr_fits_final.csv`` (``norman2019_gi_fits.csv``) or its path.
    separator
        Separator of the genes in the published ``name`` column.
    gene_aliases
        Our gene name -> published gene name, for renamed genes.

    Returns
    -------
    A summary dict (``n_doubles``, ``spearman_coef_first``, ``spearman_coef_second``,
    ``spearman_mag``, ``call_agreement``; a correlation is ``nan`` when either side is
    constant or fewer than 3 doubles match) and the matched per-double table (ours and
    ``published_*`` columns side by side).

    Raises
    ------
    KeyError
        If ``table`` or ``published`` lacks a needed column.
    ValueError
        If ``table`` holds several contexts (each double would be matched once per context), or
        no double of the table is in the published fits.

    Examples
    --------
    >>> import pandas as pd
    >>> published = pd.DataFrame({"name": ["A_B", "C_D", "E_F"], "coef_first": [1.0, 2, 3],
    ...     "coef_second": [1.0, 0.5, 2], "coef_norm2": [1.41, 2.06, 3.61], "dcor": [0.9] * 3})
    >>> ours = pd.DataFrame({"first": ["B", "C", "E"], "second": ["A", "D", "F"],
    ...     "coef_first": [1.1, 1.9, 2.0], "coef_second": [1.0, 0.6, 3.1],
    ...     "mag": [1.49, 1.99, 3.69], "dcor": [0.9] * 3, "call": ["additive"] * 3})
    >>> summary, matched = compare_with_published(ours, published)
    >>> summary["spearman_coef_first"], summary["n_doubles"]
    (1.0, 3)
    """
    if isinstance(published, str | os.PathLike):
        published = pd.read_csv(published)
    needed = ["first", "second", "coef_first", "coef_second", "mag", "call"]
    lacking = [c for c in needed if c not in table.columns]
    if lacking:
        raise KeyError(f"table lacks columns {lacking}; pass the output of genetic_interactions.")
    if "context" in table.columns and table["context"].nunique() > 1:
        raise ValueError(f"table holds {table['context'].nunique()} contexts "
                         f"({sorted(map(str, table['context'].unique()))[:5]}); Norman's fits are of one "
                         "screen: compare one context at a time, e.g. table[table['context'] == 'K562'].")
    method = table.attrs.get("method", "ols")
    prefix = "ts_" if method == "theil_sen" else ""
    columns = {
        "coef_first": f"{prefix}coef_first",
        "coef_second": f"{prefix}coef_second",
        "mag": "ts_norm2" if prefix else "coef_norm2",
    }
    lacking = [c for c in ["name", "dcor", *columns.values()] if c not in published.columns]
    if lacking:
        raise KeyError(
            f"published fits lack columns {lacking}; found {list(published.columns)[:12]}..."
        )
    aliases = gene_aliases or {}
    published = published.set_index("name")
    names = set(published.index)
    rows = []
    for _, row in table.iterrows():
        a, b = aliases.get(row["first"], row["first"]), aliases.get(row["second"], row["second"])
        match = _published_name(a, b, names, separator)
        if match is None:
            continue
        name, swapped = match
        theirs = published.loc[name]
        c1, c2 = theirs[columns["coef_first"]], theirs[columns["coef_second"]]
        if swapped:
            c1, c2 = c2, c1
        rows.append(
            {
                "double": row.get("double", f"{row['first']}+{row['second']}"),
                "published_name": name,
                "coef_first": row["coef_first"],
                "coef_second": row["coef_second"],
                "mag": row["mag"],
                "call": row["call"],
                "published_coef_first": float(c1),
                "published_coef_second": float(c2),
                "published_mag": float(theirs[columns["mag"]]),
                "published_dcor": float(theirs["dcor"]),
            }
        )
    if not rows:
        raise ValueError(
            f"none of the table's doubles {table['first'].add('+').add(table['second']).tolist()[:10]} "
            "is in the published fits."
        )
    matched = pd.DataFrame(rows)
    settings = table.attrs.get("thresholds", THRESHOLDS)
    matched["published_call"] = classify_interactions(
        matched["published_coef_first"],
        matched["published_coef_second"],
        matched["published_dcor"],
        **settings,
    )
    summary: dict[str, float] = {"n_doubles": len(matched)}
    for column in ("coef_first", "coef_second", "mag"):
        summary[f"spearman_{column}"] = _spearman(matched[column], matched[f"published_{column}"])
    summary["call_agreement"] = float((matched["call"] == matched["published_call"]).mean())
    return summary, matched


def _constant(values: np.ndarray) -> bool:
    # Rounding noise (the additive baseline's float32 coefficients, 1 +- 1e-7) is no ranking.
    return np.ptp(values) <= 1e-6 * max(1.0, float(np.abs(values).max()))


def _spearman(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 3 or _constant(x.to_numpy()) or _constant(y.to_numpy()):
        return float("nan")
    return float(stats.spearmanr(x, y)[0])
