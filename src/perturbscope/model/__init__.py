"""scvi-tools models."""

from ._programs import PerturbationPrograms
from ._scopevi import ScopeVI

__all__ = ["PerturbationPrograms", "ScopeVI"]
