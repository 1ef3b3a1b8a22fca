"""Guards and checks the restricted unpickler runs before steps that could crash or exhaust it.

Guarded constructors stand in for allow-listed globals that allocate by size
(``bytes(n)``, numpy's ``_reconstruct``, ``RangeIndex``, pandas' ``_new_Index``).

numpy and pandas trust the states a pickle restores: an object array's shape, a dtype's flags,
the attributes set on an object. These checks refuse the states that no real scvi-tools, pandas
or numpy pickle holds and that would make numpy read bytes of the file as object pointers (a
crash, or a read of any address), or allocate without bound.
"""

from __future__ import annotations

import pickle
import reprlib
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np
import pandas as pd

from ._pickle_budget import array_bytes

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
        raise pickle.UnpicklingError(f"the file restores an array of invalid shape {brief(shape)} or dtype {brief(dtype)}")
    size = int(np.prod([int(d) for d in dims], dtype=object))
    if dtype.itemsize == 0 and size > MAX_RECONSTRUCT_ELEMENTS:  # no bytes in the file bound it
        raise pickle.UnpicklingError(
            f"the file restores an array of shape {brief(shape)} of zero-byte elements, over perturbscope's "
            f"cap of {MAX_RECONSTRUCT_ELEMENTS} elements")
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != size:
            found = len(data) if isinstance(data, list) else type(data).__name__
            raise pickle.UnpicklingError(
                f"the file restores an object array of shape {brief(shape)} from {found} values")
    elif not isinstance(data, bytes | bytearray | str) or len(data) != size * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"the file restores an array of shape {brief(shape)} and dtype {brief(dtype)} from data of the wrong size")


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
            f"the file restores dtype {brief(dtype)} with flags {dtype.flags} and item size {dtype.itemsize}, "
            f"where numpy's own are {expected.flags} and {expected.itemsize}")
    _check_field_keys(dtype)
    for field in (dtype.fields or {}).values():
        check_dtype_state(field[0])
    if dtype.subdtype is not None:
        check_dtype_state(dtype.subdtype[0])


def _check_field_keys(dtype: np.dtype) -> None:
    """Every key of a structured dtype's fields is one of its names or the title of one.

    The pickled state may hold further keys (hidden fields, or a title that aliases another
    type), which numpy serves by name without bounds or type checks. A title must lead to its
    name's own field, and every field must lie inside the item.
    """
    fields, names = dict(dtype.fields or {}), list(dtype.names or ())
    titles = {fields[name][2]: name for name in names if len(fields[name]) > 2 and fields[name][2] is not None}
    stray = sorted(str(key) for key in fields if key not in names
                   and not (key in titles and fields[key] == fields[titles[key]]))
    outside = sorted(str(name) for name in names if fields[name][1] + fields[name][0].itemsize > dtype.itemsize
                     or fields[name][1] < 0)
    if stray or outside:
        raise pickle.UnpicklingError(
            f"the file restores a structured dtype with fields {brief(stray or outside)} "
            + ("outside its names" if stray else "outside its item"))


def attribute_dicts(state: Any) -> list[dict] | None:
    """The attribute dicts of a ``BUILD``-style state: ``__dict__`` (a dict) or ``(state, slotstate)``.

    ``None`` for a state of another shape (an array's or a dtype's tuple, for instance).

    Examples
    --------
    >>> attribute_dicts(({"a": 1}, None)), attribute_dicts((1, 2, 3))
    ([{'a': 1}], None)
    """
    if isinstance(state, dict):
        return [state]
    if isinstance(state, tuple) and len(state) == 2 and all(p is None or isinstance(p, dict) for p in state):
        return [p for p in state if p]
    return None


