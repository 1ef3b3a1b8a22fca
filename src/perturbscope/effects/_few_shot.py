"""The effect prior's few-shot queries: groups measured in this context in only a few cells."""

from __future__ import annotations

import numpy as np

from ..data import log1p_expression
from ._scoring import top_change_scores

#: Groups with fewer training cells than this are ``"few_shot"`` queries.
FEW_SHOT_CELLS = 30
#: Held-out perturbations needed before a kind's choice is made by cross-fitting.
MIN_HELD_OUT = 3


class FewShotMixin:
    """Cross-fitting and estimates of :class:`~perturbscope.effects.EffectPrior`'s few-shot kind.

    A few-shot group is answered by a blend of its observed shift, the transfer from other
    contexts, the context's perturbed mean and the mean of the observed shift and the perturbed
    mean; the blend is cross-fitted on well-measured training groups reduced to as many cells.
    """

    def fit_few_shot(self, adata, labels: np.ndarray, contexts: np.ndarray, layer: str | None = None,
                     data_scale: str = "counts") -> FewShotMixin:
        """Cross-fit the ``"few_shot"`` blend, after :meth:`fit_means`.

        Well-measured training groups are reduced to as many cells as the few-shot groups
        have, drawn from ``adata``, and every few-shot candidate is scored against the groups'
        full means. Only the drawn cells are read, so ``adata`` may be backed or streamed.

        Parameters
        ----------
        adata
            The training cells the means were computed from.
        labels, contexts
            Each cell's perturbation label and context (as strings).
        layer, data_scale
            As for :meth:`fit`.

        Returns
        -------
        ``self``; unchanged when there are no few-shot groups or too few well-measured ones.

        Raises
        ------
        RuntimeError
            If called before :meth:`fit_means`.
        ValueError
            If ``labels`` or ``contexts`` do not have one entry per cell of ``adata``.
        """
        if not hasattr(self, "shifts_"):
            raise RuntimeError("fit_few_shot needs the group means first; call fit_means (or fit).")
        for name, values in (("labels", labels), ("contexts", contexts)):
            if len(values) != adata.n_obs:
                raise ValueError(f"{name} has {len(values)} entries but adata has {adata.n_obs} cells.")
        few = self._few_shot_residuals(adata, layer, data_scale, np.asarray(labels), np.asarray(contexts))
        if few:
            self._choose("few_shot", few)
        return self

    def _few_shot_residuals(self, adata, layer, data_scale, labels, contexts) -> dict:
        """Few-shot candidates scored on well-measured groups reduced to as many cells."""
        counts = self.counts_.drop(index=self.control_value_, level="perturbation", errors="ignore")
        few = counts[counts < FEW_SHOT_CELLS]
        if few.empty:
            return {}
        k = max(1, int(np.median(few)))
        rng = np.random.default_rng(self.seed)
        full = [idx for idx, n in counts.items() if n >= 3 * k]
        full = [full[i] for i in rng.permutation(len(full))[:60]]
        if len(full) < MIN_HELD_OUT:
            return {}
        out: dict[str, tuple[list, list, list, list]] = {}
        for p, c in full:
            cells = np.flatnonzero((labels == p) & (contexts == c))
            drawn = adata[np.sort(rng.choice(cells, k, replace=False))]
            observed_k = log1p_expression(drawn, layer, data_scale).mean(axis=0) - \
                self.estimators_["additive"].control_means_.loc[c].to_numpy()
            truth = self.shifts_.loc[(p, c)].to_numpy()
            for name in self._available("few_shot"):
                predicted = self._few_shot_estimate(name, p, c, observed_k, exclude_self=True)
                errors, residuals, scales, truths = out.setdefault(name, ([], [], [], []))
                errors.append(top_change_scores(predicted, truth))
                residuals.append(truth - predicted)
                scales.append(1.0)
                truths.append(truth)
        return {name: (e, np.asarray(r), np.asarray(sc), np.asarray(t)) for name, (e, r, sc, t) in out.items()}

    def _few_shot_estimate(self, name: str, p: str, c: str, observed: np.ndarray, exclude_self: bool = False):
        shifts = self.shifts_
        in_context = shifts.index.get_level_values("context") == c
        others = shifts.index.get_level_values("perturbation") != p
        pm_rows = shifts[in_context & others] if exclude_self else shifts[in_context]
        perturbed_mean = pm_rows.mean(axis=0).to_numpy() if len(pm_rows) else np.zeros_like(observed)
        if name == "observed":
            return observed
        if name == "perturbed_mean":
            return perturbed_mean
        if name == "observed_perturbed_mean":
            return 0.5 * (observed + perturbed_mean)
        elsewhere = shifts[~in_context & ~others]
        return elsewhere.mean(axis=0).to_numpy() if len(elsewhere) else observed
