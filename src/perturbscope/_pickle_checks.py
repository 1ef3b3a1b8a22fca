"""Checks the restricted unpickler runs before steps that could crash the interpreter.

numpy and pandas trust the states a pickle restores: an object array's shape, a dtype's flags,
the attributes set on an object. These checks refuse the states that no real scvi-tools, pandas
or numpy pickle holds and that would make numpy read bytes of the file as object pointers (a
crash, or a read of any address), or allocate without bound.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

#: The largest array numpy's ``_reconstruct`` may be asked to allocate from a pickle. Real
#: pickles pass the shape ``(0,)`` and fill the array from its pickled bytes afterwards.
MAX_RECONSTRUCT_ELEMENTS = 1 << 20


def check_array_state(state: Any) -> None:
    """Refuse an ndarray ``__setstate__`` argument whose data does not fill its shape.

    numpy trusts the shape of an object array's state: a list shorter than the shape crashes
    the interpreter (a segmentation fault, not an exception) when the array is filled.
    """
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError(f"the file restores an array from {type(state).__name__}, not numpy's state tuple")
    shape, dtype, _, data = state[-4:]
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not isinstance(dtype, np.dtype) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"the file restores an array of invalid shape {shape!r} or dtype {dtype!r}")
    size = int(np.prod([int(d) for d in dims], dtype=object))
    if dtype.itemsize == 0 and size > MAX_RECONSTRUCT_ELEMENTS:  # no bytes in the file bound it
        raise pickle.UnpicklingError(
            f"the file restores an array of shape {shape!r} of zero-byte elements, over perturbscope's "
            f"cap of {MAX_RECONSTRUCT_ELEMENTS} elements")
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != size:
            found = len(data) if isinstance(data, list) else type(data).__name__
            raise pickle.UnpicklingError(
                f"the file restores an object array of shape {shape!r} from {found} values")
    elif not isinstance(data, bytes | bytearray | str) or len(data) != size * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"the file restores an array of shape {shape!r} and dtype {dtype} from data of the wrong size")


def _expected_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype numpy builds from ``dtype``'s description, with flags numpy derives itself."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((_expected_dtype(base), shape))
    if dtype.names is not None:
        return np.dtype(dtype.descr, align=dtype.isalignedstruct)
    return np.dtype(dtype.str)


def check_dtype_state(dtype: np.dtype) -> None:
    """Refuse a dtype whose restored flags or item size differ from numpy's own for it.

    A dtype's pickled state carries its flags: an object dtype stripped of them makes numpy read
    raw bytes from the file as object pointers (a crash, or worse).
    """
    try:
        expected = _expected_dtype(dtype)
    except (TypeError, ValueError) as err:
        raise pickle.UnpicklingError(f"the file restores an invalid dtype ({err})") from err
    if (dtype.flags, dtype.itemsize) != (expected.flags, expected.itemsize):
        raise pickle.UnpicklingError(
            f"the file restores dtype {dtype} with flags {dtype.flags} and item size {dtype.itemsize}, "
            f"where numpy's own are {expected.flags} and {expected.itemsize}")


def check_build_keys(state: Any) -> None:
    """Refuse a ``BUILD`` state that sets dunder (or non-string) attributes.

    ``__array__``/``__array_interface__`` set on an allowed object make numpy read bytes of the
    file as object pointers when pandas or numpy later convert it (a crash, or a read of any
    address); no real scvi-tools, pandas or numpy pickle sets such names. The state is checked
    as ``__dict__`` (a dict) and as ``(state, slotstate)``.
    """
    if isinstance(state, dict):
        parts = [state]
    elif isinstance(state, tuple) and len(state) == 2 and all(p is None or isinstance(p, dict) for p in state):
        parts = [p for p in state if p]
    else:
        return
    bad = [key for part in parts for key in part if not isinstance(key, str) or key.startswith("__")]
    if bad:
        raise pickle.UnpicklingError(
            f"the file sets the attributes {[repr(k) for k in bad[:5]]} on an object; dunder attributes "
            "change how numpy and pandas read it, and no model file needs them")