def check_build_keys(state: Any) -> None:
    """Refuse a ``BUILD`` state that sets dunder (or non-string) attributes.

    ``__array__``/``__array_interface__`` set on an allowed object make numpy read bytes of the
    file as object pointers when pandas or numpy later convert it (a crash, or a read of any
    address); no real scvi-tools, pandas or numpy pickle sets such names. The state is checked
    as ``__dict__`` (a dict) and as ``(state, slotstate)``.
    """
    parts = attribute_dicts(state)
    bad = [key for part in parts or () for key in part if not isinstance(key, str) or key.startswith("__")]
    if bad:
        raise pickle.UnpicklingError(
            f"the file sets the attributes {brief(bad[:5])} on an object; dunder attributes "
            "change how numpy and pandas read it, and no model file needs them")


#: Distinct keys of one dict or set that may share a hash. Python's hashes of ints, floats,
#: complex numbers and tuples are not randomised, so a file could fill a dict with colliding
#: keys and make each insertion scan all the others (quadratic time from a small file).
MAX_EQUAL_HASHES = 16


class HashSpread:
    """Refuse dict and set keys that collide in hash, container by container.

    Strings and bytes are skipped: their hashes are randomised per process.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[Any, dict[int, list]]] = {}

    def add(self, container: Any, keys: Any) -> None:
        """Check ``keys`` inserted into ``container`` against its earlier keys.

        Raises
        ------
        pickle.UnpicklingError
            When more than :data:`MAX_EQUAL_HASHES` distinct keys share a hash.
        """
        entry = self._buckets.get(id(container))
        if entry is None or entry[0] is not container:
            entry = self._buckets[id(container)] = (container, {})
        self._check(entry[1], keys)

    @staticmethod
    def check(keys: Any) -> None:
        """Check the keys of a container built in one go (``set(items)``, ``frozenset``...)."""
        HashSpread._check({}, keys)

    @staticmethod
    def _check(buckets: dict[int, list], keys: Any) -> None:
        for key in keys:
            if isinstance(key, str | bytes):
                continue
            bucket = buckets.setdefault(hash(key), [])
            if any(key is other or key == other for other in bucket):
                continue
            bucket.append(key)
            if len(bucket) > MAX_EQUAL_HASHES:
                raise pickle.UnpicklingError(
                    f"the file holds more than {MAX_EQUAL_HASHES} distinct keys with one hash "
                    f"({type(key).__name__} keys such as {brief(key)}); such collisions make every "
                    "insertion scan the others, and no model file has them")


def call_keys(function: Any, args: Any) -> list | None:
    """The keys a call of ``set``, ``frozenset``, ``dict``, ``OrderedDict`` or ``defaultdict`` hashes.

    ``None`` for any other call, and where the keys come in a dict or set already checked.
    """
    if not isinstance(args, tuple):
        return None
    position = 1 if function is defaultdict else 0  # defaultdict(factory, items)
    source = args[position] if len(args) > position else None
    if not isinstance(source, list | tuple):
        return None  # dicts and sets passed in were checked as they were filled
    if function is set or function is frozenset:
        return list(source)
    if any(function is c for c in (dict, OrderedDict, defaultdict)):
        return [pair[0] for pair in source if isinstance(pair, list | tuple) and len(pair) == 2]
    return None


#: Codecs a pickle may ask for: linear in time, at most 4 bytes per character. numpy's and
#: pandas' protocol-2 pickles use ``_codecs.encode(text, "latin1")``.
PLAIN_CODECS = frozenset({"latin1", "latin-1", "ascii", "utf-8", "utf8"})


def check_codec(name: str, args: tuple) -> None:
    """Refuse a text conversion ``name(*args)`` with an unusual codec or error handler.

    Only :data:`PLAIN_CODECS` and ``errors="strict"`` are allowed: some codecs take quadratic
    time, and some handlers expand each character many times.
    """
    if len(args) > 1 and (not isinstance(args[1], str) or args[1].lower() not in PLAIN_CODECS):
        raise pickle.UnpicklingError(
            f"the file calls {name} with the codec {brief(args[1])}; only {sorted(PLAIN_CODECS)} are allowed")
    if len(args) > 2 and args[2] != "strict":
        raise pickle.UnpicklingError(
            f"the file calls {name} with the error handler {brief(args[2])}; only 'strict' is allowed")


def refuse_sizes(kind: type, *args: Any) -> Any:
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        raise pickle.UnpicklingError(
            f"the file asks for `{kind.__name__}({args[0]})`, a zero-filled buffer of a given "
            "size, which no scvi-tools or ESM file needs"
        )
    if args and not isinstance(args[0], str | bytes | bytearray | list | tuple):
        # a tensor or numpy integer would be read as a size, or iterated element by element
        raise pickle.UnpicklingError(
            f"the file asks for `{kind.__name__}` of a {type(args[0]).__name__}; pickles build it from text or bytes")
    return kind(*args)


def guarded_bytes(*args: Any) -> bytes:
    return refuse_sizes(bytes, *args)


def guarded_bytearray(*args: Any) -> bytearray:
    return refuse_sizes(bytearray, *args)


class NdarrayStandIn:
    """What ``numpy.ndarray`` resolves to: only :func:`guarded_reconstruct` accepts it.

    Called directly, ``ndarray(shape, dtype)`` would allocate any shape from a few bytes.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            "the file calls numpy.ndarray directly, which allocates any shape it names; numpy's "
            "own pickles use _reconstruct")


