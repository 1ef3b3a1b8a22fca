"""Gene embeddings from Gene Ontology annotations: offline prior knowledge for unseen genes.

Design
------
1. **Annotations** ``(symbol, go_id)`` are filtered by ontology and evidence (``ND``, "no
   biological data", only points at the ontology roots and is dropped by default).
2. **Propagation** (the true-path rule): a gene annotated to a term is also annotated to all its
   ancestors along ``is_a`` and ``part_of`` edges. The ancestor closure of the term graph is
   computed once with sparse boolean matrix products (repeated squaring, so ~log2(depth)
   products), and the gene x term matrix is multiplied by it: a second or two on all of GO.
3. **Weighting.** The binary gene x term matrix is tf-idf weighted (scikit-learn's
   ``TfidfTransformer``), so a specific term shared by two genes counts more than a broad one;
   the three ontology roots and terms with fewer than ``min_genes_per_term`` genes carry no
   similarity and are dropped.
4. **Reduction** with ``TruncatedSVD`` and a fixed ``random_state``: deterministic.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from ..data._checks import check_gene_embeddings
from ..data._checks import preview as _preview
from ._genesets import _membership, _svd_embedding

GO_ROOTS = ("GO:0008150", "GO:0003674", "GO:0005575")
_ONTOLOGIES = ("BP", "MF", "CC")


def _read_table(
    table: pd.DataFrame | str | os.PathLike, required: Sequence[str], what: str
) -> pd.DataFrame:
    if isinstance(table, str | os.PathLike):
        if not os.path.exists(table):
            raise FileNotFoundError(f"{what} file {str(table)!r} does not exist.")
        sep = "," if str(table).lower().endswith((".csv", ".csv.gz")) else "\t"
        table = pd.read_csv(table, sep=sep)
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{what} must be a DataFrame or a path, got {type(table).__name__}.")
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise KeyError(
            f"The {what} table lacks columns {missing}; expected {list(required)}, found {list(table.columns)}."
        )
    return table


def _ancestor_closure(edges: pd.DataFrame, terms: pd.Index) -> sparse.csr_matrix:
    """Boolean ``terms x terms`` matrix, ``[t, a] = 1`` when ``a`` is ``t`` or an ancestor of it."""
    child = terms.get_indexer(edges["go_id"].to_numpy())
    parent = terms.get_indexer(edges["parent_id"].to_numpy())
    keep = (child >= 0) & (parent >= 0)
    n = len(terms)
    step = sparse.csr_matrix((np.ones(keep.sum()), (child[keep], parent[keep])), shape=(n, n))
    closure = (sparse.identity(n, format="csr") + step).astype(bool).astype(np.float32)
    # Repeated squaring: after k rounds the matrix reaches ancestors up to 2**k edges away.
    for _ in range(64):
        squared = (closure @ closure).astype(bool).astype(np.float32)
        if squared.nnz == closure.nnz:
            return squared.tocsr()
        closure = squared
    raise ValueError("The GO graph did not converge to a closure; does go_parents hold a cycle?")


def go_embeddings(
    annotations: pd.DataFrame | str | os.PathLike,
    ontologies: Sequence[str] | None = ("BP", "MF", "CC"),
    propagate: bool = True,
    n_components: int = 64,
    go_parents: pd.DataFrame | str | os.PathLike | None = None,
    relationships: Sequence[str] = ("isa", "part of"),
    exclude_evidence: Sequence[str] = ("ND",),
    min_genes_per_term: int = 2,
    genes: Sequence[str] | None = None,
    random_state: int = 0,
) -> pd.DataFrame:
    """Gene embeddings from Gene Ontology annotations: tf-idf weighted terms, truncated SVD.

    Parameters
    ----------
    annotations
        A table (or its path, TSV/CSV, optionally gzipped) with columns ``symbol`` and ``go_id``;
        ``ontology`` (``BP``/``MF``/``CC``) is needed to filter by ontology and ``evidence`` to
        drop evidence codes. The shared data folder holds the human one,
        ``annotations/human_go_annotations.tsv.gz``.
    ontologies
        Ontologies to keep; ``None`` keeps every annotation.
    propagate
        Add every ancestor of each annotated term (the true-path rule); needs ``go_parents``.
    n_components
        Embedding dimensions.
    go_parents
        The GO graph's edges (or their path), columns ``go_id``, ``parent_id`` and
        ``relationship``, such as ``annotations/go_parents.tsv.gz``.
    relationships
        Edge types followed when propagating. ``is_a`` and ``part_of`` are the ones the true-path
        rule holds for; ``regulates`` edges are not followed by default.
    exclude_evidence
        Evidence codes whose annotations are dropped (when an ``evidence`` column exists).
    min_genes_per_term
        Terms annotated (after propagation) to fewer genes are dropped: a term held by one gene
        makes no two genes similar.
    genes
        Genes to return. The SVD is always fitted on every annotated gene; requested genes without
        annotations are left out with a warning naming them. ``None`` returns every annotated
        gene.
    random_state
        Seed of the randomized SVD (the result is deterministic for a given seed).

    Returns
    -------
    A DataFrame, genes x ``n_components`` (``go_0``, ...), with ``.attrs``
    ``{"source": "gene_ontology", "ontologies", "propagate", "n_terms", "n_components"}``.

    Raises
    ------
    KeyError
        If a table lacks a required column (the columns found are listed).
    ValueError
        For an unknown ontology, ``propagate=True`` without ``go_parents``, no annotation left
        after filtering, or too many components.

    Examples
    --------
    >>> import pandas as pd
    >>> annotations = pd.DataFrame({
    ...     "symbol": ["MAP2K3", "MAP2K6", "MAP2K3", "KLF1", "GATA1", "KLF1"],
    ...     "go_id": ["GO:1", "GO:1", "GO:2", "GO:3", "GO:3", "GO:2"]})
    >>> go_embeddings(annotations, ontologies=None, propagate=False, n_components=2).shape
    (4, 2)
    """
    table = _read_table(annotations, ["symbol", "go_id"], "annotations")
    if ontologies is not None:
        ontologies = [ontologies] if isinstance(ontologies, str) else list(ontologies)
        unknown = [o for o in ontologies if o not in _ONTOLOGIES]
        if unknown:
            raise ValueError(
                f"Unknown ontologies {unknown}; expected a subset of {list(_ONTOLOGIES)}."
            )
        if "ontology" not in table.columns:
            raise KeyError(
                f"annotations lack an 'ontology' column to filter by ontologies={ontologies}; "
                f"columns are {list(table.columns)}. Pass ontologies=None to keep every annotation."
            )
        table = table[table["ontology"].isin(ontologies)]
    if exclude_evidence and "evidence" in table.columns:
        table = table[~table["evidence"].isin(list(exclude_evidence))]
    table = table.dropna(subset=["symbol", "go_id"])
    if table.empty:
        raise ValueError("No GO annotation is left after filtering by ontology and evidence.")

    matrix, gene_index, term_index = _membership(
        table["symbol"].astype(str).to_numpy(), table["go_id"].astype(str).to_numpy()
    )
    if propagate:
        if go_parents is None:
            raise ValueError(
                "propagate=True needs the GO graph: pass go_parents (a table or path with columns "
                "go_id, parent_id, relationship, e.g. annotations/go_parents.tsv.gz), or "
                "propagate=False."
            )
        edges = _read_table(go_parents, ["go_id", "parent_id", "relationship"], "go_parents")
        known = set(edges["relationship"].unique())
        unknown = [r for r in relationships if r not in known]
        if unknown:
            raise ValueError(
                f"relationships {unknown} do not occur in go_parents; it has {sorted(known)}."
            )
        edges = edges[edges["relationship"].isin(list(relationships))]
        if ontologies is not None and "ontology" in edges.columns:
            edges = edges[edges["ontology"].isin(ontologies)]
        all_terms = pd.Index(
            pd.unique(
                np.concatenate(
                    [
                        term_index.to_numpy(),
                        edges["go_id"].to_numpy(),
                        edges["parent_id"].to_numpy(),
                    ]
                )
            )
        )
        closure = _ancestor_closure(edges, all_terms)
        expand = sparse.csr_matrix(
            (
                np.ones(len(term_index)),
                (np.arange(len(term_index)), all_terms.get_indexer(term_index)),
            ),
            shape=(len(term_index), len(all_terms)),
        )
        matrix = (matrix @ (expand @ closure)).astype(bool).astype(np.float64).tocsr()
        term_index = all_terms

    genes_per_term = np.asarray(matrix.sum(axis=0)).ravel()
    keep = (genes_per_term >= min_genes_per_term) & ~term_index.isin(GO_ROOTS)
    matrix, term_index = matrix[:, keep], term_index[keep]
    annotated = np.asarray(matrix.sum(axis=1)).ravel() > 0
    matrix, gene_index = matrix[annotated], gene_index[annotated]
    if matrix.shape[1] == 0 or matrix.shape[0] == 0:
        raise ValueError(
            f"No GO term is annotated to at least min_genes_per_term={min_genes_per_term} genes "
            "after filtering; lower min_genes_per_term or add annotations."
        )

    from sklearn.feature_extraction.text import TfidfTransformer

    weighted = TfidfTransformer(norm="l2", smooth_idf=True).fit_transform(matrix)
    df = _svd_embedding(weighted, gene_index, n_components, random_state, "go", "GO terms")
    if genes is not None:
        requested = pd.Index([str(g) for g in genes]).unique()
        absent = requested.difference(df.index, sort=False)
        if len(absent):
            warnings.warn(
                f"{len(absent)} genes have no GO annotation and get no embedding: {_preview(absent)}.",
                UserWarning,
                stacklevel=2,
            )
        df = df.loc[requested.intersection(df.index, sort=False)]
    df = check_gene_embeddings(df, name="GO embeddings")
    df.attrs = {
        "source": "gene_ontology",
        "ontologies": None if ontologies is None else list(ontologies),
        "propagate": bool(propagate),
        "n_terms": int(matrix.shape[1]),
        "n_components": int(n_components),
    }
    return df
