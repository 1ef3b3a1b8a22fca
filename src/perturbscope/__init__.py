"""perturbscope: predict and probe single-cell genetic perturbations with scvi-tools."""

from importlib.metadata import PackageNotFoundError, version

from . import benchmark, data, effects, embeddings, pl, probe, tl
from .model import ScopeVI
from .module import ScopeVAE

try:
    __version__ = version("perturbscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["ScopeVAE", "ScopeVI", "benchmark", "data", "effects", "embeddings", "pl", "probe", "tl"]
