"""The restricted unpickler's memory budget: small files cannot build large objects."""

import pickle
import re
import sys

import numpy as np
import pandas as pd
import pytest

from perturbscope._pickle_budget import BUDGET_BYTES_PER_FILE_BYTE, BUDGET_FLOOR_BYTES, MemoryBudget
from perturbscope._safe_load import load_model_file, restricted_pickle


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _copies_of_one_list(n_items: int, n_copies: int) -> bytes:
    """``[tuple(L), tuple(L), ...]`` for one memoised list ``L``: memory grows as the product."""
    items = b"]q\x00(" + b"K\x01" * n_items + b"e0"  # L in memo 0, popped from the stack
    copy = b"h\x01h\x00\x85R"  # tuple (memo 1) called on L
    return b"\x80\x02" + items + _global("builtins", "tuple") + b"q\x010" + b"](" + copy * n_copies + b"e."


def test_the_budget_is_the_floor_plus_a_multiple_of_the_file_size():
    budget = MemoryBudget(1000)
    assert budget.limit == BUDGET_FLOOR_BYTES + 1000 * BUDGET_BYTES_PER_FILE_BYTE
    budget.charge(budget.limit, "everything")
    with pytest.raises(pickle.UnpicklingError, match=r"^the file asks for a byte more, which takes"):
        budget.charge(1, "a byte more")


def test_copying_one_memoised_list_again_and_again_stops_at_the_budget(memory_headroom):
    data = _copies_of_one_list(n_items=4000, n_copies=100_000)  # 600 kB asking for 3.2 GB
    assert len(data) < 700_000
    with memory_headroom(1), pytest.raises(pickle.UnpicklingError) as err:
        restricted_pickle.loads(data)
    assert "past its memory budget of" in str(err.value)
    assert not isinstance(err.value.__cause__, MemoryError)
    small = restricted_pickle.loads(_copies_of_one_list(n_items=3, n_copies=4))
    assert small == [(1, 1, 1)] * 4


def test_repeated_array_states_from_one_memoised_buffer_stop_at_the_budget(memory_headroom):
    buffer = b"\x00" * (1 << 20)
    reconstruct = _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
    array = (reconstruct + b"K\x00\x85C\x01b\x87R"  # _reconstruct(ndarray, (0,), b"b")
             + b"(K\x01J\x00\x00\x10\x00\x85" + _global("numpy", "dtype") + b"X\x02\x00\x00\x00u1\x85R"
             + b"\x89h\x00tb")  # BUILD (1, (2**20,), dtype("u1"), False, <memo 0>)
    data = b"\x80\x02B" + len(buffer).to_bytes(4, "little") + buffer + b"q\x000](" + array * 2000 + b"e."
    with memory_headroom(1), pytest.raises(pickle.UnpicklingError, match="past its memory budget"):
        restricted_pickle.loads(data)
    two = restricted_pickle.loads(data[: data.index(b"](") + 2] + array * 2 + b"e.")
    assert [a.shape for a in two] == [(1 << 20,), (1 << 20,)]


@pytest.mark.parametrize("cls", [pd.Series, pd.DataFrame, pd.Index, pd.Categorical])
def test_pandas_constructors_called_directly_are_refused(cls):
    data = (b"\x80\x02" + _global(cls.__module__, cls.__name__) + b"K\x00"
            + _global("pandas.core.indexes.range", "RangeIndex") + _int(1000) + b"\x85R\x86R.")
    with pytest.raises(pickle.UnpicklingError, match=(
            rf"^the file calls pandas' {cls.__name__} directly, which broadcasts over any index it "
            r"is given; pandas' own pickles restore it from its state$")):
        restricted_pickle.loads(data)


def test_an_index_over_a_range_is_refused():
    data = (b"\x80\x02" + _global("pandas.core.indexes.base", "_new_Index")
            + _global("pandas.core.indexes.base", "Index") + b"}(X\x04\x00\x00\x00data"
            + _global("pandas.core.indexes.range", "RangeIndex") + _int(1000) + b"\x85Ru\x86R.")
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file builds an Index from a RangeIndex; pandas' own pickles hold a numpy array$")):
        restricted_pickle.loads(data)


def test_a_long_range_index_and_a_huge_void_scalar_are_refused(memory_headroom):
    long_range = (b"\x80\x02" + _global("pandas.core.indexes.range", "RangeIndex")
                  + _int(1 << 26) + b"\x85R.")
    with pytest.raises(pickle.UnpicklingError, match=r"^the file asks for a RangeIndex of 67108864 entries, "):
        restricted_pickle.loads(long_range)
    void = b"V2147483647"
    scalar = (b"\x80\x02" + _global("numpy.core.multiarray", "scalar") + _global("numpy", "dtype")
              + b"X" + len(void).to_bytes(4, "little") + void + b"\x85R\x85R.")
    with memory_headroom(1), pytest.raises(pickle.UnpicklingError, match=r"^the file asks for a call of scalar, "):
        restricted_pickle.loads(scalar)


def test_a_conversion_of_a_container_to_text_is_refused():
    nested = b"\x80\x02" + _global("builtins", "str") + b"](K\x01e\x85R."
    with pytest.raises(pickle.UnpicklingError, match=r"^the file calls str on a list; only plain values are converted$"):
        restricted_pickle.loads(nested)
    assert restricted_pickle.loads(b"\x80\x02" + _global("builtins", "str") + b"K\x07\x85R.") == "7"


