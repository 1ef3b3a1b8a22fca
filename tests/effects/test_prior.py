"""The effect prior: its scoring helpers, its kinds of query, its choices and its intervals."""

import copy
import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from perturbscope.data import (
    log1p_normalized,
    parse_perturbation,
    perturbation_shifts,
    simulate_perturbseq,
)
from perturbscope.effects import (
    AdditiveBaseline,
    EffectPrior,
    bagged_stack_weights,
    conformal_quantile,
    gene_scaled_quantiles,
    pick,
    stack_weights,
    top_change_scores,
)
from perturbscope.effects._prior import FEW_SHOT_CELLS

EMBEDDING_MAPS = {"linear", "embedding_nn"}
SUMS_OF_SINGLES = ("additive", "interaction")


def _touching(labels, genes):
    """Cells whose perturbation involves any of ``genes`` (singles and combinations)."""
    genes = set(genes)
    return np.array([bool(set(parse_perturbation(p)) & genes) for p in labels.astype(str)])


def _observed_shifts(adata):
    """Observed mean shifts of every perturbation, from log1p-normalised counts."""
    logged = ad.AnnData(log1p_normalized(adata), obs=adata.obs[["perturbation"]].copy(),
                        var=pd.DataFrame(index=adata.var_names))
    return perturbation_shifts(logged, "perturbation")[0]


# ---------------------------------------------------------------- hand-computed helpers
def test_conformal_quantile_hand_values():
    scores = np.column_stack([np.arange(1.0, 10.0), np.arange(9.0, 0.0, -1.0) * 10])
    # n = 9: rank ceil(10 * 0.8) = 8 -> the 8th smallest of each column
    assert conformal_quantile(scores, 0.8).tolist() == [8.0, 80.0]
    # rank ceil(10 * 0.5) = 5
    assert conformal_quantile(scores, 0.5).tolist() == [5.0, 50.0]
    # n = 3 at 0.95: rank ceil(3.8) = 4 > n, so the largest score
    assert conformal_quantile(np.array([[0.3], [0.1], [0.2]]), 0.95).tolist() == [0.3]
    # n = 4 at 0.5: rank ceil(2.5) = 3 -> third smallest
    assert conformal_quantile(np.array([[4.0], [1.0], [3.0], [2.0]]), 0.5).tolist() == [3.0]


def test_top_change_scores_hand_values():
    predicted, observed = np.array([1.0, 0.0, 0.5]), np.array([2.0, 0.1, 1.0])
    # all 3 genes: MSE (1 + 0.01 + 0.25) / 3 = 0.42; Pearson of (1, 0, 0.5) with (2, 0.1, 1)
    mse, pearson = top_change_scores(predicted, observed, n_genes=3)
    assert mse == 0.42
    expected = np.corrcoef(predicted, observed)[0, 1]
    assert pearson == pytest.approx(expected, abs=1e-11)
    assert pearson == pytest.approx(0.99953863896, abs=1e-11)
    # the 2 most changed genes are 0 and 2: MSE (1 + 0.25) / 2, perfectly correlated
    assert top_change_scores(predicted, observed, n_genes=2) == (0.625, 1.0)
    # ranking by |observed|: a large negative change counts
    assert top_change_scores(np.array([0.0, -1.0, 9.0]), np.array([0.1, -3.0, 0.0]), n_genes=1) == (4.0, 0.0)
    # a constant prediction on the scored genes carries no direction: Pearson 0
    assert top_change_scores(np.zeros(3), observed, n_genes=3) == (pytest.approx((4 + 0.01 + 1) / 3), 0.0)
    # ties in |observed| are broken by gene order (not by the sort algorithm): of the 16 genes
    # tied at |2|, the first 5 (by index) are scored, and a prediction right on those alone is exact
    tied = np.tile([2.0, -1.0, -2.0, 0.5], 10)
    first = np.flatnonzero(np.abs(tied) == 2)[:5]
    guess = np.full(40, 9.0)
    guess[first] = tied[first]
    assert top_change_scores(guess, tied, n_genes=5)[0] == 0.0


def test_pick_hand_values():
    # best Pearson wins outright when nothing else is within the tolerance
    assert pick({"a": [(9.0, 0.9)], "b": [(0.1, 0.5)]}, ["a", "b"]) == "a"
    # within 0.02 of the best Pearson, the lowest MSE wins
    assert pick({"a": [(1.0, 0.50)], "b": [(0.5, 0.49)], "c": [(0.1, 0.2)]}, ["a", "b", "c"]) == "b"
    # scores are averaged over the list: a = (2, 0.6), b = (1, 0.55)
    scores = {"a": [(1.0, 0.4), (3.0, 0.8)], "b": [(1.0, 0.55), (1.0, 0.55)]}
    assert pick(scores, ["a", "b"]) == "a"
    assert pick(scores, ["a", "b"], tolerance=0.06) == "b"
    # exact ties go to the earlier option in order
    tie = {"x": [(1.0, 0.5)], "y": [(1.0, 0.5)]}
    assert pick(tie, ["x", "y"]) == "x"
    assert pick(tie, ["y", "x"]) == "y"
    # options without scores are ignored
    assert pick({"a": [], "b": [(2.0, 0.1)], "c": [(3.0, 0.0)]}, ["a", "b", "c"]) == "b"


def test_stack_weights_hand_values():
    truth = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    # a candidate twice the truth gets weight 1/2; one that is all zeros gets 0
    w = stack_weights({"double": 2 * truth, "zero": np.zeros_like(truth)}, truth, n_genes=3)
    assert w == {"double": pytest.approx(0.5, abs=1e-12), "zero": 0.0}
    # the truth is exactly 1 * a + 2 * b: recovered
    a, b = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    w = stack_weights({"a": a, "b": b}, 1 * a + 2 * b, n_genes=3)
    assert w == {"a": pytest.approx(1.0, abs=1e-12), "b": pytest.approx(2.0, abs=1e-12)}
    # a candidate that points the wrong way is not used (weights are non-negative)
    w = stack_weights({"against": -truth}, truth, n_genes=3)
    assert w == {"against": 0.0}
    # fitted on each row's most changed genes only: n_genes=1 keeps 2.0 (row 0) and one of the
    # 1.0s (row 1, the first in the ranking); a candidate right there and wrong elsewhere gets 1
    right_on_top = np.array([[2.0, 5.0, 5.0], [0.0, 1.0, 5.0]])
    assert stack_weights({"c": right_on_top}, truth, n_genes=1) == {"c": pytest.approx(1.0, abs=1e-12)}


def test_bagged_stack_weights_hand_values():
    # row 0 alone gives weight 1, row 1 alone weight 4 (0.5 * 4 = 2), both rows 1.6 (minimum
    # of (w - 1)^2 + (0.5 w - 2)^2). A bootstrap of 2 rows draws only row 0, only row 1 or both
    # with chance 1/4, 1/4, 1/2: the bagged weight tends to 0.25 + 1.0 + 0.8 = 2.05.
    truth = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    candidate = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    assert stack_weights({"c": candidate}, truth, n_genes=3)["c"] == pytest.approx(1.6, abs=1e-12)
    assert bagged_stack_weights({"c": candidate}, truth, 3, n_bootstrap=0)["c"] == pytest.approx(1.6, abs=1e-12)
    bagged = bagged_stack_weights({"c": candidate}, truth, 3, n_bootstrap=4000, seed=0)["c"]
    assert bagged == pytest.approx(2.05, abs=0.06)   # standard error 0.018
    with pytest.raises(ValueError, match=r"^n_bootstrap must be >= 0, got -1"):
        bagged_stack_weights({"c": candidate}, truth, 3, n_bootstrap=-1)
    with pytest.raises(ValueError, match=r"^stack_weights needs at least one candidate"):
        bagged_stack_weights({}, truth)


