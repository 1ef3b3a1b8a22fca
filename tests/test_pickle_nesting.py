import pickle

import pytest

from perturbscope._pickle_nesting import check_pickle_structure, pickle_structure_bounds


def test_bounds_match_hand_counts():
    assert pickle_structure_bounds(pickle.dumps(1, protocol=4)) == (0, 1)
    # ((1, 2), [3]): leaves 1, 2, 3; two containers of depth 1; the outer tuple: 6 nodes, depth 2
    assert pickle_structure_bounds(pickle.dumps(((1, 2), [3]), protocol=4)) == (2, 6)
    shared = (7,)
    # (shared, shared): one memoised tuple held twice, counted each time: 1 + 2 * 2 nodes
    assert pickle_structure_bounds(pickle.dumps((shared, shared), protocol=4)) == (2, 5)
    assert pickle_structure_bounds(pickle.dumps({"a": [1, 2]}, protocol=2)) == (2, 5)


def test_filling_after_use_still_counts():
    # a list put into a tuple first and filled afterwards through the memo: the tuple holds it all
    data = (b"\x80\x02]q\x00"  # [] -> memo 0
            + b"h\x00\x85q\x01"  # (memo0,) -> memo 1
            + b"0h\x00N" + b"\x85" * 150 + b"a"  # pop; memo0.append(150-deep tuple)
            + b"0h\x01.")  # pop; the answer is the tuple
    assert pickle_structure_bounds(data)[0] == 152
    with pytest.raises(pickle.UnpicklingError, match=r"^the file's pickle can build structures nested 152 deep; "
                                                     r"perturbscope allows 100 levels$"):
        check_pickle_structure(data)


def test_cycles_are_refused():
    a = []
    b = [a, a]
    a.append(b)
    with pytest.raises(pickle.UnpicklingError, match=r"^the file's pickle builds objects that hold one another in "
                                                     r"a cycle; torch's weights-only loader has no guard"):
        pickle_structure_bounds(pickle.dumps(a, protocol=4))
    itself = []
    itself.append(itself)
    with pytest.raises(pickle.UnpicklingError, match="in a cycle"):
        check_pickle_structure(pickle.dumps(itself, protocol=4))


def test_a_tensor_is_one_node_however_often_it_is_shared():
    import io
    import zipfile

    import torch

    buffer = io.BytesIO()
    torch.save({i: torch.zeros(3) for i in range(3)} | {"shared": [torch.ones(2)] * 5000}, buffer)
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    depth, nodes = pickle_structure_bounds(data)
    # deepest: a rebuild call's arguments (a tuple holding the storage's key, itself a tuple)
    assert depth == 3
    # largest: the dict, its 4 keys, 3 tensors, the list and its 5,000 references to one tensor
    assert nodes == 1 + 4 + 3 + (1 + 5000)


def test_doubling_through_the_memo_is_refused():
    data = b"\x80\x02K\x00q\x00" + b"h\x00h\x00\x86q\x00" * 40 + b"."
    depth, nodes = pickle_structure_bounds(data)
    assert depth == 40
    assert nodes == 2**41 - 1
    with pytest.raises(pickle.UnpicklingError, match=r"^the file's pickle can build a structure of 2199023255551 nodes "
                                                     r"\(shared parts counted each time they occur\); perturbscope "
                                                     r"allows 65823 for a pickle of 287 bytes$"):
        check_pickle_structure(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"\x80\x02a.", "APPEND on a stack too short for it"),
    (b"\x80\x02Nt.", "TUPLE without a MARK"),
    (b"\x80\x02(\x85.", "TUPLE1 take a MARK as a value"),
    (b"\x80\x02K", "not a pickle"),
    (b"\x80\x022.", "DUP on an empty stack"),
])
def test_malformed_pickles_are_refused(data, message):
    with pytest.raises(pickle.UnpicklingError, match=message):
        check_pickle_structure(data)