def test_real_frames_indexes_and_arrays_still_load(tmp_path):
    import torch

    frame = pd.DataFrame({"x": np.arange(5.0), "y": list("abcde")}, index=[f"c{i}" for i in range(5)])
    payload = {"frame": frame, "index": pd.Index(["g1", "g2"]), "range": pd.RangeIndex(3),
               "series": frame["x"], "array": np.arange(6).reshape(2, 3), "scalar": np.float32(1.5),
               "weights": torch.ones(3)}
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    loaded = load_model_file(path)
    pd.testing.assert_frame_equal(loaded["frame"], frame)
    pd.testing.assert_series_equal(loaded["series"], frame["x"])
    assert loaded["index"].tolist() == ["g1", "g2"]
    assert loaded["range"].equals(pd.RangeIndex(3))
    assert loaded["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded["scalar"] == np.float32(1.5)


def _text(s: str) -> bytes:
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def test_block_managers_restored_over_a_long_memoised_axis_stop_at_the_budget(memory_headroom):
    # 8 frames' managers restored from one memoised state over a RangeIndex of 2^24 rows: pandas
    # fills two int64 arrays of that length for each (2.3 GiB from 721 bytes before the fix)
    n = 1 << 24
    empty = (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + b"K\x00\x85C\x01b\x87R"
             + b"(K\x01" + _int(n) + b"K\x00\x86" + _global("numpy", "dtype") + _text("f8") + b"\x85R\x89C\x00tb")
    axis = _global("pandas.core.indexes.range", "RangeIndex") + _int(n) + b"\x85R"
    state = (b"(NNN}" + _text("0.14.1") + b"}(" + _text("axes") + b"](" + axis
             + _global("pandas.core.indexes.range", "RangeIndex") + b"K\x00\x85Re" + _text("blocks") + b"](}("
             + _text("values") + empty + _text("mgr_locs") + _global("builtins", "slice") + b"K\x00" + _int(n)
             + b"K\x01\x87Rueust" + b"r\x00\x00\x00\x000")
    manager = _global("pandas.core.internals.managers", "BlockManager") + b")\x81j\x00\x00\x00\x00b"
    with memory_headroom(1), pytest.raises(pickle.UnpicklingError, match=(
            r"^the file asks for a pandas block manager over long axes, which takes perturbscope's loader past")):
        restricted_pickle.loads(b"\x80\x02" + state + b"](" + manager * 8 + b"e.")


@pytest.mark.parametrize(("args", "message"), [
    (_text("abc") + _text("punycode"), r"^the file calls encode with the codec 'punycode'; only \['ascii', "),
    (_text("abc") + _text("latin1") + _text("namereplace"),
     r"^the file calls encode with the error handler 'namereplace'; only 'strict' is allowed$"),
])
def test_only_plain_codecs_are_allowed(args, message):
    with pytest.raises(pickle.UnpicklingError, match=message):
        restricted_pickle.loads(b"\x80\x02" + _global("_codecs", "encode") + b"(" + args + b"tR.")
    latin = restricted_pickle.loads(b"\x80\x02" + _global("_codecs", "encode") + _text("\xe9") + _text("latin1") + b"\x86R.")
    assert latin == b"\xe9"


def _colliding_ints(n: int) -> list[bytes]:
    """``n`` distinct ints with one hash (``hash(7 + i * modulus) == 7``), as pickle opcodes."""
    return [pickle.dumps(7 + i * sys.hash_info.modulus, 2)[2:-1] for i in range(n)]


def test_keys_that_collide_in_hash_are_refused_in_every_container():
    message = r"^the file holds more than 16 distinct keys with one hash \(int keys such as "
    def cases(keys):
        items = b"(" + b"".join(keys)
        return {
            "frozenset call": b"\x80\x02" + _global("builtins", "frozenset") + b"]" + items + b"e\x85R.",
            "FROZENSET": b"\x80\x04" + items + b"\x91.",
            "ADDITEMS": b"\x80\x04\x8f" + items + b"\x90.",
            "SETITEMS": b"\x80\x02}(" + b"".join(key + b"N" for key in keys) + b"u.",
            "SETITEM": b"\x80\x02}" + b"".join(key + b"Ns" for key in keys) + b".",  # one key at a time
        }

    for data in cases(_colliding_ints(40)).values():
        with pytest.raises(pickle.UnpicklingError, match=message):
            restricted_pickle.loads(data)
    for case, data in cases(_colliding_ints(16)).items():
        assert len(restricted_pickle.loads(data)) == 16, case
    assert restricted_pickle.loads(b"\x80\x02}(K\x01NK\x01NK\x02Nu.") == {1: None, 2: None}  # equal keys are fine


def test_container_opcodes_fill_only_plain_containers():
    frame = _global("pandas.core.frame", "DataFrame") + b")\x81"
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file applies SETITEMS to a DataFrame; pickles apply it to plain containers only$")):
        restricted_pickle.loads(b"\x80\x02" + frame + b"(" + _text("c") + b"K\x00u.")
    with pytest.raises(pickle.UnpicklingError, match=r"^the file applies APPENDS to a dict; "):
        restricted_pickle.loads(b"\x80\x02}(K\x00e.")


def _put(i: int) -> bytes:
    return b"r" + i.to_bytes(4, "little")


def _get(i: int) -> bytes:
    return b"j" + i.to_bytes(4, "little")


def _doubling_tuple(n: int) -> bytes:
    """``T_n`` with ``T_0 = (0,)``, ``T_{i+1} = (T_i, T_i)``: 2^n nodes from a few bytes a level."""
    body = b"K\x00\x85" + _put(0)
    for i in range(n):
        body += _get(i) + _get(i) + b"\x86" + _put(i + 1)
    return body


def test_structures_that_share_parts_exponentially_are_refused():
    # hashing {T_40: None} walks 2^40 nodes (hours of CPU from 660 bytes); printing T_30 in an
    # error message took 1.3 GiB
    key = b"\x80\x02" + _doubling_tuple(40) + b"0}" + _get(40) + b"Ns."
    shape = (b"\x80\x02" + _doubling_tuple(30) + b"0" + _global("numpy.core.multiarray", "_reconstruct")
             + _global("numpy", "ndarray") + _get(30) + b"C\x01b\x87R.")
    for data in (key, shape):
        with pytest.raises(pickle.UnpicklingError, match=(
                r"^the file builds a tuple of \d+ nodes \(shared parts counted each time they occur\) nested "
                r"\d+ deep; perturbscope's loader allows \d+ nodes and 100 levels$")):
            restricted_pickle.loads(data)
    assert restricted_pickle.loads(b"\x80\x02" + _doubling_tuple(8) + b".")[0][0][0][0][0][0][0][0] == (0,)


def test_nesting_deeper_than_100_levels_is_refused():
    # CPython hashes nested tuples recursively in C: 300,000 levels crashed the interpreter
    data = b"\x80\x02}K\x00" + b"\x85" * 150 + b"Ns."
    with pytest.raises(pickle.UnpicklingError, match=r"^the file builds a tuple of 102 nodes .* nested 101 deep; "):
        restricted_pickle.loads(data)


def test_dtypes_whose_fields_share_parts_exponentially_are_refused():
    # D_{i+1} holds two fields of type D_i: numpy's descr of D_21 took 1.9 GiB and 50 s
    dtype = _global("numpy", "dtype")
    body, size = dtype + b"(" + _text("i8") + b"\x89\x88tR" + _put(0), 8
    for i in range(24):
        body += (dtype + b"(" + _text(f"V{2 * size}") + b"\x89\x88tR" + b"(K\x03" + _text("|") + b"N" + _text("a")
                 + _text("b") + b"\x86}(" + _text("a") + _get(i) + b"K\x00\x86" + _text("b") + _get(i) + b"J"
                 + size.to_bytes(4, "little") + b"\x86uJ" + (2 * size).to_bytes(4, "little") + b"K\x01K\x10tb"
                 + _put(i + 1))
        size *= 2
    with pytest.raises(pickle.UnpicklingError, match=r"^the file builds a \w+ of \d+ nodes "):
        restricted_pickle.loads(b"\x80\x02" + body + b".")


def test_a_parameter_cannot_carry_dunder_attributes_and_blocks_are_placed_by_slices_or_integers():
    # numpy honours an __array_interface__ set on the parameter: a read at an address the file names
    iface = (b"}(" + _text("shape") + b"K\x04\x85" + _text("typestr") + _text("<i8") + _text("data")
             + b"\x8a\x08" + (0x41414141).to_bytes(8, "little") + b"\x88\x86" + _text("version") + b"K\x03u")
    param = (_global("torch._utils", "_rebuild_parameter_with_state") + b"(N\x89N}(" + _text("__array_interface__")
             + iface + b"uN\x86tR")
    values = _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + b"K\x00\x85C\x01b\x87R"
    with pytest.raises(pickle.UnpicklingError, match=r"^the file sets the attributes \['__array_interface__'\] on"):
        restricted_pickle.loads(b"\x80\x02" + _global("pandas._libs.internals", "_unpickle_block") + b"("
                                + values + param + b"K\x01tR.")
    plain = _global("torch._utils", "_rebuild_parameter_with_state") + b"(N\x89N}tR"
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file places a pandas block by a Parameter; pandas' own pickles use a slice or an integer array$")):
        restricted_pickle.loads(b"\x80\x02" + _global("pandas._libs.internals", "_unpickle_block") + b"("
                                + values + plain + b"K\x01tR.")


def test_only_numpy_pandas_and_namespace_states_are_restored():
    index = (_global("pandas.core.indexes.base", "_new_Index") + _global("pandas.core.indexes.base", "Index")
             + b"}(" + _text("data") + _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
             + b"K\x00\x85C\x01b\x87Ru\x86R")
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file restores the state of a Index; numpy, pandas and torch pickles restore only arrays, ")):
        restricted_pickle.loads(b"\x80\x02" + index + b"}(" + _text("_data") + b"]ub.")


class _Rebuild:
    """Pickles as ``f(*args)`` (or ``f.__new__(f, *args)``), then BUILD ``state``."""

    def __init__(self, f, args, state=None, new_object=False):
        self.f, self.args, self.state, self.new_object = f, args, state, new_object

    def __reduce_ex__(self, protocol):
        import copyreg

        f, args = (copyreg.__newobj__, (self.f, *self.args)) if self.new_object else (self.f, tuple(self.args))
        return (f, args, self.state)


class _Pickler(pickle._Pickler):
    def save_reduce(self, func, args, state=None, listitems=None, dictitems=None, state_setter=None, *, obj=None):
        obj = None if isinstance(obj, _Rebuild) else obj  # no memo check against the stand-in
        return super().save_reduce(func, args, state, listitems, dictitems, state_setter, obj=obj)


def _dumps(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def test_inconsistent_pandas_objects_are_refused():
    from pandas._libs.internals import _unpickle_block
    from pandas.core.internals.managers import SingleBlockManager

    # codes past the categories, a series of 100,000 rows over one value: later indexing read
    # memory past the arrays (crashes, heap pointers returned as data)
    categorical = _Rebuild(pd.Categorical, (), {"_codes": np.array([0, 100_000_000]),
                                                 "_categories": pd.Index(["a"]), "_ordered": False}, True)
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file restores an inconsistent pandas Categorical \(ValueError: 'codes outside -1 \.\. 0'\)$")):
        restricted_pickle.loads(_dumps(categorical))
    block = _Rebuild(_unpickle_block, (np.array([1]), slice(0, 1, 1), 1))
    manager = _Rebuild(SingleBlockManager, (block, pd.Index(np.arange(1000))))
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file restores an inconsistent pandas SingleBlockManager \(ValueError: "
            r"'1 values for an index of 1000'\)$")):
        restricted_pickle.loads(_dumps(manager))
    series = pd.Series([1.0, 2.0], index=["a", "b"])
    pd.testing.assert_series_equal(restricted_pickle.loads(pickle.dumps(series, protocol=2)), series)


def test_a_container_cannot_be_filled_after_it_was_used():
    # an object array built around an empty list that is filled exponentially afterwards: repr
    # of the loaded array took 43 s and 2 GiB
    empty_list = b"]" + _put(0)
    array = (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + b"K\x00\x85C\x01b\x87R"
             + b"(K\x01K\x01\x85" + _global("numpy", "dtype") + _text("O") + b"\x85R\x89]" + _get(0) + b"atb")
    fill = _get(0) + b"(K\x01e"  # APPENDS onto the list the array already holds
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file applies APPENDS to a list it has already used; pickles fill or restore an object before they use it$")):
        restricted_pickle.loads(b"\x80\x02" + empty_list + b"0" + array + fill + b"0.")


def test_expanded_tensors_are_refused(tmp_path):
    import torch

    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(2**40)}, path)
    with pytest.raises(ValueError, match=(
            r"the file holds a tensor of 1099511627776 elements over 1 stored ones \(an expanded view\)")):
        load_model_file(path)


