"""Load saved scVI models (CELLxGENE Census ones included) for probing, without trusting them.

:func:`load_scvi_model` reads a folder saved by scvi-tools 0.14 to 1.4 without ever calling
``scvi.model.SCVI.load`` (which unpickles with ``torch.load(weights_only=False)`` and runs any
code the file names):

* **Reading.** ``model.pt`` (scvi-tools >= 0.15: ``model_state_dict``, ``var_names``,
  ``attr_dict``) or the older ``model_params.pt`` + ``var_names.csv`` + ``attr.pkl`` layout goes
  through :mod:`perturbscope._safe_load`'s allow-list unpickler; pandas 1.x classes such as
  ``Int64Index`` are rebuilt as :class:`pandas.Index`.
* **Checking.** The file never chooses which code runs: the model class must be on an allow-list
  (:data:`SUPPORTED_MODELS`), the setup method must be ``setup_anndata``, setup arguments and
  init parameters must be parameters of ``SCVI.setup_anndata`` / ``SCVI`` / ``VAE`` and hold
  plain data, and sizes are checked against documented caps (:data:`SIZE_CAPS`) before anything
  is allocated. Old ``_scvi`` setup dictionaries (``scvi_setup_dict_``) are converted to a
  registry by scvi-tools' own ``registry_from_setup_dict``; registries without
  ``setup_method_name`` are read as ``setup_anndata`` ones.
* **Rebuilding.** The query's genes are mapped onto the model's in a new AnnData (zero-filling
  genes the query lacks, with a warning), registered with the model's own setup arguments so
  category codes match training, and the model is rebuilt through public scvi-tools API. The
  decoder's batch input is fixed to named reference batches (or their average) and recorded on
  the model as ``probe_reference_batches_``, so no probe decodes through a batch the model has
  not seen.

:func:`load_census_scvi` adds the Census specifics: Ensembl IDs with version suffixes, a
``gene_id_column`` for symbol-indexed queries, and every query cell set to a reference batch.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data import is_out_of_core, iter_row_chunks
from ..data._checks import preview as _preview
from ._scvi_files import (
    COPIED_ATTRS,
    SUPPORTED_MODELS,
    check_model_size,
    init_params_of,
    read_saved_files,
    registry_of,
)

#: Model attribute naming the reference batches whose decoder the probes use.
REFERENCE_BATCHES_ATTR = "probe_reference_batches_"
#: Model attribute set when the model was loaded without cells (its AnnData is a placeholder).
PLACEHOLDER_ATTR = "probe_placeholder_"


def _strip_version(ids: pd.Index) -> pd.Index:
    """``ENSG00000121410.12`` -> ``ENSG00000121410``; anything else unchanged."""
    return pd.Index([re.sub(r"^(ENS[A-Z]*G\d+)\.\d+$", r"\1", str(i)) for i in ids])


def _query_gene_ids(
    adata: ad.AnnData, gene_id_column: str | None, normalise: Callable[[pd.Index], pd.Index]
) -> pd.Index:
    if gene_id_column is None:
        return normalise(pd.Index(adata.var_names.astype(str)))
    if gene_id_column not in adata.var.columns:
        raise ValueError(
            f"gene_id_column {gene_id_column!r} is not a column of adata.var; columns are "
            f"{list(adata.var.columns)}"
        )
    return normalise(pd.Index(adata.var[gene_id_column].astype(str)))


def as_names(value: Any) -> list:
    """One name (any scalar: batch names are often integers) or a sequence of names, as a list."""
    return [value] if np.isscalar(value) else list(value)


def _category_of(registry: dict[str, Any], field: str) -> np.ndarray | None:
    entry = registry["field_registries"].get(field, {})
    state = entry.get("state_registry", {}) if isinstance(entry, Mapping) else {}
    mapping = state.get("categorical_mapping") if isinstance(state, Mapping) else None
    return None if mapping is None else np.asarray(mapping, dtype=object)


def _resolve_reference_batches(
    batch_names: np.ndarray, reference_batch: str | Sequence[str] | None, batch_key: str | None
) -> list[str]:
    if reference_batch is None:
        return [str(b) for b in batch_names]
    wanted = as_names(reference_batch)
    known = {str(b) for b in batch_names}
    unknown = [b for b in wanted if str(b) not in known]
    if unknown or not wanted:
        raise ValueError(
            f"reference_batch {unknown or wanted!r} is not a batch of the model (batch key "
            f"{batch_key!r}); its batches are {_preview(batch_names, 20)}"
        )
    return [str(b) for b in wanted]


def _map_genes(
    adata: ad.AnnData,
    model_genes: pd.Index,
    gene_id_column: str | None,
    layer: str | None,
    normalise: Callable[[pd.Index], pd.Index],
    id_kind: str,
) -> ad.AnnData:
    """A new AnnData with the model's genes in its order (zero-filled where the query lacks one)."""
    query_ids = _query_gene_ids(adata, gene_id_column, normalise)
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer {layer!r} is not in adata.layers {list(adata.layers)}")
    source = adata.layers[layer] if layer is not None else adata.X
    first = ~query_ids.duplicated()
    if not first.all():
        warnings.warn(
            f"{int((~first).sum())} query genes share an ID with an earlier gene; keeping the first",
            UserWarning,
            stacklevel=3,
        )
    position = pd.Series(np.flatnonzero(first), index=query_ids[first])
    matched = model_genes.isin(position.index)
    if not matched.any():
        where = f"adata.var[{gene_id_column!r}]" if gene_id_column else "adata.var_names"
        raise ValueError(
            f"no gene overlap: none of the {adata.n_vars} query genes ({where}, e.g. "
            f"{_preview(query_ids[:5], 5)}) is among the model's {len(model_genes)} {id_kind} "
            f"(e.g. {_preview(model_genes[:5], 5)}). If var_names are symbols, pass "
            "gene_id_column naming the column that holds the model's gene IDs."
        )
    n_missing = int((~matched).sum())
    if n_missing:
        warnings.warn(
            f"{n_missing} of the model's {len(model_genes)} genes "
            f"({n_missing / len(model_genes):.1%}) are absent from the query and are zero-filled",
            UserWarning,
            stacklevel=3,
        )
    src_cols = position.reindex(model_genes[matched]).to_numpy()
    dst_cols = np.flatnonzero(matched)
    # a backed matrix is read a chunk of rows at a time, only the model's columns kept
    chunks = [sp.csr_matrix(rows)[:, src_cols] for _, rows in iter_row_chunks(source)] \
        if is_out_of_core(source) else [sp.csr_matrix(source)[:, src_cols]]
    counts = sp.vstack(chunks, format="csr").tocoo() if chunks else sp.coo_matrix((0, len(src_cols)))
    X = sp.csr_matrix(
        (counts.data.astype(np.float32), (counts.row, dst_cols[counts.col])),
        shape=(adata.n_obs, len(model_genes)),
    )
    symbols = np.full(len(model_genes), "", dtype=object)
    symbols[dst_cols] = np.asarray(adata.var_names)[src_cols]
    var = pd.DataFrame({"gene_symbol": symbols, "probe_in_query": matched}, index=model_genes)
    return ad.AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=var,
        obsm={k: v.copy() for k, v in adata.obsm.items()},  # sparse and DataFrame entries keep their type
        uns=copy.deepcopy(dict(adata.uns)),  # nested dicts and arrays too: the query stays the user's
    )


