"""Prediction from control anchors: :meth:`PredictionMixin.predict` and perturbation programmes.

Every control cell is an anchor; its expression is encoded, ``z`` is drawn from the conditional
prior under the requested perturbation and decoded (:meth:`ScopeVAE.predict_from_anchor`).
The result is laid out by :func:`perturbscope.data.prediction_anndata`, the layout every model
and baseline shares.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings
from scvi.utils import track

from .._constants import REGISTRY_KEYS, TARGET_SUM
from ..data import (
    ALL_CONTEXTS,
    PredictionMeans,
    PredictionStore,
    canonical_labels,
    check_cells_have_counts,
    check_log_normalized,
    check_perturbation_labels,
    check_store_path,
    check_unique_names,
    check_var_names,
    is_control,
    log1p_expression,
    prediction_anndata,
)
from ..module._scopevae import COUNT_LIKELIHOODS
from ._composition import compose_cells, composition_terms
from ._programs import PerturbationPrograms


def _matrix_of(adata: ad.AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in adata.layers; layers are {list(adata.layers)}.")
    return adata.layers[layer]


class PredictionMixin:
    """``predict`` and ``get_perturbation_programs`` for :class:`~perturbscope.ScopeVI`."""

    @torch.inference_mode()
    def predict(
        self,
        adata_control: ad.AnnData | None = None,
        perturbations: Sequence[str] | None = None,
        n_samples: int = 1,
        aggregate: Literal["mean"] | None = None,
        use_prior_mean: bool = False,
        residual: bool = True,
        combination: Literal["additive", "joint"] = "additive",
        batch_size: int | None = None,
        seed: int | None = None,
        interval_levels: Sequence[float] = (0.8, 0.95),
        out: str | Path | None = None,
    ) -> ad.AnnData | Path:
        """Predict perturbed cells from control cells.

        Every control cell is an anchor: ``z`` is drawn from the conditional prior
        ``p(z | control cell, perturbation)`` and decoded under the perturbation, so the
        prediction keeps that cell's basal state, context and batch. Control cells of a context
        never seen in training work too (zero-shot): the prior is conditioned on them.

        With the effect prior (``effect_prior=True``, the default) each cell is its anchor's
        log1p-normalised expression plus the prior's mean shift, the validated share of the
        VAE's mean correction, and the VAE's cell-state-dependent deviation (see
        :mod:`perturbscope.model._effect_correction`); nothing is clamped in
        ``layers["log1p_norm"]``, so its mean over a context's anchors is exactly the anchors'
        mean plus the predicted shift.

        Parameters
        ----------
        adata_control
            Control cells with the training genes (same ``var_names``, same order), on the
            training scale. Defaults to the control cells of the training AnnData.
        perturbations
            Labels to predict (``"KLF1"``, ``"SET+KLF1"``); genes need only be in the embedding
            table. Defaults to the training perturbations.
        n_samples
            Draws of ``z`` per control cell.
        aggregate
            ``"mean"`` returns one row per perturbation (and context, when the model has a
            context key) instead of one per cell: the pseudobulk of ``X`` and ``log1p_norm``.
        use_prior_mean
            Decode the prior mean instead of a sample.
        residual
            Start from the anchor (required by the effect prior; ``False`` uses the VAE alone).
            Predict each cell as its anchor's expression plus the decoded change
            (``decode(z_p, p) - decode(z_0, no perturbation)`` for the same prior draw, in
            log1p-normalised space; composed per gene for combinations, see ``combination``), so
            the decoder's error in reconstructing the anchor cancels and the spread of real
            control cells is kept (for count likelihoods without the effect prior the anchor's
            expected expression, see :meth:`ScopeVAE.predict_from_anchor`). ``False`` starts from ``decode(z_0, no perturbation)``
            instead of the observed cell (``decode(z_p, p)`` itself for a single).
        combination
            How a multi-gene perturbation's change is composed. ``"additive"``: the sum of its
            genes' predicted changes plus the change due to the learned interaction term, which
            is 0 unless combinations were in training (so unseen combinations default to
            additivity in expression space, the strong baseline of Norman et al. 2019 and
            Ahlmann-Eltze et al. 2025). ``"joint"``: decode the summed perturbation vector.
            Singles are the same under both. See :meth:`ScopeVAE.predicted_change`.
        batch_size
            Control cells per forward pass; ``None`` uses ``scvi.settings.batch_size``.
        seed
            Seed of the prior draws; defaults to ``scvi.settings.seed``.
        interval_levels
            Coverage levels of the intervals added to a mean prediction (``aggregate="mean"``)
            of a model with the effect prior.
        out
            A new ``.h5ad`` or ``.zarr`` path: the predicted cells are written there chunk by
            chunk (:class:`perturbscope.data.PredictionStore`) instead of being held in memory.
            Returns the path, or with ``aggregate="mean"`` the mean prediction (the cells are
            still written to ``out``).

        Notes
        -----
        Prediction streams over chunks of ``batch_size`` control cells: with ``aggregate="mean"``
        only running sums per (perturbation, context) are kept
        (:class:`perturbscope.data.PredictionMeans`), so memory is set by ``batch_size`` and the
        number of mean profiles, not by the number of (perturbation, control cell) pairs. With
        ``out`` the expression goes to disk chunk by chunk, but the rows' ``obs`` table is built
        in memory first (about 180 bytes a row: 90 MB for 500,000 rows), whatever the genes. With the effect prior the VAE's draws are made twice
        from the same seeded generator: once for its mean change per context, which every cell's
        composition needs, then for the cells. The draws depend on ``seed`` and ``batch_size``.

        Returns
        -------
        The path ``out`` when it is given without ``aggregate``; otherwise a new AnnData
        (``adata_control`` is untouched). The prediction, in memory or in ``out``, has the
        training ``var_names`` and

        * ``X``: expression on the training scale (expected counts at the control cell's library
          size for count likelihoods; log-normalised values for ``"normal"``);
        * ``layers["log1p_norm"]``: ``log1p`` of expression normalised to 1e4 counts (equal to
          ``X`` for ``"normal"``, whose input is already log-normalised). In cell rows it is the
          anchor's value plus the predicted change, not clamped: an entry can be negative where
          the anchor measured 0 and the change is negative, so that its mean over cells is
          exactly the predicted pseudobulk. ``X`` (count likelihoods) is that value mapped back
          to counts and clipped at 0 per cell, so ``X`` rows are valid cells but their mean is
          not the pseudobulk of ``log1p_norm``;
        * ``obs["perturbation"]``, ``obs["control_cell"]`` (the anchor's name), the control
          cells' context, batch and covariate columns, and ``obs["sample"]``;
          with ``aggregate="mean"``, ``obs["perturbation"]``, the context column and
          ``obs["n_cells"]`` (the cell rows averaged: anchors times ``n_samples``);
        * ``uns["perturbscope"]``: the model, likelihood, perturbation key and layer it was set up
          with, and embedding provenance; with the effect
          prior also ``"mean_correction"``, the mean change the learned correction adds to the
          prior's shift (rows ``"perturbation|context"``, genes as columns);
        * with ``aggregate="mean"`` and the effect prior, ``layers["log1p_norm_lower_80"]`` and
          ``layers["log1p_norm_upper_80"]`` (and ``_95``, one pair per ``interval_levels``):
          split-conformal intervals per gene around the predicted mean, from the cross-fitted
          residuals of the prior's estimator (``NaN`` for measured perturbations and for kinds
          with too few training perturbations to calibrate).

        Raises
        ------
        ValueError
            If ``var_names`` differ from training, ``adata_control`` is empty or holds
            non-control cells, a batch/covariate value was not seen in training, ``perturbations``
            is empty, or ``out`` exists or does not end in ``.h5ad`` or ``.zarr``.
        KeyError
            If a perturbed gene is not in the embedding table.
        """
        self._check_if_trained(warn=True)
        if aggregate not in (None, "mean"):
            raise ValueError(f"aggregate must be None or 'mean', got {aggregate!r}.")
        if combination not in ("additive", "joint"):
            raise ValueError(f"combination must be 'additive' or 'joint', got {combination!r}.")
        if not isinstance(n_samples, int | np.integer) or n_samples <= 0:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        batch_size = settings.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        out = None if out is None else check_store_path(out)
        adata_control, perturbations = self._prediction_inputs(adata_control, perturbations)
        if aggregate is None:  # each cell row's obs["control_cell"] names its anchor
            check_unique_names(adata_control, "adata_control", axes=("obs_names",))
        with_prior = self.effect_prior is not None and residual
        if with_prior and aggregate == "mean":
            self._check_interval_levels(interval_levels)  # before the prediction runs (and writes out=)
        context_key = self._original_key(REGISTRY_KEYS.CONTEXT_KEY)
        contexts = self._control_contexts(adata_control, context_key)
        if with_prior and context_key is not None and contexts is None:
            raise KeyError(f"adata_control.obs has no column {context_key!r}, the context the model was set up with.")
        gene_index = torch.as_tensor(self.encode_perturbations(perturbations))
        seed = int(seed if seed is not None else (settings.seed or 0))
        control_obs, provenance = self._prediction_layout(adata_control)

        def draws():  # the same seeded draws, in the same order, on every call
            return self._predicted_chunks(adata_control, gene_index, n_samples, use_prior_mean, residual,
                                          combination, batch_size, seed, with_prior)

        if with_prior:  # a first pass for the VAE's mean change per context, which every cell needs
            terms = self._composition_terms(adata_control, perturbations, contexts, n_samples, draws())
            provenance["mean_correction"] = terms["mean_correction"]
        n_cells, n_genes = adata_control.shape
        means = (PredictionMeans(perturbations, contexts, context_key, n_samples, n_genes)
                 if aggregate == "mean" else None)
        store = None if out is None else PredictionStore(out, perturbations, control_obs, adata_control.var_names,
                                                         n_samples, provenance, rows_per_chunk=batch_size)
        cells_in_memory = means is None and store is None
        if cells_in_memory:
            X = np.empty((len(perturbations), n_samples, n_cells, n_genes), dtype=np.float32)
            log1p_norm = np.empty_like(X)
        anchors = None
        try:
            for cells, p, first, second in draws():
                if with_prior:
                    if anchors is None or anchors[0] != cells:
                        anchors = (cells, *self._anchor_expression(adata_control, cells))
                    first, second = self._compose_cells(terms, p, anchors, first)
                if means is not None:
                    means.add(p, cells, first, second)
                if store is not None:
                    store.write(p, cells, first, second)
                if cells_in_memory:
                    X[p, :, cells], log1p_norm[p, :, cells] = first, second
        except BaseException:
            if store is not None:  # no half-written store is left behind
                store.discard()
            raise
        if store is not None:
            store.close()
        if cells_in_memory:
            return prediction_anndata(perturbations, control_obs, X.reshape(-1, n_genes),
                                      log1p_norm.reshape(-1, n_genes), adata_control.var_names, n_samples, provenance)
        if means is None:
            return out
        prediction = means.to_anndata(adata_control.var_names, provenance)
        if with_prior:
            self.add_prediction_intervals(prediction, interval_levels)
        return prediction

    def _predicted_chunks(self, adata_control, gene_index, n_samples, use_prior_mean, residual, combination,
                          batch_size, seed, with_prior):
        """Yield ``(cells, perturbation index, first, second)`` per chunk of control cells and perturbation.

        With the effect prior ``first`` is the VAE's change ``(n_samples, cells, genes)`` and
        ``second`` is ``None``; without, they are ``X`` and ``log1p_norm``. The prior draws come
        from one generator seeded with ``seed``, consumed chunk by chunk, perturbation by
        perturbation: a second call yields the same numbers.
        """
        generator = torch.Generator().manual_seed(seed)
        for cells, anchor_x, batch_index, cat_covs in self._anchor_batches(adata_control, batch_size):
            for p in range(len(gene_index)):
                genes = gene_index[p].expand(len(anchor_x), -1).to(anchor_x.device)
                if with_prior:
                    shape = (n_samples, len(anchor_x), self.module.n_latent)
                    noise = torch.zeros(shape) if use_prior_mean else torch.randn(shape, generator=generator)
                    change, _ = self.module.predicted_change(
                        anchor_x, genes, noise.to(anchor_x.device), batch_index, cat_covs, combination
                    )
                    yield cells, p, change.cpu().numpy(), None
                    continue
                expression, normalised = self.module.predict_from_anchor(
                    anchor_x, genes, batch_index, cat_covs, n_samples=n_samples,
                    use_prior_mean=use_prior_mean, residual=residual, generator=generator,
                    combination=combination,
                )
                yield cells, p, expression.cpu().numpy(), normalised.cpu().numpy()

    def _composition_terms(self, adata_control, perturbations, contexts, n_samples, changes) -> dict:
        """The terms of the effect-prior composition (:func:`composition_terms`), from one pass of ``changes``.

        Adds ``mean_correction``, the correction ``w_k (m - s)`` per ``"perturbation|context"``.
        """
        contexts = np.full(adata_control.n_obs, ALL_CONTEXTS) if contexts is None else contexts
        terms = composition_terms(self.effect_prior, perturbations, contexts, n_samples, adata_control.n_vars,
                                  ((cells, p, change) for cells, p, change, _ in changes),
                                  self._cell_term_weight, self.correction_weights_)
        position = {context: c for c, context in enumerate(terms["sums"].contexts)}
        rows = {f"{label}|{context}": terms["correction"][p, position[context]]
                for p, label in enumerate(perturbations) for context in pd.unique(contexts)}
        terms["mean_correction"] = pd.DataFrame(rows, index=adata_control.var_names.copy()).T
        return terms

    def _anchor_expression(self, adata_control: ad.AnnData, cells: slice):
        """log1p-normalised expression and library size of the anchors ``cells``."""
        chunk = _matrix_of(adata_control, self._layer)[cells]
        start = log1p_expression(ad.AnnData(X=chunk), None, self._data_scale)
        return start, np.asarray(chunk.sum(axis=1)).ravel()

    def _compose_cells(self, terms: dict, p: int, anchors, changes: np.ndarray):
        """``(X, log1p_norm)`` of anchors + prior + correction + cell term, ``(n_samples, cells, genes)``."""
        cells, start, library = anchors
        log1p_norm = compose_cells(terms, p, cells, start, changes)
        if self._data_scale == "log1p_norm":
            return log1p_norm, log1p_norm
        return np.clip(np.expm1(log1p_norm), 0, None) * library[None, :, None] / TARGET_SUM, log1p_norm

    @torch.inference_mode()
    def get_perturbation_programs(
        self,
        adata_control: ad.AnnData | None = None,
        perturbations: Sequence[str] | None = None,
        threshold: float = 0.5,
        batch_size: int | None = None,
    ) -> PerturbationPrograms:
        """Which latent dimensions, and through the decoder which genes, each perturbation moves.

        For every anchor control cell the prior mean is computed under the perturbation and
        under none; their difference, averaged over anchors, is the perturbation's latent shift.
        A dimension is *active* when the shift is at least ``threshold`` standard deviations of
        the anchors' basal states along it. Gene effects are the VAE's mean change in
        log1p-normalised expression at the prior mean: what the latent programme does through
        the decoder. They are not the mean that :meth:`predict` returns for a model with the
        effect prior (the default), which is the prior's shift plus only the validated share of
        this change (``correction_weights_``); use ``predict(..., aggregate="mean")`` for that.
        Most useful with ``perturbation_effect="sparse"``, where every effect passes through the
        (L1-penalised) shift; for the dense model the decoder also sees the perturbation
        directly, so the shift is only part of the story while ``gene_effects`` stays complete.

        Parameters
        ----------
        adata_control
            Anchor control cells; defaults to the training control cells.
        perturbations
            Labels (seen or unseen genes, combinations); defaults to the training perturbations.
        threshold
            Active-dimension threshold in standard deviations of the basal states.
        batch_size
            Control cells per forward pass; ``None`` uses ``scvi.settings.batch_size``.

        Returns
        -------
        :class:`~perturbscope.model.PerturbationPrograms`.

        Raises
        ------
        ValueError
            If ``threshold`` is negative, or for bad control cells or labels as in :meth:`predict`.

        Examples
        --------
        >>> import perturbscope as ps
        >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=4,
        ...                                          n_combinations=0, n_cells_per_condition=10)
        >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb)
        >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, perturbation_effect="sparse")
        >>> model.train(max_epochs=1, enable_progress_bar=False)
        >>> programs = model.get_perturbation_programs()
        >>> programs.latent_shift.shape
        (4, 4)
        """
        self._check_if_trained(warn=True)
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}.")
        adata_control, perturbations = self._prediction_inputs(adata_control, perturbations)
        gene_index = torch.as_tensor(self.encode_perturbations(perturbations))
        n_latent = self.module.n_latent
        shift_sums = np.zeros((len(perturbations), n_latent))
        effect_sums = np.zeros((len(perturbations), adata_control.n_vars))
        basal = []
        no_noise = torch.zeros(1, 1, n_latent)
        for _, anchor_x, batch_index, cat_covs in self._anchor_batches(adata_control, batch_size):
            basal.append(self.module.basal_state(anchor_x).cpu().numpy())
            for p in range(len(perturbations)):
                genes = gene_index[p].expand(len(anchor_x), -1).to(anchor_x.device)
                shift_sums[p] += self.module.latent_shift(anchor_x, genes).sum(dim=0).cpu().numpy()
                change, _ = self.module.predicted_change(
                    anchor_x, genes, no_noise.to(anchor_x.device), batch_index, cat_covs
                )
                effect_sums[p] += change[0].sum(dim=0).cpu().numpy()
        n_cells = adata_control.n_obs
        dims = [f"z{d}" for d in range(n_latent)]
        index = pd.Index(perturbations, name="perturbation")
        shift = pd.DataFrame(shift_sums / n_cells, index=index, columns=dims)
        spread = np.concatenate(basal).std(axis=0)
        standardized = shift / np.where(spread > 0, spread, np.inf)
        return PerturbationPrograms(
            latent_shift=shift,
            standardized_shift=standardized,
            active=standardized.abs() >= threshold,
            gene_effects=pd.DataFrame(effect_sums / n_cells, index=index, columns=adata_control.var_names.copy()),
            threshold=threshold,
        )

    def _prediction_inputs(
        self, adata_control: ad.AnnData | None, perturbations: Sequence[str] | None
    ) -> tuple[ad.AnnData, list[str]]:
        """Checked control cells (the training controls by default) and perturbation labels."""
        state = self._perturbation_state
        if adata_control is None:
            controls = is_control(self.adata.obs[state["perturbation_key"]], state["control_value"])
            adata_control = self.adata[np.asarray(controls)]
        if hasattr(adata_control, "mod"):  # a MuData: its expression modality, with the global obs (labels, contexts)
            adata_control = self._rna_controls(adata_control)
        if perturbations is None:
            perturbations = self.training_perturbations
        perturbations = check_perturbation_labels(perturbations, state["control_value"], state["combination_delimiter"])
        asked_controls = [p for p, c in zip(perturbations, canonical_labels(perturbations, state["control_value"],
                                                                              state["combination_delimiter"]))
                          if c == state["control_value"]]
        if asked_controls:
            raise ValueError(f"perturbations {asked_controls} are the control label: the control cells are the "
                             "anchors (their prediction is the anchors themselves); ask for perturbations.")
        if adata_control.n_obs == 0:
            raise ValueError("adata_control has no cells; pass at least one control cell to anchor the predictions.")
        check_var_names(adata_control.var_names, self.var_names, "adata")
        self._check_only_controls(adata_control)
        matrix = _matrix_of(adata_control, self._layer)
        if self.module.gene_likelihood in COUNT_LIKELIHOODS:
            # an anchor is normalised by its library: one without counts is named here, not mid-way
            check_cells_have_counts(matrix, adata_control.obs_names, self._layer, counts_too=True)
        else:
            check_log_normalized(matrix, self._layer)
        return adata_control, perturbations

    def _anchor_batches(self, adata_control: ad.AnnData, batch_size: int | None, progress: bool = True):
        """Yield ``(slice, anchor_x, batch_index, cat_covs)`` tensors of control cells, in order."""
        batch_size = settings.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        self.module.eval()
        device = self.device
        matrix = _matrix_of(adata_control, self._layer)
        batch_codes = self._category_codes(adata_control, SCVI_KEYS.BATCH_KEY)
        covariate_codes = self._covariate_codes(adata_control)
        n_cells = adata_control.n_obs
        starts = range(0, n_cells, batch_size)
        for start in track(starts, description="ScopeVI", disable=not progress or len(starts) <= 1):
            cells = slice(start, min(start + batch_size, n_cells))
            chunk = matrix[cells]
            anchor_x = torch.as_tensor(chunk.toarray() if sparse.issparse(chunk) else np.asarray(chunk),
                                       dtype=torch.float32, device=device)
            batch_index = (None if batch_codes is None else
                           torch.as_tensor(batch_codes[cells, None], dtype=torch.long, device=device))
            cat_covs = (None if covariate_codes is None else
                        torch.as_tensor(covariate_codes[cells], dtype=torch.long, device=device))
            yield cells, anchor_x, batch_index, cat_covs

    def _prediction_layout(self, adata_control: ad.AnnData) -> tuple[pd.DataFrame, dict]:
        """The anchors' ``obs`` columns carried into a prediction, and its ``uns["perturbscope"]``."""
        context_columns = [k for k in (self._original_key(REGISTRY_KEYS.CONTEXT_KEY),
                                       self._original_key(SCVI_KEYS.BATCH_KEY)) if k is not None]
        if SCVI_KEYS.CAT_COVS_KEY in self.adata_manager.data_registry:
            context_columns += list(self.adata_manager.get_state_registry(SCVI_KEYS.CAT_COVS_KEY).field_keys)
        context_columns = list(dict.fromkeys(k for k in context_columns if k in adata_control.obs))
        provenance = {
            "model": "ScopeVI",
            "gene_likelihood": self.module.gene_likelihood,
            "perturbation_key": self._perturbation_state["perturbation_key"],  # where measured cells hold labels
            **({} if self._layer is None else {"layer": self._layer}),  # the layer read, for plots
            "context_columns": context_columns,
            "gene_embeddings": {str(k): str(v) for k, v in self._perturbation_state.get("provenance", {}).items()},
        }
        return adata_control.obs[context_columns], provenance

    def _category_codes(self, adata: ad.AnnData, registry_key: str) -> np.ndarray | None:
        key = self._original_key(registry_key)
        if key is None:
            return None
        if key not in adata.obs.columns:
            raise KeyError(f"adata.obs has no column {key!r}, which the model was set up with.")
        mapping = pd.Index(self.adata_manager.get_state_registry(registry_key).categorical_mapping)
        values = adata.obs[key].astype(str)
        codes = mapping.get_indexer(values)
        if (codes < 0).any():
            unseen = sorted(set(values[codes < 0]))
            raise ValueError(
                f"adata.obs[{key!r}] has values not seen in training: {unseen[:10]}; known values "
                f"are {mapping.tolist()[:10]}."
            )
        return codes

    def _covariate_codes(self, adata: ad.AnnData) -> np.ndarray | None:
        if SCVI_KEYS.CAT_COVS_KEY not in self.adata_manager.data_registry:
            return None
        state = self.adata_manager.get_state_registry(SCVI_KEYS.CAT_COVS_KEY)
        columns = []
        for key in state.field_keys:
            mapping = pd.Index(state.mappings[key])
            values = adata.obs[key].astype(str)
            codes = mapping.get_indexer(values)
            if (codes < 0).any():
                raise ValueError(
                    f"adata.obs[{key!r}] has values not seen in training: "
                    f"{sorted(set(values[codes < 0]))[:10]}."
                )
            columns.append(codes)
        return np.stack(columns, axis=1) if columns else None

    @staticmethod
    def _control_contexts(adata_control: ad.AnnData, context_key: str | None) -> np.ndarray | None:
        """Each control cell's context as a string; ``None`` without the column."""
        if context_key is None or context_key not in adata_control.obs:
            return None
        column = adata_control.obs[context_key]
        if column.isna().any():
            raise ValueError(f"adata_control.obs[{context_key!r}] has {int(column.isna().sum())} missing values; "
                             "every control cell needs its context (they would be predicted as a context 'nan').")
        return column.astype(str).to_numpy()

    def _check_only_controls(self, adata: ad.AnnData) -> None:
        state = self._perturbation_state
        key = state["perturbation_key"]
        if key not in adata.obs.columns:
            warnings.warn(f"adata_control.obs has no column {key!r}: every cell is taken as a control cell "
                          "(for a MuData model, pass cells whose obs holds the labels).", UserWarning, stacklevel=4)
        else:
            labels = adata.obs[key].astype(str)
            other = pd.unique(labels[~is_control(labels, state["control_value"])])
            if len(other):
                raise ValueError(
                    f"adata_control must hold control cells only; adata.obs[{key!r}] also has "
                    f"{list(other[:10])}. Pass adata[adata.obs[{key!r}] == {state['control_value']!r}]."
                )