def test_dates_are_rebuilt_through_their_validating_constructor():
    import datetime

    # from a bytes state CPython checks only the month: year 0 loaded, and its ctime() crashed
    with pytest.raises(pickle.UnpicklingError, match=r"^the file holds an invalid date \(year 0 is out of range\)$"):
        restricted_pickle.loads(_dumps(_Rebuild(datetime.date, (b"\x00\x00\x01\x01",))))
    with pytest.raises(pickle.UnpicklingError, match=r"^the file holds an invalid datetime \(year 0 is out of range\)$"):
        restricted_pickle.loads(_dumps(_Rebuild(datetime.datetime, (b"\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00",))))
    moment = datetime.datetime(2024, 5, 6, 7, 8, 9, 10)
    assert restricted_pickle.loads(pickle.dumps(moment, protocol=2)) == moment


def test_frames_series_and_categorical_dtypes_must_be_what_pandas_builds():
    frame = pd.DataFrame({"a": [1.0, 2.0]})
    series = _Rebuild(pd.Series, (), {"_mgr": frame._mgr, "_typ": "series", "_metadata": ["_name"], "attrs": {},
                                      "_flags": {"allows_duplicate_labels": True}, "_name": "s"}, True)
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file restores an inconsistent pandas Series \(ValueError: 'a BlockManager where pandas")):
        restricted_pickle.loads(_dumps(series))
    dtype = _Rebuild(pd.CategoricalDtype, (), {"categories": pd.Index(["a", "a"]), "ordered": False}, True)
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file restores an inconsistent pandas CategoricalDtype \(ValueError: 'Categorical categories must")):
        restricted_pickle.loads(_dumps(dtype))
    good = pd.CategoricalDtype(["a", "b"], ordered=True)
    assert restricted_pickle.loads(pickle.dumps(good, protocol=2)) == good


def test_structured_dtypes_cannot_hide_fields_outside_their_names():
    from numpy.core.multiarray import _reconstruct

    # a field outside `names` is served by name unchecked: an object field over the file's bytes
    # (a crash on access) or a 4096-byte field over an 8-byte buffer (heap read)
    for hidden in ({"b": (np.dtype("O"), 0)}, {"leak": (np.dtype("V4096"), 0)}):
        dtype = _Rebuild(np.dtype, ("V8", False, True),
                         (3, "|", None, ("a",), {"a": (np.dtype("<i8"), 0), **hidden}, 8, 1, 16))
        array = _Rebuild(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), dtype, False, b"\x41" * 8))
        with pytest.raises(pickle.UnpicklingError, match=(
                r"^the file restores a structured dtype with fields \['" + next(iter(hidden)) + r"'\] outside its names$")):
            restricted_pickle.loads(_dumps(array))
    # a title aliasing another type than its name's
    dtype = _Rebuild(np.dtype, ("V8", False, True),
                     (3, "|", None, ("a",), {"a": (np.dtype("<i8"), 0, "b"), "b": (np.dtype("O"), 0, "b")}, 8, 1, 16))
    with pytest.raises(pickle.UnpicklingError, match=r"^the file restores a structured dtype with fields \['b'\] outside"):
        restricted_pickle.loads(_dumps(_Rebuild(_reconstruct, (np.ndarray, (0,), b"b"),
                                                (1, (1,), dtype, False, b"\x41" * 8))))
    # real structured dtypes load: nested, titled, aligned (padding between fields), with offsets,
    # and a view of some fields
    packed = np.zeros(3, dtype=[("x", "<i8"), ("y", "<f4"), ("z", "<f8")])
    for good in (np.zeros(2, dtype=[("a", "<i8"), ("b", [("c", "<f4")])]),
                 np.zeros(2, dtype=[(("title", "a"), "<i4"), ("b", "u1")]),
                 np.zeros(3, dtype=np.dtype([("a", "u1"), ("b", "<i4")], align=True)),
                 np.zeros(2, dtype=np.dtype({"names": ["a", "b"], "formats": ["u1", "<f4"], "offsets": [0, 8],
                                             "itemsize": 16})),
                 packed[["x", "z"]]):
        np.testing.assert_array_equal(restricted_pickle.loads(pickle.dumps(good, protocol=2)), good)


