import pickle
import re
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from perturbscope._safe_load import ALLOW_LISTS, load_pickle_file, restricted_pickle
from perturbscope.probe import load_census_scvi, load_model_file


@pytest.fixture(scope="module")
def census_layout(tmp_path_factory):
    """``(folder, model, None)``: a tiny SCVI saved as a Census-style folder (only model.pt)."""
    import anndata as ad
    import scvi

    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.poisson(2.0, (60, 15)).astype(np.float32))
    adata.var_names = [f"g{i}" for i in range(15)]
    adata.obs["batch"] = np.where(np.arange(60) % 2 == 0, "b1", "b2")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=2, n_hidden=8)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(str(folder), save_anndata=False)
    return folder, model, None


class _PrintPayload:
    def __reduce__(self):
        return (print, ("pwned",))


class _SystemPayload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_loads_a_saved_scvi_model(census_layout):
    folder, model, _ = census_layout
    payload = load_model_file(folder / "model.pt")
    assert set(payload) == {"model_state_dict", "var_names", "attr_dict"}
    assert list(payload["var_names"]) == list(model.adata.var_names)
    state = model.module.state_dict()
    for key, value in payload["model_state_dict"].items():
        if key != "pyro_param_store":  # scvi-tools stores an empty Pyro entry
            torch.testing.assert_close(value, state[key])
    assert payload["attr_dict"]["registry_"]["setup_args"]["batch_key"] == "batch"


@pytest.mark.parametrize(
    ("payload", "name"), [(_PrintPayload, "print"), (_SystemPayload, "system")]
)
def test_refuses_a_payload_that_calls_code(tmp_path, capfd, payload, name):
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": {}, "var_names": np.array(["a"]), "attr_dict": payload()}, path)
    with pytest.raises(
        ValueError, match=rf"refusing to load .*{name}.*not on perturbscope's allow-list"
    ):
        load_model_file(path)
    assert "pwned" not in capfd.readouterr().out


def test_census_loader_refuses_a_malicious_model_pt(tmp_path, capfd):
    import anndata as ad

    query = ad.AnnData(np.ones((2, 2), dtype=np.float32))
    torch.save({"model_state_dict": {}, "attr_dict": _PrintPayload()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*print"):
        load_census_scvi(tmp_path, query, gene_id_column="ensembl_id")
    with open(tmp_path / "model.pt", "wb") as handle:
        pickle.dump(_PrintPayload(), handle)  # a bare pickle, as an attacker could also ship
    with pytest.raises(ValueError, match=r"refusing to load .*not in torch's zip format"):
        load_census_scvi(tmp_path, query, gene_id_column="ensembl_id")
    assert "pwned" not in capfd.readouterr().out


def _legacy_torch_file(numels: list[int]) -> bytes:
    """torch's pre-1.6 format: storages declared at ``numels`` elements, none of them written."""
    import collections
    import io

    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, tuple) and obj and obj[0] == "STORAGE":
                return ("storage", torch.FloatStorage, obj[1], "cpu", obj[2], None)
            return None

    class Tensor:
        def __init__(self, key, numel):
            self.key, self.numel = key, numel

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (("STORAGE", self.key, self.numel), 0, (self.numel,), (1,), False, collections.OrderedDict()))

    out = io.BytesIO()
    sizes = {"short": 2, "int": 4, "long": 4}
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                                                     "type_sizes": sizes}):
        pickle.dump(header, out, protocol=2)
    Pickler(out, protocol=2).dump({f"w{i}": Tensor(str(i), n) for i, n in enumerate(numels)})
    pickle.dump([], out, protocol=2)  # no storage is listed, so torch reads none of them
    return out.getvalue()


def test_legacy_torch_format_is_refused_before_torch_allocates(tmp_path):
    """A 300-byte file in torch's old format declared a 3 GiB storage and got it, unfilled (stale heap)."""
    path = tmp_path / "model.pt"
    path.write_bytes(_legacy_torch_file([3 << 28]))
    assert path.stat().st_size < 400
    with pytest.raises(ValueError, match=r"refusing to load .*not in torch's zip format \(torch.save's default"):
        load_model_file(path)


