"""ScopeVI on top of the baselines: an effect prior plus a validated, learned correction.

With ``effect_prior=True`` (the default) a prediction is, for every anchor control cell ``a``,
perturbation ``p`` and the anchor's context ``c``::

    log1p(x_pred) = log1p(x_a) + s(p, c) + w_k * (m(p, c) - s(p, c)) + g_k * (d(a, p) - m(p, c))

* ``s(p, c)``: the effect prior (:class:`perturbscope.effects.EffectPrior`), the mean shift from
  the baselines' estimator that cross-fitting inside the training data chose for the query's
  kind ``k`` (seen, few-shot, combination, unseen gene, partial combination, unseen context);
* ``d(a, p)``: the VAE's predicted change for anchor ``a`` (:meth:`ScopeVAE.predicted_change`),
  and ``m(p, c)`` its mean over the context's anchors;
* ``w_k``: the weight of the learned mean correction for kind ``k``, chosen on training
  perturbations that the VAE did not see: before training, some single genes (with the
  combinations that hold them), some combinations and the perturbed cells of one context (two
  with four or more training contexts, :data:`VALIDATION_CONTEXTS`) are held out of the VAE's
  training cells; after training,
  ``w_k`` in ``{0, 0.25, 0.5, 0.75, 1}`` with the best held-out Pearson correlation of
  ``s' + w (m - s')`` with the observed shift (``s'`` the prior refitted without them; within
  0.02 of the best, the lowest error) is kept, among the weights whose held-out error is below
  the prior's own (``w = 0``) by at least one standard error of the paired difference over the
  held-out queries (with fewer than 3 queries: no larger). Where a kind cannot be
  validated ``w_k = 0``: the prediction's mean is the prior's, and so is its size.

The last term, zero on average over a context's anchors, is the VAE's cell-state-dependent
response, weighted by ``g_k`` in ``{0, 0.5, 1}``, chosen on the same held-out queries by the
energy distance between predicted and observed cells (``g_k = 0`` where a kind cannot be
validated: the anchors' own spread). The mean of predicted cells is the validated one; their
distribution is ScopeVI's to the extent that it was validated. ``effect_prior=False`` restores the earlier design (the VAE alone).
"""

from __future__ import annotations

import warnings
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.model.base import UnsupervisedTrainingMixin
from sklearn.decomposition import PCA

from .._constants import OUTPUT_KEYS, REGISTRY_KEYS
from .._logging import quiet_lightning
from ..data import (
    ALL_CONTEXTS,
    DeviceDataSplitter,
    StreamedDataSplitter,
    canonical_labels,
    energy_distance,
    is_control,
    is_out_of_core,
    log1p_expression,
    out_of_core_source,
    streamed_pseudobulk,
)
from ..effects import KINDS, EffectPrior, pick, top_change_scores
from ..effects._prior import MIN_HELD_OUT
from ..module._scopevae import COUNT_LIKELIHOODS

#: Contexts held out of the VAE to validate the unseen-context correction, where at least twice as
#: many are in training (one context with two or three).
VALIDATION_CONTEXTS = 2
#: Candidate weights of the learned mean correction.
CORRECTION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Candidate weights of the VAE's cell-level response (the term that is zero on average).
CELL_TERM_WEIGHTS = (0.0, 0.5, 1.0)
#: Share of training single genes and combinations held out of the VAE to validate the weights.
VALIDATION_FRACTION = 0.2
#: The data paths of :meth:`EffectCorrectionMixin.train`.
Loader = Literal["auto", "anndata", "device", "streamed"]
LOADERS = ("auto", "anndata", "device", "streamed")


