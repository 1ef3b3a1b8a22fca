"""Gene embeddings: ESM2 (fair-esm), files, gene sets, Gene Ontology and expression.

Every function returns a ``pandas.DataFrame`` (genes x dims) whose ``.attrs`` record where it came
from; :func:`align_gene_embeddings` then indexes it by exactly the genes a model needs.
"""

from ._align import align_gene_embeddings, read_gene_aliases
from ._esm2 import esm2_embeddings, read_protein_fasta
from ._expression import expression_embeddings
from ._files import check_gene_embeddings, read_gene_embeddings, write_gene_embeddings
from ._genesets import geneset_embeddings, read_gene_sets
from ._go import go_embeddings

__all__ = [
    "align_gene_embeddings",
    "check_gene_embeddings",
    "esm2_embeddings",
    "expression_embeddings",
    "geneset_embeddings",
    "go_embeddings",
    "read_gene_aliases",
    "read_gene_embeddings",
    "read_gene_sets",
    "read_protein_fasta",
    "write_gene_embeddings",
]
