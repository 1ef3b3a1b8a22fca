import json
import re

import numpy as np
import pandas as pd
import pytest

from perturbscope.probe import gene_set_table, rank_pathways


@pytest.fixture(scope="module")
def ranked_scores():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(600)]
    scores = pd.Series(rng.normal(size=600), index=genes)
    scores.iloc[:25] += 3.0  # the "response" set scores high
    sets = {
        "response": genes[:25],
        "random": list(rng.choice(genes[100:], 30, replace=False)),
        "depleted": genes[575:],
        "tiny": genes[:3],
    }
    scores.iloc[575:] -= 3.0
    return scores, sets


def test_ora_finds_the_enriched_set(ranked_scores):
    scores, sets = ranked_scores
    table = rank_pathways(scores, sets, method="ora", top_n=50)
    assert list(table.columns) == [
        "pathway",
        "collection",
        "score",
        "pvalue",
        "n_genes",
        "padj",
        "n_hits",
    ]
    assert table.iloc[0]["pathway"] == "response"
    assert table.iloc[0]["padj"] < 1e-10
    assert table.iloc[0]["score"] > 0
    row = table.set_index("pathway").loc["response"]
    # hits are the set's genes among the 50 best, counted independently of decoupler
    assert row["n_hits"] == len(set(sets["response"]) & set(scores.nlargest(50).index))
    assert table.set_index("pathway").loc["random", "padj"] > 0.05
    assert "tiny" not in set(table["pathway"])  # below min_size


def test_ora_is_one_sided_so_a_depleted_set_is_not_significant(ranked_scores):
    from scipy.stats import fisher_exact

    scores, sets = ranked_scores
    table = rank_pathways(scores, sets, method="ora", top_n=50).set_index("pathway")
    # decoupler's own p-value is two-sided: "depleted" (no gene among the top 50) ranked as
    # significant; over-representation gives it p = 1
    assert table.loc["depleted", "n_hits"] == 0
    assert table.loc["depleted", "pvalue"] == pytest.approx(1.0)
    assert table.loc["depleted", "score"] < 0
    for name in ("response", "random", "depleted"):
        hits, size = table.loc[name, "n_hits"], table.loc[name, "n_genes"]
        expected = fisher_exact([[hits, size - hits], [50 - hits, 600 - size - 50 + hits]], alternative="greater")[1]
        assert table.loc[name, "pvalue"] == pytest.approx(expected, rel=1e-9), name
    assert list(table.index[:1]) == ["response"]


def test_gsea_orders_sets_by_direction(ranked_scores):
    scores, sets = ranked_scores
    table = rank_pathways(scores, sets, method="gsea", n_permutations=200).set_index("pathway")
    assert table.loc["response", "score"] > 0 > table.loc["depleted", "score"]
    assert table.loc["response", "pvalue"] == pytest.approx(1 / 201)
    assert table.loc["random", "pvalue"] > 0.05


def test_dataframe_input_and_nested_sets(ranked_scores):
    scores, sets = ranked_scores
    frame = pd.DataFrame({"probe_alignment": scores, "other": 0.0})
    nested = {"global": {"response": sets["response"]}, "T": {"random": sets["random"]}}
    table = rank_pathways(frame, nested, top_n=50)
    assert dict(zip(table["pathway"], table["collection"])) == {"response": "global", "random": "T"}


def test_gene_set_files(tmp_path, ranked_scores):
    _, sets = ranked_scores
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("\n".join(f"{k}\tdescription\t" + "\t".join(v) for k, v in sets.items()))
    from_gmt = gene_set_table(gmt)
    assert from_gmt.groupby("source")["target"].nunique().to_dict() == {
        k: len(v) for k, v in sets.items()
    }
    nested = {"A": {"same": ["x", "y"]}, "B": {"same": ["z"], "other": ["x"]}}
    path = tmp_path / "sets.json"
    path.write_text(json.dumps(nested))
    net = gene_set_table(path)
    assert set(net["source"]) == {"A:same", "B:same", "other"}


def test_real_spectra_sets_load(shared_data):
    net = gene_set_table(shared_data / "genesets" / "spectra_default_gene_sets.json")
    ifn = net[net["source"] == "all_type-I-ifn-response"]
    assert len(ifn) == 17
    assert set(ifn["collection"]) == {"global"}
    assert net["source"].nunique() == 181


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "gsva"}, "method must be 'ora' or 'gsea', got 'gsva'"),
        ({"top_n": 0}, r"top_n must be in \[1, 600\) \(the scored genes\), got 0"),
        ({"top_n": 600}, r"top_n must be in \[1, 600\)"),
        ({"seed": 0}, "seed must be >= 1, got 0"),
        ({"min_size": 500}, "no gene set has at least min_size=500 scored genes"),
    ],
)
def test_bad_inputs(ranked_scores, kwargs, message):
    scores, sets = ranked_scores
    with pytest.raises(ValueError, match=message):
        rank_pathways(scores, sets, **kwargs)


def test_bad_gene_sets(tmp_path, ranked_scores):
    scores, _ = ranked_scores
    with pytest.raises(
        ValueError, match="score_column 'score' is not a column of scores; columns are"
    ):
        rank_pathways(pd.DataFrame({"x": scores}), {"a": ["G1"]}, score_column="score")
    with pytest.raises(ValueError, match="gene set file .*absent.gmt' does not exist"):
        rank_pathways(scores, tmp_path / "absent.gmt")
    (tmp_path / "sets.txt").write_text("a")
    with pytest.raises(ValueError, match=r"must end in .gmt or .json"):
        rank_pathways(scores, tmp_path / "sets.txt")
    with pytest.raises(
        ValueError, match="gene set 'a' must be a list of genes, got the string 'G1'"
    ):
        rank_pathways(scores, {"a": "G1"})
    with pytest.raises(  # inside a collection a string was read as its letters
        ValueError, match="gene set 'coll/IFN' must be a list of genes, got the string 'ISG15'"
    ):
        gene_set_table({"coll": {"IFN": "ISG15"}})
    with pytest.raises(ValueError, match=re.escape(
            "gene set 'a/b' holds a mapping: gene sets nest at most one level ({collection: {set: genes}}).")):
        gene_set_table({"a": {"b": {"S1": ["G1", "G2"]}}})
    with pytest.raises(
        ValueError, match="gene_sets must be a GMT or JSON path or a dict, got list"
    ):
        rank_pathways(scores, [["G1"]])


def test_ora_score_and_hits_come_from_the_same_genes_when_scores_tie():
    genes = [f"G{i}" for i in range(100)]
    scores = pd.Series(np.r_[np.ones(10), np.linspace(0.5, -1, 90)], index=genes)  # 10 tied at the top
    sets = {"first_five": genes[:5], "next_five": genes[5:10], "filler": genes[50:60]}
    table = rank_pathways(scores, sets, method="ora", top_n=5, min_size=3).set_index("pathway")
    # the tie is broken once; whichever set gets the hits, its score, p-value and n_hits agree
    assert sorted(table.loc[["first_five", "next_five"], "n_hits"]) == [0, 5]
    # decoupler's score is the Haldane-corrected log odds ratio (0.5 added to every cell), by hand
    # from the same hits: a = hits, b = set - hits, c = top_n - hits, d = the rest
    for name in ("first_five", "next_five"):
        a = table.loc[name, "n_hits"]
        b, c = 5 - a, 5 - a
        d = 100 - a - b - c
        expected = np.log((a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5)))
        assert table.loc[name, "score"] == pytest.approx(expected, rel=1e-5), table
        assert (table.loc[name, "pvalue"] < 1e-5) == (a == 5), table