def test_stack_weights_bad_input():
    truth = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"^stack_weights needs at least one candidate and held-out rows; got 0 candidates"):
        stack_weights({}, truth)
    with pytest.raises(ValueError, match=r"^stack_weights needs at least one candidate .* truth of shape \(0, 3\)"):
        stack_weights({"a": np.ones((0, 3))}, np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"^candidate predictions must have truth's shape \(2, 3\); got \{'a': \(3, 2\)\}"):
        stack_weights({"a": np.ones((3, 2))}, truth)
    with pytest.raises(ValueError, match=r"^n_genes must be >= 1, got 0"):
        stack_weights({"a": truth}, truth, n_genes=0)


def test_fit_few_shot_bad_input(two_context_prior):
    prior, train, emb = two_context_prior
    labels = train.obs["perturbation"].astype(str).to_numpy()
    contexts = train.obs["cell_type"].astype(str).to_numpy()
    with pytest.raises(RuntimeError, match=r"^fit_few_shot needs the group means first"):
        EffectPrior(emb).fit_few_shot(train, labels, contexts)
    with pytest.raises(ValueError, match=rf"^labels has {len(labels) - 1} entries but adata has {train.n_obs} cells"):
        prior.fit_few_shot(train, labels[:-1], contexts)
    with pytest.raises(ValueError, match=r"^k must be a positive integer, got 0\."):
        prior.fit_few_shot(train, labels, contexts, k=0)


def test_few_shot_blend_equals_fit_few_shot_and_leaves_the_prior_unchanged(two_context_prior):
    """The blend returned at ``k`` is the one :meth:`fit_few_shot` keeps at ``k`` (same draws),
    and returning it changes none of the prior's weights, intervals or scores."""
    prior, train, _ = two_context_prior
    labels = train.obs["perturbation"].astype(str).to_numpy()
    contexts = train.obs["cell_type"].astype(str).to_numpy()
    before = copy.deepcopy((prior.weights_, prior.n_held_out_, prior.quantiles_, prior.crossfit_scores_))
    blend = prior.few_shot_blend(train, labels, contexts, k=5)
    after = (prior.weights_, prior.n_held_out_, prior.quantiles_, prior.crossfit_scores_)
    assert before[:2] == after[:2]
    assert before[2].keys() == after[2].keys()
    pd.testing.assert_frame_equal(before[3], after[3])
    kept = copy.deepcopy(prior).fit_few_shot(train, labels, contexts, k=5)
    assert blend["n_held_out"] == kept.n_held_out_["few_shot"] >= 3
    assert blend["weights"] == kept.weights_["few_shot"]
    for level, widths in kept.quantiles_["few_shot"].items():
        np.testing.assert_array_equal(blend["quantiles"][level], widths)
    assert blend["scores"] == kept.crossfit_scores_.loc["few_shot"].dropna().to_dict()
    with pytest.raises(RuntimeError, match=r"^few_shot_blend needs the group means first"):
        EffectPrior().few_shot_blend(train, labels, contexts, k=5)


def test_stacked_blend_is_no_worse_than_any_candidate_on_the_fitted_entries():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 50))
    candidates = {"noisy": truth + rng.normal(scale=2.0, size=truth.shape),
                  "biased": 0.5 * truth + rng.normal(scale=0.5, size=truth.shape),
                  "unrelated": rng.normal(size=truth.shape)}
    w = stack_weights(candidates, truth, n_genes=50)
    blend = sum(weight * candidates[k] for k, weight in w.items())
    error = np.mean((truth - blend) ** 2)
    for candidate in candidates.values():
        assert error <= np.mean((truth - candidate) ** 2)
    assert error <= np.mean(truth**2)                                   # no change
    # the noisy candidate is shrunk: its weight is about var(t) / (var(t) + 4) = 0.2 alone
    assert 0 < w["noisy"] < 0.5
    assert w["unrelated"] < 0.1


# ---------------------------------------------------------------- kinds and state
@pytest.fixture(scope="module")
def two_context_prior():
    """A prior over two cell types with one unseen gene, one gene measured in one context only
    and one few-shot group."""
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=8, n_combinations=3, n_cell_types=2,
                                     n_cells_per_condition=FEW_SHOT_CELLS + 5, embedding_dim=8, seed=3)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    types = adata.obs["cell_type"].astype(str).to_numpy()
    keep = ~_touching(adata.obs["perturbation"], ["G07"])                # unseen gene
    keep &= ~((labels == "G06") & (types == "type_1"))                   # unseen context
    few = np.flatnonzero((labels == "G05") & (types == "type_0"))
    keep[few[FEW_SHOT_CELLS - 20:]] = False                             # 10 cells left: few-shot
    train = adata[keep]
    prior = EffectPrior(emb).fit(train, "perturbation", context_key="cell_type")
    return prior, train, emb


def test_kind_of_every_query(two_context_prior):
    prior, train, _ = two_context_prior
    counts = train.obs.groupby(["perturbation", "cell_type"], observed=True).size()
    assert counts[("G05", "type_0")] == 10 < FEW_SHOT_CELLS
    assert counts[("G05", "type_1")] == FEW_SHOT_CELLS + 5
    assert prior.kind("G00", "type_0") == "seen"
    assert prior.kind("G00+G01", "type_0") == "seen"              # a measured double is seen
    assert prior.kind("G05", "type_0") == "few_shot"
    assert prior.kind("G05", "type_1") == "seen"
    assert prior.kind("G06", "type_0") == "seen"
    assert prior.kind("G06", "type_1") == "unseen_context"
    assert prior.kind("G02+G04", "type_1") == "combination"         # unmeasured pair of seen genes
    assert prior.kind("G04+G02", "type_0") == "combination"
    assert prior.kind("G07", "type_0") == "unseen_gene"
    assert prior.kind("G00+G07", "type_0") == "partial_combination"  # a combination with an unseen gene
    assert prior.kind("G07+G08", "type_0") == "partial_combination"  # neither gene seen alone
    assert prior.kind("NOT_A_GENE", "type_0") == "unseen_gene"
    table = prior.predict_shifts(["G00", "G05", "G06", "G02+G04", "G07"], "type_1")
    assert table.attrs["kinds"] == ["seen", "seen", "unseen_context", "combination", "unseen_gene"]
    assert table.attrs["estimators"][0] == "observed"
    # a seen query's shift is the observed training shift
    np.testing.assert_allclose(table.loc["G00"], prior.shifts_.loc[("G00", "type_1")], rtol=0, atol=1e-12)
    # few-shot candidates were cross-fitted on well-measured groups reduced to 10 cells
    assert prior.n_held_out_["few_shot"] >= 3


