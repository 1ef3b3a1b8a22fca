import pandas as pd
import pytest

from perturbscope import pl
from perturbscope.benchmark import TASKS, load_task, markdown_table, run_benchmark, summarize


def test_runner_smoke_on_simulated_data_with_scopevi(tmp_path):
    results = run_benchmark(
        None,
        "simulated",
        models=["scopevi", "linear", "additive", "embedding_nn", "perturbed_mean"],
        seeds=1,
        out=tmp_path,
        scopevi_kwargs={"train": {"max_epochs": 2}},
        progress_bar=False,
    )
    assert set(results["model"]) == {
        "scopevi",
        "linear",
        "additive",
        "embedding_nn",
        "perturbed_mean",
        "noise_ceiling",
        "observed",
    }
    assert list(results.columns) == [
        "task",
        "seed",
        "split",
        "group",
        "model",
        "perturbation",
        "metric",
        "value",
    ]
    scores = results[results["perturbation"] != "(all)"]
    # every held-out single is scored once per model (2 folds cover all 9 singles)
    assert (
        scores.groupby("model")["perturbation"]
        .nunique()
        .drop("observed", errors="ignore")
        .eq(9)
        .all()
    )
    # the perturbed mean predicts one change for all: complete mode collapse, and cell-eval's PDS
    # near chance ((n+1)/(2n) on average), far below the split-half ceiling's
    collapse = results[
        (results["metric"] == "delta_correlation") & (results["model"] == "perturbed_mean")
    ]
    assert collapse["value"].min() == pytest.approx(1.0)
    pds = scores[
        (scores["metric"] == "discrimination_score") & (scores["model"] == "perturbed_mean")
    ]
    ceiling_pds = scores[
        (scores["metric"] == "discrimination_score") & (scores["model"] == "noise_ceiling")
    ]
    assert pds["value"].mean() < 0.75 < ceiling_pds["value"].mean()
    # the additive baseline predicts an unseen single as no change: Pearson delta 0
    pearson = scores[(scores["metric"] == "pearson_delta") & (scores["model"] == "additive")]
    assert pearson["value"].eq(0.0).all()
    pl.benchmark_figures(results, tmp_path)
    for name in ("metrics.csv", "summary.csv", "results.md", "pearson_delta_top_de.png"):
        assert (tmp_path / name).is_file()
    written = pd.read_csv(tmp_path / "metrics.csv")
    assert len(written) == len(results)
    text = (tmp_path / "results.md").read_text()
    assert "| noise ceiling (split-half) |" in text
    assert "| scopevi |" in text


def test_summary_and_table_mark_missing_models():
    results = run_benchmark(
        None, "simulated", models=["additive"], seeds=2, distributional=False, progress_bar=False
    )
    summary = summarize(results)
    row = summary.loc[("simulated", "unseen_single", "additive", "l2_top_expressed")]
    assert row["n_seeds"] == 2
    assert row["sd"] >= 0
    table = markdown_table(
        summary, metrics=["pearson_delta"], models=["noise_ceiling", "scopevi", "additive"]
    )
    assert "| scopevi | not run |" in table
    assert table.count("±") == 2


