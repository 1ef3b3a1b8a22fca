import numpy as np
import pandas as pd
import pytest

from perturbscope.benchmark import (
    MatchingMeanBaseline,
    few_shot_splits,
    learning_curve,
    learning_curve_table,
)
from perturbscope.data import log1p_normalized, simulate_perturbseq


@pytest.fixture(scope="module")
def screen():
    adata, embeddings = simulate_perturbseq(
        n_genes=40, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
        n_cells_per_condition=24, seed=1,
    )
    return adata, embeddings


def test_few_shot_splits_are_nested_and_leak_free(screen):
    adata, _ = screen
    splits = few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(0, 5, 10), seed=3)
    labels = adata.obs["perturbation"].astype(str)
    in_context = adata.obs["cell_type"].astype(str) == "type_1"
    held = adata.obs_names[(in_context & (labels != "control")).to_numpy()]
    given = {k: set(s.train) & set(held) for k, s in splits.items()}
    assert given[0] == set()
    assert given[5] < given[10]  # nested: the 5 given cells are among the 10
    for k, split in splits.items():
        assert not set(split.train) & set(split.test)
        per_perturbation = labels[list(given[k])].value_counts()
        assert (per_perturbation == k).all()
        assert len(per_perturbation) == (4 if k else 0)
        assert len(split.test) == 4 * 24 - 4 * k
        assert set(split.control) <= set(split.train)


def test_few_shot_splits_skip_perturbations_without_enough_test_cells(screen):
    adata, _ = screen
    splits = few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(0, 20), min_test_cells=5)
    assert list(splits) == [0]  # 24 - 20 < 5 test cells left for every perturbation
    with pytest.warns(UserWarning, match="k=20 leaves fewer than 5 test cells"):
        few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(0, 20), min_test_cells=5)


def test_few_shot_splits_need_test_cells(screen):
    adata, _ = screen
    with pytest.raises(ValueError, match="min_test_cells must be at least 4"):
        few_shot_splits(adata, "perturbation", "cell_type", "type_1", min_test_cells=1)


@pytest.mark.parametrize("shots", [(), (0, -1), (5, 5)])
def test_few_shot_splits_reject_bad_shots(screen, shots):
    adata, _ = screen
    with pytest.raises(ValueError, match="shots must be distinct non-negative integers"):
        few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=shots)


def test_k_shot_matching_mean_is_the_mean_of_given_cells(screen):
    adata, _ = screen
    split = few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(6,))[6]
    model = MatchingMeanBaseline().fit(adata[split.train], "perturbation", context_key="cell_type")
    expression = log1p_normalized(adata)
    expression = expression.toarray() if hasattr(expression, "toarray") else np.asarray(expression)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    given = np.isin(adata.obs_names, split.train) & (adata.obs["cell_type"] == "type_1").to_numpy()
    expected = expression[given & (labels == "G02")].mean(0) - expression[given & (labels == "control")].mean(0)
    np.testing.assert_allclose(model.predict_shifts(["G02"], "type_1").to_numpy()[0], expected, atol=1e-5)


def test_learning_curve_rows(screen):
    adata, _ = screen
    curve = learning_curve(adata, "perturbation", "cell_type", contexts=["type_1"], shots=(0, 5),
                           data_scale="counts", scopevi=False, baselines=["matching_mean"],
                           distributional=False, progress_bar=False)
    assert set(curve["model"]) == {"matching_mean", "noise_ceiling", "observed"}
    scored = curve[(curve["model"] == "matching_mean") & (curve["metric"] == "pearson_delta_top_de")]
    assert sorted(scored.groupby("shots")["perturbation"].nunique().items()) == [(0, 4), (5, 4)]
    assert set(curve["group"]) == {"zero-shot", "5-shot"}


def test_learning_curve_with_scopevi_query(screen):
    adata, embeddings = screen
    curve = learning_curve(
        adata, "perturbation", "cell_type", contexts=["type_1"], shots=(0, 8), data_scale="counts",
        gene_embeddings=embeddings, baselines=["no_change"], fine_tune_epochs=2, n_samples=2,
        query_variants={"scopevi": {}, "scopevi_frozen": {"freeze_decoder": True}},
        scopevi_kwargs={"model": {"n_latent": 4, "n_hidden": 16}, "train": {"max_epochs": 2}},
        progress_bar=False,
    )
    assert {"scopevi", "scopevi_frozen", "scopevi_reference", "no_change"} <= set(curve["model"])
    assert {"variance_ratio", "energy_distance"} <= set(curve["metric"])
    ratio = curve[(curve["metric"] == "variance_ratio") & (curve["model"] == "scopevi")]["value"]
    assert np.isfinite(ratio).all()
    assert (ratio > 0).all()
    table = learning_curve_table(curve)
    assert list(table.columns) == [0, 8]