def test_frame_blocks_must_hold_as_many_rows_as_their_columns_say():
    columns = [f"c{i}" for i in range(200)]
    for values in (np.ones((4, 200)), np.full((4, 200), "x", dtype=object)):
        frame = pd.DataFrame(values, columns=columns)
        frame._mgr.blocks[0].values = frame._mgr.blocks[0].values[:1].copy()  # 1 of 200 columns' values
        # reindexing it read past the block (heap pointers as floats, or a crash for objects)
        with pytest.raises(pickle.UnpicklingError, match=(
                r"^the file restores an inconsistent pandas BlockManager \(ValueError: 'a block of 1 x 4 values")):
            restricted_pickle.loads(pickle.dumps(frame, protocol=2))
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"], "c": [3, 4]})
    pd.testing.assert_frame_equal(restricted_pickle.loads(pickle.dumps(frame, protocol=2)), frame)


def test_pandas_objects_must_have_their_state_restored():
    # NEWOBJ Categorical with no BUILD: 79 bytes, and copy() of the result crashed
    data = (b"\x80\x02}q\x00X\x06\x00\x00\x00labelsq\x01" + _global("pandas.core.arrays.categorical", "Categorical")
            + b")\x81s.")
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file builds a pandas Categorical without restoring its state; pandas pickles always restore it")):
        restricted_pickle.loads(data)
    # with their BUILD (pandas 1.x pickled categoricals so) they load
    legacy = _Rebuild(pd.Categorical, (), {"_codes": np.array([0, 1, 0], dtype=np.int8),
                                           "_categories": pd.Index(["a", "b"]), "_ordered": False}, True)
    assert list(restricted_pickle.loads(_dumps(legacy))) == ["a", "b", "a"]
    series = pd.Series([1.0, 2.0], index=["a", "b"])
    pd.testing.assert_series_equal(restricted_pickle.loads(pickle.dumps(series, protocol=2)), series)


