"""Setup of a multimodal MuData: which modality holds RNA, surface protein and ATAC, all checked.

The ``modalities`` argument follows scvi-tools' TOTALVI/MULTIVI ``setup_mudata``: it maps the
name of a layer argument (``"rna_layer"``, ``"protein_layer"``, ``"atac_layer"``) to the
modality that holds that data, and the layer argument itself names the layer within it
(``None``: the modality's ``X``). RNA is required; protein and ATAC are optional. Every key,
modality and layer is checked here, before anything is registered.
"""

from __future__ import annotations

import numpy as np
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.data.fields import MuDataLayerField

from ..data import check_count_data, is_out_of_core, out_of_core_source
from ..module._multimodal import ATAC_KEY, PROTEIN_KEY

#: ``modalities`` keys ScopeVI accepts, and the registry key each registers.
MODALITY_ARGUMENTS = {"rna_layer": SCVI_KEYS.X_KEY, "protein_layer": PROTEIN_KEY, "atac_layer": ATAC_KEY}
#: What a ``modalities`` entry holds, in words, for messages and docs.
MODALITY_CONTENT = {"rna_layer": "RNA counts", "protein_layer": "surface protein (antibody tag) counts",
                    "atac_layer": "ATAC peak counts"}


def check_modality_rows(mdata, names: list[str]) -> None:
    """Every modality in ``names`` has a row for every cell of ``mdata``, in the MuData's order.

    Raises
    ------
    ValueError
        Naming the first modality whose rows are missing or in another order.
    """
    for name in names:
        data = mdata.mod[name]
        if data.n_obs != mdata.n_obs or not data.obs_names.equals(mdata.obs_names):
            raise ValueError(
                f"modality {name!r} has {data.n_obs} cells not in the order of the MuData's {mdata.n_obs}; "
                "every registered modality needs a row for every cell, in the same order (a cell "
                "without protein or ATAC data gets an all-zero row, as in MultiVI)."
            )


def check_modalities(mdata, modalities: dict | None, layers: dict[str, str | None]) -> dict[str, str]:
    """``{modalities key: modality name}`` after checking every key, modality and layer.

    Parameters
    ----------
    mdata
        The MuData being set up.
    modalities
        The user's mapping; ``None`` means ``{"rna_layer": "rna"}``.
    layers
        ``{"rna_layer": ..., "protein_layer": ..., "atac_layer": ...}``: the layer arguments.

    Returns
    -------
    The mapping with ``"rna_layer"`` filled in.

    Raises
    ------
    TypeError
        If ``modalities`` is not a dict or a modality name is not a string.
    ValueError
        For an unknown key, two keys naming one modality, a layer argument without its modality,
        a modality whose cells differ from the MuData's, or non-count or empty protein/ATAC data.
    KeyError
        For a modality not in the MuData, or a layer not in its modality.

    Examples
    --------
    >>> import anndata as ad, mudata as md, numpy as np
    >>> mdata = md.MuData({"rna": ad.AnnData(np.ones((3, 2))), "adt": ad.AnnData(np.ones((3, 4)))})
    >>> check_modalities(mdata, {"rna_layer": "rna", "protein_layer": "adt"}, {})
    {'rna_layer': 'rna', 'protein_layer': 'adt'}
    """
    if modalities is None:
        modalities = {"rna_layer": "rna"}
    if not isinstance(modalities, dict):
        raise TypeError(
            f"modalities must be a dict such as {{'rna_layer': 'rna', 'protein_layer': 'adt'}}, "
            f"got {type(modalities).__name__}."
        )
    accepted = list(MODALITY_ARGUMENTS)
    unknown = [key for key in modalities if key not in MODALITY_ARGUMENTS]
    if unknown:
        raise ValueError(
            f"modalities has unknown key(s) {unknown}; accepted keys are {accepted} (scvi-tools' "
            "TOTALVI/MULTIVI convention), e.g. {'rna_layer': 'rna', 'protein_layer': 'adt', 'atac_layer': 'atac'}."
        )
    modalities = {"rna_layer": "rna", **modalities}
    for key, name in modalities.items():
        if not isinstance(name, str):
            raise TypeError(f"modalities[{key!r}] must be a modality name (str), got {name!r}.")
        if name not in mdata.mod:
            raise KeyError(
                f"modalities[{key!r}]: modality {name!r} not in the MuData; modalities are "
                f"{list(mdata.mod)}. It should hold {MODALITY_CONTENT[key]}."
            )
    names = list(modalities.values())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"modalities names the modality {repeated} for more than one key: {modalities}.")
    for key, layer in layers.items():
        if layer is None:
            continue
        if key not in modalities:
            raise ValueError(
                f"{key}={layer!r} was given, but modalities has no {key!r} entry naming the modality "
                f"that holds {MODALITY_CONTENT[key]}; add modalities[{key!r}]."
            )
        data = mdata.mod[modalities[key]]
        if layer not in data.layers:
            raise KeyError(
                f"{key}={layer!r} is not a layer of modality {modalities[key]!r}; its layers are {list(data.layers)}."
            )
    check_modality_rows(mdata, list(modalities.values()))
    for key, name in modalities.items():
        data = mdata.mod[name]
        if key == "rna_layer":
            continue
        layer = layers.get(key)
        matrix = data.X if layer is None else data.layers[layer]
        if is_out_of_core(matrix):
            raise ValueError(
                f"modality {name!r} ({key}) is read from disk ({out_of_core_source(data, matrix)}); only the RNA "
                f"modality is streamed. Load it into memory and set up again: mdata.mod[{name!r}] = "
                f"mdata[{name!r}].to_memory().")
        try:
            check_count_data(matrix, layer)
        except ValueError as error:
            raise ValueError(f"modality {name!r} ({key}): {error}") from None
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        if not (totals > 0).any():
            raise ValueError(f"modality {name!r} ({key}) has no counts in any cell.")
    return modalities


def modality_fields(modalities: dict[str, str], layers: dict[str, str | None]) -> list:
    """The protein and ATAC layer fields (RNA's is built with the other fields by the model)."""
    return [
        MuDataLayerField(MODALITY_ARGUMENTS[key], layers.get(key), mod_key=name, is_count_data=False,
                         mod_required=True)
        for key, name in modalities.items() if key != "rna_layer"
    ]
