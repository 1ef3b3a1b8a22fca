from __future__ import annotations

import json

import numpy as np
import pytest

from perturbscope.embeddings import geneset_embeddings, read_gene_sets

# Set c = a + b, so the membership matrix has rank 2 and two components reproduce it exactly.
SETS = {"a": ["G1"], "b": ["G2", "G3"], "c": ["G1", "G2", "G3"]}
MEMBERSHIP = np.array([[1.0, 0, 1], [0, 1, 1], [0, 1, 1]])


def test_inner_products_match_the_membership_matrix():
    emb = geneset_embeddings(SETS, n_components=2)
    assert list(emb.index) == ["G1", "G2", "G3"]
    assert list(emb.columns) == ["geneset_0", "geneset_1"]
    # Rows are U S of the membership matrix: E E^T = M M^T = numbers of shared sets.
    np.testing.assert_allclose(
        emb.to_numpy() @ emb.to_numpy().T, MEMBERSHIP @ MEMBERSHIP.T, atol=1e-10
    )
    assert emb.attrs == {"source": "gene_sets", "n_sets": 3, "n_components": 2}
    np.testing.assert_array_equal(
        geneset_embeddings(SETS, n_components=2).to_numpy(), emb.to_numpy()
    )


def test_gmt_nested_and_universe(tmp_path):
    gmt = tmp_path / "s.gmt"
    gmt.write_text("a\tdesc\tG1\nb\tdesc\tG2\tG3\n\nc\tdesc\tG1\tG2\tG3\n")
    assert read_gene_sets(gmt) == SETS
    np.testing.assert_array_equal(
        geneset_embeddings(gmt, n_components=2).to_numpy(),
        geneset_embeddings(SETS, n_components=2).to_numpy(),
    )
    nested = {"x": {"a": ["G1"], "b": ["G2", "G3"]}, "global": {"c": ["G1", "G2", "G3"]}}
    path = tmp_path / "n.json"
    path.write_text(json.dumps(nested))
    assert sorted(read_gene_sets(path)) == ["global/c", "x/a", "x/b"]
    assert geneset_embeddings(nested, n_components=2).attrs["n_sets"] == 3
    with pytest.warns(
        UserWarning, match=r"1 genes are in no gene set and get no embedding: \['G9'\]"
    ):
        emb = geneset_embeddings(SETS, n_components=1, genes=["G1", "G2", "G9"])
    assert list(emb.index) == ["G1", "G2"]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"n_components=3 is too large for 3 genes x 3 gene sets"):
        geneset_embeddings(SETS, n_components=3)
    with pytest.raises(ValueError, match="n_components must be a positive integer, got 0"):
        geneset_embeddings(SETS, n_components=0)
    with pytest.raises(
        ValueError, match="No gene set in gene_sets has a gene in the given universe of 1 genes"
    ):
        geneset_embeddings(SETS, genes=["ZZZ"])
    with pytest.raises(TypeError, match="set 'a' must hold a list of genes, got str"):
        geneset_embeddings({"a": "G1"})
    bad = tmp_path / "bad.gmt"
    bad.write_text("a\tonly a description\n")
    with pytest.raises(
        ValueError, match="line 1: a GMT line needs a name, a description and at least one gene"
    ):
        read_gene_sets(bad)
    twice = tmp_path / "twice.gmt"
    twice.write_text("A\tna\tG1\tG2\nA\tna\tG3\n")  # the first line was silently dropped
    with pytest.raises(ValueError, match="line 2: the set name 'A' is used by an earlier line too"):
        read_gene_sets(twice)
    (tmp_path / "sets.txt").write_text("a\tdesc\tG1\n")
    with pytest.raises(ValueError, match=r"expected a \.gmt or \.json file"):
        read_gene_sets(tmp_path / "sets.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        geneset_embeddings(tmp_path / "absent.gmt")


def test_spectra_gene_sets(shared_data):
    path = shared_data / "genesets" / "spectra_default_gene_sets.json"
    sets = read_gene_sets(path)
    assert len(sets) == 181
    assert "global/all_type-I-ifn-response" in sets
    emb = geneset_embeddings(path, n_components=32)
    assert emb.shape[1] == 32
    unit = emb.to_numpy() / np.linalg.norm(emb.to_numpy(), axis=1, keepdims=True)
    unit = unit[np.isfinite(unit).all(axis=1)]
    ifn = [g for g in sets["global/all_type-I-ifn-response"] if g in emb.index]
    rows = emb.index.get_indexer(ifn)
    x = emb.to_numpy()[rows] / np.linalg.norm(emb.to_numpy()[rows], axis=1, keepdims=True)
    within = (x @ x.T)[np.triu_indices(len(ifn), 1)].mean()
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(unit), size=(2000, 2))
    random = np.mean(np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], axis=1))
    print(f"IFN set cosine {within:.3f} vs random pairs {random:.3f}")
    assert within > random + 0.3
