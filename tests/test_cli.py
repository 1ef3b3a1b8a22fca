"""The ``perturbscope`` command line: help, the demo and a simulated benchmark."""

import matplotlib

matplotlib.use("Agg")

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from perturbscope._choices import ACCELERATORS, BASELINE_NAMES, MODEL_NAMES, TASK_NAMES
from perturbscope.cli import main


def test_help_lists_the_subcommands(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping of the help lines
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: perturbscope")
    assert "{demo,benchmark}" in out
    assert "simulate a screen, train ScopeVI" in out
    assert "score models beside baselines" in out


def test_benchmark_help_lists_every_task_model_and_accelerator(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"one of: {', '.join(TASK_NAMES)}" in out
    assert f"comma-separated models from: {', '.join(MODEL_NAMES)}" in out
    assert f"{{{','.join(ACCELERATORS)}}}" in out


def test_choices_agree_with_the_benchmark():
    from perturbscope.benchmark import BASELINES, MODELS, TASKS, make_model

    assert tuple(TASKS) == TASK_NAMES
    # the names are defined once, in _choices; the benchmark builds every one of them
    assert MODELS is MODEL_NAMES
    assert BASELINES is BASELINE_NAMES
    assert set(BASELINE_NAMES) < set(MODEL_NAMES)
    embeddings = pd.DataFrame(np.eye(3), index=["A", "B", "C"])
    for name in MODEL_NAMES:
        model = make_model(name, embeddings)
        assert model.name == name
        assert callable(model.fit)
        assert callable(model.predict)
    for name in BASELINE_NAMES:  # the baselines are the effect estimators of effects/
        assert type(make_model(name, embeddings)).__module__.startswith("perturbscope.effects")
    with pytest.raises(ValueError, match=r"^Unknown model 'nope'; choose from \[.*'linear'\]\.$"):
        make_model("nope")


def test_help_imports_nothing_heavy():
    code = ("import sys; from perturbscope.cli import main\n"
            "try:\n    main(['benchmark', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'scvi', 'scanpy', 'lightning', 'anndata') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "perturbscope", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: perturbscope")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["benchmark", "--task", "nope"],
         "argument --task: invalid choice: 'nope' (choose from "
         + ", ".join(repr(t) for t in TASK_NAMES) + ")"),
        (["benchmark", "--task", "simulated", "--models", "additive,foo"],
         f"argument --models: unknown models ['foo']; choose from {', '.join(MODEL_NAMES)}"),
        (["benchmark", "--task", "simulated", "--models", "additive,,linear"],
         "argument --models: must be comma-separated model names without empty entries, "
         "got 'additive,,linear'"),
        (["benchmark", "--task", "simulated", "--models", "linear,linear"],
         "argument --models: models ['linear'] are listed more than once"),
        (["benchmark", "--task", "simulated", "--seeds", "0"],
         "argument --seeds: must be a positive integer, got '0'"),
        (["benchmark", "--task", "simulated", "--seeds", "two"],
         "argument --seeds: must be a positive integer, got 'two'"),
        (["benchmark", "--task", "simulated", "--accelerator", "abacus"],
         "argument --accelerator: invalid choice: 'abacus' (choose from "
         + ", ".join(repr(a) for a in ACCELERATORS) + ")"),
        (["benchmark", "--task", "norman_combo"],
         "--data is required for task 'norman_combo': the task's h5ad file or the shared data "
         "folder"),
        (["benchmark", "--task", "norman_combo", "--data", "/no/such/file.h5ad"],
         "--data '/no/such/file.h5ad' does not exist"),
        (["benchmark", "--task", "simulated", "--data", "/tmp"],
         "--data is not read by the simulated task; leave it out"),
        (["benchmark", "--task", "simulated", "--out", __file__],
         f"--out {__file__!r} is a file; pass a folder for the tables and plots"),
        (["demo", "--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
        (["demo", "--seed", "-1"], "argument --seed: must be a non-negative integer, got '-1'"),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"^perturbscope (benchmark|demo): error: (.*)$", err, re.M).group(2) == message


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "perturbscope: error: the following arguments are required: {demo,benchmark}")


@pytest.mark.slow
def test_the_demos_unseen_genes_are_unseen_in_doubles_too(monkeypatch):
    """Training kept the doubles that hold a held-out gene (420 cells at seed 0)."""
    from perturbscope import _demo

    trained_on = {}
    original = _demo.ScopeVI.setup_anndata

    def spy(adata, *args, **kwargs):
        trained_on["labels"] = set(adata.obs["perturbation"].astype(str))
        return original(adata, *args, **kwargs)

    monkeypatch.setattr(_demo.ScopeVI, "setup_anndata", spy)
    table = _demo.run_demo(max_epochs=1, progress_bar=False, accelerator="cpu")
    assert not table.empty
    genes_in_training = {g for p in trained_on["labels"] for g in p.split("+")} - {"control"}
    import numpy as np

    from perturbscope.data import simulate_perturbseq

    adata, embeddings = simulate_perturbseq(n_genes=200, n_perturbed_genes=30, n_combinations=15, n_cell_types=2,
                                            n_cells_per_condition=30, embedding_dim=32, seed=0)
    unseen, _ = _demo._held_out(adata, embeddings, np.random.default_rng(0))
    assert not genes_in_training & set(unseen)


def test_demo_runs_end_to_end(capsys):
    main(["demo", "--epochs", "1", "--seed", "0"])
    out = capsys.readouterr().out
    assert "holding out 6 unseen genes and 2 doubles" in out
    assert "Trained ScopeVI for 1 epochs" in out
    assert "Held-out perturbations, mean over perturbations and cell types:" in out
    for model in ("ScopeVI", "linear", "additive", "perturbed mean", "no change"):
        assert model in out


def test_benchmark_writes_tables_and_figures(tmp_path, capsys):
    out = tmp_path / "results"
    main(["benchmark", "--task", "simulated", "--models", "additive,linear", "--seeds", "1",
          "--out", str(out)])
    written = {p.name for p in out.iterdir()}
    assert {"metrics.csv", "summary.csv", "results.md", "pearson_delta_top_de.png",
            "l2_top_expressed.png", "delta_correlation.png"} <= written
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["model"]) >= {"additive", "linear", "noise_ceiling"}
    assert set(metrics["task"]) == {"simulated"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| model |" in printed
    assert "±" not in printed  # one seed: no spread, not '± 0.000'
    assert f"Wrote every metric to {out / 'metrics.csv'}." in printed


def test_the_package_loads_its_parts_on_first_use():
    code = ("import sys, perturbscope as ps\n"
            "assert 'perturbscope.model' not in sys.modules and 'torch' not in sys.modules\n"
            "assert ps.ScopeVI.__name__ == 'ScopeVI' and ps.ScopeVAE.__name__ == 'ScopeVAE'\n"
            "assert [m.__name__ for m in (ps.data, ps.tl, ps.pl, ps.probe)] == "
            "['perturbscope.data', 'perturbscope.tl', 'perturbscope.pl', 'perturbscope.probe']\n"
            "assert dir(ps) == sorted([*ps.__all__, '__version__'])\n"
            "try:\n    ps.nothing\nexcept AttributeError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "module 'perturbscope' has no attribute 'nothing'"