def guarded_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not NdarrayStandIn:
        raise pickle.UnpicklingError(
            f"the file asks numpy's _reconstruct to build a {brief(subtype)}; only numpy.ndarray is "
            "allowed"
        )
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"the file asks for an array of invalid shape {brief(shape)}")
    # counted in 8-byte elements, so a subarray dtype (many elements in one) counts in full
    size = int(np.prod([int(d) for d in dims], dtype=object)) * max(1, np.dtype(dtype).itemsize // 8)
    if size > MAX_RECONSTRUCT_ELEMENTS:
        raise pickle.UnpicklingError(
            f"the file asks for an empty array of shape {brief(shape)} and dtype {brief(np.dtype(dtype))}, over "
            f"perturbscope's cap of {MAX_RECONSTRUCT_ELEMENTS} elements"
        )
    return np.ndarray.__new__(np.ndarray, shape, dtype)


#: The longest ``RangeIndex`` a pickle may ask for (a pandas object can broadcast a scalar over
#: it, so a lazy range would otherwise become an allocation).
MAX_RANGE_INDEX_LENGTH = 1 << 26


def guarded_range_index(*args: Any, **kwargs: Any) -> pd.RangeIndex:
    index = pd.RangeIndex(*args, **kwargs)
    if len(index) > MAX_RANGE_INDEX_LENGTH:
        raise pickle.UnpicklingError(
            f"the file asks for a RangeIndex of {len(index)} entries, over perturbscope's cap of "
            f"{MAX_RANGE_INDEX_LENGTH}"
        )
    return index


def guarded_new_index(cls: Any, d: Any) -> pd.Index:
    """Build with pandas' ``_new_Index``, for the index classes of the allow-list only."""
    from pandas.core.indexes.base import _new_Index

    if not isinstance(d, dict):
        raise pickle.UnpicklingError(f"the file rebuilds an index from {type(d).__name__}")
    if cls is guarded_range_index:
        return guarded_range_index(**d)
    if cls is not pd.Index:
        raise pickle.UnpicklingError(
            f"the file asks pandas' _new_Index to build a {brief(cls)}; only Index and RangeIndex "
            "are allowed"
        )
    if not isinstance(d.get("data"), np.ndarray):  # another index or a range would be expanded
        raise pickle.UnpicklingError(
            f"the file builds an Index from a {type(d.get('data')).__name__}; pandas' own pickles "
            "hold a numpy array")
    return _new_Index(cls, d)


def guarded_scalar(dtype: Any, data: Any = None) -> Any:
    """Numpy's ``scalar(dtype, data)``, for plain dtypes and exactly one item of bytes.

    numpy reads an object field's pointer from ``data`` without checking its length (an object
    field over an empty buffer crashed on ``repr``); numpy pickles only plain scalars this way.
    """
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"the file builds a numpy scalar of dtype {brief(dtype)}; only "
                                     "dtypes without object fields are rebuilt from bytes")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"the file builds a numpy scalar of {dtype.itemsize} bytes from "
                                     f"{len(data) if isinstance(data, bytes) else type(data).__name__}")
    return numpy_scalar()(dtype, data)


