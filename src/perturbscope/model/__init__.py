"""scvi-tools models."""

from ._scopevi import ScopeVI

__all__ = ["ScopeVI"]
