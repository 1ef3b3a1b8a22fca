"""Where perturbscope claims a community metric, it computes it as the community's library does.

Each metric is checked against the library itself on random data: cell-eval (PDS, MAE, DE
overlap, the Spearman-Brown ceiling), dcor (energy distance, distance correlation) and
scanpy (pseudobulk).
"""

import logging

import anndata as ad
import dcor
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse, stats
from scipy.spatial.distance import cdist

from perturbscope.benchmark import (
    ControlDE,
    de_overlap,
    discrimination_score,
    energy_distance,
    evaluate,
    mae,
    noise_ceiling,
    prepare_reference,
    significant_de_genes,
    spearman_brown,
)
from perturbscope.data import pseudobulk
from perturbscope.tl import distance_correlation

cell_eval = pytest.importorskip("cell_eval", reason="cell-eval (the `eval` extra) is not installed")

CONTROL = "non-targeting"
GENES = [f"G{i}" for i in range(40)]
# two perturbations are named like a gene (cell-eval leaves that gene out of their PDS)
PERTURBATIONS = ["G1", "G2", "G7+G8", "P3", "P4", "P5", "P6", "P7", "P8", "P9"]
# cell-eval's names of our columns
CELL_EVAL_NAMES = {
    "discrimination_score_l1": "discrimination_score",
    "overlap_at_N": "de_overlap",
    "mae": "mae",
    "pearson_delta": "pearson_delta",
}


def _cells(rng, base, effects, n_control=60, n=24):
    blocks = [rng.poisson(np.exp(base), (n_control, len(GENES)))]
    labels = [CONTROL] * n_control
    for p in PERTURBATIONS:
        blocks.append(rng.poisson(np.exp(np.clip(base + effects[p], -3, 4)), (n, len(GENES))))
        labels += [p] * n
    return ad.AnnData(
        np.log1p(np.vstack(blocks)).astype(np.float64),
        obs=pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=GENES),
    )


@pytest.fixture(scope="module")
def pair():
    """Observed cells and a noisy prediction sharing the observed control cells."""
    rng = np.random.default_rng(10)
    base = rng.normal(0.5, 0.6, len(GENES))
    effects = {p: rng.normal(0, 0.8, len(GENES)) * (rng.random(len(GENES)) < 0.3) for p in PERTURBATIONS}
    guessed = {p: 0.5 * e + rng.normal(0, 0.7, len(GENES)) for p, e in effects.items()}
    real, pred = _cells(rng, base, effects), _cells(rng, base, guessed)
    control = (real.obs["target"] == CONTROL).to_numpy()
    pred.X[control] = real.X[control]
    return real, pred


@pytest.fixture(scope="module")
def cell_eval_scores(pair, tmp_path_factory):
    """cell-eval's per-perturbation scores (its "minimal" profile), under our column names."""
    real, pred = pair
    logging.getLogger("cell_eval").setLevel(logging.ERROR)
    evaluator = cell_eval.MetricsEvaluator(
        pred.copy(), real.copy(), control_pert=CONTROL, pert_col="target", num_threads=1,
        outdir=str(tmp_path_factory.mktemp("cell_eval")),
    )
    results, _ = evaluator.compute(profile="minimal", write_csv=False)
    table = results.to_pandas().set_index("perturbation")
    return table[list(CELL_EVAL_NAMES)].rename(columns=CELL_EVAL_NAMES)


def _means(adata):
    perturbed = adata[adata.obs["target"] != CONTROL]
    return pseudobulk(perturbed, "target").loc[PERTURBATIONS]


def _control(adata):
    return np.asarray(adata.X[(adata.obs["target"] == CONTROL).to_numpy()])


def _control_mean(adata):
    return _control(adata).mean(axis=0)


def _old_discrimination_score(predicted, observed):
    """perturbscope's score before it followed cell-eval: predictions ranked around the truth."""
    distances = cdist(observed.to_numpy(), predicted.to_numpy(), metric="cityblock")
    own = np.diag(distances)
    ties = np.isclose(distances, own[:, None], rtol=1e-6, atol=1e-9)
    closer = ((distances < own[:, None]) & ~ties).sum(axis=1) + 0.5 * (ties.sum(axis=1) - 1)
    return pd.Series(1.0 - closer / (len(observed) - 1), index=observed.index)


