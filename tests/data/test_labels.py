"""canonical_labels and canonical_means: one key per perturbation, merged by cells, bad input named."""

import re

import numpy as np
import pandas as pd
import pytest

from perturbscope.data import canonical_labels, canonical_means


def test_canonical_labels_drop_control_tokens_and_sort_genes():
    labels = canonical_labels(["A+ctrl", "ctrl", "B+A", "ctrl+ctrl", "A+A", "A+B"], control_value="ctrl")
    assert labels.tolist() == ["A", "ctrl", "A+B", "ctrl", "A", "A+B"]
    assert canonical_labels(["A;control", "B;A"], delimiter=";").tolist() == ["A", "A;B"]


def test_canonical_labels_refuse_an_empty_gene_name():
    with pytest.raises(ValueError, match=re.escape("Perturbation label 'A++B' has an empty gene name")):
        canonical_labels(["A", "A++B"])


def test_canonical_means_merge_groups_weighted_by_cells_per_context():
    index = pd.MultiIndex.from_tuples(
        [("control", "x"), ("A+control", "x"), ("A", "x"), ("A+control", "y"), ("control", "y")],
        names=["perturbation", "context"])
    means = pd.DataFrame({"g0": [0.0, 2.0, 8.0, 5.0, 1.0], "g1": [1.0, 1.0, 1.0, 3.0, 0.0]}, index=index)
    merged, counts = canonical_means(means, pd.Series([4, 3, 1, 2, 6], index=index))
    assert merged.index.tolist() == [("control", "x"), ("A", "x"), ("A", "y"), ("control", "y")]
    np.testing.assert_allclose(merged.loc[("A", "x")].to_numpy(), [(3 * 2.0 + 8.0) / 4, 1.0])
    np.testing.assert_allclose(merged.loc[("A", "y")].to_numpy(), [5.0, 3.0])
    assert counts.tolist() == [4, 4, 2, 6]
    unweighted, none = canonical_means(means)
    assert none is None
    np.testing.assert_allclose(unweighted.loc[("A", "x")].to_numpy(), [5.0, 1.0])
    swapped = pd.MultiIndex.from_tuples([("A+B", "x"), ("B+A", "x")], names=["perturbation", "context"])
    both, n = canonical_means(pd.DataFrame({"g0": [1.0, 4.0]}, index=swapped), pd.Series([2, 1], index=swapped))
    assert both.index.tolist() == [("A+B", "x")]
    assert n.tolist() == [3]
    np.testing.assert_allclose(both["g0"], [2.0])  # (2 * 1 + 4) / 3
    same, _ = canonical_means(merged)
    assert same is merged  # already canonical: returned as it is


def test_canonical_means_need_the_two_index_levels():
    means = pd.DataFrame({"g0": [0.0]}, index=pd.Index(["control"], name="perturbation"))
    with pytest.raises(ValueError, match=re.escape(
            "means must have a MultiIndex with levels 'perturbation' and 'context'; ['context'] missing "
            "from its index names ['perturbation'].")):
        canonical_means(means)


def test_splits_refuse_a_combination_written_in_two_gene_orders():
    """Holding out ``"G00+G01"`` while ``"G01+G00"`` trains would leak the double into training."""
    from perturbscope.benchmark import combo_split, unseen_single_split
    from perturbscope.data import simulate_perturbseq

    adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=2, n_cell_types=1,
                                   n_cells_per_condition=6, seed=0)
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    combo = next(p for p in labels if "+" in p)
    first, second = combo.split("+")
    labels[np.flatnonzero(labels == combo)[::2]] = f"{second}+{first}"
    adata.obs["perturbation"] = labels
    message = (f"adata.obs['perturbation'] writes the same perturbation in more than one way: "
               f"{sorted([combo, f'{second}+{first}'])}; one perturbation must have one label, e.g. "
               "adata.obs['perturbation'] = perturbscope.data.canonical_labels(adata.obs['perturbation']).")
    for split in (combo_split, unseen_single_split):
        with pytest.raises(ValueError, match=re.escape(message)):
            split(adata, "perturbation")
    adata.obs["perturbation"] = canonical_labels(adata.obs["perturbation"])
    assert combo_split(adata, "perturbation", test_fraction=1.0).perturbations == sorted(
        {p for p in adata.obs["perturbation"] if "+" in p})


