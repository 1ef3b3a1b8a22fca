import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.benchmark import (
    de_overlap,
    direction_agreement,
    discrimination_score,
    energy_distance,
    evaluate,
    histogram_kl,
    l2_distance,
    mae,
    mean_squared_error,
    moment_errors,
    pearson_delta,
    prepare_reference,
    top_de_genes,
)


def test_pearson_delta_hand_computed():
    # deltas (1, 0, -1) and (2, 0, 0): cov = 2/3... r = 2 / (sqrt(2) * sqrt(8/3) * sqrt(3/2)) = sqrt(3)/2
    value = pearson_delta(np.array([2.0, 1, 0]), np.array([3.0, 1, 1]), np.array([1.0, 1, 1]))
    assert value == pytest.approx(np.sqrt(3) / 2)
    # a constant change (no-change prediction, even with float32 rounding) scores 0
    assert pearson_delta(np.array([1.0, 1, 1]) + 1e-8, np.array([3.0, 1, 1]), np.ones(3)) == 0.0


def test_mse_l2_direction_overlap_hand_computed():
    assert mean_squared_error(np.array([1.0, 2]), np.array([0.0, 4])) == pytest.approx(2.5)
    assert l2_distance(np.array([0.0, 3]), np.array([4.0, 0])) == pytest.approx(5.0)
    assert direction_agreement(
        np.array([2.0, 0, 1, 3]), np.array([3.0, 2, 1, 0]), np.ones(4)
    ) == pytest.approx(0.5)
    assert mae(np.array([1.0, 2]), np.array([0.0, 4])) == pytest.approx(1.5)
    assert de_overlap(["a", "b", "c"], ["b", "c", "d", "e"]) == 0.5
    # cell-eval compares the top len(observed) of each ranked list: "c" is predicted 3rd
    assert de_overlap(["a", "b", "c"], ["a", "c"]) == 0.5
    assert de_overlap(["a", "b", "c"], ["a", "c"], k=1) == 1.0
    # no observed DE gene: cell-eval scores 0
    assert de_overlap(["a"], []) == 0.0


def test_discrimination_score_hand_computed():
    obs = pd.DataFrame([[0.0, 0], [1, 1], [4, 4]], index=["a", "b", "c"])
    # L1 from predicted a (1, 1): observed b 0, a 2, c 6 -> a ranked 2nd of 3 -> 1 - 1/3
    pred = pd.DataFrame([[1.0, 1], [0, 0], [4, 3]], index=["a", "b", "c"])
    assert discrimination_score(pred, obs).tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert discrimination_score(obs, obs).tolist() == [1.0, 1.0, 1.0]
    # one prediction for all: ranks 0, 1, 2 are each taken once -> mean (n + 1) / (2n)
    shared = pd.DataFrame([[1.0, 1]] * 3, index=obs.index)
    assert discrimination_score(shared, obs).tolist() == pytest.approx([2 / 3, 1.0, 1 / 3])
    # the gene named like the perturbation is left out: here it decides the ranking
    named = pd.DataFrame([[0.0, 0], [0, 5]], index=["g1", "x"], columns=["g0", "g1"])
    guess = pd.DataFrame([[0.0, 5], [0, 5]], index=["g1", "x"], columns=["g0", "g1"])
    assert discrimination_score(guess, named).tolist() == [1.0, 1.0]
    assert discrimination_score(guess, named, exclude_target_gene=False).tolist() == [0.5, 1.0]
    assert np.isnan(discrimination_score(obs.iloc[:1], obs.iloc[:1]).iloc[0])
    with pytest.raises(ValueError, match="^predicted and observed must list the same perturbations"):
        discrimination_score(pred.iloc[::-1], obs)
    with pytest.raises(ValueError, match="^predicted and observed must have the same genes"):
        discrimination_score(pred, obs.set_axis(["x", "y"], axis=1))