def test_learning_curve_bad_input(screen):
    adata, _ = screen
    with pytest.raises(KeyError, match="context_key 'line' not in adata.obs"):
        learning_curve(adata, "perturbation", "line", scopevi=False, progress_bar=False)
    with pytest.raises(ValueError, match="Unknown model 'mean'"):
        learning_curve(adata, "perturbation", "cell_type", baselines=["mean"], scopevi=False, progress_bar=False)
    with pytest.raises(ValueError, match="metric 'nope' not in results"):
        learning_curve_table(learning_curve(adata, "perturbation", "cell_type", contexts=["type_1"],
                                            shots=(0,), data_scale="counts", scopevi=False,
                                            baselines=["no_change"], distributional=False,
                                            progress_bar=False), "nope")


def test_few_shot_splits_common_test_set(screen):
    adata, _ = screen
    splits = few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(0, 5, 10),
                             seed=2, common_test=True)
    tests = [set(s.test) for s in splits.values()]
    assert tests[0] == tests[1] == tests[2]
    assert len(tests[0]) == 4 * (24 - 10)
    for split in splits.values():
        assert not set(split.train) & tests[0]
    # the cells given at k=10 are exactly those the default scores at k=10 leaves out
    default = few_shot_splits(adata, "perturbation", "cell_type", "type_1", shots=(0, 5, 10), seed=2)
    assert set(default[10].test) == tests[0]


def test_old_progress_keyword_still_works_with_a_future_warning(screen, capsys):
    adata, _ = screen
    kwargs = {"contexts": ["type_1"], "shots": (0,), "data_scale": "counts", "scopevi": False,
              "baselines": ["no_change"], "distributional": False}
    new = learning_curve(adata, "perturbation", "cell_type", progress_bar=True, **kwargs)
    assert "learning curve" in "".join(capsys.readouterr())
    with pytest.warns(FutureWarning, match=r"^learning_curve's `progress` is deprecated; use `progress_bar`\.$"):
        old = learning_curve(adata, "perturbation", "cell_type", progress=False, **kwargs)
    assert "learning curve" not in "".join(capsys.readouterr())
    pd.testing.assert_frame_equal(old, new)


def test_a_metric_without_finite_values_is_not_reported_as_zero():
    """All-NaN at k = 0 stays NaN ("–"), and only finite seeds count towards the mean, the sd and
    the number of seeds."""
    from perturbscope.benchmark import shot_statistics, summarize

    results = pd.DataFrame({"task": "t", "seed": [0, 1, 0, 1], "shots": [0, 0, 5, 5], "model": "m",
                            "perturbation": "A", "metric": "r", "value": [np.nan, np.nan, 0.5, 0.7]})
    table = learning_curve_table(results, "r")
    assert table.loc[("t", "m"), 0] == "–"
    assert table.loc[("t", "m"), 5] == "0.600 ± 0.141"
    stats = shot_statistics(results, "r")
    assert stats.loc[("t", "m", 0)].isna().all()
    per_task = results.assign(group="g", value=[np.nan, 0.2, 0.4, 0.6], seed=[0, 1, 2, 3]).drop(columns="shots")
    summary = summarize(per_task)
    row = summary.loc[("t", "g", "m", "r")]
    assert row["mean"] == pytest.approx(0.4)
    assert row["sd"] == pytest.approx(0.2)  # sd of 0.2, 0.4, 0.6
    assert row["n_seeds"] == 3  # the NaN seed is not counted
    one = summarize(per_task.iloc[:2])
    assert one.loc[("t", "g", "m", "r"), "n_seeds"] == 1
    assert one.loc[("t", "g", "m", "r"), "sd"] == 0.0


def test_query_fine_tuning_follows_the_references_settings_and_restores_logging(monkeypatch):
    import logging

    from perturbscope import ScopeVI
    from perturbscope.benchmark import make_model
    from perturbscope.benchmark._learning_curve import _adapt_to_context

    adata, emb = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=0, n_cell_types=2,
                                     n_cells_per_condition=20, embedding_dim=4, seed=0)
    in_type0 = (adata.obs["cell_type"] == "type_0").to_numpy()
    reference = make_model("scopevi", emb, scopevi_kwargs={
        "model": {"n_latent": 2, "n_hidden": 8}, "train": {"max_epochs": 1, "batch_size": 64}})
    reference.fit(adata[in_type0].copy(), "perturbation", context_key="cell_type")
    seen = {}
    monkeypatch.setattr(ScopeVI, "train", lambda self, **kwargs: seen.update(kwargs))
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    query = adata[~in_type0 & (adata.obs["perturbation"] == "control").to_numpy()].copy()
    _adapt_to_context(reference, query, epochs=1, seed=0)
    assert (seen["batch_size"], seen["accelerator"]) == (64, "cpu")
    assert logger.level == level  # it stayed at ERROR for the rest of the process
