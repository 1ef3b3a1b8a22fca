"""Transfer to new contexts (scArches): :meth:`QueryMixin.load_query_data`.

The query is registered with the reference's registry (categories extended), the reference's
weights are copied in (new covariate columns start at zero) and chosen parts are frozen before
fine-tuning, as scvi-tools' ``ArchesMixin`` does for its models.
"""

from __future__ import annotations

import os
from copy import deepcopy
from pathlib import Path
from typing import Literal, Self

import anndata as ad
import pandas as pd

from ..data import check_controls_per_context, check_var_names, control_mask
from ._save_load import checked_setup, expand_covariate_columns

#: What a query model takes from its reference: the effect prior and every weight validated on
#: the reference's held-out training queries (the mean correction and the cell-level term).
INHERITED_ATTRS = ("effect_prior_state_", "correction_weights_", "correction_scores_", "cell_term_weights_",
                   "cell_term_scores_", "few_shot_blends_")


def _check_query_controls(obs: pd.DataFrame, setup_args: dict) -> None:
    """Every query context (and batch) needs control cells to anchor on; say so before training."""
    keys = [setup_args.get(k) for k in ("context_key", "batch_key")]
    check_controls_per_context(obs, setup_args["perturbation_key"], setup_args.get("control_value", "control"),
                               [k for k in keys if k is not None])


