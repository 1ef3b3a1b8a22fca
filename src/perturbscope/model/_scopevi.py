"""ScopeVI: predict single-cell responses to perturbations that were never measured.

The model (:class:`ScopeVI`) owns the AnnData registry, training and prediction; the maths lives
in :class:`perturbscope.module.ScopeVAE`. Perturbations are registered as lookups into a gene
embedding table (:class:`~perturbscope.model._fields.PerturbationGenesField`), so any gene in
that table, perturbed in training or not, can be predicted, alone or in combination. Training is
scvi-tools' loop with one change: the data splitter's loaders pair every cell with a control cell
of its context (:mod:`perturbscope.data._pairing`). Prediction draws ``z`` from the conditional
prior of real control cells and decodes it under the requested perturbation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    MuDataCategoricalJointObsField,
    MuDataCategoricalObsField,
    MuDataLayerField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin

from .._constants import REGISTRY_KEYS
from ..data import (
    AnchoredDataSplitter,
    check_backing,
    check_cells_have_counts,
    check_control_present,
    check_controls_per_context,
    check_count_data,
    check_labels,
    check_log_normalized,
    check_one_label_per_perturbation,
    check_unique_names,
    parse_perturbation,
)
from ..module import ScopeVAE
from ..module._scopevae import COUNT_LIKELIHOODS, GeneLikelihood
from ._effect_correction import EffectCorrectionMixin
from ._fields import MuDataPerturbationGenesField, PerturbationGenesField, encode_gene_sets
from ._multimodal import MultimodalMixin
from ._multimodal_setup import check_modalities, modality_fields
from ._prediction import PredictionMixin
from ._query import QueryMixin
from ._save_load import SafeLoadMixin
from ._scvi_api import ScviApiMixin
from ._training_plan import ScopeTrainingPlan


def _refuse_view(data, name: str, target: str) -> None:
    """Setup writes its keys into the object, and a view has none of its own: name the copy to make."""
    if getattr(data, "is_view", False):
        raise ValueError(f"{name} is a view of another {type(data).__name__}; setup registers keys in it, so "
                         f"make it a copy first: {target} = {name}.copy().")


def _check_setup(data, where: str, perturbation_key: str, control_value: str,
                 context_key: str | None, batch_key: str | None, transferred: bool,
                 modalities: Sequence[str] = (), delimiter: str = "+") -> None:
    """Setup-time checks; a transfer from a saved registry skips the label and control checks.

    Names must be unique within each registered modality of a MuData, not across them (a gene
    and its protein often share a name).
    """
    name = where.split(".")[0]
    _refuse_view(data, name, name)
    obs = data.obs
    check_backing(data, name)
    for part, part_name in ([(data.mod[m], f"mdata[{m!r}]") for m in modalities] or [(data, name)]):
        if part is not data:
            _refuse_view(part, part_name, f"mdata.mod[{part_name[6:-1]}]")
        check_unique_names(part, part_name)
        if part.n_vars == 0:
            raise ValueError(f"{part_name} has no genes (features); the model needs expression to learn from.")
    if perturbation_key not in obs.columns:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} not found in {where}; columns are {list(obs.columns)}."
        )
    # "A+B" and "B+A" (or "control " and "control") would train as one perturbation but be listed,
    # predicted and anchored as two; a query (a transferred registry) too
    check_one_label_per_perturbation(obs[perturbation_key], perturbation_key, control_value, delimiter, name)
    if transferred:
        return
    check_labels(obs, perturbation_key, control_value, context_key=context_key, batch_key=batch_key)
    check_control_present(obs[perturbation_key], perturbation_key, control_value)
    group_keys = [k for k in (context_key, batch_key) if k is not None]
    check_controls_per_context(obs, perturbation_key, control_value, group_keys)


class ScopeVI(MultimodalMixin, EffectCorrectionMixin, PredictionMixin, ScviApiMixin, SafeLoadMixin, QueryMixin,
              UnsupervisedTrainingMixin, VAEMixin, BaseModelClass):
    """Perturbation-response model anchored on control cells (DeSCOPE in scvi-tools form).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Latent dimension.
    n_hidden
        Hidden width of encoders and decoder.
    n_layers
        Hidden layers of encoders and decoder.
    n_perturbation
        Dimension of the perturbation vector.
    dropout_rate
        Encoder dropout.
    gene_likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"`` (raw counts) or ``"normal"`` (log-normalised values).
    free_bits
        Per-dimension KL floor in nats, keeping the latent informative about each cell.
    anchor_gradient
        Back-propagate through the anchor's encoding (slower; off by default).
    perturbation_encoding
        ``"kernel"``: a gene is encoded as a similarity-weighted mix of the genes perturbed in
        training (and their average, for genes unlike any of them); robust with few training
        perturbations. ``"linear"``: ``LayerNorm(Linear(embedding))`` of the gene itself.
        See :class:`~perturbscope.module.PerturbationEncoder`.
    kernel_temperature
        Softmax temperature over cosine similarities of the ``"kernel"`` encoding.
    unseen_genes
        How the ``"kernel"`` encoding handles genes not perturbed in training: ``"kernel"``
        (a similarity mix of training genes) or ``"ridge"`` (ridge regression of the training
        genes' vectors on their embeddings, penalty chosen by leave-one-gene-out error).
    perturbation_effect
        ``"dense"``: the decoder sees the latent state and the perturbation vector.
        ``"sparse"``: the latent state is a basal part shared with the control anchor plus a
        perturbation shift with an L1 (Laplace) penalty, and the decoder sees the latent state
        only, so each perturbation's effect is a sparse latent programme; read them with
        :meth:`get_perturbation_programs`. L1 was chosen over spike-and-slab or ARD priors
        because it is one convex term with one knob and needs no relaxation of discrete gates.
    sparsity_weight
        Weight of the L1 penalty of ``"sparse"`` (per cell, summed over latent dimensions).
    effect_prior
        Build predictions on the baselines: the mean shift comes from the estimator chosen by
        cross-fitting inside the training data (:class:`~perturbscope.effects.EffectPrior`),
        corrected by the VAE only as far as held-out training perturbations support, and the
        VAE adds each cell's state-dependent response (see
        :mod:`perturbscope.model._effect_correction`). ``False``: the VAE alone, the earlier
        design.
    prior_seed
        Seed of the prior's cross-fitting folds and of the held-out validation perturbations.

    Examples
    --------
    >>> import perturbscope as ps
    >>> adata, embeddings = ps.data.simulate_perturbseq(n_genes=40, n_perturbed_genes=8,
    ...                                                 n_combinations=3, n_cells_per_condition=10)
    >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings,
    ...                          context_key="cell_type")
    >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16)
    >>> model.train(max_epochs=1, enable_progress_bar=False)
    >>> controls = adata[adata.obs["perturbation"] == "control"]
    >>> model.predict(controls, ["G00", "G01+G02"], aggregate="mean").shape
    (4, 40)
    """

    _module_cls = ScopeVAE
    _data_splitter_cls = AnchoredDataSplitter
    _training_plan_cls = ScopeTrainingPlan

    def __init__(
        self,
        adata: ad.AnnData,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_perturbation: int = 64,
        dropout_rate: float = 0.1,
        gene_likelihood: GeneLikelihood = "nb",
        free_bits: float = 0.5,
        anchor_gradient: bool = False,
        perturbation_encoding: Literal["kernel", "linear"] = "kernel",
        kernel_temperature: float = 0.1,
        unseen_genes: Literal["kernel", "ridge"] = "kernel",
        perturbation_effect: Literal["dense", "sparse"] = "dense",
        sparsity_weight: float = 0.01,
        effect_prior: bool = True,
        prior_seed: int = 0,
    ):
        super().__init__(adata)
        if perturbation_encoding not in ("kernel", "linear"):
            raise ValueError(f"perturbation_encoding must be 'kernel' or 'linear', got {perturbation_encoding!r}.")
        if gene_likelihood in COUNT_LIKELIHOODS:
            matrix = self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY)
            check_count_data(matrix, self._layer)
            check_cells_have_counts(matrix, self.adata.obs_names, self._layer)  # not inside train()
        elif gene_likelihood == "normal":  # refused here, not after training, when predict would refuse them
            check_log_normalized(self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY), self._layer)
        perturbation_state = self.adata_manager.get_state_registry(REGISTRY_KEYS.PERTURBATION_KEY)
        self.module = self._module_for_modalities()(
            **self._modality_sizes(),
            n_input=self.summary_stats.n_vars,
            gene_embeddings=torch.as_tensor(perturbation_state["embeddings"]),
            n_batch=self.summary_stats.n_batch,
            n_cats_per_cov=self._n_cats_per_covariate(),
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_perturbation=n_perturbation,
            dropout_rate=dropout_rate,
            gene_likelihood=gene_likelihood,
            free_bits=free_bits,
            anchor_gradient=anchor_gradient,
            reference_genes=self._reference_gene_rows() if perturbation_encoding == "kernel" else None,
            kernel_temperature=kernel_temperature,
            unseen_genes=unseen_genes,
            perturbation_effect=perturbation_effect,
            sparsity_weight=sparsity_weight,
        )
        self._model_summary_string = (
            f"ScopeVI: n_latent {n_latent}, n_hidden {n_hidden}, n_layers {n_layers}, "
            f"gene_likelihood {gene_likelihood}, {perturbation_effect} perturbation effects, "
            f"{len(perturbation_state['genes'])} embedded genes"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        perturbation_key: str,
        control_value: str = "control",
        gene_embeddings: pd.DataFrame | None = None,
        layer: str | None = None,
        context_key: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        combination_delimiter: str = "+",
        **kwargs,
    ) -> None:
        """Register an AnnData for ScopeVI.

        Parameters
        ----------
        adata
            Cells x genes. Counts for count likelihoods, log-normalised values for ``"normal"``.
        perturbation_key
            ``obs`` column of perturbation labels: ``control_value``, a gene (``"KLF1"``) or a
            combination joined by ``combination_delimiter`` (``"SET+KLF1"``).
        control_value
            Label of control cells.
        gene_embeddings
            Genes x dimensions table (see :mod:`perturbscope.embeddings`). Every perturbed gene
            must be in it (a ``KeyError`` lists those that are not; nothing is zero-filled).
            Genes in the table that were never perturbed can be predicted later. ``None`` uses
            one-hot embeddings, which cannot reach unseen genes. The table and its ``.attrs``
            provenance are stored with the model.
        layer
            Layer with the expression; ``X`` when ``None``.
        context_key
            ``obs`` column of the biological context (cell type or line). Cells are anchored on
            control cells of their own context; it is not a decoder covariate, so unseen contexts
            can be predicted from their control cells.
        batch_key
            ``obs`` column of technical batches: a decoder covariate, and anchoring stays within
            a batch.
        categorical_covariate_keys
            Further categorical decoder covariates.
        combination_delimiter
            Separator of genes in combination labels.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Notes
        -----
        Besides scvi-tools' own setup keys (``obs["_scvi_batch"]``, ``obs["_scvi_context"]``,
        ``uns["_scvi_uuid"]``, ``uns["_scvi_manager_uuid"]`` and, for covariates,
        ``obsm["_scvi_extra_categorical_covs"]``), setup writes
        ``obsm["_scopevi_perturbation_genes"]``: each cell's perturbed genes as row indices
        into the embedding table, ``-1``-padded (integers; float32 on a MuData, since mudata
        cannot copy a view holding integer ``obsm``). Nothing else in ``adata`` changes.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        # The embedding table travels in the perturbation field's state registry; keeping a second
        # copy in the saved setup arguments would double the size of every saved model.
        setup_method_args.get("setup_args", {})["gene_embeddings"] = None
        _check_setup(adata, "adata.obs", perturbation_key, control_value, context_key,
                     batch_key, transferred=kwargs.get("source_registry") is not None, delimiter=combination_delimiter)
        anndata_fields = [
            LayerField(SCVI_KEYS.X_KEY, layer, is_count_data=False),
            PerturbationGenesField(perturbation_key, control_value, gene_embeddings, combination_delimiter),
            CategoricalObsField(REGISTRY_KEYS.CONTEXT_KEY, context_key),
            CategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key),
            CategoricalJointObsField(SCVI_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        perturbation_key: str,
        control_value: str = "control",
        gene_embeddings: pd.DataFrame | None = None,
        rna_layer: str | None = None,
        context_key: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        combination_delimiter: str = "+",
        modalities: dict[str, str] | None = None,
        protein_layer: str | None = None,
        atac_layer: str | None = None,
        **kwargs,
    ) -> None:
        """Register a MuData for ScopeVI: RNA (+ surface protein, + ATAC), labels from ``mdata.obs``.

        Parameters
        ----------
        mdata
            A :class:`mudata.MuData`.
        perturbation_key, control_value, gene_embeddings, context_key, batch_key, \
categorical_covariate_keys, combination_delimiter
            As for :meth:`setup_anndata`; the ``obs`` columns are read from the MuData's
            global ``obs``.
        rna_layer, protein_layer, atac_layer
            Layer of the RNA, protein or ATAC modality; its ``X`` when ``None``.
        modalities
            Which modality holds what, in scvi-tools' TOTALVI/MULTIVI convention:
            ``{"rna_layer": "rna", "protein_layer": "adt", "atac_layer": "atac"}``. RNA is
            required (default ``"rna"``); protein and ATAC are optional. Protein and ATAC must be
            counts; a cell without them has an all-zero row (see :mod:`perturbscope.model._multimodal`).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Raises
        ------
        ValueError, KeyError, TypeError
            For an unknown ``modalities`` key, a modality or layer that is not there, modalities
            whose cells differ, non-count protein or ATAC data (see
            :func:`~perturbscope.model._multimodal_setup.check_modalities`).

        Notes
        -----
        An RNA-only model predicts from the RNA modality's control cells, e.g.
        ``model.predict(mdata["rna"][controls])``, and returns an AnnData; a model with protein or
        ATAC predicts from the MuData's control cells, ``model.predict(mdata[controls])``, and
        returns a MuData. Setup writes what :meth:`setup_anndata` writes, on the MuData's global
        ``obs``/``obsm``/``uns``; the modalities are not changed.

        Examples
        --------
        >>> import mudata as md
        >>> import perturbscope as ps
        >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=6,
        ...                                          n_combinations=2, n_cells_per_condition=10)
        >>> mdata = md.MuData({"rna": adata})
        >>> mdata.obs["perturbation"] = adata.obs["perturbation"].to_numpy()
        >>> ps.ScopeVI.setup_mudata(mdata, "perturbation", gene_embeddings=emb)
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        setup_method_args.get("setup_args", {})["gene_embeddings"] = None
        import mudata as md

        if not isinstance(mdata, md.MuData):
            raise TypeError(f"setup_mudata needs a mudata.MuData, got {type(mdata).__name__}.")
        layers = {"rna_layer": rna_layer, "protein_layer": protein_layer, "atac_layer": atac_layer}
        modalities = check_modalities(mdata, modalities, layers)
        rna = modalities["rna_layer"]
        _check_setup(mdata, "mdata.obs", perturbation_key, control_value, context_key, batch_key,
                     transferred=kwargs.get("source_registry") is not None, modalities=list(modalities.values()),
                     delimiter=combination_delimiter)
        fields = [
            MuDataLayerField(SCVI_KEYS.X_KEY, rna_layer, mod_key=rna, is_count_data=False, mod_required=True),
            MuDataPerturbationGenesField(perturbation_key, control_value, gene_embeddings,
                                         combination_delimiter, mod_key=None),
            MuDataCategoricalObsField(REGISTRY_KEYS.CONTEXT_KEY, context_key, mod_key=None),
            MuDataCategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key, mod_key=None),
            MuDataCategoricalJointObsField(SCVI_KEYS.CAT_COVS_KEY, categorical_covariate_keys, mod_key=None),
            *modality_fields(modalities, layers),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ registry views
    @property
    def _layer(self) -> str | None:
        location = self.adata_manager.data_registry[SCVI_KEYS.X_KEY]
        return None if location.attr_name == "X" else location.attr_key

    @property
    def _perturbation_state(self) -> dict:
        return self.adata_manager.get_state_registry(REGISTRY_KEYS.PERTURBATION_KEY)

    def _reference_gene_rows(self) -> torch.Tensor:
        """Embedding rows of the genes perturbed in the registered training data."""
        state = self._perturbation_state
        rows = pd.Index(state["genes"]).get_indexer(state["perturbed_genes"])
        return torch.as_tensor(rows, dtype=torch.long)

    def _n_cats_per_covariate(self) -> list[int]:
        if SCVI_KEYS.CAT_COVS_KEY not in self.adata_manager.data_registry:
            return []
        return list(self.adata_manager.get_state_registry(SCVI_KEYS.CAT_COVS_KEY).n_cats_per_key)

    def _original_key(self, registry_key: str) -> str | None:
        """The user's ``obs`` column behind a categorical field, ``None`` if it was defaulted."""
        state = self.adata_manager.get_state_registry(registry_key)
        key = state.original_key
        return None if key == f"_scvi_{registry_key}" else key

    @property
    def gene_embeddings(self) -> pd.DataFrame:
        """The embedding table stored with the model (genes x dimensions), with provenance."""
        state = self._perturbation_state
        table = pd.DataFrame(state["embeddings"], index=pd.Index(state["genes"], name="gene"))
        table.attrs = dict(state.get("provenance", {}))
        return table

    @property
    def training_perturbations(self) -> list[str]:
        """Distinct non-control perturbation labels in the registered AnnData."""
        state = self._perturbation_state
        labels = self.adata.obs[state["perturbation_key"]].astype(str)
        return [p for p in pd.unique(labels) if p != state["control_value"]]

    @property
    def var_names(self) -> pd.Index:
        """The genes the model was trained on, in order."""
        state = self.adata_manager.get_state_registry(SCVI_KEYS.X_KEY)
        return pd.Index(np.asarray(state.column_names).astype(str))

    def _expression_modality(self, data):
        """The AnnData holding expression: ``data`` itself, or its modality for a MuData."""
        mod_key = self.adata_manager.data_registry[SCVI_KEYS.X_KEY].get("mod_key")
        return data.mod[mod_key] if mod_key is not None and hasattr(data, "mod") else data

    def encode_perturbations(self, perturbations: Sequence[str]) -> np.ndarray:
        """Padded embedding-row indices of perturbation labels (``KeyError`` for unknown genes).

        Parameters
        ----------
        perturbations
            Labels such as ``"KLF1"`` or ``"SET+KLF1"``.

        Returns
        -------
        An integer array ``(len(perturbations), max_genes)``, ``-1``-padded.
        """
        state = self._perturbation_state
        gene_sets = [
            parse_perturbation(p, state["control_value"], state["combination_delimiter"])
            for p in perturbations
        ]
        return encode_gene_sets(gene_sets, pd.Index(state["genes"]))

