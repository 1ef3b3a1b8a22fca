"""How each model class decodes each modality: the one adapter the probes differentiate.

The probes call decoders themselves, outside scvi-tools' ``inference_mode`` getters, through
:func:`decoder_fn`. It returns ``decode(z, rows) -> (scale, rate)`` for one modality:

* ``"rna"``: scVI's ``px_scale``/``px_rate``, :meth:`ScopeVAE.decode
  <perturbscope.module.ScopeVAE.decode>`, or totalVI's ``px_["scale"]``/``px_["rate"]``;
* ``"protein"`` of a multimodal ScopeVI: :meth:`MultimodalScopeVAE.decode_modality_expression
  <perturbscope.module.MultimodalScopeVAE.decode_modality_expression>`: ``rate`` the mean of the
  background/foreground mixture at the given library size, ``scale`` that mean normalised to sum
  to one (the profile its protein predictions are built from);
* ``"protein"`` of scvi-tools' TOTALVI, from its public generative outputs ``py_``: the
  foreground ``(1 - pi) * rate_fore`` that ``TOTALVI.get_normalized_expression`` reports
  (background excluded) is ``rate``, and ``scale`` is it normalised to sum to one
  (``py_["scale"]``). totalVI *draws* the background ``rate_back`` from
  ``LogNormal(back_alpha, back_beta)``; a derivative of a draw is not the decoder's, so the
  background is held at its median ``exp(back_alpha)``, which makes the map deterministic
  (``rate_fore = exp(back_alpha) * fore_scale``). totalVI models no protein library size:
  ``library_size`` does not enter the protein rate;
* ``"atac"`` of a multimodal ScopeVI: the Poisson peak rate and its normalised profile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.module import TOTALVAE, VAE

from .._constants import REGISTRY_KEYS as SCOPE_KEYS
from ..module import MultimodalScopeVAE, ScopeVAE
from ._census import REFERENCE_BATCHES_ATTR, as_names

#: Modality names the probes take, and the scvi-tools registry key of each.
MODALITY_REGISTRY_KEYS: dict[str, str] = {
    "rna": SCVI_KEYS.X_KEY,
    "protein": SCVI_KEYS.PROTEIN_EXP_KEY,
    "atac": SCVI_KEYS.ATAC_X_KEY,
}
#: What a modality's features are called in messages.
FEATURE_NOUNS = {"rna": "genes", "protein": "proteins", "atac": "peaks"}

# (n_cells, n_latent) latent -> (scale or None, rate), both (n_cells, n_features)
Decoder = Callable[[torch.Tensor, np.ndarray], tuple[torch.Tensor | None, torch.Tensor]]


def model_kind(model: Any) -> str:
    """``"scope"`` (ScopeVI, multimodal included), ``"scvi"`` (SCVI) or ``"totalvi"`` (TOTALVI)."""
    module = getattr(model, "module", None)
    if isinstance(module, ScopeVAE):
        return "scope"
    if isinstance(module, VAE):
        return "scvi"
    if isinstance(module, TOTALVAE):
        return "totalvi"
    raise TypeError(
        "probes work on scvi.model.SCVI, scvi.model.TOTALVI and perturbscope.ScopeVI models, not "
        f"{type(model).__name__}"
    )


def model_modalities(model: Any) -> tuple[str, ...]:
    """The modalities a model decodes, e.g. ``("rna", "protein")`` for TOTALVI.

    Examples
    --------
    >>> model_modalities(model)  # doctest: +SKIP
    ('rna', 'protein')
    """
    kind = model_kind(model)
    if kind == "totalvi":
        return ("rna", "protein")
    if isinstance(model.module, MultimodalScopeVAE):
        extra = set(model.module.modalities)
        return ("rna", *[m for m, key in MODALITY_REGISTRY_KEYS.items() if key in extra])
    return ("rna",)


def check_modality(model: Any, modality: Any) -> str:
    """The modality's registry key, or a ``ValueError`` listing the model's modalities."""
    names = model_modalities(model)
    if not isinstance(modality, str) or modality not in names:
        raise ValueError(
            f"modality {modality!r} is not decoded by this {type(model).__name__}; its modalities "
            f"are {list(names)}"
        )
    return MODALITY_REGISTRY_KEYS[modality]


def feature_names(model: Any, modality: str = "rna") -> pd.Index:
    """The features the model decodes for ``modality``, in its output order."""
    state = model.adata_manager.get_state_registry(MODALITY_REGISTRY_KEYS[modality])
    return pd.Index(np.asarray(state.column_names)).astype(str)


def registered_location(model: Any, data: Any, modality: str) -> tuple[ad.AnnData | None, str]:
    """Where ``data`` holds ``modality``'s features: ``(AnnData with them as var, description)``.

    ``None`` for features in ``obsm`` (TOTALVI's protein field on an AnnData), whose column
    names scvi-tools itself checks.
    """
    location = model.adata_manager.data_registry[MODALITY_REGISTRY_KEYS[modality]]
    mod_key = location.get("mod_key") if hasattr(location, "get") else None
    if hasattr(data, "mod"):  # MuData
        if mod_key is None or mod_key not in data.mod:
            raise ValueError(
                f"the MuData has no modality {mod_key!r}, which the model reads {modality} from; "
                f"its modalities are {list(data.mod)}"
            )
        return data.mod[mod_key], f"mdata[{mod_key!r}].var_names"
    if location.attr_name == "obsm":
        return None, f"adata.obsm[{location.attr_key!r}]"
    return data, "adata.var_names"


def _batch_codes(model: Any, names: Sequence[str]) -> list[int]:
    """Integer codes of batch names, with a clear error listing the model's batches."""
    manager = model.adata_manager
    if SCVI_KEYS.BATCH_KEY not in manager.data_registry:
        return [0]
    mapping = [
        str(b) for b in manager.get_state_registry(SCVI_KEYS.BATCH_KEY).categorical_mapping
    ]
    unknown = [n for n in names if str(n) not in mapping]
    if unknown:
        shown = mapping[:20] + (["..."] if len(mapping) > 20 else [])
        raise ValueError(
            f"transform_batch {unknown!r} is not a batch of the model; its batches are {shown} "
            f"({len(mapping)} in all)"
        )
    return [mapping.index(str(n)) for n in names]


def transform_batches(model: Any, transform_batch: str | Sequence[str] | None) -> list[int] | None:
    """Batch codes to decode through (averaged), or ``None`` for each cell's own batch."""
    if transform_batch is None:
        transform_batch = getattr(model, REFERENCE_BATCHES_ATTR, None)
    if transform_batch is None:
        return None
    names = as_names(transform_batch)
    if not names:
        raise ValueError(
            "transform_batch is an empty list; pass a batch name, a list of them, or None"
        )
    return _batch_codes(model, names)


def _registry_tensor(manager: Any, key: str) -> np.ndarray | None:
    if key not in manager.data_registry:
        return None
    values = manager.get_from_registry(key)
    values = values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)
    return values