def test_plain_state_dict_loads_with_weights_only(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, path)
    torch.testing.assert_close(load_model_file(path)["w"], torch.ones(3))


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="model.pt"):
        load_model_file(path)


def test_force_weights_only_env_gives_a_clear_error(census_layout, monkeypatch):
    folder, _, _ = census_layout
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD=1") as info:
        load_model_file(folder / "model.pt")
    message = str(info.value)
    assert re.search(  # refused before torch reads it: the scVI registry needs `_codecs.encode`
        r"cannot load .*model\.pt': the file asks to call or build `_codecs\.encode`, which is not on "
        r"perturbscope's allow-list .* The environment sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, so torch's "
        r"weights-only loader would read it .* which also blocks perturbscope's restricted unpickler",
        message,
    )
    numpy_only = folder.parent / "numpy.pt"  # nothing the scan refuses: torch's loader refuses the defaultdict
    torch.save({"w": torch.ones(2), "registry": defaultdict(list)}, numpy_only)
    with pytest.raises(ValueError, match=(
            r"cannot load .*numpy\.pt': torch's weights-only loader refuses it \(it holds `[\w.]+`\), and the "
            r"environment sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, which also blocks perturbscope's restricted unpickler")):
        load_model_file(numpy_only)
    assert "weights_only=False" not in message
    assert "weights_only` set to `False" not in message
    # a plain state dict is still read by torch's weights-only loader
    torch.save({"w": torch.ones(2)}, folder.parent / "w.pt")
    torch.testing.assert_close(load_model_file(folder.parent / "w.pt")["w"], torch.ones(2))


def test_no_message_advises_weights_only_false(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"attr_dict": _PrintPayload()}, path)
    with pytest.raises(ValueError, match=r"`__builtin__\.print`") as info:
        load_model_file(path)
    assert "weights_only" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt' does not exist"):
        load_model_file(tmp_path / "absent.pt")


def test_unknown_allow_list(tmp_path):
    with pytest.raises(ValueError, match=r"allow must be one of \['esm', 'scvi'\], got 'all'"):
        load_model_file(tmp_path / "x.pt", allow="all")


def _legacy(obj, old: bytes, new: bytes) -> bytes:
    """Pickle ``obj`` (protocol 2) and rename one GLOBAL, as pandas 1.x wrote it."""
    data = pickle.dumps(obj, protocol=2)
    assert old in data
    return data.replace(old, new)


@pytest.mark.parametrize(
    ("cls", "values", "dtype"),
    [
        (b"Int64Index", [3, 1, 2], "int64"),
        (b"UInt64Index", [3, 1, 2], "uint64"),
        (b"Float64Index", [0.5, 1.5], "float64"),
    ],
)
def test_legacy_pandas_indexes_map_to_index(cls, values, dtype):
    index = pd.Index(np.array(values, dtype=dtype), name="epoch")
    data = _legacy(
        index,
        b"pandas.core.indexes.base\nIndex\n",
        b"pandas.core.indexes.numeric\n" + cls + b"\n",
    )
    with pytest.raises(ModuleNotFoundError, match="pandas.core.indexes.numeric"):
        pickle.loads(data)  # what scvi-tools' own loader hits under pandas 2
    loaded = restricted_pickle.loads(data)
    pd.testing.assert_index_equal(loaded, index)


def test_legacy_frame_with_int64_index_in_a_torch_file(tmp_path):
    frame = pd.DataFrame({"elbo": [3.0, 2.0]}, index=pd.Index([0, 1], name="epoch"))
    path = tmp_path / "model.pt"
    torch.save({"history_": frame}, path, pickle_protocol=2)
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    key = next(n for n in members if n.endswith("data.pkl"))
    assert b"pandas.core.indexes.base\nIndex\n" in members[key]
    members[key] = members[key].replace(
        b"pandas.core.indexes.base\nIndex\n", b"pandas.core.indexes.numeric\nInt64Index\n"
    )
    with zipfile.ZipFile(path, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    pd.testing.assert_frame_equal(load_model_file(path)["history_"], frame)


class _HugeBytes:
    def __reduce__(self):
        return (bytes, (10**12,))


class _HugeArray:
    def __reduce__(self):
        from numpy.core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (10**6, 10**6), b"b"))


