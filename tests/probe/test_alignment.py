import re

import numpy as np
import pytest

from perturbscope.probe import axis_alignment_scores, decoder_jacobian, mean_expression_baseline


@pytest.fixture(scope="module")
def scored(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata.copy()
    table = axis_alignment_scores(
        model,
        sub,
        "state",
        reference="control",
        target="stimulated",
        n_cells=60,
        seed=3,
        progress_bar=False,
    )
    return model, sub, table


def test_table_and_var_column(scored):
    _, sub, table = scored
    assert list(table.columns) == [
        "probe_alignment",
        "mean_expression_baseline",
        "mean_reference",
        "mean_target",
    ]
    assert table.shape == (40, 4)
    assert table["probe_alignment"].is_monotonic_decreasing
    assert table["probe_alignment"].between(-1, 1).all()
    np.testing.assert_allclose(
        sub.var["probe_alignment"].to_numpy(),
        table.loc[sub.var_names, "probe_alignment"].to_numpy(),
    )


def test_response_genes_align_with_the_axis(scored):
    _, _, table = scored
    response = [f"gene{i}" for i in range(10)]  # up 6-fold in the stimulated state
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(table.index.isin(response), table["probe_alignment"])
    print(f"tiny model: AUROC of the response genes {auroc:.3f}")
    assert auroc > 0.75  # measured 0.86 on this tiny model
    assert table.loc[response, "probe_alignment"].median() > 0.3
    assert (table.loc[response, "mean_expression_baseline"] > 0.5).all()


def test_scores_equal_the_mean_cosine_of_explicit_jacobians(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata.copy()
    table = axis_alignment_scores(
        model,
        sub,
        "state",
        "control",
        "stimulated",
        at="target",
        n_cells=25,
        seed=7,
        genes=["gene0", "gene20", "gene30"],
        progress_bar=False,
    )
    z = model.get_latent_representation(sub)
    stimulated = (sub.obs["state"] == "stimulated").to_numpy()
    axis = z[stimulated].mean(0) - z[~stimulated].mean(0)
    rows = np.sort(np.random.default_rng(7).choice(np.flatnonzero(stimulated), 25, replace=False))
    jac = decoder_jacobian(
        model, sub[rows].copy(), genes=["gene0", "gene20", "gene30"], progress_bar=False
    )
    cos = (jac @ axis) / (np.linalg.norm(jac, axis=2) * np.linalg.norm(axis))
    np.testing.assert_allclose(
        table.loc[["gene0", "gene20", "gene30"], "probe_alignment"], cos.mean(0), atol=1e-5
    )
    assert np.isnan(sub.var.loc["gene1", "probe_alignment"])


def test_baseline_matches_observed_means(scored):
    model, sub, table = scored
    counts = sub.X.toarray()
    normalised = counts / counts.sum(1, keepdims=True) * 1e4
    stimulated = (sub.obs["state"] == "stimulated").to_numpy()
    m0, m1 = normalised[~stimulated].mean(0), normalised[stimulated].mean(0)
    np.testing.assert_allclose(table.loc[sub.var_names, "mean_reference"], m0, rtol=1e-5)
    np.testing.assert_allclose(
        table.loc[sub.var_names, "mean_expression_baseline"],
        (m1 - m0) / (0.5 * (m1 + m0)),
        rtol=1e-5,
    )


def test_mean_expression_baseline_handles_zeros():
    np.testing.assert_allclose(
        mean_expression_baseline(np.array([1.0, 0.0, 2.0]), np.array([3.0, 0.0, 0.0])),
        [1.0, 0.0, -2.0],
    )


def test_seed_makes_sampling_reproducible(tiny_scvi):
    model, adata = tiny_scvi
    kwargs = {"n_cells": 20, "progress_bar": False, "genes": ["gene0", "gene39"]}
    a = axis_alignment_scores(
        model, adata.copy(), "state", "control", "stimulated", seed=1, **kwargs
    )
    b = axis_alignment_scores(
        model, adata.copy(), "state", "control", "stimulated", seed=1, **kwargs
    )
    c = axis_alignment_scores(
        model, adata.copy(), "state", "control", "stimulated", seed=2, **kwargs
    )
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    assert not np.allclose(a["probe_alignment"], c.loc[a.index, "probe_alignment"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"groupby": "condition"},
            r"groupby 'condition' is not a column of adata.obs; columns are \['batch', 'state'",
        ),
        (
            {"reference": "ctrl"},
            r"reference 'ctrl' is not a value of adata.obs\['state'\]; values are \['control', 'stimulated'\]",
        ),
        ({"target": "IFN"}, r"target 'IFN' is not a value"),
        ({"target": "control"}, "reference and target must differ, both are 'control'"),
        ({"at": "all"}, "at must be 'both', 'reference' or 'target', got 'all'"),
        ({"n_cells": 0}, "n_cells must be a positive integer, got 0"),
    ],
)
def test_bad_inputs(tiny_scvi, kwargs, message):
    model, adata = tiny_scvi
    args = {"groupby": "state", "reference": "control", "target": "stimulated"} | kwargs
    with pytest.raises(ValueError, match=message):
        axis_alignment_scores(model, adata, **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"genes": []}, "genes is empty; pass at least one gene name, or None for all genes"),
        ({"genes": 5}, "genes must be a gene name or a list of gene names, got 5"),
        ({"genes": ["gene0", "IFI6"]}, "genes ['IFI6'] are not decoded by the model (40 genes"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"n_cells": 1.5}, "n_cells must be a positive integer, got 1.5"),
    ],
)
def test_bad_genes_and_sizes(tiny_scvi, kwargs, message):
    model, adata = tiny_scvi
    with pytest.raises(ValueError, match=re.escape(message)):
        axis_alignment_scores(model, adata, "state", "control", "stimulated", **kwargs)


def test_mean_expression_baseline_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape(
        "m_reference and m_target must have the same shape, got (2,) and (3,)"
    )):
        mean_expression_baseline(np.zeros(2), np.zeros(3))
