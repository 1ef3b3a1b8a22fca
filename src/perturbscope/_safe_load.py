"""Load an scvi-tools ``model.pt`` without trusting it.

An scVI ``model.pt`` is a pickle: ``torch.load(weights_only=True)`` refuses it because its
registry holds a ``defaultdict``, numpy arrays and pandas frames, and scvi-tools' own
``load`` therefore calls ``torch.load(weights_only=False)``, which runs whatever callable the
file names. :func:`load_model_file` first tries ``weights_only=True`` and otherwise unpickles
through :data:`restricted_pickle`, a pickle module whose ``Unpickler.find_class`` resolves only
an allow-list of container, numpy, pandas and tensor-rebuild globals. Anything else, such as
``builtins.print`` or ``os.system``, stops the load with a :class:`ValueError`.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

# Every global an scvi-tools 1.x ``model.pt`` needs (found by logging find_class on saved
# SCVI models, plus the names older numpy / pandas versions pickle under).
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [
        (mod, name)
        for mod in ("builtins", "__builtin__")
        for name in (
            "bool",
            "bytearray",
            "bytes",
            "complex",
            "dict",
            "float",
            "frozenset",
            "int",
            "list",
            "object",
            "set",
            "slice",
            "str",
            "tuple",
        )
    ]
    + [
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "timedelta"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.managers", "SingleBlockManager"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.series", "Series"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.indexes.numeric", "Int64Index"),
        ("pandas.core.indexes.numeric", "Float64Index"),
        ("pandas.core.arrays.categorical", "Categorical"),
        ("pandas.core.arrays.categorical", "_reconstructor"),
        ("pandas.core.dtypes.dtypes", "CategoricalDtype"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
    ]
    + [
        ("numpy.dtypes", name)
        for name in (
            "BoolDType",
            "Float32DType",
            "Float64DType",
            "Int32DType",
            "Int64DType",
            "ObjectDType",
            "StrDType",
            "BytesDType",
            "UInt8DType",
            "Int8DType",
            "Float16DType",
        )
    ]
    + [
        ("torch", name)
        for name in (
            "float16",
            "float32",
            "float64",
            "bfloat16",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "bool",
        )
    ]
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"the file asks to call or build `{module}.{name}`, which is not on "
                "perturbscope's allow-list of globals an scvi-tools model needs"
            )
        return super().find_class(module, name)


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


#: A pickle module for ``torch.load(..., pickle_module=restricted_pickle)``: torch subclasses its
#: ``Unpickler`` (adding tensor storages), so every other global goes through the allow-list.
restricted_pickle = types.ModuleType("perturbscope_restricted_pickle")
restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.loads = _restricted_loads  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def load_model_file(path: str | Path) -> Any:
    """Load a torch pickle without running arbitrary code.

    Tries ``torch.load(weights_only=True)`` first; when the file holds objects that mode refuses
    (an scVI registry does), loads it through :data:`restricted_pickle`.

    Parameters
    ----------
    path
        The ``model.pt`` file.

    Returns
    -------
    The unpickled object, on the CPU.

    Raises
    ------
    ValueError
        If the file names a global outside the allow-list (e.g. a payload calling ``print`` or
        ``os.system``), or is not a torch file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # expected for scVI files; fall through to the restricted unpickler
    except RuntimeError as err:
        raise ValueError(f"{path} is not a torch file that perturbscope can read: {err}") from err
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle
        )
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: {err}. It is not a plain scVI model.") from err