def test_moment_errors_hand_computed():
    pred = np.array([[0.0, 1], [2, 1], [4, 1]])  # gene 0: var 8/3, skew 0; gene 1 constant
    obs = np.array([[0.0, 0], [0, 0], [3, 3]])  # var 2, skew 1/sqrt(2), kurtosis -1.5
    errors = moment_errors(pred, obs)
    assert errors["variance_error"] == pytest.approx((abs(8 / 3 - 2) + 2) / 2)
    assert errors["skewness_error"] == pytest.approx(1 / np.sqrt(2))
    # kurtosis of (0, 2, 4) is -1.5; constant gene counts 0
    assert errors["kurtosis_error"] == pytest.approx((0 + 1.5) / 2)
    # variance ratio: median over genes varying in obs of pred/obs variance: (8/3)/2 and 0/2
    assert errors["variance_ratio"] == pytest.approx(((8 / 3) / 2 + 0.0) / 2)


def test_variance_ratio_flags_collapse():
    rng = np.random.default_rng(0)
    observed = rng.normal(size=(200, 5))
    collapsed = np.tile(observed.mean(axis=0), (200, 1)) + rng.normal(scale=0.1, size=(200, 5))
    assert moment_errors(collapsed, observed)["variance_ratio"] < 0.05
    assert moment_errors(observed[::-1], observed)["variance_ratio"] == pytest.approx(1.0)


def test_histogram_kl_hand_computed():
    bins = np.array([0.0, 1, 2])
    # observed (0.5, 1.5) -> (1/2, 1/2); predicted (0.5, 0.5, 0.5, 1.5) -> (3/4, 1/4)
    kl = histogram_kl(
        np.array([[0.5], [0.5], [0.5], [1.5]]), np.array([[0.5], [1.5]]), bins=bins, pseudocount=0.0
    )
    expected = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert kl[0] == pytest.approx(expected)
    # out-of-range values fall in the end bins
    assert histogram_kl(np.array([[-3.0]]), np.array([[0.2]]), bins=bins)[0] == pytest.approx(0.0)


def test_energy_distance_is_euclidean_not_squared():
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])
    # 2 * mean|x-y| = 2 * 1.5; mean|x-x'| = mean|y-y'| = 1 (all pairs)
    assert energy_distance(x, y) == pytest.approx(1.0)
    assert energy_distance(x, x) == pytest.approx(0.0)
    # same mean, different spread: squared distances would give 0, Euclidean does not
    a, b = np.array([[-1.0], [1.0]]), np.array([[-3.0], [3.0]])
    assert energy_distance(a, b) == pytest.approx(2 * 3 - 1 - 3)


def _toy():
    rng = np.random.default_rng(0)
    control = rng.normal(2, 0.3, (30, 6))
    a = control + np.array([1.0, -1, 0, 0, 0, 0]) + rng.normal(0, 0.05, (30, 6))
    b = control + np.array([0, 0, 0.8, 0, 0, -0.8]) + rng.normal(0, 0.05, (30, 6))
    genes = [f"g{i}" for i in range(6)]
    observed = ad.AnnData(
        np.vstack([a, b]),
        obs=pd.DataFrame({"p": ["A"] * 30 + ["B"] * 30}, index=[f"o{i}" for i in range(60)]),
        var=pd.DataFrame(index=genes),
    )
    ctrl = ad.AnnData(
        control, obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]), var=pd.DataFrame(index=genes)
    )
    return observed, ctrl


def test_top_de_genes_finds_the_shifted_genes():
    observed, control = _toy()
    both = ad.concat(
        [
            observed,
            ad.AnnData(
                control.X,
                obs=pd.DataFrame({"p": "control"}, index=control.obs_names),
                var=control.var,
            ),
        ]
    )
    de = top_de_genes(both, "p", "control", n_genes=2)
    assert sorted(de["A"]) == ["g0", "g1"]
    assert sorted(de["B"]) == ["g2", "g5"]
    assert "control" not in de
    with pytest.raises(ValueError, match="reference 'ctrl' is not a value"):
        top_de_genes(both, "p", "ctrl")


