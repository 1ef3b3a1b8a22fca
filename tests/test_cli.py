"""The ``perturbscope`` command line: help, the demo and a simulated benchmark."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

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


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "required: command" in capsys.readouterr().err


@pytest.mark.slow
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
    assert f"Wrote every metric to {out / 'metrics.csv'}." in printed
