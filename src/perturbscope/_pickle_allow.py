"""The allow-lists of :mod:`perturbscope._safe_load`: the globals a model file may name, by file kind.

Data only (no code): the restricted unpickler resolves nothing outside these, and
:func:`perturbscope._pickle_budget.check_torch_zip` admits nothing else (:func:`zip_globals`,
plus torch's storage types) in what torch's weights-only loader reads.
"""

from __future__ import annotations

import argparse
from typing import Any

_BUILTIN_NAMES = ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "object",
                  "set", "slice", "str", "tuple")
_CONTAINER_GLOBALS = frozenset(
    [(mod, name) for mod in ("builtins", "__builtin__") for name in _BUILTIN_NAMES]
    + [
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "timedelta"),
    ]
)
TORCH_GLOBALS = frozenset(
    [
        ("torch", "Size"),
        ("torch", "device"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
    ]
    + [
        ("torch", name)
        for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
                     "bool")
    ]
)
_NUMPY_GLOBALS = frozenset(
    [
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    ]
    + [
        ("numpy.dtypes", name)
        for name in ("BoolDType", "Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int32DType",
                     "Int64DType", "UInt8DType", "ObjectDType", "StrDType", "BytesDType")
    ]
)
_PANDAS_GLOBALS = frozenset(
    [
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.managers", "SingleBlockManager"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.series", "Series"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.arrays.categorical", "Categorical"),
        ("pandas.core.arrays.categorical", "_reconstructor"),
        ("pandas.core.dtypes.dtypes", "CategoricalDtype"),
    ]
)
#: Classes pandas 1.x pickled that pandas 2 removed: each rebuilds as a plain ``pandas.Index``
#: (``_new_Index(cls, {"data": ..., "name": ...})`` keeps the values' dtype).
_LEGACY_PANDAS_INDEXES = frozenset(
    ("pandas.core.indexes.numeric", name)
    for name in ("Int64Index", "UInt64Index", "Float64Index", "NumericIndex", "IntegerIndex")
)

#: The allow-lists :func:`load_model_file` can use, by file kind.
ALLOW_LISTS: dict[str, frozenset[tuple[str, str]]] = {
    "scvi": _CONTAINER_GLOBALS
    | TORCH_GLOBALS
    | _NUMPY_GLOBALS
    | _PANDAS_GLOBALS
    | _LEGACY_PANDAS_INDEXES,
    "esm": _CONTAINER_GLOBALS | TORCH_GLOBALS | {("argparse", "Namespace")},
}
# What ``torch.load(weights_only=True)`` may additionally build, by file kind.
_WEIGHTS_ONLY_EXTRAS: dict[str, list[Any]] = {"scvi": [], "esm": [argparse.Namespace]}

#: What :func:`~perturbscope._safe_load.load_weights_file` reads: containers and dense tensors.
WEIGHTS_GLOBALS = _CONTAINER_GLOBALS | TORCH_GLOBALS
#: Allow-listed callables that torch's weights-only loader calls without the restricted
#: unpickler's guards (sizes, codecs); left out of what a file may name when that loader runs.
UNGUARDED_IN_WEIGHTS_ONLY = frozenset({"builtins.bytearray", "__builtin__.bytearray", "_codecs.encode"})
#: torch's storage types, named in each tensor's persistent id by ``torch.save``; torch's loaders
#: map them to an inert ``StorageType`` (quantised storages are left out: their tensors are not).
STORAGE_NAMES = frozenset(
    f"torch.{dtype}Storage"
    for dtype in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                  "ComplexFloat", "ComplexDouble", "Untyped", "Typed")
)


def zip_globals(kind: str) -> frozenset[str]:
    """The ``"module.name"`` globals a torch zip file of ``kind`` may name, joined as torch joins them.

    ``kind`` is an :data:`ALLOW_LISTS` key, or ``"weights"`` (:data:`WEIGHTS_GLOBALS`).

    Examples
    --------
    >>> "torch._utils._rebuild_tensor_v2" in zip_globals("weights"), "torch.DoubleTensor" in zip_globals("scvi")
    (True, False)
    """
    pairs = WEIGHTS_GLOBALS if kind == "weights" else ALLOW_LISTS[kind]
    return frozenset(f"{module}.{name}" for module, name in pairs) | STORAGE_NAMES

