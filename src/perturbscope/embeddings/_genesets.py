"""Gene embeddings from gene-set membership.

Design
------
A binary gene x set membership matrix is reduced with scikit-learn's ``TruncatedSVD`` (fixed
``random_state``, so the result is reproducible). Two genes that share many sets get nearby rows:
the embedding's inner products approximate the number of sets they share. Genes in no set get no
row (rather than a zero vector): :func:`~perturbscope.embeddings.align_gene_embeddings` decides,
explicitly, what happens to them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..data._checks import check_gene_embeddings
from ..data._checks import preview as _preview


def read_gene_sets(path: str | os.PathLike, flatten: bool = True) -> dict:
    r"""Read gene sets from a GMT file or a (possibly nested) JSON file.

    The one reader of gene-set files: :func:`geneset_embeddings` and
    :func:`perturbscope.probe.rank_pathways` both read files through it.

    Parameters
    ----------
    path
        A ``.gmt`` file (``name<TAB>description<TAB>gene<TAB>gene...``), or a ``.json`` file holding
        ``{set_name: [genes]}`` or spectra's nested ``{cell_type: {set_name: [genes]}}``.
    flatten
        Flatten nested names to ``"cell_type/set_name"``; ``False`` returns a JSON file's
        mapping as it is (collections kept apart).

    Returns
    -------
    ``{set_name: [genes]}`` (nested for an unflattened nested JSON file).

    Raises
    ------
    ValueError
        For an unknown suffix, a GMT line with no genes, a GMT set name used twice, or JSON of
        another shape.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.gmt")
    >>> _ = open(path, "w").write("ERYTHROID\tna\tKLF1\tGATA1\n")
    >>> read_gene_sets(path)
    {'ERYTHROID': ['KLF1', 'GATA1']}
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Gene-set file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".gmt":
        sets: dict[str, list[str]] = {}
        with open(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                fields = [f.strip() for f in line.rstrip("\n\r").split("\t")]
                if not any(fields):
                    continue
                if len(fields) < 3 or not any(fields[2:]):
                    raise ValueError(
                        f"{str(path)!r} line {line_number}: a GMT line needs a name, a description "
                        "and at least one gene, separated by tabs."
                    )
                if fields[0] in sets:
                    raise ValueError(
                        f"{str(path)!r} line {line_number}: the set name {fields[0]!r} is used by an earlier "
                        "line too; each GMT set needs its own name."
                    )
                sets[fields[0]] = [g for g in fields[2:] if g]
        return sets
    if suffix == ".json":
        with open(path) as handle:
            sets = json.load(handle)
        return _flatten(sets, str(path)) if flatten else sets
    raise ValueError(f"Cannot read gene sets from {str(path)!r}; expected a .gmt or .json file.")


def _flatten(gene_sets, name: str) -> dict[str, list[str]]:
    if not isinstance(gene_sets, Mapping):
        raise TypeError(
            f"{name}: gene sets must be a mapping {{set_name: [genes]}}, got {type(gene_sets).__name__}."
        )
    flat: dict[str, list[str]] = {}
    for key, value in gene_sets.items():
        if isinstance(value, Mapping):
            for inner, genes in _flatten(value, name).items():
                flat[f"{key}/{inner}"] = genes
        elif isinstance(value, str) or not isinstance(
            value, Sequence | set | frozenset | np.ndarray | pd.Index
        ):
            raise TypeError(
                f"{name}: set {key!r} must hold a list of genes, got {type(value).__name__}."
            )
        else:
            flat[str(key)] = [str(g) for g in value]
    return flat


def _svd_embedding(
    matrix: sparse.spmatrix,
    genes: Sequence[str],
    n_components: int,
    random_state: int,
    prefix: str,
    what: str,
) -> pd.DataFrame:
    """Rows of ``TruncatedSVD(n_components).fit_transform(matrix)`` as a labelled DataFrame."""
    from sklearn.decomposition import TruncatedSVD

    n_rows, n_cols = matrix.shape
    if not isinstance(n_components, int | np.integer) or n_components < 1:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}.")
    if n_components >= n_cols or n_components > n_rows:
        raise ValueError(
            f"n_components={n_components} is too large for {n_rows} genes x {n_cols} {what}; "
            f"truncated SVD needs n_components < {n_cols} and <= {n_rows}."
        )
    svd = TruncatedSVD(
        n_components=int(n_components), algorithm="randomized", n_iter=5, random_state=random_state
    )
    values = svd.fit_transform(matrix)
    return pd.DataFrame(
        values,
        index=pd.Index(list(genes), name="gene"),
        columns=[f"{prefix}_{i}" for i in range(values.shape[1])],
    )