def numpy_scalar() -> Any:
    """Return numpy's scalar rebuild (numpy 2 moved ``numpy.core`` to ``numpy._core``)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


def reconstruct_bytes(subtype: Any, shape: Any, dtype: Any) -> int:
    """What ``_reconstruct`` allocates; 0 where :func:`guarded_reconstruct` refuses it anyway."""
    n_bytes = array_bytes(shape, dtype)
    return 0 if n_bytes > MAX_RECONSTRUCT_ELEMENTS * 8 else n_bytes


def guarded_rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    """Torch's ``_rebuild_parameter_with_state``, with its attribute state checked first.

    torch sets every attribute the state names, so a dunder such as ``__array_interface__``
    would make numpy read memory at an address the file chose when the parameter is converted.
    """
    import torch._utils

    if state is not None and attribute_dicts(state) is None:
        raise pickle.UnpicklingError(
            f"the file restores a parameter's attributes from a {type(state).__name__}, not a dict")
    check_build_keys(state)
    private = [key for part in attribute_dicts(state) or () for key in part if str(key).startswith("_")]
    if private:  # e.g. _post_accumulate_grad_hooks, a property that registers the callables it is given
        raise pickle.UnpicklingError(
            f"the file sets the private attributes {brief(private[:5])} on a parameter; torch.save writes only "
            "the attributes a user set")
    return torch._utils._rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)


def _check_block_args(values: Any, placement: Any) -> None:
    if not isinstance(values, np.ndarray):
        raise pickle.UnpicklingError(
            f"the file restores a pandas block from a {type(values).__name__}, not a numpy array")
    plain = isinstance(placement, slice | int) and not isinstance(placement, bool)
    if not plain and not (isinstance(placement, np.ndarray) and placement.dtype.kind in "iu"):
        raise pickle.UnpicklingError(
            f"the file places a pandas block by a {type(placement).__name__}; pandas' own pickles use a "
            "slice or an integer array")
    starts = [placement.start, placement.stop] if isinstance(placement, slice) else np.ravel(placement).tolist()
    if any(isinstance(v, int) and v < 0 for v in starts) or (isinstance(placement, slice) and placement.step is not None
                                                             and placement.step < 1):
        raise pickle.UnpicklingError("the file places a pandas block at negative columns; pandas' own pickles "
                                     "place blocks from column 0 up")


def guarded_unpickle_block(values: Any, placement: Any, ndim: Any) -> Any:
    """Pandas' ``_unpickle_block`` for a numpy array placed by a slice, int or integer array."""
    from pandas._libs.internals import _unpickle_block

    _check_block_args(values, placement)
    return _unpickle_block(values, placement, ndim)


def guarded_new_block(values: Any, placement: Any, *args: Any, **kwargs: Any) -> Any:
    """Pandas' ``new_block`` for a numpy array placed by a slice, int or integer array."""
    from pandas.core.internals.blocks import new_block

    _check_block_args(values, placement)
    return new_block(values, placement, *args, **kwargs)


