"""A memory budget for the restricted unpickler of :mod:`perturbscope._safe_load`.

The allow-list stops a pickle from running code, not from spending memory: its constructors
can build objects far larger than the file (a ``Series`` broadcast over a long ``RangeIndex``,
an object ``Index`` over one, a numpy scalar of a 2 GiB void dtype, ``tuple`` called again and
again on one memoised list). The unpickler therefore charges every object it builds by calling
or restoring to a budget of :data:`BUDGET_FLOOR_BYTES` plus :data:`BUDGET_BYTES_PER_FILE_BYTE`
times the pickle's size, and refuses the file once the budget is spent. Where a call's cost is
known before it runs (iterating a container, an empty array, a scalar without data, an index
over given values) it is charged before the call, so the allocation never happens; otherwise the
result is charged after it, which bounds any total to the budget plus one object, itself
bounded by inputs that were charged. Objects the pickle opcodes build directly (strings, lists,
dicts) are bounded by the file's own bytes and are not charged.

Direct calls of ``DataFrame``, ``Series``, ``Index`` and ``Categorical`` (which broadcast a
scalar over any index they are given) are refused outright: pandas pickles these through
``NEWOBJ`` (an empty object whose state is restored) and ``_new_Index``, never by calling them.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

#: Bytes every load may spend, whatever the file's size (real scVI registries use a few MiB).
BUDGET_FLOOR_BYTES = 256 << 20
#: Further bytes allowed per byte of pickle data.
BUDGET_BYTES_PER_FILE_BYTE = 64
_POINTER = 8
#: Pandas classes that real pickles rebuild through ``NEWOBJ`` or ``_new_Index``; called
#: directly they broadcast a scalar over whatever index they are given.
_BROADCASTING = (pd.DataFrame, pd.Series, pd.Index, pd.Categorical)
_SCALAR_CALLS = (str, int, float, complex, bool)
_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))
#: Arguments a call may copy: charged by their length before it runs.
_COPYABLE = (list, tuple, set, frozenset, dict, str, bytes, bytearray)


def stream_size(file: Any) -> int:
    """The number of bytes in a readable stream (0 when it cannot seek)."""
    if isinstance(file, io.BytesIO):
        return file.getbuffer().nbytes
    try:
        position = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(position)
    except (AttributeError, OSError, ValueError):
        return 0
    return int(end)


def object_bytes(obj: Any) -> int:
    """Bytes charged for an object the unpickler built: its data, not Python's overhead.

    Examples
    --------
    >>> object_bytes(np.zeros(4))
    32
    >>> object_bytes(pd.RangeIndex(10))
    80
    """
    if isinstance(obj, np.ndarray | np.generic):
        return int(obj.nbytes)
    if isinstance(obj, pd.RangeIndex):  # lazy, but anything that reads it fills len x 8 bytes
        return len(obj) * _POINTER
    if isinstance(obj, pd.Index | pd.Series | pd.DataFrame):
        if "_mgr" not in obj.__dict__ and not isinstance(obj, pd.Index):
            return 0  # built empty by NEWOBJ; its blocks are charged as they are restored
        return int(obj.memory_usage(index=False).sum() if isinstance(obj, pd.DataFrame) else obj.nbytes)
    if isinstance(obj, torch.Tensor):  # a view of a storage whose size torch checked
        return 0
    if isinstance(obj, str | bytes | bytearray):
        return len(obj)
    if isinstance(obj, list | tuple | set | frozenset | dict | torch.Size):
        return len(obj) * _POINTER * (3 if isinstance(obj, dict) else 1)
    return 0


def describe(obj: Any, fallback: str) -> str:
    """Name an object the unpickler built, for an error message.

    Examples
    --------
    >>> describe(pd.RangeIndex(5), "a call")
    'a RangeIndex of 5 entries'
    >>> describe(None, "a call of f")
    'a call of f'
    """
    if isinstance(obj, np.ndarray):
        return f"an array of shape {obj.shape} and dtype {obj.dtype}"
    if isinstance(obj, pd.Index | list | tuple | set | frozenset | dict | str | bytes | bytearray):
        return f"a {type(obj).__name__} of {len(obj)} entries"
    return fallback


def manager_state_bytes(state: Any, depth: int = 4) -> int:
    """What restoring a pandas block manager from ``state`` fills: 24 bytes per axis entry.

    pandas materialises each axis (8 bytes an entry) and builds two int64 arrays as long as
    the items axis; every index in the state (searched ``depth`` levels deep) is counted.

    Examples
    --------
    >>> manager_state_bytes({"0.14.1": {"axes": [pd.RangeIndex(10), pd.Index(["a"])]}})
    264
    """
    if isinstance(state, pd.Index):
        return 24 * len(state)
    if depth == 0:
        return 0
    items = state.values() if isinstance(state, dict) else state if isinstance(state, list | tuple) else ()
    return sum(manager_state_bytes(item, depth - 1) for item in items)


def call_name(function: Any) -> str:
    """The name of a callable a pickle asks for, as the file names it (guards unwrapped).

    Examples
    --------
    >>> call_name(tuple)
    'tuple'
    """
    return getattr(function, "__name__", type(function).__name__).removeprefix("guarded_")


class MemoryBudget:
    """Bytes an unpickler may still spend on the objects it builds.

    Parameters
    ----------
    file_bytes
        Size of the pickle data.

    Examples
    --------
    >>> budget = MemoryBudget(0)
    >>> budget.charge(BUDGET_FLOOR_BYTES, "an array")
    >>> budget.charge(1, "one more byte")
    Traceback (most recent call last):
    ...
    _pickle.UnpicklingError: the file asks for one more byte, which takes perturbscope's loader past its memory budget of 268435456 bytes (256 MiB plus 64 per byte of pickle data)
    """

    def __init__(self, file_bytes: int):
        self.limit = BUDGET_FLOOR_BYTES + BUDGET_BYTES_PER_FILE_BYTE * max(0, int(file_bytes))
        self.spent = 0

    def charge(self, n_bytes: int, what: str) -> None:
        """Spend ``n_bytes`` on ``what``; refuse the file when the budget is exceeded."""
        self.spent += int(n_bytes)
        if self.spent > self.limit:
            raise pickle.UnpicklingError(
                f"the file asks for {what}, which takes perturbscope's loader past its memory "
                f"budget of {self.limit} bytes ({BUDGET_FLOOR_BYTES >> 20} MiB plus "
                f"{BUDGET_BYTES_PER_FILE_BYTE} per byte of pickle data)")

    def check_call(self, function: Any, args: Any, known_costs: dict[Any, Callable[[tuple], int]],
                   *, new_object: bool = False) -> None:
        """Check a call the pickle asks for, and charge what it will copy or allocate.

        Every container or string argument is charged by its length (the call may copy it);
        ``known_costs`` maps a callable to what it allocates from its arguments.

        Parameters
        ----------
        function
            The resolved callable (for ``NEWOBJ``, the class whose ``__new__`` is called).
        args
            Its positional arguments.
        known_costs
            ``{callable: cost of its arguments in bytes}``.
        new_object
            ``True`` for ``NEWOBJ``, where a pandas class with no arguments builds an empty
            object whose state is restored afterwards (pandas' own pickles).
        """
        if not isinstance(args, tuple):
            return  # pickle's own call raises the error for a malformed argument
        name = call_name(function)
        if any(function is cls for cls in _BROADCASTING) and (args or not new_object):
            raise pickle.UnpicklingError(
                f"the file calls pandas' {name} directly, which broadcasts over any index it is "
                "given; pandas' own pickles restore it from its state")
        if any(function is c for c in _SCALAR_CALLS) and args and not isinstance(args[0], _SCALARS):
            raise pickle.UnpicklingError(
                f"the file calls {name} on a {type(args[0]).__name__}; only plain values are converted")
        copied = sum(object_bytes(a) for a in args if isinstance(a, _COPYABLE))
        cost = known_costs.get(function)
        self.charge(copied + (cost(args) if cost is not None else 0), f"a call of {name}")


def array_bytes(shape: Any, dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype``; 0 for an invalid one (refused elsewhere).

    Examples
    --------
    >>> array_bytes((2, 3), "float32")
    24
    """
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return 0
    try:
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError):
        return 0
    return int(np.prod([int(d) for d in dims], dtype=object)) * itemsize