def test_size_bombs_are_refused_before_allocating():
    with pytest.raises(pickle.UnpicklingError, match=r"`bytes\(1000000000000\)`, a zero-filled"):
        restricted_pickle.loads(pickle.dumps(_HugeBytes(), protocol=2))
    with pytest.raises(
        pickle.UnpicklingError,
        match=r"empty array of shape \(1000000, 1000000\) and dtype int8, over perturbscope's cap of 1048576",
    ):
        restricted_pickle.loads(pickle.dumps(_HugeArray(), protocol=2))


class _ShortObjectArray:
    """An object array whose state declares 127 values and holds 3 (numpy fills it blindly)."""

    def __reduce__(self):
        from numpy.core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (127,), np.dtype("O"), False, [1, 2, 3]))


def test_object_array_state_shorter_than_its_shape_is_refused_not_a_crash():
    # numpy's own __setstate__ crashes the interpreter on this state (a segmentation fault), so
    # the load runs in a child process: a regression fails this test instead of killing the run
    code = (
        f"import pickle, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_safe_load import _ShortObjectArray\n"
        "from perturbscope._safe_load import restricted_pickle\n"
        "try:\n    restricted_pickle.loads(pickle.dumps(_ShortObjectArray(), protocol=2))\n"
        "except pickle.UnpicklingError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the file restores an object array of shape (127,) from 3 values"


class _Reduce:
    """Pickles as ``function(*args)``, with ``state`` applied by BUILD when given."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def _forged_object_dtype():
    # a copy of the object dtype whose restored flags say it holds no objects
    return _Reduce(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        # numpy would read the 8 bytes as an object pointer: a crash, or worse
        (lambda: _Reduce(_reconstruct_function(), (np.ndarray, (0,), b"b"),
                         (1, (1,), _forged_object_dtype(), False, b"A" * 8)),
         r"restores dtype object with flags 0 and item size 8, where numpy's own are 63 and 8"),
        # ndarray((2**33,), "u1") asks for 8 GiB from a few bytes
        (lambda: _Reduce(np.ndarray, ((1 << 33,), "u1")), r"calls numpy\.ndarray directly"),
        # one element of a 2 GB dtype, or a million 8 kB subarrays, passes a cap on elements
        (lambda: _Reduce(_reconstruct_function(), (np.ndarray, (1,), np.dtype("V2000000000"))),
         r"shape \(1,\) and dtype \|V2000000000, over perturbscope's cap"),
        # zero-byte elements: no bytes in the file bound the shape
        (lambda: _Reduce(_reconstruct_function(), (np.ndarray, (0,), b"b"), (1, (1 << 40,), np.dtype("V0"), False, b"")),
         r"shape \(1099511627776,\) of zero-byte elements"),
        # list() over a lazy range allocates what the range declares
        (lambda: _Reduce(list, (pd.RangeIndex(1 << 25),)), r"calls list on a RangeIndex"),
    ],
)
def test_crafted_pickles_that_crash_or_allocate_are_refused(payload, message):
    with pytest.raises(pickle.UnpicklingError, match=message):
        restricted_pickle.loads(pickle.dumps(payload(), protocol=2))


def test_setting_attributes_of_a_class_is_refused():
    # BUILD with a class as its target: pd.Index.copy = list for everyone, were it allowed
    data = b"\x80\x02cpandas.core.indexes.base\nIndex\n}X\x04\x00\x00\x00copyc__builtin__\nlist\nsb."
    with pytest.raises(pickle.UnpicklingError, match=r"sets attributes of <class 'pandas\.core\.indexes\.base\.Index'>"):
        restricted_pickle.loads(data)
    assert pd.Index([1, 2]).copy().tolist() == [1, 2]


def test_dunder_attributes_that_make_numpy_read_file_bytes_as_pointers_are_refused(tmp_path):
    """``__array_interface__`` on an allowed object, converted by an allowed pandas.Index, made
    numpy read bytes of the file as object pointers: a segfault (or a read of any address). Run
    in a subprocess, so that a crash fails the test instead of the test run."""
    script = f"""
import pickle, torch, pandas as pd
from collections import OrderedDict
from perturbscope._safe_load import load_model_file, load_pickle_file
od = OrderedDict(); od.__dict__['__array__'] = 1
od.__dict__['__array_interface__'] = {{'data': b'A' * 16, 'shape': (2,), 'typestr': '|O', 'version': 3}}
class Call:
    def __reduce__(self):
        return (pd.Index, (od,))
open({str(tmp_path / 'x.pkl')!r}, 'wb').write(pickle.dumps({{'registry': Call()}}, protocol=2))
torch.save({{'registry': Call()}}, {str(tmp_path / 'x.pt')!r})
for path, load in (({str(tmp_path / 'x.pkl')!r}, load_pickle_file), ({str(tmp_path / 'x.pt')!r}, load_model_file)):
    try:
        load(path)
        print('LOADED')
    except ValueError as error:
        print('REFUSED', 'dunder attributes change how numpy and pandas read it' in str(error))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["REFUSED", "True", "REFUSED", "True"]


def _reconstruct_function():
    from numpy.core.multiarray import _reconstruct

    return _reconstruct


def test_protocol_5_bytearray_is_refused_before_allocating():
    # BYTEARRAY8 declaring 2**40 bytes: Python's unpickler would allocate them before reading
    data = b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"."
    with pytest.raises(pickle.UnpicklingError, match=r"^the file holds a protocol-5 bytearray"):
        restricted_pickle.loads(data)


def test_numpy_arrays_round_trip_through_the_allow_list():
    value = {"a": np.arange(5), "b": np.array(["x", "y"], dtype=object), "c": np.float32(2)}
    loaded = restricted_pickle.loads(pickle.dumps(value, protocol=2))
    np.testing.assert_array_equal(loaded["a"], value["a"])
    np.testing.assert_array_equal(loaded["b"], value["b"])
    assert loaded["c"] == np.float32(2)


def test_plain_pickle_file(tmp_path):
    path = tmp_path / "attr.pkl"
    path.write_bytes(pickle.dumps(_PrintPayload()))
    with pytest.raises(ValueError, match=r"refusing to load .*attr\.pkl.*builtins\.print"):
        load_pickle_file(path)


def test_real_scvi_0_16_model_under_pandas_2(shared_data):
    path = shared_data / "models" / "scarches_pancreas_scvi" / "model.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    payload = load_model_file(path)
    assert payload["attr_dict"]["registry_"]["scvi_version"] == "0.16.1"
    assert payload["attr_dict"]["history_"]["elbo_train"].index.dtype == np.int64
    assert len(payload["var_names"]) == 1000


def test_pandas_objects_round_trip_through_the_allow_list():
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})  # a RangeIndex
    series = pd.Series([0.5, 1.5], index=pd.Index(["p", "q"], name="k"))
    loaded = restricted_pickle.loads(pickle.dumps({"f": frame, "s": series}, protocol=2))
    pd.testing.assert_frame_equal(loaded["f"], frame)
    pd.testing.assert_series_equal(loaded["s"], series)