def test_discrimination_score_is_cell_evals(pair, cell_eval_scores):
    real, pred = pair
    ours = discrimination_score(_means(pred), _means(real), _control_mean(real))
    expected = cell_eval_scores["discrimination_score"].loc[PERTURBATIONS]
    assert ours.to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-12)
    # the scores spread, so the check is not of a constant
    assert expected.nunique() >= 4


def test_old_discrimination_score_ranked_differently(pair, cell_eval_scores):
    real, pred = pair
    expected = cell_eval_scores["discrimination_score"].loc[PERTURBATIONS]
    old = _old_discrimination_score(_means(pred), _means(real))
    new = discrimination_score(_means(pred), _means(real), _control_mean(real))
    assert stats.spearmanr(old, expected).statistic < 0.9
    assert (old - expected).abs().max() > 0.2
    assert stats.spearmanr(new, expected).statistic == pytest.approx(1.0)


def test_mae_is_cell_evals(pair, cell_eval_scores):
    real, pred = pair
    observed, predicted = _means(real), _means(pred)
    ours = [mae(predicted.loc[p].to_numpy(), observed.loc[p].to_numpy()) for p in PERTURBATIONS]
    assert ours == pytest.approx(cell_eval_scores["mae"].loc[PERTURBATIONS].to_numpy(), rel=1e-12)


def test_de_overlap_is_cell_evals(pair, cell_eval_scores):
    real, pred = pair
    labels = real.obs["target"].to_numpy()
    ours = []
    for p in PERTURBATIONS:
        cells = labels == p
        observed = significant_de_genes(real.X[cells], _control(real), GENES)
        predicted = significant_de_genes(pred.X[cells], _control(pred), GENES)
        ours.append(de_overlap(predicted, observed))
    expected = cell_eval_scores["de_overlap"].loc[PERTURBATIONS].to_numpy()
    assert ours == pytest.approx(expected, abs=1e-12)
    assert 0 < expected.mean() < 1


def test_control_de_pvalues_are_scipys_mann_whitney():
    rng = np.random.default_rng(2)
    # counts on the log1p scale: many ties, genes never expressed, one constant in both
    control = np.log1p(rng.poisson(0.8, (90, 30))).astype(float)
    perturbed = np.log1p(rng.poisson(1.1, (35, 30))).astype(float)
    control[:, :3] = 0.0
    perturbed[:, :2] = 0.0
    control[:, 5], perturbed[:, 5] = 2.0, 2.0
    test = ControlDE(control, [f"g{i}" for i in range(30)])
    expected = stats.mannwhitneyu(perturbed, control, axis=0, method="asymptotic").pvalue
    np.testing.assert_allclose(test.pvalues(perturbed), expected, rtol=1e-12, atol=0)
    assert test.pvalues(perturbed)[[0, 1, 5]].tolist() == [1.0, 1.0, 1.0]
    # continuous values, no ties
    x, y = rng.normal(size=(20, 12)), rng.normal(0.5, 1, (50, 12))
    np.testing.assert_allclose(
        ControlDE(y, list("abcdefghijkl")).pvalues(x),
        stats.mannwhitneyu(x, y, axis=0, method="asymptotic").pvalue,
        rtol=1e-12,
    )