#: The deepest nesting of containers a pickle may build (CPython hashes nested tuples
#: recursively in C, without a recursion guard: 300,000 levels crash the interpreter).
MAX_NESTING = 100
#: Nodes a structure may hold once its shared parts are counted every time they occur, beyond
#: the pickle's own size: memo references let a few hundred bytes build a tuple whose hash,
#: ``repr`` or comparison walks 2^40 nodes.
EXPANDED_NODES_FLOOR = 1 << 16
_CONTAINERS = (tuple, list, dict, set, frozenset)


def _children(obj: Any) -> list | None:
    """The parts a hash, repr or comparison of ``obj`` walks; ``None`` for a leaf."""
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, _CONTAINERS):
        return list(obj)
    if isinstance(obj, np.dtype):
        parts = [] if obj.fields is None else [field[0] for field in obj.fields.values()]
        return parts + ([obj.subdtype[0]] if obj.subdtype is not None else []) or None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.size:
        return list(obj.ravel()) if obj.dtype.names is None else None
    return None


class StructureCheck:
    """Refuse structures whose expanded size or nesting could exhaust the loader.

    Each node is counted every time it occurs (what hashing, ``repr`` and comparison walk),
    computed once per distinct node; tuples, frozensets and dtypes holding no mutable part are
    remembered across calls. The visits of all checks together are capped too, so checking the
    same large argument again and again cannot spend unbounded time either.

    Parameters
    ----------
    file_bytes
        Size of the pickle data.
    sealed_types
        Types whose objects, once used (measured as part of a call's arguments or a state), may
        not be restored again (:meth:`check_unsealed`); lists, dicts and sets are always sealed.

    Examples
    --------
    >>> check = StructureCheck(0)
    >>> check.measure(((1, 2), [3]))
    (6, 2)
    """

    def __init__(self, file_bytes: int, sealed_types: tuple[type, ...] = (np.ndarray, np.dtype)):
        self._sealed_types = sealed_types
        self.max_nodes = EXPANDED_NODES_FLOOR + max(0, int(file_bytes))
        self.visits_left = 64 * self.max_nodes
        self._known: dict[int, tuple[Any, int, int]] = {}  # id -> (object, nodes, depth)
        self._sealed: dict[int, Any] = {}  # id -> a mutable container that was measured

    def check_unsealed(self, container: Any, opcode: str) -> None:
        """Refuse filling a container after it was measured (passed to a call, restored, a key).

        Real pickles fill a container before they use it; filling it afterwards would grow a
        structure that was measured small. The ``sealed_types`` (arrays and dtypes; for the
        loader, every type it restores) are sealed the same way: restoring one after an object
        that uses it was checked would change that object unchecked.
        """
        if self._sealed.get(id(container)) is container:
            raise pickle.UnpicklingError(
                f"the file applies {opcode} to a {type(container).__name__} it has already used; "
                "pickles fill or restore an object before they use it")

    def measure(self, root: Any) -> tuple[int, int]:
        """``(expanded nodes, nesting depth)`` of ``root``; refuses what is over the caps.

        Raises
        ------
        pickle.UnpicklingError
            For more than :attr:`max_nodes` expanded nodes, nesting deeper than
            :data:`MAX_NESTING`, or more visits than the load has left.
        """
        done: dict[int, tuple[int, int, bool]] = {}  # id -> (nodes, depth, holds a mutable part)
        open_ids: set[int] = set()
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            obj, expanded = stack.pop()
            key = id(obj)
            if key in done:
                continue
            known = self._known.get(key)
            if known is not None and known[0] is obj:
                done[key] = (known[1], known[2], False)
                continue
            if isinstance(obj, self._sealed_types):  # used: restoring it again would change a user
                self._sealed[key] = obj
            children = _children(obj)
            if children is None:
                done[key] = (1, 0, False)
                continue
            if not expanded:
                if key in open_ids:  # a list that holds itself: repr prints [...]
                    if isinstance(obj, np.ndarray):  # numpy's arithmetic recurses without end
                        raise pickle.UnpicklingError("the file builds an object array that contains itself")
                    done[key] = (1, 0, True)
                    continue
                open_ids.add(key)
                self.visits_left -= len(children)
                if self.visits_left < 0:
                    raise pickle.UnpicklingError(
                        "the file's structures take perturbscope's loader past its budget of checks "
                        f"({64 * self.max_nodes} visits)")
                stack.append((obj, True))
                stack.extend((child, False) for child in children if id(child) not in done)
                continue
            open_ids.discard(key)
            parts = [done.get(id(child), (1, 0, True)) for child in children]
            nodes = 1 + sum(p[0] for p in parts)
            depth = 1 + max((p[1] for p in parts), default=0)
            mutable = isinstance(obj, list | dict | set) or any(p[2] for p in parts)
            if isinstance(obj, list | dict | set):
                self._sealed[key] = obj
            if nodes > self.max_nodes or depth > MAX_NESTING:
                raise pickle.UnpicklingError(
                    f"the file builds a {type(obj).__name__} of {nodes} nodes (shared parts counted each "
                    f"time they occur) nested {depth} deep; perturbscope's loader allows "
                    f"{self.max_nodes} nodes and {MAX_NESTING} levels")
            done[key] = (nodes, depth, mutable)
            if not mutable:
                self._known[key] = (obj, nodes, depth)
        nodes, depth, _ = done[id(root)]
        return nodes, depth


