"""perturbscope: predict and probe single-cell genetic perturbations with scvi-tools.

The subpackages and the model classes are imported on first use (PEP 562), so that
``import perturbscope`` and ``perturbscope --help`` do not import torch, scvi-tools or scanpy:
``import perturbscope as ps; ps.ScopeVI`` imports :mod:`perturbscope.model` at that moment.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from . import benchmark, data, effects, embeddings, pl, probe, tl
    from .model import ScopeVI
    from .module import ScopeVAE

try:
    __version__ = version("perturbscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_SUBPACKAGES = ("benchmark", "data", "effects", "embeddings", "pl", "probe", "tl")
_CLASSES = {"ScopeVI": "model", "ScopeVAE": "module"}

__all__ = ["ScopeVAE", "ScopeVI", "benchmark", "data", "effects", "embeddings", "pl", "probe", "tl"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return import_module(f".{name}", __name__)
    if name in _CLASSES:
        return getattr(import_module(f".{_CLASSES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
