"""Loading a saved ScopeVI without trusting the file: the restricted counterpart of scvi's ``load``.

scvi-tools' own ``load`` unpickles ``model.pt`` with ``weights_only=False``, which runs any
callable the file names. :class:`SafeLoadMixin` reads it through
:func:`perturbscope._safe_load.load_model_file` and lets the file choose data only: the setup
method is one of an allow-list and its arguments are checked against that method's signature.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS

from .._safe_load import load_model_file
from ..data import check_var_names
from ..module._decoder import covariate_widths
from ..module._multimodal import modality_features
from ._multimodal_setup import MODALITY_ARGUMENTS

#: The setup methods a saved file may name; anything else is refused.
ALLOWED_SETUP_METHODS = ("setup_anndata", "setup_mudata")


def resolve_device(accelerator: str, device: int | str) -> str | int:
    """``"auto"`` picks the first GPU when one is there and allowed, else the CPU.

    Examples
    --------
    >>> resolve_device("cpu", "auto")
    'cpu'
    """
    if device != "auto":
        return device
    gpu_allowed = accelerator in ("auto", "gpu", "cuda")
    return "cuda:0" if gpu_allowed and torch.cuda.is_available() else "cpu"


def checked_setup(cls, registry: dict, path: Path):
    """The class's setup method named by a saved registry, with its arguments checked.

    Raises
    ------
    ValueError
        If the file names a method outside :data:`ALLOWED_SETUP_METHODS`, or arguments that
        method does not take.
    """
    name = registry.get("setup_method_name", "setup_anndata")
    if name not in ALLOWED_SETUP_METHODS:
        raise ValueError(
            f"{path} names the setup method {name!r}; only {list(ALLOWED_SETUP_METHODS)} are allowed."
        )
    method = getattr(cls, name)
    setup_args = registry.get("setup_args", {})
    if not isinstance(setup_args, dict):
        raise ValueError(f"{path} has setup_args of type {type(setup_args).__name__}; expected a dict.")
    accepted = set(inspect.signature(method).parameters) - {"kwargs", "cls", "self"}
    unknown = sorted(set(map(str, setup_args)) - accepted)
    if unknown:
        raise ValueError(f"{path} passes arguments {unknown} that {cls.__name__}.{name} does not take.")
    return method, setup_args


class SafeLoadMixin:
    """``load`` for models whose files must not run code; see the module docstring."""

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: ad.AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
    ):
        """Load a saved model without trusting the file's pickled code.

        The file is read with an unpickler that allows only the numpy, pandas, container and
        tensor globals a saved model needs (:func:`perturbscope._safe_load.load_model_file`). The
        setup method it names must be ``setup_anndata`` or ``setup_mudata``, called with
        arguments that method takes.

        Parameters
        ----------
        dir_path
            Folder written by ``save``.
        adata
            AnnData with the training genes, set up here with the saved registry. ``None`` reads
            ``adata.h5ad`` from the folder (saved with ``save_anndata=True``).
        accelerator, device
            Where to put the model (scvi-tools conventions).
        prefix
            Prefix of the saved file names.

        Returns
        -------
        The trained model, in evaluation mode.

        Raises
        ------
        FileNotFoundError
            If there is no model file in ``dir_path``.
        ValueError
            If the file holds another model class, asks for globals outside the allow-list,
            names a setup method or arguments that are not allowed, or ``adata`` has other genes.

        Examples
        --------
        >>> import tempfile
        >>> import perturbscope as ps
        >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=6,
        ...                                          n_combinations=2, n_cells_per_condition=10)
        >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb,
        ...                          context_key="cell_type")
        >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16)
        >>> model.train(max_epochs=1, enable_progress_bar=False)
        >>> folder = tempfile.mkdtemp()
        >>> model.save(folder, overwrite=True)
        >>> loaded = ps.ScopeVI.load(folder, adata)
        >>> type(loaded).__name__, loaded.is_trained_, list(loaded.var_names) == list(adata.var_names)
        ('ScopeVI', True, True)
        """
        return cls._load(dir_path, adata, accelerator, device, prefix, extend_categories=False)

    @classmethod
    def _load_reference(cls, dir_path: str | os.PathLike, adata):
        """A saved reference set up on a query's ``adata``, its categories extended by the query's.

        Weights of the new batch or covariate categories start at zero (see
        :func:`expand_covariate_columns`); ``load_query_data`` copies them from here.
        """
        return cls._load(dir_path, adata, "auto", "auto", None, extend_categories=True)

    @classmethod
    def _load(cls, dir_path, adata, accelerator, device, prefix, extend_categories: bool):
        folder = Path(dir_path)
        path = folder / f"{prefix or ''}model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is {folder} a folder written by {cls.__name__}.save?")
        payload = load_model_file(path)
        _check_payload(payload, path)
        attr_dict = dict(payload["attr_dict"])
        registry = attr_dict.pop("registry_")
        if registry.get("model_name", cls.__name__) != cls.__name__:
            raise ValueError(f"{path} holds a {registry['model_name']} model, not {cls.__name__}.")
        setup, setup_args = checked_setup(cls, registry, path)
        adata = _saved_or_given_adata(folder, prefix, adata)
        _check_saved_genes(payload["var_names"], adata, setup_args)
        before = _setup_keys(adata)
        saved_sizes = registry_covariate_sizes(registry)
        try:
            setup(adata, source_registry=registry, extend_categories=extend_categories, **setup_args)
        except Exception as error:
            _remove_new_keys(adata, before)
            if isinstance(error, ValueError) and "extend_categories" in str(error):
                raise ValueError(
                    f"adata has categories the saved model was not trained on ({error}). A saved model "
                    "predicts only the categories it was trained on; for a new context or batch "
                    f"use {cls.__name__}.load_query_data(adata, model) and fine-tune."
                ) from error
            raise
        model = cls(adata, **_init_kwargs(attr_dict.pop("init_params_")))
        for attr, value in _data_attributes(attr_dict, cls).items():
            setattr(model, attr, value)
        state = dict(payload["model_state_dict"])
        state.pop("pyro_param_store", None)
        if extend_categories:
            sizes = (saved_sizes, model.module.covariate_sizes)
            state = {key: expand_covariate_columns(state[key], value, *sizes)
                     for key, value in model.module.state_dict().items()}
        model.module.load_state_dict(state)
        model.to_device(resolve_device(accelerator, device))
        model.module.eval()
        return model


def registry_covariate_sizes(registry: dict) -> list[int]:
    """One-hot widths of the decoder covariates a registry implies (``ScopeVAE.covariate_sizes``).

    The batch first, then each extra categorical covariate, by the module's own rule
    (:func:`~perturbscope.module._decoder.covariate_widths`).

    Examples
    --------
    >>> registry = {"field_registries": {"batch": {"summary_stats": {"n_batch": 3}},
    ...             "extra_categorical_covs": {"state_registry": {"n_cats_per_key": [1, 4]}}}}
    >>> registry_covariate_sizes(registry)
    [3, 0, 4]
    """
    fields = registry["field_registries"]
    n_batch = fields.get(SCVI_KEYS.BATCH_KEY, {}).get("summary_stats", {}).get("n_batch", 1)
    per_key = fields.get(SCVI_KEYS.CAT_COVS_KEY, {}).get("state_registry", {}).get("n_cats_per_key", [])
    return covariate_widths(n_batch, per_key)


def expand_covariate_columns(
    reference: torch.Tensor, target: torch.Tensor, reference_sizes: list[int], target_sizes: list[int]
) -> torch.Tensor:
    """Copy a reference weight into a query weight that has more one-hot covariate columns.

    FCLayers append one-hot covariate blocks after the continuous input; new categories get
    zero weights, so the layer's output is unchanged for the reference categories.

    Examples
    --------
    >>> reference = torch.tensor([[1.0, 2.0, 3.0]])       # one input, a batch of two
    >>> expand_covariate_columns(reference, torch.empty(1, 4), [2], [3]).tolist()
    [[1.0, 2.0, 3.0, 0.0]]
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


