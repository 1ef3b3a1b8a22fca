"""Saving and rebuilding the effect prior as plain data (read back by the restricted unpickler)."""

from __future__ import annotations

from typing import Self

import numpy as np
import pandas as pd


class PriorStateMixin:
    """:meth:`state` and :meth:`from_state` of :class:`~perturbscope.effects.EffectPrior`."""

    def state(self) -> dict:
        """Everything needed to rebuild the prior, as plain arrays, strings and numbers.

        Saved with a model and read back by the restricted unpickler; the estimators are
        refitted from the saved means by :meth:`from_state`.
        """
        index = self.means_.index
        scores = self.crossfit_scores_
        return {
            "means": np.asarray(self.means_.to_numpy(), dtype=np.float64),
            "means_perturbation": np.asarray(index.get_level_values("perturbation"), dtype=str),
            "means_context": np.asarray(index.get_level_values("context"), dtype=str),
            "genes": np.asarray(self.means_.columns, dtype=str),
            "genes_name": self.means_.columns.name,
            "counts": None if self.counts_ is None else np.asarray(
                self.counts_.reindex(index).fillna(0).to_numpy(), dtype=np.int64),
            "control_value": self.control_value_, "context_key": self.context_key_,
            "delimiter": self.delimiter_, "choices": dict(self.choices_), "levels": list(self.levels),
            "weights": {k: {n: float(w) for n, w in v.items()} for k, v in self.weights_.items()},
            "n_folds": self.n_folds, "seed": self.seed, "n_bootstrap": self.n_bootstrap,
            "interval_scale": self.interval_scale, "n_held_out": dict(self.n_held_out_),
            "added_groups": sorted(getattr(self, "added_groups_", ())),
            "quantiles": {k: {float(lv): np.asarray(q) for lv, q in v.items()} for k, v in self.quantiles_.items()},
            "crossfit_scores": None if scores is None else {
                k: {c: float(v) for c, v in row.items()} for k, row in scores.to_dict("index").items()
            },
        }

    @classmethod
    def from_state(cls, state: dict, gene_embeddings: pd.DataFrame | None) -> Self:
        """Rebuild a fitted prior from :meth:`state` (no cross-fitting is repeated).

        Examples
        --------
        >>> from perturbscope.data import simulate_perturbseq
        >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
        ...                                n_cell_types=1, n_cells_per_condition=5)
        >>> from perturbscope.effects import EffectPrior
        >>> prior = EffectPrior().fit(adata, "perturbation")
        >>> again = EffectPrior.from_state(prior.state(), None)
        >>> bool(np.allclose(again.predict_shifts(["G00+G01"], "all"),
        ...                  prior.predict_shifts(["G00+G01"], "all")))
        True
        """
        prior = cls(gene_embeddings, n_folds=int(state["n_folds"]), levels=state["levels"], seed=int(state["seed"]),
                    n_bootstrap=int(state.get("n_bootstrap", 0)),
                    # the saved quantiles were computed by this rule; files from before it was kept used in-sample
                    interval_scale=str(state.get("interval_scale", "in_sample")))
        index = pd.MultiIndex.from_arrays(
            [state["means_perturbation"], state["means_context"]], names=["perturbation", "context"]
        )
        means = pd.DataFrame(state["means"], index=index, columns=pd.Index(state["genes"], name=state.get("genes_name")))
        counts = None if state.get("counts") is None else pd.Series(state["counts"], index=index)
        weights = state.get("weights")
        if weights is not None and "partial_combination" not in weights:
            # saved before the kind existed: such queries were predicted gene by gene
            weights = {**weights, "partial_combination": {"gene_by_gene": 1.0}}
        prior.fit_means(means, state["control_value"], state["context_key"], state["delimiter"],
                        choices=state["choices"], counts=counts, weights=weights)
        prior.n_held_out_, prior.added_groups_ = dict(state["n_held_out"]), {
            (str(prior._canonical([p])[0]), c) for p, c in state.get("added_groups", ())}
        prior.quantiles_ = {k: {float(lv): np.asarray(q) for lv, q in v.items()} for k, v in state["quantiles"].items()}
        scores = state["crossfit_scores"]
        prior.crossfit_scores_ = None if scores is None else pd.DataFrame.from_dict(scores, orient="index")
        return prior
