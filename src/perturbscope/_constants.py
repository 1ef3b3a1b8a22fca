"""Registry and output keys, in one place.

Keys live in ``NamedTuple`` instances (scvi-tools' ``REGISTRY_KEYS`` style) so that a typo is an
``AttributeError`` rather than a silently new key.
"""

from __future__ import annotations

from typing import NamedTuple


class _ScopeRegistryKeys(NamedTuple):
    """ScopeVI's own registry keys; scvi-tools' (``X``, ``batch``, covariates) are in ``scvi.REGISTRY_KEYS``."""

    CONTEXT_KEY: str = "context"
    PERTURBATION_KEY: str = "perturbation_genes"
    ANCHOR_X_KEY: str = "anchor_X"


class _ScopeOutputKeys(NamedTuple):
    PERTURBATION: str = "perturbation"
    CONTROL_CELL: str = "control_cell"
    SAMPLE: str = "sample"
    N_CELLS: str = "n_cells"
    LOG1P_NORM_LAYER: str = "log1p_norm"
    PERTURBATION_OBSM: str = "_scopevi_perturbation_genes"
    PROVENANCE_UNS: str = "perturbscope"


REGISTRY_KEYS = _ScopeRegistryKeys()
OUTPUT_KEYS = _ScopeOutputKeys()

#: Normalisation target used for every ``log1p_norm`` layer written by perturbscope.
TARGET_SUM = 1e4