def test_control_de_bad_input():
    with pytest.raises(ValueError, match=r"^DE needs control cells x genes; got shape \(0, 3\)"):
        ControlDE(np.zeros((0, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="^control has 3 genes but 2 gene names"):
        ControlDE(np.zeros((4, 3)), ["a", "b"])
    test = ControlDE(np.zeros((4, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"^perturbed must be cells x 3 genes .*got shape \(2, 2\)"):
        test.significant_genes(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"^perturbed must be cells x 3 genes"):
        significant_de_genes(np.zeros((0, 3)), np.zeros((4, 3)), ["a", "b", "c"])


def test_evaluate_reports_the_cell_eval_columns(pair, cell_eval_scores):
    real, pred = pair
    perturbed = (real.obs["target"] != CONTROL).to_numpy()
    control = ad.AnnData(_control(real), var=pd.DataFrame(index=GENES))
    reference = prepare_reference(real[perturbed], control, "target", n_de=5, n_pcs=3)
    scores = evaluate(pred[perturbed], reference, perturbation_key="target", layer=None)
    expected = cell_eval_scores.loc[scores.index]
    for column in ("discrimination_score", "mae", "de_overlap", "pearson_delta"):
        assert scores[column].to_numpy() == pytest.approx(expected[column].to_numpy(), abs=1e-9)


def test_spearman_brown_is_cell_evals(pair, tmp_path):
    real, _ = pair
    evaluator = cell_eval.MetricsEvaluator(
        None, real.copy(), control_pert=CONTROL, pert_col="target", num_threads=1,
        outdir=str(tmp_path),
    )
    raw, corrected = evaluator.compute_ceiling(profile="minimal", write_csv=False)
    raw = raw.to_pandas().set_index("perturbation")[list(CELL_EVAL_NAMES)].rename(
        columns=CELL_EVAL_NAMES
    )
    corrected = corrected.to_pandas().iloc[0][list(CELL_EVAL_NAMES)].rename(CELL_EVAL_NAMES)
    ours = spearman_brown(raw.mean())
    assert ours.to_numpy() == pytest.approx(corrected.to_numpy(), nan_ok=True)
    assert np.isnan(ours["mae"])  # an error has no full-depth ceiling
    assert ours["pearson_delta"] == pytest.approx(
        2 * raw["pearson_delta"].mean() / (1 + raw["pearson_delta"].mean())
    )


def test_noise_ceiling_spearman_brown_option(pair):
    real, _ = pair
    perturbed = (real.obs["target"] != CONTROL).to_numpy()
    observed = real[perturbed]
    control = ad.AnnData(_control(real), var=pd.DataFrame(index=GENES))
    plain = noise_ceiling(observed, control, "target", n_de=5, n_pcs=3)
    corrected = noise_ceiling(observed, control, "target", spearman_brown=True, n_de=5, n_pcs=3)
    r = plain["pearson_delta"]
    assert corrected["pearson_delta"].to_numpy() == pytest.approx((2 * r / (1 + r)).to_numpy())
    assert (corrected["pearson_delta"] > r).all()
    assert corrected["energy_distance"].isna().all()


def test_energy_distance_is_dcors_with_unchanged_numbers():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(70, 5)), rng.normal(0.3, 1.5, size=(50, 5))
    value = energy_distance(x, y)
    assert value == pytest.approx(float(dcor.energy_distance(x, y)), rel=1e-12)
    # the formula perturbscope used before (V-statistic, no factor one half)
    before = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    assert value == pytest.approx(before, rel=1e-10)
    # and scipy's energy distance, squared, in one dimension
    assert energy_distance(x[:, :1], y[:, :1]) == pytest.approx(
        stats.energy_distance(x[:, 0], y[:, 0]) ** 2, rel=1e-10
    )


def test_distance_correlation_is_dcors():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 8))
    y = np.tanh(x[:, :3]) + rng.normal(0, 0.5, (60, 3))
    assert distance_correlation(x, y) == pytest.approx(dcor.distance_correlation(x, y), rel=1e-12)
    a, b = rng.normal(size=200), rng.normal(size=200)
    assert distance_correlation(a, a**2 + b) == pytest.approx(
        dcor.distance_correlation(a, a**2 + b), rel=1e-10
    )


def test_pseudobulk_is_scanpys_aggregate():
    rng = np.random.default_rng(5)
    X = sparse.random(300, 20, density=0.3, format="csr", random_state=5)
    obs = pd.DataFrame(
        {"p": rng.choice(["b", "a", "c"], 300), "ctx": rng.choice(["k2", "k1"], 300)},
        index=[f"c{i}" for i in range(300)],
    )
    adata = ad.AnnData(X, obs=obs.astype("category"))
    expected = sc.get.aggregate(adata, ["p", "ctx"], func="mean")
    table = pseudobulk(adata, ["p", "ctx"])
    index = pd.MultiIndex.from_frame(expected.obs[["p", "ctx"]].astype(str))
    scanpy_table = pd.DataFrame(expected.layers["mean"], index=index).sort_index()
    assert table.index.equals(scanpy_table.index)
    np.testing.assert_allclose(table.to_numpy(), scanpy_table.to_numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="^pseudobulk needs at least one cell"):
        pseudobulk(adata[:0], "p")
