"""Reading a saved scvi-tools model folder safely: the files, the registry, the sizes.

Every value read here is data checked against what ``SCVI`` accepts; nothing in a file chooses
which code runs. :func:`perturbscope.probe.load_scvi_model` rebuilds the model from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._safe_load import load_model_file, load_pickle_file
from ..data._checks import preview as _preview

#: Model classes (the registry's ``model_name``) the loaders rebuild.
SUPPORTED_MODELS = ("SCVI",)
_SUPPORTED_MODELS = SUPPORTED_MODELS
#: Largest sizes a saved model may ask for; anything larger is refused before allocation.
#: ``n_parameters`` bounds the estimated weight count, ``n_hidden * (2 * n_genes + n_batch)
#: + n_layers * n_hidden ** 2`` (5e8 float32 weights are 2 GB).
SIZE_CAPS: dict[str, int] = {
    "n_genes": 200_000,
    "n_latent": 1_024,
    "n_hidden": 16_384,
    "n_layers": 64,
    "n_categories": 1_000_000,
    "n_parameters": 500_000_000,
}
# Attributes copied from a saved ``attr_dict`` onto the model (with their expected types).
COPIED_ATTRS: dict[str, type | tuple[type, ...]] = {
    "history_": dict,
    "train_indices_": np.ndarray,
    "validation_indices_": np.ndarray,
    "test_indices_": np.ndarray,
}
# Init parameters of scvi-tools < 1.0 that current versions no longer take; dropped.
_OBSOLETE_INIT_PARAMS = ("use_gpu", "use_cuda")
# VAE parameters SCVI computes itself or that must be callables: never taken from a file.
_DERIVED_VAE_PARAMS = (
    "self",
    "n_input",
    "n_batch",
    "n_labels",
    "n_continuous_cov",
    "n_cats_per_cov",
    "library_log_means",
    "library_log_vars",
    "var_activation",
)


# --- reading and checking the saved files -------------------------------------------------


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain data (no callables or classes), nested at most 8 deep."""
    if depth > 8:
        return False
    if value is None or isinstance(value, bool | int | float | str | np.number | np.bool_):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _expect_dict(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: {what} must be a dict, found {type(value).__name__}")
    return dict(value)


def read_saved_files(dir_path: Path, prefix: str) -> tuple[dict, np.ndarray, dict, str]:
    """``(state_dict, var_names, attr_dict, source file)`` from either saved layout."""
    if not dir_path.is_dir():
        raise ValueError(f"model_dir {str(dir_path)!r} is not a folder")
    model_file = dir_path / f"{prefix}model.pt"
    legacy = [dir_path / f"{prefix}{n}" for n in ("model_params.pt", "var_names.csv", "attr.pkl")]
    if model_file.is_file():
        payload = load_model_file(model_file)
        needed = ("model_state_dict", "var_names", "attr_dict")
        if not isinstance(payload, dict) or any(k not in payload for k in needed):
            keys = list(payload) if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(
                f"{str(model_file)!r} is not an scVI model file: expected the keys "
                f"{list(needed)}, found {keys}"
            )
        where = str(model_file)
        state, var_names, attr_dict = (payload[k] for k in needed)
    elif all(p.is_file() for p in legacy):
        where = str(legacy[2])
        state = load_model_file(legacy[0])
        text = legacy[1].read_text()
        var_names = np.array(
            [v.strip() for line in text.splitlines() for v in line.split(",") if v.strip()],
            dtype=object,
        )
        attr_dict = load_pickle_file(legacy[2])
    else:
        raise ValueError(
            f"{str(dir_path)!r} is not an scVI model folder: it has no {prefix}model.pt (nor the "
            f"older {prefix}model_params.pt, {prefix}var_names.csv and {prefix}attr.pkl) "
            f"(found {_preview(sorted(p.name for p in dir_path.iterdir()))})"
        )
    state = _expect_dict(state, "the model_state_dict", where)
    attr_dict = _expect_dict(attr_dict, "the attr_dict", where)
    if not isinstance(var_names, np.ndarray | list | tuple | pd.Index):
        raise ValueError(f"{where}: var_names must be an array, found {type(var_names).__name__}")
    var_names = np.asarray(var_names).astype(str)
    if var_names.ndim != 1 or not 0 < len(var_names) <= SIZE_CAPS["n_genes"]:
        raise ValueError(
            f"{where}: the model has {var_names.size} genes (shape {var_names.shape}); "
            f"perturbscope reads models with 1 to {SIZE_CAPS['n_genes']} genes"
        )
    return state, var_names, attr_dict, where


def registry_of(attr_dict: dict[str, Any], model_names: Sequence[str], where: str) -> dict:
    """The registry, converted from an old ``_scvi`` setup dict if needed, checked."""
    import scvi
    from scvi.data._compat import registry_from_setup_dict

    if "registry_" in attr_dict:
        registry = _expect_dict(attr_dict["registry_"], "attr_dict['registry_']", where)
    elif "scvi_setup_dict_" in attr_dict:
        setup_dict = _expect_dict(attr_dict["scvi_setup_dict_"], "scvi_setup_dict_", where)
        try:
            registry = registry_from_setup_dict(scvi.model.SCVI, setup_dict)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(
                f"{where}: its old scvi-tools setup dictionary (scvi_setup_dict_) is malformed "
                f"({type(err).__name__}: {err})"
            ) from err
        registry.setdefault("model_name", "SCVI")
    else:
        raise ValueError(
            f"{where}: the attr_dict has neither 'registry_' nor 'scvi_setup_dict_'; its keys "
            f"are {sorted(map(str, attr_dict))}"
        )
    name = registry.get("model_name")
    if name not in model_names:
        raise ValueError(
            f"{where!r} holds a {name!r} model; this loader reads {list(model_names)} models"
        )
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata":
        raise ValueError(
            f"{where}: the registry's setup_method_name is {method!r}; only 'setup_anndata' "
            "models are read"
        )
    setup_args = _expect_dict(registry.get("setup_args"), "the registry's setup_args", where)
    allowed = set(inspect.signature(scvi.model.SCVI.setup_anndata).parameters) - {
        "adata",
        "kwargs",
    }
    for key, value in setup_args.items():
        if key not in allowed:
            raise ValueError(
                f"{where}: setup argument {key!r} is not a parameter of SCVI.setup_anndata "
                f"({sorted(allowed)})"
            )
        if not _is_plain(value) or isinstance(value, Mapping):
            raise ValueError(f"{where}: setup argument {key!r} holds {value!r}, not plain data")
    fields = _expect_dict(
        registry.get("field_registries"), "the registry's field_registries", where
    )
    for field in fields.values():
        state = _expect_dict(field, "a field registry", where).get("state_registry", {})
        mapping = state.get("categorical_mapping") if isinstance(state, Mapping) else None
        if mapping is not None and len(mapping) > SIZE_CAPS["n_categories"]:
            raise ValueError(
                f"{where}: a categorical field has {len(mapping)} categories, over the cap of "
                f"{SIZE_CAPS['n_categories']}"
            )
    registry["setup_args"] = setup_args
    registry["field_registries"] = fields
    return registry


def init_params_of(attr_dict: dict[str, Any], where: str) -> dict[str, Any]:
    """SCVI keyword arguments from ``init_params_``, checked against SCVI's and VAE's signatures."""
    import scvi

    params = _expect_dict(attr_dict.get("init_params_", {}), "attr_dict['init_params_']", where)
    if "non_kwargs" in params or "kwargs" in params:
        flat = _expect_dict(params.get("non_kwargs", {}), "init_params_['non_kwargs']", where)
        groups = _expect_dict(params.get("kwargs", {}), "init_params_['kwargs']", where)
    else:  # scvi-tools < 0.9 kept one flat dict with the **kwargs groups as dict values
        flat = {k: v for k, v in params.items() if not isinstance(v, Mapping)}
        groups = {k: v for k, v in params.items() if isinstance(v, Mapping)}
    for group, values in groups.items():
        flat.update(_expect_dict(values, f"init_params_ kwargs group {group!r}", where))
    for key in _OBSOLETE_INIT_PARAMS:
        flat.pop(key, None)
    named = set(inspect.signature(scvi.model.SCVI.__init__).parameters) - {
        "self",
        "adata",
        "registry",
        "kwargs",
    }
    module_params = set(inspect.signature(scvi.model.SCVI._module_cls.__init__).parameters)
    allowed = named | (module_params - set(_DERIVED_VAE_PARAMS))
    for key, value in flat.items():
        if key not in allowed:
            raise ValueError(
                f"{where}: init parameter {key!r} is not a parameter of scvi.model.SCVI or its "
                f"module that a file may set ({sorted(allowed)})"
            )
        if not _is_plain(value):
            raise ValueError(f"{where}: init parameter {key!r} holds {value!r}, not plain data")
        cap = SIZE_CAPS.get(key)
        if cap is not None and (not isinstance(value, int) or not 0 < value <= cap):
            raise ValueError(
                f"{where}: init parameter {key}={value!r} is outside 1..{cap}, perturbscope's cap"
            )
    return flat


def check_model_size(init: dict[str, Any], n_genes: int, n_batch: int, where: str) -> None:
    n_hidden, n_layers = int(init.get("n_hidden", 128)), int(init.get("n_layers", 1))
    n_params = n_hidden * (2 * n_genes + n_batch) + n_layers * n_hidden**2
    if n_params > SIZE_CAPS["n_parameters"]:
        raise ValueError(
            f"{where}: the model would have about {n_params:.3g} weights (n_hidden={n_hidden}, "
            f"n_layers={n_layers}, {n_genes} genes, {n_batch} batches), over the cap of "
            f"{SIZE_CAPS['n_parameters']:.3g}"
        )


# --- the query AnnData ----------------------------------------------------------------------