def test_state_round_trip(two_context_prior):
    prior, _, emb = two_context_prior
    again = EffectPrior.from_state(prior.state(), emb)
    assert again.choices_ == prior.choices_
    assert again.weights_ == prior.weights_
    assert again.n_held_out_ == prior.n_held_out_
    queries = ["G00", "G00+G01", "G05", "G06", "G02+G04", "G07", "G00+G07"]
    for context in ("type_0", "type_1"):
        # (the saved state keeps the gene names but not the name of the columns index)
        pd.testing.assert_frame_equal(again.predict_shifts(queries, context), prior.predict_shifts(queries, context),
                                      check_names=False)
        assert again.predict_shifts(queries, context).attrs == prior.predict_shifts(queries, context).attrs
        for level in (0.8, 0.95):
            pd.testing.assert_frame_equal(again.half_widths(queries, context, level),
                                          prior.half_widths(queries, context, level), check_names=False)
    widths = prior.half_widths(queries, "type_0", 0.8)
    assert widths.loc["G00"].isna().all()                          # measured: no interval
    assert (widths.loc["G07"] > 0).all()
    assert (prior.half_widths(["G07"], "type_0", 0.95).to_numpy() >= widths.loc[["G07"]].to_numpy()).all()
    with pytest.raises(ValueError, match="level 0.5 was not fitted"):
        prior.half_widths(["G07"], "type_0", 0.5)


# ---------------------------------------------------------------- choices by cross-fitting
def _screen(seed):
    return simulate_perturbseq(n_genes=80, n_perturbed_genes=30, n_combinations=12, n_cell_types=1,
                               n_cells_per_condition=30, embedding_dim=16, seed=seed)


def _uninformative(emb, seed):
    rng = np.random.default_rng(seed)
    shuffled = pd.DataFrame(emb.to_numpy()[rng.permutation(len(emb))], index=emb.index, columns=emb.columns)
    gaussian = pd.DataFrame(rng.normal(size=emb.shape), index=emb.index, columns=emb.columns)
    return {"shuffled": shuffled, "gaussian": gaussian}


@pytest.mark.slow
def test_choices_follow_the_information_in_embeddings():
    adata, emb = _screen(0)
    prior = EffectPrior(emb).fit(adata, "perturbation")
    assert prior.n_held_out_["combination"] == 12
    assert prior.n_held_out_["unseen_gene"] == 30
    assert prior.choices_["seen"] == "observed"
    # doubles of measured genes are answered by a sum of their singles: plain, or scaled by the
    # interaction coefficient the training doubles teach (the simulator's doubles are c (A + B))
    sums = {name: w for name, w in prior.weights_["combination"].items() if name in SUMS_OF_SINGLES}
    assert prior.choices_["combination"] in SUMS_OF_SINGLES
    assert sum(sums.values()) > 0.5                                                   # measured 0.56
    assert prior.choices_["unseen_gene"] in EMBEDDING_MAPS
    informative = prior.crossfit_scores_.loc["unseen_gene"]
    assert informative[f"{prior.choices_['unseen_gene']} (pearson)"] > 0.8          # measured 0.89
    assert informative["linear (pearson)"] > informative["perturbed_mean (pearson)"] + 0.5
    # the blend puts its weight on the embedding maps (measured: linear 0.78, embedding_nn 0.16)
    assert sum(w for name, w in prior.weights_["unseen_gene"].items() if name in EMBEDDING_MAPS) > 0.8
    assert prior.weights_["unseen_gene"].get("perturbed_mean", 0.0) < 0.1
    # and the blend is at least as good as its best candidate on the held-out genes
    assert informative["stacked (pearson)"] >= informative["linear (pearson)"] - 0.01

    # Uninformative embeddings (rows shuffled between genes, or Gaussian noise): the embedding
    # maps carry no signal in cross-fitting, and the blend mostly falls back to the perturbed
    # mean. It is not never: shuffled rows keep some structure. Measured on seeds 0-3: the
    # embedding maps dominate once (shuffled, seed 0: embedding_nn 0.50 against perturbed mean
    # 0.43), and their weight averages 0.075 over the 8 fits.
    picks, embedding_weight = [], []
    for seed in range(4):
        adata, emb = _screen(seed)
        for name, table in _uninformative(emb, seed).items():
            noise = EffectPrior(table).fit(adata, "perturbation")
            scores = noise.crossfit_scores_.loc["unseen_gene"]
            assert scores["linear (pearson)"] < 0.35, (seed, name)
            assert scores["embedding_nn (pearson)"] < 0.35, (seed, name)
            combination = noise.weights_["combination"]  # embeddings do not change what answers doubles
            summed = sum(w for k, w in combination.items() if k in SUMS_OF_SINGLES)          # measured >= 0.66
            assert summed > max(w for k, w in combination.items() if k not in SUMS_OF_SINGLES), combination
            picks.append(noise.choices_["unseen_gene"])
            embedding_weight.append(sum(w for k, w in noise.weights_["unseen_gene"].items() if k in EMBEDDING_MAPS))
    embedding_picks = sum(p in EMBEDDING_MAPS for p in picks)
    assert picks.count("perturbed_mean") >= 7, picks
    assert embedding_picks <= 1, picks
    assert np.mean(embedding_weight) < 0.15, embedding_weight


# ---------------------------------------------------------------- no reading of test cells
def test_fit_never_reads_held_out_cells():
    adata, emb = simulate_perturbseq(n_genes=50, n_perturbed_genes=12, n_combinations=6, n_cell_types=1,
                                     n_cells_per_condition=20, embedding_dim=8, seed=2)
    test = _touching(adata.obs["perturbation"], ["G00", "G07"])
    scrambled = adata.copy()
    rng = np.random.default_rng(0)
    X = scrambled.X.toarray()
    X[test] = rng.poisson(5.0, X[test].shape)[:, ::-1]
    scrambled.X = sparse.csr_matrix(X)
    held = sorted(set(adata.obs["perturbation"].astype(str)[test]))
    # the two screens do differ on the held-out perturbations
    assert np.abs(_observed_shifts(adata).loc[[(p, "all") for p in held]].to_numpy()
                  - _observed_shifts(scrambled).loc[[(p, "all") for p in held]].to_numpy()).max() > 0.5

    priors = [EffectPrior(emb).fit(data[~test], "perturbation") for data in (adata, scrambled)]
    first, second = priors
    assert first.choices_ == second.choices_
    pd.testing.assert_frame_equal(first.crossfit_scores_, second.crossfit_scores_)
    assert first.quantiles_.keys() == second.quantiles_.keys()
    for kind, by_level in first.quantiles_.items():
        for level, q in by_level.items():
            np.testing.assert_array_equal(q, second.quantiles_[kind][level])
    queries = [*held, "G01+G02", "G01"]
    pd.testing.assert_frame_equal(first.predict_shifts(queries, "all"), second.predict_shifts(queries, "all"))
    pd.testing.assert_frame_equal(first.half_widths(queries, "all", 0.8), second.half_widths(queries, "all", 0.8))