def test_tensors_cannot_carry_backward_hooks(tmp_path):
    import collections

    import torch
    import torch._utils

    storage = torch.storage.TypedStorage(wrap_storage=torch.arange(4.0).untyped_storage(), dtype=torch.float32,
                                         _internal=True)
    tensor = _Rebuild(torch._utils._rebuild_tensor_v2, (storage, 0, torch.Size((4,)), (1,), True,
                                                        collections.OrderedDict()))
    parameter = _Rebuild(torch._utils._rebuild_parameter, (tensor, True, collections.OrderedDict([(0, torch.Size)])))
    path = tmp_path / "hooks.pt"
    torch.save({"p": parameter, "registry": collections.defaultdict(list)}, path)
    with pytest.raises(ValueError, match=r"the file attaches backward hooks to a tensor \(callables it chose"):
        load_model_file(path)


def _zip_copy(source, target, compress=False, shared=None):
    """Rewrite a torch zip: deflated records, or the record ``shared`` also listed under 3 more names."""
    import struct
    import zipfile

    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", method) as zout:
        for info in zin.infolist():
            zout.writestr(zipfile.ZipInfo(info.filename), zin.read(info.filename), compress_type=method)
    if shared is None:
        return
    data = bytearray(target.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HII", data[end + 10:end + 20])
    directory, entries, pos = bytes(data[offset:offset + size]), [], 0
    while pos < len(directory):
        lengths = struct.unpack("<HHH", directory[pos + 28:pos + 34])
        entries.append(directory[pos:pos + 46 + sum(lengths)])
        pos += 46 + sum(lengths)
    name = next(e[46:46 + struct.unpack("<H", e[28:30])[0]] for e in entries if e[46:].startswith(shared.encode()))
    extra = [next(e for e in entries if e[46:].startswith(name)).replace(name, name[:-1] + d) for d in (b"1", b"2", b"3")]
    new_directory = b"".join(entries + extra)
    tail = bytearray(data[end:end + 22])
    tail[8:20] = struct.pack("<HHII", count + 3, count + 3, len(new_directory), offset)
    target.write_bytes(bytes(data[:offset]) + new_directory + bytes(tail))


def test_zip_records_must_be_stored_once_and_uncompressed(tmp_path):
    import collections

    import torch

    source = tmp_path / "source.pt"
    torch.save({"w": torch.zeros(1000, dtype=torch.uint8), "registry": collections.defaultdict(list)}, source)
    prefix = __import__("zipfile").ZipFile(source).namelist()[0].split("/")[0]
    # deflated: a 973 kB file declared (and torch allocated) 1.28 GB
    compressed = tmp_path / "compressed.pt"
    _zip_copy(source, compressed, compress=True)
    with pytest.raises(ValueError, match=r"is compressed \(\d+ bytes expanding to \d+\); torch\.save stores records"):
        load_model_file(compressed)
    # one record's bytes listed under four names: each storage allocated again from the same bytes
    shared = tmp_path / "shared.pt"
    _zip_copy(source, shared, shared=f"{prefix}/data/0")
    with pytest.raises(ValueError, match=rf"the file's zip records '{prefix}/data/0' and '{prefix}/data/1' share bytes"):
        load_model_file(shared)
    plain = tmp_path / "plain.pt"
    _zip_copy(source, plain)
    assert load_model_file(plain)["w"].shape == (1000,)


def _rebuilt_after_use(obj, target, state) -> bytes:
    """``obj``'s pickle, then BUILD ``target`` (from the memo) with ``state``: a restore after use."""
    import io

    buffer = io.BytesIO()
    pickler = _Pickler(buffer, 2)
    pickler.dump(obj)
    buffer.seek(buffer.tell() - 1)
    buffer.truncate()  # drop STOP
    pickler.save(target)
    pickler.save(state)
    pickler.write(b"b0.")
    return buffer.getvalue()


def test_arrays_and_dtypes_cannot_be_restored_after_use():
    # a series checked over 20,000 values, then its array rebuilt to one: reindex crashed
    series = pd.Series(np.array(["x"] * 20_000, dtype=object))
    values = series._mgr.blocks[0].values
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file applies BUILD to a ndarray it has already used; pickles fill or restore an object")):
        restricted_pickle.loads(_rebuilt_after_use(series, values, (1, (1,), np.dtype("O"), False, ["y"])))
    # an array's dtype rebuilt afterwards as an object field over its bytes: a read at 0x4141...
    array = np.frombuffer(b"\x41" * 8, dtype="V8").copy()
    with pytest.raises(pickle.UnpicklingError, match=r"^the file applies BUILD to a VoidDType it has already used"):
        restricted_pickle.loads(_rebuilt_after_use(array, array.dtype, np.dtype([("a", "O")]).__reduce__()[2]))
    # an object array that holds itself (98 bytes): arithmetic recursed in C until it crashed
    data = (b"\x80\x02" + _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
            + b"K\x00\x85C\x01b\x87Rq\x00(K\x01K\x01\x85" + _global("numpy", "dtype")
            + b"X\x01\x00\x00\x00O\x85R\x89]h\x00atb.")
    with pytest.raises(pickle.UnpicklingError, match=r"^the file applies BUILD to a ndarray it has already used"):
        restricted_pickle.loads(data)
    good = [np.arange(3.0), np.array(["a", None], dtype=object), np.zeros(2, dtype=[("x", "<f4")])]
    for value, back in zip(good, restricted_pickle.loads(pickle.dumps(good, protocol=2))):
        np.testing.assert_array_equal(value, back)


def test_categorical_dtypes_cannot_be_restored_after_use():
    # a categorical checked against 2**16 categories, its dtype then restored to one category:
    # codes outside the categories, and a segfault when the values were read
    dtype = pd.CategoricalDtype(pd.RangeIndex(1 << 16))
    categorical = _Rebuild(pd.Categorical, (), {"_codes": np.array([65_535, 3], dtype=np.int32), "_dtype": dtype},
                           True)
    back = restricted_pickle.loads(_dumps(categorical))  # used once, it loads
    assert back.codes.tolist() == [65_535, 3]
    assert len(back.categories) == 1 << 16
    state = {"categories": pd.Index(["x"], dtype=object), "ordered": False}
    with pytest.raises(pickle.UnpicklingError, match=(
            r"^the file applies BUILD to a CategoricalDtype it has already used; pickles fill or restore")):
        restricted_pickle.loads(_rebuilt_after_use(categorical, dtype, state))


def test_numpy_scalars_are_plain_and_exactly_one_item():
    from numpy.core.multiarray import scalar

    object_field = np.dtype([("a", "O")])
    with pytest.raises(pickle.UnpicklingError, match=r"^the file builds a numpy scalar of dtype .*only dtypes without object"):
        restricted_pickle.loads(_dumps(_Rebuild(scalar, (object_field, np.zeros(0, dtype=object_field)))))
    with pytest.raises(pickle.UnpicklingError, match=r"^the file builds a numpy scalar of 8 bytes from 3"):
        restricted_pickle.loads(_dumps(_Rebuild(scalar, (np.dtype("f8"), b"abc"))))
    assert restricted_pickle.loads(pickle.dumps(np.float64(2.5), protocol=2)) == 2.5


@pytest.mark.parametrize("forced_weights_only", [False, True])
def test_weights_only_results_are_checked_too(tmp_path, monkeypatch, forced_weights_only):
    import argparse

    if forced_weights_only:  # torch's weights-only loader reads the file; its result is checked all the same
        monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")

    import torch

    # torch's weights-only loader accepts each of these; perturbscope walks its result
    parameter = torch.nn.Parameter(torch.zeros(4))
    parameter.__array_interface__ = {"shape": (4,), "typestr": "|O", "data": (0x41414141, False), "version": 3}
    sparse = torch.sparse_coo_tensor(torch.tensor([[10**9, 5]]), torch.tensor([1.0, 2.0]), (4,), check_invariants=False)
    cases = {
        "dunder": ({"w": parameter}, r"the file sets the attributes \['__array_interface__'\]"),
        "set": ({"w": {torch.zeros(1).expand(2**36)}}, r"a tensor of 68719476736 elements over 1 stored ones"),
        # refused before torch runs it: model files need no sparse rebuild
        "sparse": ({"w": [sparse]}, r"the file asks to call or build `torch\._utils\._rebuild_sparse_tensor`"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        with pytest.raises(ValueError, match=message):
            load_model_file(path)
    namespace = argparse.Namespace(layers=2)
    namespace.__eq__ = 1
    path = tmp_path / "namespace.pt"
    torch.save({"args": namespace, "w": torch.ones(1)}, path)
    with pytest.raises(ValueError, match=r"the file sets the attributes \['__eq__'\]"):
        load_model_file(path, allow="esm")
    torch.save({"args": argparse.Namespace(layers=2), "w": torch.nn.Parameter(torch.ones(2))}, path)
    assert load_model_file(path, allow="esm")["args"].layers == 2


class _ConvertedWhileLoading:
    """Pickles as torch's ``_rebuild_device_tensor_from_cpu_tensor`` over an expanded one-byte view."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        import torch

        view = torch.zeros(1, dtype=torch.uint8).expand(self.n)
        return (torch._utils._rebuild_device_tensor_from_cpu_tensor, (view, torch.float64, "cpu", False))


def _rewritten_zip(source, target, rename=None, edit=None) -> None:
    """A copy of torch zip ``source`` with its pickle record renamed and/or its bytes edited."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            name, data = info.filename, zin.read(info.filename)
            if name.endswith("/data.pkl"):
                data = edit(data) if edit else data
                name = rename(name) if rename else name
            zout.writestr(zipfile.ZipInfo(name), data)


def test_globals_that_compute_while_loading_are_refused_before_torch_runs_them(tmp_path, memory_headroom):
    # torch's weights-only loader runs these: a 1.6 kB file came back as a dense 1 GiB float64
    # tensor (the conversion ran inside torch, so the expanded view was gone before any check),
    # and a 785-byte one as torch.DoubleTensor(n), unfilled memory holding heap pointers
    import struct

    import torch

    from perturbscope._safe_load import load_weights_file

    converted = tmp_path / "converted.pt"
    torch.save({"w": _ConvertedWhileLoading(1 << 27)}, converted)
    assert converted.stat().st_size < 4096
    torch.save({"w": 0}, tmp_path / "zero.pt")
    rebuild = "`torch._utils._rebuild_device_tensor_from_cpu_tensor`"
    cases = {
        "converted.pt": rebuild,
        # the record name in capitals: torch's zip reader still finds it as data.pkl
        "case.pt": (converted, {"rename": lambda name: name[:-8] + "DATA.PKL"}, rebuild),
        # the global's name split elsewhere: torch joins module and name into the same key
        "split.pt": (converted, {"edit": lambda data: data.replace(
            b"ctorch._utils\n_rebuild_device_tensor_from_cpu_tensor\n",
            b"ctorch\n_utils._rebuild_device_tensor_from_cpu_tensor\n")}, rebuild),
        "legacy_constructor.pt": (tmp_path / "zero.pt", {"edit": lambda data: (
            b"\x80\x02}X\x01\x00\x00\x00wctorch\nDoubleTensor\nJ" + struct.pack("<i", 1 << 27) + b"\x85Rs.")},
            "`torch.DoubleTensor`"),
    }
    for name, case in cases.items():
        if isinstance(case, tuple):
            source, edits, named = case
            _rewritten_zip(source, tmp_path / name, **edits)
        else:
            named = case
        message = (rf"refusing to load .*{name}': the file asks to call or build {re.escape(named)}, which is not on "
                   r"perturbscope's allow-list of globals such a file needs")
        for load in (load_model_file, load_weights_file):
            with memory_headroom(), pytest.raises(ValueError, match=message):
                load(tmp_path / name)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(3)), "b": torch.arange(2), "h": torch.ones(2, dtype=torch.bfloat16)},
               plain)
    assert load_weights_file(plain)["w"].tolist() == [1.0, 1.0, 1.0]
    assert load_model_file(plain)["b"].tolist() == [0, 1]


