"""Torch modules: the ScopeVAE and its perturbation encoder."""

from ._perturbation_encoder import PerturbationEncoder
from ._scopevae import ScopeVAE

__all__ = ["PerturbationEncoder", "ScopeVAE"]