def test_runner_errors():
    with pytest.raises(ValueError, match="Unknown task 'norman'; choose one of"):
        run_benchmark(None, "norman")
    with pytest.raises(ValueError, match=r"Unknown models \['gears'\]"):
        run_benchmark(None, "simulated", models=["gears"])
    with pytest.raises(ValueError, match="task 'norman_combo' needs data"):
        load_task("norman_combo", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("norman_combo", "/nonexistent/perturbench_devel.h5ad")
    assert set(TASKS) == {
        "norman_unseen_single",
        "norman_combo",
        "mcfaline_unseen_line",
        "kang_unseen_cell_type",
        "papalexi_unseen_single",
        "simulated",
    }


def test_table_shows_no_spread_for_one_seed():
    results = run_benchmark(
        None, "simulated", models=["additive"], seeds=1, distributional=False, progress_bar=False
    )
    table = markdown_table(summarize(results), metrics=["pearson_delta"], models=["additive"])
    assert "±" not in table
    mean = summarize(results).loc[("simulated", "unseen_single", "additive", "pearson_delta"), "mean"]
    assert f"| additive | {mean:.3f} |" in table


def test_benchmark_runs_scopevi_at_its_defaults():
    """RESULTS.md reports ScopeVI() and ScopeVI.train() as a user gets them (issue 10, item 5)."""
    import inspect

    import perturbscope as ps
    from perturbscope.benchmark import SCOPEVI_DEFAULTS, make_model

    assert SCOPEVI_DEFAULTS == {"model": {}, "train": {}}
    model = make_model("scopevi")
    assert model.model_kwargs == {}
    assert model.train_kwargs == {}
    assert make_model("scopevi_vae").model_kwargs == {"effect_prior": False}
    signature = inspect.signature(ps.ScopeVI.__init__).parameters
    assert signature["effect_prior"].default is True
    assert inspect.signature(ps.ScopeVI.train).parameters["max_epochs"].default == 100


def test_old_progress_keyword_still_works_with_a_future_warning(capsys):
    new = run_benchmark(None, "simulated", models=["additive"], seeds=1, distributional=False,
                        progress_bar=True)
    assert "benchmark simulated" in "".join(capsys.readouterr())  # the bar is drawn
    with pytest.warns(FutureWarning, match=r"^run_benchmark's `progress` is deprecated; use `progress_bar`\.$"):
        old = run_benchmark(None, "simulated", models=["additive"], seeds=1, distributional=False,
                            progress=False)
    assert "benchmark simulated" not in "".join(capsys.readouterr())  # progress=False still hides it
    pd.testing.assert_frame_equal(old, new)


def test_bad_seeds_and_no_runnable_model_are_named_before_any_work():
    import re

    import pytest

    with pytest.raises(ValueError, match=re.escape("seeds must be a positive integer, got 0.")):
        run_benchmark(None, "simulated", models=["additive"], seeds=0)
    spec = TASKS["kang_unseen_cell_type"]
    skipped = sorted(spec.not_applicable)
    with pytest.warns(UserWarning, match="skips model"), pytest.raises(ValueError, match=re.escape(
            f"task 'kang_unseen_cell_type' can run none of the models asked for; it skips {skipped}.")):
        run_benchmark("/no/such/folder", "kang_unseen_cell_type", models=["linear"], seeds=1)


def test_two_results_can_be_concatenated():
    import pandas as pd

    first = run_benchmark(None, "simulated", models=["additive"], seeds=1, distributional=False, progress_bar=False)
    second = run_benchmark(None, "simulated", models=["no_change"], seeds=1, distributional=False, progress_bar=False)
    both = pd.concat([first, second])  # a DataFrame in attrs made this raise
    assert set(both["model"]) >= {"additive", "no_change"}
    assert {"model", "seconds"} <= set(first.attrs["timings"][0])


def test_the_ceiling_skips_distributional_metrics_when_the_models_do():
    results = run_benchmark(None, "simulated", models=["additive"], seeds=1, distributional=False, progress_bar=False)
    ceiling = results[(results["model"] == "noise_ceiling") & (results["metric"] == "energy_distance")]
    assert len(ceiling)
    assert ceiling["value"].isna().all()
    profile = results[(results["model"] == "noise_ceiling") & (results["metric"] == "pearson_delta_top_de")]
    assert profile["value"].notna().all()


def test_scopevi_kwargs_sections_are_checked():
    import re

    import pytest

    from perturbscope.benchmark import make_model

    with pytest.raises(ValueError, match=re.escape("scopevi_kwargs has unknown sections ['trian']")):
        make_model("scopevi", scopevi_kwargs={"trian": {"max_epochs": 1}})
    with pytest.raises(ValueError, match=re.escape("scopevi_kwargs['predict'] cannot set 'seed'")):
        make_model("scopevi", scopevi_kwargs={"predict": {"seed": 3}})


def test_the_benchmark_seed_is_the_effect_priors_seed_unless_the_model_kwargs_set_one():
    from perturbscope.benchmark import make_model
    from perturbscope.benchmark._tasks import simulated_screen
    from perturbscope.effects import EffectPrior

    adata, embeddings = simulated_screen()
    train = {"train": {"max_epochs": 1}}
    seeded = make_model("scopevi", embeddings, seed=2, scopevi_kwargs=train).fit(adata, "perturbation")
    assert seeded.model_.init_params_["non_kwargs"]["prior_seed"] == 2
    # the prior alone, fitted on the same cells with that seed, is the model's (what
    # benchmarks/prior_diagnostics.py refits instead of retraining the VAE)
    alone = EffectPrior(embeddings, seed=2).fit(adata, "perturbation", data_scale="counts")
    fitted = seeded.model_.effect_prior  # the same up to float rounding (the model reads its registered copy)
    assert {k: sorted(w) for k, w in alone.weights_.items()} == {k: sorted(w) for k, w in fitted.weights_.items()}
    for kind, weights in alone.weights_.items():
        assert weights == pytest.approx(fitted.weights_[kind], abs=1e-6), kind
    pd.testing.assert_frame_equal(alone.crossfit_scores_, fitted.crossfit_scores_, atol=1e-6)
    fixed = make_model("scopevi", embeddings, seed=2,
                       scopevi_kwargs={**train, "model": {"prior_seed": 5}}).fit(adata, "perturbation")
    assert fixed.model_.init_params_["non_kwargs"]["prior_seed"] == 5
