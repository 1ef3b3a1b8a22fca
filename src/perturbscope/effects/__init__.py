"""Perturbation-effect estimators: the baselines, and the cross-fitted effect prior built on them.

Every estimator predicts a perturbation's mean shift from its context's controls in
log1p-normalised space. The benchmark scores them as baselines; :class:`~perturbscope.ScopeVI`
uses the same estimators, chosen by cross-fitting inside its training data
(:class:`EffectPrior`), as the prior its learned correction starts from.
"""

from ._baselines import (
    AdditiveBaseline,
    Baseline,
    MatchingMeanBaseline,
    NoChangeBaseline,
    PerturbedMeanBaseline,
)
from ._embedding_baselines import EmbeddingNeighborsBaseline, LinearBaseline
from ._interaction import InteractionBaseline
from ._prior import CANDIDATES, KINDS, EffectPrior
from ._scoring import (
    bagged_stack_weights,
    conformal_quantile,
    gene_scaled_quantiles,
    pick,
    stack_weights,
    top_change_scores,
)

__all__ = [
    "CANDIDATES",
    "KINDS",
    "EffectPrior",
    "bagged_stack_weights",
    "conformal_quantile",
    "gene_scaled_quantiles",
    "pick",
    "stack_weights",
    "top_change_scores",
    "AdditiveBaseline",
    "Baseline",
    "EmbeddingNeighborsBaseline",
    "InteractionBaseline",
    "LinearBaseline",
    "MatchingMeanBaseline",
    "NoChangeBaseline",
    "PerturbedMeanBaseline",
]
