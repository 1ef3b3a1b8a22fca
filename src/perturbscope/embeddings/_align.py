"""Aligning a gene-embedding table to the genes a model needs, never filling silently.

Design
------
Each requested identifier is looked up in three steps, the first hit winning:

1. ``id_map`` translates it (for example an Ensembl ID in ``adata.var_names`` to the symbol in
   ``adata.var["gene_symbol"]``), and the translated name is looked up as is;
2. otherwise the name itself is looked up;
3. otherwise, with an ``aliases`` table, both the name and the table's genes are reduced to their
   official symbols (``KIAA1804`` and ``MAP3K21`` both become ``MAP3K21``) and matched on that.
   An alias naming several official symbols is ambiguous and is not used.

Genes still unmatched raise a ``KeyError`` by default; ``missing="zero"`` or ``"mean"`` fills them
and warns, naming every filled gene. DeSCOPE's silent zero-filling is the pitfall this avoids.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..data._checks import check_gene_embeddings
from ..data._checks import preview as _preview

_MISSING = ("raise", "zero", "mean")


def read_gene_aliases(
    aliases: pd.DataFrame | Mapping[str, str] | str | os.PathLike,
) -> pd.DataFrame:
    """Read an alias table as a DataFrame with columns ``alias`` and ``symbol``.

    Parameters
    ----------
    aliases
        A path (TSV/CSV, optionally gzipped, such as the shared
        ``annotations/human_gene_aliases.tsv.gz``), a DataFrame with columns ``alias`` and
        ``symbol``, or a mapping ``{alias: official symbol}``.

    Returns
    -------
    The alias table (one row per alias-symbol pair, duplicates removed).

    Raises
    ------
    KeyError
        If the table lacks the ``alias`` or ``symbol`` column.

    Examples
    --------
    >>> read_gene_aliases({"KIAA1804": "MAP3K21"}).to_dict("records")
    [{'alias': 'KIAA1804', 'symbol': 'MAP3K21'}]
    """
    if isinstance(aliases, str | os.PathLike):
        if not os.path.exists(aliases):
            raise FileNotFoundError(f"Alias file {str(aliases)!r} does not exist.")
        sep = "," if str(aliases).lower().endswith((".csv", ".csv.gz")) else "\t"
        aliases = pd.read_csv(aliases, sep=sep, dtype=str)
    elif isinstance(aliases, Mapping):
        aliases = pd.DataFrame({"alias": list(aliases.keys()), "symbol": list(aliases.values())})
    if not isinstance(aliases, pd.DataFrame):
        raise TypeError(
            f"aliases must be a path, a DataFrame or a mapping, got {type(aliases).__name__}."
        )
    missing = [c for c in ("alias", "symbol") if c not in aliases.columns]
    if missing:
        raise KeyError(
            f"The alias table lacks columns {missing}; expected 'alias' and 'symbol', found {list(aliases.columns)}."
        )
    return (
        aliases[["alias", "symbol"]].dropna().astype(str).drop_duplicates().reset_index(drop=True)
    )


class _Canonical:
    """Official symbol of a name, or ``None`` when unknown or ambiguous."""

    def __init__(self, aliases: pd.DataFrame):
        self.official = set(aliases["symbol"])
        n_targets = aliases["alias"].map(aliases.groupby("alias")["symbol"].nunique())
        unique = aliases[n_targets.to_numpy() == 1]
        self.alias = dict(zip(unique["alias"], unique["symbol"]))

    def __call__(self, name: str) -> str | None:
        if name in self.official:
            return name
        return self.alias.get(name)


def align_gene_embeddings(
    df: pd.DataFrame,
    genes: Sequence[str],
    missing: str = "raise",
    aliases: pd.DataFrame | Mapping[str, str] | str | os.PathLike | None = None,
    id_map: Mapping[str, str] | pd.Series | None = None,
) -> pd.DataFrame:
    """Return the embedding table indexed exactly by ``genes``, in that order.

    Parameters
    ----------
    df
        Gene embeddings, genes x dims.
    genes
        The identifiers needed, e.g. the perturbed genes or ``adata.var_names``; duplicates are
        kept.
    missing
        ``"raise"`` (default): a ``KeyError`` listing genes without an embedding. ``"zero"`` or
        ``"mean"``: fill them with zeros or with the mean embedding of ``df``, with a warning
        naming them.
    aliases
        Alias table (path, DataFrame with ``alias`` and ``symbol`` columns, or mapping) used to
        match old or alternative symbols, e.g. ``annotations/human_gene_aliases.tsv.gz``.
    id_map
        Translation from the identifiers in ``genes`` to those in ``df``'s index, e.g.
        ``adata.var["gene_symbol"]`` (indexed by Ensembl IDs) or a ``{ensembl_id: symbol}`` dict.
        Identifiers absent from it are looked up as they are.

    Returns
    -------
    A DataFrame with ``index == genes``. ``.attrs`` keeps ``df``'s provenance and adds
    ``matched_by_alias`` (``{gene: row of df}``) and ``filled`` (the filled genes).

    Raises
    ------
    KeyError
        With ``missing="raise"``, listing the genes without an embedding.
    ValueError
        For an unknown ``missing`` or an invalid ``df``.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"d0": [1.0, 2.0]}, index=["KIAA1804", "KLF1"])
    >>> align_gene_embeddings(df, ["KLF1", "MAP3K21"], aliases={"KIAA1804": "MAP3K21"})["d0"].tolist()
    [2.0, 1.0]
    """
    if missing not in _MISSING:
        raise ValueError(f"missing must be one of {list(_MISSING)}, got {missing!r}.")
    df = check_gene_embeddings(df)
    if isinstance(genes, str):
        raise TypeError(f"genes must be a sequence of gene names, got the single string {genes!r}.")
    genes = [str(g) for g in genes]
    if id_map is not None and not isinstance(id_map, Mapping | pd.Series):
        raise TypeError(
            f"id_map must be a mapping or a pandas Series, got {type(id_map).__name__}."
        )
    translate = (
        {} if id_map is None else {str(k): str(v) for k, v in dict(id_map).items() if pd.notna(v)}
    )
    row_of = pd.Series(np.arange(len(df)), index=df.index)

    canonical = None if aliases is None else _Canonical(read_gene_aliases(aliases))
    by_symbol: dict[str, list[str]] = {}
    if canonical is not None:
        for name in df.index:
            symbol = canonical(name)
            if symbol is not None:
                by_symbol.setdefault(symbol, []).append(name)

    positions = np.full(len(genes), -1)
    via_alias: dict[str, str] = {}
    for i, gene in enumerate(genes):
        name = translate.get(gene, gene)
        if name in row_of.index:
            positions[i] = row_of[name]
            continue
        if name != gene and gene in row_of.index:
            positions[i] = row_of[gene]
            continue
        if canonical is None:
            continue
        symbol = canonical(name)
        candidates = by_symbol.get(symbol, []) if symbol is not None else []
        if len(candidates) > 1 and symbol in candidates:
            candidates = [symbol]
        if len(candidates) == 1:
            positions[i] = row_of[candidates[0]]
            via_alias[gene] = candidates[0]

    absent = list(dict.fromkeys(g for g, p in zip(genes, positions) if p < 0))
    if absent and missing == "raise":
        hint = (
            ""
            if aliases is not None
            else " Passing an alias table (aliases=...) may resolve renamed genes."
        )
        raise KeyError(
            f"{len(absent)} of {len(set(genes))} genes have no embedding: {_preview(absent, 20)}. "
            f"Use missing='zero' or 'mean' to fill them explicitly.{hint}"
        )
    values = df.to_numpy()[np.maximum(positions, 0)]
    if absent:
        fill = np.zeros(df.shape[1]) if missing == "zero" else df.to_numpy().mean(axis=0)
        values[positions < 0] = fill
        warnings.warn(
            f"Filled {len(absent)} genes without an embedding with the {'zero vector' if missing == 'zero' else 'mean embedding'}: {_preview(absent, 20)}.",
            UserWarning,
            stacklevel=2,
        )
    out = pd.DataFrame(values, index=pd.Index(genes, name=df.index.name), columns=df.columns)
    out.attrs = {**df.attrs, "matched_by_alias": via_alias, "filled": absent}
    return out