def check_zip_records(path: Any, torch_reader: Any) -> None:
    """Refuse a zip (torch) file whose records could add up to more bytes than the file has.

    ``torch.save`` stores every record as it is (no compression), so a storage's bytes are in
    the file. A compressed record, or records whose bytes overlap or are shared by several
    names, would let a file of a few kB declare, and make torch allocate, gigabytes.
    ``torch_reader`` (torch's own zip reader over the file) must list the same records, read
    from the same central directory.

    Raises
    ------
    pickle.UnpicklingError
        On a compressed record, duplicate names, records that overlap or end past the file, or
        a central directory that Python and torch would read differently.
    """
    import os
    import struct
    import zipfile

    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        _check_one_central_directory(archive, raw, torch_reader)
        records = archive.infolist()
        names = [record.filename for record in records]
        if len({name.casefold() for name in names}) != len(names):  # torch's zip reader ignores case
            raise pickle.UnpicklingError("the file's zip archive names a record twice")
        spans = []
        for record in records:
            raw.seek(record.header_offset)
            header = raw.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise pickle.UnpicklingError(f"the file's zip record {record.filename!r} has no local header")
            (method,), (name_length, extra_length) = struct.unpack("<H", header[8:10]), struct.unpack("<HH", header[26:30])
            if (record.compress_type, method) != (zipfile.ZIP_STORED, zipfile.ZIP_STORED) \
                    or record.file_size != record.compress_size:
                raise pickle.UnpicklingError(
                    f"the file's zip record {record.filename!r} is compressed ({record.compress_size} bytes "
                    f"expanding to {record.file_size}); torch.save stores records uncompressed")
            spans.append((record.header_offset, record.header_offset + 30 + name_length + extra_length
                           + record.compress_size, record.filename))
    spans.sort()
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if start < end:
            raise pickle.UnpicklingError(f"the file's zip records {name!r} and {following!r} share bytes")
    if spans and spans[-1][1] > size:
        raise pickle.UnpicklingError(f"the file's zip record {spans[-1][2]!r} ends past the end of the file")