# ---------------------------------------------------------------- interval coverage
@pytest.mark.slow
def test_intervals_cover_held_out_genes():
    """80% intervals cover the observed shifts of genes held out entirely ~80% of the time.

    Four folds of 15 of the 60 regulators are held out in turn (each fit calibrates on the 45
    others); coverage is averaged over genes x held-out perturbations of all folds. One fold of
    15 genes alone varies by about +-0.07 between splits (errors within a perturbation are
    correlated), hence the four folds. Measured: 0.838, 0.797, 0.816, 0.777 per fold, 0.807
    overall (0.95 level: 0.971, 0.933, 0.959, 0.954; 0.954 overall; with the in-sample scale
    0.946, since 45 held-out genes are enough for it to be nearly calibrated).
    """
    adata, emb = simulate_perturbseq(n_genes=100, n_perturbed_genes=60, n_combinations=0, n_cell_types=1,
                                     n_cells_per_condition=30, embedding_dim=16, seed=0)
    observed = _observed_shifts(adata)
    order = np.random.default_rng(0).permutation(emb.index.to_numpy())
    covered = {0.8: [], 0.95: []}
    for fold in range(4):
        held = sorted(order[fold::4])
        prior = EffectPrior(emb).fit(adata[~_touching(adata.obs["perturbation"], held)], "perturbation")
        assert prior.n_held_out_["unseen_gene"] == 45
        predicted = prior.predict_shifts(held, "all")
        assert set(predicted.attrs["kinds"]) == {"unseen_gene"}
        error = np.abs(observed.loc[[(g, "all") for g in held]].to_numpy() - predicted.to_numpy())
        for level in covered:
            width = prior.half_widths(held, "all", level).to_numpy()
            assert np.isfinite(width).all()
            assert (width > 0).all()
            covered[level].append(error <= width)
    coverage_80 = float(np.mean(covered[0.8]))
    coverage_95 = float(np.mean(covered[0.95]))
    assert abs(coverage_80 - 0.8) <= 0.1, coverage_80
    assert abs(coverage_95 - 0.95) <= 0.05, coverage_95
    assert coverage_95 > coverage_80


def _coverage_of_fresh_rows(n_rows: int, scale: str, repeats: int = 200) -> dict[float, float]:
    """Coverage of fresh exchangeable rows by :func:`gene_scaled_quantiles` fitted on ``n_rows``."""
    rng = np.random.default_rng(0)
    covered = {0.8: [], 0.95: []}
    for _ in range(repeats):
        gene_scale = rng.lognormal(0.0, 1.0, 300)
        calibration = np.abs(rng.normal(size=(n_rows, 300)) * gene_scale)
        fresh = np.abs(rng.normal(size=(5, 300)) * gene_scale)
        widths = gene_scaled_quantiles(calibration, (0.8, 0.95), scale=scale)
        for level in covered:
            covered[level].append(np.mean(fresh <= widths[level]))
    return {level: float(np.mean(v)) for level, v in covered.items()}


@pytest.mark.parametrize("n_rows", [6, 12])
def test_leave_one_out_scale_keeps_the_coverage_with_few_held_out_rows(n_rows):
    """The residual of a new perturbation is not in the scale it is divided by: nor is a calibration row's.

    Measured (Gaussian residuals, 300 genes of log-normal scales, 200 repeats): in sample
    0.886 / 0.921 at the 0.95 level with 6 / 12 rows, left out 0.958 / 0.952.
    """
    in_sample = _coverage_of_fresh_rows(n_rows, "in_sample")
    left_out = _coverage_of_fresh_rows(n_rows, "leave_one_out")
    assert in_sample[0.95] < 0.93, in_sample
    assert 0.94 <= left_out[0.95] <= 0.97, left_out
    assert 0.78 <= left_out[0.8] <= 0.83, left_out


def test_genes_moved_by_one_row_do_not_widen_every_interval():
    """Their left-out scale was the global floor: a score near 1e3, and with a quarter of such genes (4 rows)
    the pooled 95% quantile made every other gene's half-width about 200 times wider."""
    rng = np.random.default_rng(0)
    residuals = np.abs(rng.normal(size=(4, 200)))
    baseline = np.median(gene_scaled_quantiles(residuals, [0.95])[0.95][50:])
    residuals[:, :50] = 0.0
    residuals[rng.integers(0, 4, 50), np.arange(50)] = 0.5
    widths = gene_scaled_quantiles(residuals, [0.95])[0.95]
    assert np.median(widths[50:]) < 1.5 * baseline, (np.median(widths[50:]), baseline)
    # hand-computed: a gene with residuals (0, 0, 3) scores 3 (= n) on its moved row, not 3 / floor
    one_row = np.array([[0.0, 1.0], [0.0, 1.0], [3.0, 1.0]])
    assert gene_scaled_quantiles(one_row, [0.99])[0.99][0] == pytest.approx(3.0 * np.sqrt(3.0))


def test_interval_scale_is_checked_and_saved():
    with pytest.raises(ValueError, match=r"^interval_scale must be one of \['leave_one_out', 'in_sample'\], got 'loo'"):
        EffectPrior(interval_scale="loo")
    with pytest.raises(ValueError, match=r"^scale must be one of \['leave_one_out', 'in_sample'\], got 'x'"):
        gene_scaled_quantiles(np.ones((3, 2)), [0.8], scale="x")
    adata, emb = simulate_perturbseq(n_genes=30, n_perturbed_genes=8, n_combinations=0, n_cell_types=1,
                                     n_cells_per_condition=10, embedding_dim=4, seed=3)
    fitted = {s: EffectPrior(emb, interval_scale=s).fit(adata, "perturbation") for s in ("in_sample", "leave_one_out")}
    # the same blend, wider intervals when each residual is scaled by the others
    assert fitted["in_sample"].weights_ == fitted["leave_one_out"].weights_
    wide, narrow = fitted["leave_one_out"].quantiles_["unseen_gene"][0.95], fitted["in_sample"].quantiles_["unseen_gene"][0.95]
    assert np.median(wide / narrow) > 1.0
    again = EffectPrior.from_state(fitted["in_sample"].state(), emb)
    assert again.interval_scale == "in_sample"
    state = fitted["leave_one_out"].state()
    del state["interval_scale"]  # a model saved before the rule was kept computed its quantiles in sample
    assert EffectPrior.from_state(state, emb).interval_scale == "in_sample"


# ---------------------------------------------------------------- combinations with unseen genes
def test_partial_combinations_are_cross_fitted_on_training_doubles():
    """Doubles that hold a gene never seen alone: gene by gene where training doubles show it works.

    The simulated doubles are the sum of their genes' effects plus an interaction, and the
    embeddings carry the single effects, so the sum of the genes' own predictions (the unseen
    one by the embedding maps) beats the matching mean, which drops the unseen gene.
    """
    adata, emb = simulate_perturbseq(n_genes=60, n_perturbed_genes=24, n_combinations=30, n_cell_types=1,
                                     n_cells_per_condition=30, seed=1)
    prior = EffectPrior(emb).fit(adata, "perturbation")
    assert prior.n_held_out_["partial_combination"] >= 30     # the training doubles holding a held-out gene
    assert prior.choices_["partial_combination"] == "gene_by_gene"          # measured weight 0.87
    scores = prior.crossfit_scores_.loc["partial_combination"]
    assert scores["gene_by_gene (pearson)"] > scores["matching_mean (pearson)"] + 0.1
    assert scores["gene_by_gene (pearson)"] > 0.8         # measured 0.88 (matching mean 0.64)

    # without training doubles nothing can be cross-fitted: the matching mean answers (the
    # seen gene's shift, or the perturbed mean when neither gene was seen alone)
    singles = adata[~adata.obs["perturbation"].astype(str).str.contains("+", regex=False).to_numpy()]
    alone = EffectPrior(emb).fit(singles[~_touching(singles.obs["perturbation"], ["G00", "G01"])], "perturbation")
    assert alone.n_held_out_["partial_combination"] == 0
    assert alone.weights_["partial_combination"] == {"matching_mean": 1.0}
    table = alone.predict_shifts(["G00+G02", "G00+G01", "G02"], "all")
    assert table.attrs["kinds"] == ["partial_combination", "partial_combination", "seen"]
    np.testing.assert_allclose(table.loc["G00+G02"], table.loc["G02"], rtol=0, atol=1e-12)
    perturbed_mean = alone.estimators_["perturbed_mean"].predict_shifts(["G00"]).to_numpy()[0]
    np.testing.assert_allclose(table.loc["G00+G01"], perturbed_mean, rtol=0, atol=1e-12)
    assert np.isnan(alone.half_widths(["G00+G02"], "all", 0.8).to_numpy()).all()   # not calibrated