def test_torch_files_are_read_with_the_guards_of_the_restricted_unpickler(tmp_path):
    # torch's weights-only loader, which read these first, has none of the guards: 851 bytes
    # allocated 2 GiB, nested tuples crashed it (segfault), shared ones hashed 2**40 nodes, and
    # a punycode call took 38 s
    import struct

    from perturbscope._safe_load import load_weights_file

    text = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(2000)).encode()
    cases = {
        "bytearray": (b"\x80\x02}X\x01\x00\x00\x00w](" + (b"cbuiltins\nbytearray\nJ" + struct.pack("<i", 1 << 30)
                                                           + b"\x85R") * 2 + b"es.",
                      r"the file asks for `bytearray\(1073741824\)`, a zero-filled buffer of a given size"),
        "nested": (b"\x80\x02}K\x00" + b"\x85" * 3000 + b"K\x00s.", r"the file builds a tuple of 102 nodes .* nested 101 deep"),
        "shared": (b"\x80\x02}K\x00q\x00" + b"h\x00\x86q\x00" * 40 + b"K\x00s.",
                   r"the file builds a tuple of \d+ nodes \(shared parts counted each time they occur\)"),
        "punycode": (b"\x80\x02}X\x01\x00\x00\x00wc_codecs\nencode\nX" + struct.pack("<I", len(text)) + text
                     + b"X\x08\x00\x00\x00punycode\x86Rs.", r"the file calls encode with the codec 'punycode'"),
    }
    for name, (data, message) in cases.items():
        _torch_file_with_records(tmp_path / f"{name}.pt", data, {})
        for load in (load_model_file, load_weights_file):
            with pytest.raises(ValueError, match=rf"refusing to load .*{name}\.pt': {message}"):
                load(tmp_path / f"{name}.pt")
    # where the environment forces torch's loader, what it would call unguarded is refused by name
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
        for name, unguarded in (("bytearray", "builtins.bytearray"), ("punycode", "_codecs.encode")):
            with pytest.raises(ValueError, match=rf"cannot load .*{name}\.pt': the file asks to call or build "
                                                 rf"`{re.escape(unguarded)}`"):
                load_weights_file(tmp_path / f"{name}.pt")
        # and so is what that loader would build unmeasured: nested or shared past the caps
        for name, message in (("nested", r"can build structures nested 3001 deep; perturbscope allows 100 levels"),
                              ("shared", r"can build a structure of \d+ nodes \(shared parts counted each time")):
            with pytest.raises(ValueError, match=rf"cannot load .*{name}\.pt': the file's pickle {message}"):
                load_weights_file(tmp_path / f"{name}.pt")


