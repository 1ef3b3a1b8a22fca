"""Property tests (hypothesis) of the entry points that take user input.

* :func:`perturbscope.data.parse_perturbation` on random labels;
* :meth:`perturbscope.ScopeVI.setup_anndata` on random small AnnData;
* :func:`perturbscope.embeddings.read_gene_embeddings` on random and truncated files.

Each property counts the examples it ran and prints the count (``pytest -s`` shows it). Runs are
derandomised so that a failure, and every strict xfail below, reproduces.
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import perturbscope as ps  # noqa: E402
from perturbscope.data import parse_perturbation  # noqa: E402
from perturbscope.embeddings import read_gene_embeddings, write_gene_embeddings  # noqa: E402

FUZZ = dict(deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _outcome(func, allowed, *args, **kwargs):
    """``(result, None)``, or ``(None, error)`` for an exception of the ``allowed`` types (others propagate)."""
    try:
        return func(*args, **kwargs), None
    except allowed as error:
        return None, error


def _report(name: str, count: int) -> None:
    print(f"\n[fuzz] {name}: {count} examples")
    assert count > 0


# ---------------------------------------------------------------- parse_perturbation
_TOKENS = st.one_of(
    st.sampled_from(["A", "B", "KLF1", "SET", " A", "A ", "  ", "", "\t", "control", " control ",
                     "ctrl", "Ä", "γ-1", "a b", "A"]),
    st.text(max_size=4),
)


@st.composite
def _labels(draw):
    delimiter = draw(st.sampled_from(["+", "_", " + ", "|", "++"]))
    control = draw(st.one_of(st.sampled_from(["control", "ctrl", "NT", " control"]), st.text(max_size=3)))
    tokens = draw(st.lists(st.one_of(_TOKENS, st.just(control)), min_size=1, max_size=5))
    label = draw(st.one_of(st.just(delimiter.join(tokens)), st.text(max_size=12), st.just(control)))
    return label, control, delimiter


def test_fuzz_parse_perturbation():
    count = 0

    @settings(max_examples=400, **FUZZ)
    @given(_labels())
    @example(("A++B", "control", "+"))
    @example(("+A", "control", "+"))
    @example(("A+control+A", "control", "+"))
    @example(("control", "control", "+"))
    @example((" A + B ", "control", "+"))
    def prop(case):
        nonlocal count
        count += 1
        label, control, delimiter = case
        genes, refused = _outcome(parse_perturbation, (ValueError,), label, control, delimiter)
        if refused is not None:
            assert str(refused) == (
                f"Perturbation label {label!r} has an empty gene name between {delimiter!r} delimiters."
            )
            assert any(token.strip() == "" for token in label.split(delimiter))
            return
        assert isinstance(genes, tuple)
        assert all(isinstance(g, str) and g and g == g.strip() for g in genes)
        assert len(set(genes)) == len(genes)
        assert control not in genes
        if label == control:
            assert genes == ()
        else:
            assert set(genes) <= {token.strip() for token in label.split(delimiter)}

    prop()
    _report("parse_perturbation", count)


# ---------------------------------------------------------------- setup_anndata
_LABELS = st.one_of(
    st.sampled_from(["control", "control", "A", "B", "A+B", "A + B", " A", "B+control", "A++B", "+A",
                     "Ä", "γ+A", "C", "", "control+control", "A+A", "a b"]),
    st.none(),
    st.just(np.nan),
    st.text(max_size=4),
)
_GENES = ["A", "B", "C", "Ä", "γ", "a b", "D"]
_SETUP_OBS_COLUMNS = {"_scvi_batch", "_scvi_context"}


# one spelling per perturbation ("A" with " A", or "A+B" with "A + B", is refused at setup as a split refuses it)
_CLEAN_LABELS = st.sampled_from(["control", "A", "B", "A + B", "C+control", "Ä", "γ+A", "a b+D"])


@st.composite
def _anndata_cases(draw):
    """``(adata, setup kwargs)``; about half the cases are well-formed, so both outcomes occur."""
    clean = draw(st.booleans())
    if clean:  # every context holds a control cell and a perturbed cell
        labels, contexts = [], []
        for context in draw(st.sampled_from([["x"], ["x", "ü"]])):
            block = ["control", draw(_CLEAN_LABELS.filter(lambda x: x != "control"))]
            block += draw(st.lists(_CLEAN_LABELS, max_size=3))
            labels += draw(st.permutations(block))
            contexts += [context] * len(block)
        n_obs = len(labels)
    else:
        n_obs = draw(st.integers(2, 8))
        labels = draw(st.lists(_LABELS, min_size=n_obs, max_size=n_obs))
        contexts = draw(st.lists(st.sampled_from(["x", "y", "ü", None]), min_size=n_obs, max_size=n_obs))
    n_vars = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.int32, np.int64, np.float32, np.float64]))
    layout = draw(st.sampled_from(["dense", "csr", "csc"]))
    values = draw(st.lists(st.integers(-2, 50), min_size=n_obs * n_vars, max_size=n_obs * n_vars))
    X = np.asarray(values).reshape(n_obs, n_vars).astype(dtype)
    X = {"dense": X, "csr": sparse.csr_matrix(X), "csc": sparse.csc_matrix(X)}[layout]
    obs = pd.DataFrame({"perturbation": pd.Series(labels, dtype=object), "ctx": pd.Series(contexts, dtype=object)})
    if draw(st.booleans()):
        obs["perturbation"] = obs["perturbation"].astype("category")
    context_key = draw(st.sampled_from([None, "ctx"]))
    obs_names = [f"c{i}" for i in range(n_obs)]
    var_names = [f"g{i}" for i in range(n_vars)]
    if not clean and draw(st.booleans()) and n_obs > 1:
        obs_names[-1] = obs_names[0]
    if not clean and draw(st.booleans()) and n_vars > 1:
        var_names[-1] = var_names[0]
    obs.index = obs_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=var_names))
    if clean:
        genes = draw(st.permutations(_GENES))
    else:
        genes = draw(st.lists(st.sampled_from(_GENES), min_size=1, max_size=7))
    dim = draw(st.integers(1, 3))
    table = pd.DataFrame(draw(st.lists(st.floats(-3, 3), min_size=len(genes) * dim, max_size=len(genes) * dim)))
    table = pd.DataFrame(table.to_numpy().reshape(len(genes), dim), index=genes)
    kwargs = dict(
        perturbation_key="perturbation" if clean else draw(st.sampled_from(["perturbation", "missing_column"])),
        control_value="control" if clean else draw(st.sampled_from(["control", "control", "ctrl"])),
        gene_embeddings=table,
        context_key=context_key,
    )
    return adata, kwargs, clean


def test_fuzz_setup_anndata():
    counts = {"ok": 0, "refused": 0}
    types: dict[str, int] = {}

    @settings(max_examples=80, **FUZZ)
    @given(_anndata_cases())
    def prop(case):
        adata, kwargs, clean = case
        obs_before, obsm_before, uns_before = adata.obs.copy(), set(adata.obsm), set(adata.uns)
        X_before = adata.X.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, error = _outcome(ps.ScopeVI.setup_anndata, (ValueError, KeyError, TypeError), adata, **kwargs)
        if error is not None:
            assert str(error).strip(), f"{type(error).__name__} without a message"
            assert not clean, f"a well-formed AnnData was refused: {error}"
            assert list(adata.obs.columns) == list(obs_before.columns)  # refused: nothing written
            assert set(adata.obsm) == obsm_before
            counts["refused"] += 1
            types[type(error).__name__] = types.get(type(error).__name__, 0) + 1
            return
        counts["ok"] += 1
        new_obs = set(adata.obs.columns) - set(obs_before.columns)
        assert new_obs <= _SETUP_OBS_COLUMNS, new_obs
        pd.testing.assert_frame_equal(adata.obs[list(obs_before.columns)], obs_before)
        assert set(adata.obsm) - obsm_before == {"_scopevi_perturbation_genes"}
        assert set(adata.uns) - uns_before == {"_scvi_uuid", "_scvi_manager_uuid"}
        X_after = adata.X.toarray() if sparse.issparse(adata.X) else adata.X
        X_was = X_before.toarray() if sparse.issparse(X_before) else X_before
        np.testing.assert_array_equal(X_after, X_was)
        genes = adata.obsm["_scopevi_perturbation_genes"]
        assert genes.shape[0] == adata.n_obs
        assert (genes >= -1).all()

    prop()
    _report(f"setup_anndata ({counts['ok']} set up, {counts['refused']} refused: {types})",
            counts["ok"] + counts["refused"])
    assert counts["ok"] > 0
    assert counts["refused"] > 0


# ---------------------------------------------------------------- read_gene_embeddings
#: What read_gene_embeddings may raise: its docstring lists FileNotFoundError and ValueError; every
#: reader passes its table through check_gene_embeddings (module docstring), whose TypeError
#: flags non-numeric columns. (pandas' ParserError/EmptyDataError, UnicodeDecodeError and
#: pyarrow's ArrowInvalid are ValueErrors.)
DOCUMENTED = (FileNotFoundError, ValueError, TypeError)
SUFFIXES = [".csv", ".tsv", ".parquet", ".npz", ".pt"]


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """``{suffix: bytes}`` of a valid 6 x 3 table written in each format."""
    folder = tmp_path_factory.mktemp("valid")
    table = pd.DataFrame(np.arange(18, dtype=float).reshape(6, 3) / 7,
                         index=[f"G{i}" for i in range(6)], columns=["d0", "d1", "d2"])
    out = {}
    for suffix in SUFFIXES:
        path = folder / f"emb{suffix}"
        write_gene_embeddings(table, path)
        out[suffix] = path.read_bytes()
    return out


def _file_bytes(valid: bytes):
    truncated = st.integers(0, len(valid)).map(lambda n: valid[:n])
    flipped = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
        lambda iv: valid[: iv[0]] + bytes([iv[1]]) + valid[iv[0] + 1:]
    )
    text = st.text(alphabet="abG0123456789.,;\t\n -+eE\"'nai", max_size=60).map(str.encode)
    return st.one_of(st.binary(max_size=200), truncated, flipped, text)


_PARQUET_REASON = (
    "read_gene_embeddings leaks an undocumented OSError for a corrupted .parquet file: pyarrow "
    "raises OSError ('Corrupt snappy compressed data') for a flipped byte in a column chunk, which "
    "is neither translated to ValueError nor listed in the docstring"
)
_NPZ_REASON = (
    "read_gene_embeddings leaks undocumented exceptions for broken .npz files: an empty file "
    "raises EOFError and a truncated zip raises zipfile.BadZipFile (np.load's own errors are "
    "not translated)"
)


@pytest.mark.parametrize(
    "suffix",
    [".csv", ".tsv", ".pt",
     ".parquet",
     ".npz"],
)
def test_fuzz_read_gene_embeddings(suffix, valid_files, tmp_path):
    valid = valid_files[suffix]
    path = tmp_path / f"fuzz{suffix}"
    counts = {"ok": 0, "refused": 0}
    types: dict[str, int] = {}

    @settings(max_examples=60, **FUZZ)
    @given(_file_bytes(valid))
    @example(b"")
    @example(valid[: len(valid) // 2])
    @example(valid)
    def prop(data):
        path.write_bytes(data)
        table, error = _outcome(read_gene_embeddings, DOCUMENTED, path)
        if error is not None:
            assert str(error).strip()
            counts["refused"] += 1
            types[type(error).__name__] = types.get(type(error).__name__, 0) + 1
            return
        counts["ok"] += 1
        assert isinstance(table, pd.DataFrame)
        assert table.shape[0] > 0
        assert table.shape[1] > 0
        assert (table.dtypes == np.float64).all()
        assert table.index.is_unique
        assert all(isinstance(g, str) for g in table.index)
        assert np.isfinite(table.to_numpy()).all()
        assert table.attrs["path"] == str(path)

    prop()
    _report(f"read_gene_embeddings{suffix} ({counts['ok']} read, {counts['refused']} refused: {types})",
            counts["ok"] + counts["refused"])
    assert counts["ok"] > 0  # the intact file is always among the examples


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_read_broken_npz_documented_error(valid_files, tmp_path, cut):
    """The two .npz failures the fuzzer finds, as plain regression cases."""
    valid = valid_files[".npz"]
    path = tmp_path / "broken.npz"
    path.write_bytes(b"" if cut == "empty" else valid[: len(valid) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_gene_embeddings(path)


def test_read_corrupted_parquet_documented_error(valid_files, tmp_path):
    """The .parquet failure the fuzzer finds, as a plain regression case: zero one byte at a time."""
    valid = valid_files[".parquet"]
    path = tmp_path / "broken.parquet"
    for position in range(100, min(len(valid), 400)):
        path.write_bytes(valid[:position] + b"\x00" + valid[position + 1:])
        _outcome(read_gene_embeddings, DOCUMENTED, path)