def _check_one_central_directory(archive: Any, raw: Any, torch_reader: Any) -> None:
    """Refuse an archive that Python's zipfile and torch's zip reader could read differently.

    Python's zipfile takes a central directory that is not where the end record says to be a
    zip appended to other data, and shifts every offset; torch's reader takes the stated offset.
    A file with two central directories passed every record check on the first while torch read
    deflated records, listed under several names, from the second (4 x 256 MiB from 263 kB).
    """
    import zipfile

    end = zipfile._EndRecData(raw)  # the end record zipfile itself read (zip64 resolved)
    if end is None or archive.start_dir != end[zipfile._ECD_OFFSET]:
        raise pickle.UnpicklingError(
            "the file's zip central directory is not where its end record places it (data before or inside the "
            "archive); torch and Python would read different records")
    names = sorted(record.filename.split("/", 1)[-1] for record in archive.infolist())
    if names != sorted(torch_reader.get_all_records()):
        raise pickle.UnpicklingError("torch's zip reader lists other records than Python's")


def check_zip_globals(torch_reader: Any, allowed: frozenset[str]) -> None:
    """Refuse a torch zip file whose pickle names a global outside ``allowed`` (``"module.name"``).

    torch's weights-only loader allows more than model files need, and some of it computes while
    the file loads: ``torch._utils._rebuild_device_tensor_from_cpu_tensor`` turned a one-byte
    expanded view into a dense 1 GiB tensor before any check could see the view, and the legacy
    constructors (``torch.DoubleTensor(n)``) return unfilled memory. Names are joined as that
    loader joins them (``f"{module}.{name}"``, :func:`named_globals`), and the pickle scanned is
    the record ``torch_reader`` (torch's own zip reader) returns for ``data.pkl`` (it matches names
    without regard to case), so what is checked is what torch would run. The restricted
    unpickler, which reads the file after this check, applies the same allow-list as
    ``(module, name)`` pairs.

    Raises
    ------
    pickle.UnpicklingError
        Naming the first such global, or when torch finds no ``data.pkl`` or it is not a pickle.
    """
    try:
        data = torch_reader.get_record("data.pkl")
    except RuntimeError as err:
        raise pickle.UnpicklingError(f"torch finds no readable data.pkl in the file ({err})") from err
    try:
        for full_name in named_globals(data):
            if full_name not in allowed:
                raise pickle.UnpicklingError(  # the restricted unpickler's words: one rule, two places it is applied
                    f"the file asks to call or build `{full_name}`, which is not on perturbscope's allow-list of "
                    "globals such a file needs")
    except (ValueError, EOFError) as err:
        raise pickle.UnpicklingError(f"the file's data.pkl is not a pickle ({err})") from err


