"""scvi-tools models."""

from ._programs import PerturbationPrograms
from ._scopevi import ScopeVI
from ._training_plan import ScopeTrainingPlan

__all__ = ["PerturbationPrograms", "ScopeTrainingPlan", "ScopeVI"]