def test_canonical_labels_read_categorical_columns_as_their_strings():
    """AnnData keeps labels as categoricals (unused categories included); the result is that of
    the same labels as strings."""
    values = ["B+A", "control", "A+control", "B+A", "C"]
    column = pd.Series(pd.Categorical(values, categories=["unused", "C", "B+A", "control", "A+control"]))
    expected = ["A+B", "control", "A", "A+B", "C"]
    assert canonical_labels(column).tolist() == expected
    assert canonical_labels(np.array(values)).tolist() == expected
    assert canonical_labels(pd.Series(pd.Categorical(["A", None]))).tolist() == ["A", "nan"]
    assert canonical_labels([]).tolist() == []


def test_every_split_refuses_one_perturbation_written_two_ways():
    """The context split holds out raw labels too: ``"A+control"`` training while ``"A"`` is held
    out would leak A's effect in that context."""
    from perturbscope.benchmark import unseen_context_split
    from perturbscope.data import simulate_perturbseq

    adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
                                   n_cells_per_condition=6, seed=0)
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    labels[np.flatnonzero(labels == "G00")[::2]] = "G00+control"
    adata.obs["perturbation"] = labels
    with pytest.raises(ValueError, match=re.escape(
            "adata.obs['perturbation'] writes the same perturbation in more than one way: ['G00', 'G00+control']")):
        unseen_context_split(adata, "perturbation", "cell_type", "type_1", perturbations=["G00"])


def test_the_context_split_refuses_to_hold_out_nothing():
    from perturbscope.benchmark import unseen_context_split
    from perturbscope.data import simulate_perturbseq

    adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
                                   n_cells_per_condition=6, seed=0)
    with pytest.raises(ValueError, match=re.escape(
            "perturbations is empty; pass None to hold out every perturbation of the context.")):
        unseen_context_split(adata, "perturbation", "cell_type", "type_1", perturbations=[])
    only_controls = adata[(adata.obs["cell_type"] == "type_0").to_numpy()
                          | (adata.obs["perturbation"] == "control").to_numpy()].copy()
    with pytest.raises(ValueError, match=re.escape(
            "context 'type_1' has no perturbed cells to hold out, only 'control' cells.")):
        unseen_context_split(only_controls, "perturbation", "cell_type", "type_1")


def test_missing_labels_are_not_a_group_called_nan():
    import anndata as ad

    from perturbscope.data import perturbation_shifts, pseudobulk

    cells = ad.AnnData(np.ones((4, 2)), obs=pd.DataFrame({"p": ["control", "A", None, "A"]}, index=list("abcd")))
    with pytest.raises(ValueError, match=re.escape(
            "adata.obs['p'] (perturbation_key) has 1 missing labels (first cells: ['c']); label every cell.")):
        perturbation_shifts(cells, "p")
    with pytest.raises(ValueError, match=re.escape("adata.obs has missing values in the groupby columns {'p': 1}")):
        pseudobulk(cells, "p")
    cells.obs["p"] = ["control", "A", "A", "A"]
    cells.obs["line"] = ["x", "x", np.nan, "x"]
    with pytest.raises(ValueError, match=re.escape("adata.obs['line'] (context_key) has 1 missing labels")):
        perturbation_shifts(cells, "p", context_key="line")