def _set_category(
    query: ad.AnnData, key: str, names: np.ndarray, fill: Any, override: bool, what: str
) -> None:
    """Give ``obs[key]`` codes the model knows: ``fill`` everywhere, or check the query's own."""
    if override or key not in query.obs:
        query.obs[key] = pd.Categorical([fill] * query.n_obs, categories=names)
        return
    values = query.obs[key].astype(str)
    known = {str(n) for n in names}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"adata.obs[{key!r}] holds {what} the model was not trained on: "
            f"{_preview(unknown, 10)}; its {what} are {_preview(names, 20)}"
        )


def load_scvi_model(
    dir_path: str | Path,
    adata: ad.AnnData | None = None,
    *,
    prefix: str = "",
    gene_id_column: str | None = None,
    layer: str | None = None,
    reference_batch: str | Sequence[str] | None = None,
    _override_covariates: bool = False,
    _normalise_ids: Callable[[pd.Index], pd.Index] = lambda ids: ids,
    _id_kind: str = "genes",
):
    """Load a saved scVI model folder without running code from it.

    Reads the folders scvi-tools 0.14 to 1.4 write (``model.pt``, or the older
    ``model_params.pt`` + ``var_names.csv`` + ``attr.pkl``) through a restricted unpickler, checks
    the model class, setup method, setup arguments, init parameters and sizes (see the module
    notes, :data:`SUPPORTED_MODELS` and :data:`SIZE_CAPS`), and rebuilds the model through public
    scvi-tools API. ``scvi.model.SCVI.load`` is never called: it would run
    ``torch.load(weights_only=False)`` and so execute any code the file carries.

    The query is never modified: a new AnnData is built whose genes are the model's, in the
    model's order, with zero columns for model genes the query lacks. A batch (or labels) column
    the query has must hold categories the model knows; a missing one is filled with the first
    reference batch (or the first label).

    Parameters
    ----------
    dir_path
        Folder of the saved model.
    adata
        Cells with raw counts in ``X`` (or ``layers[layer]``). ``None`` attaches a one-cell,
        all-zero placeholder: probes then need explicit latent points
        (``decoder_jacobian(model, z=...)``).
    prefix
        File-name prefix the model was saved with (``prefix`` of ``SCVI.save``).
    gene_id_column
        Column of ``adata.var`` holding the model's gene IDs, for when ``var_names`` differ.
    layer
        Layer of ``adata`` holding counts; ``None`` uses ``X``.
    reference_batch
        A batch name of the model, or a list of names: probes decode through this batch, or the
        average over the listed batches. ``None`` averages over every batch of the model.

    Returns
    -------
    A :class:`scvi.model.SCVI` in eval mode, marked trained, whose ``adata`` is the new AnnData
    (``var["gene_symbol"]`` the query's ``var_names`` of matched genes, ``var["probe_in_query"]``
    whether a gene was measured) and whose ``probe_reference_batches_`` lists the reference
    batches. ``history_`` and the train/validation/test indices are copied from the file.

    Raises
    ------
    ValueError
        If the folder holds no saved model, ``adata`` has no cells, the file names a global
        outside the allow-list, the model class is not in :data:`SUPPORTED_MODELS`, the setup method is not
        ``setup_anndata``, a setup argument or init parameter is unknown or not plain data, a
        size exceeds :data:`SIZE_CAPS`, no query gene matches, ``gene_id_column`` or ``layer`` is
        missing, ``reference_batch`` or a query batch is not a batch of the model, or the
        weights do not fit the rebuilt model.

    Warns
    -----
    UserWarning
        With the fraction of model genes that the query lacks and that are zero-filled.

    Examples
    --------
    >>> import tempfile, anndata as ad, numpy as np, scvi
    >>> data = ad.AnnData(np.random.default_rng(0).poisson(1.0, (40, 12)).astype(np.float32))
    >>> scvi.model.SCVI.setup_anndata(data)
    >>> trained = scvi.model.SCVI(data, n_latent=3, n_hidden=8)
    >>> folder = tempfile.mkdtemp()
    >>> trained.save(folder, overwrite=True)
    >>> model = load_scvi_model(folder)
    >>> model.module.n_latent, model.adata.n_vars
    (3, 12)
    """
    import scvi

    dir_path = Path(dir_path)
    state, var_names, attr_dict, where = read_saved_files(dir_path, prefix)
    registry = registry_of(attr_dict, SUPPORTED_MODELS, where)
    init = init_params_of(attr_dict, where)
    setup_args = dict(registry["setup_args"])
    model_genes = _normalise_ids(pd.Index(var_names))
    n_vars = registry["field_registries"].get("X", {}).get("state_registry", {}).get("n_vars")
    if n_vars is not None and n_vars != len(model_genes):
        raise ValueError(
            f"{where}: the registry records {n_vars!r} genes but var_names has {len(model_genes)}"
        )
    batch_key = setup_args.get("batch_key")
    batch_names = _category_of(registry, "batch")
    if batch_names is None:
        batch_names = np.array(["_scvi_default"], dtype=object)
    check_model_size(init, len(model_genes), len(batch_names), where)
    references = _resolve_reference_batches(batch_names, reference_batch, batch_key)

    placeholder = adata is None
    if adata is not None and adata.n_obs == 0:
        raise ValueError("adata has no cells; pass the query cells to probe, or None for a model without cells.")
    if adata is None:
        adata = ad.AnnData(
            sp.csr_matrix((1, len(model_genes)), dtype=np.float32),
            var=pd.DataFrame(index=model_genes),
        )
        adata.obs_names = ["probe_placeholder"]
        gene_id_column, layer = None, None
    query = _map_genes(adata, model_genes, gene_id_column, layer, _normalise_ids, _id_kind)

    if batch_key is not None:
        _set_category(query, batch_key, batch_names, references[0], _override_covariates, "batches")
    labels_key = setup_args.get("labels_key")
    label_names = _category_of(registry, "labels")
    if labels_key is not None and label_names is not None:
        _set_category(
            query, labels_key, label_names, label_names[0], _override_covariates, "labels"
        )
    if setup_args.get("categorical_covariate_keys"):
        raise ValueError(
            f"the model registers categorical covariates {setup_args['categorical_covariate_keys']}; "
            "this loader handles batch and labels only"
        )
    for key in (setup_args.get("continuous_covariate_keys") or []) + [
        k for k in [setup_args.get("size_factor_key")] if k
    ]:
        if key not in query.obs:
            raise ValueError(
                f"the model needs obs column {key!r}; adata.obs has {list(adata.obs.columns)}"
            )
    setup_args["layer"] = None

    with warnings.catch_warnings():
        if placeholder:  # scvi-tools warns that a one-cell category cannot train
            warnings.filterwarnings("ignore", message=r"Category .* has fewer than 3 cells")
        scvi.model.SCVI.setup_anndata(query, source_registry=registry, **setup_args)
    model = scvi.model.SCVI(query, **init)
    for attr, kind in COPIED_ATTRS.items():
        if isinstance(attr_dict.get(attr), kind):
            setattr(model, attr, attr_dict[attr])
    state = dict(state)
    state.pop("pyro_param_store", None)  # scvi-tools saves it for Pyro modules; SCVI has none
    try:
        model.module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{where}: the saved weights do not fit the model its init parameters describe: {err}"
        ) from err
    model.module.eval()
    model.is_trained_ = True
    setattr(model, REFERENCE_BATCHES_ATTR, references)
    setattr(model, PLACEHOLDER_ATTR, placeholder)
    return model


