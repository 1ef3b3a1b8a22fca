"""The effect prior's few-shot queries: groups measured in this context in only a few cells."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from ..data import canonical_labels, log1p_expression, streamed_pseudobulk
from ._scoring import top_change_scores

#: Groups with fewer training cells than this are ``"few_shot"`` queries (as are groups that
#: :meth:`FewShotMixin.add_groups` adds, whatever their size).
FEW_SHOT_CELLS = 30
#: Held-out perturbations needed before a kind's choice is made by cross-fitting.
MIN_HELD_OUT = 3


class FewShotMixin:
    """Cross-fitting and estimates of :class:`~perturbscope.effects.EffectPrior`'s few-shot kind.

    A few-shot group is answered by a blend of its observed shift, the transfer from other
    contexts, the context's perturbed mean and the mean of the observed shift and the perturbed
    mean; the blend is cross-fitted on well-measured training groups reduced to as many cells
    and scored against the mean of their other cells, as a test would score it.
    """

    def fit_few_shot(self, adata, labels: np.ndarray, contexts: np.ndarray, layer: str | None = None,
                     data_scale: str = "counts", k: int | None = None) -> FewShotMixin:
        """Cross-fit the ``"few_shot"`` blend, after :meth:`fit_means`.

        Well-measured training groups (at least twice the few-shot groups' median size ``k``,
        up to 60 of them) are reduced to ``k`` cells drawn from ``adata``, and every few-shot
        candidate is scored against the mean of the group's other cells: the drawn cells are
        left out of the truth, as a test leaves out the cells a model saw. Only these groups'
        cells are read, so ``adata`` may be backed or streamed.

        Parameters
        ----------
        adata
            The training cells the means were computed from.
        labels, contexts
            Each cell's perturbation label and context (as strings).
        layer, data_scale
            As for :meth:`fit`.
        k
            Cells to draw per group; ``None``: the few-shot groups' median size. Given, the blend
            is cross-fitted at ``k`` even without few-shot groups (for queries still to come).

        Returns
        -------
        ``self``; unchanged when there are no few-shot groups (and no ``k``) or too few
        well-measured ones.

        Raises
        ------
        RuntimeError
            If called before :meth:`fit_means`.
        ValueError
            If ``labels`` or ``contexts`` do not have one entry per cell of ``adata``.
        """
        few = self._checked_residuals("fit_few_shot", adata, labels, contexts, k, layer, data_scale)
        if few:
            if self.crossfit_scores_ is None:  # fitted with given weights or choices: no scores yet
                self.crossfit_scores_ = pd.DataFrame(index=pd.Index([], name="kind"), dtype=float)
            self._choose("few_shot", few)
        return self

    def few_shot_blend(self, adata, labels: np.ndarray, contexts: np.ndarray, k: int, layer: str | None = None,
                       data_scale: str = "counts") -> dict | None:
        """The ``"few_shot"`` blend cross-fitted at ``k`` cells, leaving the prior as it is.

        As :meth:`fit_few_shot` with ``k`` given, but returned instead of kept: a dict with
        ``"weights"``, ``"n_held_out"``, ``"scores"``, ``"quantiles"`` and ``"held_out"`` (the
        held-out predictions, as in ``crossfit_predictions_``, only with
        ``keep_crossfit_predictions``; all three ``None`` with fewer than :data:`MIN_HELD_OUT`
        held-out groups), or ``None`` where no group has ``2 k`` cells to draw from.

        Examples
        --------
        >>> from perturbscope.data import simulate_perturbseq
        >>> from perturbscope.effects import EffectPrior
        >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=0,
        ...                                n_cell_types=1, n_cells_per_condition=40, seed=0)
        >>> prior = EffectPrior().fit(adata, "perturbation")
        >>> labels, contexts = adata.obs["perturbation"].astype(str).to_numpy(), np.full(adata.n_obs, "all")
        >>> blend = prior.few_shot_blend(adata, labels, contexts, k=5)
        >>> blend["n_held_out"], prior.n_held_out_["few_shot"]   # the prior's own is unchanged
        (6, 0)
        """
        few = self._checked_residuals("few_shot_blend", adata, labels, contexts, k, layer, data_scale)
        return self._stacked_blend("few_shot", few) if few else None

    def add_groups(self, adata, labels: np.ndarray, contexts: np.ndarray, layer: str | None = None,
                   data_scale: str = "counts") -> FewShotMixin:
        """Add the group means of new cells, such as a query's few cells, keeping the blends.

        The new cells' (perturbation, context) means join the training means: a group measured
        in both becomes their cell-weighted mean, a new context gets its control mean from its
        own control cells. New control cells of a known context join its control mean too, so
        any batch difference between them and the training controls moves every shift of that
        context measured from the pooled mean. The cross-fitted blends and intervals are kept as they are. A group new
        to the prior, whatever its size, is a ``"few_shot"`` query (listed in ``added_groups_``),
        answered by the few-shot blend; re-cross-fit that blend for the new groups' size with
        :meth:`fit_few_shot` on the original training cells.

        Parameters
        ----------
        adata
            The new cells (read, not modified).
        labels, contexts
            Each new cell's perturbation label and context (as strings).
        layer, data_scale
            As for :meth:`fit`.

        Returns
        -------
        ``self``.

        Raises
        ------
        RuntimeError
            If called before :meth:`fit_means`.
        ValueError
            If ``labels`` or ``contexts`` do not have one entry per cell, if ``adata`` has
            other genes than the training means, or if a context of the new cells has no
            control cells in either.

        Examples
        --------
        >>> from perturbscope.data import simulate_perturbseq
        >>> from perturbscope.effects import EffectPrior
        >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0,
        ...                                n_cell_types=2, n_cells_per_condition=40)
        >>> in_b = (adata.obs["cell_type"] == "type_1").to_numpy()
        >>> prior = EffectPrior().fit(adata[~in_b].copy(), "perturbation", context_key="cell_type")
        >>> prior.kind("G00", "type_1")
        'unseen_context'
        >>> labels = adata.obs["perturbation"].astype(str).to_numpy()
        >>> g00 = in_b & (labels == "G00")
        >>> few = np.flatnonzero((in_b & (labels == "control")) | (g00 & (np.cumsum(g00) <= 5)))
        >>> query = adata[few]
        >>> _ = prior.add_groups(query, labels[few], np.full(len(few), "type_1"))
        >>> prior.kind("G00", "type_1"), int(prior.counts_.loc[("G00", "type_1")])
        ('few_shot', 5)
        """
        self._check_cells("add_groups needs the fitted prior first; call fit_means (or fit).", adata, labels, contexts)
        obs = pd.DataFrame({"perturbation": self._canonical(labels), "context": np.asarray(contexts, dtype=str)})
        has_controls = set(obs.loc[obs["perturbation"] == self.control_value_, "context"])
        known = set(self.means_.index.get_level_values("context")[
            self.means_.index.get_level_values("perturbation") == self.control_value_])
        missing = sorted(set(obs["context"]) - has_controls - known)
        if missing:
            raise ValueError(f"contexts {missing} have no control cells ({self.control_value_!r}) in the new cells "
                             "or in training; every context needs controls to measure shifts from.")
        # one pass over row chunks: the cells may be backed or streamed, and no dense copy is made
        new_means, new_counts = streamed_pseudobulk(adata.X if layer is None else adata.layers[layer], obs,
                                                    ["perturbation", "context"], data_scale)
        new_means.columns = self.means_.columns
        old_counts = (self.counts_ if self.counts_ is not None
                      else pd.Series(FEW_SHOT_CELLS, index=self.means_.index))
        counts = old_counts.add(new_counts.reindex(new_means.index), fill_value=0).astype(np.int64)
        means = self.means_.mul(old_counts.reindex(self.means_.index), axis=0).add(
            new_means.mul(new_counts.reindex(new_means.index), axis=0), fill_value=0
        ).div(counts, axis=0)
        kept = (self.crossfit_scores_, dict(self.n_held_out_), dict(self.quantiles_), dict(self.crossfit_predictions_))
        added = set(getattr(self, "added_groups_", set())) | {
            (p, c) for p, c in new_means.index if p != self.control_value_ and (p, c) not in self.means_.index}
        self.fit_means(means, self.control_value_, self.context_key_, self.delimiter_, counts=counts,
                       weights=self.weights_)
        self.crossfit_scores_, self.n_held_out_, self.quantiles_, self.crossfit_predictions_ = kept
        self.added_groups_ = added
        return self

    def _canonical(self, labels) -> np.ndarray:
        """Labels as the prior keys them (``"A+control"`` is ``"A"``; see ``canonical_labels``)."""
        return canonical_labels(labels, self.control_value_, self.delimiter_)

    def _checked_residuals(self, call: str, adata, labels, contexts, k, layer, data_scale) -> dict:
        """The checks of a few-shot cross-fitting entry point ``call``, then its residuals."""
        self._check_cells(f"{call} needs the group means first; call fit_means (or fit).", adata, labels, contexts)
        _check_k(k)
        return self._few_shot_residuals(adata, layer, data_scale, self._canonical(labels), np.asarray(contexts), k)

    def _check_cells(self, unfitted: str, adata, labels, contexts) -> None:
        """Check a call's cells: fitted first, one label and one context per cell.

        Raises ``RuntimeError(unfitted)`` before :meth:`fit_means`, and a ``ValueError`` unless
        ``labels`` and ``contexts`` have one entry per cell of ``adata`` and ``adata``'s genes are
        the fitted ones, in their order (the cells' means are compared gene by gene).
        """
        if not hasattr(self, "shifts_"):
            raise RuntimeError(unfitted)
        for name, values in (("labels", labels), ("contexts", contexts)):
            if len(values) != adata.n_obs:
                raise ValueError(f"{name} has {len(values)} entries but adata has {adata.n_obs} cells.")
        if not pd.Index(adata.var_names.astype(str)).equals(pd.Index(self.means_.columns.astype(str))):
            raise ValueError("adata's genes (var_names) differ from the genes the prior was fitted on, "
                             "or are in another order; subset and order them as in training.")

    def _few_shot_residuals(self, adata, layer, data_scale, labels, contexts, k: int | None = None) -> dict:
        """Few-shot candidates on well-measured groups reduced to k cells, scored on their other cells."""
        counts = self._group_counts()
        few = [n for (p, c), n in counts.items() if self._is_few_shot(p, c, n)]
        if not few and k is None:
            return {}
        k = max(1, int(np.median(few))) if k is None else int(k)
        rng = np.random.default_rng(self.seed)
        # the cells in adata, not the counts: groups added later (add_groups) have fewer cells here
        present = Counter(zip(labels, contexts))
        full = [idx for idx, n in counts.items() if present[idx] >= 2 * k and not self._is_few_shot(*idx, n)]
        full = [full[i] for i in rng.permutation(len(full))[:60]]
        if len(full) < MIN_HELD_OUT:
            return {}
        out: dict[str, tuple[list, list, list, list]] = {}
        for p, c in full:
            # k drawn cells are the observation, the group's other cells the truth (as in a test)
            cells = rng.permutation(np.flatnonzero((labels == p) & (contexts == c)))
            control = self.estimators_["additive"].control_means_.loc[c].to_numpy()
            drawn, rest = self._drawn_and_rest_means(adata, cells, k, (p, c), counts[(p, c)], layer, data_scale)
            observed_k, truth = drawn - control, rest - control
            for name in self._available("few_shot"):
                predicted = self._few_shot_estimate(name, p, c, observed_k)
                errors, residuals, scales, truths, queries = out.setdefault(name, ([], [], [], [], []))
                errors.append(top_change_scores(predicted, truth))
                residuals.append(truth - predicted)
                scales.append(1.0)
                truths.append(truth)
                queries.append((p, c))
        return {name: (e, np.asarray(r), np.asarray(sc), np.asarray(t), q) for name, (e, r, sc, t, q) in out.items()}

    def _group_counts(self) -> pd.Series:
        """Cells per perturbed training group.

        ``NaN`` for every group when fitted without counts: each is then well measured, and its
        other cells are read rather than derived.
        """
        if self.counts_ is not None:
            return self.counts_.drop(index=self.control_value_, level="perturbation", errors="ignore")
        index = self.means_.index
        return pd.Series(np.nan, index=index[index.get_level_values("perturbation") != self.control_value_])

    def _drawn_and_rest_means(self, adata, cells: np.ndarray, k: int, group: tuple[str, str], n_group: int,
                              layer, data_scale) -> tuple[np.ndarray, np.ndarray]:
        """Mean log1p expression of ``cells[:k]`` and of ``cells[k:]``.

        Only the ``k`` drawn cells are read when the prior's mean of ``group`` is the mean of
        exactly these ``cells`` (no cells added since): the rest's mean is then
        ``(n * mean - k * drawn) / (n - k)``, so the cost does not grow with the group's size.
        """
        drawn = log1p_expression(adata[np.sort(cells[:k])], layer, data_scale).mean(axis=0)
        if n_group == len(cells):
            total = len(cells) * self.means_.loc[group].to_numpy()
            return drawn, (total - k * drawn) / (len(cells) - k)
        return drawn, log1p_expression(adata[np.sort(cells[k:])], layer, data_scale).mean(axis=0)

    def _is_few_shot(self, perturbation: str, context: str, n: float | None) -> bool:
        """Whether a measured group is a ``"few_shot"`` query.

        It is when it has under :data:`FEW_SHOT_CELLS` cells, or is new to the prior from
        :meth:`add_groups` (listed in ``added_groups_``), whatever its size.
        """
        return (n is not None and n < FEW_SHOT_CELLS) or (perturbation, context) in getattr(self, "added_groups_", ())

    def _few_shot_estimate(self, name: str, p: str, c: str, observed: np.ndarray) -> np.ndarray:
        """Few-shot candidate ``name`` for group ``(p, c)`` whose ``k``-cell shift is ``observed``.

        The context's perturbed mean counts the group itself by ``observed``, as it does at
        prediction, where the group's measured shift is its few cells' shift; in cross-fitting
        the group's full mean (the truth) is left out of it.
        """
        shifts = self.shifts_
        in_context = shifts.index.get_level_values("context") == c
        others = shifts.index.get_level_values("perturbation") != p
        if name == "observed":
            return observed
        if name in ("perturbed_mean", "observed_perturbed_mean"):
            rows = shifts[in_context & others]
            perturbed_mean = (rows.sum(axis=0).to_numpy() + observed) / (len(rows) + 1)
            return perturbed_mean if name == "perturbed_mean" else 0.5 * (observed + perturbed_mean)
        elsewhere = shifts[~in_context & ~others]
        return elsewhere.mean(axis=0).to_numpy() if len(elsewhere) else observed


def _check_k(k) -> None:
    """``k`` (cells drawn per group) is ``None`` or a positive integer."""
    if k is not None and (not isinstance(k, int | np.integer) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}.")
