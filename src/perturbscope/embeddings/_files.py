"""Reading and writing gene-embedding tables, and the one validator every source goes through.

A gene embedding is a ``pandas.DataFrame`` with one row per gene (unique string index) and one
float column per dimension. Every reader and every producer in this subpackage passes its result
through :func:`check_gene_embeddings`, so a ragged, duplicated or non-finite table fails where it
is created, with the offending genes named, instead of deep inside a model.

Formats are chosen by file suffix:

* ``.csv`` / ``.tsv`` / ``.txt`` (optionally ``.gz``): genes as rows, the first column is the
  gene name;
* ``.parquet`` / ``.pq``: the index holds the genes (needs ``pyarrow``);
* ``.npz``: arrays ``genes`` (strings) and ``embeddings`` (genes x dims), plus the column names and
  the ``.attrs`` provenance as JSON;
* ``.pt`` / ``.pth``: DeSCOPE's and the Virtual Cell Challenge's ``{gene: 1-D tensor}``
  dictionary, read with :func:`perturbscope._safe_load.load_weights_file` (an allow-list
  unpickler of containers and tensors, after checks of the archive), so no code in the file can
  run.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .._safe_load import load_weights_file
from ..data._checks import check_gene_embeddings
from ..data._checks import preview as _preview

_TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_TORCH_SUFFIXES = {".pt", ".pth"}


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _TEXT_SUFFIXES:
        return suffix
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        return "parquet"
    if path.suffix.lower() == ".npz":
        return "npz"
    if path.suffix.lower() in _TORCH_SUFFIXES:
        return "pt"
    known = sorted([*_TEXT_SUFFIXES, *_PARQUET_SUFFIXES, ".npz", *_TORCH_SUFFIXES])
    raise ValueError(
        f"Cannot tell the format of {str(path)!r} from its suffix; expected one of {known}."
    )


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise ImportError("Parquet gene embeddings need pyarrow: `pip install pyarrow`.") from error


def _read_torch_dict(path: Path) -> pd.DataFrame:
    import torch

    try:
        data = load_weights_file(path)
    except ValueError as error:
        raise ValueError(
            f"Could not read {str(path)!r} as a torch file holding {{gene: 1-D tensor}} "
            f"({error}); perturbscope never unpickles other objects from an embedding "
            "file. Save the table as a dict of tensors, or as .csv, .parquet or .npz."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(data).__name__}; expected a dict {{gene: 1-D tensor}}."
        )
    if not data:
        raise ValueError(f"{str(path)!r} holds an empty dict; expected {{gene: 1-D tensor}}.")
    not_tensor = [g for g, v in data.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise ValueError(f"{str(path)!r}: values for genes {_preview(not_tensor)} are not tensors.")
    not_1d = [g for g, v in data.items() if v.ndim != 1]
    if not_1d:
        shapes = {str(g): tuple(data[g].shape) for g in not_1d[:10]}
        raise ValueError(
            f"{str(path)!r}: genes {_preview(not_1d)} do not hold 1-D tensors (shapes {shapes})."
        )
    lengths = {g: int(v.shape[0]) for g, v in data.items()}
    _check_ragged(lengths, str(path))
    genes = [str(g) for g in data]
    matrix = torch.stack([v.detach().to(torch.float64) for v in data.values()]).numpy()
    return pd.DataFrame(
        matrix,
        index=pd.Index(genes, name="gene"),
        columns=[f"dim_{i}" for i in range(matrix.shape[1])],
    )


def _check_ragged(lengths: dict, name: str) -> None:
    counts = Counter(lengths.values())
    if len(counts) > 1:
        expected = counts.most_common(1)[0][0]
        offenders = {str(g): n for g, n in lengths.items() if n != expected}
        shown = dict(list(offenders.items())[:10])
        raise ValueError(
            f"{name} has ragged embeddings: most genes have {expected} dimensions but "
            f"{len(offenders)} differ: {shown}."
        )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """``(embeddings, genes, columns or None, attrs)`` of an ``.npz`` table, never unpickling."""
    attrs: dict = {}
    with np.load(path, allow_pickle=False) as data:
        missing = {"genes", "embeddings"} - set(data.files)
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks arrays {sorted(missing)}; expected 'genes' (names) and "
                f"'embeddings' (genes x dims), found {sorted(data.files)}."
            )
        matrix = data["embeddings"]
        genes = data["genes"].astype(str)
        columns = data["columns"].astype(str) if "columns" in data.files else None
        if "attrs" in data.files:
            attrs = json.loads(str(data["attrs"]))
    if genes.ndim != 1 or (columns is not None and columns.ndim != 1):
        raise ValueError(f"{str(path)!r}: 'genes' and 'columns' must be 1-D arrays of names.")
    if not isinstance(attrs, dict):
        raise ValueError(f"{str(path)!r}: 'attrs' must be a JSON object, got {type(attrs).__name__}.")
    return matrix, genes, columns, attrs


def read_gene_embeddings(path: str | os.PathLike) -> pd.DataFrame:
    """Read a gene-embedding table (genes x dims) from CSV/TSV, parquet, npz or a ``.pt`` dict.

    Parameters
    ----------
    path
        The file. Its suffix picks the format: ``.csv``, ``.tsv`` or ``.txt`` (optionally
        gzipped; genes in the first column), ``.parquet``/``.pq``, ``.npz`` (arrays ``genes`` and
        ``embeddings``), or ``.pt``/``.pth`` holding DeSCOPE's / the Virtual Cell Challenge's
        ``{gene: 1-D tensor}`` dictionary.

    Returns
    -------
    A float64 DataFrame, genes x dims. ``.attrs`` holds the provenance saved with the file
    (parquet and npz) plus ``path``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unknown suffix, ragged ``.pt`` vectors, duplicated genes or non-finite values; the
        message names the offending genes.

    Examples
    --------
    >>> import pandas as pd, tempfile, os
    >>> df = pd.DataFrame({"d0": [0.5, 1.0]}, index=["KLF1", "SET"])
    >>> path = os.path.join(tempfile.mkdtemp(), "emb.csv")
    >>> write_gene_embeddings(df, path)
    >>> read_gene_embeddings(path).loc["SET", "d0"]
    np.float64(1.0)
    """
    path = Path(path)
    fmt = _format(path)
    if not path.exists():
        raise FileNotFoundError(f"Gene-embedding file {str(path)!r} does not exist.")
    attrs: dict = {}
    if fmt in _TEXT_SUFFIXES:
        # gene names are read as written: "NA" and "1" are genes, not a missing value or a number
        df = pd.read_csv(path, sep=_TEXT_SUFFIXES[fmt], index_col=0, float_precision="round_trip",
                         dtype={0: str}, keep_default_na=False, na_values=[""])
    elif fmt == "parquet":
        _require_pyarrow()
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError) as error:  # pyarrow reports corrupt data as OSError
            raise ValueError(f"{str(path)!r} is not a readable parquet table ({error}).") from None
        attrs = dict(df.attrs)
    elif fmt == "npz":
        try:
            matrix, genes, columns, attrs = _read_npz(path)
        except (EOFError, zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{str(path)!r} is not a readable .npz archive ({type(error).__name__}).") from None
        except ValueError as error:
            if "Object arrays" in str(error):
                raise ValueError(
                    f"{str(path)!r} holds object arrays, which would need unpickling; store 'genes' and "
                    "'columns' as string arrays and 'embeddings' as a numeric array."
                ) from None
            if "allow_pickle" in str(error):
                raise ValueError(f"{str(path)!r} is not a readable .npz archive (it looks like a pickle).") from None
            raise
        if matrix.ndim != 2 or matrix.shape[0] != len(genes):
            raise ValueError(
                f"{str(path)!r}: 'embeddings' has shape {matrix.shape} but there are {len(genes)} "
                "genes; expected a 2-D array with one row per gene."
            )
        if columns is None or len(columns) != matrix.shape[1]:
            columns = [f"dim_{i}" for i in range(matrix.shape[1])]
        df = pd.DataFrame(matrix, index=pd.Index(genes, name="gene"), columns=columns)
    else:
        df = _read_torch_dict(path)
    df = check_gene_embeddings(df, name=repr(str(path)))
    df.attrs = {**attrs, "path": str(path)}
    return df


def write_gene_embeddings(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a gene-embedding table (genes x dims) in the format its suffix names.

    Parameters
    ----------
    df
        Genes x dims; checked with :func:`check_gene_embeddings` first.
    path
        Target file; see :func:`read_gene_embeddings` for the suffixes. ``.pt`` writes
        ``{gene: 1-D float tensor}`` as DeSCOPE does. Provenance in ``df.attrs`` is kept by parquet
        and npz.

    Raises
    ------
    ValueError
        For an unknown suffix or an invalid table.

    Examples
    --------
    >>> import pandas as pd, tempfile, os
    >>> df = pd.DataFrame({"d0": [0.5, 1.0]}, index=["KLF1", "SET"])
    >>> write_gene_embeddings(df, os.path.join(tempfile.mkdtemp(), "emb.pt"))
    """
    path = Path(path)
    fmt = _format(path)
    df = check_gene_embeddings(df)
    attrs = _jsonable(df.attrs)
    if fmt in _TEXT_SUFFIXES:
        out = df.copy()
        out.index.name = out.index.name or "gene"
        out.to_csv(path, sep=_TEXT_SUFFIXES[fmt])
    elif fmt == "parquet":
        _require_pyarrow()
        out = df.copy()
        out.index.name = out.index.name or "gene"
        out.attrs = attrs
        out.to_parquet(path)
    elif fmt == "npz":
        with open(path, "wb") as handle:  # a path would gain ".npz" unless it ends in lower case ".npz"
            np.savez(
                handle,
                genes=df.index.to_numpy(dtype=str),
                embeddings=df.to_numpy(),
                columns=df.columns.to_numpy(dtype=str),
                attrs=np.array(json.dumps(attrs)),
            )
    else:
        import torch

        values = torch.from_numpy(df.to_numpy())
        torch.save({gene: values[i].clone() for i, gene in enumerate(df.index)}, path)


def _jsonable(attrs: dict) -> dict:
    """The JSON-serialisable part of ``attrs`` (provenance is strings and numbers)."""
    out = {}
    for key, value in attrs.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[str(key)] = value
    return out