def _two_directory_archive(target, n_bytes: int, copies: int) -> None:
    """A torch archive with two central directories: torch's reader reads the one the end record
    states (a deflated ``n_bytes`` storage under ``copies`` names), Python's the decoy just before
    the end record, which it takes for a zip appended to other data (one empty record)."""
    import io
    import struct
    import zipfile

    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4, dtype=torch.uint8)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))

    def tensor(i):
        return (f"X\x02\x00\x00\x00w{i}".encode() + b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
                b"ctorch\nByteStorage\nX\x01\x00\x00\x00" + str(i).encode() + b"X\x03\x00\x00\x00cpuJ"
                + struct.pack("<i", n_bytes) + b"tQK\x00J" + struct.pack("<i", n_bytes)
                + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR")

    data = b"\x80\x02}(" + b"".join(tensor(i) for i in range(copies)) + b"u."
    built = io.BytesIO()
    with zipfile.ZipFile(built, "w") as out:
        for info in source.infolist():
            if info.filename.endswith("/data.pkl"):
                out.writestr(zipfile.ZipInfo(info.filename), data)
            elif info.filename.endswith("/data/0"):
                out.writestr(zipfile.ZipInfo(info.filename), bytes(n_bytes), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(zipfile.ZipInfo(info.filename), source.read(info.filename))
    archive = built.getvalue()
    end = archive.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<II", archive[end + 12:end + 20])
    directory, entries, position = archive[offset:offset + size], [], 0
    while position < len(directory):
        lengths = struct.unpack("<HHH", directory[position + 28:position + 34])
        entries.append(directory[position:position + 46 + sum(lengths)])
        position += 46 + sum(lengths)
    first = next(e for e in entries if e[46:].split(b"\x00")[0].endswith(b"/data/0"))
    prefix = first[46:46 + struct.unpack("<H", first[28:30])[0]].rsplit(b"/data/0", 1)[0]
    entries += [first.replace(prefix + b"/data/0", prefix + f"/data/{i}".encode()) for i in range(1, copies)]
    directory, body = b"".join(entries), archive[:offset]
    local = b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"d"
    shift = len(body) + len(directory) + len(local) - offset
    decoy = (b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, len(directory) - 47,
                                          0, 0, 0, len(body) + len(directory) - shift) + b"d" + b" " * (len(directory) - 47))
    tail = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(directory), offset, 0)
    target.write_bytes(body + directory + local + decoy + tail)


def test_zip_archives_with_a_second_central_directory_are_refused(tmp_path):
    # Python's zipfile read the decoy (every record check passed); torch's reader read four names
    # for one deflated 256 MiB record: 1 GiB from 263 kB
    import zipfile

    import torch

    path = tmp_path / "two_directories.pt"
    _two_directory_archive(path, 1 << 20, 4)
    assert zipfile.ZipFile(path).namelist() == ["d"]
    assert len(torch._C.PyTorchFileReader(str(path)).get_all_records()) > 4
    with pytest.raises(ValueError, match=(
            r"refusing to load .*two_directories\.pt': the file's zip central directory is not where its end record "
            r"places it \(data before or inside the archive\); torch and Python would read different records")):
        load_model_file(path)


