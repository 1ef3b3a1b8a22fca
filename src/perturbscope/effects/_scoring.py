"""Scoring and calibration of held-out predictions: the rules the effect prior chooses by."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.optimize import nnls

if TYPE_CHECKING:
    from ._baselines import Baseline

#: Genes per held-out perturbation on which candidates are scored: its most changed ones.
N_SCORED_GENES = 20


def top_change_scores(predicted: np.ndarray, observed: np.ndarray, n_genes: int = N_SCORED_GENES) -> tuple[float, float]:
    """``(MSE, Pearson)`` of a predicted shift on the ``n_genes`` genes the observed one changes most.

    The Pearson correlation is 0 where the prediction is constant on those genes (no change
    predicted carries no direction).

    Examples
    --------
    >>> top_change_scores(np.array([1.0, 0.0, 0.5]), np.array([2.0, 0.0, 1.0]), n_genes=2)
    (0.625, 1.0)
    """
    top = np.argsort(-np.abs(observed), kind="stable")[:n_genes]  # ties: the first gene
    mse = float(np.mean((predicted[top] - observed[top]) ** 2))
    if np.std(predicted[top]) == 0 or np.std(observed[top]) == 0:
        return round(mse, 12), 0.0
    return round(mse, 12), round(float(np.corrcoef(predicted[top], observed[top])[0, 1]), 12)


def pick(scores: dict, order: Sequence, tolerance: float = 0.02):
    """The option with the best mean Pearson, or, within ``tolerance`` of it, the lowest MSE.

    ``scores`` maps each option to a list of ``(MSE, Pearson)`` pairs; ties go to the earlier
    option in ``order``. The rule mirrors how the benchmark reads a result: direction first
    (Pearson delta), then size (L2).

    Examples
    --------
    >>> pick({"a": [(1.0, 0.50)], "b": [(0.5, 0.49)], "c": [(0.1, 0.2)]}, ["a", "b", "c"])
    'b'
    """
    means = {k: np.mean(np.asarray(v, dtype=float), axis=0) for k, v in scores.items() if len(v) and k in order}
    best = max(m[1] for m in means.values())
    near = [k for k in order if k in means and means[k][1] >= best - tolerance]
    return min(near, key=lambda k: (means[k][0], list(order).index(k)))


def stack_weights(
    predictions: dict[str, np.ndarray], truth: np.ndarray, n_genes: int = N_SCORED_GENES
) -> dict[str, float]:
    """Non-negative least-squares weights of candidate predictions: cross-fitted stacking.

    Breiman's stacked regression: given every candidate's held-out predictions of the same
    held-out shifts, the blend ``sum_k w_k * candidate_k`` with ``w_k >= 0`` that has the lowest
    squared error. It is fitted on each held-out perturbation's ``n_genes`` most changed genes
    (those :func:`top_change_scores` scores), so the blend is chosen where the changes are, and
    the weights may sum to less than 1: a candidate that is right in direction but noisy is
    shrunk towards no change, which lowers the error of its size.

    Parameters
    ----------
    predictions
        ``{candidate: held-out predictions}``, each perturbations x genes, rows matching ``truth``.
    truth
        The held-out observed shifts, perturbations x genes.
    n_genes
        Genes per perturbation the blend is fitted on (its most changed ones).

    Returns
    -------
    ``{candidate: weight}`` in the order of ``predictions``.

    Raises
    ------
    ValueError
        If there are no candidates or no held-out rows, a candidate's shape differs from
        ``truth``'s, or ``n_genes`` is below 1.

    Examples
    --------
    >>> truth = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    >>> w = stack_weights({"good": truth * 2, "zero": np.zeros_like(truth)}, truth, n_genes=3)
    >>> {k: round(v, 6) for k, v in w.items()}
    {'good': 0.5, 'zero': 0.0}
    """
    truth = _checked_stack_input(predictions, truth, n_genes)
    names = list(predictions)
    top = np.argsort(-np.abs(truth), axis=1, kind="stable")[:, :n_genes]
    rows = np.arange(len(truth))[:, None]
    design = np.column_stack([np.asarray(predictions[k])[rows, top].ravel() for k in names])
    target = truth[rows, top].ravel()
    scale = np.linalg.norm(design, axis=0)
    usable = scale > 0
    weights = np.zeros(len(names))
    if usable.any():
        solved, _ = nnls(design[:, usable] / scale[usable], target)
        weights[usable] = solved / scale[usable]
    return {k: float(w) for k, w in zip(names, weights)}


def _checked_stack_input(predictions: dict[str, np.ndarray], truth: np.ndarray, n_genes: int) -> np.ndarray:
    """``truth`` as floats, after the checks :func:`stack_weights` documents."""
    truth = np.asarray(truth, dtype=float)
    if not predictions or truth.ndim != 2 or truth.shape[0] == 0:
        raise ValueError(f"stack_weights needs at least one candidate and held-out rows; got "
                         f"{len(predictions)} candidates and truth of shape {truth.shape}.")
    wrong = {k: np.shape(v) for k, v in predictions.items() if np.shape(v) != truth.shape}
    if wrong:
        raise ValueError(f"candidate predictions must have truth's shape {truth.shape}; got {wrong}.")
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}.")
    return truth


def bagged_stack_weights(
    predictions: dict[str, np.ndarray],
    truth: np.ndarray,
    n_genes: int = N_SCORED_GENES,
    n_bootstrap: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`stack_weights` averaged over bootstrap resamples of the held-out perturbations.

    With a dozen held-out perturbations one NNLS fit swings between near-tied candidates;
    averaging the fits over resamples (bagging) keeps a share for each candidate in proportion
    to how often it wins, which lowers the variance of the blend.

    Parameters
    ----------
    predictions, truth, n_genes
        As for :func:`stack_weights`.
    n_bootstrap
        Resamples; ``0`` is the plain fit on all rows.
    seed
        Seed of the resampling.

    Returns
    -------
    ``{candidate: weight}`` in the order of ``predictions``.

    Examples
    --------
    >>> truth = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    >>> w = bagged_stack_weights({"good": truth * 2, "zero": np.zeros_like(truth)}, truth, n_genes=3)
    >>> {k: round(v, 6) for k, v in w.items()}   # every resample agrees
    {'good': 0.5, 'zero': 0.0}
    """
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}.")
    if n_bootstrap == 0:
        return stack_weights(predictions, truth, n_genes)
    truth = _checked_stack_input(predictions, truth, n_genes)
    arrays = {k: np.asarray(v) for k, v in predictions.items()}
    rng = np.random.default_rng(seed)
    total = dict.fromkeys(predictions, 0.0)
    for _ in range(n_bootstrap):
        rows = rng.integers(0, len(truth), len(truth))
        weights = stack_weights({k: v[rows] for k, v in arrays.items()}, truth[rows], n_genes)
        for k, w in weights.items():
            total[k] += w / n_bootstrap
    return total


