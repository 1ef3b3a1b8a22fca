"""The split-half noise ceiling and the mode-collapse figure.

Noise ceiling: the real cells of each perturbation are split at random into two halves, one
half plays the prediction and the other the truth, and every metric of :func:`evaluate` is
computed: how well a replicate of the same perturbation, at half the depth, agrees with the
truth, the noise a prediction is read against. It is not an upper bound for a model that
pools many perturbations: where single perturbations are weak or have few cells, the
perturbed mean (estimated from every training perturbation) can agree with the truth better
than a half of the perturbation's own cells does. The top DE genes are chosen from the truth
half alone, as a model's are chosen from the truth alone: genes chosen from both halves are
those where the two halves drifted together by chance, and on a perturbation without any
effect they gave a Pearson delta of about 0.7 instead of about 0. With half the cells on each side the
ceiling is pessimistic; ``spearman_brown=True`` applies cell-eval's Spearman-Brown step
(:func:`~perturbscope.benchmark.spearman_brown`), which predicts the full-depth agreement of
the metrics where that is defensible. The default stays the raw split-half figure, the one
RESULTS.md reports, so that every metric has a ceiling and old tables stay comparable.

Mode collapse: a model that predicts nearly the same change for every perturbation has a
mean pairwise correlation of predicted changes near 1. It is reported beside the same figure
for the observed changes, which are themselves correlated (a shared response to any
perturbation).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ..data import check_no_missing_labels
from ._cell_eval_metrics import spearman_brown as _spearman_brown
from ._metrics import evaluate, prepare_reference


def noise_ceiling(
    observed: ad.AnnData,
    control: ad.AnnData,
    perturbation_key: str,
    de_genes: dict[str, list[str]] | None = None,
    perturbed_centroid: np.ndarray | None = None,
    seed: int = 0,
    spearman_brown: bool = False,
    distributional: bool = True,
    **kwargs,
) -> pd.DataFrame:
    """Score one random half of each perturbation's cells against the other half.

    Parameters
    ----------
    observed
        Log1p-normalised held-out perturbed cells (in ``X``); each perturbation needs at least
        4 cells.
    control
        Log1p-normalised control cells (in ``X``); the same control mean serves both halves.
    perturbation_key
        ``obs`` column of perturbation labels.
    de_genes
        DE genes to score on; by default each perturbation's top DE genes in the truth half
        (genes chosen with the prediction half's cells would flatter the ceiling).
    perturbed_centroid
        Systema's reference, as for the models.
    seed
        Seed of the halving.
    spearman_brown
        Correct each perturbation's split-half score to full depth with ``2r / (1 + r)`` where
        cell-eval does (``pearson_delta``, ``discrimination_score``, ``de_overlap`` with
        ``r > 0``; every other value ``NaN``). cell-eval corrects the mean over perturbations
        instead: for its figure keep the default and pass ``table.mean()`` to
        :func:`~perturbscope.benchmark.spearman_brown`.
    distributional
        Also score the distributional metrics, as :func:`evaluate` does (``NaN`` without).
    **kwargs
        Passed to :func:`prepare_reference` (``n_de``, ``n_top_expressed``, ``n_pcs``).

    Returns
    -------
    A DataFrame (perturbations x metrics), like :func:`evaluate`.

    Raises
    ------
    ValueError
        If a perturbation has fewer than 4 cells.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> obs = ad.AnnData(rng.random((20, 5)), obs=pd.DataFrame(
    ...     {"p": ["a"] * 10 + ["b"] * 10}, index=[str(i) for i in range(20)]))
    >>> ctrl = ad.AnnData(rng.random((10, 5)))
    >>> table = noise_ceiling(obs, ctrl, "p", n_de=3, n_pcs=2)
    >>> table.index.tolist()
    ['a', 'b']
    >>> {"pearson_delta_top_de", "l2_top_expressed", "energy_distance"} <= set(table.columns)
    True
    """
    if perturbation_key not in observed.obs.columns:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} not in observed.obs; columns are "
            f"{list(observed.obs.columns)}."
        )
    check_no_missing_labels(observed.obs, perturbation_key=perturbation_key)
    labels = observed.obs[perturbation_key].astype(str)
    counts = labels.value_counts()
    if (counts < 4).any():
        raise ValueError(
            f"the noise ceiling needs at least 4 cells per perturbation; "
            f"{counts[counts < 4].to_dict()} have fewer."
        )
    rng = np.random.default_rng(seed)
    first = np.zeros(observed.n_obs, dtype=bool)
    for p in counts.index:
        where = np.flatnonzero((labels == p).to_numpy())
        first[rng.choice(where, len(where) // 2, replace=False)] = True
    half_a, half_b = observed[first], observed[~first]
    reference = prepare_reference(
        half_b,
        control,
        perturbation_key,
        de_genes=de_genes,
        perturbed_centroid=perturbed_centroid,
        seed=seed,
        **kwargs,
    )
    table = evaluate(half_a, reference, perturbation_key=perturbation_key, layer=None, seed=seed,
                     distributional=distributional)
    return _spearman_brown(table) if spearman_brown else table


def delta_correlation(profiles: pd.DataFrame, control_mean: np.ndarray) -> float:
    """Mean pairwise Pearson correlation of the changes from control across perturbations.

    Parameters
    ----------
    profiles
        Mean profiles (perturbations x genes).
    control_mean
        The control profile the changes are taken from.

    Returns
    -------
    The mean of the off-diagonal correlations; ``NaN`` for fewer than two perturbations.
    Changes that are constant across genes (e.g. no change) count as uncorrelated.

    Examples
    --------
    >>> import pandas as pd, numpy as np
    >>> profiles = pd.DataFrame([[1.0, 2, 3], [2, 4, 6], [3, 2, 1]])
    >>> round(delta_correlation(profiles, np.zeros(3)), 6)
    -0.333333
    """
    deltas = profiles.to_numpy(dtype=np.float64) - np.asarray(control_mean)
    if len(deltas) < 2:
        return float("nan")
    centred = deltas - deltas.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    # float32 rounding of a no-change prediction is not a direction
    constant = centred.std(axis=1) < 1e-6
    scale = np.where(constant, np.inf, norms)
    unit = centred / scale[:, None]
    corr = unit @ unit.T
    off = ~np.eye(len(deltas), dtype=bool)
    return float(corr[off].mean())


def mode_collapse(
    predicted_means: pd.DataFrame, observed_means: pd.DataFrame, control_mean: np.ndarray
) -> dict[str, float]:
    """The mode-collapse figure: pairwise correlation of predicted beside observed changes.

    Parameters
    ----------
    predicted_means, observed_means
        Mean profiles (perturbations x genes) of the same perturbations.
    control_mean
        The control profile.

    Returns
    -------
    ``{"predicted": ..., "observed": ...}`` from :func:`delta_correlation`; a predicted figure
    well above the observed one flags collapse onto a common change.

    Examples
    --------
    >>> import pandas as pd, numpy as np
    >>> obs = pd.DataFrame([[1.0, 0, 0], [0, 1, 0]])
    >>> pred = pd.DataFrame([[1.0, 0.5, 0], [1, 0.6, 0]])
    >>> {k: round(v, 2) for k, v in mode_collapse(pred, obs, np.zeros(3)).items()}
    {'predicted': 0.99, 'observed': -0.5}
    """
    return {
        "predicted": delta_correlation(predicted_means, control_mean),
        "observed": delta_correlation(observed_means, control_mean),
    }