def _membership(
    pairs_gene: np.ndarray, pairs_set: np.ndarray
) -> tuple[sparse.csr_matrix, pd.Index, pd.Index]:
    gene_codes, gene_index = pd.factorize(pairs_gene, sort=True)
    set_codes, set_index = pd.factorize(pairs_set, sort=True)
    matrix = sparse.csr_matrix(
        (np.ones(len(gene_codes)), (gene_codes, set_codes)), shape=(len(gene_index), len(set_index))
    )
    matrix.data[:] = 1.0  # duplicate pairs were summed
    return matrix, pd.Index(gene_index), pd.Index(set_index)


def geneset_embeddings(
    gene_sets: Mapping[str, Sequence[str]] | str | os.PathLike,
    n_components: int = 64,
    genes: Sequence[str] | None = None,
    random_state: int = 0,
) -> pd.DataFrame:
    """Gene embeddings from gene-set membership, reduced with truncated SVD.

    Parameters
    ----------
    gene_sets
        ``{set_name: [genes]}``, a nested ``{group: {set_name: [genes]}}`` (as spectra's default
        gene sets), or the path of a ``.gmt`` / ``.json`` file (see :func:`read_gene_sets`).
    n_components
        Embedding dimensions; must be smaller than the number of sets.
    genes
        The gene universe. Sets are intersected with it, and genes of it in no set are left out
        of the result with a warning naming them. ``None`` uses every gene in any set.
    random_state
        Seed of the randomized SVD.

    Returns
    -------
    A DataFrame, genes (sorted) x ``n_components`` (``geneset_0``, ...), with ``.attrs``
    ``{"source": "gene_sets", "n_sets": ..., "n_components": ...}``.

    Raises
    ------
    ValueError
        If no set has a gene in the universe, or ``n_components`` is too large.

    Examples
    --------
    >>> sets = {"a": ["KLF1", "GATA1"], "b": ["GATA1", "TAL1"], "c": ["SET"]}
    >>> geneset_embeddings(sets, n_components=2).shape
    (4, 2)
    """
    name = "gene_sets"
    if isinstance(gene_sets, str | os.PathLike):
        name = repr(str(gene_sets))
        gene_sets = read_gene_sets(gene_sets)
    flat = _flatten(gene_sets, name)
    universe = None if genes is None else pd.Index([str(g) for g in genes]).unique()
    allowed = None if universe is None else set(universe)
    pairs = [
        (g, s) for s, members in flat.items() for g in members if allowed is None or g in allowed
    ]
    if not pairs:
        raise ValueError(
            f"No gene set in {name} has a gene"
            + ("" if universe is None else f" in the given universe of {len(universe)} genes")
            + "."
        )
    pairs_arr = np.array(pairs, dtype=object)
    matrix, gene_index, set_index = _membership(pairs_arr[:, 0], pairs_arr[:, 1])
    if universe is not None:
        absent = universe.difference(gene_index, sort=False)
        if len(absent):
            warnings.warn(
                f"{len(absent)} genes are in no gene set and get no embedding: {_preview(absent)}.",
                UserWarning,
                stacklevel=2,
            )
    df = _svd_embedding(matrix, gene_index, n_components, random_state, "geneset", "gene sets")
    df = check_gene_embeddings(df, name="gene-set embeddings")
    df.attrs = {
        "source": "gene_sets",
        "n_sets": int(len(set_index)),
        "n_components": int(n_components),
    }
    return df
