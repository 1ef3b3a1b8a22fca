"""canonical_labels and canonical_means: one key per perturbation, merged by cells, bad input named."""

import re

import numpy as np
import pandas as pd
import pytest

from perturbscope.data import canonical_labels, canonical_means


def test_canonical_labels_drop_control_tokens_and_keep_gene_order():
    labels = canonical_labels(["A+ctrl", "ctrl", "B+A", "ctrl+ctrl", "A+A"], control_value="ctrl")
    assert labels.tolist() == ["A", "ctrl", "B+A", "ctrl", "A"]
    assert canonical_labels(["A;control", "A;B"], delimiter=";").tolist() == ["A", "A;B"]


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
    same, _ = canonical_means(merged)
    assert same is merged  # already canonical: returned as it is


def test_canonical_means_need_the_two_index_levels():
    means = pd.DataFrame({"g0": [0.0]}, index=pd.Index(["control"], name="perturbation"))
    with pytest.raises(ValueError, match=re.escape(
            "means must have a MultiIndex with levels 'perturbation' and 'context'; ['context'] missing "
            "from its index names ['perturbation'].")):
        canonical_means(means)