#: How :func:`gene_scaled_quantiles` scales each gene's calibration residuals.
INTERVAL_SCALES = ("leave_one_out", "in_sample")


def gene_scaled_quantiles(
    residuals: np.ndarray, levels: Sequence[float], scale: str = "leave_one_out"
) -> dict[float, np.ndarray]:
    """Per-gene half-widths: each gene's residual scale times one pooled conformal quantile.

    With a few dozen held-out perturbations a quantile per gene is too noisy (and, for genes
    that only some perturbations move, too small). Each gene's absolute residuals are divided by
    a root mean square ``sigma_g`` of that gene's residuals; one split-conformal quantile ``q``
    of these scores, pooled over perturbations and genes, gives the half-width ``q * sigma_g``
    (``sigma_g`` of all rows), calibrated on average over perturbation x gene changes.

    A new perturbation's residual is not part of the ``sigma_g`` it is divided by, so a
    calibration residual must not be either: with ``scale="leave_one_out"`` (the default) row
    ``i``'s score uses the root mean square of the gene's *other* rows. ``"in_sample"``
    divides by the root mean square of all rows, the row itself included; no score can then
    exceed ``sqrt(n)`` and the intervals undercover with few rows (about 0.80 instead of 0.95
    with 3 held-out perturbations, 0.92 with 12, on Gaussian residuals;
    ``benchmarks/interval_coverage.py``). It is kept to compare with. The left-out scale is
    floored at ``sigma_g / sqrt(n)``, so no score exceeds ``n``: a gene whose other rows are all
    zero (moved by one held-out perturbation only, as sparse peaks can be) would otherwise get a
    near-infinite score and, through the pooled quantile, widen every gene's interval.

    Parameters
    ----------
    residuals
        Absolute (difficulty-scaled) held-out residuals, perturbations x genes.
    levels
        Coverage levels.
    scale
        ``"leave_one_out"`` or ``"in_sample"`` (see above).

    Returns
    -------
    ``{level: half-width per gene}``.

    Examples
    --------
    >>> r = np.abs(np.random.default_rng(0).normal(size=(200, 3)) * [1.0, 2.0, 0.1])
    >>> widths = gene_scaled_quantiles(r, [0.8])[0.8]
    >>> bool(np.allclose(np.mean(r <= widths), 0.8, atol=0.02))
    True

    Residuals 1, 2, 2 of one gene: ``sigma`` is ``sqrt(3)``; in sample the scores are
    ``(1, 2, 2) / sqrt(3)``, left out ``1 / 2`` and ``2 / sqrt(2.5)`` (twice), and the 0.5
    level takes the 2nd smallest of 3:

    >>> r = np.array([[1.0], [2.0], [2.0]])
    >>> gene_scaled_quantiles(r, [0.5], scale="in_sample")[0.5], gene_scaled_quantiles(r, [0.5])[0.5]
    (array([2.]), array([2.19089023]))
    """
    if scale not in INTERVAL_SCALES:
        raise ValueError(f"scale must be one of {list(INTERVAL_SCALES)}, got {scale!r}.")
    residuals = np.asarray(residuals, dtype=np.float64)
    n = len(residuals)
    squares = np.sum(residuals**2, axis=0)
    sigma = np.sqrt(squares / n)
    floor = 1e-3 * float(np.median(sigma[sigma > 0])) if (sigma > 0).any() else 1e-12
    sigma = np.maximum(sigma, floor)
    if scale == "leave_one_out" and n > 1:
        others = np.sqrt(np.clip(squares[None] - residuals**2, 0, None) / (n - 1))
        # a gene moved by one row only has no other residual to scale it: floored at sigma / sqrt(n),
        # every score is at most n, so such genes cannot widen every other gene's interval
        scores = residuals / np.maximum(others, np.maximum(sigma / np.sqrt(n), floor))
    else:
        scores = residuals / sigma
    scores = scores.ravel()[:, None]
    return {float(lv): conformal_quantile(scores, lv)[0] * sigma for lv in levels}


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Split-conformal quantile per column: the ``ceil((n + 1) level)``-th smallest score.

    With fewer than ``1 / (1 - level) - 1`` scores the rank exceeds ``n`` and the largest score
    is used (the interval is then slightly too narrow, not infinite).

    Examples
    --------
    >>> conformal_quantile(np.arange(1.0, 10.0)[:, None], 0.8).tolist()
    [8.0]
    """
    n = len(scores)
    rank = min(n, math.ceil((n + 1) * level))
    return np.sort(scores, axis=0)[rank - 1]


def random_folds(items: Sequence[str], n_folds: int, rng: np.random.Generator) -> list[list[str]]:
    """Random folds of ``items`` (at most ``len(items)`` of them, none empty).

    Examples
    --------
    >>> random_folds(["a", "b", "c"], 2, np.random.default_rng(0))
    [['c', 'b'], ['a']]
    """
    if not items:
        return []
    order = list(rng.permutation(len(items)))
    k = min(n_folds, len(items))
    return [[items[i] for i in order[f::k]] for f in range(k)]


def held_out_table(
    predictions: dict[str, np.ndarray], truth: np.ndarray, queries: Sequence[tuple[str, str]], genes: Sequence[str]
) -> pd.DataFrame:
    """Every candidate's held-out predictions, the blend's and the observed shifts, in one frame.

    Parameters
    ----------
    predictions
        ``{estimator: held-out predictions}``, each queries x genes (the blend under
        ``"stacked"``).
    truth
        The held-out observed shifts, queries x genes.
    queries
        ``(perturbation, context)`` of each row.
    genes
        Column names.

    Returns
    -------
    A DataFrame, genes as columns, indexed by (``estimator``, ``perturbation``, ``context``);
    the observed shifts are estimator ``"observed"``.

    Examples
    --------
    >>> table = held_out_table({"a": np.ones((1, 2))}, np.zeros((1, 2)), [("G1", "all")], ["x", "y"])
    >>> table.index.tolist()
    [('a', 'G1', 'all'), ('observed', 'G1', 'all')]
    """
    blocks = {**predictions, "observed": truth}
    index = pd.MultiIndex.from_tuples(
        [(name, p, c) for name in blocks for p, c in queries], names=["estimator", "perturbation", "context"]
    )
    return pd.DataFrame(np.vstack([np.asarray(v, dtype=float) for v in blocks.values()]), index=index,
                        columns=pd.Index(list(genes)))


def describe_blend(weights: dict[str, float]) -> str:
    """``"linear"`` for a lone estimator at weight 1, else ``"0.61 linear + 0.13 perturbed_mean"``.

    Examples
    --------
    >>> describe_blend({"linear": 0.614, "perturbed_mean": 0.13}), describe_blend({"additive": 1.0})
    ('0.61 linear + 0.13 perturbed_mean', 'additive')
    """
    lone = len(weights) == 1 and next(iter(weights.values())) == 1.0
    return next(iter(weights)) if lone else " + ".join(f"{w:.2f} {n}" for n, w in weights.items()) or "no_change"


def dominant_estimator(weights: dict[str, float]) -> str:
    """The estimator with the largest weight; ``"no_change"`` when every weight is 0.

    Examples
    --------
    >>> dominant_estimator({"linear": 0.2, "embedding_nn": 0.5}), dominant_estimator({"linear": 0.0})
    ('embedding_nn', 'no_change')
    """
    positive = {name: w for name, w in weights.items() if w > 0}
    return max(positive, key=positive.get) if positive else "no_change"


def difficulty_scale(gene_embeddings: pd.DataFrame, seen: Sequence[str], genes: Sequence[str]) -> float:
    """``0.5 +`` the cosine distance of the least familiar of ``genes`` to its nearest ``seen`` gene.

    Genes among ``seen`` (or when none of ``seen`` has an embedding row) give 1; a gene without
    an embedding row counts as distance 2. Residuals divided by it are normalised conformal
    scores: a gene far from every training gene gets a wider interval.

    Examples
    --------
    >>> emb = pd.DataFrame([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], index=["A", "B", "C"])
    >>> round(difficulty_scale(emb, ["A"], ["B"]), 6), round(difficulty_scale(emb, ["A"], ["C"]), 6)
    (1.5, 0.792893)
    """
    reference = gene_embeddings.reindex(list(seen)).dropna()
    unseen = [g for g in genes if g not in set(reference.index)]
    if reference.empty or not unseen:
        return 1.0
    distances = []
    for gene in unseen:
        if gene not in gene_embeddings.index:
            distances.append(2.0)
            continue
        query = gene_embeddings.loc[gene].to_numpy()
        norms = np.linalg.norm(reference.to_numpy(), axis=1) * np.linalg.norm(query)
        cosine = reference.to_numpy() @ query / np.where(norms > 0, norms, 1.0)
        distances.append(1.0 - float(cosine.max()))
    return 0.5 + max(distances)


def candidate_shift(estimators: dict[str, Baseline], name: str, kind: str, perturbation: str, context: str) -> np.ndarray:
    """Estimator ``name``'s shift for a ``kind`` query, as cross-fitting scored it.

    For ``"unseen_context"``, whose folds hold contexts out: the other contexts' perturbed mean.
    """
    if name == "perturbed_mean" and kind == "unseen_context":
        shifts = estimators[name].shifts_
        others = shifts[shifts.index.get_level_values("context") != context]
        return (others if len(others) else shifts).mean(axis=0).to_numpy()
    return predict_one_shift(estimators[name], perturbation, context)


def predict_one_shift(estimator: Baseline, perturbation: str, context: str) -> np.ndarray:
    """One fitted estimator's shift of ``perturbation`` in ``context`` (its warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        context_arg = None if estimator.context_key_ is None else context
        return estimator.predict_shifts([perturbation], context_arg).to_numpy()[0]
