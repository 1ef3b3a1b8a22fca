"""Gene embeddings: ESM2 (fair-esm), files, gene sets, Gene Ontology and expression."""

__all__: list[str] = []