def _torch_file_with_records(target, data: bytes, records: dict[str, bytes]) -> None:
    """A ``torch.save`` archive whose data.pkl is ``data``, with storage ``records`` beside it."""
    import io
    import zipfile

    import torch

    buffer = io.BytesIO()
    torch.save({"w": 0}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            if info.filename.endswith("/data.pkl"):
                out.writestr(zipfile.ZipInfo(info.filename), data)
                for key, body in records.items():
                    out.writestr(zipfile.ZipInfo(info.filename[:-8] + "data/" + key), body)
            else:
                out.writestr(zipfile.ZipInfo(info.filename), source.read(info.filename))


def _unicode(value: bytes) -> bytes:
    import struct

    return b"X" + struct.pack("<I", len(value)) + value


def _rebuilt_tensor(storage_global: bytes, n: int) -> bytes:
    return (b"ctorch._utils\n_rebuild_tensor_v2\n((" + _unicode(b"storage") + storage_global + _unicode(b"0") + _unicode(b"cpu")
            + b"K" + bytes([n]) + b"tQK\x00K" + bytes([n]) + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR")


def test_storages_hooks_and_quantised_tensors_are_refused_where_torch_would_take_them(tmp_path):
    import struct

    from perturbscope._safe_load import load_weights_file

    # a storage key shared exponentially (1 kB): torch hashed and formatted it, 24 s and 2.2 GiB,
    # and quoted it in a 335 MB error message
    shared = b"K\x00q\x00" + b"h\x00\x86q\x00" * 26
    key = b"\x80\x02}" + _unicode(b"w") + b"(" + _unicode(b"storage") + b"ctorch\nFloatStorage\n" + shared + _unicode(b"cpu") + b"K\x01tQs."
    _torch_file_with_records(tmp_path / "key.pt", key, {"0": bytes(4)})
    with pytest.raises(ValueError, match=r"the file names a storage by a tuple .* that is not a short tuple of texts"):
        load_weights_file(tmp_path / "key.pt")
    # a parameter whose state installs a post-accumulate-grad hook (run by the next backward)
    state = b"}(" + _unicode(b"_post_accumulate_grad_hooks") + b"}K\x00cdatetime\ntimedelta\nsu"
    parameter = (b"ctorch._utils\n_rebuild_parameter_with_state\n(" + _rebuilt_tensor(b"ctorch\nFloatStorage\n", 2)
                 + b"\x88ccollections\nOrderedDict\n)R" + state + b"tR")
    _torch_file_with_records(tmp_path / "hook.pt", b"\x80\x02}" + _unicode(b"w") + parameter + b"s.",
                             {"0": struct.pack("<2f", 1, 2)})
    with pytest.raises(ValueError, match=r"the file sets the private attributes \['_post_accumulate_grad_hooks'\] on a"):
        load_model_file(tmp_path / "hook.pt")
    # a quantised storage named through STACK_GLOBAL (torch maps any "...Storage" to a storage type)
    quantised = _rebuilt_tensor(_unicode(b"anything") + _unicode(b"QInt8Storage") + b"\x93", 4)
    _torch_file_with_records(tmp_path / "quantised.pt", b"\x80\x02}" + _unicode(b"w") + quantised + b"s.",
                             {"0": bytes(4)})
    with pytest.raises(ValueError, match=r"the file asks to call or build `anything\.QInt8Storage`, which is not on"):
        load_weights_file(tmp_path / "quantised.pt")


def test_the_global_scan_reads_stack_globals_as_the_unpickler_would():
    import pickle as pickle_module

    from perturbscope._pickle_budget import named_globals

    # protocol 4 names globals with STACK_GLOBAL over memoised texts: read, in order
    data = pickle_module.dumps([pd.Index, pd.Index, np.dtype], protocol=4)
    assert list(named_globals(data)) == ["pandas.core.indexes.base.Index", "numpy.dtype"]
    # a name built from anything but texts is refused: the scan could not check it
    hidden = b"\x80\x04" + _unicode(b"torch") + b"\x94" + b"N" + b"\x93."
    with pytest.raises(pickle_module.UnpicklingError, match=r"^the file names a global \(STACK_GLOBAL\) by values that"):
        list(named_globals(hidden))
    with pytest.raises(pickle_module.UnpicklingError, match=r"^the file's pickle uses the INST opcode"):
        list(named_globals(b"(ibuiltins\nprint\n."))


class _BytesOf:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (bytes, (self.value,))


def test_tensors_are_checked_where_they_are_made(tmp_path):
    # bytes(<expanded tensor>) iterated 3,000,000 views of one stored byte: 2.1 GiB from 1.6 kB;
    # and an expanded tensor kept as a dict key, in a slice or in an object array was returned
    import torch

    from perturbscope._safe_load import load_weights_file

    big = torch.zeros(1, dtype=torch.uint8).expand(3_000_000)
    holder = np.empty(1, dtype=object)
    holder[0] = big
    cases = {"bytes": {"w": _BytesOf(big)}, "key": {big: "w"}, "slice": {"w": slice(big, None)}, "array": {"w": holder}}
    for name, payload in cases.items():
        torch.save(payload, tmp_path / f"{name}.pt")
        load = load_model_file if name == "array" else load_weights_file
        with pytest.raises(ValueError, match=r"the file holds a tensor of 3000000 elements over 1 stored ones"):
            load(tmp_path / f"{name}.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"^the file asks for `bytes` of a int64; pickles build it from"):
        restricted_pickle.loads(pickle.dumps(_BytesOf(np.int64(3 << 30)), protocol=2))


def test_blocks_are_not_placed_at_negative_columns():
    from pandas._libs.internals import _unpickle_block

    with pytest.raises(pickle.UnpicklingError, match=r"^the file places a pandas block at negative columns"):
        restricted_pickle.loads(_dumps(_Rebuild(_unpickle_block, (np.ones((2, 3)), np.array([-1, 0]), 2))))
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"], "c": [1, 2]})
    pd.testing.assert_frame_equal(restricted_pickle.loads(pickle.dumps(frame, protocol=2)), frame)