def _scale_and_rate(px: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised expression and expected counts of an scVI expression distribution.

    Negative binomial and ZINB keep them as ``scale`` and ``mu``, Poisson as ``scale`` and
    ``rate``; the ``"normal"`` likelihood's ``scale`` is its standard deviation, so its normalised
    expression is ``normal_mu`` and its mean ``loc``.
    """
    if hasattr(px, "normal_mu"):
        return px.normal_mu, px.loc
    if hasattr(px, "mu"):
        return px.scale, px.mu
    return px.scale, px.rate


def _totalvi_protein(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground protein expression of totalVI, background at its median (module docs)."""
    py = out["py_"]
    background = torch.exp(py["back_alpha"])
    foreground = (1.0 - torch.sigmoid(py["mixing"])) * background * py["fore_scale"]
    return foreground / foreground.sum(dim=-1, keepdim=True), foreground


def decoder_fn(
    model: Any,
    adata: Any,
    transform_batch: str | Sequence[str] | None,
    library_size: float,
    modality: str = "rna",
) -> Decoder:
    """Return ``decode(z, rows) -> (scale, rate)`` of ``modality`` for the cells ``rows`` of ``adata``.

    Covariates are read once from the model's registry for ``adata``; ``z`` is the only
    differentiated input. With several transform batches, expression is averaged over them
    (scvi-tools' convention for ``transform_batch`` lists).
    """
    kind = model_kind(model)
    key = check_modality(model, modality)
    module = model.module
    codes = transform_batches(model, transform_batch)
    # scvi-tools getters register an unseen AnnData the same way (adding its ``_scvi_*`` keys)
    manager = None
    if adata is not None:
        adata = model._validate_anndata(adata)
        manager = model.get_anndata_manager(adata, required=True)
    if manager is None and codes is None:
        n_batch = getattr(module, "n_batch", 1) or 1
        codes = list(range(n_batch))  # no cells to read batches from: average over all

    def from_registry(name: str) -> np.ndarray | None:
        return None if manager is None else _registry_tensor(manager, name)

    own_batch = from_registry(SCVI_KEYS.BATCH_KEY)
    cont = from_registry(SCVI_KEYS.CONT_COVS_KEY)
    cat = from_registry(SCVI_KEYS.CAT_COVS_KEY)
    labels = from_registry(SCVI_KEYS.LABELS_KEY)
    if manager is None and (
        SCVI_KEYS.CONT_COVS_KEY in model.adata_manager.data_registry
        or SCVI_KEYS.CAT_COVS_KEY in model.adata_manager.data_registry
    ):
        raise ValueError("this model has covariates: pass adata with z so they can be read")
    # ScopeVI decodes each cell at its own registered perturbation (controls: none)
    perturbation = from_registry(SCOPE_KEYS.PERTURBATION_KEY) if kind == "scope" else None

    param = next(module.parameters())
    device, dtype = param.device, param.dtype

    def tensor(values: np.ndarray | None, rows: np.ndarray, as_dtype: torch.dtype) -> Any:
        if values is None:
            return None
        return torch.as_tensor(np.asarray(values)[rows], device=device, dtype=as_dtype)

    def decode_one(z: torch.Tensor, rows: np.ndarray, batch_index: Any, log_library: torch.Tensor):
        n = z.shape[0]
        if kind == "scope":
            arguments = (z, tensor(perturbation, rows, torch.long), batch_index,
                         tensor(cat, rows, torch.long), log_library)
            if modality == "rna":
                decoded = module.decode(*arguments)
            else:
                decoded = module.decode_modality_expression(key, *arguments)
            return decoded.scale, decoded.mean
        if batch_index is None:
            batch_index = torch.zeros((n, 1), dtype=torch.long, device=device)
        label = tensor(labels, rows, torch.long)
        if kind == "scvi":
            # size_factor: used in place of the library by models set up with a size_factor_key;
            # y: read by label-specific dispersion ("gene-label")
            out = module.generative(z=z, library=log_library, batch_index=batch_index,
                                    cont_covs=tensor(cont, rows, dtype), cat_covs=tensor(cat, rows, torch.long),
                                    size_factor=log_library,
                                    y=label if label is not None else torch.zeros((n, 1), dtype=torch.long, device=device))
            return _scale_and_rate(out["px"])
        out = module.generative(
            z, log_library.exp(), batch_index,
            label if label is not None else torch.zeros((n, 1), dtype=torch.long, device=device),
            cont_covs=tensor(cont, rows, dtype), cat_covs=tensor(cat, rows, torch.long),
        )
        if modality == "rna":
            return out["px_"]["scale"], out["px_"]["rate"]
        return _totalvi_protein(out)

    def decode(z: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        n = z.shape[0]
        log_library = torch.full((n, 1), float(np.log(library_size)), device=device, dtype=dtype)
        if codes is None:
            batches = [tensor(own_batch, rows, torch.long)]
        else:
            batches = [torch.full((n, 1), c, device=device, dtype=torch.long) for c in codes]
        scale_sum, rate_sum = None, None
        for batch_index in batches:
            scale, rate = decode_one(z, rows, batch_index, log_library)
            scale_sum = scale if scale_sum is None else scale_sum + scale
            rate_sum = rate if rate_sum is None else rate_sum + rate
        k = len(batches)
        return (None if scale_sum is None else scale_sum / k), rate_sum / k

    return decode
