"""The perturbation field: perturbation labels registered as gene-embedding lookups.

Labels are parsed into gene sets and stored as a padded integer matrix (``-1`` = no gene) of
row indices into the gene-embedding table, in ``adata.obsm["_scopevi_perturbation_genes"]``
(float32 on a MuData, whose views mudata cannot copy with integer ``obsm``).
The table itself lives in the field's state registry, so it travels with a saved model and a
gene that was never perturbed in training can still be looked up at prediction time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data.fields import BaseAnnDataField, MuDataWrapper

from .._constants import OUTPUT_KEYS, REGISTRY_KEYS
from ..data import check_control_present, check_gene_embeddings, perturbation_gene_sets


def one_hot_embeddings(genes: Sequence[str]) -> pd.DataFrame:
    """Identity embeddings over ``genes``: each gene its own axis (no transfer to unseen genes)."""
    genes = sorted(set(genes))
    table = pd.DataFrame(np.eye(len(genes), dtype=np.float32), index=genes, columns=genes)
    table.attrs = {"source": "one-hot (no gene_embeddings given)"}
    return table


def encode_gene_sets(
    gene_sets: Sequence[tuple[str, ...]], vocabulary: pd.Index, width: int | None = None
) -> np.ndarray:
    """Padded ``(n, width)`` matrix of vocabulary indices, ``-1`` where a set has fewer genes.

    Raises
    ------
    KeyError
        Listing every gene that is not in ``vocabulary``.
    """
    missing = sorted({g for genes in gene_sets for g in genes if g not in vocabulary})
    if missing:
        raise KeyError(
            f"Perturbed genes missing from gene_embeddings: {missing}. Add embeddings for them "
            "(see perturbscope.embeddings) rather than dropping or zero-filling them."
        )
    needed = max((len(genes) for genes in gene_sets), default=0)
    width = max(needed, width or 0, 1)
    matrix = np.full((len(gene_sets), width), -1, dtype=np.int64)
    for row, genes in enumerate(gene_sets):
        matrix[row, : len(genes)] = vocabulary.get_indexer(list(genes))
    return matrix


class PerturbationGenesField(BaseAnnDataField):
    """Register ``adata.obs[perturbation_key]`` as lookups into a gene-embedding table.

    Parameters
    ----------
    perturbation_key
        Column of ``adata.obs`` with labels such as ``"control"``, ``"A"``, ``"A+B"``.
    control_value
        Label of control cells.
    gene_embeddings
        Genes x dimensions table; ``None`` builds one-hot embeddings of the observed genes.
    combination_delimiter
        Separator of genes in combination labels.
    """

    def __init__(
        self,
        perturbation_key: str,
        control_value: str = "control",
        gene_embeddings: pd.DataFrame | None = None,
        combination_delimiter: str = "+",
    ):
        super().__init__()
        self._registry_key = REGISTRY_KEYS.PERTURBATION_KEY
        self.perturbation_key = perturbation_key
        self.control_value = control_value
        self.gene_embeddings = gene_embeddings
        self.delimiter = combination_delimiter

    @property
    def registry_key(self) -> str:
        return self._registry_key

    @property
    def attr_name(self) -> str:
        return "obsm"

    @property
    def attr_key(self) -> str:
        return OUTPUT_KEYS.PERTURBATION_OBSM

    @property
    def is_empty(self) -> bool:
        return False

    def validate_field(self, adata: AnnData) -> None:
        if self.perturbation_key not in adata.obs.columns:
            raise KeyError(
                f"perturbation_key {self.perturbation_key!r} not found in adata.obs; "
                f"columns are {list(adata.obs.columns)}."
            )

    def _cell_gene_sets(self, adata: AnnData) -> list[tuple[str, ...]]:
        labels = adata.obs[self.perturbation_key].astype(str)
        parsed = perturbation_gene_sets(labels, self.control_value, self.delimiter)
        return [parsed[label] for label in labels]

    def _write(self, adata: AnnData, vocabulary: pd.Index, width: int | None) -> np.ndarray:
        matrix = encode_gene_sets(self._cell_gene_sets(adata), vocabulary, width)
        # mudata cannot copy a view whose global obsm holds integers (it assigns NaN to an
        # integer array while aligning), and scvi-tools copies views: a MuData gets float32
        # indices, exact below 2**24 genes.
        adata.obsm[self.attr_key] = matrix.astype(np.float32) if hasattr(adata, "mod") else matrix
        return matrix

    def register_field(self, adata: AnnData) -> dict:
        self.validate_field(adata)
        check_control_present(adata.obs[self.perturbation_key], self.perturbation_key, self.control_value)
        table = self.gene_embeddings
        if table is None:
            genes = {g for s in self._cell_gene_sets(adata) for g in s}
            warnings.warn(
                "No gene_embeddings given: using one-hot embeddings, so genes never perturbed in "
                "training cannot be predicted.", UserWarning, stacklevel=3,
            )
            table = one_hot_embeddings(sorted(genes))
        table = check_gene_embeddings(table, name="gene_embeddings")
        vocabulary = pd.Index(table.index.astype(str))
        matrix = self._write(adata, vocabulary, None)
        return {
            "genes": vocabulary.to_numpy(dtype=object),
            "embeddings": table.to_numpy(dtype=np.float32),
            "provenance": dict(table.attrs),
            "perturbation_key": self.perturbation_key,
            "control_value": self.control_value,
            "combination_delimiter": self.delimiter,
            "max_genes": int(matrix.shape[1]),
            "perturbed_genes": vocabulary[np.unique(matrix[matrix >= 0])].to_numpy(dtype=object),
        }

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        self.validate_field(adata_target)
        vocabulary = pd.Index(state_registry["genes"])
        matrix = self._write(adata_target, vocabulary, state_registry["max_genes"])
        return {**state_registry, "max_genes": int(matrix.shape[1])}

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {"n_embedded_genes": len(state_registry["genes"]),
                "embedding_dim": int(state_registry["embeddings"].shape[1])}

    def view_state_registry(self, state_registry: dict):
        return None


#: The perturbation field for MuData: labels and lookups live on the MuData's global ``obs``/``obsm``.
MuDataPerturbationGenesField = MuDataWrapper(PerturbationGenesField)