def test_effect_prior_bad_arguments():
    with pytest.raises(ValueError, match=r"n_folds must be an integer >= 2, got 1"):
        EffectPrior(n_folds=1)
    with pytest.raises(ValueError, match=r"levels must lie strictly between 0 and 1, got \[1.0\]"):
        EffectPrior(levels=(0.8, 1.0))
    with pytest.raises(ValueError, match=r"n_bootstrap must be an integer >= 0, got 1.5"):
        EffectPrior(n_bootstrap=1.5)
    with pytest.raises(ValueError, match=r"^seed must be an integer, got '0'"):
        EffectPrior(seed="0")
    with pytest.raises(ValueError, match=r"^keep_crossfit_predictions must be True or False, got 'no'"):
        EffectPrior(keep_crossfit_predictions="no")
    assert EffectPrior(seed=np.int64(3), keep_crossfit_predictions=np.bool_(True)).seed == 3


def test_add_groups_pools_cells_and_keeps_the_fitted_blends(two_context_prior):
    from perturbscope.effects import AdditiveBaseline

    prior, train, emb = two_context_prior
    weights, quantiles = dict(prior.weights_), dict(prior.quantiles_)
    labels = train.obs["perturbation"].astype(str).to_numpy()
    contexts = train.obs["cell_type"].astype(str).to_numpy()
    # 4 more cells of the few-shot group and the controls of its context, as a query would bring
    extra = np.flatnonzero(((labels == "G05") | (labels == "control")) & (contexts == "type_0"))[:60]
    added = EffectPrior.from_state(prior.state(), emb)
    added.add_groups(train[extra], labels[extra], contexts[extra])
    # the pooled means equal the means of all the cells together (hand check: a refit on both)
    both = ad.concat([train, train[extra]], index_unique="-")
    pooled = AdditiveBaseline().fit(both, "perturbation", context_key="cell_type").means_
    np.testing.assert_allclose(added.means_.loc[pooled.index].to_numpy(), pooled.to_numpy(), atol=1e-10)
    n_before = int(prior.counts_.loc[("G05", "type_0")])
    assert int(added.counts_.loc[("G05", "type_0")]) == n_before + int((labels[extra] == "G05").sum())
    assert added.weights_ == weights
    assert added.quantiles_.keys() == quantiles.keys()
    # a new context's groups: the perturbation it holds becomes a few-shot query there
    assert added.kind("G06", "type_1") == "unseen_context"
    g06 = np.flatnonzero((labels == "G06") & (contexts == "type_0"))[:5]
    controls = np.flatnonzero((labels == "control") & (contexts == "type_0"))[:20]
    cells = np.r_[controls, g06]
    added.add_groups(train[cells], labels[cells], np.full(len(cells), "type_9"))
    assert added.kind("G06", "type_9") == "few_shot"
    assert added.kind("G05", "type_9") == "unseen_context"
    # a new group is few-shot whatever its size (its blend is cross-fitted at that size), and
    # stays so through the saved state; a training group keeps its kind
    g04 = np.flatnonzero((labels == "G04") & (contexts == "type_0"))
    assert len(g04) >= FEW_SHOT_CELLS
    cells = np.r_[controls, g04]
    added.add_groups(train[cells], labels[cells], np.full(len(cells), "type_8"))
    again = EffectPrior.from_state(added.state(), emb)
    assert again.kind("G04", "type_8") == "few_shot"
    assert again.kind("G04", "type_0") == "seen"
    assert again.added_groups_ == {("G06", "type_9"), ("G04", "type_8")}


def test_add_groups_bad_input(two_context_prior):
    prior, train, emb = two_context_prior
    labels = train.obs["perturbation"].astype(str).to_numpy()
    contexts = train.obs["cell_type"].astype(str).to_numpy()
    with pytest.raises(RuntimeError, match=r"^add_groups needs the fitted prior first"):
        EffectPrior(emb).add_groups(train, labels, contexts)
    with pytest.raises(ValueError, match=rf"^contexts has 3 entries but adata has {train.n_obs} cells"):
        prior.add_groups(train, labels, contexts[:3])
    with pytest.raises(ValueError, match=r"^adata's genes \(var_names\) differ from the genes the prior was fitted on"):
        prior.add_groups(train[:, 1:], labels, contexts)
    perturbed = np.flatnonzero(labels == "G05")[:3]
    with pytest.raises(ValueError, match=r"^contexts \['type_9'\] have no control cells \('control'\)"):
        prior.add_groups(train[perturbed], labels[perturbed], np.full(3, "type_9"))


def test_few_shot_refit_draws_only_groups_with_enough_cells_of_their_own():
    """A training group of 8 cells that a query grows to 33 is not drawn from: the training cells
    hold too few of its cells to leave a truth after drawing k (its truth would be a NaN mean)."""
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=8, n_combinations=0, n_cell_types=3,
                                     n_cells_per_condition=40, embedding_dim=8, seed=3)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    types = adata.obs["cell_type"].astype(str).to_numpy()
    in_training = types != "type_2"
    g01 = np.flatnonzero((labels == "G01") & (types == "type_0"))
    in_training[g01[8:]] = False
    train = adata[in_training].copy()
    prior = EffectPrior(emb, n_bootstrap=5).fit(train, "perturbation", context_key="cell_type")
    cells = np.r_[g01[8:33], np.flatnonzero((types == "type_2") & (labels == "control"))]
    for p in sorted(set(labels) - {"control"}):
        cells = np.r_[cells, np.flatnonzero((types == "type_2") & (labels == p))[:16]]
    query = adata[np.sort(cells)]
    prior.add_groups(query, labels[np.sort(cells)], types[np.sort(cells)])
    assert prior.kind("G01", "type_0") == "seen"  # pooled: 33 cells
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "Mean of empty slice" before the fix
        prior.fit_few_shot(train, train.obs["perturbation"].astype(str).to_numpy(),
                           train.obs["cell_type"].astype(str).to_numpy())
    assert prior.n_held_out_["few_shot"] >= 3
    assert all(np.isfinite(q).all() for q in prior.quantiles_["few_shot"].values())
    assert np.isfinite(prior.crossfit_scores_.loc["few_shot", "stacked (pearson)"])


