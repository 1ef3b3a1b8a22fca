"""The metrics of cell-eval, the Virtual Cell Challenge's evaluator, computed as it computes them.

cell-eval (``pip install perturbscope[eval]``) is an optional dependency, so these functions
reproduce its definitions (version 0.8) with numpy and scipy, and
``tests/benchmark/test_community_metrics.py`` checks each against cell-eval itself on random
data. Our column names and cell-eval's:

================================  =========================================================
ours                              cell-eval
================================  =========================================================
``discrimination_score``          ``discrimination_score_l1``
``mae``                           ``mae``
``de_overlap``                    ``overlap_at_N``
``spearman_brown``                the Spearman-Brown step of ``MetricsEvaluator.compute_ceiling``
================================  =========================================================

The one deliberate difference: with a single perturbation cell-eval's discrimination score is
1 whatever the prediction; ours is ``NaN`` (a rank among one carries no information).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special, stats
from sklearn.metrics import pairwise_distances

#: cell-eval's false discovery rate cut of a significant DE gene.
FDR_THRESHOLD = 0.05
#: Our names of the metrics cell-eval corrects with Spearman-Brown (its ``SB_METRICS``).
SPEARMAN_BROWN_METRICS = frozenset({"pearson_delta", "discrimination_score", "de_overlap"})


def discrimination_score(
    predicted: pd.DataFrame,
    observed: pd.DataFrame,
    control: np.ndarray | None = None,
    metric: str = "l1",
    exclude_target_gene: bool = True,
) -> pd.Series:
    """Perturbation discrimination score (PDS), cell-eval's ``discrimination_score_l1``.

    Effects are profiles minus the control profile. For each perturbation ``p`` the observed
    effects of all ``n`` perturbations are sorted by their ``metric`` distance to the predicted
    effect of ``p`` (``numpy.argsort`` over the perturbations in sorted order, as cell-eval
    breaks ties); ``r`` is the position of ``p``'s own observed effect and the score is
    ``1 - r / n``: 1 when the truth is the closest, ``1/n`` when it is the farthest, about
    one half for a prediction shared by all perturbations. A gene whose name equals the
    perturbation label is left out of that perturbation's distances (combination labels such
    as ``"A+B"`` match no gene).

    Parameters
    ----------
    predicted, observed
        Profiles (perturbations x genes) with the same index; the columns are the genes.
    control
        The control profile subtracted from both (cell-eval subtracts each side's own control;
        here both sides share the observed one). Zero when ``None``, which leaves ``"l1"``
        and ``"l2"`` distances unchanged.
    metric
        Any metric of :func:`sklearn.metrics.pairwise_distances` (cell-eval: ``"l1"``,
        ``"l2"``, ``"cosine"``).
    exclude_target_gene
        Leave out the gene named like the perturbation.

    Returns
    -------
    A score per perturbation, in ``predicted``'s order; ``NaN`` for fewer than two
    perturbations.

    Raises
    ------
    ValueError
        If the two indexes or the two column sets differ, or ``control`` is not one profile.

    Examples
    --------
    >>> obs = pd.DataFrame([[0.0, 0], [1, 1], [4, 4]], index=["a", "b", "c"])
    >>> pred = pd.DataFrame([[1.0, 1], [0, 0], [4, 3]], index=["a", "b", "c"])
    >>> discrimination_score(pred, obs).round(3).tolist()
    [0.667, 0.667, 1.0]
    """
    if not predicted.index.equals(observed.index):
        raise ValueError(
            "predicted and observed must list the same perturbations in the same order; got "
            f"{predicted.index.tolist()[:5]} and {observed.index.tolist()[:5]}."
        )
    if not predicted.columns.equals(observed.columns):
        raise ValueError("predicted and observed must have the same genes in the same order.")
    n = len(observed)
    if n < 2:
        return pd.Series(np.nan, index=observed.index, dtype=float)
    labels = observed.index.astype(str)
    order = np.argsort(labels.to_numpy(), kind="stable")
    shift = 0.0 if control is None else np.asarray(control, dtype=np.float64)
    if control is not None and shift.shape != (observed.shape[1],):
        raise ValueError(
            f"control must be one profile of {observed.shape[1]} genes; got shape {shift.shape}."
        )
    real = observed.to_numpy(dtype=np.float64)[order] - shift
    pred = predicted.to_numpy(dtype=np.float64)[order] - shift
    genes = observed.columns.astype(str).to_numpy()
    scores = np.empty(n)
    for i, p in enumerate(labels.to_numpy()[order]):
        keep = genes != p if exclude_target_gene else np.ones(len(genes), dtype=bool)
        distances = pairwise_distances(real[:, keep], pred[i, keep][None], metric=metric).ravel()
        rank = np.flatnonzero(np.argsort(distances) == i)[0]
        scores[order[i]] = 1.0 - rank / n
    return pd.Series(scores, index=observed.index)


def mae(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Mean absolute error of two profiles, cell-eval's ``mae``.

    Parameters
    ----------
    predicted, observed
        Mean profiles (genes), log1p-normalised.

    Returns
    -------
    ``mean(|predicted - observed|)`` over all genes.

    Examples
    --------
    >>> mae(np.array([1.0, 2.0]), np.array([0.0, 4.0]))
    1.5
    """
    return float(np.mean(np.abs(np.asarray(predicted, float) - np.asarray(observed, float))))


