"""How deep and how large a pickle's structures can get, read from its opcodes before loading.

perturbscope's restricted unpickler measures every structure while it builds it
(:class:`~perturbscope._pickle_budget.StructureCheck`). torch's weights-only loader, which
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` imposes, does not: a dict keyed by a tuple nested 300,000
deep crashes the interpreter while that loader hashes the key, before any check after the load
could run. :func:`check_pickle_structure` bounds, from the opcodes alone, what any object the
pickle builds could hold, so such a file is refused before torch reads it. Objects that hold one
another in a cycle are refused too: that loader has no guard for walking them (a ring of 60
lists, each holding the next twice, makes ``repr`` walk 2^59 nodes), and ``torch.save`` of
tensors and plain containers never writes one.
"""

from __future__ import annotations

import pickle
import pickletools
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from ._pickle_budget import (
    _GET_OPCODES,
    _MEMO_OPCODES,
    _TEXT_OPCODES,
    EXPANDED_NODES_FLOOR,
    MAX_NESTING,
)

#: Opcodes that put the items they pop into the object left below them (which stays on the stack).
_FILLING = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_MARK = object()
#: Calls whose result is a tensor (or parameter): a leaf, whatever its arguments (the storage
#: key, sizes, strides); hashing, ``repr`` and comparison of a tensor walk none of them.
_TENSOR_REBUILDS = "torch._utils._rebuild_"
_NODES_CAP = 1 << 62  # counts above any cap stay this, not an ever larger Python int


def _containment_graph(data: bytes) -> tuple[int, list[int], list[int]]:
    """Objects a pickle builds and which holds which: ``(n objects, holders, held)``.

    Every value the pickle pushes is an object; an object built from popped values (a tuple, a
    call's result) holds them, and a filling opcode (``APPEND``, ``SETITEM``, ``BUILD``...) makes
    the object below the popped values hold them. Memo references reuse the object, so shared
    parts are one object held several times. This over-approximates what the loader builds
    (every value a call consumes counts as held by its result), never under-approximates it.
    """
    stack: list[Any] = []
    memo: dict[int, int] = {}
    texts: dict[int, str] = {}  # object -> its value, for texts and the globals they name
    holders: list[int] = []
    held: list[int] = []
    n_objects = 0

    def new_object() -> int:
        nonlocal n_objects
        n_objects += 1
        return n_objects - 1

    for opcode, argument, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name in _TEXT_OPCODES or name == "GLOBAL":
            stack.append(new_object())
            texts[stack[-1]] = str(argument).replace(" ", ".", 1) if name == "GLOBAL" else str(argument)
            continue
        if name in _MEMO_OPCODES:
            if stack and stack[-1] is not _MARK:
                memo[len(memo) if name == "MEMOIZE" else int(argument)] = stack[-1]
            continue
        if name in _GET_OPCODES:
            stack.append(memo[int(argument)] if int(argument) in memo else new_object())
            continue
        if name == "DUP":
            if not stack or stack[-1] is _MARK:
                raise pickle.UnpicklingError("the file's pickle has DUP on an empty stack")
            stack.append(stack[-1])
            continue
        popped = _pop_operands(stack, opcode)
        if name in _FILLING:
            target = stack[-1] if stack and stack[-1] is not _MARK else None
            if target is None:
                raise pickle.UnpicklingError(f"the file's pickle applies {name} to nothing")
            holders.extend([target] * len(popped))
            held.extend(popped)
        elif opcode.stack_after:
            made = new_object()
            if name == "STACK_GLOBAL":  # popped: the name, then the module
                texts[made] = f"{texts.get(popped[1], '?')}.{texts.get(popped[0], '?')}"
            elif not (name == "REDUCE" and texts.get(popped[1], "").startswith(_TENSOR_REBUILDS)):
                holders.extend([made] * len(popped))
                held.extend(popped)
            stack.append(made)
    return n_objects, holders, held


def _pop_operands(stack: list[Any], opcode: Any) -> list[int]:
    """Pop what ``opcode`` consumes (a filling opcode's target stays); return the objects popped."""
    before = list(opcode.stack_before)
    if opcode.name in _FILLING:
        before = before[1:]  # the object being filled stays on the stack
    popped: list[Any] = []
    if pickletools.markobject in before:
        while stack and stack[-1] is not _MARK:
            popped.append(stack.pop())
        if not stack:
            raise pickle.UnpicklingError(f"the file's pickle has {opcode.name} without a MARK")
        stack.pop()
        before = before[: before.index(pickletools.markobject)]
    if len(stack) < len(before):
        raise pickle.UnpicklingError(f"the file's pickle has {opcode.name} on a stack too short for it")
    for _ in before:
        popped.append(stack.pop())
    if any(item is _MARK for item in popped):
        raise pickle.UnpicklingError(f"the file's pickle has {opcode.name} take a MARK as a value")
    return popped


