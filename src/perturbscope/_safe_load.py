"""Load torch and pickle files without trusting them.

An scVI ``model.pt`` is a pickle: ``torch.load(weights_only=True)`` refuses it because its
registry holds a ``defaultdict``, numpy arrays and pandas frames, and scvi-tools' own ``load``
therefore calls ``torch.load(weights_only=False)``, which runs whatever callable the file names.
An ESM checkpoint holds an ``argparse.Namespace``, and fair-esm calls ``torch.load`` without
``weights_only`` (so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns it into a full unpickle).

:func:`load_model_file` unpickles every file through a restricted pickle module whose
``Unpickler.find_class`` resolves only an allow-list of globals (:data:`ALLOW_LISTS`): plain
containers, numpy arrays, pandas frames and indexes, tensor rebuilds, and for ESM files
``argparse.Namespace``. Anything else, such as ``builtins.print`` or ``os.system``, stops the load
with a :class:`ValueError` naming the global. Classes that pandas 2 removed
(``pandas.core.indexes.numeric.Int64Index`` and its siblings, pickled by scvi-tools < 1.0 under
pandas 1.x) are mapped to :class:`pandas.Index`, which rebuilds the same values and dtype.

Some constructors on the allow-list could allocate without bound from a few pickle bytes
(``bytes(n)``/``bytearray(n)``, numpy's ``_reconstruct(ndarray, shape, dtype)``, a
``RangeIndex`` that a pandas object broadcasts over); they are replaced by guarded versions that
refuse integer sizes, shapes over :data:`MAX_RECONSTRUCT_ELEMENTS` elements and ranges over
:data:`MAX_RANGE_INDEX_LENGTH` (real pickles use ``bytes()`` and the shape ``(0,)``).
``pandas.core.indexes.base._new_Index`` builds only ``Index`` (from a numpy array) and
``RangeIndex``. Every object the unpickler builds is charged to a memory budget that grows with
the file's size (:mod:`perturbscope._pickle_budget`), so a small file cannot make the loader
spend more than a few hundred MiB. torch's own weights-only loader is not used for that reason
(it has no such budget), except where ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` leaves no other.
"""

from __future__ import annotations

import _codecs
import argparse
import io
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pandas.core.internals.managers import BaseBlockManager

from ._pickle_allow import (
    _LEGACY_PANDAS_INDEXES,
    _WEIGHTS_ONLY_EXTRAS,
    ALLOW_LISTS,
    UNGUARDED_IN_WEIGHTS_ONLY,
    WEIGHTS_GLOBALS,
    zip_globals,
)
from ._pickle_budget import (
    MemoryBudget,
    StructureCheck,
    array_bytes,
    call_name,
    check_torch_zip,
    describe,
    manager_state_bytes,
    object_bytes,
    stream_size,
)
from ._pickle_checks import (  # the caps are re-exported: the module docstring names them
    MAX_RANGE_INDEX_LENGTH,  # noqa: F401
    MAX_RECONSTRUCT_ELEMENTS,  # noqa: F401
    HashSpread,
    NdarrayStandIn,
    brief,
    call_keys,
    check_array_state,
    check_build_keys,
    check_codec,
    check_dtype_state,
    check_loaded_tensors,
    check_pandas_object,
    check_persistent_id,
    guarded_bytearray,
    guarded_bytes,
    guarded_date,
    guarded_datetime,
    guarded_new_block,
    guarded_new_index,
    guarded_range_index,
    guarded_rebuild_parameter_with_state,
    guarded_reconstruct,
    guarded_scalar,
    guarded_unpickle_block,
    reconstruct_bytes,
)
from ._pickle_nesting import check_pickle_structure

# kept for code that imported it
_ALLOWED_GLOBALS = ALLOW_LISTS["scvi"]

_TRUE_VALUES = ("1", "y", "yes", "true")