class EffectCorrectionMixin:
    """Training and composition of ScopeVI's effect prior and learned correction."""

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = 100,
        batch_size: int = 128,
        datasplitter_kwargs: dict | None = None,
        loader: Loader = "auto",
        **kwargs,
    ):
        """Train ScopeVI; with the effect prior, fit it and validate the learned correction.

        Parameters
        ----------
        max_epochs
            Passes over the training cells.
        batch_size
            Cells per step.
        datasplitter_kwargs
            Passed to the data splitter; with ``effect_prior=True`` its ``external_indexing``
            is set to hold the validation perturbations' cells out of training.
        loader
            The data path, i.e. the data splitter of this call:
            ``"anndata"``: scvi-tools' loader over the registered AnnData with control anchors
            (:class:`~perturbscope.data.AnchoredDataSplitter`);
            ``"device"``: the whole data and anchors on the accelerator
            (:class:`~perturbscope.data.DeviceDataSplitter`; in-memory data only);
            ``"streamed"``: rows read from disk in shuffled blocks, anchors from a bounded control
            bank (:class:`~perturbscope.data.StreamedDataSplitter`; options such as
            ``chunk_size``, ``buffer_chunks`` and ``max_controls_per_group`` go in
            ``datasplitter_kwargs``);
            ``"auto"``: ``"streamed"`` when the registered expression is out of core (an AnnData
            opened with ``backed="r"``, or :func:`perturbscope.data.read_soma`), else
            ``"anndata"``. With out-of-core expression the effect prior's pseudobulks are also
            computed in one streamed pass (:func:`perturbscope.data.streamed_pseudobulk`).
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`.

        Raises
        ------
        ValueError
            For an unknown ``loader``, or ``"device"`` with out-of-core expression.

        Notes
        -----
        Training with the effect prior also cross-fits few-shot blends at 5, 10, 25 and 50 cells
        per group for later queries (``few_shot_blends_``, see :func:`few_shot_blends`).
        A model made by :meth:`load_query_data` keeps its reference's correction weights and
        effect prior; training it fine-tunes the VAE, and the query's perturbed cells, if any,
        join the prior as measured groups (a group new to the prior is a few-shot query at any
        size, see :meth:`perturbscope.effects.EffectPrior.add_groups`). Lightning's informational
        lines (accelerator and logger tips) are silenced during the call and its logger levels
        restored afterwards, as are two of its warnings that say nothing about the user's data
        (:data:`LIGHTNING_NOISE`); everything else, the progress bar included, still shows.
        """
        splitter_cls = self._splitter_class(loader)
        had_own = "_data_splitter_cls" in self.__dict__
        previous = self.__dict__.get("_data_splitter_cls")
        self._data_splitter_cls = splitter_cls  # scvi-tools' train builds the splitter from it
        try:
            with quiet_lightning(), warnings.catch_warnings():
                for message in LIGHTNING_NOISE:
                    warnings.filterwarnings("ignore", message=message)
                return self._train_with_prior(max_epochs, batch_size, datasplitter_kwargs, **kwargs)
        finally:
            if had_own:
                self._data_splitter_cls = previous
            else:
                del self._data_splitter_cls

    @property
    def _out_of_core(self) -> bool:
        """Whether the registered expression is read from disk (backed or SOMA)."""
        return is_out_of_core(self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY))

    def _splitter_class(self, loader: str):
        """The data splitter of a ``loader`` choice (see :meth:`train`)."""
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {list(LOADERS)}, got {loader!r}.")
        if loader == "device" and self._out_of_core:
            source = out_of_core_source(self.adata_manager.adata, self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY))
            raise ValueError(
                "loader='device' copies all the expression to the device, but the registered expression "
                f"is out of core ({source}); use loader='streamed', or load it with adata.to_memory() "
                "and set it up again."
            )
        if loader == "streamed" or (loader == "auto" and self._out_of_core):
            return StreamedDataSplitter
        return DeviceDataSplitter if loader == "device" else type(self)._data_splitter_cls

    def _train_with_prior(self, max_epochs, batch_size, datasplitter_kwargs, **kwargs):
        query = getattr(self, "inherited_prior_", False)
        if query:  # the VAE is fine-tuned, the reference's prior takes the query's cells
            self._add_query_groups_to_prior()
        if query or not self._with_effect_prior:
            return UnsupervisedTrainingMixin.train(
                self, max_epochs=max_epochs, batch_size=batch_size, datasplitter_kwargs=datasplitter_kwargs, **kwargs
            )
        expression = self._training_expression()
        prior = EffectPrior(self._prior_embeddings(), seed=int(self.init_params_["non_kwargs"].get("prior_seed", 0)))
        arguments = (expression, "perturbation", self._perturbation_state["control_value"],
                     "context" if self._context_column is not None else None)
        options = {"data_scale": self._data_scale, "delimiter": self._perturbation_state["combination_delimiter"]}
        if self._out_of_core:
            _fit_prior_streamed(prior, *arguments, **options)
        else:
            prior.fit(*arguments, **options)
        held, held_cells = self._validation_queries(prior, expression)
        splitter = dict(datasplitter_kwargs or {})
        if held_cells.any():
            splitter["external_indexing"] = [
                np.flatnonzero(~held_cells), np.flatnonzero(held_cells), np.array([], dtype=int)
            ]
        UnsupervisedTrainingMixin.train(
            self, max_epochs=max_epochs, batch_size=batch_size, datasplitter_kwargs=splitter, **kwargs
        )
        self._effect_prior = prior
        self.effect_prior_state_ = prior.state()
        self.few_shot_blends_ = few_shot_blends(prior, expression, self._data_scale)
        self.correction_weights_, self.correction_scores_ = self._choose_weights(prior, expression, held)
        spelled = self._user_labels(expression)  # reported as the user wrote them, not canonical
        self.validation_perturbations_ = {k: [f"{spelled.get(p, p)}|{c}" for p, c in v] for k, v in held.items()}
        return None

    def _check_interval_levels(self, levels) -> None:
        """Every level of ``levels`` was fitted by the prior (checked before any prediction runs)."""
        fitted = list(self.effect_prior.levels)
        unknown = [level for level in levels if level not in fitted]
        if unknown:
            raise ValueError(f"interval_levels {unknown} were not fitted; the model's levels are {fitted}.")

    def _cell_term_weight(self, kind: str) -> float:
        """``g_k`` of ``kind``: 0 where it was not validated (the anchors' own spread)."""
        return float(getattr(self, "cell_term_weights_", {}).get(kind, 0.0))

    def _user_labels(self, expression: ad.AnnData) -> dict[str, str]:
        """``{canonical label: the user's label}`` of the training cells (the first spelling seen)."""
        raw = self.adata.obs[self._perturbation_state["perturbation_key"]].astype(str).to_numpy()
        pairs = pd.DataFrame({"canonical": expression.obs["perturbation"].to_numpy(), "raw": raw})
        pairs = pairs.drop_duplicates("canonical")
        return dict(zip(pairs["canonical"], pairs["raw"], strict=True))

    def _add_query_groups_to_prior(self) -> None:
        """A query's perturbed cells join its inherited prior (see :func:`prior_with_query_groups`).

        Rebuilt from the reference's prior on every call, so training twice adds them once.
        """
        state = getattr(self, "reference_prior_state_", None)
        if state is None or not self._has_perturbed_cells():
            return
        reference = getattr(self, "_prior_reference", None)
        self._effect_prior = prior_with_query_groups(
            state, self._prior_embeddings(), self._training_expression(),
            None if reference is None else reference._training_expression(), self._data_scale,
            getattr(self, "few_shot_blends_", None))
        self.effect_prior_state_ = self._effect_prior.state()

    def _has_perturbed_cells(self) -> bool:
        labels = self.adata.obs[self._perturbation_state["perturbation_key"]]
        return not is_control(labels, self._perturbation_state["control_value"]).all()

    @property
    def _with_effect_prior(self) -> bool:
        """Whether the model was created with the effect prior (``ScopeVI(effect_prior=True)``)."""
        return bool(self.init_params_["non_kwargs"].get("effect_prior", True))

    @property
    def _context_column(self) -> str | None:
        return self._original_key(REGISTRY_KEYS.CONTEXT_KEY)

    @property
    def _data_scale(self) -> str:
        return "counts" if self.module.gene_likelihood in COUNT_LIKELIHOODS else "log1p_norm"

    def _prior_embeddings(self) -> pd.DataFrame | None:
        """The stored gene embeddings, unless they are the one-hot stand-in (no similarity)."""
        table = self.gene_embeddings
        return None if "one-hot" in str(table.attrs.get("source", "")) else table

    def _training_expression(self) -> ad.AnnData:
        """The registered expression with ``perturbation`` and ``context`` labels (no copy of X)."""
        state = self._perturbation_state
        data = self._expression_modality(self.adata)
        matrix = self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY)
        obs = self.adata.obs
        column = self._context_column
        contexts = obs[column].astype(str).to_numpy() if column is not None else np.full(len(obs), ALL_CONTEXTS)
        return ad.AnnData(
            X=matrix,
            obs=pd.DataFrame(
                {"perturbation": canonical_labels(obs[state["perturbation_key"]], state["control_value"],
                                                  state["combination_delimiter"]),
                 "context": contexts},
                index=pd.Index(np.asarray(obs.index).astype(str)),
            ),
            var=pd.DataFrame(index=data.var_names.astype(str)),
        )

    def _validation_queries(self, prior: EffectPrior, expression: ad.AnnData):
        """Held-out training queries per kind, and the mask of their cells (kept out of training)."""
        rng = np.random.default_rng(int(self.init_params_["non_kwargs"].get("prior_seed", 0)))
        rows = list(prior.shifts_.index)
        control = prior.control_value_
        genes = prior._genes  # the prior's own parsing of labels

        singles = sorted({p for p, _ in rows if len(genes(p)) == 1})
        single_genes = {genes(p)[0] for p in singles}
        combos = sorted({p for p, _ in rows if len(genes(p)) > 1 and set(genes(p)) <= single_genes})
        held: dict[str, list[tuple[str, str]]] = {}
        held_genes = set(_sample(singles, rng))
        held["unseen_gene"] = [(p, c) for p, c in rows if p in held_genes]
        # training combinations that hold a held-out gene are left out with it: partial queries
        held_gene_names = {genes(q)[0] for q in held_genes}
        held["partial_combination"] = [(p, c) for p, c in rows
                                       if len(genes(p)) > 1 and set(genes(p)) & held_gene_names]
        # the held combinations, and the held contexts' queries, are of their own kind only: none
        # holds a gene (or is a combination) already held out everywhere for another kind
        held_combos = set(_sample([p for p in combos if not set(genes(p)) & held_gene_names], rng))
        held["combination"] = [(p, c) for p, c in rows if p in held_combos]
        removed = {p for kind in ("unseen_gene", "partial_combination", "combination") for p, _ in held[kind]}
        held_contexts = _validation_contexts(sorted({c for _, c in rows}), rng)
        elsewhere = {p for p, c in rows if c not in held_contexts and p not in removed}
        held["unseen_context"] = [(p, c) for p, c in rows if c in held_contexts and p in elsewhere]
        labels = expression.obs["perturbation"].to_numpy()
        contexts_of = expression.obs["context"].to_numpy()
        perturbed = ~is_control(labels, control)
        gene_hit = np.array([bool(set(genes(p)) & held_gene_names) for p in labels]) \
            if held_genes else np.zeros(len(labels), dtype=bool)
        mask = perturbed & (gene_hit | np.isin(labels, list(held_combos)))
        if held["unseen_context"]:
            mask |= perturbed & np.isin(contexts_of, held_contexts)
        return {k: v for k, v in held.items() if v}, mask

    def _choose_weights(self, prior: EffectPrior, expression: ad.AnnData, held: dict):
        """``w_k`` per kind from the held-out queries, and the table of their errors."""
        weights = dict.fromkeys(KINDS, 0.0)
        scores = {}
        self.cell_term_weights_, self.cell_term_scores_ = dict.fromkeys(KINDS, 0.0), {}
        if not held:
            return weights, scores
        excluded = {q for queries in held.values() for q in queries}
        # every training group the VAE did not see is left out of the refitted prior too
        reduced_means = prior.means_[[idx not in excluded for idx in prior.means_.index]]
        reduced = EffectPrior(prior.gene_embeddings).fit_means(
            reduced_means, prior.control_value_, prior.context_key_, prior.delimiter_, weights=prior.weights_
        )
        controls = self._training_controls(expression)
        for kind, queries in held.items():
            if len(queries) < MIN_HELD_OUT and kind != "unseen_context":
                continue
            errors = {w: [] for w in CORRECTION_WEIGHTS}
            for p, c in queries:
                anchors = controls[controls.obs["context"].to_numpy() == c]
                if anchors.n_obs == 0:
                    continue
                truth = prior.shifts_.loc[(p, c)].to_numpy()
                start = reduced.predict_shifts([p], c).to_numpy()[0]
                learned = self._mean_vae_change(anchors, p)
                for w in CORRECTION_WEIGHTS:
                    errors[w].append(top_change_scores(start + w * (learned - start), truth))
            if not errors[0.0]:
                continue
            scores[kind] = {w: [float(x) for x in np.mean(np.asarray(e), axis=0)] for w, e in errors.items()}
            # a correction may not raise the held-out error: the prior's size unless evidence says more
            allowed = [w for w in CORRECTION_WEIGHTS if _lowers_error(errors[w], errors[0.0])]
            weights[kind] = pick({w: errors[w] for w in allowed}, allowed)
            self._choose_cell_weight(kind, queries, reduced, weights[kind], expression, controls)
        return weights, scores

    def _choose_cell_weight(self, kind, queries, reduced: EffectPrior, weight: float, expression, controls) -> None:
        """``g_k``: how much of the VAE's cell-level response to keep, by energy distance.

        For each held-out query the predicted cells ``anchor + s' + w (m - s') + g (d - m)`` are
        compared with the query's observed cells (energy distance in a 20-dimensional PCA of
        both); ``g`` in :data:`CELL_TERM_WEIGHTS` with the lowest mean distance is kept (ties go
        to the smaller ``g``, the prior's own spread).
        """
        rng = np.random.default_rng(0)
        distances = {g: [] for g in CELL_TERM_WEIGHTS}
        labels = expression.obs["perturbation"].to_numpy()
        contexts = expression.obs["context"].to_numpy()
        for p, c in queries:
            anchors = controls[controls.obs["context"].to_numpy() == c]
            cells = np.flatnonzero((labels == p) & (contexts == c))
            if anchors.n_obs < 2 or len(cells) < 2:
                continue
            cells = rng.choice(cells, min(200, len(cells)), replace=False)
            observed = log1p_expression(expression[np.sort(cells)], None, self._data_scale)
            matrix = anchors.X if self._layer is None else anchors.layers[self._layer]
            start = log1p_expression(ad.AnnData(X=matrix), None, self._data_scale)
            changes = self._vae_changes(anchors, p, random=True)
            m = changes.mean(axis=0)
            s = reduced.predict_shifts([p], c).to_numpy()[0]
            base = start + s + weight * (m - s)
            pca = PCA(n_components=min(20, *observed.shape, len(base))).fit(np.vstack([observed, base]))
            reference = pca.transform(observed)
            for g in CELL_TERM_WEIGHTS:
                distances[g].append(energy_distance(pca.transform(base + g * (changes - m)), reference))
        if distances[CELL_TERM_WEIGHTS[0]]:
            means = {g: float(np.mean(d)) for g, d in distances.items()}
            self.cell_term_scores_[kind] = means
            self.cell_term_weights_[kind] = min(CELL_TERM_WEIGHTS, key=lambda g: (round(means[g], 12), g))

    def _training_controls(self, expression: ad.AnnData) -> ad.AnnData:
        """Registered control cells (at most 500 per context) as anchors for validation."""
        control = is_control(expression.obs["perturbation"], self._perturbation_state["control_value"])
        rng = np.random.default_rng(0)
        keep = np.zeros(expression.n_obs, dtype=bool)
        for context in pd.unique(expression.obs["context"]):
            cells = np.flatnonzero(control & (expression.obs["context"].to_numpy() == context))
            keep[rng.choice(cells, min(500, len(cells)), replace=False)] = True
        data = self._expression_modality(self.adata)
        anchors = data[keep]
        light = ad.AnnData(X=anchors.X if self._layer is None else anchors.layers[self._layer],
                           obs=self.adata.obs.iloc[np.flatnonzero(keep)].copy(),
                           var=pd.DataFrame(index=anchors.var_names))
        if self._layer is not None:
            light.layers[self._layer] = light.X
        light.obs["context"] = expression.obs["context"].to_numpy()[keep]
        return light

    def _mean_vae_change(self, anchors: ad.AnnData, perturbation: str) -> np.ndarray:
        """The VAE's mean predicted change (prior mean, additive composition) over ``anchors``."""
        return self._vae_changes(anchors, perturbation, random=False).mean(axis=0)

    @torch.inference_mode()
    def _vae_changes(self, anchors: ad.AnnData, perturbation: str, random: bool) -> np.ndarray:
        """The VAE's change per anchor: at the prior mean, or at one seeded prior draw."""
        genes = torch.as_tensor(self.encode_perturbations([perturbation]))
        generator = torch.Generator().manual_seed(0)
        rows = []
        for _, anchor_x, batch_index, cat_covs in self._anchor_batches(anchors, None, progress=False):
            shape = (1, len(anchor_x), self.module.n_latent)
            noise = torch.randn(shape, generator=generator) if random else torch.zeros(shape)
            change, _ = self.module.predicted_change(
                anchor_x, genes[0].expand(len(anchor_x), -1).to(anchor_x.device), noise.to(anchor_x.device),
                batch_index, cat_covs,
            )
            rows.append(change[0].cpu().numpy())
        return np.concatenate(rows).astype(np.float64)

    # ------------------------------------------------------------------ prediction
    @property
    def effect_prior(self) -> EffectPrior | None:
        """The fitted :class:`~perturbscope.effects.EffectPrior` (``None`` for the VAE-only design)."""
        if getattr(self, "_effect_prior", None) is None and getattr(self, "effect_prior_state_", None):
            self._effect_prior = EffectPrior.from_state(self.effect_prior_state_, self._prior_embeddings())
        return getattr(self, "_effect_prior", None)

    def add_prediction_intervals(self, aggregated: ad.AnnData, levels=(0.8, 0.95)) -> None:
        """Add interval layers to a mean prediction, in place.

        Parameters
        ----------
        aggregated
            A mean prediction (``predict(..., aggregate="mean")`` or
            :func:`perturbscope.data.aggregate_prediction` of predicted cells).
        levels
            Coverage levels, each among the prior's fitted levels.

        Notes
        -----
        Writes ``layers["log1p_norm_lower_<L>"]`` and ``layers["log1p_norm_upper_<L>"]`` with
        ``L`` the level in percent: the prior's split-conformal interval for the query's kind
        (:meth:`perturbscope.effects.EffectPrior.half_widths`) around the prior's mean, stretched
        to include the predicted mean where the learned correction
        (``uns["perturbscope"]["mean_correction"]``) moved it.
        """
        prior = self.effect_prior
        if prior is None:
            raise ValueError("this model has no effect prior (effect_prior=False); no intervals.")
        self._check_interval_levels(levels)
        column = self._context_column
        mean = aggregated.layers["log1p_norm"]
        keys = [
            (str(row["perturbation"]), str(row[column]) if column in aggregated.obs else ALL_CONTEXTS)
            for _, row in aggregated.obs.iterrows()
        ]
        saved = aggregated.uns.get(OUTPUT_KEYS.PROVENANCE_UNS, {}).get("mean_correction")
        correction = np.vstack([
            np.zeros(aggregated.n_vars) if saved is None or f"{p}|{c}" not in saved.index
            else saved.loc[f"{p}|{c}"].to_numpy()
            for p, c in keys
        ])
        for level in levels:
            half = np.vstack([prior.half_widths([p], c, level).to_numpy()[0] for p, c in keys])
            tag = int(round(level * 100))
            # the interval of the prior's shift, stretched to reach the corrected mean
            aggregated.layers[f"log1p_norm_lower_{tag}"] = (mean - np.maximum(correction, 0) - half).astype(np.float32)
            aggregated.layers[f"log1p_norm_upper_{tag}"] = (mean - np.minimum(correction, 0) + half).astype(np.float32)