def test_few_shot_truth_is_the_mean_of_the_groups_other_cells(two_context_prior):
    """The truth a few-shot candidate is scored on is the mean of the group's undrawn cells,
    whether it is read (cells added since) or derived from the group's mean (only k cells read)."""
    prior, train, _ = two_context_prior
    labels = train.obs["perturbation"].astype(str).to_numpy()
    contexts = train.obs["cell_type"].astype(str).to_numpy()
    cells = np.random.default_rng(0).permutation(np.flatnonzero((labels == "G00") & (contexts == "type_0")))
    expression = log1p_normalized(train)
    expected = (expression[np.sort(cells[:5])].mean(axis=0), expression[np.sort(cells[5:])].mean(axis=0))
    for n_group in (len(cells), len(cells) + 1):  # derived, read
        drawn, rest = prior._drawn_and_rest_means(train, cells, 5, ("G00", "type_0"), n_group, None, "counts")
        np.testing.assert_allclose(drawn, np.asarray(expected[0]).ravel(), rtol=0, atol=1e-5)  # float32 input
        np.testing.assert_allclose(rest, np.asarray(expected[1]).ravel(), rtol=0, atol=1e-5)


def test_gene_by_gene_answers_each_gene_as_its_kind_in_cross_fitting_as_at_prediction(two_context_prior):
    """The gene-by-gene sum scored in cross-fitting (from a fold's estimators) uses the rule the
    prediction uses: a gene measured in the context by its shift, one measured in another
    context only by the unseen-context blend, one measured nowhere by the unseen-gene blend."""
    prior, _, _ = two_context_prior
    assert [prior.kind(g, "type_1") for g in ("G00", "G06", "G07")] == ["seen", "unseen_context", "unseen_gene"]
    for gene in ("G00", "G06", "G07"):
        np.testing.assert_allclose(prior._fold_single(prior.estimators_, gene, "type_1"),
                                   prior.predict_shifts([gene], "type_1").to_numpy()[0], rtol=0, atol=1e-10)
    combo = prior._held_out_prediction("gene_by_gene", prior.estimators_, "G06+G07", "type_1")
    singles = prior.predict_shifts(["G06", "G07"], "type_1").to_numpy().sum(axis=0)
    np.testing.assert_allclose(combo, singles, rtol=0, atol=1e-10)
    np.testing.assert_allclose(prior._estimate("gene_by_gene", "partial_combination", "G06+G07", "type_1"),
                               singles, rtol=0, atol=1e-10)
    # the rule matters here: G06 answered as an unseen gene would be another shift
    from perturbscope.effects._scoring import predict_one_shift

    as_unseen = sum(w * predict_one_shift(prior.estimators_[n], "G06", "type_1") for n, w in prior.weights_["unseen_gene"].items())
    assert np.abs(as_unseen - prior.predict_shifts(["G06"], "type_1").to_numpy()[0]).max() > 1e-3


def test_few_shot_perturbed_mean_counts_the_group_by_its_few_cells(two_context_prior):
    """The perturbed-mean candidate of a few-shot group is the context's mean shift with the
    group counted by its own few-cell shift: at prediction that is its measured shift, and in
    cross-fitting the k drawn cells' shift (its full mean, the truth, is left out), so the two
    score the same estimator."""
    prior, _, _ = two_context_prior
    shifts = prior.shifts_.xs("type_0", level="context")
    others = shifts.drop(index="G00").to_numpy()
    drawn = np.linspace(-1.0, 1.0, shifts.shape[1])
    expected = (others.sum(axis=0) + drawn) / (len(others) + 1)
    np.testing.assert_allclose(prior._few_shot_estimate("perturbed_mean", "G00", "type_0", drawn), expected,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(prior._few_shot_estimate("observed_perturbed_mean", "G00", "type_0", drawn),
                               0.5 * (drawn + expected), rtol=0, atol=1e-12)
    measured = prior._few_shot_estimate("perturbed_mean", "G05", "type_0", shifts.loc["G05"].to_numpy())
    np.testing.assert_allclose(measured, shifts.to_numpy().mean(axis=0), rtol=0, atol=1e-12)


def test_query_groups_cross_fit_the_few_shot_blend_at_the_querys_group_size(monkeypatch):
    """With the reference's cells at hand, the blend is cross-fitted at the query's median group
    size, not at the median of every few-shot group (the reference's own 5-cell groups too)."""
    from perturbscope.effects._few_shot import FewShotMixin
    from perturbscope.model._effect_correction import prior_with_query_groups

    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=14, n_combinations=0, n_cell_types=2,
                                     n_cells_per_condition=60, embedding_dim=8, seed=3)
    labels, contexts = adata.obs["perturbation"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
    adata.obs = adata.obs.assign(perturbation=labels, context=contexts)
    keep = np.ones(adata.n_obs, dtype=bool)
    for gene in ("G00", "G01", "G02", "G04", "G05"):  # the reference's own few-shot groups: 5 cells
        keep[np.flatnonzero((labels == gene) & (contexts == "type_0"))[5:]] = False
    in_query = (contexts == "type_1") & np.isin(labels, ["G06", "G07"])
    reference = adata[keep & ~in_query].copy()
    query_cells = np.flatnonzero(in_query & (np.cumsum(in_query) % 3 == 0) | ((contexts == "type_1") & (labels == "control")))
    query = adata[query_cells].copy()
    assert sorted(np.unique(query.obs["perturbation"], return_counts=True)[1].tolist()) == [20, 20, 240]

    prior = EffectPrior(emb, n_bootstrap=0).fit(reference, "perturbation", context_key="context")
    drawn = []
    original = FewShotMixin.fit_few_shot
    monkeypatch.setattr(FewShotMixin, "fit_few_shot",
                        lambda self, *args, k=None, **kw: drawn.append(k) or original(self, *args, k=k, **kw))
    merged = prior_with_query_groups(prior.state(), emb, query, reference, "counts")
    assert drawn == [20]
    assert merged.added_groups_ == {("G06", "type_1"), ("G07", "type_1")}
    assert merged.n_held_out_["few_shot"] >= 3


def test_an_estimator_that_cannot_be_fitted_in_every_fold_is_left_out_of_the_blend():
    """Embeddings for one perturbed gene only: in the folds that hold it out, no training gene has
    an embedding row and the embedding estimators cannot be fitted, so they are not scored (their
    held-out rows would not line up with the other candidates') and get no weight."""
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=10, n_combinations=0, n_cell_types=1,
                                     n_cells_per_condition=40, embedding_dim=8, seed=1)
    partial = emb.loc[[g for g in emb.index if g == "G00" or int(g[1:]) >= 10]]
    prior = EffectPrior(partial, n_bootstrap=0).fit(adata, "perturbation")
    assert prior.n_held_out_["unseen_gene"] == 10
    scored = {c.split(" ")[0] for c in prior.crossfit_scores_.loc["unseen_gene"].dropna().index}
    assert scored == {"perturbed_mean", "embedding_nn", "no_change", "stacked"}  # not "linear"
    assert "linear" not in prior.weights_["unseen_gene"]