class ControlDE:
    """cell-eval's DE test of any perturbation against one set of control cells.

    The controls are sorted once, so that each perturbation's Mann-Whitney U statistics and
    tie corrections come from binary searches (identical to
    ``scipy.stats.mannwhitneyu(method="asymptotic")``, without ranking the controls again for
    every perturbation and every model). :func:`significant_de_genes` is the one-off form.

    Parameters
    ----------
    control
        Log1p-normalised control cells x genes.
    genes
        Gene names (the columns).

    Raises
    ------
    ValueError
        If there are no control cells, or ``genes`` does not name every column.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> test = ControlDE(rng.normal(1, 0.1, (30, 3)), ["a", "b", "c"])
    >>> pert = rng.normal(1, 0.1, (30, 3)); pert[:, 2] += 1
    >>> test.significant_genes(pert)
    ['c']
    """

    def __init__(self, control: np.ndarray, genes: Sequence[str]):
        control = np.asarray(control, dtype=np.float64)
        self.genes = np.asarray(genes, dtype=str)
        if control.ndim != 2 or len(control) == 0:
            raise ValueError(f"DE needs control cells x genes; got shape {control.shape}.")
        if control.shape[1] != len(self.genes):
            raise ValueError(
                f"control has {control.shape[1]} genes but {len(self.genes)} gene names."
            )
        self.n_control, n_genes = control.shape
        with np.errstate(over="ignore"):
            self._geometric_mean = np.expm1(control.mean(axis=0))
        # (gene, value) as complex numbers sort and search lexicographically, exactly
        self._sorted = (np.arange(n_genes) + 1j * np.sort(control, axis=0)).ravel(order="F")
        values, counts = np.unique(self._sorted, return_counts=True)
        self._control_ties = np.bincount(
            values.real.astype(np.int64), weights=counts**3.0 - counts, minlength=n_genes
        )

    def pvalues(self, perturbed: np.ndarray) -> np.ndarray:
        """Two-sided Mann-Whitney U p-values of ``perturbed`` against the controls, per gene.

        The normal approximation with tie and continuity corrections, as
        ``scipy.stats.mannwhitneyu(method="asymptotic")`` and pdex compute it.
        """
        perturbed = self._check(perturbed)
        n1, n2 = len(perturbed), self.n_control
        n_genes = len(self.genes)
        gene = np.arange(n_genes)
        queries = (gene + 1j * perturbed).ravel(order="F")
        below = np.searchsorted(self._sorted, queries, side="left")
        upto = np.searchsorted(self._sorted, queries, side="right")
        u1 = (below + 0.5 * (upto - below) - np.repeat(gene * n2, n1)).reshape(n_genes, n1)
        u1 = u1.sum(axis=1)
        values, counts = np.unique(queries, return_counts=True)
        shared = np.searchsorted(self._sorted, values, "right") - np.searchsorted(
            self._sorted, values, "left"
        )
        union = counts + shared
        extra = (union**3.0 - union) - (shared**3.0 - shared)
        ties = self._control_ties + np.bincount(
            values.real.astype(np.int64), weights=extra, minlength=n_genes
        )
        n = n1 + n2
        u = np.maximum(u1, n1 * n2 - u1)
        spread = np.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (u - n1 * n2 / 2 - 0.5) / spread
        return np.clip(2 * special.ndtr(-z), 0.0, 1.0)

    def significant_genes(
        self, perturbed: np.ndarray, fdr_threshold: float = FDR_THRESHOLD
    ) -> list[str]:
        """The significant DE genes of ``perturbed``, most changed first.

        See :func:`significant_de_genes` for the definition.
        """
        perturbed = self._check(perturbed)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lfc = np.log2(np.expm1(perturbed.mean(axis=0)) / self._geometric_mean)
        lfc[np.isnan(lfc)] = 0.0
        fdr = stats.false_discovery_control(self.pvalues(perturbed))
        # cell-eval stores both as float32 before it filters and ranks
        significant = np.flatnonzero(fdr.astype(np.float32) < fdr_threshold)
        strength = np.abs(lfc.astype(np.float32))[significant]
        return self.genes[significant[np.argsort(-strength, kind="stable")]].tolist()

    def _check(self, perturbed: np.ndarray) -> np.ndarray:
        perturbed = np.asarray(perturbed, dtype=np.float64)
        if perturbed.ndim != 2 or len(perturbed) == 0 or perturbed.shape[1] != len(self.genes):
            raise ValueError(
                f"perturbed must be cells x {len(self.genes)} genes with at least one cell; "
                f"got shape {perturbed.shape}."
            )
        return perturbed