#: Lightning warnings that ``train`` silences: a small data set's log interval, and torch's
#: deprecation of a pytree class that Lightning itself still uses.
LIGHTNING_NOISE = (
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


#: Cells per group at which a trained model cross-fits few-shot blends for later queries.
QUERY_SHOTS = (5, 10, 25, 50)


def few_shot_blends(prior: EffectPrior, expression: ad.AnnData, data_scale: str,
                    shots: tuple[int, ...] = QUERY_SHOTS) -> dict:
    """``{k: {"weights", "quantiles", "n_held_out"}}``: the few-shot blend cross-fitted at ``k`` cells.

    Computed with the training cells at hand and saved with the model, so that a query read
    from a saved folder, without the reference's cells, still gets a blend fitted for its
    group size (:func:`prior_with_query_groups`). A ``k`` with too few well-measured groups
    (at least ``2k`` cells) is left out.
    """
    labels, contexts = expression.obs["perturbation"].to_numpy(), expression.obs["context"].to_numpy()
    out = {}
    for k in shots:
        blend = prior.few_shot_blend(expression, labels, contexts, k, None, data_scale)
        if blend is not None and blend["n_held_out"] >= MIN_HELD_OUT:
            out[int(k)] = {"weights": dict(blend["weights"]), "n_held_out": int(blend["n_held_out"]),
                           "quantiles": {float(lv): np.asarray(q) for lv, q in blend["quantiles"].items()}}
    return out


def prior_with_query_groups(state: dict, embeddings, query: ad.AnnData, reference: ad.AnnData | None,
                            data_scale: str, blends: dict | None = None) -> EffectPrior:
    """A reference's prior (``state``) with a query's cells added as few-shot groups.

    The query's perturbed groups join the prior (:meth:`EffectPrior.add_groups`). With the
    reference's own cells (``reference``; a model in memory has them, one read from a folder
    does not), the few-shot blend is cross-fitted again at the query's group size. Without
    them, the saved blend (``blends``, :func:`few_shot_blends`) of the ``k`` nearest the
    query's median group size answers (nearest on a log scale); with neither, the reference's
    own few-shot blend. Both AnnDatas carry ``obs["perturbation"]`` and ``obs["context"]``.
    """
    prior = EffectPrior.from_state(state, embeddings)
    prior.add_groups(query, query.obs["perturbation"].to_numpy(), query.obs["context"].to_numpy(), None, data_scale)
    if not prior.added_groups_:
        return prior
    # the query's median group size, not that of every few-shot group (the reference has its own)
    size = max(1.0, float(np.median([prior.counts_.loc[group] for group in prior.added_groups_])))
    if reference is not None:
        prior.fit_few_shot(reference, reference.obs["perturbation"].to_numpy(), reference.obs["context"].to_numpy(),
                           None, data_scale, k=int(size))
    elif blends:
        k = min(blends, key=lambda shots: (abs(np.log(float(shots)) - np.log(size)), shots))
        prior.weights_["few_shot"] = dict(blends[k]["weights"])
        prior.quantiles_["few_shot"] = {float(lv): np.asarray(q) for lv, q in blends[k]["quantiles"].items()}
        prior.n_held_out_["few_shot"] = int(blends[k]["n_held_out"])
    return prior


def _lowers_error(errors: list, baseline: list) -> bool:
    """Whether a correction's held-out error is below the prior's (``baseline``) by evidence.

    With at least :data:`MIN_HELD_OUT` held-out queries the mean paired difference of their MSEs
    plus one standard error must be at most 0 (the one-standard-error rule: a correction that
    wins by less than its noise is not kept); with fewer, where no standard error can be had,
    the mean error may not rise.

    Examples
    --------
    >>> _lowers_error([(1.0, 0.5), (1.0, 0.5), (1.0, 0.5)], [(2.0, 0.4), (2.1, 0.4), (1.9, 0.4)])
    True
    >>> _lowers_error([(1.0, 0.5), (3.0, 0.5), (1.0, 0.5)], [(2.0, 0.4), (2.1, 0.4), (1.9, 0.4)])
    False
    """
    differences = np.asarray([e[0] for e in errors]) - np.asarray([b[0] for b in baseline])
    if len(differences) < MIN_HELD_OUT:
        return float(differences.mean()) <= 0
    return float(differences.mean() + differences.std(ddof=1) / np.sqrt(len(differences))) <= 0


def _validation_contexts(contexts: list[str], rng: np.random.Generator) -> list[str]:
    """The contexts whose perturbed cells validate the unseen-context correction.

    One drawn context (none with fewer than 2), and up to :data:`VALIDATION_CONTEXTS` where at
    least twice as many are in training, so that the weight is not chosen on one cell type alone.

    Examples
    --------
    >>> _validation_contexts(["a"], np.random.default_rng(0))
    []
    >>> len(_validation_contexts(["a", "b", "c"], np.random.default_rng(0)))
    1
    >>> len(_validation_contexts(list("abcdef"), np.random.default_rng(0)))
    2
    """
    if len(contexts) < 2:
        return []
    first = contexts[int(rng.integers(len(contexts)))]
    n = VALIDATION_CONTEXTS if len(contexts) >= 2 * VALIDATION_CONTEXTS else 1
    rest = [c for c in contexts if c != first]
    return [first, *(rest[i] for i in sorted(rng.choice(len(rest), n - 1, replace=False)))]


def _sample(items: list[str], rng: np.random.Generator) -> list[str]:
    """``VALIDATION_FRACTION`` of ``items`` (none when fewer than 2 * MIN_HELD_OUT)."""
    if len(items) < 2 * MIN_HELD_OUT:
        return []
    n = max(MIN_HELD_OUT, int(round(VALIDATION_FRACTION * len(items))))
    return [items[i] for i in rng.choice(len(items), n, replace=False)]


def _fit_prior_streamed(prior: EffectPrior, expression: ad.AnnData, perturbation_key: str, control_value: str,
                        context_key: str | None, data_scale: str, delimiter: str) -> None:
    """:meth:`EffectPrior.fit` without loading X: the group means in one streamed pass.

    The means and group sizes equal those ``fit`` computes in memory
    (:func:`~perturbscope.data.streamed_pseudobulk`); ``fit_means`` does the rest, and the
    few-shot candidates read their few drawn cells per group from disk.
    """
    means, counts = streamed_pseudobulk(expression.X, expression.obs, [perturbation_key, "context"], data_scale)
    means.columns = expression.var_names.copy()
    counts.name = None
    prior.fit_means(means, control_value, context_key, delimiter, counts=counts)
    prior.fit_few_shot(expression, expression.obs[perturbation_key].astype(str).to_numpy(),
                       expression.obs["context"].astype(str).to_numpy(), None, data_scale)