class _HugeRange:
    def __reduce__(self):
        return (pd.Series, (1.0, pd.RangeIndex(10**12)))


def test_broadcast_over_a_huge_range_is_refused():
    with pytest.raises(pickle.UnpicklingError, match=r"RangeIndex of 1000000000000 entries"):
        restricted_pickle.loads(pickle.dumps(_HugeRange(), protocol=2))


# --- fuzzing: random opcode streams and truncated real pickles --------------------------------
# restricted_pickle.loads documents one exception type, pickle.UnpicklingError (refused globals
# and malformed streams alike); load_model_file documents ValueError (and FileNotFoundError).

_FUZZ_EXAMPLES = 400


def _failure(load) -> Exception | None:
    """The documented error ``load()`` raised, or ``None``."""
    try:
        load()
    except (ValueError, pickle.UnpicklingError) as err:
        return err
    return None


def _ran_out_of_memory(err: BaseException | None) -> bool:
    """Whether ``err`` was raised because an allocation failed (it or a cause a MemoryError)."""
    while err is not None:
        if isinstance(err, MemoryError):
            return True
        err = err.__cause__
    return False


_GLOBALS = [
    f"c{mod}\n{name}\n".encode()
    for mod, name in sorted(ALLOW_LISTS["scvi"])
    + [("os", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen")]
]


def _opcode_streams():
    import pickletools

    st = pytest.importorskip("hypothesis").strategies
    codes = [op.code.encode("latin-1") for op in pickletools.opcodes]
    piece = st.one_of(
        st.tuples(st.sampled_from(codes), st.binary(max_size=6)).map(lambda t: t[0] + t[1]),
        st.sampled_from(_GLOBALS),
        st.integers(-(2**31), 2**31 - 1).map(lambda i: b"J" + i.to_bytes(4, "little", signed=True)),
        st.sampled_from([b"(", b"t", b"R", b"b", b"\x81", b"}", b"]", b"e", b"s", b"u", b")"]),
    )
    return st.lists(piece, max_size=40).map(lambda parts: b"\x80\x02" + b"".join(parts) + b".")


def test_fuzz_random_opcode_streams(memory_headroom):
    hypothesis = pytest.importorskip("hypothesis")

    ran: list[int] = []

    @hypothesis.settings(max_examples=_FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True)
    @hypothesis.given(_opcode_streams())
    def check(data: bytes) -> None:
        ran.append(1)
        failure = _failure(lambda: restricted_pickle.loads(data))
        assert not _ran_out_of_memory(failure), failure

    with memory_headroom():
        check()
    print(f"FUZZ {len(ran)} examples")
    assert len(ran) >= 50


def test_fuzz_random_bytes(memory_headroom):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    ran: list[int] = []

    @hypothesis.settings(max_examples=_FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True)
    @hypothesis.given(st.binary(max_size=200))
    def check(data: bytes) -> None:
        ran.append(1)
        failure = _failure(lambda: restricted_pickle.loads(data))
        assert not _ran_out_of_memory(failure), failure

    with memory_headroom():
        check()
    print(f"FUZZ {len(ran)} examples")
    assert len(ran) >= 50


@pytest.fixture(scope="module")
def real_pickle(census_layout) -> tuple[bytes, bytes]:
    """``(data.pkl of a saved scVI model.pt, the whole model.pt)``."""
    folder, _, _ = census_layout
    blob = (folder / "model.pt").read_bytes()
    with zipfile.ZipFile(folder / "model.pt") as archive:
        key = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return archive.read(key), blob


def test_fuzz_truncated_real_pickles(real_pickle, tmp_path, memory_headroom):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    data, blob = real_pickle
    path = tmp_path / "model.pt"

    ran: list[int] = []

    @hypothesis.settings(max_examples=_FUZZ_EXAMPLES // 2, deadline=None, database=None, derandomize=True)
    @hypothesis.given(st.integers(0, len(data) - 1), st.integers(0, len(blob) - 1))
    def check(cut: int, cut_file: int) -> None:
        ran.append(1)
        # data.pkl refers to tensor storages by persistent id, which a plain unpickler refuses
        with pytest.raises(pickle.UnpicklingError):
            restricted_pickle.loads(data[:cut])
        path.write_bytes(blob[:cut_file])
        with pytest.raises(ValueError, match=r"model\.pt"):
            load_model_file(path)

    with memory_headroom():
        check()
    print(f"FUZZ {len(ran)} examples")
    assert len(ran) >= 50


def test_fuzz_flipped_bytes_in_a_real_model_file(real_pickle, tmp_path, memory_headroom):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    data, blob = real_pickle
    path = tmp_path / "model.pt"
    start = blob.index(b"data.pkl") + 40  # inside the pickle record of the zip

    ran: list[int] = []

    @hypothesis.settings(max_examples=_FUZZ_EXAMPLES // 4, deadline=None, database=None, derandomize=True)
    @hypothesis.given(st.integers(start, start + len(data) - 1), st.integers(0, 255))
    def check(position: int, value: int) -> None:
        ran.append(1)
        changed = bytearray(blob)
        changed[position] = value
        path.write_bytes(bytes(changed))
        failure = _failure(lambda: load_model_file(path))
        assert not _ran_out_of_memory(failure), f"byte {position} set to {value}: {failure}"

    with memory_headroom():
        check()
    print(f"FUZZ {len(ran)} examples")
    assert len(ran) >= 50
