"""Metrics of predicted perturbation effects, on log1p-normalised expression.

Profile metrics compare pseudobulks (from the one :func:`~perturbscope.data.pseudobulk`);
distributional metrics compare cells. :func:`prepare_reference` computes what the observed
data of a split contributes (control mean, observed means, DE genes, the perturbed centroid,
the PCA) once, and :func:`evaluate` scores any number of predictions against it.

Differential expression (DE) settings: ``scanpy.tl.rank_genes_groups`` with
``method="t-test"`` (Welch's t-test), ``reference`` the control cells, ``rankby_abs=True``;
the top-``n_de`` genes by absolute t statistic are a perturbation's DE genes (the ``*_top_de``
metrics). ``discrimination_score``, ``mae`` and ``de_overlap`` are cell-eval's, computed as
cell-eval computes them (:mod:`._cell_eval_metrics`, with its own DE test).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import OUTPUT_KEYS
from ..data import check_no_missing_labels, pseudobulk
from ._cell_eval_metrics import ControlDE, de_overlap, discrimination_score, mae
from ._distribution_metrics import energy_distance, histogram_kl, moment_errors

#: Profile metrics (higher is better unless named in :data:`LOWER_IS_BETTER`).
PROFILE_METRICS = (
    "pearson_delta",
    "pearson_delta_top_de",
    "pearson_delta_perturbed",
    "mse_top_de",
    "l2_top_expressed",
    "direction_top_de",
    "discrimination_score",
    "de_overlap",
    "mae",
    "change_norm_ratio",
)
DISTRIBUTION_METRICS = (
    "variance_ratio",
    "variance_error",
    "skewness_error",
    "kurtosis_error",
    "histogram_kl",
    "energy_distance",
)
#: Best at 1: below 1 the predicted cells are less variable than real ones (collapse).
CLOSEST_TO_ONE = frozenset({"variance_ratio", "change_norm_ratio"})
LOWER_IS_BETTER = frozenset(
    {"mse_top_de", "l2_top_expressed", "mae", *DISTRIBUTION_METRICS} - CLOSEST_TO_ONE
)


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float64)


def pearson_delta(
    predicted: np.ndarray, observed: np.ndarray, reference: np.ndarray, tol: float = 1e-6
) -> float:
    """Pearson correlation of the predicted and observed change from a reference profile.

    Parameters
    ----------
    predicted, observed
        Mean profiles (genes).
    reference
        The profile both are compared to: the control mean (Pearson delta) or the perturbed
        centroid (Systema).
    tol
        A change whose standard deviation is below ``tol`` is constant (float32 rounding of
        a no-change prediction is not a signal): it carries no information and scores 0
        rather than an undefined or random correlation.

    Returns
    -------
    The correlation, in ``[-1, 1]``; ``NaN`` if ``reference`` is undefined (``NaN``).

    Examples
    --------
    >>> round(pearson_delta(np.array([2.0, 1, 0]), np.array([3.0, 1, 1]), np.array([1.0, 1, 1])), 3)
    0.866
    """
    a = np.asarray(predicted, dtype=np.float64) - reference
    b = np.asarray(observed, dtype=np.float64) - reference
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    if a.std() < tol or b.std() < tol:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def mean_squared_error(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Mean squared difference of two profiles.

    Parameters
    ----------
    predicted, observed
        Profiles (genes).

    Returns
    -------
    ``mean((predicted - observed) ** 2)``.

    Examples
    --------
    >>> mean_squared_error(np.array([1.0, 2.0]), np.array([0.0, 4.0]))
    2.5
    """
    return float(np.mean((np.asarray(predicted) - np.asarray(observed)) ** 2))