def pickle_structure_bounds(data: bytes) -> tuple[int, int]:
    """Upper bounds on the nesting depth and the expanded size of anything a pickle builds.

    Expanded size counts a shared part every time it occurs (what hashing, ``repr`` and
    comparison walk). A tensor (the result of a ``torch._utils._rebuild_*`` call) is one node.

    Returns
    -------
    ``(depth, expanded nodes)``: a leaf has depth 0, a container one more than its deepest part.

    Raises
    ------
    pickle.UnpicklingError
        If objects hold one another in a cycle (no finite bound), or the pickle is malformed.

    Examples
    --------
    >>> import pickle
    >>> pickle_structure_bounds(pickle.dumps(((1, 2), [3]), protocol=4))
    (2, 6)
    """
    n_objects, holders, held = _containment_graph(data)
    if n_objects == 0:
        return 0, 0
    links = sparse.csr_matrix((np.ones(len(held)), (holders, held)), shape=(n_objects, n_objects))
    links.sum_duplicates()
    n_groups, _ = csgraph.connected_components(links, directed=True, connection="strong")
    if n_groups < n_objects or links.diagonal().any():
        raise pickle.UnpicklingError(
            "the file's pickle builds objects that hold one another in a cycle; torch's weights-only loader "
            "has no guard for walking them, and torch.save of tensors and containers never writes one")
    return _longest_and_largest(links)


def _longest_and_largest(links: sparse.csr_matrix) -> tuple[int, int]:
    """Deepest and largest expansion over an acyclic graph of objects (``links``: holder -> held)."""
    n = links.shape[0]
    depth = np.full(n, -1, dtype=np.int64)
    nodes: list[int] = [0] * n
    for root in range(n):
        if depth[root] >= 0:
            continue
        walk = [(root, False)]
        while walk:
            node, expanded = walk.pop()
            if depth[node] >= 0:
                continue
            parts = links.indices[links.indptr[node]: links.indptr[node + 1]]
            if not expanded:
                walk.append((node, True))
                walk.extend((int(p), False) for p in parts if depth[p] < 0)
                continue
            counts = links.data[links.indptr[node]: links.indptr[node + 1]]
            depth[node] = 0 if not len(parts) else 1 + int(depth[parts].max())
            total = 1 + sum(int(c) * nodes[int(p)] for p, c in zip(parts, counts, strict=True))
            nodes[node] = min(total, _NODES_CAP)
    return int(depth.max()), max(nodes)


def check_pickle_structure(data: bytes) -> None:
    """Refuse a pickle that could build structures deeper or larger than perturbscope's loader allows.

    The caps are the restricted unpickler's (:data:`~perturbscope._pickle_budget.MAX_NESTING`
    levels, and :data:`~perturbscope._pickle_budget.EXPANDED_NODES_FLOOR` nodes beyond the
    pickle's size), applied to :func:`pickle_structure_bounds`.

    Raises
    ------
    pickle.UnpicklingError
        Naming the bound that is over its cap.

    Examples
    --------
    >>> import pickle
    >>> deep = ()
    >>> for _ in range(200):
    ...     deep = (deep,)
    >>> check_pickle_structure(pickle.dumps(deep, protocol=4))
    Traceback (most recent call last):
    ...
    _pickle.UnpicklingError: the file's pickle can build structures nested 200 deep; perturbscope allows 100 levels
    """
    try:
        depth, nodes = pickle_structure_bounds(data)
    except (ValueError, EOFError, KeyError, IndexError) as err:
        raise pickle.UnpicklingError(f"the file's data.pkl is not a pickle ({err})") from err
    if depth > MAX_NESTING:
        raise pickle.UnpicklingError(
            f"the file's pickle can build structures nested {depth} deep; perturbscope allows {MAX_NESTING} levels")
    max_nodes = EXPANDED_NODES_FLOOR + len(data)
    if nodes > max_nodes:
        raise pickle.UnpicklingError(
            f"the file's pickle can build a structure of {nodes} nodes (shared parts counted each time they occur); "
            f"perturbscope allows {max_nodes} for a pickle of {len(data)} bytes")