#: Allow-listed globals that resolve to a guarded stand-in (numpy's old and new module paths and
#: Python 2's ``__builtin__`` are normalised first).
_GUARDED: dict[tuple[str, str], Any] = {
    ("builtins", "bytes"): guarded_bytes,
    ("builtins", "bytearray"): guarded_bytearray,
    ("numpy._core.multiarray", "_reconstruct"): guarded_reconstruct,
    ("numpy._core.multiarray", "scalar"): guarded_scalar,
    ("numpy", "ndarray"): NdarrayStandIn,
    ("pandas.core.indexes.range", "RangeIndex"): guarded_range_index,
    ("pandas.core.indexes.base", "_new_Index"): guarded_new_index,
    ("torch._utils", "_rebuild_parameter_with_state"): guarded_rebuild_parameter_with_state,
    ("datetime", "date"): guarded_date,
    ("datetime", "datetime"): guarded_datetime,
    ("pandas._libs.internals", "_unpickle_block"): guarded_unpickle_block,
    ("pandas.core.internals.blocks", "new_block"): guarded_new_block,
    **dict.fromkeys(_LEGACY_PANDAS_INDEXES, pd.Index),
}
#: Pandas types that ``NEWOBJ`` leaves empty until a ``BUILD`` restores their state.
_STATE_FILLED = (pd.DataFrame, pd.Series, pd.Categorical, BaseBlockManager)
_MODULE_ALIASES = {"__builtin__": "builtins", "numpy.core.multiarray": "numpy._core.multiarray"}


def _resolve(module: str, name: str) -> Any:
    """The object an allow-listed global stands for (guards and legacy mappings applied)."""
    module = _MODULE_ALIASES.get(module, module)
    if (module, name) in _GUARDED:
        return _GUARDED[(module, name)]
    return getattr(__import__(module, fromlist=[name]), name)


#: Containers whose call iterates its argument: only plain containers may be passed to them.
_ITERATING_CALLS = (list, tuple, set, frozenset, dict, OrderedDict)
_PLAIN_ITERABLES = (list, tuple, set, frozenset, dict, str, bytes, bytearray)
#: The objects whose state a pickle may restore with BUILD (what numpy, pandas, scvi-tools and
#: ESM pickles restore that way); setting attributes of anything else (an Index's ``_data``, a
#: tensor) could confuse the code that later reads it.
_BUILD_TARGETS = (np.ndarray, np.dtype, pd.DataFrame, pd.Series, BaseBlockManager, pd.Categorical,
                  pd.CategoricalDtype, argparse.Namespace, OrderedDict, defaultdict)
