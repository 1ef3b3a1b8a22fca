import matplotlib

matplotlib.use("Agg")
import pytest

from perturbscope.benchmark import run_benchmark
from perturbscope.pl._benchmark import (
    benchmark_mode_collapse,
    benchmark_scatter,
    benchmark_scores,
)


@pytest.fixture(scope="module")
def results():
    return run_benchmark(
        None,
        "simulated",
        models=["additive", "perturbed_mean"],
        seeds=1,
        distributional=False,
        progress_bar=False,
    )


def test_scores_plot_draws_models_and_ceiling(results):
    ax = benchmark_scores(results, "l2_top_expressed")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["additive", "perturbed_mean"]
    ceiling = results[
        (results["model"] == "noise_ceiling") & (results["metric"] == "l2_top_expressed")
    ]
    assert ax.lines[0].get_ydata()[0] == pytest.approx(ceiling["value"].mean())


def test_scatter_and_mode_collapse(results):
    ax = benchmark_scatter(results, "perturbed_mean", "additive", metric="l2_top_expressed")
    assert len(ax.collections[0].get_offsets()) == 9
    ax = benchmark_mode_collapse(results)
    assert ax.patches[1].get_height() == pytest.approx(1.0)  # perturbed mean: full collapse
    with pytest.raises(ValueError, match="model 'scopevi' not in results"):
        benchmark_scatter(results, "scopevi", "additive")
    with pytest.raises(ValueError, match="metric 'r2' not in results"):
        benchmark_scores(results, "r2")
    with pytest.raises(KeyError, match="results lacks columns"):
        benchmark_scores(results.drop(columns="seed"))


def test_learning_curve_plot_lines_per_model():
    import pandas as pd

    from perturbscope.pl import learning_curve as plot_curve

    results = pd.DataFrame({
        "task": "t", "group": "g", "seed": [0, 0, 1, 1, 0, 0, 1, 1], "shots": [0, 5] * 4,
        "model": ["m"] * 4 + ["noise_ceiling"] * 4, "perturbation": "A", "metric": "r",
        "value": [0.1, 0.5, 0.3, 0.7, 0.9, 0.9, 0.9, 0.9]})
    ax = plot_curve(results, metric="r")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["m", "noise ceiling (split-half)"]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 5]
    assert list(line.get_ydata()) == pytest.approx([0.2, 0.6])
    with pytest.raises(KeyError, match="results lacks a 'shots' column"):
        plot_curve(results.drop(columns="shots"), metric="r")


def test_benchmark_figures_rejects_other_tables(tmp_path):
    import pandas as pd

    from perturbscope.pl import benchmark_figures

    table = pd.DataFrame({"task": ["t"], "metric": ["pearson_delta_top_de"], "value": [0.5]})
    with pytest.raises(KeyError, match="results lacks columns"):
        benchmark_figures(table, tmp_path)