def test_evaluate_perfect_prediction_and_layout():
    observed, control = _toy()
    reference = prepare_reference(observed, control, "p", n_de=2, n_pcs=3)
    scores = evaluate(observed, reference, perturbation_key="p", layer=None)
    assert list(scores.index) == ["A", "B"]
    assert scores["pearson_delta"].tolist() == pytest.approx([1.0, 1.0])
    assert scores["pearson_delta_top_de"].tolist() == pytest.approx([1.0, 1.0])
    assert scores["l2_top_expressed"].tolist() == pytest.approx([0.0, 0.0])
    assert scores["direction_top_de"].tolist() == [1.0, 1.0]
    assert scores["discrimination_score"].tolist() == [1.0, 1.0]
    assert scores["de_overlap"].tolist() == [1.0, 1.0]
    assert scores["mae"].tolist() == [0.0, 0.0]
    assert scores["energy_distance"].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    # swapping the predictions makes each one the worst match
    swapped = observed.copy()
    swapped.obs["p"] = ["B"] * 30 + ["A"] * 30
    worst = evaluate(swapped, reference, perturbation_key="p", layer=None)
    # cell-eval's scale: the farthest of n = 2 scores 1 - 1/2
    assert worst["discrimination_score"].tolist() == [0.5, 0.5]
    # A's DE genes are g0, g1 and B's g2, g5: no overlap once swapped
    assert worst["de_overlap"].tolist() == [0.0, 0.0]


def test_evaluate_errors():
    observed, control = _toy()
    reference = prepare_reference(observed, control, "p", n_de=2, n_pcs=3)
    with pytest.raises(ValueError, match=r"perturbations \['B'\] are observed but not predicted"):
        evaluate(observed[observed.obs["p"] == "A"], reference, perturbation_key="p", layer=None)
    with pytest.raises(KeyError, match="perturbation_key 'perturbation' not in predicted.obs"):
        evaluate(observed, reference, layer=None)


def test_distribution_metrics_are_skipped_only_for_perturbations_with_one_row():
    """An extra, unscored label with a single row does not blank the other perturbations'
    distributional metrics; a scored perturbation with one row gets NaN for its own."""
    observed, control = _toy()
    reference = prepare_reference(observed, control, "p", n_de=2, n_pcs=3)
    extra = ad.concat([observed, ad.AnnData(observed.X[:1], obs=pd.DataFrame({"p": ["zzz"]}, index=["x0"]),
                                            var=observed.var)])
    scores = evaluate(extra, reference, perturbation_key="p", layer=None)
    assert scores["energy_distance"].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    one_a = ad.concat([observed[observed.obs["p"] == "A"][:1], observed[observed.obs["p"] == "B"]])
    scores = evaluate(one_a, reference, perturbation_key="p", layer=None)
    assert np.isnan(scores.loc["A", "energy_distance"])
    assert scores.loc["B", "energy_distance"] == pytest.approx(0.0, abs=1e-9)


def test_given_de_genes_and_means_are_checked_and_left_alone():
    observed, control = _toy()
    with pytest.raises(KeyError, match=r"de_genes names genes that are not in observed.var_names: \{'A': \['NOPE'\]\}"):
        prepare_reference(observed, control, "p", de_genes={"A": ["g0", "NOPE"], "B": ["g2"]}, n_pcs=3)
    with pytest.raises(KeyError, match=r"de_genes has no entry for the observed perturbations \['B'\]"):
        prepare_reference(observed, control, "p", de_genes={"A": ["g0"]}, n_pcs=3)
    reference = prepare_reference(observed, control, "p", n_de=2, n_pcs=3)
    reference.de_genes["A"] = ["g0", "NOPE"]  # a reference edited by hand
    with pytest.raises(KeyError, match=re.escape("reference.de_genes['A'] names genes that are not in its var_names: ['NOPE'].")):
        evaluate(observed, reference, perturbation_key="p", layer=None)
    reference = prepare_reference(observed, control, "p", n_de=2, n_pcs=3)
    means = pd.DataFrame(reference.observed_means.to_numpy(), index=pd.Index(["A", "B"], dtype=object),
                         columns=observed.var_names)
    index_before = means.index
    evaluate(observed, reference, perturbation_key="p", layer=None, predicted_means=means)
    assert means.index is index_before


def test_a_reference_needs_cells_on_both_sides():
    observed, control = _toy()
    with pytest.raises(ValueError, match=re.escape(
            "control has no cells; the reference needs held-out perturbed cells and control cells.")):
        prepare_reference(observed, control[:0].copy(), "p", n_pcs=3)
    with pytest.raises(ValueError, match=re.escape("observed has no cells")):
        prepare_reference(observed[:0].copy(), control, "p", n_pcs=3)