def l2_distance(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Euclidean distance of two profiles.

    Parameters
    ----------
    predicted, observed
        Profiles (genes).

    Returns
    -------
    ``||predicted - observed||_2``.

    Examples
    --------
    >>> l2_distance(np.array([0.0, 3.0]), np.array([4.0, 0.0]))
    5.0
    """
    return float(np.linalg.norm(np.asarray(predicted) - np.asarray(observed)))


def change_norm_ratio(predicted: np.ndarray, observed: np.ndarray, control: np.ndarray) -> float:
    """``|pred - ctrl| / |obs - ctrl|``: 1 is a change of the right size, above 1 overstated.

    Examples
    --------
    >>> change_norm_ratio(np.array([2.0, 0.0]), np.array([1.0, 0.0]), np.zeros(2))
    2.0
    """
    observed_norm = float(np.linalg.norm(observed - control))
    if observed_norm == 0:
        return float("nan")
    return float(np.linalg.norm(predicted - control)) / observed_norm


def direction_agreement(
    predicted: np.ndarray, observed: np.ndarray, reference: np.ndarray
) -> float:
    """Fraction of genes whose predicted change from ``reference`` has the observed sign.

    Parameters
    ----------
    predicted, observed
        Profiles (genes), typically restricted to the DE genes.
    reference
        The control mean.

    Returns
    -------
    A fraction in ``[0, 1]``; a zero change counts as its own sign.

    Examples
    --------
    >>> direction_agreement(np.array([2.0, 0, 1]), np.array([3.0, 2, 1]), np.array([1.0, 1, 1]))
    0.6666666666666666
    """
    signs_p = np.sign(np.asarray(predicted) - reference)
    signs_o = np.sign(np.asarray(observed) - reference)
    return float(np.mean(signs_p == signs_o))


def top_de_genes(
    adata: ad.AnnData,
    groupby: str,
    reference: str,
    n_genes: int = 20,
    layer: str | None = None,
) -> dict[str, list[str]]:
    """Top DE genes of each group against ``reference`` (scanpy t-test, ranked by ``|t|``).

    Parameters
    ----------
    adata
        Log1p-normalised cells of the groups and the reference (not modified).
    groupby
        ``obs`` column of groups.
    reference
        The reference group, e.g. ``"control"``.
    n_genes
        How many genes per group.
    layer
        Layer to test; ``X`` when ``None``.

    Returns
    -------
    ``{group: genes}`` for every group except the reference. Genes with an infinite t statistic
    (zero variance in both groups) are not called.

    Raises
    ------
    ValueError
        If ``reference`` is not a group.

    Examples
    --------
    >>> import anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(1, 0.1, (20, 3)); X[10:, 2] += 2
    >>> a = ad.AnnData(X, obs=pd.DataFrame({"g": ["control"] * 10 + ["A"] * 10},
    ...                                    index=[str(i) for i in range(20)]))
    >>> top_de_genes(a, "g", "control", n_genes=1)
    {'A': ['2']}
    """
    import scanpy as sc

    labels = adata.obs[groupby].astype(str)
    if reference not in set(labels):
        raise ValueError(f"reference {reference!r} is not a value of adata.obs[{groupby!r}].")
    X = adata.X if layer is None else adata.layers[layer]
    work = ad.AnnData(
        _dense(X),
        obs=pd.DataFrame({"group": labels.to_numpy()}, index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
    )
    work.obs["group"] = work.obs["group"].astype("category")
    work.uns["log1p"] = {"base": None}
    sc.tl.rank_genes_groups(
        work,
        "group",
        reference=reference,
        method="t-test",
        rankby_abs=True,
        n_genes=None,
        use_raw=False,
    )
    result = work.uns["rank_genes_groups"]
    names, scores = pd.DataFrame(result["names"]), pd.DataFrame(result["scores"])
    top = {}
    for g in names.columns:
        # an infinite t comes from zero variance in both groups (e.g. a constant shift of a gene
        # never expressed in control): a degenerate test, not a DE call
        finite = np.isfinite(scores[g].to_numpy(dtype=np.float64))
        top[str(g)] = names[g][finite].astype(str).tolist()[:n_genes]
    return top


@dataclass
class EvaluationReference:
    """What the observed data of a split contributes to every score, computed once.

    Build it with :func:`prepare_reference`.

    Attributes
    ----------
    control_mean
        Mean log1p-normalised control profile (genes).
    observed_means
        Observed profiles of the held-out perturbations (perturbations x genes).
    de_genes
        Top DE genes of each held-out perturbation against control.
    significant_genes
        cell-eval's ranked significant DE genes of each held-out perturbation
        (:func:`~perturbscope.benchmark.significant_de_genes`), for ``de_overlap``.
    perturbed_centroid
        The mean of the perturbed profiles (Systema's reference).
    top_expressed
        Genes of the ``L2`` metric: the most expressed in control.
    observed_cells
        ``{perturbation: cells x genes}`` log1p-normalised observed cells.
    control_cells
        Log1p-normalised control cells (cells x genes).
    pca
        A PCA fitted on observed control and perturbed cells (energy distance).
    var_names
        The genes.
    """

    control_mean: np.ndarray
    observed_means: pd.DataFrame
    de_genes: dict[str, list[str]]
    significant_genes: dict[str, list[str]]
    perturbed_centroid: np.ndarray
    top_expressed: np.ndarray
    observed_cells: dict[str, np.ndarray]
    control_cells: np.ndarray
    pca: object
    var_names: pd.Index


def prepare_reference(
    observed: ad.AnnData,
    control: ad.AnnData,
    perturbation_key: str,
    de_genes: dict[str, list[str]] | None = None,
    perturbed_centroid: np.ndarray | None = None,
    n_de: int = 20,
    n_top_expressed: int = 1000,
    n_pcs: int = 20,
    seed: int = 0,
) -> EvaluationReference:
    """Compute the observed side of a split's scores once.

    Parameters
    ----------
    observed
        Log1p-normalised held-out perturbed cells (in ``X``).
    control
        Log1p-normalised control cells (in ``X``) of the same context.
    perturbation_key
        ``obs`` column of ``observed`` with the perturbation labels.
    de_genes
        Precomputed DE genes (e.g. from all cells when ``observed`` is a half); computed
        with :func:`top_de_genes` otherwise.
    perturbed_centroid
        Systema's reference; the mean of the observed profiles by default.
    n_de
        DE genes per perturbation.
    n_top_expressed
        Genes of the L2 metric.
    n_pcs
        PCA dimensions of the energy distance.
    seed
        Seed of the PCA solver.

    Returns
    -------
    An :class:`EvaluationReference`.

    Raises
    ------
    KeyError
        If ``perturbation_key`` is not in ``observed.obs``, or ``de_genes`` lacks an observed
        perturbation or names genes that are not in ``observed.var_names``.
    ValueError
        If the genes of ``observed`` and ``control`` differ, or either has no cells.

    Examples
    --------
    >>> import anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> obs = ad.AnnData(rng.random((6, 4)), obs=pd.DataFrame({"p": list("aaabbb")}, index=list("123456")))
    >>> ctrl = ad.AnnData(rng.random((3, 4)), obs=pd.DataFrame(index=list("xyz")))
    >>> prepare_reference(obs, ctrl, "p", n_de=2, n_pcs=2).observed_means.shape
    (2, 4)
    """
    from sklearn.decomposition import PCA

    if perturbation_key not in observed.obs.columns:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} not in observed.obs; columns are "
            f"{list(observed.obs.columns)}."
        )
    if not observed.var_names.equals(control.var_names):
        raise ValueError("observed and control cells must have the same genes in the same order.")
    for name, cells in (("observed", observed), ("control", control)):
        if cells.n_obs == 0:
            raise ValueError(f"{name} has no cells; the reference needs held-out perturbed cells and control cells.")
    check_no_missing_labels(observed.obs, perturbation_key=perturbation_key)
    labels = observed.obs[perturbation_key].astype(str)
    observed_X, control_X = _dense(observed.X), _dense(control.X)
    frame = ad.AnnData(
        observed_X,
        obs=pd.DataFrame({"p": labels.to_numpy()}, index=observed.obs_names),
        var=pd.DataFrame(index=observed.var_names),
    )
    observed_means = pseudobulk(frame, "p")
    observed_means.index = observed_means.index.astype(str)
    control_mean = control_X.mean(axis=0)
    if de_genes is None:
        both = ad.concat(
            [
                frame,
                ad.AnnData(
                    control_X,
                    obs=pd.DataFrame(
                        {"p": "__control__"}, index=[f"control_{i}" for i in range(len(control_X))]
                    ),
                    var=frame.var,
                ),
            ],
        )
        de_genes = top_de_genes(both, "p", "__control__", n_genes=n_de)
    else:
        _check_de_genes(de_genes, observed_means.index, observed.var_names)
    centroid = (
        observed_means.to_numpy().mean(axis=0) if perturbed_centroid is None else perturbed_centroid
    )
    top = np.argsort(-control_mean, kind="stable")[: min(n_top_expressed, len(control_mean))]
    cells = {p: observed_X[(labels == p).to_numpy()] for p in observed_means.index}
    control_de = ControlDE(control_X, observed.var_names)
    significant = {p: control_de.significant_genes(c) for p, c in cells.items()}
    stacked = np.vstack([control_X, observed_X])
    n_pcs = min(n_pcs, *stacked.shape)
    pca = PCA(n_components=n_pcs, random_state=seed).fit(stacked)
    return EvaluationReference(
        control_mean=control_mean,
        observed_means=observed_means,
        de_genes=de_genes,
        significant_genes=significant,
        perturbed_centroid=np.asarray(centroid, dtype=np.float64),
        top_expressed=top,
        observed_cells=cells,
        control_cells=control_X,
        pca=pca,
        var_names=observed.var_names.copy(),
    )


def _check_de_genes(de_genes: dict, perturbations: pd.Index, genes: pd.Index) -> None:
    """Given DE genes cover every observed perturbation and name only measured genes."""
    lacking = [p for p in perturbations if p not in de_genes]
    if lacking:
        raise KeyError(f"de_genes has no entry for the observed perturbations {lacking[:10]}.")
    unknown = {p: [g for g in de_genes[p] if g not in genes] for p in perturbations}
    unknown = {p: g for p, g in unknown.items() if g}
    if unknown:
        raise KeyError(f"de_genes names genes that are not in observed.var_names: {dict(list(unknown.items())[:5])}.")


def evaluate(
    predicted: ad.AnnData,
    reference: EvaluationReference,
    perturbation_key: str = OUTPUT_KEYS.PERTURBATION,
    layer: str | None = OUTPUT_KEYS.LOG1P_NORM_LAYER,
    distributional: bool = True,
    max_cells: int = 500,
    seed: int = 0,
    predicted_means: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Score predictions of the held-out perturbations with every metric.

    Parameters
    ----------
    predicted
        Predicted cells or means (e.g. the output of ``predict``) of the perturbations in
        ``reference``, log1p-normalised in ``layer``.
    reference
        The observed side, from :func:`prepare_reference`.
    perturbation_key
        ``obs`` column of ``predicted`` with the perturbation labels.
    layer
        Layer of ``predicted`` with log1p-normalised values; ``X`` when ``None``.
    distributional
        Also compute the distributional metrics and DE overlap (needs predicted cells, not
        only means; skipped, as ``NaN``, for a perturbation with a single predicted row).
    max_cells
        Cells per side used by the energy distance (subsampled with ``seed``).
    seed
        Seed of the subsampling.
    predicted_means
        The pseudobulk of ``predicted`` (perturbations x genes, from
        :func:`perturbscope.data.pseudobulk` of ``layer``), when the caller already has it.

    Returns
    -------
    A DataFrame (perturbations x metrics) with the columns :data:`PROFILE_METRICS` and
    :data:`DISTRIBUTION_METRICS`.

    Raises
    ------
    ValueError
        If genes differ or perturbations of ``reference`` are not predicted.

    Examples
    --------
    >>> import anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> obs = ad.AnnData(rng.random((6, 4)), obs=pd.DataFrame({"p": list("aaabbb")}, index=list("123456")))
    >>> ctrl = ad.AnnData(rng.random((3, 4)), obs=pd.DataFrame(index=list("xyz")))
    >>> ref = prepare_reference(obs, ctrl, "p", n_de=2, n_pcs=2)
    >>> evaluate(obs, ref, perturbation_key="p", layer=None).loc["a", "l2_top_expressed"]
    np.float64(0.0)
    """
    if not predicted.var_names.equals(reference.var_names):
        raise ValueError("predicted must have the observed genes in the same order.")
    if perturbation_key not in predicted.obs.columns:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} not in predicted.obs; columns are "
            f"{list(predicted.obs.columns)}."
        )
    labels = predicted.obs[perturbation_key].astype(str)
    perturbations = list(reference.observed_means.index)
    missing = sorted(set(perturbations) - set(labels))
    if missing:
        raise ValueError(f"perturbations {missing} are observed but not predicted.")
    X = _dense(predicted.X if layer is None else predicted.layers[layer])
    frame = ad.AnnData(
        X,
        obs=pd.DataFrame({"p": labels.to_numpy()}, index=predicted.obs_names),
        var=pd.DataFrame(index=predicted.var_names),
    )
    predicted_means = pseudobulk(frame, "p") if predicted_means is None else predicted_means.copy()
    predicted_means.index = predicted_means.index.astype(str)
    predicted_means = predicted_means.loc[perturbations]
    observed_means = reference.observed_means
    genes = reference.var_names
    control = reference.control_mean
    rows_of = labels.value_counts()
    has_cells = bool((rows_of.reindex(perturbations) > 1).any())

    pds = discrimination_score(predicted_means, observed_means, control)
    rng = np.random.default_rng(seed)
    control_de = ControlDE(reference.control_cells, genes) if distributional and has_cells else None
    rows = {}
    for p in perturbations:
        pred, obs = predicted_means.loc[p].to_numpy(), observed_means.loc[p].to_numpy()
        de = genes.get_indexer(reference.de_genes[p])
        if (de < 0).any():  # a reference built by hand: -1 would silently score the last gene
            raise KeyError(f"reference.de_genes[{p!r}] names genes that are not in its var_names: "
                           f"{[g for g, i in zip(reference.de_genes[p], de) if i < 0]}.")
        top = reference.top_expressed
        row = {
            "pearson_delta": pearson_delta(pred, obs, control),
            "pearson_delta_top_de": pearson_delta(pred[de], obs[de], control[de]),
            "pearson_delta_perturbed": pearson_delta(pred, obs, reference.perturbed_centroid),
            "mse_top_de": mean_squared_error(pred[de], obs[de]),
            "l2_top_expressed": l2_distance(pred[top], obs[top]),
            "change_norm_ratio": change_norm_ratio(pred[top], obs[top], control[top]),
            "direction_top_de": direction_agreement(pred[de], obs[de], control[de]),
            "discrimination_score": float(pds.loc[p]),
            "mae": mae(pred, obs),
            "de_overlap": np.nan,
        }
        if distributional and rows_of[p] > 1:
            cells_pred = X[(labels == p).to_numpy()]
            cells_obs = reference.observed_cells[p]
            row["de_overlap"] = de_overlap(
                control_de.significant_genes(cells_pred), reference.significant_genes[p]
            )
            row.update(moment_errors(cells_pred, cells_obs))
            row["histogram_kl"] = float(np.mean(histogram_kl(cells_pred, cells_obs)))
            sub = [
                c[rng.choice(len(c), min(max_cells, len(c)), replace=False)]
                for c in (cells_pred, cells_obs)
            ]
            row["energy_distance"] = energy_distance(*(reference.pca.transform(c) for c in sub))
        else:
            row.update(dict.fromkeys(DISTRIBUTION_METRICS, np.nan))
        rows[p] = row
    return pd.DataFrame.from_dict(rows, orient="index")[list(PROFILE_METRICS + DISTRIBUTION_METRICS)]