def test_few_shot_cross_fitting_without_counts_reads_the_groups_cells():
    """``fit_means`` without ``counts`` treats every group as well measured: the few-shot blend
    can still be cross-fitted (every group's other cells are read, none derived), and it equals
    the one from the same means with their counts."""
    adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=0, n_cell_types=1,
                                   n_cells_per_condition=40, seed=0)
    full = EffectPrior(n_bootstrap=0).fit(adata, "perturbation")
    without = EffectPrior(n_bootstrap=0).fit_means(full.means_)
    labels, contexts = adata.obs["perturbation"].astype(str).to_numpy(), np.full(adata.n_obs, "all")
    blend, reference = without.few_shot_blend(adata, labels, contexts, k=5), full.few_shot_blend(adata, labels, contexts, k=5)
    assert blend["n_held_out"] == reference["n_held_out"] == 6
    assert blend["weights"].keys() == reference["weights"].keys()
    for name, weight in blend["weights"].items():
        assert weight == pytest.approx(reference["weights"][name], abs=1e-6)
    assert without.fit_few_shot(adata, labels, contexts, k=5).n_held_out_["few_shot"] == 6


def test_a_refit_forgets_the_groups_added_before():
    adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
                                   n_cells_per_condition=40, seed=0)
    labels, contexts = adata.obs["perturbation"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
    reference = (contexts == "type_0") | (labels == "control")
    prior = EffectPrior(n_bootstrap=0).fit(adata[reference].copy(), "perturbation", context_key="cell_type")
    query = np.flatnonzero(~reference)
    prior.add_groups(adata[query], labels[query], contexts[query])
    assert prior.kind("G00", "type_1") == "few_shot"
    prior.fit(adata, "perturbation", context_key="cell_type")  # every cell: 40 per group
    assert prior.added_groups_ == set()
    assert prior.kind("G00", "type_1") == "seen"


def test_blends_that_need_embeddings_are_refused_without_them():
    """A saved blend that uses the embedding neighbours cannot be answered without embeddings: an
    error, not a silent fall back to the additive estimator (which predicts no change there)."""
    adata, emb = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=0, n_cell_types=1,
                                     n_cells_per_condition=20, embedding_dim=4, seed=0)
    means = EffectPrior(emb, n_bootstrap=0).fit(adata, "perturbation").means_
    weights = {"unseen_gene": {"embedding_nn": 0.7, "perturbed_mean": 0.2}}
    assert EffectPrior(emb).fit_means(means, weights=weights).weights_["unseen_gene"] == weights["unseen_gene"]
    with pytest.raises(ValueError, match=re.escape(
            "the given blends use ['embedding_nn'], which cannot be fitted here without gene_embeddings; "
            "pass the gene embeddings the prior was fitted with.")):
        EffectPrior(None).fit_means(means, weights=weights)


def test_singles_written_with_the_control_token_are_the_same_perturbations():
    """Screens that write singles as ``"G00+control"`` get the prior (and the additive sums) of
    screens that write ``"G00"``; a query may use either spelling."""
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=10, n_combinations=6, n_cell_types=1,
                                     n_cells_per_condition=20, embedding_dim=8, seed=0)
    spelled = adata.copy()
    labels = spelled.obs["perturbation"].astype(str)
    spelled.obs["perturbation"] = np.where(labels.str.contains(r"\+") | (labels == "control"), labels,
                                           labels + "+control")
    assert (spelled.obs["perturbation"] == "G00+control").any()
    plain = EffectPrior(emb, n_bootstrap=0).fit(adata, "perturbation")
    other = EffectPrior(emb, n_bootstrap=0).fit(spelled, "perturbation")
    assert other.weights_ == plain.weights_
    combo = next(p for p in labels.unique() if "+" in p)
    queries = ["G00", "G00+control", combo, "G00+G99"]
    expected = plain.predict_shifts(["G00", "G00", combo, "G00+G99"], "all").to_numpy()
    got = other.predict_shifts(queries, "all")
    assert got.index.tolist() == queries
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=0, atol=1e-12)
    assert other.kind("G00+control", "all") == plain.kind("G00", "all") == "few_shot"  # 20 cells
    from perturbscope.effects import AdditiveBaseline

    additive = AdditiveBaseline().fit(spelled, "perturbation").predict_shifts([combo]).to_numpy()
    assert np.abs(additive).sum() > 0


def test_a_combination_is_the_same_perturbation_in_either_gene_order():
    """A measured double asked for as ``"B+A"`` is the measured ``"A+B"`` (its observed shift),
    not a new combination answered by the singles' sum; training cells written in both orders
    are one group."""
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=8, n_combinations=4, n_cell_types=1,
                                     n_cells_per_condition=40, embedding_dim=8, seed=0)
    labels = adata.obs["perturbation"].astype(str)
    combo = next(p for p in labels.unique() if "+" in p)
    first, second = combo.split("+")
    reverse = f"{second}+{first}"
    prior = EffectPrior(emb, n_bootstrap=0).fit(adata, "perturbation")
    assert prior.kind(reverse, "all") == prior.kind(combo, "all") == "seen"
    shifts = prior.predict_shifts([reverse, combo], "all")
    assert shifts.index.tolist() == [reverse, combo]
    np.testing.assert_allclose(shifts.loc[reverse].to_numpy(), shifts.loc[combo].to_numpy(), rtol=0, atol=0)
    from perturbscope.effects import AdditiveBaseline

    observed = AdditiveBaseline().fit(adata, "perturbation").predict_shifts([combo, reverse])
    np.testing.assert_allclose(observed.loc[reverse].to_numpy(), observed.loc[combo].to_numpy(), rtol=0, atol=0)
    mixed = adata.copy()  # half of the double's cells written the other way round
    cells = np.flatnonzero(labels.to_numpy() == combo)
    written = labels.to_numpy().copy()
    written[cells[::2]] = reverse
    mixed.obs["perturbation"] = written
    merged = EffectPrior(emb, n_bootstrap=0).fit(mixed, "perturbation")
    np.testing.assert_allclose(merged.means_.loc[(combo, "all")].to_numpy(),
                               prior.means_.loc[(combo, "all")].to_numpy(), rtol=1e-6, atol=1e-6)
    assert (reverse, "all") not in merged.means_.index


def test_tables_saved_with_control_token_labels_are_read_as_canonical():
    """A prior state (or a means table) saved before labels were canonical keys its singles
    ``"G00+control"``; it is read back keyed ``"G00"``, with the same kinds and shifts."""
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=8, n_combinations=4, n_cell_types=1,
                                     n_cells_per_condition=20, embedding_dim=8, seed=0)
    plain = EffectPrior(emb, n_bootstrap=0).fit(adata, "perturbation")
    state = plain.state()
    singles = {p for p in state["means_perturbation"] if p != "control" and "+" not in p}
    state["means_perturbation"] = np.array([f"{p}+control" if p in singles else p for p in state["means_perturbation"]])
    state["added_groups"] = [("G00+control", "all")]
    again = EffectPrior.from_state(state, emb)
    assert again.added_groups_ == {("G00", "all")}
    queries = ["G00", "G00+control", "G01+G02", "G99"]
    assert [again.kind(p, "all") for p in queries[1:]] == ["few_shot", plain.kind("G01+G02", "all"), "unseen_gene"]
    np.testing.assert_allclose(again.predict_shifts(queries[1:], "all").to_numpy()[1:],
                               plain.predict_shifts(queries[1:], "all").to_numpy()[1:], rtol=0, atol=1e-12)
    from perturbscope.effects import AdditiveBaseline

    raw = AdditiveBaseline().fit_means(again.means_.rename(index={"G00": "G00+control"}, level="perturbation"))
    np.testing.assert_allclose(raw.predict_shifts(["G00+control"]).to_numpy(),
                               plain.estimators_["additive"].predict_shifts(["G00"]).to_numpy(), rtol=0, atol=1e-12)