#: Opcodes that push one text: the names a ``STACK_GLOBAL`` reads.
_TEXT_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                           "STRING"})
_MEMO_OPCODES = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})


def named_globals(data: bytes):
    """Yield every global a pickle names, as ``"module.name"``.

    ``GLOBAL`` names it in its operand; ``STACK_GLOBAL`` (protocol 4 and later) takes the two texts
    on top of the stack, which must come straight from text opcodes or from memo entries that
    hold texts (as every pickler writes them), else the pickle is refused: a name this scan could
    not read would be one it could not check. ``INST``, ``OBJ`` and ``PERSID`` (protocol 0) are
    refused; ``torch.save`` never writes them.

    Raises
    ------
    pickle.UnpicklingError
        For a name this scan cannot read.

    Examples
    --------
    >>> import pickle, collections
    >>> list(named_globals(pickle.dumps(collections.OrderedDict(), protocol=4)))
    ['collections.OrderedDict']
    """
    import pickletools

    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # the values of the pushes since the last other opcode
    for opcode, argument, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("INST", "OBJ", "PERSID"):
            raise pickle.UnpicklingError(f"the file's pickle uses the {name} opcode, which torch.save never writes")
        if name == "GLOBAL":
            yield str(argument).replace(" ", ".", 1)  # pickletools joins the two lines with a space
        elif name == "STACK_GLOBAL":
            if len(pushed) < 2 or pushed[-2] is None or pushed[-1] is None:
                raise pickle.UnpicklingError("the file names a global (STACK_GLOBAL) by values that are not plain texts")
            yield f"{pushed[-2]}.{pushed[-1]}"
        if name in _MEMO_OPCODES:
            memo[len(memo) if name == "MEMOIZE" else int(argument)] = pushed[-1] if pushed else None
            continue
        if name in ("FRAME", "PROTO"):  # leave the stack as it is
            continue
        if name in _TEXT_OPCODES:
            pushed.append(str(argument))
        elif name in _GET_OPCODES:
            pushed.append(memo.get(int(argument)))
        else:
            pushed = []


def check_torch_zip(path: Any, allowed_globals: frozenset[str]) -> Any:
    """Refuse a file torch would read unsafely: not a zip, or failing the two zip checks.

    The checks are :func:`check_zip_records` and :func:`check_zip_globals`.

    Returns
    -------
    torch's reader of the file (its ``data.pkl`` is what torch will unpickle).

    In torch's older (non-zip) format torch allocates each storage at the size the file declares,
    and returns it unfilled, before reading any data: a 313-byte file got a 3 GiB storage of
    stale heap memory.

    Raises
    ------
    pickle.UnpicklingError
        Saying which check refused it.
    """
    import zipfile

    with open(path, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"  # torch's own test is the first record's header
    if not (zipped and zipfile.is_zipfile(path)):
        raise pickle.UnpicklingError(
            "it is not in torch's zip format (torch.save's default since torch 1.6). In the older format torch "
            "allocates each storage at the size the file declares, unfilled, before reading any data; load it "
            "in a trusted session and save it again")
    import torch

    try:  # one reader for both checks: what torch itself will read
        torch_reader = torch._C.PyTorchFileReader(str(path))
    except RuntimeError as err:
        raise pickle.UnpicklingError(f"torch's zip reader cannot read the file ({err})") from err
    check_zip_records(path, torch_reader)
    check_zip_globals(torch_reader, allowed_globals)
    return torch_reader

