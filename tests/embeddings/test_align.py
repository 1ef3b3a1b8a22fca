from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturbscope.embeddings import align_gene_embeddings, read_gene_aliases


@pytest.fixture
def table():
    df = pd.DataFrame(
        {"d0": [1.0, 2.0, 3.0], "d1": [0.0, 4.0, 8.0]}, index=["KLF1", "MAP3K21", "SET"]
    )
    df.attrs = {"source": "test"}
    return df


def test_order_and_duplicates(table):
    out = align_gene_embeddings(table, ["SET", "KLF1", "SET"])
    assert list(out.index) == ["SET", "KLF1", "SET"]
    assert out["d0"].tolist() == [3.0, 1.0, 3.0]
    assert out.attrs == {"source": "test", "matched_by_alias": {}, "filled": []}


def test_missing_raises_listing_genes(table):
    with pytest.raises(
        KeyError, match=r"2 of 3 genes have no embedding: \['HK2', 'MIDN'\].*aliases="
    ):
        align_gene_embeddings(table, ["HK2", "KLF1", "MIDN"])
    with pytest.raises(
        ValueError, match=r"missing must be one of \['raise', 'zero', 'mean'\], got 'drop'"
    ):
        align_gene_embeddings(table, ["KLF1"], missing="drop")
    with pytest.raises(TypeError, match="single string 'KLF1'"):
        align_gene_embeddings(table, "KLF1")


def test_fill_warns_naming_genes(table):
    with pytest.warns(
        UserWarning, match=r"Filled 1 genes without an embedding with the zero vector: \['HK2'\]"
    ):
        zero = align_gene_embeddings(table, ["HK2", "KLF1"], missing="zero")
    assert zero.loc["HK2"].tolist() == [0.0, 0.0]
    assert zero.attrs["filled"] == ["HK2"]
    with pytest.warns(UserWarning, match=r"with the mean embedding: \['HK2'\]"):
        mean = align_gene_embeddings(table, ["KLF1", "HK2"], missing="mean")
    assert mean.loc["HK2"].tolist() == [2.0, 4.0]


def test_aliases_both_directions(table):
    aliases = pd.DataFrame(
        {
            "alias": ["KIAA1804", "MLK4", "AMB", "AMB", "I2PP2A"],
            "symbol": ["MAP3K21", "MAP3K21", "KLF1", "SET", "SET"],
        }
    )
    # Old name requested, official name in the table.
    out = align_gene_embeddings(table, ["KIAA1804", "SET"], aliases=aliases)
    assert out["d0"].tolist() == [2.0, 3.0]
    assert out.attrs["matched_by_alias"] == {"KIAA1804": "MAP3K21"}
    # Official name requested, old name in the table.
    old = table.rename(index={"SET": "I2PP2A"})
    assert align_gene_embeddings(old, ["SET"], aliases=aliases)["d0"].tolist() == [3.0]
    # An alias of two official symbols is ambiguous and not used.
    with pytest.raises(KeyError, match=r"no embedding: \['AMB'\]"):
        align_gene_embeddings(table, ["AMB"], aliases=aliases)
    # A mapping works too.
    assert align_gene_embeddings(table, ["MLK4"], aliases={"MLK4": "MAP3K21"})["d0"].tolist() == [
        2.0
    ]


def test_ensembl_through_var_column(table):
    var = pd.DataFrame(
        {"gene_symbol": ["SET", "KLF1", None]},
        index=["ENSG00000119335", "ENSG00000105610", "ENSG00000000001"],
    )
    with pytest.warns(UserWarning, match=r"\['ENSG00000000001'\]"):
        out = align_gene_embeddings(table, var.index, id_map=var["gene_symbol"], missing="zero")
    assert list(out.index) == list(var.index)
    assert out["d0"].tolist() == [3.0, 1.0, 0.0]
    with pytest.raises(TypeError, match="id_map must be a mapping or a pandas Series, got list"):
        align_gene_embeddings(table, ["SET"], id_map=["SET"])


def test_invalid_table_and_alias_table(table):
    duplicated = pd.concat([table, table.iloc[:1]])
    with pytest.raises(ValueError, match=r"duplicated genes \['KLF1'\]"):
        align_gene_embeddings(duplicated, ["KLF1"])
    with pytest.raises(KeyError, match=r"alias table lacks columns \['alias'\]"):
        read_gene_aliases(pd.DataFrame({"synonym": ["A"], "symbol": ["B"]}))
    with pytest.raises(FileNotFoundError, match="Alias file .* does not exist"):
        read_gene_aliases("absent.tsv")


def test_real_alias_and_id_tables(shared_data):
    folder = shared_data / "annotations"
    aliases = read_gene_aliases(folder / "human_gene_aliases.tsv.gz")
    assert list(aliases.columns) == ["alias", "symbol"]
    ids = pd.read_csv(folder / "human_gene_ids.tsv.gz", sep="\t", dtype=str).dropna()
    ids = ids.drop_duplicates("ensembl_gene_id").set_index("ensembl_gene_id")["symbol"]
    df = pd.DataFrame(np.eye(3), index=["KLF1", "MAP3K21", "SET"], columns=["a", "b", "c"])
    ensembl = ids[ids.isin(["KLF1", "SET"])].index.tolist()
    out = align_gene_embeddings(df, [*ensembl, "MLK4"], id_map=ids, aliases=aliases)
    assert out.loc["MLK4"].tolist() == [0.0, 1.0, 0.0]
    assert sorted(out.iloc[:2].to_numpy().argmax(axis=1).tolist()) == [0, 2]