def load_census_scvi(
    model_dir: str | Path,
    adata: ad.AnnData,
    gene_id_column: str | None = None,
    reference_batch: str | Sequence[str] | None = None,
    layer: str | None = None,
):
    """Load a CELLxGENE Census scVI model folder and attach a query AnnData to it.

    The folder holds only ``model.pt`` (Ensembl-ID ``var_names``, a batch key concatenating
    dataset, assay, suspension type and donor, ``n_latent=50``, NB likelihood). It is read by
    :func:`load_scvi_model`, through a restricted unpickler that only builds the numpy, pandas,
    container and tensor objects an scVI model needs; ``scvi.model.SCVI.load`` would instead run
    ``torch.load(weights_only=False)`` and execute any code the file carries.

    Census specifics: gene IDs are compared without version suffixes (``.12``), and every query
    cell's batch (and label) is set to the first reference batch (the encoder needs a valid
    code); every probe decodes through ``probe_reference_batches_`` instead, so the decoder never
    sees an untrained query batch.

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
        ``reference_batch`` names a batch the model does not have (the message lists them); and
        for every refusal of :func:`load_scvi_model`.

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
    return load_scvi_model(
        model_dir,
        adata,
        gene_id_column=gene_id_column,
        layer=layer,
        reference_batch=reference_batch,
        _override_covariates=True,
        _normalise_ids=_strip_version,
        _id_kind="Ensembl IDs",
    )