def test_perturbation_shifts_refuse_non_finite_values_and_two_spellings_of_one_group():
    """One NaN in a control cell made that gene NaN in every shift; "control " became a perturbation."""
    import anndata as ad

    import perturbscope as ps
    from perturbscope.data import perturbation_shifts

    X = np.array([[1.0, 2], [3, 2], [4, 6], [5, 7]])
    labelled = pd.DataFrame({"p": ["control", "control", "A", "B"]}, index=list("abcd"))
    for bad in (np.nan, np.inf):
        cells = ad.AnnData(X.copy(), obs=labelled.copy())
        cells.X[0, 0] = bad
        message = r"^adata.X has NaN or infinite values in 1 entries; every value must be finite.$"
        with pytest.raises(ValueError, match=message):
            perturbation_shifts(cells, "p")
        with pytest.raises(ValueError, match=message):
            ps.tl.perturbation_effects(cells, perturbation_key="p")
        assert "perturbation_effects" not in cells.uns
    for spelled in (["control", "control ", "A", "B"], ["control", "control", "A", " A"]):
        cells = ad.AnnData(X.copy(), obs=pd.DataFrame({"p": spelled}, index=list("abcd")))
        with pytest.raises(ValueError, match=r"^adata.obs\['p'\] writes the same perturbation in more than one way"):
            perturbation_shifts(cells, "p")
    shifts, control = perturbation_shifts(ad.AnnData(X, obs=labelled), "p")
    assert shifts.loc[("A", "all")].tolist() == [2.0, 4.0]
    numbered = ad.AnnData(X, obs=pd.DataFrame({"p": [0, 0, 5, 7]}, index=list("abcd")))
    by_number, _ = perturbation_shifts(numbered, "p", control_value=0)  # an integer control was a KeyError
    assert by_number.loc[("5", "all")].tolist() == [2.0, 4.0]
    assert shifts.loc[("B", "all")].tolist() == [3.0, 5.0]


def test_perturbation_shifts_take_names_that_are_not_gene_combinations_and_other_delimiters():
    """The two-spellings check parsed every label as genes: a cytokine "IL2+" was refused as an empty gene
    name, and tl.perturbation_effects had no delimiter to pass."""
    import anndata as ad

    import perturbscope as ps
    from perturbscope.data import perturbation_shifts

    X = np.array([[1.0, 2], [3, 2], [4, 6], [5, 7], [9, 9]])
    cells = ad.AnnData(X, obs=pd.DataFrame({"p": ["DMSO", "DMSO", "IL2+", "aCD3", "+/-"]}, index=list("abcde")))
    shifts, _ = perturbation_shifts(cells, "p", control_value="DMSO")
    assert shifts.loc[("IL2+", "all")].tolist() == [2.0, 4.0]
    assert shifts.loc[("+/-", "all")].tolist() == [7.0, 7.0]
    ps.tl.perturbation_effects(cells, perturbation_key="p", control_value="DMSO")
    assert cells.uns["perturbation_effects"]["shifts"].loc["aCD3"].tolist() == [3.0, 5.0]
    swapped = ad.AnnData(X[:4], obs=pd.DataFrame({"p": ["c", "c", "A_B", "B_A"]}, index=list("abcd")))
    ps.tl.perturbation_effects(swapped, perturbation_key="p", control_value="c")  # "+" combinations: none here
    with pytest.raises(ValueError, match=re.escape("adata.obs['p'] writes the same perturbation in more than one "
                                                   "way: ['A_B', 'B_A']")):
        ps.tl.perturbation_effects(swapped, perturbation_key="p", control_value="c", delimiter="_")
    before = swapped.uns["perturbation_effects"]["shifts"].copy()
    for bad in ("", None):
        with pytest.raises(ValueError, match=re.escape(f"delimiter must be a non-empty string such as '+', got {bad!r}.")):
            ps.tl.perturbation_effects(swapped, perturbation_key="p", control_value="c", delimiter=bad)
        assert swapped.uns["perturbation_effects"]["shifts"].equals(before)  # the earlier result, untouched
