"""Multimodal ScopeVI: surface protein (and ATAC) predicted from the same anchors as RNA.

A model set up with ``modalities={"rna_layer": ..., "protein_layer": ..., "atac_layer": ...}``
trains :class:`~perturbscope.module.MultimodalScopeVAE` (one latent space, a decoder per
modality) and, with the effect prior, fits one :class:`~perturbscope.effects.EffectPrior` per
extra modality on that modality's log1p-normalised pseudobulks (counts normalised to 1e4 per
cell, the same estimators and cross-fitting as RNA's prior). For every anchor control cell
``a``, perturbation ``p`` and context ``c`` a modality ``m`` is predicted as::

    log1p(y_pred) = log1p(y_a) + s_m(p, c) + g_k * (d_m(a, p) - mean_c d_m(., p))

``s_m`` is modality ``m``'s prior shift, ``d_m`` the modality decoder's change under the
perturbation for the anchor's RNA-anchored latent draw, and ``g_k`` the weight of the cell-level
response that RNA's held-out validation chose for the query's kind (see
:mod:`perturbscope.model._effect_correction`). The mean of a modality's prediction is therefore
its prior's (no learned mean correction is added to protein or ATAC: it has not been validated
per modality); the decoder adds each cell's state-dependent response. RNA is predicted exactly
as by an RNA-only model. Cells without protein (all-zero rows) are left out of the protein
prior and cannot serve as anchors for protein predictions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from copy import deepcopy
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings

from .._constants import OUTPUT_KEYS, TARGET_SUM
from ..data import (
    ALL_CONTEXTS,
    PredictionMeans,
    check_count_data,
    check_var_names,
    log1p_expression,
    prediction_anndata,
)
from ..effects import EffectPrior
from ..module import MultimodalScopeVAE
from ..module._multimodal import ATAC_KEY, MODALITY_KEYS, PROTEIN_KEY, modality_features
from ._composition import compose_cells, composition_terms
from ._effect_correction import Loader, few_shot_blends, prior_with_query_groups
from ._multimodal_setup import check_modality_rows

#: The normalised layer of every modality's prediction (counts normalised to 1e4, log1p).
NORMALISED_LAYER = OUTPUT_KEYS.LOG1P_NORM_LAYER


def _registered_matrix(data: ad.AnnData, layer: str | None):
    return data.X if layer is None else data.layers[layer]


class MultimodalMixin:
    """Training and prediction of protein and ATAC for :class:`~perturbscope.ScopeVI`."""

    # ------------------------------------------------------------------ registry views
    @property
    def modalities(self) -> dict[str, str]:
        """``{registry key: modality name}`` of the registered modalities (RNA's key is ``"X"``)."""
        registry = self.adata_manager.data_registry
        return {key: registry[key].get("mod_key") for key in (SCVI_KEYS.X_KEY, *MODALITY_KEYS) if key in registry}

    def _extra_modalities(self) -> dict[str, str]:
        return {k: v for k, v in self.modalities.items() if k != SCVI_KEYS.X_KEY}

    def _modality_layer(self, key: str) -> str | None:
        location = self.adata_manager.data_registry[key]
        return None if location.attr_name == "X" else location.attr_key

    def _modality_var_names(self, key: str) -> pd.Index:
        state = self.adata_manager.get_state_registry(key)
        return pd.Index(np.asarray(state.column_names).astype(str))

    def _module_for_modalities(self):
        return MultimodalScopeVAE if self._extra_modalities() else self._module_cls

    def _modality_sizes(self) -> dict[str, int]:
        extras = self._extra_modalities()
        if not extras:
            return {}
        return {"n_proteins": len(self._modality_var_names(PROTEIN_KEY)) if PROTEIN_KEY in extras else 0,
                "n_peaks": len(self._modality_var_names(ATAC_KEY)) if ATAC_KEY in extras else 0}

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = 100,
        batch_size: int = 128,
        datasplitter_kwargs: dict | None = None,
        loader: Loader = "auto",
        **kwargs,
    ):
        """Train ScopeVI; with extra modalities, then fit each extra modality's effect prior.

        Parameters
        ----------
        max_epochs, batch_size, datasplitter_kwargs, loader, **kwargs
            As for :meth:`perturbscope.model._effect_correction.EffectCorrectionMixin.train`:
            the RNA effect prior, the validated correction and the VAE are trained there.
        """
        own_priors = (self._extra_modalities() and not getattr(self, "inherited_prior_", False)
                      and self._with_effect_prior)
        # before training: a modality without measured controls is refused, unmeasured contexts are named
        data = {key: self._cells_in_measured_contexts(key, self._modality_training_data(key))
                for key in self._extra_modalities()} if own_priors else {}
        result = super().train(max_epochs=max_epochs, batch_size=batch_size,
                               datasplitter_kwargs=datasplitter_kwargs, loader=loader, **kwargs)
        inherited = getattr(self, "reference_modality_states_", None)
        if own_priors and self.effect_prior is not None:
            priors = {key: self._fit_modality_prior(cells) for key, cells in data.items()}
            self.modality_prior_states_ = {key: prior.state() for key, prior in priors.items()}
            # few-shot blends for queries read from a folder, as for RNA (few_shot_blends_)
            self.modality_few_shot_blends_ = {key: few_shot_blends(prior, data[key], "counts")
                                              for key, prior in priors.items()}
        elif inherited and self._has_perturbed_cells():  # a query's perturbed cells join each prior
            reference = getattr(self, "_prior_reference", None)
            blends = getattr(self, "modality_few_shot_blends_", None) or {}
            self.modality_prior_states_ = {}
            for key, state in inherited.items():
                query = self._query_cells_with_controls(key, state)
                self.modality_prior_states_[key] = state if query.n_obs == 0 else prior_with_query_groups(
                    state, self._prior_embeddings(), query,
                    None if reference is None else reference._modality_training_data(key), "counts",
                    blends.get(key)).state()
        self._modality_priors = {}  # rebuilt from the states on first use
        return result

    def _query_cells_with_controls(self, key: str, state: dict) -> ad.AnnData:
        """The query's cells measured in modality ``key``, in contexts with measured controls.

        Measured in the query, or in the reference's prior ``state``.
        """
        control = self._perturbation_state["control_value"]
        known = set(np.asarray(state["means_context"])[np.asarray(state["means_perturbation"]) == control])
        return self._cells_in_measured_contexts(key, self._modality_training_data(key), known, query=True)

    def _cells_in_measured_contexts(self, key: str, data: ad.AnnData, known=frozenset(), query: bool = False):
        """``data`` (cells measured in modality ``key``) in contexts with measured control cells.

        A context whose controls have no measurement in the modality (all-zero rows) has no
        baseline to measure that modality's shifts from: its cells are left out of the
        modality's prior, with a warning, and its perturbations stay ``"unseen_context"`` there.
        ``known`` contexts have such a baseline already (a reference's). Training needs one
        measured control at least; a ``query`` without any keeps the reference's prior.
        """
        control = self._perturbation_state["control_value"]
        labels, contexts = data.obs["perturbation"].to_numpy(), data.obs["context"].to_numpy()
        keep = np.isin(contexts, list(set(contexts[labels == control]) | set(known)))
        name, where = self.modalities.get(key, key), " in the query" if query else ""
        if not keep.any() and not query:
            raise ValueError(f"modality {name!r} has no measured control cell (every control's row is all zero): "
                             "there is no baseline to measure its perturbations' shifts from.")
        if not keep.all():
            column = self._context_column or "context"
            warnings.warn(f"modality {name!r}: contexts {sorted(set(contexts[~keep]))} of obs[{column!r}] have no "
                          f"measured control cells{where}; their cells are left out of that modality's effect prior.",
                          UserWarning, stacklevel=3)
        return data[keep]

    def _modality_training_data(self, key: str) -> ad.AnnData:
        """Counts of modality ``key`` with ``perturbation``/``context`` labels, cells that have them."""
        matrix = self.adata_manager.get_from_registry(key)
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        expression = self._training_expression()  # RNA labels: the same cells, the same order
        data = ad.AnnData(X=matrix, obs=expression.obs.copy(),
                          var=pd.DataFrame(index=self._modality_var_names(key)))
        return data[totals > 0]

    def _fit_modality_prior(self, cells: ad.AnnData) -> EffectPrior:
        state = self._perturbation_state
        prior = EffectPrior(self._prior_embeddings(), seed=int(self.init_params_["non_kwargs"].get("prior_seed", 0)))
        return prior.fit(cells, "perturbation", state["control_value"],
                         "context" if self._context_column is not None else None, data_scale="counts",
                         delimiter=state["combination_delimiter"])

    def modality_prior(self, key: str) -> EffectPrior | None:
        """The fitted effect prior of an extra modality (registry key ``"proteins"`` or ``"atac"``)."""
        states = getattr(self, "modality_prior_states_", None)
        if not states or key not in states:
            return None
        cache = self.__dict__.setdefault("_modality_priors", {})
        if key not in cache:
            cache[key] = EffectPrior.from_state(states[key], self._prior_embeddings())
        return cache[key]

    # ------------------------------------------------------------------ query (scArches)
    @classmethod
    def load_query_data(
        cls,
        adata,
        reference_model,
        freeze_decoder: bool | Literal["shared"] = "shared",
        freeze_perturbation_encoder: bool = True,
        unfrozen: bool = False,
    ):
        """:meth:`QueryMixin.load_query_data <perturbscope.model._query.QueryMixin.load_query_data>`, multimodal too.

        A reference set up with protein and/or ATAC needs the query as a MuData holding every
        modality it was set up with (a cell without a protein measurement is an all-zero row);
        the query model decodes them all, and keeps the reference's effect prior of each extra
        modality beside RNA's, so its protein and ATAC predictions are composed as the
        reference's are (see :mod:`perturbscope.model._multimodal`). Arguments and the returned
        model are as for the RNA-only method.

        Raises
        ------
        TypeError
            If the reference is multimodal and ``adata`` is not a MuData.
        KeyError
            If the MuData lacks a modality the reference was set up with.
        """
        if isinstance(reference_model, str | os.PathLike):
            reference_model = cls._load_reference(reference_model, adata)
        extras = reference_model._extra_modalities()
        if extras and not hasattr(adata, "mod"):
            raise TypeError(
                f"the reference model was set up with the modalities {list(reference_model.modalities.values())}; "
                f"pass the query as a MuData holding all of them, not a {type(adata).__name__}."
            )
        model = super().load_query_data(adata, reference_model, freeze_decoder=freeze_decoder,
                                        freeze_perturbation_encoder=freeze_perturbation_encoder, unfrozen=unfrozen)
        states = getattr(reference_model, "modality_prior_states_", None)
        if states is not None:
            model.modality_prior_states_ = deepcopy(states)
            model.reference_modality_states_ = deepcopy(states)  # a query's cells join them at train()
            model.modality_few_shot_blends_ = deepcopy(getattr(reference_model, "modality_few_shot_blends_", None))
            model._modality_priors = {}
        return model

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        adata_control=None,
        perturbations: Sequence[str] | None = None,
        n_samples: int = 1,
        aggregate: Literal["mean"] | None = None,
        use_prior_mean: bool = False,
        residual: bool = True,
        combination: Literal["additive", "joint"] = "additive",
        batch_size: int | None = None,
        seed: int | None = None,
        interval_levels: Sequence[float] = (0.8, 0.95),
        out=None,
    ):
        """Predict perturbed cells; a model with protein or ATAC returns a MuData.

        For an RNA-only model this is :meth:`PredictionMixin.predict
        <perturbscope.model._prediction.PredictionMixin.predict>`, which documents every
        argument and the AnnData it returns. For a model set up with protein and/or ATAC,
        ``adata_control`` is a MuData of control cells (e.g.
        ``mdata[mdata.obs["perturbation"] == "control"]``; ``None``: the training controls)
        holding every registered modality (others are ignored), and the result is a
        :class:`mudata.MuData` with one AnnData per registered modality, under its modality name,
        all with the same ``obs`` (``perturbation``, ``control_cell``, ``sample`` and the context
        columns; with ``aggregate="mean"`` one row per perturbation and context, ``n_cells``):

        * RNA: exactly what the RNA-only ``predict`` returns for the RNA modality;
        * protein and ATAC: ``X`` expected counts at the anchor's library size of that modality,
          ``layers["log1p_norm"]`` log1p of counts normalised to 1e4 per cell (the scale of the
          modality's effect prior), and with ``aggregate="mean"`` and the effect prior the
          interval layers ``log1p_norm_lower_80`` etc. from that modality's prior. See
          :mod:`perturbscope.model._multimodal` for how they are composed. ``residual=False``
          decodes every modality from the VAE alone (no prior shift, no interval layers).

        Memory: with ``aggregate="mean"`` every modality is streamed over chunks of ``batch_size``
        control cells, keeping only running sums per (perturbation, context), as RNA is. Without
        it, the cells of every modality are returned, ``perturbations x n_samples x controls x
        features`` floats each. Either way the draws depend on ``seed`` and ``batch_size``.

        Parameters
        ----------
        adata_control
            Control cells: AnnData for an RNA-only model, MuData for a multimodal one.
        perturbations, n_samples, aggregate, use_prior_mean, residual, combination, batch_size, seed, interval_levels
            As for the RNA-only ``predict``; applied to every modality.
        out
            Write predicted cells to a file (RNA-only models).

        Returns
        -------
        AnnData (RNA-only model) or MuData (multimodal model), as above.

        Raises
        ------
        TypeError
            If a multimodal model is given an AnnData (e.g. only ``mdata["rna"]``).
        KeyError
            If a registered modality is missing from the MuData.
        ValueError
            For ``out`` with a multimodal model, another modality's features, non-count data,
            anchors without counts of a modality, or anything the RNA-only ``predict`` refuses.
        """
        options = {"n_samples": n_samples, "aggregate": aggregate, "use_prior_mean": use_prior_mean,
                   "residual": residual, "combination": combination, "batch_size": batch_size, "seed": seed,
                   "interval_levels": interval_levels}
        extras = self._extra_modalities()
        if not extras:
            return super().predict(adata_control, perturbations, out=out, **options)
        if out is not None:
            raise ValueError(
                "out= (writing predicted cells to a file) is for RNA-only models; a multimodal model "
                "returns a MuData: predict in smaller sets of perturbations and write each with mdata.write()."
            )
        mdata = self._multimodal_controls(adata_control)
        rna = self._rna_controls(mdata)
        # every modality's anchors are checked before the RNA pass, which is the long one
        anchors = {key: self._modality_controls(key, mdata.mod[name], name) for key, name in extras.items()}
        rna_prediction = super().predict(rna, perturbations, **options)
        labels = [str(p) for p in (perturbations if perturbations is not None else self.training_perturbations)]
        predictions = {self.modalities[SCVI_KEYS.X_KEY]: rna_prediction}
        for key, name in extras.items():
            predictions[name] = self._predict_modality(key, anchors[key], rna, labels, rna_prediction, options)
        return _as_mudata(predictions, rna_prediction.obs)

    def _multimodal_controls(self, data):
        import mudata as md

        names = list(self.modalities.values())
        if data is None:  # the training controls measured in every modality (a cell may lack protein)
            state = self._perturbation_state
            labels = self.adata.obs[state["perturbation_key"]].astype(str)
            keep = (labels == state["control_value"]).to_numpy()
            for key, name in self._extra_modalities().items():
                matrix = _registered_matrix(self.adata.mod[name], self._modality_layer(key))
                keep &= np.asarray(matrix.sum(axis=1)).ravel() > 0
            if not keep.any():
                raise ValueError("no training control cell has counts in every modality; pass control cells.")
            return self.adata[keep]
        if not isinstance(data, md.MuData):
            raise TypeError(
                f"this model was set up with the modalities {names}; pass a MuData of control cells "
                f"holding all of them (e.g. mdata[controls]), not a {type(data).__name__}."
            )
        missing = [n for n in names if n not in data.mod]
        if missing:
            raise KeyError(f"the MuData has no modality {missing}; the model needs {names}, it has {list(data.mod)}.")
        if data.n_obs == 0:
            raise ValueError("the MuData of control cells is empty.")
        check_modality_rows(data, names)  # anchors of every modality are the same cells
        return data

    def _rna_controls(self, mdata) -> ad.AnnData:
        """The RNA modality with the MuData's global ``obs`` (labels and contexts live there)."""
        name = self.modalities[SCVI_KEYS.X_KEY]
        if name is None:
            raise TypeError("this model was set up on an AnnData; pass an AnnData of control cells, not a MuData.")
        if name not in mdata.mod:
            raise KeyError(f"the MuData has no modality {name!r}, the expression the model was set up with; "
                           f"it has {list(mdata.mod)}.")
        check_modality_rows(mdata, [name])  # labels and contexts come from the global obs, by row
        rna = mdata.mod[name]
        layer = self._layer
        if layer is not None and layer not in rna.layers:
            raise KeyError(f"layer {layer!r} not found in the RNA modality; layers are {list(rna.layers)}.")
        return ad.AnnData(
            X=rna.X if layer is None else None, layers={layer: rna.layers[layer]} if layer else None,
            obs=mdata.obs.copy(), var=pd.DataFrame(index=rna.var_names.copy()),
        )

    def _check_modality_order(self, key: str, data: ad.AnnData, name: str) -> None:
        """Modality ``key`` (``data``, named ``name`` in the MuData) holds the model's features, in order."""
        check_var_names(data.var_names, self._modality_var_names(key), f"mdata[{name!r}]", modality_features(key))

    def _modality_controls(self, key: str, data: ad.AnnData, name: str):
        """The anchors' counts of modality ``key``, checked, and their library sizes."""
        self._check_modality_order(key, data, name)
        layer = self._modality_layer(key)
        if layer is not None and layer not in data.layers:
            raise KeyError(f"layer {layer!r} not found in modality {name!r}; layers are {list(data.layers)}.")
        matrix = _registered_matrix(data, layer)
        try:
            check_count_data(matrix, layer)
        except ValueError as error:
            raise ValueError(f"modality {name!r}: {error}") from None
        library = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        if (library == 0).any():
            raise ValueError(
                f"{int((library == 0).sum())} of {data.n_obs} control cells have no counts in modality "
                f"{name!r} (e.g. {list(data.obs_names[library == 0][:5])}); a {name!r} prediction starts from "
                "each anchor's own counts, so pass control cells that were measured in it."
            )
        return matrix, library

    def _predict_modality(self, key, anchors, rna, labels, rna_prediction, options) -> ad.AnnData:
        """Modality ``key`` predicted from the anchors ``rna``, chunk by chunk of anchors.

        ``anchors`` is :meth:`_modality_controls`' ``(counts, library sizes)`` of the same cells.

        As RNA's: with ``aggregate="mean"`` only running sums per (perturbation, context) are
        kept, and with the prior the decoder's draws are made twice from the same seeded
        generator, first for its mean change per context, which every cell's composition needs.
        """
        name = self.modalities[key]
        matrix, library = anchors
        var_names = self._modality_var_names(key)  # the anchors' own, checked in _modality_controls
        gene_index = torch.as_tensor(self.encode_perturbations(labels))
        contexts = self._control_contexts(rna, self._context_column)
        prior = self.modality_prior(key) if options["residual"] else None  # residual=False: the VAE alone

        def draws():  # the same seeded draws, in the same order, on every call
            return self._modality_chunks(key, rna, gene_index, options)

        n_samples, n_features = options["n_samples"], matrix.shape[1]
        anchor_contexts = contexts if contexts is not None else np.full(rna.n_obs, ALL_CONTEXTS)
        terms = (None if prior is None
                 else composition_terms(prior, labels, anchor_contexts, n_samples, n_features, draws(),
                                        self._cell_term_weight))
        if options["aggregate"] == "mean":
            means = PredictionMeans(labels, contexts, self._context_column, n_samples, n_features)
        else:
            means = None
            X = np.empty((len(labels), n_samples, rna.n_obs, n_features), dtype=np.float32)
            log1p_norm = np.empty_like(X)
        anchors = None
        for cells, p, change in draws():
            if anchors is None or anchors[0] != cells:
                anchors = (cells, log1p_expression(ad.AnnData(X=matrix[cells]), None, "counts").astype(np.float32))
            normalised = self._compose_modality(terms, p, anchors, change)
            expected = np.clip(np.expm1(normalised), 0, None) * library[cells][None, :, None] / TARGET_SUM
            if means is not None:
                means.add(p, cells, expected, normalised)
            else:
                X[p, :, cells], log1p_norm[p, :, cells] = expected, normalised
        provenance = {**rna_prediction.uns.get(OUTPUT_KEYS.PROVENANCE_UNS, {}), "modality": name,
                      "likelihood": "nb_mixture" if key == PROTEIN_KEY else "poisson",
                      "normalisation": "log1p of counts normalised to 1e4 per cell"}
        provenance.pop("mean_correction", None)
        if means is None:
            columns = [c for c in provenance.get("context_columns", []) if c in rna.obs]
            return prediction_anndata(labels, rna.obs[columns], X.reshape(-1, n_features),
                                      log1p_norm.reshape(-1, n_features), var_names, n_samples, provenance)
        prediction = means.to_anndata(var_names, provenance)
        if prior is not None:
            self._add_modality_intervals(key, prediction, options["interval_levels"])
        return prediction

    def _modality_chunks(self, key, rna, gene_index, options):
        """Yield ``(cells, perturbation index, change)``: the decoder's change of modality ``key``.

        ``change`` is ``(n_samples, cells, features)``; the draws come from one generator seeded
        with the prediction's seed (offset per modality), so a second call yields the same numbers.
        """
        seed = options["seed"] if options["seed"] is not None else (settings.seed or 0)
        generator = torch.Generator().manual_seed(int(seed) + 1 + MODALITY_KEYS.index(key))
        n_samples = options["n_samples"]
        for cells, anchor_x, batch_index, cat_covs in self._anchor_batches(rna, options["batch_size"], progress=False):
            for p in range(len(gene_index)):
                with torch.inference_mode():
                    genes = gene_index[p].expand(len(anchor_x), -1).to(anchor_x.device)
                    shape = (n_samples, len(anchor_x), self.module.n_latent)
                    noise = (torch.zeros(shape) if options["use_prior_mean"]
                             else torch.randn(shape, generator=generator)).to(anchor_x.device)
                    change, _ = self.module.predicted_modality_change(
                        key, anchor_x, genes, noise, batch_index, cat_covs, options["combination"]
                    )
                yield cells, p, change.cpu().numpy()

    def _compose_modality(self, terms, p: int, anchors, change: np.ndarray) -> np.ndarray:
        """log1p-normalised anchors + prior shift + weighted cell-level response (module docstring)."""
        cells, start = anchors
        if terms is None:  # the VAE-only design (or residual=False): anchor plus the decoder's change
            return np.clip(start[None] + change, 0, None)
        return compose_cells(terms, p, cells, start, change)

    def _add_modality_intervals(self, key: str, aggregated: ad.AnnData, levels) -> None:
        """Interval layers of a mean prediction from the modality's prior (no correction to stretch to)."""
        prior = self.modality_prior(key)
        column = self._context_column
        keys = [(str(row["perturbation"]), str(row[column]) if column in aggregated.obs else ALL_CONTEXTS)
                for _, row in aggregated.obs.iterrows()]
        mean = aggregated.layers[NORMALISED_LAYER]
        for level in levels:
            half = np.vstack([prior.half_widths([p], c, level).to_numpy()[0] for p, c in keys])
            tag = int(round(level * 100))
            aggregated.layers[f"{NORMALISED_LAYER}_lower_{tag}"] = (mean - half).astype(np.float32)
            aggregated.layers[f"{NORMALISED_LAYER}_upper_{tag}"] = (mean + half).astype(np.float32)


def _as_mudata(predictions: dict[str, ad.AnnData], obs: pd.DataFrame):
    """A MuData of per-modality predictions that share ``obs`` (also set as its global ``obs``)."""
    import mudata as md

    for prediction in predictions.values():
        if not prediction.obs_names.equals(obs.index):
            raise RuntimeError("modality predictions are out of step; please report this.")
    result = md.MuData(predictions)
    for column in obs.columns:
        result.obs[column] = obs[column].to_numpy()
    result.uns[OUTPUT_KEYS.PROVENANCE_UNS] = {"model": "ScopeVI", "modalities": list(predictions)}
    return result