def _setup_keys(data) -> dict[str, set]:
    """The ``obs`` columns, ``obsm`` and ``uns`` keys of ``data`` (a failed setup removes new ones)."""
    return {attr: set(getattr(data, attr).keys()) for attr in ("obs", "obsm", "uns")}


def _remove_new_keys(data, before: dict[str, set]) -> None:
    """Undo what a failed setup wrote: keys that were not there before are deleted."""
    for attr, keys in before.items():
        store = getattr(data, attr)
        for key in set(store.keys()) - keys:
            del store[key]


def _saved_or_given_adata(folder: Path, prefix: str | None, adata):
    if adata is not None:
        return adata
    saved = folder / f"{prefix or ''}adata.h5ad"
    if saved.is_file():
        return ad.read_h5ad(saved)
    mudata_file = folder / f"{prefix or ''}mdata.h5mu"  # scvi-tools' name for a saved MuData
    if mudata_file.is_file():
        import mudata as md

        try:
            return md.read_h5mu(mudata_file)
        except ValueError as error:  # mudata cannot always read back a MuData scvi-tools registered
            raise ValueError(f"{mudata_file} could not be read back by mudata ({error}); pass the MuData: "
                             "ScopeVI.load(folder, mdata).") from error
    raise ValueError(f"Pass adata: {folder} has no saved AnnData ({saved.name}) or MuData ({mudata_file.name}).")