def significant_de_genes(
    perturbed: np.ndarray,
    control: np.ndarray,
    genes: Sequence[str],
    fdr_threshold: float = FDR_THRESHOLD,
) -> list[str]:
    """A perturbation's significant DE genes, ranked, as cell-eval calls them (through pdex).

    Each gene is tested with a two-sided Mann-Whitney U test (normal approximation with tie
    and continuity corrections) of the perturbed against the control cells; Benjamini-Hochberg
    FDRs over the genes; genes with ``FDR < fdr_threshold`` are ranked by
    ``|log2 fold change|``, descending (ties in gene order), where the fold change is that of
    the geometric means ``expm1(mean(log1p x))`` (a gene zero in both groups has fold
    change 0). Many perturbations against the same controls: :class:`ControlDE`.

    Parameters
    ----------
    perturbed, control
        Log1p-normalised cells x genes of the perturbation and of the controls.
    genes
        Gene names (the columns).
    fdr_threshold
        Significance cut.

    Returns
    -------
    The significant genes, most changed first.

    Raises
    ------
    ValueError
        If a group has no cells or the numbers of genes differ.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ctrl = rng.normal(1, 0.1, (30, 3)); pert = rng.normal(1, 0.1, (30, 3))
    >>> pert[:, 2] += 1; pert[:, 0] += 0.3
    >>> significant_de_genes(pert, ctrl, ["a", "b", "c"])
    ['c', 'a']
    """
    return ControlDE(control, genes).significant_genes(perturbed, fdr_threshold)


def de_overlap(
    predicted_genes: Sequence[str], observed_genes: Sequence[str], k: int | None = None
) -> float:
    """Overlap of ranked DE genes, cell-eval's ``overlap_at_N`` (``overlap_at_<k>``).

    With ``k_eff = min(k, len(observed_genes))`` (all observed genes when ``k`` is ``None``),
    the share of the first ``k_eff`` observed genes that are among the first ``k_eff``
    predicted genes; 0 when no gene is observed significant, as cell-eval scores it.

    Parameters
    ----------
    predicted_genes, observed_genes
        Significant DE genes, most changed first (e.g. from :func:`significant_de_genes`).
    k
        How many of the top genes to compare.

    Returns
    -------
    A fraction in ``[0, 1]``.

    Examples
    --------
    >>> de_overlap(["a", "b", "c"], ["b", "c", "d", "e"])
    0.5
    >>> de_overlap(["a", "b", "c", "d"], ["b", "a"])
    1.0
    >>> de_overlap(["b"], [])
    0.0
    """
    observed_genes, predicted_genes = list(observed_genes), list(predicted_genes)
    k_eff = min(k if k else len(observed_genes), len(observed_genes))
    if k_eff == 0:
        return 0.0
    shared = set(observed_genes[:k_eff]) & set(predicted_genes[:k_eff])
    return len(shared) / k_eff


def spearman_brown(scores: pd.DataFrame | pd.Series) -> pd.DataFrame | pd.Series:
    """The Spearman-Brown prophecy ``r' = 2r / (1 + r)`` of a split-half noise ceiling.

    A split-half ceiling compares two halves of the cells, so it measures agreement at half
    the depth of the data; Spearman-Brown predicts the agreement at full depth. As cell-eval
    (``MetricsEvaluator.compute_ceiling``) does, the correction is applied to the metrics of
    :data:`SPEARMAN_BROWN_METRICS` where ``r > 0`` (below, ``2r/(1+r)`` is a pole, not a
    correction) and every other value becomes ``NaN`` (no defensible full-depth ceiling).
    cell-eval corrects the mean over perturbations: pass ``table.mean()`` for its figure.

    Parameters
    ----------
    scores
        A ceiling table (perturbations x metrics), or one value per metric (a Series indexed
        by metric).

    Returns
    -------
    The corrected scores, of the same shape.

    Examples
    --------
    >>> spearman_brown(pd.Series({"pearson_delta": 0.5, "de_overlap": -0.2, "mae": 0.1}))
    pearson_delta    0.666667
    de_overlap            NaN
    mae                   NaN
    dtype: float64
    """
    if isinstance(scores, pd.Series):
        return spearman_brown(scores.to_frame().T).iloc[0].rename(scores.name)
    out = scores.astype(np.float64).copy()
    for column in out.columns:
        r = out[column]
        out[column] = (2 * r / (1 + r)).where(r > 0) if column in SPEARMAN_BROWN_METRICS else np.nan
    return out
