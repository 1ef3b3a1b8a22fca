"""Rank pathways by gene scores, offline, through decoupler.

``"ora"`` tests the ``top_n`` highest-scoring genes for over-representation (Fisher's exact
test, the scored genes as background); ``"gsea"`` runs decoupler's permutation GSEA on the whole
ranking. Gene sets come from a GMT file, a dict, or a nested JSON ``{collection: {set: genes}}``
such as Spectra's default gene sets; nothing is fetched online.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..embeddings import read_gene_sets

GeneSets = str | Path | Mapping[str, Sequence[str]] | Mapping[str, Mapping[str, Sequence[str]]]


def _flatten(sets: Mapping) -> pd.DataFrame:
    """Long ``source, target, collection`` table from a flat or a nested mapping."""
    rows = []
    for key, value in sets.items():
        if isinstance(value, Mapping):
            for name, genes in value.items():
                _check_genes(genes, f"{key}/{name}")
                rows += [(name, gene, key) for gene in genes]
        else:
            _check_genes(value, key)
            rows += [(key, gene, "") for gene in value]
    net = pd.DataFrame(rows, columns=["source", "target", "collection"]).drop_duplicates()
    # a set name used in two collections is qualified as "collection:set"
    per_name = net.groupby("source")["collection"].nunique()
    clash = net["source"].isin(per_name.index[per_name > 1])
    net.loc[clash, "source"] = net.loc[clash, "collection"] + ":" + net.loc[clash, "source"]
    return net


def _check_genes(genes, name: str) -> None:
    """A gene set is a list of gene names: not one string, and not a further level of sets."""
    if isinstance(genes, str):
        raise ValueError(f"gene set {name!r} must be a list of genes, got the string {genes!r}")
    if isinstance(genes, Mapping):
        raise ValueError(f"gene set {name!r} holds a mapping: gene sets nest at most one level "
                         "({collection: {set: genes}}).")


def gene_set_table(gene_sets: GeneSets) -> pd.DataFrame:
    """Gene sets as decoupler's long ``source, target`` table, with their collection.

    Files are read by :func:`perturbscope.embeddings.read_gene_sets`, unflattened, so a nested
    JSON file keeps its collections.

    Parameters
    ----------
    gene_sets
        A ``.gmt`` path, a ``.json`` path (flat ``{set: genes}`` or nested
        ``{collection: {set: genes}}``), or such a dict.

    Returns
    -------
    DataFrame with columns ``source`` (set name), ``target`` (gene) and ``collection``.

    Raises
    ------
    ValueError
        If the path does not exist, has another suffix, the sets are empty, a set is one string
        rather than a list of genes, or the sets nest deeper than ``{collection: {set: genes}}``.

    Examples
    --------
    >>> from perturbscope.probe import gene_set_table
    >>> gene_set_table({"IFN": ["ISG15", "IFI6"]}).shape
    (2, 3)
    """
    if isinstance(gene_sets, str | Path):
        path = Path(gene_sets)
        if not path.is_file():
            raise ValueError(f"gene set file {str(path)!r} does not exist")
        if path.suffix.lower() not in (".gmt", ".json"):
            raise ValueError(f"gene set file {str(path)!r} must end in .gmt or .json")
        gene_sets = read_gene_sets(path, flatten=False)
    if not isinstance(gene_sets, Mapping):
        raise ValueError(
            f"gene_sets must be a GMT or JSON path or a dict, got {type(gene_sets).__name__}"
        )
    net = _flatten(gene_sets)
    if net.empty:
        raise ValueError("gene_sets holds no genes")
    return net


@functools.cache
def _ora_selects_above_n_up() -> bool:
    """Whether decoupler's ORA keeps features ranked *above* ``n_up`` rather than the top ``n_up``.

    decoupler 2.2 keeps ``rankdata(row) > n_up`` (all but the ``n_up`` lowest), which its
    docstring does not describe; probing once keeps the ORA right across versions.
    """
    import decoupler as dc

    genes = [f"g{i}" for i in range(10)]
    data = pd.DataFrame([np.arange(10, 0, -1, dtype=float)], index=["s"], columns=genes)
    # "third" holds the 3rd and 4th best genes: hit only if everything above rank 2 is kept
    net = pd.DataFrame({"source": ["third", "third"], "target": ["g2", "g3"]})
    es, _ = dc.mt.ora(data, net, n_up=2, n_bg=10, tmin=1, verbose=False)
    return float(es.loc["s", "third"]) > 0


def rank_pathways(
    scores: pd.Series | pd.DataFrame,
    gene_sets: GeneSets,
    method: Literal["ora", "gsea"] = "ora",
    top_n: int = 200,
    score_column: str = "probe_alignment",
    min_size: int = 5,
    n_permutations: int = 1000,
    seed: int = 1,
) -> pd.DataFrame:
    """Rank gene sets by gene scores through decoupler, offline.

    Parameters
    ----------
    scores
        Scores indexed by gene symbol: a Series, or a DataFrame with ``score_column`` (such as
        the table from :func:`axis_alignment_scores`). ``NaN`` scores are dropped.
    gene_sets
        A ``.gmt`` path, a ``.json`` path or a dict, flat ``{set: genes}`` or nested
        ``{collection: {set: genes}}`` (e.g. ``genesets/spectra_default_gene_sets.json``).
    method
        ``"ora"``: over-representation of the ``top_n`` highest-scoring genes (one-sided
        Fisher's exact test, the hypergeometric upper tail, with the scored genes as background;
        the score is decoupler's log odds ratio). A set with fewer top genes than chance has a
        large p-value. ``"gsea"``:
        decoupler's GSEA over the whole ranking (the score is the normalised enrichment score).
    top_n
        Genes counted as hits by ``"ora"``.
    score_column
        Column of ``scores`` when it is a DataFrame.
    min_size
        Sets with fewer scored genes are skipped.
    n_permutations
        Permutations for ``"gsea"`` p-values (which are at least ``1 / (n_permutations + 1)``).
    seed
        Seed of the ``"gsea"`` permutations (must be ``>= 1``; decoupler does not shuffle with 0).

    Returns
    -------
    DataFrame, one row per tested set, sorted by p-value then decreasing score, with columns
    ``pathway``, ``collection``, ``score``, ``pvalue``, ``padj`` (Benjamini-Hochberg),
    ``n_genes`` (scored genes in the set) and, for ``"ora"``, ``n_hits`` (set genes among the
    ``top_n``).

    Raises
    ------
    ValueError
        For an unknown ``method``, a missing ``score_column``, ``top_n`` outside
        ``[1, number of scored genes)``, ``seed < 1``, or no set with ``min_size`` scored genes.

    Examples
    --------
    >>> table = ps.probe.axis_alignment_scores(model, adata, "condition", "control", "stimulated")  # doctest: +SKIP
    >>> ps.probe.rank_pathways(table, "genesets/spectra_default_gene_sets.json").head()  # doctest: +SKIP
    """
    import decoupler as dc

    if method not in ("ora", "gsea"):
        raise ValueError(f"method must be 'ora' or 'gsea', got {method!r}")
    if isinstance(scores, pd.DataFrame):
        if score_column not in scores.columns:
            raise ValueError(
                f"score_column {score_column!r} is not a column of scores; columns are "
                f"{list(scores.columns)}"
            )
        scores = scores[score_column]
    scores = pd.Series(scores, dtype=float).dropna()
    scores = scores[~scores.index.duplicated()]
    scores.index = scores.index.astype(str)
    if method == "ora" and not 1 <= top_n < len(scores):
        raise ValueError(f"top_n must be in [1, {len(scores)}) (the scored genes), got {top_n}")
    if seed < 1:
        raise ValueError(f"seed must be >= 1, got {seed}")

    net = gene_set_table(gene_sets)
    net = net[net["target"].isin(scores.index)]
    sizes = net.groupby("source")["target"].nunique()
    keep = sizes.index[sizes >= min_size]
    if len(keep) == 0:
        raise ValueError(
            f"no gene set has at least min_size={min_size} scored genes; are scores indexed by "
            f"the same gene names as the sets (e.g. {list(scores.index[:3])})?"
        )
    net = net[net["source"].isin(keep)]
    data = pd.DataFrame([scores.to_numpy()], index=["scores"], columns=scores.index)
    dc_net = net[["source", "target"]]
    if method == "ora":
        # ties broken once, by position: decoupler's selection and the hits counted here agree
        ranks = scores.rank(method="first")
        n_up = len(scores) - top_n if _ora_selects_above_n_up() else top_n
        ranked = pd.DataFrame([ranks.to_numpy()], index=["scores"], columns=scores.index)
        es, pv = dc.mt.ora(ranked, dc_net, n_up=n_up, n_bg=len(scores), tmin=min_size, verbose=False)
        hits = set(ranks.index[ranks.to_numpy() > len(scores) - top_n])
    else:
        es, pv = dc.mt.gsea(
            data, dc_net, times=n_permutations, seed=seed, tmin=min_size, verbose=False
        )
        # an empirical p-value of 0 only means "below 1 / n_permutations"
        pv = pv.clip(lower=1.0 / (n_permutations + 1))
    collection = net.groupby("source")["collection"].first()
    out = pd.DataFrame(
        {
            "pathway": es.columns,
            "collection": collection.reindex(es.columns).to_numpy(),
            "score": es.loc["scores"].to_numpy(),
            "pvalue": pv.loc["scores"].to_numpy(),
            "n_genes": sizes.reindex(es.columns).to_numpy(),
        }
    )
    from scipy.stats import false_discovery_control, hypergeom

    if method == "ora":
        members = net.groupby("source")["target"].apply(set)
        out["n_hits"] = [len(members[p] & hits) for p in out["pathway"]]
        # one-sided: decoupler's Fisher p-value is two-sided, so a set with no top genes at all
        # would rank as significant
        out["pvalue"] = hypergeom.sf(out["n_hits"] - 1, len(scores), out["n_genes"], top_n)
    out["padj"] = false_discovery_control(np.clip(out["pvalue"].to_numpy(), 0, 1), method="bh")
    if method == "ora":
        out["n_hits"] = out.pop("n_hits")  # the last column, as documented
    out = out.sort_values(["pvalue", "score"], ascending=[True, False], ignore_index=True)
    return out