def _check_saved_genes(saved, adata, setup_args: dict) -> None:
    """The given data must have the saved features, in order (every registered modality of a MuData)."""
    if not isinstance(saved, dict):
        check_var_names(adata.var_names, pd.Index(np.asarray(saved).astype(str)), "adata")
        return
    # a MuData model: scvi-tools saves the features of every modality
    modalities = {"rna_layer": "rna", **(setup_args.get("modalities") or {})}
    for arg, name in modalities.items():
        if not hasattr(adata, "mod") or name not in adata.mod:
            raise ValueError(f"the saved model was set up with modality {name!r}; pass a MuData that has it.")
        if name in saved:
            check_var_names(adata.mod[name].var_names, pd.Index(np.asarray(saved[name]).astype(str)),
                            f"mdata[{name!r}]", modality_features(MODALITY_ARGUMENTS.get(arg)))


def _init_kwargs(init_params: dict) -> dict:
    """Constructor arguments from saved ``init_params_`` (older files get today's defaults)."""
    kwargs_groups = init_params.get("kwargs", {})
    non_kwargs = dict(init_params.get("non_kwargs", {}))
    # files saved before ``unseen_genes`` existed encoded unseen genes with the kernel
    non_kwargs.setdefault("unseen_genes", "kernel")
    return {**non_kwargs, **{k: v for group in kwargs_groups.values() for k, v in group.items()}}


def _data_attributes(attr_dict: dict, cls: type) -> dict:
    """The saved attributes a model file may set: data named like scvi-tools' ``name_`` attributes.

    A file's contents never choose which code runs: a name that is not ``name_`` (a method such
    as ``predict``, a private hook), a name of a method or property of ``cls``, or a callable
    value is refused, whatever the allow-listed unpickler let through.

    Raises
    ------
    ValueError
        Naming the refused attribute.
    """
    for name, value in attr_dict.items():
        plain = isinstance(name, str) and name.isidentifier() and name.endswith("_") and not name.startswith("_")
        code = callable(value) or callable(getattr(cls, str(name), None)) or isinstance(getattr(cls, str(name), None), property)
        if not plain or code:
            raise ValueError(f"the saved model sets the attribute {name!r}, which is not a data attribute "
                             "(name_ holding data); the file is refused.")
    return attr_dict


def _check_payload(payload: Any, path: Path) -> None:
    """A saved model's layout: a dict with weights, ``attr_dict`` (with a ``registry_`` dict) and genes."""
    if not isinstance(payload, dict) or not {"model_state_dict", "attr_dict", "var_names"} <= set(payload):
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a saved model: expected a dict with 'model_state_dict', 'attr_dict' and "
                         f"'var_names', got {keys}.")
    attrs = payload["attr_dict"]
    if not isinstance(attrs, dict) or not isinstance(attrs.get("registry_"), dict) or "init_params_" not in attrs:
        raise ValueError(f"{path} is not a saved model: its attr_dict needs a 'registry_' dict and 'init_params_'.")