def test_fallbacks_are_reported_under_the_labels_asked_for():
    from perturbscope.effects import LinearBaseline

    adata, emb = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=0, n_cell_types=1,
                                     n_cells_per_condition=10, embedding_dim=4, seed=0)
    model = LinearBaseline(emb.drop(index="G05")).fit(adata[adata.obs["perturbation"] != "G05"].copy(), "perturbation")
    control = adata[adata.obs["perturbation"] == "control"]
    with pytest.warns(UserWarning, match="no embedding row"):
        prediction = model.predict(control, ["G05+control", "G01"], aggregate="mean")
    assert prediction.uns["perturbscope"]["fallback_to_perturbed_mean"] == ["G05+control"]


def test_few_shot_blend_refuses_a_k_below_one(two_context_prior):
    prior, train, _ = two_context_prior
    labels, contexts = train.obs["perturbation"].astype(str).to_numpy(), train.obs["cell_type"].astype(str).to_numpy()
    for k in (0, -3, 2.5):
        with pytest.raises(ValueError, match=re.escape(f"k must be a positive integer, got {k!r}.")):
            prior.few_shot_blend(train, labels, contexts, k=k)


def test_few_shot_cross_fitting_refuses_cells_whose_genes_are_in_another_order(two_context_prior):
    prior, train, _ = two_context_prior
    labels, contexts = train.obs["perturbation"].astype(str).to_numpy(), train.obs["cell_type"].astype(str).to_numpy()
    reversed_genes = train[:, train.var_names[::-1]]
    message = ("adata's genes (var_names) differ from the genes the prior was fitted on, or are in another "
               "order; subset and order them as in training.")
    with pytest.raises(ValueError, match=re.escape(message)):
        prior.few_shot_blend(reversed_genes, labels, contexts, k=5)
    with pytest.raises(ValueError, match=re.escape(message)):
        prior.fit_few_shot(reversed_genes, labels, contexts)


def test_an_unseen_context_query_weighs_the_perturbed_mean_that_cross_fitting_scored():
    adata, embeddings = simulate_perturbseq(n_genes=40, n_perturbed_genes=10, n_combinations=0, n_cell_types=2,
                                            n_cells_per_condition=40, seed=1)
    labels, types = adata.obs["perturbation"].astype(str), adata.obs["cell_type"].astype(str)
    train = adata[~((labels == "G05") & (types == "type_0")).to_numpy()].copy()  # G05 held out of type_0 only
    prior = EffectPrior(embeddings, n_bootstrap=5).fit(train, "perturbation", context_key="cell_type")
    assert prior.kind("G05", "type_0") == "unseen_context"
    # cross-fitting held the whole context out: its perturbed mean is type_1's
    shifts = AdditiveBaseline().fit(train, "perturbation", context_key="cell_type").shifts_
    type_1 = shifts[shifts.index.get_level_values("context") == "type_1"].mean(axis=0).to_numpy()
    used = prior._estimate("perturbed_mean", "unseen_context", "G05", "type_0")
    np.testing.assert_allclose(used, type_1, atol=1e-6)
    own = prior.estimators_["perturbed_mean"].predict_shifts(["G05"], "type_0").to_numpy()[0]
    assert np.abs(own - type_1).max() > 0.1  # type_0's own perturbed mean is another estimator


def test_the_control_label_is_no_change_with_no_interval(two_context_prior):
    prior = two_context_prior[0]
    shifts = prior.predict_shifts(["control"], "type_0")
    assert shifts.attrs["kinds"] == ["seen"]
    assert np.abs(shifts.to_numpy()).max() == 0.0
    assert np.isnan(prior.half_widths(["control"], "type_0", prior.levels[0]).to_numpy()).all()


def test_a_prior_without_perturbed_cells_is_refused_by_name():
    adata, _ = simulate_perturbseq(n_genes=20, n_perturbed_genes=2, n_combinations=0, n_cells_per_condition=10)
    controls = adata[adata.obs["perturbation"] == "control"].copy()
    with pytest.raises(ValueError, match=re.escape(
            "adata has no perturbed cells in 'perturbation' (only controls, 'control'); the prior needs measured "
            "perturbations to fit on.")):
        EffectPrior().fit(controls, "perturbation")


# ---------------------------------------------------------------- the held-out predictions behind the scores
def test_crossfit_predictions_reproduce_the_scores_and_the_blend():
    adata, emb = simulate_perturbseq(n_genes=40, n_perturbed_genes=12, n_combinations=8, n_cell_types=1,
                                     n_cells_per_condition=30, embedding_dim=8, seed=4)
    assert EffectPrior(emb).fit(adata, "perturbation").crossfit_predictions_ == {}  # kept only when asked
    prior = EffectPrior(emb, keep_crossfit_predictions=True).fit(adata, "perturbation")
    table = prior.crossfit_predictions_["unseen_gene"]
    assert table.index.names == ["estimator", "perturbation", "context"]
    assert list(table.columns) == list(prior.means_.columns)
    estimators = list(dict.fromkeys(table.index.get_level_values("estimator")))
    assert estimators[-2:] == ["stacked", "observed"]
    observed = table.loc["observed"]
    assert len(observed) == prior.n_held_out_["unseen_gene"] == 12
    # the observed rows are the training shifts of the held-out genes
    np.testing.assert_allclose(observed.to_numpy(), prior.shifts_.loc[list(observed.index)].to_numpy())
    scores = prior.crossfit_scores_.loc["unseen_gene"]
    for name in estimators[:-1]:
        predicted = table.loc[name].loc[observed.index].to_numpy()
        pairs = np.array([top_change_scores(p, t) for p, t in zip(predicted, observed.to_numpy())])
        assert pairs[:, 1].mean() == pytest.approx(scores[f"{name} (pearson)"], abs=1e-9), name
        assert pairs[:, 0].mean() == pytest.approx(scores[f"{name} (mse)"], abs=1e-9), name
    # the blend's rows are its weights times the candidates' rows
    blend = sum(w * table.loc[name].to_numpy() for name, w in prior.weights_["unseen_gene"].items())
    np.testing.assert_allclose(table.loc["stacked"].to_numpy(), blend, atol=1e-12)
    # a prior rebuilt from its state keeps none (they are not saved), and says so by an empty dict
    assert EffectPrior.from_state(prior.state(), emb).crossfit_predictions_ == {}
    # the few-shot entry point returns its own, which the prior keeps when fit_few_shot runs
    labels, contexts = adata.obs["perturbation"].astype(str).to_numpy(), np.full(adata.n_obs, "all")
    few = prior.few_shot_blend(adata, labels, contexts, k=5)["held_out"]
    assert set(few.index.get_level_values("estimator")) >= {"observed", "stacked", "perturbed_mean"}
    assert "few_shot" not in prior.crossfit_predictions_