class _BriefRepr(reprlib.Repr):
    """Short, bounded text of file-controlled objects for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxdict = 2, 4, 4, 4
        self.maxset = self.maxfrozenset = 4
        self.maxstring, self.maxlong, self.maxother = 40, 40, 40

    def repr_instance(self, obj: Any, level: int) -> str:  # never the object's own repr
        return f"<{type(obj).__name__}>"

    def repr_str(self, obj: str, level: int) -> str:
        return repr(obj[:40]) + ("..." if len(obj) > 40 else "")


def brief(obj: Any) -> str:
    """A bounded description of ``obj`` for an error message (its full repr could be huge).

    Examples
    --------
    >>> brief(((1, 2, 3, 4, 5), "abc"))
    "((1, 2, 3, 4, ...), 'abc')"
    """
    if isinstance(obj, np.dtype):
        return f"dtype of {obj.itemsize} bytes" if obj.fields or obj.subdtype else str(obj)
    return _BriefRepr().repr(obj)


def _check_categorical(values: pd.Categorical) -> None:
    codes = np.asarray(values._codes)
    n = len(values.categories)
    if codes.dtype.kind not in "iu" or (len(codes) and (codes.min() < -1 or codes.max() >= n)):
        raise ValueError(f"codes outside -1 .. {n - 1}")


def _check_manager(manager: Any) -> None:
    from pandas.core.internals.managers import SingleBlockManager

    if any(type(axis) not in (pd.Index, pd.RangeIndex) for axis in manager.axes):
        raise ValueError("an axis that is not a plain Index or RangeIndex")
    if isinstance(manager, SingleBlockManager):
        (block,) = manager.blocks
        n = len(manager.axes[0])
        if block.values.ndim != 1 or len(block.values) != n or len(block.mgr_locs) != n:
            raise ValueError(f"{len(block.values)} values for an index of {n}")
    else:
        if len(manager.axes) != 2 or any(block.values.ndim != 2 for block in manager.blocks
                                         if isinstance(block.values, np.ndarray)):
            raise ValueError(f"a frame of {len(manager.axes)} axes")
        manager._verify_integrity()
        manager._rebuild_blknos_and_blklocs()
        for block in manager.blocks:  # pandas checks the columns' total, not each block's rows
            values, n_rows = block.values, len(manager.axes[1])
            items = values.shape[0] if isinstance(values, np.ndarray) else 1
            length = values.shape[1] if isinstance(values, np.ndarray) else len(values)
            if items != len(block.mgr_locs) or length != n_rows:
                raise ValueError(f"a block of {items} x {length} values placed at {len(block.mgr_locs)} "
                                 f"columns of {n_rows} rows")
    for block in manager.blocks:
        if isinstance(block.values, pd.Categorical):
            _check_categorical(block.values)
        elif not isinstance(block.values, np.ndarray):
            raise ValueError(f"block values of type {type(block.values).__name__}")


def check_pandas_object(obj: Any) -> None:
    """Refuse a restored frame, series, block manager, categorical or its dtype that is inconsistent.

    pandas trusts restored state: a series whose values are shorter than its index, a frame
    whose blocks do not match its axes, or categorical codes past the categories make later
    indexing read past the end of an array (a crash, or memory returned as data).

    Raises
    ------
    pickle.UnpicklingError
        Naming the object and what is inconsistent.
    """
    from pandas.core.internals.managers import BaseBlockManager, BlockManager, SingleBlockManager

    try:
        if isinstance(obj, pd.DataFrame | pd.Series):
            manager = getattr(obj, "_mgr", None)
            if manager is not None:
                expected = BlockManager if isinstance(obj, pd.DataFrame) else SingleBlockManager
                if type(manager) is not expected:
                    raise ValueError(f"a {type(manager).__name__} where pandas keeps a {expected.__name__}")
                _check_manager(manager)
        elif isinstance(obj, pd.CategoricalDtype):
            if obj.categories is not None:
                if type(obj.categories) not in (pd.Index, pd.RangeIndex):
                    raise ValueError(f"categories held in a {type(obj.categories).__name__}")
                pd.CategoricalDtype.validate_categories(obj.categories)
            if not isinstance(obj.ordered, bool | type(None)):
                raise ValueError(f"ordered is a {type(obj.ordered).__name__}")
        elif isinstance(obj, BaseBlockManager):
            _check_manager(obj)
        elif isinstance(obj, pd.Categorical) and hasattr(obj, "_codes"):
            _check_categorical(obj)
    except Exception as err:
        raise pickle.UnpicklingError(
            f"the file restores an inconsistent pandas {type(obj).__name__} ({type(err).__name__}: "
            f"{brief(str(err))})") from None


def check_loaded_tensors(loaded: Any) -> None:
    """Refuse odd tensors (expanded, sparse, hooked, with dunder attributes) and namespaces.

    Tensors may not address more elements than they store, carry backward hooks or dunder
    attributes, or be other than dense; namespaces may not carry dunder attributes. A 1.4 kB file can hold a tensor of 2^40 elements over one stored value (a stride-0
    expansion), which any reduction then walks for minutes; a sparse tensor's indices are not
    validated on load (an index out of range wrote past the dense result); backward hooks would
    be callables the file chose; ``__array_interface__`` makes numpy read an address the file
    chose. torch's own weights-only loader accepts all of these, so its results are walked too:
    dicts, lists, tuples, sets, namespaces and tensors' own attributes.
    """
    import argparse

    import torch

    stack, seen = [loaded], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            _check_tensor(obj)
            stack.extend(vars(obj).values())
        elif isinstance(obj, argparse.Namespace):
            check_build_keys(vars(obj))
            stack.extend(vars(obj).values())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
            stack.extend(obj.keys())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, slice):
            stack.extend((obj.start, obj.stop, obj.step))
        elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
            stack.extend(obj.ravel().tolist())


#: Characters of one text in a persistent id (torch's keys are short numbers, its locations "cpu").
MAX_PERSISTENT_TEXT = 256


def check_persistent_id(pid: Any) -> None:
    """Refuse a persistent id that is not what ``torch.save`` writes: a short tuple of plain values.

    torch's loader hashes the id and formats its key into a record name and error messages, so a
    tuple that shares its parts exponentially (1 kB of pickle) took 24 s and 2.2 GiB there, past
    every other check. ``torch.save`` writes ``("storage", storage type, key, location, numel)``.
    """
    plain = isinstance(pid, tuple) and len(pid) <= 8 and all(
        part is None or isinstance(part, bool | int) or type(part).__name__ == "StorageType"
        or (isinstance(part, str) and len(part) <= MAX_PERSISTENT_TEXT) for part in pid)
    if not plain:
        raise pickle.UnpicklingError(
            f"the file names a storage by a {type(pid).__name__} {brief(pid) if isinstance(pid, tuple) else ''} "
            "that is not a short tuple of texts and numbers, as torch.save writes it")


def _check_tensor(tensor: Any) -> None:
    import torch

    if tensor.layout != torch.strided:
        raise pickle.UnpicklingError(f"the file holds a {tensor.layout} tensor; model files hold dense tensors")
    stored = tensor.untyped_storage().nbytes() // max(1, tensor.element_size())
    if tensor.numel() > max(stored, 1):
        raise pickle.UnpicklingError(
            f"the file holds a tensor of {tensor.numel()} elements over {stored} stored ones (an "
            "expanded view); model files store every element")
    if tensor.is_quantized:
        raise pickle.UnpicklingError("the file holds a quantised tensor; model files hold plain tensors")
    if getattr(tensor, "_backward_hooks", None) or getattr(tensor, "_post_accumulate_grad_hooks", None):
        raise pickle.UnpicklingError(
            "the file attaches backward hooks to a tensor (callables it chose, run by the next "
            "backward pass); model files hold none")
    check_build_keys(vars(tensor))


def guarded_date(*args: Any) -> Any:
    """``datetime.date``, rebuilt through its validating constructor.

    From a bytes state (what pickles pass) CPython checks only the month: a date of year 0
    loads, and its ``ctime()`` then reads outside an array (a crash).
    """
    import datetime

    value = datetime.date(*args)
    try:
        return datetime.date(value.year, value.month, value.day)
    except ValueError as err:
        raise pickle.UnpicklingError(f"the file holds an invalid date ({err})") from None


def guarded_datetime(*args: Any) -> Any:
    """``datetime.datetime``, rebuilt through its validating constructor (see :func:`guarded_date`)."""
    import datetime

    value = datetime.datetime(*args)
    try:
        return datetime.datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                                 value.microsecond, value.tzinfo, fold=value.fold)
    except ValueError as err:
        raise pickle.UnpicklingError(f"the file holds an invalid datetime ({err})") from None
