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

import os
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import settings
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
from tqdm.auto import tqdm

from scvi import REGISTRY_KEYS as SCVI_KEYS
from .._constants import OUTPUT_KEYS, REGISTRY_KEYS
from .._safe_load import load_model_file
from ..benchmark import pseudobulk
from ..data import AnchoredDataSplitter, check_control_present, parse_perturbation
from ..module import ScopeVAE
from ..module._scopevae import COUNT_LIKELIHOODS, GeneLikelihood
from ._fields import MuDataPerturbationGenesField, PerturbationGenesField, encode_gene_sets
from ._programs import PerturbationPrograms


def _expand_covariate_columns(
    reference: torch.Tensor, target: torch.Tensor, reference_sizes: list[int], target_sizes: list[int]
) -> torch.Tensor:
    """Copy a reference weight into a query weight that has more one-hot covariate columns.

    FCLayers append one-hot covariate blocks after the continuous input; new categories get
    zero weights, so the layer's output is unchanged for the reference categories.
    """
    if reference.shape == target.shape:
        return reference.clone()
    if reference.dim() != 2 or reference.shape[0] != target.shape[0]:
        raise ValueError(f"Cannot transfer a weight of shape {tuple(reference.shape)} to {tuple(target.shape)}.")
    n_continuous = reference.shape[1] - sum(reference_sizes)
    out = torch.zeros_like(target)
    out[:, :n_continuous] = reference[:, :n_continuous]
    ref_start, target_start = n_continuous, n_continuous
    for ref_size, target_size in zip(reference_sizes, target_sizes):
        out[:, target_start : target_start + ref_size] = reference[:, ref_start : ref_start + ref_size]
        ref_start += ref_size
        target_start += target_size
    return out


def _resolve_device(accelerator: str, device: int | str) -> str | int:
    """``"auto"`` picks the first GPU when one is there and allowed, else the CPU."""
    if device != "auto":
        return device
    gpu_allowed = accelerator in ("auto", "gpu", "cuda")
    return "cuda:0" if gpu_allowed and torch.cuda.is_available() else "cpu"


