"""Simple baselines (perturbation-effect estimators) behind the same ``fit`` / ``predict`` interface as :class:`~perturbscope.ScopeVI`.

Every baseline works in log1p-normalised space. ``fit`` computes, with the one
:func:`~perturbscope.data.pseudobulk`, the mean of every training perturbation in every
context and its *shift* from that context's control mean. A baseline is a rule that turns
these shifts into the predicted shift of a perturbation in a context. ``predict`` adds that
shift to each given control cell, so the predicted cells keep the control cells' heterogeneity
and their mean is exactly the control mean plus the predicted shift.

Where a context has no training shift of the perturbation (an unseen cell type or line), the
shift is transferred: the mean over the other contexts where it was seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import TARGET_SUM
from ..data import (
    ALL_CONTEXTS,
    aggregate_prediction,
    canonical_labels,
    canonical_means,
    check_control_present,
    check_finite,
    check_perturbation_labels,
    check_unique_names,
    check_var_names,
    log1p_expression,
    parse_perturbation,
    prediction_anndata,
    pseudobulk,
    shifts_from_means,
)
from ..data._checks import check_no_missing_labels, check_non_negative
from ..data._pseudobulk import DataScale
from ..data._shifts import check_obs_keys, context_labels


class Baseline:
    """Shared machinery of the baselines: training shifts per context and cell-level prediction.

    Subclasses implement :meth:`_shift`. Use a concrete baseline, e.g.
    :class:`PerturbedMeanBaseline`.

    Attributes
    ----------
    control_means_
        Control mean per context (contexts x genes), set by :meth:`fit`.
    shifts_
        Mean shift from the context's control of every training perturbation and context
        (``MultiIndex`` (perturbation, context) x genes), set by :meth:`fit`.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> model = NoChangeBaseline().fit(adata, "perturbation")
    >>> model.shifts_.shape
    (5, 30)
    """

    name = "baseline"

    def fit(
        self,
        adata_train: ad.AnnData,
        perturbation_key: str,
        control_value: str = "control",
        context_key: str | None = None,
        layer: str | None = None,
        data_scale: DataScale = "counts",
        delimiter: str = "+",
    ) -> Baseline:
        """Compute the training shifts.

        Parameters
        ----------
        adata_train
            Training cells (not modified).
        perturbation_key
            ``obs`` column of perturbation labels.
        control_value
            The control label.
        context_key
            ``obs`` column of contexts (cell type, line); shifts are computed per context.
        layer
            Layer holding expression; ``X`` when ``None``.
        data_scale
            ``"counts"`` or ``"log1p_norm"``: the scale of the stored expression, which is
            also the scale of the predicted ``X``.
        delimiter
            Separator of genes in combination labels.

        Returns
        -------
        The fitted baseline (``self``).

        Raises
        ------
        KeyError
            If ``perturbation_key`` or ``context_key`` is not in ``adata_train.obs``.
        ValueError
            If a context has no control cells.
        """
        check_obs_keys(adata_train.obs, perturbation_key=perturbation_key, context_key=context_key)
        check_no_missing_labels(adata_train.obs, perturbation_key=perturbation_key, context_key=context_key)
        check_control_present(adata_train.obs[perturbation_key], perturbation_key, control_value)
        if layer is not None and layer not in adata_train.layers:
            raise KeyError(f"layer {layer!r} not in adata_train.layers; layers are {list(adata_train.layers)}.")
        matrix = adata_train.X if layer is None else adata_train.layers[layer]
        check_finite(matrix, layer)
        if data_scale == "counts":  # a negative count would make NaN shifts
            check_non_negative(matrix, layer, "data_scale='counts' normalises counts per cell")
        expression = ad.AnnData(
            log1p_expression(adata_train, layer, data_scale),
            obs=pd.DataFrame(
                {
                    "perturbation": canonical_labels(adata_train.obs[perturbation_key], control_value, delimiter),
                    "context": context_labels(adata_train, context_key).to_numpy(),
                },
                index=adata_train.obs_names,
            ),
            var=pd.DataFrame(index=adata_train.var_names),
        )
        means = pseudobulk(expression, ["perturbation", "context"])
        self.fit_means(means, perturbation_key, control_value, context_key, delimiter)
        self.data_scale_, self.layer_ = data_scale, layer  # predict reads its controls the same way
        return self

    def fit_means(
        self,
        means: pd.DataFrame,
        perturbation_key: str = "perturbation",
        control_value: str = "control",
        context_key: str | None = None,
        delimiter: str = "+",
    ) -> Baseline:
        """Fit from group means alone: the log1p-normalised pseudobulk of every group.

        :meth:`fit` computes the means and calls this; a saved table of means (as ScopeVI keeps)
        refits a baseline exactly, without the cells.

        Parameters
        ----------
        means
            Pseudobulk with a ``MultiIndex`` (``perturbation``, ``context``), controls included;
            the context is :data:`~perturbscope.data.ALL_CONTEXTS` without a context column.
        perturbation_key, control_value, context_key, delimiter
            As for :meth:`fit`; the two keys only name columns in messages and predictions.

        Returns
        -------
        The fitted baseline (``self``).
        """
        means, _ = canonical_means(means, None, control_value, delimiter)  # tables saved before canonical labels
        if control_value not in set(means.index.get_level_values("perturbation")):
            raise ValueError(f"means has no row of the control label {control_value!r}; shifts are measured "
                             "from the control mean (pass the control value the table uses).")
        try:
            self.shifts_, self.control_means_ = shifts_from_means(means, control_value, context_key)
        except ValueError as error:  # name the user's column, not the internal one
            raise ValueError(str(error).replace("adata.obs[None]", "adata.obs")) from None
        self.means_ = means
        self.var_names_ = pd.Index(means.columns).copy()
        self.perturbation_key_ = perturbation_key
        self.control_value_ = control_value
        self.context_key_ = context_key
        self.data_scale_, self.layer_ = "log1p_norm", None  # means are log1p-normalised; fit() sets its own
        self.delimiter_ = delimiter
        self.seen_ = set(self.shifts_.index.get_level_values("perturbation"))
        self.fallbacks_: set[str] = set()
        self._fit_extra(means)
        return self

    def _fit_extra(self, means: pd.DataFrame) -> None:
        """Hook for subclasses that need more than the shifts."""

    def _genes(self, perturbation: str) -> tuple[str, ...]:
        return parse_perturbation(perturbation, self.control_value_, self.delimiter_)

    def _seen_shift(self, perturbation: str, context: str) -> np.ndarray | None:
        """The training shift in ``context``, else its mean over other contexts, else ``None``."""
        if perturbation not in self.seen_:
            return None
        if (perturbation, context) in self.shifts_.index:
            return self.shifts_.loc[(perturbation, context)].to_numpy()
        return self.shifts_.xs(perturbation, level="perturbation").mean(axis=0).to_numpy()

    def _perturbed_mean(self, context: str) -> np.ndarray:
        contexts = self.shifts_.index.get_level_values("context")
        rows = self.shifts_[contexts == context] if (contexts == context).any() else self.shifts_
        if len(rows) == 0:
            return np.zeros(len(self.var_names_))
        return rows.mean(axis=0).to_numpy()

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "shifts_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(adata_train, ...).")

    def predict_shifts(
        self, perturbations: Sequence[str], context: str | None = None
    ) -> pd.DataFrame:
        """Predicted mean shift from control (log1p-normalised) of each perturbation.

        Parameters
        ----------
        perturbations
            Perturbation labels, e.g. ``["KLF1", "SET+KLF1"]``.
        context
            The context to predict in; required when fitted with a ``context_key``.

        Returns
        -------
        A DataFrame (perturbations x genes).

        Raises
        ------
        ValueError
            If ``context`` is missing although the model was fitted with contexts.

        Examples
        --------
        >>> from perturbscope.data import simulate_perturbseq
        >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
        ...                                n_cell_types=1, n_cells_per_condition=5)
        >>> NoChangeBaseline().fit(adata, "perturbation").predict_shifts(["G00"]).abs().sum().sum()
        np.float64(0.0)
        """
        self._check_fitted()
        if context is None:
            if self.context_key_ is not None:
                raise ValueError(
                    f"{type(self).__name__} was fitted with context_key={self.context_key_!r}; "
                    "pass the context to predict in."
                )
            context = ALL_CONTEXTS
        labels = check_perturbation_labels(perturbations)  # answered by their canonical form ("A+control" is "A")
        keys = canonical_labels(labels, self.control_value_, self.delimiter_).tolist()
        before = set(self.fallbacks_)
        # the control label moves nothing, in every baseline
        rows = [np.zeros(len(self.var_names_)) if p == self.control_value_ else self._shift(p, str(context))
                for p in keys]
        fell_back = self.fallbacks_ - before  # reported under the labels asked for
        self.fallbacks_ = before | {label for label, key in zip(labels, keys) if key in fell_back}
        return pd.DataFrame(np.vstack(rows), index=labels, columns=self.var_names_)

    def predict(
        self,
        adata_control: ad.AnnData,
        perturbations: Sequence[str],
        aggregate: Literal["mean"] | None = None,
    ) -> ad.AnnData:
        """Predict perturbed cells: each control cell shifted by the predicted mean shift.

        Parameters
        ----------
        adata_control
            Control cells to start from, with the training genes (and the context column when
            fitted with one). Not modified.
        perturbations
            Perturbation labels to predict.
        aggregate
            ``None``: one row per (perturbation, control cell). ``"mean"``: one row per
            perturbation (and context), the mean of those cells.

        Returns
        -------
        A new AnnData with the training ``var_names`` and

        * ``obs["perturbation"]``; the context column when fitted with one;
          ``obs["control_cell"]`` (cells) or ``obs["n_cells"]`` (means);
        * ``X`` on the training scale: expected counts at the control cell's library size for
          ``data_scale="counts"`` (negative values clipped to 0), else log1p-normalised values;
        * ``layers["log1p_norm"]``: log1p-normalised predictions (not clipped, so their mean is
          exactly the control mean plus the shift);
        * ``uns["perturbscope"]``: the baseline's name and the perturbations that fell back to
          the perturbed mean.

        Raises
        ------
        ValueError
            If the genes differ from training, ``aggregate`` is unknown or no perturbation is
            given.
        KeyError
            If the context column is missing from ``adata_control.obs``.

        Examples
        --------
        >>> from perturbscope.data import simulate_perturbseq
        >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
        ...                                n_cell_types=1, n_cells_per_condition=5)
        >>> model = PerturbedMeanBaseline().fit(adata, "perturbation")
        >>> control = adata[adata.obs["perturbation"] == "control"]
        >>> model.predict(control, ["G00", "G01"], aggregate="mean").obs["perturbation"].tolist()
        ['G00', 'G01']
        """
        self._check_fitted()
        if aggregate not in (None, "mean"):
            raise ValueError(f"aggregate must be None or 'mean', got {aggregate!r}.")
        perturbations = check_perturbation_labels(perturbations, self.control_value_, self.delimiter_)
        check_var_names(adata_control.var_names, self.var_names_, "adata_control")
        if self.context_key_ is not None and self.context_key_ not in adata_control.obs.columns:
            raise KeyError(
                f"context_key {self.context_key_!r} not in adata_control.obs; columns are "
                f"{list(adata_control.obs.columns)}."
            )
        if adata_control.n_obs == 0:
            raise ValueError("adata_control has no cells; pass at least one control cell to shift.")
        if aggregate is None:  # each cell row's obs["control_cell"] names its anchor
            check_unique_names(adata_control, "adata_control", axes=("obs_names",))
        check_no_missing_labels(adata_control.obs, context_key=self.context_key_)
        layer = getattr(self, "layer_", None)
        if layer is not None and layer not in adata_control.layers:
            raise KeyError(f"layer {layer!r} (the layer the baseline was fitted on) not in adata_control.layers; "
                           f"layers are {list(adata_control.layers)}.")
        matrix = adata_control.X if layer is None else adata_control.layers[layer]
        check_finite(matrix, layer)
        self.fallbacks_ = set()
        control = log1p_expression(adata_control, layer, self.data_scale_)
        contexts = context_labels(adata_control, self.context_key_).to_numpy()
        unique_contexts = pd.unique(contexts)
        shift_tables = {
            c: self.predict_shifts(perturbations, c if self.context_key_ else None)
            for c in unique_contexts
        }
        context_index = pd.Index(unique_contexts).get_indexer(contexts)
        log_values = np.vstack([
            control + np.vstack([shift_tables[c].loc[p].to_numpy() for c in unique_contexts])[context_index]
            for p in perturbations
        ])
        if self.data_scale_ == "counts":
            library = np.asarray(matrix.sum(axis=1)).ravel()
            X = np.clip(np.expm1(log_values), 0, None) * np.tile(library, len(perturbations))[:, None] / TARGET_SUM
        else:
            X = log_values.copy()
        carried = [] if self.context_key_ is None else [self.context_key_]
        out = prediction_anndata(
            perturbations, adata_control.obs[carried], X, log_values, self.var_names_,
            provenance={"model": self.name, "fallback_to_perturbed_mean": sorted(self.fallbacks_)},
        )
        if aggregate == "mean":
            out = aggregate_prediction(out, self.context_key_)
        return out


class NoChangeBaseline(Baseline):
    """Predict no change: every perturbation is the control mean.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> float(NoChangeBaseline().fit(adata, "perturbation").predict_shifts(["G00"]).abs().max(axis=1).iloc[0])
    0.0
    """

    name = "no_change"

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        return np.zeros(len(self.var_names_))


class PerturbedMeanBaseline(Baseline):
    """Predict the mean shift of all training perturbations (Systema's perturbed mean).

    Every training perturbation counts once, whatever its number of cells. In a context
    without training perturbations (zero-shot) the mean over all contexts is used.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> model = PerturbedMeanBaseline().fit(adata, "perturbation")
    >>> shifts = model.predict_shifts(["G00", "new"])
    >>> bool((shifts.loc["G00"] == shifts.loc["new"]).all())
    True
    """

    name = "perturbed_mean"

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        return self._perturbed_mean(context)


class MatchingMeanBaseline(Baseline):
    """Predict the mean shift of the matching training perturbations (Systema's matching mean).

    A perturbation seen in training (in this context, else in others: the transfer across
    cell types or lines) is predicted by its own shift; a combination by the mean of the shifts
    of its genes seen as singles; anything else by the perturbed mean.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> model = MatchingMeanBaseline().fit(adata[adata.obs["perturbation"].isin(
    ...     ["control", "G00", "G01"])], "perturbation")
    >>> s = model.predict_shifts(["G00+G01", "G00", "G01"])
    >>> bool(np.allclose(s.loc["G00+G01"], (s.loc["G00"] + s.loc["G01"]) / 2))
    True
    """

    name = "matching_mean"

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        own = self._seen_shift(perturbation, context)
        if own is not None:
            return own
        parts = [self._seen_shift(g, context) for g in self._genes(perturbation)]
        parts = [s for s in parts if s is not None]
        if not parts:
            self.fallbacks_.add(perturbation)
            return self._perturbed_mean(context)
        return np.mean(parts, axis=0)


class AdditiveBaseline(Baseline):
    """Predict a combination as the sum of its genes' single shifts, in log space.

    A perturbation seen in training is predicted by its own shift. Genes not seen as singles
    add nothing (an unseen single is predicted as no change), so only ``seen2`` combinations
    get a full additive prediction.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                n_cell_types=1, n_cells_per_condition=5)
    >>> model = AdditiveBaseline().fit(adata[adata.obs["perturbation"].isin(
    ...     ["control", "G00", "G01"])], "perturbation")
    >>> s = model.predict_shifts(["G00+G01", "G00", "G01"])
    >>> bool(np.allclose(s.loc["G00+G01"], s.loc["G00"] + s.loc["G01"]))
    True
    """

    name = "additive"

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        own = self._seen_shift(perturbation, context)
        if own is not None:
            return own
        total = np.zeros(len(self.var_names_))
        for gene in self._genes(perturbation):
            part = self._seen_shift(gene, context)
            if part is not None:
                total += part
        return total
