"""Torch modules: the ScopeVAE, its multimodal extension and its perturbation encoder."""

from ._multimodal import MultimodalScopeVAE
from ._perturbation_encoder import PerturbationEncoder
from ._scopevae import ScopeVAE

__all__ = ["MultimodalScopeVAE", "PerturbationEncoder", "ScopeVAE"]