class QueryMixin:
    """``load_query_data`` for ScopeVI: adapt a trained model to new contexts from few cells."""

    @classmethod
    def load_query_data(
        cls,
        adata: ad.AnnData,
        reference_model: Self | str | os.PathLike,
        freeze_decoder: bool | Literal["shared"] = "shared",
        freeze_perturbation_encoder: bool = True,
        unfrozen: bool = False,
    ) -> Self:
        """A copy of a trained model set up on a new context, ready to be fine-tuned (scArches).

        The query is registered with the reference registry, extending its categories (new
        contexts, new batches). Weights are copied from the reference; weights of new batch
        categories start at zero, so the decoder first behaves as for the reference batches.
        The gene-embedding path (perturbation encoder) and, by default, the decoder's shared
        hidden layers stay frozen; the encoder, the conditional prior and the decoder's output
        layer are fine-tuned by ``model.train()`` on what the query holds: control cells only,
        or controls plus a few cells of some perturbations (few-shot). A reference with the effect
        prior passes it on, with its correction weights. In the query's new context a perturbation
        the query does not hold is an ``"unseen_context"`` query of that prior. The cells it holds
        join the prior at ``train()``: a (perturbation, context) group new to the prior becomes a
        ``"few_shot"`` query at any size, answered by the few-shot blend, and a group the
        reference already measured is pooled with it, cell-weighted. When the reference is a
        model in memory, the few-shot blend is cross-fitted again on the reference's cells reduced
        to the few-shot groups' median size; from a folder the reference's cells are not at hand,
        and the blend the reference cross-fitted at training for the nearest of 5, 10, 25 and 50
        cells (``few_shot_blends_``, saved with it) answers. The query model holds a reference
        to the reference model for this.

        Parameters
        ----------
        adata
            Query cells with the reference's genes in the same order. Needs control cells in
            every context.
        reference_model
            A trained :class:`ScopeVI`, or the folder it was saved to (read with the
            restricted loader of :meth:`load`; the query's new contexts and batches extend its
            categories).
        freeze_decoder
            ``"shared"``: freeze the decoder's hidden layers (which also take the batch and, in
            the dense model, the perturbation vector) and fine-tune its output layer, so the
            decoder can re-weight how the learned hidden features reach each gene in the new
            context. ``True``: freeze the whole decoder and the dispersion; only the encoder and
            the prior adapt, which leaves the predicted effect of a perturbation nearly
            unchanged. ``False``: fine-tune it all. A query of control cells only holds no signal
            for the output layer, so there ``"shared"`` freezes the whole decoder, as ``True``
            does.
        freeze_perturbation_encoder
            Keep the gene-embedding path fixed.
        unfrozen
            Fine-tune every weight (scvi-tools' ``unfrozen=True``); overrides both ``freeze_*``.

        Returns
        -------
        A new :class:`ScopeVI` on ``adata``; train it with ``model.train(...)``.

        Raises
        ------
        ValueError
            If the query's genes differ from the reference's (the counts of missing and extra
            genes are given), a query context or batch has no control cells, or
            ``freeze_decoder`` is not one of its values.

        Examples
        --------
        >>> import perturbscope as ps
        >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=6,
        ...                                          n_combinations=2, n_cells_per_condition=10)
        >>> reference = adata[adata.obs["cell_type"] == "type_0"].copy()
        >>> ps.ScopeVI.setup_anndata(reference, "perturbation", gene_embeddings=emb,
        ...                          context_key="cell_type")
        >>> model = ps.ScopeVI(reference, n_latent=4, n_hidden=16)
        >>> model.train(max_epochs=1, enable_progress_bar=False)
        >>> query = adata[adata.obs["cell_type"] == "type_1"].copy()
        >>> few_shot = ps.ScopeVI.load_query_data(query, model)
        >>> few_shot.train(max_epochs=1, enable_progress_bar=False)
        """
        if freeze_decoder not in (True, False, "shared"):
            raise ValueError(f"freeze_decoder must be True, False or 'shared', got {freeze_decoder!r}.")
        if isinstance(reference_model, str | os.PathLike):
            reference_model = cls._load_reference(reference_model, adata)
        check_var_names(reference_model._expression_modality(adata).var_names, reference_model.var_names,
                        "query")
        _check_query_modalities(reference_model, adata)
        registry = deepcopy(reference_model.registry_)
        setup, setup_args = checked_setup(cls, registry, Path("the reference model"))
        _check_query_controls(adata.obs, setup_args)
        setup(adata, source_registry=registry, extend_categories=True, **setup_args)
        model = cls(adata, **reference_model.init_params_.get("non_kwargs", {}))
        reference_state = reference_model.module.state_dict()
        sizes = (reference_model.module.covariate_sizes, model.module.covariate_sizes)
        model.module.load_state_dict({
            key: expand_covariate_columns(reference_state[key], value, *sizes)
            for key, value in model.module.state_dict().items()
        })
        if unfrozen:
            freeze_decoder, freeze_perturbation_encoder = False, False
        frozen = [model.module.perturbation_encoder] if freeze_perturbation_encoder else []
        perturbed = ~control_mask(model.adata_manager)
        if freeze_decoder == "shared" and perturbed.any():
            frozen.append(model.module.decoder_hidden_layers())
        elif freeze_decoder:  # True, or "shared" with control cells only
            frozen.append(model.module.decoder)
            if hasattr(model.module, "px_r"):
                model.module.px_r.requires_grad_(False)
        for part in frozen:
            part.requires_grad_(False)
        # the query keeps the reference's effect prior and correction weights: its few cells
        # fine-tune the VAE, while the prior's choices were cross-fitted on the reference
        for attr in INHERITED_ATTRS:
            if getattr(reference_model, attr, None) is not None:
                setattr(model, attr, deepcopy(getattr(reference_model, attr)))
        model.inherited_prior_ = True  # saved with the query model, as the two states below
        model.reference_prior_state_ = deepcopy(getattr(reference_model, "effect_prior_state_", None))
        # the reference's own cells re-cross-fit the few-shot blend for the query's group sizes;
        # a reference read from a folder is set up on the query's cells, so it has none of its own
        model._prior_reference = None if reference_model.adata is adata else reference_model
        model.module.to(reference_model.device)
        return model


def _check_query_modalities(reference_model, adata) -> None:
    """A MuData query holds every extra modality of the reference with its features, in order.

    The query decodes them with the reference's weights and keeps its protein and ATAC priors,
    so a column out of place would give every prediction under another feature's name.
    """
    for key, name in reference_model._extra_modalities().items():
        if hasattr(adata, "mod") and name in adata.mod:  # a missing one: the setup that follows names it
            reference_model._check_modality_order(key, adata.mod[name], name)
