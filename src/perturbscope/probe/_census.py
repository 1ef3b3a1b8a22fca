"""Load a CELLxGENE Census scVI model folder for probing.

A Census scVI folder holds only ``model.pt``: weights, the training registry and the model's
``var_names`` (Ensembl IDs of the top 8,000 genes). We load it without trusting the pickle
(:mod:`perturbscope._safe_load`), map the query's genes onto the model's Ensembl IDs in a
new AnnData (zero-filling genes the query lacks, with a warning), register that AnnData with the
model's own setup arguments so category codes match training, and rebuild the model through
public scvi-tools API. The decoder's batch input is fixed to named reference batches (or their
average) and recorded on the model as ``probe_reference_batches_``, so no probe ever decodes
through a batch the model has not seen.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._safe_load import load_model_file

#: Model attribute naming the reference batches whose decoder the probes use.
REFERENCE_BATCHES_ATTR = "probe_reference_batches_"
_SUPPORTED_MODELS = ("SCVI",)


def _strip_version(ids: pd.Index) -> pd.Index:
    """``ENSG00000121410.12`` -> ``ENSG00000121410``; anything else unchanged."""
    return pd.Index([re.sub(r"^(ENS[A-Z]*G\d+)\.\d+$", r"\1", str(i)) for i in ids])


def _preview(values: Sequence[Any], n: int = 10) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}] ({len(values)} in all)"


def _read_model_folder(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ValueError(f"model_dir {str(model_dir)!r} is not a folder")
    model_file = model_dir / "model.pt"
    if not model_file.is_file():
        raise ValueError(
            f"{str(model_dir)!r} is not an scVI model folder: it has no model.pt "
            f"(found {_preview(sorted(p.name for p in model_dir.iterdir()))})"
        )
    payload = load_model_file(model_file)
    needed = ("model_state_dict", "var_names", "attr_dict")
    if not isinstance(payload, dict) or any(k not in payload for k in needed):
        keys = list(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{str(model_file)!r} is not an scVI model file: expected the keys {list(needed)}, "
            f"found {keys}"
        )
    registry = payload["attr_dict"].get("registry_", {})
    name = registry.get("model_name")
    if name not in _SUPPORTED_MODELS:
        raise ValueError(
            f"{str(model_file)!r} holds a {name!r} model; load_census_scvi reads "
            f"{list(_SUPPORTED_MODELS)} models"
        )
    return payload


def _query_gene_ids(adata: ad.AnnData, gene_id_column: str | None) -> pd.Index:
    if gene_id_column is None:
        return _strip_version(adata.var_names)
    if gene_id_column not in adata.var.columns:
        raise ValueError(
            f"gene_id_column {gene_id_column!r} is not a column of adata.var; columns are "
            f"{list(adata.var.columns)}"
        )
    return _strip_version(pd.Index(adata.var[gene_id_column].astype(str)))


def _category_of(registry: dict[str, Any], field: str) -> np.ndarray | None:
    state = registry["field_registries"].get(field, {}).get("state_registry", {})
    mapping = state.get("categorical_mapping")
    return None if mapping is None else np.asarray(mapping, dtype=object)


def _resolve_reference_batches(
    batch_names: np.ndarray, reference_batch: str | Sequence[str] | None, batch_key: str | None
) -> list[str]:
    if reference_batch is None:
        return [str(b) for b in batch_names]
    wanted = [reference_batch] if isinstance(reference_batch, str) else list(reference_batch)
    unknown = [b for b in wanted if b not in set(batch_names)]
    if unknown or not wanted:
        raise ValueError(
            f"reference_batch {unknown or wanted!r} is not a batch of the model (batch key "
            f"{batch_key!r}); its batches are {_preview(batch_names, 20)}"
        )
    return [str(b) for b in wanted]


def load_census_scvi(
    model_dir: str | Path,
    adata: ad.AnnData,
    gene_id_column: str | None = None,
    reference_batch: str | Sequence[str] | None = None,
    layer: str | None = None,
):
    """Load a CELLxGENE Census scVI model folder and attach a query AnnData to it.

    The folder holds only ``model.pt`` (Ensembl-ID ``var_names``, a batch key concatenating
    dataset, assay, suspension type and donor, ``n_latent=50``, NB likelihood). The file is read
    through a restricted unpickler that only builds the numpy, pandas, container and tensor
    objects an scVI model needs; ``scvi.model.SCVI.load`` would instead run
    ``torch.load(weights_only=False)`` and execute any code the file carries. Only this
    restricted path avoids trusting the file.

    The query is never modified: a new AnnData is built whose genes are the model's, in the
    model's order, with zero columns for model genes the query lacks. Its ``obs`` is a copy of
    the query's with the model's batch key set to the first reference batch (the encoder needs a
    valid code); every probe decodes through ``probe_reference_batches_`` instead, so the
    decoder never sees an untrained query batch.

    Parameters
    ----------
    model_dir
        Folder holding ``model.pt``.
    adata
        Query cells with raw counts in ``X`` (or in ``layers[layer]``).
    gene_id_column
        Column of ``adata.var`` holding Ensembl gene IDs, for when ``var_names`` are symbols.
        ``None`` uses ``var_names`` as IDs. Version suffixes (``.12``) are ignored.
    reference_batch
        A batch name of the model, or a list of names: probes decode through this batch, or the
        average of decoded expression over the listed batches. ``None`` averages over every
        batch the model was trained on (cost grows with their number; name a few for speed).
    layer
        Layer of ``adata`` holding counts; ``None`` uses ``X``.

    Returns
    -------
    A :class:`scvi.model.SCVI` in eval mode whose ``adata`` is the new query AnnData:

    - ``var_names``: the model's Ensembl IDs; ``var["gene_symbol"]`` the query's ``var_names``
      for matched genes (empty string otherwise) and ``var["probe_in_query"]`` whether the gene
      was measured;
    - ``obs``, ``obsm``, ``uns``: copies of the query's;
    - ``model.probe_reference_batches_``: the reference batch names the probes decode through.

    Raises
    ------
    ValueError
        If ``model_dir`` is not an scVI model folder, no query gene matches the model's IDs,
        ``gene_id_column`` is not in ``adata.var``, ``layer`` is not a layer, or
        ``reference_batch`` names a batch the model does not have (the message lists them).

    Warns
    -----
    UserWarning
        With the fraction of model genes that the query lacks and that are zero-filled.

    Examples
    --------
    >>> model = load_census_scvi(
    ...     "census_scvi_2023-12-15/homo_sapiens", adata, gene_id_column="ensembl_id"
    ... )  # doctest: +SKIP
    >>> jac = perturbscope.probe.decoder_jacobian(model, genes=["ENSG00000187608"])  # doctest: +SKIP
    """
    import scvi

    model_dir = Path(model_dir)
    payload = _read_model_folder(model_dir)
    attr_dict = dict(payload["attr_dict"])
    registry = attr_dict.pop("registry_")
    init_params = attr_dict.pop("init_params_")
    setup_args = dict(registry["setup_args"])
    model_genes = _strip_version(pd.Index(np.asarray(payload["var_names"]).astype(str)))

    # --- genes: map, reorder, zero-fill ---------------------------------------------------
    query_ids = _query_gene_ids(adata, gene_id_column)
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer {layer!r} is not in adata.layers {list(adata.layers)}")
    source = adata.layers[layer] if layer is not None else adata.X
    first = ~query_ids.duplicated()
    if not first.all():
        warnings.warn(
            f"{int((~first).sum())} query genes share an ID with an earlier gene; keeping the first",
            UserWarning,
            stacklevel=2,
        )
    position = pd.Series(np.flatnonzero(first), index=query_ids[first])
    matched = model_genes.isin(position.index)
    if not matched.any():
        where = f"adata.var[{gene_id_column!r}]" if gene_id_column else "adata.var_names"
        raise ValueError(
            f"no gene overlap: none of the {adata.n_vars} query genes ({where}, e.g. "
            f"{_preview(query_ids[:5], 5)}) is among the model's {len(model_genes)} Ensembl IDs "
            f"(e.g. {_preview(model_genes[:5], 5)}). If var_names are symbols, pass "
            "gene_id_column naming the Ensembl ID column."
        )
    n_missing = int((~matched).sum())
    if n_missing:
        warnings.warn(
            f"{n_missing} of the model's {len(model_genes)} genes ({n_missing / len(model_genes):.1%}) "
            "are absent from the query and are zero-filled",
            UserWarning,
            stacklevel=2,
        )
    src_cols = position.reindex(model_genes[matched]).to_numpy()
    dst_cols = np.flatnonzero(matched)
    counts = sp.csr_matrix(source)[:, src_cols].tocoo()
    X = sp.csr_matrix(
        (counts.data.astype(np.float32), (counts.row, dst_cols[counts.col])),
        shape=(adata.n_obs, len(model_genes)),
    )
    symbols = np.full(len(model_genes), "", dtype=object)
    symbols[dst_cols] = np.asarray(adata.var_names)[src_cols]
    var = pd.DataFrame({"gene_symbol": symbols, "probe_in_query": matched}, index=model_genes)

    query = ad.AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=var,
        obsm={k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        uns=dict(adata.uns),
    )

    # --- covariates: give every registered categorical field a code the model knows -------
    batch_key = setup_args.get("batch_key")
    batch_names = _category_of(registry, "batch")
    if batch_names is None:
        batch_names = np.array(["_scvi_default"], dtype=object)
    references = _resolve_reference_batches(batch_names, reference_batch, batch_key)
    if batch_key is not None:
        query.obs[batch_key] = pd.Categorical([references[0]] * query.n_obs, categories=batch_names)
    labels_key = setup_args.get("labels_key")
    label_names = _category_of(registry, "labels")
    if labels_key is not None and label_names is not None:
        query.obs[labels_key] = pd.Categorical(
            [label_names[0]] * query.n_obs, categories=label_names
        )
    if setup_args.get("categorical_covariate_keys"):
        raise ValueError(
            f"the model registers categorical covariates {setup_args['categorical_covariate_keys']}; "
            "load_census_scvi handles batch and labels only"
        )
    for key in (setup_args.get("continuous_covariate_keys") or []) + [
        k for k in [setup_args.get("size_factor_key")] if k
    ]:
        if key not in query.obs:
            raise ValueError(
                f"the model needs obs column {key!r}; adata.obs has {list(adata.obs.columns)}"
            )
    setup_args["layer"] = None

    scvi.model.SCVI.setup_anndata(query, source_registry=registry, **setup_args)
    non_kwargs = dict(init_params.get("non_kwargs", {}))
    kwargs = {k: v for group in init_params.get("kwargs", {}).values() for k, v in group.items()}
    model = scvi.model.SCVI(query, **non_kwargs, **kwargs)
    for attr, value in attr_dict.items():
        setattr(model, attr, value)
    state = dict(payload["model_state_dict"])
    state.pop("pyro_param_store", None)  # scvi-tools saves it for Pyro modules; SCVI has none
    model.module.load_state_dict(state)
    model.module.eval()
    model.is_trained_ = True
    setattr(model, REFERENCE_BATCHES_ATTR, references)
    return model