def _matrix_of(adata: ad.AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in adata.layers; layers are {list(adata.layers)}.")
    return adata.layers[layer]


def _describe_layer(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_count_data(matrix, layer: str | None) -> None:
    """Raise a ``ValueError`` naming the layer if it is not non-negative, finite integers."""
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    where = _describe_layer(layer)
    if not np.isfinite(values).all():
        raise ValueError(f"{where} has NaN or inf values; count likelihoods need finite counts.")
    if (values < 0).any():
        raise ValueError(f"{where} has negative values; count likelihoods need non-negative counts.")
    if not np.array_equal(values, np.round(values)):
        raise ValueError(
            f"{where} has non-integer values; count likelihoods ('nb', 'zinb', 'poisson') need raw "
            "counts. Use a counts layer, or gene_likelihood='normal' for log-normalised input."
        )


def check_controls_per_context(obs: pd.DataFrame, perturbation_key: str, control_value: str,
                               group_keys: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming every context (and batch) that has no control cells."""
    if not group_keys:
        return
    is_control = obs[perturbation_key].astype(str) == control_value
    groups = obs[list(group_keys)].astype(str)
    has_control = is_control.groupby([groups[k] for k in group_keys], observed=True).any()
    lacking = has_control.index[~has_control.to_numpy()].tolist()
    if lacking:
        names = ", ".join(repr(g) for g in lacking)
        raise ValueError(
            f"No control cells ({perturbation_key} == {control_value!r}) in context {names} of "
            f"{list(group_keys)}; every context needs control cells to anchor predictions."
        )


def _check_setup_obs(obs: pd.DataFrame, where: str, perturbation_key: str, control_value: str,
                     context_key: str | None, batch_key: str | None, transferred: bool) -> None:
    """Setup-time checks of the labels; a transfer from a saved registry skips the control checks."""
    if perturbation_key not in obs.columns:
        raise KeyError(
            f"perturbation_key {perturbation_key!r} not found in {where}; columns are {list(obs.columns)}."
        )
    if transferred:
        return
    check_control_present(obs[perturbation_key], perturbation_key, control_value)
    group_keys = [k for k in (context_key, batch_key) if k is not None]
    check_controls_per_context(obs, perturbation_key, control_value, group_keys)


class ScopeVI(UnsupervisedTrainingMixin, VAEMixin, BaseModelClass):
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

    def __init__(
        self,
        adata: ad.AnnData,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_perturbation: int = 64,
        dropout_rate: float = 0.1,
        gene_likelihood: GeneLikelihood = "nb",
        free_bits: float = 0.0,
        anchor_gradient: bool = False,
        perturbation_encoding: Literal["kernel", "linear"] = "kernel",
        kernel_temperature: float = 0.1,
        unseen_genes: Literal["kernel", "ridge"] = "kernel",
        perturbation_effect: Literal["dense", "sparse"] = "dense",
        sparsity_weight: float = 0.01,
    ):
        super().__init__(adata)
        if perturbation_encoding not in ("kernel", "linear"):
            raise ValueError(f"perturbation_encoding must be 'kernel' or 'linear', got {perturbation_encoding!r}.")
        if gene_likelihood in COUNT_LIKELIHOODS:
            check_count_data(self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY), self._layer)
        perturbation_state = self.adata_manager.get_state_registry(REGISTRY_KEYS.PERTURBATION_KEY)
        self.module = self._module_cls(
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
        into the embedding table, ``-1``-padded. Nothing else in ``adata`` changes.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        # The embedding table travels in the perturbation field's state registry; keeping a second
        # copy in the saved setup arguments would double the size of every saved model.
        setup_method_args.get("setup_args", {})["gene_embeddings"] = None
        _check_setup_obs(adata.obs, "adata.obs", perturbation_key, control_value, context_key,
                         batch_key, transferred=kwargs.get("source_registry") is not None)
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

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: ad.AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs,
    ) -> ScopeVI:
        """Load a saved ScopeVI without trusting the file's pickled code.

        scvi-tools' own ``load`` unpickles ``model.pt`` with ``weights_only=False``, which runs any
        callable the file names. This reads it through :func:`perturbscope._safe_load.load_model_file`:
        ``weights_only=True`` where possible, else an unpickler that allows only the numpy,
        pandas, container and tensor globals a saved model needs; anything else is refused.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData with the training genes, set up here with the saved registry. ``None`` reads
            ``adata.h5ad`` from the folder (saved with ``save_anndata=True``).
        accelerator, device
            Where to put the model (scvi-tools conventions).
        prefix
            Prefix of the saved file names.
        **kwargs
            Ignored; accepted for compatibility with scvi-tools' signature.

        Returns
        -------
        The trained model, in evaluation mode.

        Raises
        ------
        ValueError
            If the file is not a ScopeVI model, asks for globals outside the allow-list, or
            ``adata`` has other genes.

        Examples
        --------
        >>> model.save("scopevi_model/")  # doctest: +SKIP
        >>> model = ScopeVI.load("scopevi_model/", adata)  # doctest: +SKIP
        """
        folder = Path(dir_path)
        path = folder / f"{prefix or ''}model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is {folder} a folder written by ScopeVI.save?")
        payload = load_model_file(path)
        attr_dict = dict(payload["attr_dict"])
        registry = attr_dict.pop("registry_")
        if registry.get("model_name", cls.__name__) != cls.__name__:
            raise ValueError(f"{path} holds a {registry['model_name']} model, not {cls.__name__}.")
        if adata is None:
            saved = folder / f"{prefix or ''}adata.h5ad"
            if not saved.is_file():
                raise ValueError(f"Pass adata: {folder} has no saved AnnData ({saved.name}).")
            adata = ad.read_h5ad(saved)
        saved = payload["var_names"]
        rna = (registry["setup_args"].get("modalities") or {}).get("rna_layer", "rna")
        if isinstance(saved, dict):  # a MuData model: scvi-tools saves genes per modality
            saved, genes = saved[rna], adata.mod[rna].var_names
        else:
            genes = adata.var_names
        saved_genes = pd.Index(np.asarray(saved).astype(str))
        if not genes.equals(saved_genes):
            raise ValueError(
                f"adata.var_names differ from the model's {len(saved_genes)} genes "
                f"({len(saved_genes.difference(genes))} missing, "
                f"{len(genes.difference(saved_genes))} extra, or another order)."
            )
        setup = getattr(cls, registry.get("setup_method_name", "setup_anndata"))
        setup(adata, source_registry=registry, **registry["setup_args"])
        init_params = attr_dict.pop("init_params_")
        kwargs_groups = init_params.get("kwargs", {})
        non_kwargs = dict(init_params.get("non_kwargs", {}))
        # files saved before ``unseen_genes`` existed encoded unseen genes with the kernel
        non_kwargs.setdefault("unseen_genes", "kernel")
        init_params["non_kwargs"] = non_kwargs
        model = cls(adata, **non_kwargs,
                    **{k: v for group in kwargs_groups.values() for k, v in group.items()})
        for attr, value in attr_dict.items():
            setattr(model, attr, value)
        state = dict(payload["model_state_dict"])
        state.pop("pyro_param_store", None)
        model.module.load_state_dict(state)
        model.to_device(_resolve_device(accelerator, device))
        model.module.eval()
        return model

    # ------------------------------------------------------------------ transfer to new contexts
    @classmethod
    def load_query_data(
        cls,
        adata: ad.AnnData,
        reference_model: ScopeVI,
        freeze_decoder: bool | Literal["shared"] = "shared",
        freeze_perturbation_encoder: bool = True,
    ) -> ScopeVI:
        """A copy of a trained model set up on a new context, ready to be fine-tuned (scArches).

        The query is registered with the reference registry, extending its categories (new
        contexts, new batches). Weights are copied from the reference; weights of new batch
        categories start at zero, so the decoder first behaves as for the reference batches.
        The gene-embedding path (perturbation encoder) and, by default, the decoder's shared
        hidden layers stay frozen; the encoder, the conditional prior and the decoder's output
        layer are fine-tuned by ``model.train()`` on
        what the query holds: control cells only, or controls plus a few cells of some
        perturbations (few-shot).

        Parameters
        ----------
        adata
            Query cells with the reference's genes in the same order. Needs control cells in
            every context.
        reference_model
            A trained :class:`ScopeVI`.
        freeze_decoder
            ``"shared"``: freeze the decoder's hidden layers (which also take the batch and, in
            the dense model, the perturbation vector) and fine-tune its output layer, so the
            decoder can re-weight how
            the learned hidden features reach each gene in the new context. ``True``: freeze the
            whole decoder and the dispersion; only the encoder and the prior adapt, which leaves
            the predicted effect of a perturbation nearly unchanged. ``False``: fine-tune it all.
            A query of control cells only holds no signal for the output layer, so there
            ``"shared"`` freezes the whole decoder, as ``True`` does (on Kang, fine-tuning the
            output layer on controls alone made predictions worse than the reference's).
        freeze_perturbation_encoder
            Keep the gene-embedding path fixed.

        Returns
        -------
        A new :class:`ScopeVI` on ``adata``; train it with ``model.train(...)``.

        Raises
        ------
        ValueError
            If the query's genes differ from the reference's (the counts of missing and extra
            genes are given).

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
        cls._check_query_genes(adata, reference_model)
        registry = deepcopy(reference_model.registry_)
        setup_args = dict(registry.get("setup_args", {}))
        setup = getattr(cls, registry.get("setup_method_name", "setup_anndata"))
        setup(adata, source_registry=registry, extend_categories=True, **setup_args)
        model = cls(adata, **reference_model.init_params_.get("non_kwargs", {}))
        reference_state = reference_model.module.state_dict()
        sizes = (reference_model.module.covariate_sizes, model.module.covariate_sizes)
        model.module.load_state_dict({
            key: _expand_covariate_columns(reference_state[key], value, *sizes)
            for key, value in model.module.state_dict().items()
        })
        frozen = [model.module.perturbation_encoder] if freeze_perturbation_encoder else []
        perturbed = np.asarray(model.adata_manager.get_from_registry(REGISTRY_KEYS.PERTURBATION_KEY)) >= 0
        if freeze_decoder == "shared" and perturbed.any():
            frozen.append(model.module.decoder_hidden_layers())
        elif freeze_decoder:  # True, or "shared" with control cells only
            frozen.append(model.module.decoder)
            if hasattr(model.module, "px_r"):
                model.module.px_r.requires_grad_(False)
        for part in frozen:
            part.requires_grad_(False)
        model.module.to(reference_model.device)
        return model

    @staticmethod
    def _check_query_genes(adata: ad.AnnData, reference_model: ScopeVI) -> None:
        reference_genes = reference_model.var_names
        genes = reference_model._expression_modality(adata).var_names
        if not genes.equals(reference_genes):
            missing = reference_genes.difference(genes)
            extra = genes.difference(reference_genes)
            raise ValueError(
                f"The query's genes differ from the reference's: {len(missing)} reference genes "
                f"missing, {len(extra)} extra genes"
                + ("" if len(missing) or len(extra) else " (same genes, different order)")
                + ". Subset and order the query as query[:, reference.var_names]."
            )

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
        **kwargs,
    ) -> None:
        """Register a MuData for ScopeVI: expression from one modality, labels from ``mdata.obs``.

        Parameters
        ----------
        mdata
            A :class:`mudata.MuData`.
        perturbation_key, control_value, gene_embeddings, context_key, batch_key, \
categorical_covariate_keys, combination_delimiter
            As for :meth:`setup_anndata`; the ``obs`` columns are read from the MuData's
            global ``obs``.
        rna_layer
            Layer of the expression modality; its ``X`` when ``None``.
        modalities
            ``{"rna_layer": name}``: the modality holding expression (default ``"rna"``).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Notes
        -----
        Predict with the expression modality's control cells, e.g.
        ``model.predict(mdata["rna"][controls])``: predictions are AnnData.

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
        rna = (modalities or {}).get("rna_layer", "rna")
        if rna not in mdata.mod:
            raise KeyError(f"modality {rna!r} not in the MuData; modalities are {list(mdata.mod)}.")
        _check_setup_obs(mdata.obs, "mdata.obs", perturbation_key, control_value, context_key,
                         batch_key, transferred=kwargs.get("source_registry") is not None)
        fields = [
            MuDataLayerField(SCVI_KEYS.X_KEY, rna_layer, mod_key=rna, is_count_data=False, mod_required=True),
            MuDataPerturbationGenesField(perturbation_key, control_value, gene_embeddings,
                                         combination_delimiter, mod_key=None),
            MuDataCategoricalObsField(REGISTRY_KEYS.CONTEXT_KEY, context_key, mod_key=None),
            MuDataCategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key, mod_key=None),
            MuDataCategoricalJointObsField(SCVI_KEYS.CAT_COVS_KEY, categorical_covariate_keys, mod_key=None),
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

    # ------------------------------------------------------------------ prediction inputs
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

    @property
    def var_names(self) -> pd.Index:
        """The genes the model was trained on, in order."""
        state = self.adata_manager.get_state_registry(SCVI_KEYS.X_KEY)
        return pd.Index(np.asarray(state.column_names).astype(str))

    def _expression_modality(self, data):
        """The AnnData holding expression: ``data`` itself, or its modality for a MuData."""
        mod_key = self.adata_manager.data_registry[SCVI_KEYS.X_KEY].get("mod_key")
        return data.mod[mod_key] if mod_key is not None and hasattr(data, "mod") else data

    def _check_var_names(self, adata: ad.AnnData) -> None:
        expected = self.var_names
        if not adata.var_names.equals(expected):
            missing = expected.difference(adata.var_names)
            extra = adata.var_names.difference(expected)
            raise ValueError(
                "adata.var_names differ from the genes the model was trained on "
                f"({len(missing)} missing, {len(extra)} extra, or a different order); subset and "
                "order the AnnData as adata[:, model.var_names]."
            )

    def _check_only_controls(self, adata: ad.AnnData) -> None:
        state = self._perturbation_state
        key = state["perturbation_key"]
        if key in adata.obs.columns:
            labels = adata.obs[key].astype(str)
            other = pd.unique(labels[labels != state["control_value"]])
            if len(other):
                raise ValueError(
                    f"adata_control must hold control cells only; adata.obs[{key!r}] also has "
                    f"{list(other[:10])}. Pass adata[adata.obs[{key!r}] == {state['control_value']!r}]."
                )

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

    # ------------------------------------------------------------------ prediction
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
        batch_size: int = 512,
        seed: int | None = None,
    ) -> ad.AnnData:
        """Predict perturbed cells from control cells.

        Every control cell is an anchor: ``z`` is drawn from the conditional prior
        ``p(z | control cell, perturbation)`` and decoded under the perturbation, so the
        prediction keeps that cell's basal state, context and batch. Control cells of a context
        never seen in training work too (zero-shot): the prior is conditioned on them.

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
            Predict each cell as its anchor's observed expression plus the decoded change
            (``decode(z_p, p) - decode(z_0, no perturbation)`` for the same prior draw, in
            log1p-normalised space; composed per gene for combinations, see ``combination``), so
            the decoder's error in reconstructing the anchor cancels and the spread of real
            control cells is kept. ``False`` starts from ``decode(z_0, no perturbation)``
            instead of the observed cell (``decode(z_p, p)`` itself for a single).
        combination
            How a multi-gene perturbation's change is composed. ``"additive"``: the sum of its
            genes' predicted changes plus the change due to the learned interaction term, which
            is 0 unless combinations were in training (so unseen combinations default to
            additivity in expression space, the strong baseline of Norman et al. 2019 and
            Ahlmann-Eltze et al. 2025). ``"joint"``: decode the summed perturbation vector.
            Singles are the same under both. See :meth:`ScopeVAE.predicted_change`.
        batch_size
            Control cells per forward pass.
        seed
            Seed of the prior draws; defaults to ``scvi.settings.seed``.

        Returns
        -------
        A new AnnData (``adata_control`` is untouched) with the training ``var_names`` and

        * ``X``: expression on the training scale (expected counts at the control cell's library
          size for count likelihoods; log-normalised values for ``"normal"``);
        * ``layers["log1p_norm"]``: ``log1p`` of expression normalised to 1e4 counts (equal to
          ``X`` for ``"normal"``, whose input is already log-normalised);
        * ``obs["perturbation"]``, ``obs["control_cell"]`` (the anchor's name), the control
          cells' context, batch and covariate columns, and ``obs["sample"]``;
          with ``aggregate="mean"``, ``obs["perturbation"]``, the context column and
          ``obs["n_cells"]``;
        * ``uns["perturbscope"]``: the model, likelihood and embedding provenance.

        Raises
        ------
        ValueError
            If ``var_names`` differ from training, ``adata_control`` holds non-control cells, or
            a batch/covariate value was not seen in training.
        KeyError
            If a perturbed gene is not in the embedding table.
        """
        self._check_if_trained(warn=True)
        if aggregate not in (None, "mean"):
            raise ValueError(f"aggregate must be None or 'mean', got {aggregate!r}.")
        if combination not in ("additive", "joint"):
            raise ValueError(f"combination must be 'additive' or 'joint', got {combination!r}.")
        adata_control, perturbations = self._prediction_inputs(adata_control, perturbations)
        gene_index = torch.as_tensor(self.encode_perturbations(perturbations))
        generator = torch.Generator().manual_seed(int(seed if seed is not None else (settings.seed or 0)))
        n_cells, n_genes = adata_control.shape
        X = np.empty((len(perturbations), n_samples, n_cells, n_genes), dtype=np.float32)
        log1p_norm = np.empty_like(X)
        for cells, anchor_x, batch_index, cat_covs in self._anchor_batches(adata_control, batch_size):
            for p in range(len(perturbations)):
                genes = gene_index[p].expand(len(anchor_x), -1).to(anchor_x.device)
                expression, normalised = self.module.predict_from_anchor(
                    anchor_x, genes, batch_index, cat_covs, n_samples=n_samples,
                    use_prior_mean=use_prior_mean, residual=residual, generator=generator,
                    combination=combination,
                )
                X[p, :, cells] = expression.cpu().numpy()
                log1p_norm[p, :, cells] = normalised.cpu().numpy()
        prediction = self._prediction_anndata(adata_control, perturbations, n_samples, X, log1p_norm)
        if aggregate == "mean":
            prediction = self._aggregate(prediction)
        return prediction

    @torch.inference_mode()
    def get_perturbation_programs(
        self,
        adata_control: ad.AnnData | None = None,
        perturbations: Sequence[str] | None = None,
        threshold: float = 0.5,
        batch_size: int = 512,
    ) -> PerturbationPrograms:
        """Which latent dimensions, and through the decoder which genes, each perturbation moves.

        For every anchor control cell the prior mean is computed under the perturbation and
        under none; their difference, averaged over anchors, is the perturbation's latent shift.
        A dimension is *active* when the shift is at least ``threshold`` standard deviations of
        the anchors' basal states along it. Gene effects are the mean predicted change in
        log1p-normalised expression at the prior mean. Most useful with
        ``perturbation_effect="sparse"``, where every effect passes through the (L1-penalised)
        shift; for the dense model the decoder also sees the perturbation directly, so the
        shift is only part of the story while ``gene_effects`` stays complete.

        Parameters
        ----------
        adata_control
            Anchor control cells; defaults to the training control cells.
        perturbations
            Labels (seen or unseen genes, combinations); defaults to the training perturbations.
        threshold
            Active-dimension threshold in standard deviations of the basal states.
        batch_size
            Control cells per forward pass.

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
            is_control = (self.adata.obs[state["perturbation_key"]].astype(str)
                          == state["control_value"]).to_numpy()
            adata_control = self._expression_modality(self.adata)[is_control]
        if perturbations is None:
            perturbations = self.training_perturbations
        perturbations = [str(p) for p in perturbations]
        if not perturbations:
            raise ValueError("perturbations is empty; pass at least one perturbation label.")
        self._check_var_names(adata_control)
        self._check_only_controls(adata_control)
        if self.module.gene_likelihood in COUNT_LIKELIHOODS:
            check_count_data(_matrix_of(adata_control, self._layer), self._layer)
        return adata_control, perturbations

    def _anchor_batches(self, adata_control: ad.AnnData, batch_size: int):
        """Yield ``(slice, anchor_x, batch_index, cat_covs)`` tensors of control cells, in order."""
        self.module.eval()
        device = self.device
        matrix = _matrix_of(adata_control, self._layer)
        batch_codes = self._category_codes(adata_control, SCVI_KEYS.BATCH_KEY)
        covariate_codes = self._covariate_codes(adata_control)
        n_cells = adata_control.n_obs
        for start in tqdm(range(0, n_cells, batch_size), desc="ScopeVI", disable=n_cells <= batch_size):
            cells = slice(start, min(start + batch_size, n_cells))
            chunk = matrix[cells]
            anchor_x = torch.as_tensor(chunk.toarray() if sparse.issparse(chunk) else np.asarray(chunk),
                                       dtype=torch.float32, device=device)
            batch_index = (None if batch_codes is None else
                           torch.as_tensor(batch_codes[cells, None], dtype=torch.long, device=device))
            cat_covs = (None if covariate_codes is None else
                        torch.as_tensor(covariate_codes[cells], dtype=torch.long, device=device))
            yield cells, anchor_x, batch_index, cat_covs

    def _prediction_anndata(self, adata_control, perturbations, n_samples, X, log1p_norm) -> ad.AnnData:
        n_perts, _, n_cells, n_genes = X.shape
        context_columns = [k for k in (self._original_key(REGISTRY_KEYS.CONTEXT_KEY),
                                       self._original_key(SCVI_KEYS.BATCH_KEY)) if k is not None]
        if SCVI_KEYS.CAT_COVS_KEY in self.adata_manager.data_registry:
            context_columns += list(self.adata_manager.get_state_registry(SCVI_KEYS.CAT_COVS_KEY).field_keys)
        context_columns = list(dict.fromkeys(k for k in context_columns if k in adata_control.obs))
        repeat = n_perts * n_samples
        obs = pd.DataFrame({
            OUTPUT_KEYS.PERTURBATION: pd.Categorical(np.repeat(perturbations, n_samples * n_cells),
                                                     categories=list(dict.fromkeys(perturbations))),
            OUTPUT_KEYS.CONTROL_CELL: np.tile(adata_control.obs_names.to_numpy(), repeat),
            OUTPUT_KEYS.SAMPLE: np.tile(np.repeat(np.arange(n_samples), n_cells), n_perts),
        })
        for column in context_columns:
            obs[column] = np.tile(adata_control.obs[column].to_numpy(), repeat)
            if isinstance(adata_control.obs[column].dtype, pd.CategoricalDtype):
                obs[column] = pd.Categorical(obs[column], categories=adata_control.obs[column].cat.categories)
        obs.index = [f"{p}|{c}|{s}" for p, c, s in zip(obs[OUTPUT_KEYS.PERTURBATION],
                                                       obs[OUTPUT_KEYS.CONTROL_CELL], obs[OUTPUT_KEYS.SAMPLE])]
        prediction = ad.AnnData(
            X=X.reshape(-1, n_genes), obs=obs, var=pd.DataFrame(index=adata_control.var_names.copy()),
            layers={OUTPUT_KEYS.LOG1P_NORM_LAYER: log1p_norm.reshape(-1, n_genes)},
        )
        prediction.uns[OUTPUT_KEYS.PROVENANCE_UNS] = {
            "model": "ScopeVI",
            "gene_likelihood": self.module.gene_likelihood,
            "context_columns": context_columns,
            "gene_embeddings": {str(k): str(v) for k, v in self._perturbation_state.get("provenance", {}).items()},
        }
        return prediction

    def _aggregate(self, prediction: ad.AnnData) -> ad.AnnData:
        context = self._original_key(REGISTRY_KEYS.CONTEXT_KEY)
        groupby = [OUTPUT_KEYS.PERTURBATION] + ([context] if context in prediction.obs else [])
        X = pseudobulk(prediction, groupby)
        log1p_norm = pseudobulk(prediction, groupby, layer=OUTPUT_KEYS.LOG1P_NORM_LAYER)
        sizes = prediction.obs.groupby(groupby, observed=True).size()
        obs = X.index.to_frame(index=False)
        order = list(prediction.obs[OUTPUT_KEYS.PERTURBATION].cat.categories)
        obs[OUTPUT_KEYS.PERTURBATION] = pd.Categorical(obs[OUTPUT_KEYS.PERTURBATION], categories=order)
        obs[OUTPUT_KEYS.N_CELLS] = sizes.reindex(X.index).to_numpy()
        obs.index = ["|".join(map(str, row)) for row in X.index.to_flat_index()] if len(groupby) > 1 \
            else X.index.astype(str).tolist()
        sort = np.argsort(obs[OUTPUT_KEYS.PERTURBATION].cat.codes.to_numpy(), kind="stable")
        aggregated = ad.AnnData(
            X=X.to_numpy(dtype=np.float32)[sort], obs=obs.iloc[sort],
            var=pd.DataFrame(index=prediction.var_names.copy()),
            layers={OUTPUT_KEYS.LOG1P_NORM_LAYER: log1p_norm.to_numpy(dtype=np.float32)[sort]},
        )
        aggregated.uns[OUTPUT_KEYS.PROVENANCE_UNS] = prediction.uns[OUTPUT_KEYS.PROVENANCE_UNS]
        return aggregated