#: What a call allocates beyond copying its arguments, for the calls that allocate by size.
_KNOWN_COSTS: dict[Any, Any] = {
    guarded_reconstruct: lambda args: reconstruct_bytes(*args) if len(args) == 3 else 0,
    guarded_scalar: lambda args: args[0].itemsize if args and isinstance(args[0], np.dtype) else 0,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only the globals in ``allowed`` (the scVI list by default).

    It is Python's pure-Python unpickler, so that the steps known to crash the interpreter or to
    allocate far beyond the file's size are checked before they run: a numpy array's state
    (:func:`~perturbscope._pickle_checks.check_array_state`), a dtype's restored flags (:func:`~perturbscope._pickle_checks.check_dtype_state`),
    ``numpy.ndarray`` called directly, containers built by iterating an index or array,
    attributes set on a class or function (which would change it for the whole process), and a
    protocol-5 ``bytearray`` (its declared size is allocated before reading). Counted strings
    and bytes are read, not pre-allocated, and torch checks a tensor storage's declared size
    against the file's record before allocating it.
    """

    allowed: frozenset[tuple[str, str]] = ALLOW_LISTS["scvi"]
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        size = stream_size(file)
        self._budget = MemoryBudget(size)
        self._hashes = HashSpread()
        self._structures = StructureCheck(size, sealed_types=_BUILD_TARGETS)
        self._unrestored: dict[int, Any] = {}  # pandas objects made by NEWOBJ, awaiting their BUILD

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(
                f"the file asks to call or build `{module}.{name}`, which is not on "
                "perturbscope's allow-list of globals such a file needs"
            )
        return _resolve(module, name)

    def load_build(self) -> None:
        target = self.stack[-2]
        self._structures.measure(self.stack[-1])
        self._structures.check_unsealed(target, "BUILD")  # after: a state that holds its target seals it
        if isinstance(target, type | types.FunctionType | types.BuiltinFunctionType | types.ModuleType):
            raise pickle.UnpicklingError(
                f"the file sets attributes of {target!r}, a class or function, which would change it "
                "for the whole process")
        if not isinstance(target, _BUILD_TARGETS):
            raise pickle.UnpicklingError(
                f"the file restores the state of a {type(target).__name__}; numpy, pandas and torch "
                "pickles restore only arrays, dtypes, frames, series, block managers, categoricals "
                "and namespaces that way")
        if isinstance(target, np.ndarray):
            check_array_state(self.stack[-1])
            shape, dtype = self.stack[-1][-4:-2]
            self._budget.charge(array_bytes(shape, dtype), f"an array of shape {brief(shape)} and dtype {brief(dtype)}")
        if isinstance(target, BaseBlockManager):  # restoring it fills arrays as long as its axes
            self._budget.charge(manager_state_bytes(self.stack[-1]), "a pandas block manager over long axes")
        check_build_keys(self.stack[-1])
        pickle._Unpickler.load_build(self)
        self._unrestored.pop(id(target), None)
        check_pandas_object(target)
        if isinstance(target, np.dtype):
            self._structures.measure(target)  # its fields may share parts: descr would expand them
            check_dtype_state(target)

    dispatch[pickle.BUILD[0]] = load_build

    def _check_call(self, function: Any, args: Any, *, new_object: bool = False) -> None:
        self._structures.measure(args)  # before anything hashes, compares or prints them
        if (any(function is c for c in _ITERATING_CALLS) and isinstance(args, tuple) and args
                and not isinstance(args[0], _PLAIN_ITERABLES)):
            raise pickle.UnpicklingError(
                f"the file calls {function.__name__} on a {type(args[0]).__name__}; only plain "
                "containers are expanded (iterating an index or array could allocate without bound)")
        self._budget.check_call(function, args, _KNOWN_COSTS, new_object=new_object)
        if any(function is c for c in (str, _codecs.encode, guarded_bytes, guarded_bytearray)):
            check_codec(call_name(function), args)
        keys = call_keys(function, args)
        if keys is not None:
            HashSpread.check(keys)

    def _charge_result(self, function: Any) -> None:
        result = self.stack[-1]
        self._budget.charge(object_bytes(result), describe(result, f"the result of {call_name(function)}"))

    def load_reduce(self) -> None:
        args, function = self.stack[-1], self.stack[-2]
        self._check_call(function, args)
        pickle._Unpickler.load_reduce(self)
        check_pandas_object(self.stack[-1])
        if isinstance(self.stack[-1], torch.Tensor):  # where it is made: an expanded view is used by nothing
            check_loaded_tensors(self.stack[-1])
        self._charge_result(function)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args, cls = self.stack[-1], self.stack[-2]
        self._check_call(cls, args, new_object=True)
        pickle._Unpickler.load_newobj(self)
        self._charge_result(cls)
        self._await_state(self.stack[-1])

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        args, cls = self.stack[-2], self.stack[-3]
        if self.stack[-1]:
            raise pickle.UnpicklingError(
                f"the file builds {getattr(cls, '__name__', cls)!r} with keyword arguments, which "
                "no scvi-tools or ESM file needs")
        self._check_call(cls, args, new_object=True)
        pickle._Unpickler.load_newobj_ex(self)
        self._charge_result(cls)
        self._await_state(self.stack[-1])

    def _await_state(self, built: Any) -> None:
        """Note a frame, series, categorical or block manager that ``__new__`` left empty.

        Only its ``BUILD`` makes it whole: left without one, using it crashes pandas.
        """
        if isinstance(built, _STATE_FILLED):
            self._unrestored[id(built)] = built

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # Containers filled by opcodes: pickles fill plain lists, dicts and sets only (a pandas
    # frame's __setitem__ would broadcast a column over its index), and dict and set keys must
    # not collide in hash (HashSpread).
    def _target(self, target: Any, kind: type | tuple[type, ...], opcode: str) -> Any:
        if not isinstance(target, kind):
            raise pickle.UnpicklingError(
                f"the file applies {opcode} to a {type(target).__name__}; pickles apply it to plain "
                "containers only")
        self._structures.check_unsealed(target, opcode)
        return target

    def _marked_target(self) -> Any:
        """The object below the topmost mark (what APPENDS, SETITEMS and ADDITEMS fill)."""
        if not self.metastack or not self.metastack[-1]:
            raise pickle.UnpicklingError("malformed pickle data (a container opcode with nothing to fill)")
        return self.metastack[-1][-1]

    def load_append(self) -> None:
        self._target(self.stack[-2] if len(self.stack) > 1 else None, list, "APPEND")
        pickle._Unpickler.load_append(self)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        self._target(self._marked_target(), list, "APPENDS")
        pickle._Unpickler.load_appends(self)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        target = self._target(self.stack[-3] if len(self.stack) > 2 else None, dict, "SETITEM")
        self._structures.measure(self.stack[-2])
        self._hashes.add(target, [self.stack[-2]])
        pickle._Unpickler.load_setitem(self)

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        target = self._target(self._marked_target(), dict, "SETITEMS")
        self._structures.measure(self.stack)
        self._hashes.add(target, self.stack[0::2])
        pickle._Unpickler.load_setitems(self)

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        target = self._target(self._marked_target(), set, "ADDITEMS")
        self._structures.measure(self.stack)
        self._hashes.add(target, self.stack)
        pickle._Unpickler.load_additems(self)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self) -> None:
        self._structures.measure(self.stack)
        HashSpread.check(self.stack)
        pickle._Unpickler.load_frozenset(self)

    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_stop(self) -> None:
        if self._unrestored:
            kinds = sorted({type(obj).__name__ for obj in self._unrestored.values()})
            raise pickle.UnpicklingError(
                f"the file builds a pandas {', '.join(kinds)} without restoring its state; pandas "
                "pickles always restore it, and an empty one crashes when used")
        if self.stack:  # what the caller gets may be hashed or printed
            self._structures.measure(self.stack[-1])
        pickle._Unpickler.load_stop(self)

    dispatch[pickle.STOP[0]] = load_stop

    def load_binpersid(self) -> None:
        check_persistent_id(self.stack[-1])  # torch hashes and formats it; nothing else would measure it
        pickle._Unpickler.load_binpersid(self)

    dispatch[pickle.BINPERSID[0]] = load_binpersid

    def load_persid(self) -> None:
        raise pickle.UnpicklingError("the file names a persistent object by text (PERSID); torch.save never does")

    dispatch[pickle.PERSID[0]] = load_persid

    def load_bytearray8(self) -> None:
        raise pickle.UnpicklingError(
            "the file holds a protocol-5 bytearray (whose declared size is allocated before it "
            "is read), which no scvi-tools or ESM file needs")

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _loads_with(unpickler: type[pickle.Unpickler], file: Any, **kwargs: Any) -> Any:
    try:
        return unpickler(file, **kwargs).load()
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # a malformed stream: EOFError, ValueError, TypeError, ...
        raise pickle.UnpicklingError(
            f"malformed pickle data ({type(err).__name__}: {err})"
        ) from err


def _make_pickle_module(kind: str) -> types.ModuleType:
    """A pickle module for ``torch.load(..., pickle_module=...)`` with the ``kind`` allow-list.

    torch subclasses its ``Unpickler`` (adding tensor storages), so every other global goes
    through the allow-list.
    """
    unpickler = type(
        f"_RestrictedUnpickler_{kind}", (_RestrictedUnpickler,),
        {"allowed": WEIGHTS_GLOBALS if kind == "weights" else ALLOW_LISTS[kind]},
    )
    module = types.ModuleType(f"perturbscope_restricted_pickle_{kind}")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kw: _loads_with(unpickler, file, **kw)  # type: ignore[attr-defined]
    module.loads = lambda data, **kw: _loads_with(  # type: ignore[attr-defined]
        unpickler, io.BytesIO(data), **kw
    )
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


#: A pickle module (``Unpickler``, ``load``, ``loads``, ``UnpicklingError``) that resolves only
#: the scVI allow-list. ``load``/``loads`` raise :class:`pickle.UnpicklingError` for a refused
#: global and for any malformed stream (the original error is chained).
restricted_pickle = _make_pickle_module("scvi")
_PICKLE_MODULES = {"scvi": restricted_pickle, "esm": _make_pickle_module("esm"),
                   "weights": _make_pickle_module("weights")}


def _env_flag(name: str) -> bool:
    return os.getenv(name, "0").lower() in _TRUE_VALUES


def _weights_only_reason(err: BaseException) -> str:
    """The global torch's weights-only unpickler refused, without torch's advice text."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if found:
        return f"it holds `{found.group(1)}`"
    found = re.search(r"Unsupported operand [^\n]*", str(err))
    return found.group(0) if found else type(err).__name__


def load_model_file(path: str | Path, allow: Literal["scvi", "esm"] = "scvi") -> Any:
    """Load a torch file without running code from it.

    The archive is checked before torch reads it (:func:`check_torch_zip`: zip format, records,
    the globals its pickle names), then read by ``torch.load`` through a restricted pickle module
    that builds only the globals on the ``allow`` list (:data:`ALLOW_LISTS`) within a memory and
    structure budget, and the tensors it returns are checked. Where ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    is set, torch's weights-only loader reads it instead (without that budget).

    Parameters
    ----------
    path
        The file (an scVI ``model.pt``, a state dict, an ESM checkpoint).
    allow
        Which allow-list to use: ``"scvi"`` (containers, numpy, pandas, tensors) or ``"esm"``
        (containers, tensors and ``argparse.Namespace``).

    Returns
    -------
    The unpickled object, on the CPU.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file names a global outside the allow-list (e.g. a payload calling ``print`` or
        ``os.system``), is not a readable torch file, is in torch's pre-1.6 (non-zip) format,
        exceeds the budget, or needs the restricted unpickler while
        ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` forbids every load but torch's weights-only one.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "weights.pt"
    >>> torch.save({"w": torch.ones(2)}, path)
    >>> load_model_file(path)["w"]
    tensor([1., 1.])
    """
    if allow not in ALLOW_LISTS:
        raise ValueError(f"allow must be one of {sorted(ALLOW_LISTS)}, got {allow!r}")
    return _load_torch_file(path, allow)


def _load_torch_file(path: str | Path, kind: str) -> Any:
    """The checks before, the guarded unpickler of ``kind``, the tensor checks after.

    torch's weights-only loader runs only where ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` forbids every
    other: it has none of the restricted unpickler's guards (a 300 kB file of nested tuples
    crashed it, an 851-byte one allocated 2 GiB through ``bytearray``), so on that path the
    pre-load checks also bound its structures' depth and size from the pickle's opcodes.
    """
    weights_only = _env_flag("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    path = _checked_torch_zip(path, kind, weights_only)
    try:
        if weights_only:
            with torch.serialization.safe_globals(_WEIGHTS_ONLY_EXTRAS.get(kind, [])):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULES[kind])
    except pickle.UnpicklingError as err:
        if weights_only:
            raise ValueError(
                f"cannot load {str(path)!r}: torch's weights-only loader refuses it ({_weights_only_reason(err)}), "
                "and the environment sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, which also blocks perturbscope's "
                "restricted unpickler (an allow-list of plain data, numpy, pandas and tensor globals that never "
                "runs code from the file). Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD to load it through that unpickler."
            ) from None
        raise ValueError(f"refusing to load {str(path)!r}: {_shortened(err)}") from err
    except Exception as err:
        raise ValueError(
            f"{str(path)!r} is not a torch file that perturbscope can read ({type(err).__name__}: {_shortened(err)})"
        ) from err
    return _with_checked_tensors(path, loaded)


def _shortened(err: BaseException, limit: int = 1000) -> str:
    """``err``'s text, cut to ``limit`` characters: torch's can quote what the file holds at length."""
    text = str(err)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _checked_torch_zip(path: str | Path, kind: str, weights_only: bool) -> Path:
    """``path``, after :func:`check_torch_zip` (before torch reads it: torch allocates what a record declares)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file")
    allowed = zip_globals(kind) - UNGUARDED_IN_WEIGHTS_ONLY if weights_only else zip_globals(kind)
    try:
        reader = check_torch_zip(path, allowed)
        if weights_only:  # torch's weights-only loader measures nothing while it builds
            check_pickle_structure(reader.get_record("data.pkl"))
    except (pickle.UnpicklingError, zipfile.BadZipFile) as err:
        if weights_only:
            raise ValueError(
                f"cannot load {str(path)!r}: {err}. The environment sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, so torch's "
                "weights-only loader would read it (it calls `bytearray` and `_codecs.encode` unchecked and measures no "
                "structure it builds), which also blocks perturbscope's restricted unpickler. Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD "
                "to load it through that unpickler.") from err
        raise ValueError(f"refusing to load {str(path)!r}: {err}") from err
    return path


def load_weights_file(path: str | Path) -> Any:
    """Load a torch file of tensors and plain containers (no numpy, pandas or namespaces).

    As :func:`load_model_file`, with the narrowest allow-list: for files that hold nothing
    else, such as gene-embedding dictionaries.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the checks refuse it or it is not a torch file.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "table.pt"
    >>> torch.save({"KLF1": torch.ones(2)}, path)
    >>> load_weights_file(path)["KLF1"]
    tensor([1., 1.])
    """
    return _load_torch_file(path, "weights")


def _with_checked_tensors(path: Path, loaded: Any) -> Any:
    """``loaded``, after refusing expanded tensors (:func:`check_loaded_tensors`) with a ValueError."""
    try:
        check_loaded_tensors(loaded)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {str(path)!r}: {err}") from err
    return loaded


def load_pickle_file(path: str | Path, allow: Literal["scvi", "esm"] = "scvi") -> Any:
    """Unpickle a plain pickle file (e.g. an old scvi-tools ``attr.pkl``) through the allow-list.

    Parameters
    ----------
    path
        The pickle file.
    allow
        Which allow-list of :data:`ALLOW_LISTS` to use.

    Returns
    -------
    The unpickled object.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file names a global outside the allow-list or is not a valid pickle.

    Examples
    --------
    >>> import pickle, tempfile
    >>> path = Path(tempfile.mkdtemp()) / "attr.pkl"
    >>> _ = path.write_bytes(pickle.dumps({"n_latent": 10}))
    >>> load_pickle_file(path)
    {'n_latent': 10}
    """
    if allow not in ALLOW_LISTS:
        raise ValueError(f"allow must be one of {sorted(ALLOW_LISTS)}, got {allow!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file")
    try:
        return _PICKLE_MODULES[allow].loads(path.read_bytes())
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {str(path)!r}: {err}") from err
