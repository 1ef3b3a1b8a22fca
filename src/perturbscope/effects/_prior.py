"""The effect prior: the baselines' estimators, chosen per kind of query by cross-fitting.

A query is a perturbation in a context. Its *kind* decides which estimators can answer it:

* ``"seen"``: measured in this context in training (at least :data:`FEW_SHOT_CELLS` cells); the
  observed shift.
* ``"few_shot"``: measured in this context, but in fewer cells; candidates are the observed
  shift, the transfer from other contexts, the context's perturbed mean and the mean of the
  observed shift and the perturbed mean. They are cross-fitted by drawing as many cells from
  well-measured training groups and scoring against the mean of those groups' other cells.
* ``"combination"``: several genes, each measured alone in training; candidates are the sum of
  the single shifts (``additive``), that sum scaled by an interaction coefficient learned from
  the training doubles (``interaction``, :class:`InteractionBaseline`; a candidate only where
  every cross-fitting fold had enough doubles to fit it), their mean, the linear model and the
  perturbed mean.
* ``"unseen_gene"``: a gene never perturbed in training; candidates are the linear model on
  gene embeddings, embedding neighbours, the perturbed mean and no change.
* ``"partial_combination"``: several genes, at least one never perturbed alone in training (the
  ``seen1``/``seen0`` doubles). Candidates are the Systema matching mean (the mean of the genes
  seen as singles, else the perturbed mean), the gene-by-gene sum (each gene by its own kind,
  an unseen one by the ``"unseen_gene"`` blend), the perturbed mean and no change. They are
  cross-fitted on the training combinations that hold a held-out gene; without such
  combinations the matching mean answers, since summing unvalidated unseen-gene predictions is
  an extrapolation no training data has checked.
* ``"unseen_context"``: measured in training, but in other contexts only; candidates are the
  transfer (its mean shift over other contexts), the perturbed mean and no change.

:meth:`EffectPrior.fit` predicts the training perturbations of every kind while they are held
out (folds of genes, of combinations, or one context at a time), refitting every candidate
without them: cross-fitting inside the training data, so no test perturbation is ever read.
From these held-out predictions it fits, per kind, a non-negative blend of the candidates
(stacking, :func:`stack_weights` on every gene of the held-out shifts, averaged over bootstrap
resamples): the weights say how much of each estimator to trust, and
their sum may fall below 1, shrinking a noisy estimator towards no change. The held-out
residuals of the blend give split-conformal intervals per gene. For unseen genes a residual is divided by a
difficulty scale, ``0.5 + (1 - cosine similarity to the nearest training gene)``, so a gene far
from every training gene gets a wider interval (normalised conformal prediction), and each
gene's residuals by their own scale, so that one quantile pooled over genes calibrates them all
(:func:`gene_scaled_quantiles`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data import ALL_CONTEXTS, canonical_labels, canonical_means, parse_perturbation
from ._baselines import (
    AdditiveBaseline,
    Baseline,
    MatchingMeanBaseline,
    NoChangeBaseline,
    PerturbedMeanBaseline,
)
from ._embedding_baselines import EmbeddingNeighborsBaseline, LinearBaseline
from ._few_shot import FEW_SHOT_CELLS, MIN_HELD_OUT, FewShotMixin  # noqa: F401 (FEW_SHOT_CELLS: documented here)
from ._interaction import InteractionBaseline
from ._prior_state import PriorStateMixin
from ._scoring import (
    INTERVAL_SCALES,
    bagged_stack_weights,
    candidate_shift,
    describe_blend,
    difficulty_scale,
    dominant_estimator,
    gene_scaled_quantiles,
    held_out_table,
    predict_one_shift,
    random_folds,
    top_change_scores,
)

KINDS = ("seen", "few_shot", "combination", "unseen_gene", "partial_combination", "unseen_context")
#: Candidate estimators per kind, in order of preference on ties; the first is the fallback
#: when a kind cannot be cross-fitted (too few training perturbations of that kind).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "seen": ("observed",),
    "few_shot": ("observed", "transfer", "perturbed_mean", "observed_perturbed_mean"),
    "combination": ("additive", "interaction", "matching_mean", "linear", "perturbed_mean"),
    "unseen_gene": ("perturbed_mean", "linear", "embedding_nn", "no_change"),
    "partial_combination": ("matching_mean", "gene_by_gene", "perturbed_mean", "no_change"),
    "unseen_context": ("matching_mean", "perturbed_mean", "no_change"),
}


def make_estimator(name: str, gene_embeddings: pd.DataFrame | None) -> Baseline | None:
    """A fresh estimator by name; ``None`` when it needs embeddings that are not there.

    Examples
    --------
    >>> type(make_estimator("additive", None)).__name__
    'AdditiveBaseline'
    """
    plain = {"observed": AdditiveBaseline, "additive": AdditiveBaseline, "interaction": InteractionBaseline,
             "matching_mean": MatchingMeanBaseline, "perturbed_mean": PerturbedMeanBaseline,
             "no_change": NoChangeBaseline}
    if name in plain:
        return plain[name]()
    if name == "linear":
        return LinearBaseline(gene_embeddings, n_components=10, ridge=0.1)
    if name == "embedding_nn":
        return None if gene_embeddings is None else EmbeddingNeighborsBaseline(gene_embeddings, 0.1)
    raise ValueError(f"unknown estimator {name!r}; choose from {sorted(set(sum(CANDIDATES.values(), ())))}.")


class EffectPrior(FewShotMixin, PriorStateMixin):
    """Mean shifts of perturbations from the baselines' estimators, chosen by cross-fitting.

    See the module docstring for the kinds of query and their candidates.

    Parameters
    ----------
    gene_embeddings
        Genes x dimensions for the embedding-based candidates; ``None`` leaves them out (the
        linear model then uses PCA rows of measured genes).
    n_folds
        Folds of held-out genes or combinations (at most one per perturbation).
    n_bootstrap
        Bootstrap resamples of the held-out perturbations over which the stacking weights are
        averaged (:func:`bagged_stack_weights`); ``0`` fits them once.
    levels
        Coverage levels of the intervals.
    seed
        Seed of the fold assignment.
    keep_crossfit_predictions
        Keep the held-out predictions behind the cross-fitted scores (``crossfit_predictions_``;
        candidates x held-out queries x genes per kind, so off by default).
    interval_scale
        How each gene's held-out residuals are scaled before the pooled conformal quantile:
        ``"leave_one_out"`` (each residual by the gene's other residuals) or ``"in_sample"``
        (the rule before 2026-12, which undercovers with few held-out perturbations); see
        :func:`gene_scaled_quantiles`.

    Attributes
    ----------
    weights_
        ``{kind: {estimator name: weight}}``, the cross-fitted blend that answers each kind.
    choices_
        ``{kind: estimator name}``: the estimator with the largest weight (``"no_change"`` when
        every weight is 0).
    crossfit_scores_
        Mean held-out Pearson and MSE (see :func:`top_change_scores`) per kind, for each
        candidate and for the blend (``"stacked"``).
    crossfit_predictions_
        ``{kind: DataFrame}`` with ``keep_crossfit_predictions``: the held-out predictions behind
        ``crossfit_scores_``, indexed by (``estimator``, ``perturbation``, ``context``), the blend
        as ``"stacked"`` and the observed shifts as ``"observed"``; only for kinds cross-fitted
        here (not saved with a model). The blend's rows use weights fitted on these same
        predictions, so its scores are in-sample (optimistic), unlike the candidates'.
    n_held_out_
        Held-out (perturbation, context) pairs per kind.
    quantiles_
        ``{kind: {level: per-gene half-width at scale 1}}``.
    added_groups_
        (perturbation, context) groups added by :meth:`add_groups`: ``"few_shot"`` queries.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=10, n_combinations=8,
    ...                                  n_cell_types=1, n_cells_per_condition=40, seed=1)
    >>> prior = EffectPrior(emb).fit(adata, "perturbation")
    >>> prior.choices_["unseen_gene"], round(prior.weights_["unseen_gene"]["linear"], 2)
    ('linear', 0.68)
    >>> {k: round(w, 2) for k, w in prior.weights_["combination"].items()}  # the doubles are not additive
    {'additive': 0.26, 'matching_mean': 0.13, 'linear': 0.53, 'perturbed_mean': 0.31}
    """

    def __init__(
        self,
        gene_embeddings: pd.DataFrame | None = None,
        n_folds: int = 10,
        levels: Sequence[float] = (0.8, 0.95),
        seed: int = 0,
        n_bootstrap: int = 50,
        keep_crossfit_predictions: bool = False,
        interval_scale: str = "leave_one_out",
    ):
        if not isinstance(n_folds, int) or n_folds < 2:
            raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}.")
        bad = [lv for lv in levels if not 0 < lv < 1]
        if bad:
            raise ValueError(f"levels must lie strictly between 0 and 1, got {bad}.")
        if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if not isinstance(keep_crossfit_predictions, bool | np.bool_):
            raise ValueError(f"keep_crossfit_predictions must be True or False, got {keep_crossfit_predictions!r}.")
        if interval_scale not in INTERVAL_SCALES:
            raise ValueError(f"interval_scale must be one of {list(INTERVAL_SCALES)}, got {interval_scale!r}.")
        self.gene_embeddings = gene_embeddings
        self.n_folds = n_folds
        self.n_bootstrap = n_bootstrap
        self.levels = tuple(float(lv) for lv in levels)
        self.seed = int(seed)
        self.keep_crossfit_predictions = bool(keep_crossfit_predictions)
        self.interval_scale = interval_scale

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        adata,
        perturbation_key: str,
        control_value: str = "control",
        context_key: str | None = None,
        layer: str | None = None,
        data_scale: str = "counts",
        delimiter: str = "+",
    ) -> EffectPrior:
        """Compute the training means, then :meth:`fit_means`.

        Parameters
        ----------
        adata
            Training cells (not modified).
        perturbation_key, control_value, context_key, layer, data_scale, delimiter
            As for :meth:`perturbscope.effects.Baseline.fit`.

        Returns
        -------
        ``self``.
        """
        probe = AdditiveBaseline().fit(adata, perturbation_key, control_value, context_key, layer, data_scale, delimiter)
        if probe.shifts_.empty:
            raise ValueError(f"adata has no perturbed cells in {perturbation_key!r} (only controls, "
                             f"{control_value!r}); the prior needs measured perturbations to fit on.")
        labels = canonical_labels(adata.obs[perturbation_key], control_value, delimiter)
        contexts = (np.full(adata.n_obs, ALL_CONTEXTS)
                    if context_key is None else adata.obs[context_key].astype(str).to_numpy())
        counts = pd.Series(1, index=pd.MultiIndex.from_arrays([labels, contexts], names=["perturbation", "context"]))
        counts = counts.groupby(level=[0, 1]).size()
        self.fit_means(probe.means_, control_value, context_key, delimiter, counts=counts)
        return self.fit_few_shot(adata, labels, contexts, layer, data_scale)

    def fit_means(
        self,
        means: pd.DataFrame,
        control_value: str = "control",
        context_key: str | None = None,
        delimiter: str = "+",
        choices: dict[str, str] | None = None,
        counts: pd.Series | None = None,
        weights: dict[str, dict[str, float]] | None = None,
    ) -> EffectPrior:
        """Fit from the training group means; cross-fit unless ``weights`` or ``choices`` are given.

        Parameters
        ----------
        means
            log1p-normalised pseudobulk, ``MultiIndex`` (``perturbation``, ``context``), controls
            included.
        control_value, context_key, delimiter
            As for :meth:`fit`.
        choices
            ``{kind: estimator}`` to use alone (weight 1), as they are (no cross-fitting, no
            intervals).
        counts
            Cells per group (same index as ``means``); groups below :data:`FEW_SHOT_CELLS` are
            ``"few_shot"`` queries. ``None`` treats every measured group as well measured.
        weights
            ``{kind: {estimator: weight}}`` to use as they are (see :attr:`weights_`); they take
            precedence over ``choices``.

        Returns
        -------
        ``self``.
        """
        means, counts = canonical_means(means, counts, control_value, delimiter)  # saved before canonical labels
        self.means_, self.counts_ = means, counts
        self.added_groups_ = set()  # a refit starts afresh (add_groups and from_state set their own)
        self.control_value_, self.context_key_, self.delimiter_ = control_value, context_key, delimiter
        given = weights if weights is not None else (
            None if choices is None else {kind: {name: 1.0} for kind, name in choices.items()})
        self.estimators_ = self._fit_estimators(means, self._names(given))
        missing = sorted(set(self._names(given)) - set(self.estimators_))
        if given is not None and missing:
            raise ValueError(f"the given blends use {missing}, which cannot be fitted here"
                             + (" without gene_embeddings" if self.gene_embeddings is None else "")
                             + "; pass the gene embeddings the prior was fitted with.")
        self.shifts_ = self.estimators_["additive"].shifts_
        # what kind() looks up for every query, computed once per fit rather than per query
        self._seen = set(self.shifts_.index.get_level_values("perturbation"))
        self._single_genes = {self._genes(p)[0] for p in self._seen if len(self._genes(p)) == 1}
        if given is not None:
            self.weights_ = {kind: dict(w) for kind, w in given.items()}
            self.crossfit_scores_, self.n_held_out_, self.quantiles_, self.crossfit_predictions_ = None, {}, {}, {}
            return self
        residuals = self._crossfit(means)
        self.crossfit_scores_ = pd.DataFrame(index=pd.Index([], name="kind"), dtype=float)
        self.weights_ = {"seen": {"observed": 1.0}}
        self.n_held_out_, self.quantiles_, self.crossfit_predictions_ = {}, {}, {}
        # last: its gene-by-gene candidate answers genes by the unseen-gene and unseen-context blends
        for kind in [k for k in KINDS[1:] if k != "partial_combination"] + ["partial_combination"]:
            if kind == "partial_combination":
                residuals[kind] = self._score_folds(kind, self._gene_folds(means, partial=True))
            self._choose(kind, residuals.get(kind, {}))
        return self

    @property
    def choices_(self) -> dict[str, str]:
        """``{kind: estimator}``: the largest part of each kind's blend (see :attr:`weights_`)."""
        return {kind: dominant_estimator(weights) for kind, weights in self.weights_.items()}

    def _choose(self, kind: str, per: dict) -> None:
        """Stack the candidates on their held-out predictions and calibrate the blend's intervals."""
        blend = self._stacked_blend(kind, per)
        self.n_held_out_[kind] = blend["n_held_out"]
        self.weights_[kind] = blend["weights"]
        if blend["quantiles"] is None:
            return
        if blend["held_out"] is not None:  # built only with keep_crossfit_predictions
            self.crossfit_predictions_[kind] = blend["held_out"]
        for column, value in blend["scores"].items():
            self.crossfit_scores_.loc[kind, column] = value
        self.quantiles_[kind] = blend["quantiles"]

    def _stacked_blend(self, kind: str, per: dict) -> dict:
        """``{"weights", "n_held_out", "scores", "quantiles", "held_out"}`` of ``kind``'s blend; changes nothing.

        With fewer than :data:`MIN_HELD_OUT` held-out queries the kind's first candidate
        answers alone, without scores or intervals (``None``).
        """
        n = len(next(iter(per.values()))[0]) if per else 0
        if n < MIN_HELD_OUT:
            return {"weights": {self._available(kind)[0]: 1.0}, "n_held_out": n, "scores": None, "quantiles": None,
                    "held_out": None}
        names = [name for name in self._available(kind) if name in per]
        truth = next(iter(per.values()))[3]
        predictions = {name: truth - per[name][1] for name in names}
        weights = bagged_stack_weights(predictions, truth, truth.shape[1], self.n_bootstrap, self.seed)
        stacked = sum(w * predictions[name] for name, w in weights.items())
        rows = {**{name: per[name][0] for name in names},
                "stacked": [top_change_scores(p, t) for p, t in zip(stacked, truth)]}
        scores = {}
        for name, errors in rows.items():
            mse, pearson = np.mean(np.asarray(errors, dtype=float), axis=0)
            scores[f"{name} (pearson)"], scores[f"{name} (mse)"] = float(pearson), float(mse)
        scale = per[names[0]][2]
        return {"weights": {name: w for name, w in weights.items() if w > 0}, "n_held_out": n, "scores": scores,
                "quantiles": gene_scaled_quantiles(np.abs(truth - stacked) / scale[:, None], self.levels,
                                                   self.interval_scale),
                "held_out": None if not self.keep_crossfit_predictions else held_out_table(
                    {**predictions, "stacked": stacked}, truth, per[names[0]][4], self.means_.columns)}

    def _names(self, weights: dict[str, dict[str, float]] | None) -> list[str]:
        """The estimators to fit for ``weights`` (every candidate when ``None``)."""
        if not weights:
            return self._estimator_names(sum(CANDIDATES.values(), ()), ())
        used = {name for w in weights.values() for name in w}
        return self._estimator_names(used, self._single_blends(weights))

    @staticmethod
    def _single_blends(weights: dict[str, dict[str, float]]) -> tuple[dict[str, float], ...]:
        """The blends that answer a gene of a ``"gene_by_gene"`` sum measured nowhere or elsewhere."""
        return weights.get("unseen_gene", {}), weights.get("unseen_context", {})

    def _available(self, kind: str) -> list[str]:
        return [n for n in CANDIDATES[kind] if n != "embedding_nn" or self.gene_embeddings is not None]

    def _fit_estimators(self, means: pd.DataFrame, names: Sequence[str]) -> dict[str, Baseline]:
        fitted = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fallbacks are expected here
            for name in names:
                estimator = make_estimator(name, self.gene_embeddings)
                if estimator is None:
                    continue
                try:
                    fitted[name] = estimator.fit_means(means, "perturbation", self.control_value_,
                                                       self.context_key_, self.delimiter_)
                except ValueError:  # e.g. no training perturbation has an embedding row
                    continue
        return fitted

    # ------------------------------------------------------------------ cross-fitting
    def _genes(self, perturbation: str) -> tuple[str, ...]:
        return parse_perturbation(perturbation, self.control_value_, self.delimiter_)

    def _crossfit(self, means: pd.DataFrame) -> dict[str, dict[str, tuple]]:
        """``{kind: {candidate: (errors, residuals, scales, truths)}}`` over held-out training queries."""
        rng = np.random.default_rng(self.seed + 1)
        rows = self.shifts_.index
        perts = rows.get_level_values("perturbation")
        single_genes = {self._genes(p)[0] for p in perts if len(self._genes(p)) == 1}
        combos = sorted({p for p in perts if len(self._genes(p)) > 1 and set(self._genes(p)) <= single_genes})
        folds: dict[str, list[tuple[pd.DataFrame, list[tuple[str, str]]]]] = {}
        folds["unseen_gene"] = self._gene_folds(means, partial=False)
        folds["combination"] = [
            (self._drop(means, lambda p, c, fold=set(fold): p in fold), [(p, c) for p, c in rows if p in fold])
            for fold in random_folds(combos, self.n_folds, rng)
        ]
        contexts = sorted(set(rows.get_level_values("context")))
        folds["unseen_context"] = [] if len(contexts) < 2 else [
            (self._drop(means, lambda p, c, held=held: c == held),
             [(p, c) for p, c in rows if c == held and (perts[rows.get_level_values("context") != held] == p).any()])
            for held in contexts
        ]
        return {kind: self._score_folds(kind, kind_folds) for kind, kind_folds in folds.items()}

    def _gene_folds(self, means: pd.DataFrame, partial: bool) -> list[tuple[pd.DataFrame, list[tuple[str, str]]]]:
        """Folds of single genes left out with every perturbation that holds them.

        The held-out queries are the fold's singles, or (``partial``) the training combinations
        that hold a fold gene. The same seed gives both the same folds.
        """
        rng = np.random.default_rng(self.seed)
        rows = self.shifts_.index
        singles = sorted({p for p in rows.get_level_values("perturbation") if len(self._genes(p)) == 1})
        out = []
        for fold in map(set, random_folds(singles, self.n_folds, rng)):
            def holds_fold_gene(p, c=None, fold=fold):
                return bool(fold & set(self._genes(p)))
            if partial:
                held = [(p, c) for p, c in rows if len(self._genes(p)) > 1 and holds_fold_gene(p)]
            else:
                held = [(p, c) for p, c in rows if p in fold]
            out.append((self._drop(means, holds_fold_gene), held))
        return out

    def _drop(self, means: pd.DataFrame, leave_out) -> pd.DataFrame:
        keep = [p == self.control_value_ or not leave_out(p, c) for p, c in means.index]
        return means[np.asarray(keep)]

    def _score_folds(self, kind: str, folds) -> dict[str, tuple[list, np.ndarray, np.ndarray, np.ndarray, list]]:
        out: dict[str, tuple[list, list, list, list, list]] = {}
        # fell back in a fold (the interaction estimator with too few doubles) or could not be fitted
        # there (an embedding estimator when no training gene of the fold has an embedding row)
        unvalidated = set()
        for reduced, held in folds:
            if not held or reduced.index.get_level_values("perturbation").nunique() < 2:
                continue
            blends = self._single_blends(self.weights_) if kind == "partial_combination" else ()
            fitted = self._fit_estimators(reduced, self._estimator_names(self._available(kind), blends))
            reference = fitted.get("additive") or next(iter(fitted.values()))
            unvalidated |= {name for name, e in fitted.items() if not getattr(e, "fitted_", True)}
            unvalidated |= {name for name in self._available(kind) if name not in fitted and name != "gene_by_gene"}
            if set(self._estimator_names(["gene_by_gene"], blends)) - set(fitted):
                unvalidated.add("gene_by_gene")  # a gene's blend could not be built in this fold
            for name in self._available(kind):
                if name in unvalidated:
                    continue  # an estimator that fell back in any fold is not scored at all
                errors, residuals, scales, truths, queries = out.setdefault(name, ([], [], [], [], []))
                for p, c in held:
                    truth = self.shifts_.loc[(p, c)].to_numpy()
                    predicted = self._held_out_prediction(name, fitted, p, c)
                    errors.append(top_change_scores(predicted, truth))
                    residuals.append(truth - predicted)
                    scales.append(self._scale(kind, p, reference))
                    truths.append(truth)
                    queries.append((p, c))
        return {name: (e, np.asarray(r), np.asarray(s), np.asarray(t), q)
                for name, (e, r, s, t, q) in out.items() if name not in unvalidated}

    def _held_out_prediction(self, name: str, fitted: dict[str, Baseline], p: str, c: str) -> np.ndarray:
        """A candidate's prediction of the held-out query ``p`` in ``c`` from the fold's estimators."""
        if name != "gene_by_gene":
            return predict_one_shift(fitted[name], p, c)
        return self._gene_by_gene(p, c, lambda gene: self._fold_single(fitted, gene, c))

    def _gene_by_gene(self, p: str, c: str, single) -> np.ndarray:
        """The ``"gene_by_gene"`` candidate: the sum over ``p``'s genes of ``single(gene)``.

        ``single`` answers one gene as its own kind: from the prior at prediction, from a
        cross-fitting fold's estimators in :meth:`_fold_single`, by the same rule.
        """
        return np.sum([single(gene) for gene in self._genes(p)], axis=0)

    def _fold_single(self, fitted: dict[str, Baseline], gene: str, c: str) -> np.ndarray:
        """One gene's shift in ``c`` from a fold's estimators, the gene answered as its kind there.

        Its observed shift where the fold measured it in ``c``; the ``"unseen_context"`` blend
        where it measured it elsewhere only; else the ``"unseen_gene"`` blend.
        """
        observed = fitted["additive"]
        if (gene, c) in observed.shifts_.index:
            return predict_one_shift(observed, gene, c)
        kind = "unseen_context" if gene in observed.seen_ else "unseen_gene"
        return sum((w * candidate_shift(fitted, n, kind, gene, c) for n, w in self.weights_.get(kind, {}).items()),
                   np.zeros(len(observed.var_names_)))

    def _estimator_names(self, names, single_blends: Sequence[dict[str, float]]) -> list[str]:
        """The estimators behind candidates ``names``.

        ``"gene_by_gene"`` needs those of ``single_blends``, the ``"unseen_gene"`` and
        ``"unseen_context"`` blends that answer its genes.
        """
        out = {"additive"} | (set(names) - {"observed", "transfer", "observed_perturbed_mean", "gene_by_gene"})
        if "gene_by_gene" in names:
            out |= {name for blend in single_blends for name in blend}
        return sorted(out)  # make_estimator builds no embedding_nn without embeddings

    def _scale(self, kind: str, perturbation: str, fitted: Baseline) -> float:
        """Difficulty of a query (:func:`difficulty_scale`); 1 for kinds without unseen genes."""
        if kind not in ("unseen_gene", "partial_combination") or self.gene_embeddings is None:
            return 1.0
        seen = [self._genes(p)[0] for p in fitted.seen_ if len(self._genes(p)) == 1]
        return difficulty_scale(self.gene_embeddings, seen, self._genes(perturbation))

    # ------------------------------------------------------------------ prediction
    def kind(self, perturbation: str, context: str) -> str:
        """The kind of the query ``perturbation`` in ``context`` (see the module docstring).

        Examples
        --------
        >>> from perturbscope.data import simulate_perturbseq
        >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0,
        ...                                n_cell_types=1, n_cells_per_condition=40)
        >>> prior = EffectPrior().fit(adata[adata.obs["perturbation"] != "G03"], "perturbation")
        >>> prior.kind("G00", "all"), prior.kind("G03", "all"), prior.kind("G00+G01", "all")
        ('seen', 'unseen_gene', 'combination')
        >>> prior.kind("G00+G03", "all")
        'partial_combination'
        """
        return self._kind(self._canonical([perturbation]).tolist()[0], context)

    def _kind(self, perturbation: str, context: str) -> str:
        """:meth:`kind` of a label already canonical (the prediction paths canonicalise once)."""
        if perturbation == self.control_value_:  # no change, by definition
            return "seen"
        if (perturbation, context) in self.shifts_.index:
            n = None if self.counts_ is None else self.counts_.get((perturbation, context))
            return "few_shot" if self._is_few_shot(perturbation, context, n) else "seen"
        if perturbation in self._seen:
            return "unseen_context"
        genes = self._genes(perturbation)
        if len(genes) > 1:
            return "combination" if set(genes) <= self._single_genes else "partial_combination"
        return "unseen_gene"

    def predict_shifts(self, perturbations: Sequence[str], context: str) -> pd.DataFrame:
        """Predicted mean shift (log1p-normalised) of each perturbation in ``context``.

        Parameters
        ----------
        perturbations
            Labels.
        context
            The context (:data:`~perturbscope.data.ALL_CONTEXTS` without a context column).

        Returns
        -------
        A DataFrame (perturbations x genes); ``attrs["kinds"]`` and ``attrs["estimators"]`` list
        the kind of each query and the estimator that answered it.
        """
        rows, kinds, names = [], [], []
        labels = [str(p) for p in perturbations]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for p in self._canonical(labels).tolist():
                kind = self._kind(p, str(context))
                weights = self.weights_.get(kind, {"additive": 1.0})
                rows.append(sum((w * self._estimate(name, kind, p, str(context)) for name, w in weights.items()),
                                np.zeros(len(self.shifts_.columns))))
                kinds.append(kind)
                names.append(describe_blend(weights))
        table = pd.DataFrame(np.vstack(rows), index=labels, columns=self.estimators_["additive"].var_names_)
        table.attrs = {"kinds": kinds, "estimators": names}
        return table

    def _estimate(self, name: str, kind: str, p: str, context: str) -> np.ndarray:
        """One estimator's shift for the query ``p`` in ``context``."""
        if kind == "few_shot":
            return self._few_shot_estimate(name, p, context, self.shifts_.loc[(p, context)].to_numpy())
        if name == "gene_by_gene":
            return self._gene_by_gene(p, context, lambda gene: self.predict_shifts([gene], context).to_numpy()[0])
        return candidate_shift(self.estimators_, "additive" if name == "observed" else name, kind, p, context)

    def half_widths(self, perturbations: Sequence[str], context: str, level: float) -> pd.DataFrame:
        """Half-width per gene of the ``level`` interval on each perturbation's mean shift.

        ``NaN`` where the kind could not be cross-fitted (too few training perturbations of
        that kind) and for measured (``"seen"``) queries.

        Raises
        ------
        ValueError
            If ``level`` was not among the fitted ``levels``.
        """
        if level not in self.levels:
            raise ValueError(f"level {level} was not fitted; fitted levels are {list(self.levels)}.")
        genes = self.estimators_["additive"].var_names_
        reference = self.estimators_["additive"]
        rows = []
        for p in self._canonical([str(p) for p in perturbations]).tolist():
            kind = self._kind(p, str(context))
            q = self.quantiles_.get(kind, {}).get(level)
            rows.append(np.full(len(genes), np.nan) if q is None else q * self._scale(kind, p, reference))
        return pd.DataFrame(np.vstack(rows), index=list(map(str, perturbations)), columns=genes)

