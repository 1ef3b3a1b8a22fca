"""The scanpy-style tools: each writes exactly its documented keys and leaves the rest alone."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbscope import tl
from perturbscope.model import ScopeVI
from perturbscope.probe import axis_alignment_scores


def _snapshot(adata: ad.AnnData) -> dict:
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return {
        "obs": adata.obs.copy(), "var": adata.var.copy(), "obsm": set(adata.obsm),
        "layers": set(adata.layers), "uns": set(adata.uns), "X": X, "shape": adata.shape,
    }


def _assert_wrote_only(before: dict, adata: ad.AnnData, **added: set[str]) -> None:
    """``adata`` equals the snapshot except for the ``added`` keys of each slot."""
    after = _snapshot(adata)
    assert after["shape"] == before["shape"]
    np.testing.assert_array_equal(after["X"], before["X"])
    for slot in ("obsm", "layers", "uns"):
        assert after[slot] == before[slot] | added.get(slot, set()), slot
    for slot in ("obs", "var"):
        new = set(after[slot].columns) - set(before[slot].columns)
        assert new == added.get(slot, set()), slot
        pd.testing.assert_frame_equal(after[slot][before[slot].columns], before[slot])


@pytest.fixture(scope="module")
def trained(small_screen):
    adata, embeddings = small_screen
    adata = adata[adata.obs["perturbation"].astype(str).str.count(r"\+") == 0].copy()
    ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings,
                          context_key="cell_type")
    model = ScopeVI(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    cells = ad.AnnData(adata.X.copy(), obs=adata.obs[["perturbation", "cell_type"]].copy(),
                       var=pd.DataFrame(index=adata.var_names.copy()))
    cells.obsm["X_umap"] = np.zeros((cells.n_obs, 2))
    cells.uns["note"] = "kept"
    return model, cells


def test_scopevi_latent_writes_obsm_only(trained):
    model, cells = trained
    cells = cells.copy()
    before = _snapshot(cells)
    assert tl.scopevi_latent(model, cells) is None
    _assert_wrote_only(before, cells, obsm={"X_scopevi"})
    expected = model.get_latent_representation(cells.copy())
    np.testing.assert_allclose(cells.obsm["X_scopevi"], expected, rtol=1e-5)
    assert cells.obsm["X_scopevi"].shape == (cells.n_obs, 4)
    # writing again over an existing key says so (scanpy replaces silently)
    with pytest.warns(UserWarning, match=re.escape("adata.obsm['X_scopevi'] exists and is replaced; pass key_added=")):
        tl.scopevi_latent(model, cells)


def test_scopevi_latent_copy_leaves_input_alone(trained):
    model, cells = trained
    before = _snapshot(cells)
    result = tl.scopevi_latent(model, cells, key_added="X_mine", copy=True)
    _assert_wrote_only(before, cells)
    _assert_wrote_only(before, result, obsm={"X_mine"})


def test_predict_response_fills_control_rows(trained):
    model, cells = trained
    cells = cells.copy()
    before = _snapshot(cells)
    assert tl.predict_response(model, cells, "G00", seed=3) is None
    _assert_wrote_only(before, cells, layers={"scopevi_G00"})
    response = cells.layers["scopevi_G00"]
    control = (cells.obs["perturbation"] == "control").to_numpy()
    prediction = model.predict(cells[control].copy(), ["G00"], n_samples=1, seed=3)
    np.testing.assert_allclose(response[control], prediction.layers["log1p_norm"], rtol=1e-6)
    assert np.isnan(response[~control]).all()
    tl.predict_response(model, cells, "G01", key_added="counts_G01", output="X", seed=3)
    prediction = model.predict(cells[control].copy(), ["G01"], n_samples=1, seed=3)
    np.testing.assert_allclose(cells.layers["counts_G01"][control], prediction.X, rtol=1e-6)


def test_predict_response_copy_and_errors(trained):
    model, cells = trained
    before = _snapshot(cells)
    result = tl.predict_response(model, cells, "G00", copy=True)
    _assert_wrote_only(before, cells)
    _assert_wrote_only(before, result, layers={"scopevi_G00"})
    with pytest.raises(TypeError, match=r"^perturbation must be one label \(a string\), got \['G00'\]\.$"):
        tl.predict_response(model, cells, ["G00"])
    with pytest.raises(ValueError, match=r"^output must be 'log1p_norm' or 'X', got 'raw'\.$"):
        tl.predict_response(model, cells, "G00", output="raw")
    no_controls = cells[cells.obs["perturbation"] != "control"].copy()
    with pytest.raises(ValueError, match=r"^adata has no control cells \('perturbation' == "
                                         r"'control'\) to anchor predictions\.$"):
        tl.predict_response(model, no_controls, "G00")
    unlabelled = cells.copy()
    del unlabelled.obs["perturbation"]
    with pytest.raises(KeyError, match=r"adata.obs has no 'perturbation', the perturbation column"):
        tl.predict_response(model, unlabelled, "G00")
    with pytest.raises(ValueError, match=r"^adata is empty \(0 cells x 60 genes\)\.$"):
        tl.predict_response(model, cells[:0].copy(), "G00")
    assert _snapshot(cells)["layers"] == before["layers"]


def _tiny_log_cells() -> ad.AnnData:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)
    means = {"control": 0 * a, "A": a, "B": b, "A+B": 2 * a + 0.5 * b}
    X = np.vstack([np.tile(m, (3, 1)) for m in means.values()]) + 5
    cells = ad.AnnData(X, obs=pd.DataFrame({"perturbation": np.repeat(list(means), 3)},
                                           index=[f"c{i}" for i in range(12)]))
    cells.var_names = [f"g{i}" for i in range(12)]
    return cells


def test_perturbation_effects_by_hand():
    cells = ad.AnnData(np.array([[1.0, 2], [3, 2], [4, 6], [5, 6], [0, 1]]),
                       obs=pd.DataFrame({"perturbation": ["control", "control", "A", "A", "B"]},
                                        index=list("abcde")))
    cells.var_names = ["x", "y"]
    before = _snapshot(cells)
    assert tl.perturbation_effects(cells) is None
    _assert_wrote_only(before, cells, uns={"perturbation_effects"})
    stored = cells.uns["perturbation_effects"]
    # control mean (2, 2); A mean (4.5, 6); B (0, 1)
    assert stored["shifts"].loc["A"].tolist() == [2.5, 4.0]
    assert stored["shifts"].loc["B"].tolist() == [-2.0, -1.0]
    assert stored["control_means"].to_numpy().tolist() == [[2.0, 2.0]]
    assert stored["params"]["perturbation_key"] == "perturbation"


def test_perturbation_effects_per_context_and_errors():
    cells = ad.AnnData(np.array([[1.0], [3.0], [10.0], [14.0]]), obs=pd.DataFrame(
        {"perturbation": ["control", "A", "control", "A"], "line": ["L1", "L1", "L2", "L2"]},
        index=list("abcd")))
    result = tl.perturbation_effects(cells, context_key="line", key_added="fx", copy=True)
    assert "fx" not in cells.uns
    assert result.uns["fx"]["shifts"].loc[["A|L1", "A|L2"], "0"].tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match=r"^key_added must be a non-empty string, got ''\.$"):
        tl.perturbation_effects(cells, key_added="")
    with pytest.raises(TypeError, match=r"^adata must be an AnnData, got DataFrame\.$"):
        tl.perturbation_effects(cells.obs)
    barred = cells.copy()
    barred.obs["line"] = ["L1|x", "L1|x", "L2", "L2"]  # "A|L1|x" could not be read back
    with pytest.raises(ValueError, match=r"^labels \['L1\|x'\] contain '\|', which separates perturbation and context"):
        tl.perturbation_effects(barred, context_key="line")
    assert "perturbation_effects" not in barred.uns
    counts = cells.copy()
    counts.layers["counts"] = counts.X * 20  # integers up to 280: raw counts, not log1p
    with pytest.raises(ValueError, match=re.escape(
            "adata.layers['counts'] looks like raw counts (integers up to 280), but tl.perturbation_effects "
            "averages log1p-normalised expression; pass log1p-normalised expression")):
        tl.perturbation_effects(counts, layer="counts")
    assert "perturbation_effects" not in counts.uns


def test_call_interactions_stores_the_table():
    cells = _tiny_log_cells()
    before = _snapshot(cells)
    assert tl.call_interactions(cells) is None
    _assert_wrote_only(before, cells, uns={"genetic_interactions"})
    stored = cells.uns["genetic_interactions"]
    expected = tl.genetic_interactions(cells)
    pd.testing.assert_frame_equal(stored["table"], expected)
    assert stored["table"]["coef_first"].round(6).tolist() == [2.0]
    assert stored["params"]["method"] == "ols"
    assert stored["params"]["thresholds"]["fit_threshold"] == 0.6
    copied = tl.call_interactions(cells, key_added="gi", copy=True, fit_threshold=0.99)
    assert "gi" not in cells.uns
    assert copied.uns["gi"]["params"]["thresholds"]["fit_threshold"] == 0.99
    assert copied.uns["gi"]["params"]["exclude_targets"] is True
    # the plot reads the stored entry, with the thresholds the calls were made with
    import matplotlib

    matplotlib.use("Agg")
    from perturbscope import pl

    axes = pl.genetic_interactions(copied.uns["gi"], show=False)
    neomorphic = [line for line in axes[1].get_lines() if tuple(line.get_xdata()) == (0.99, 0.99)]
    assert neomorphic, "the dcor threshold line is drawn at the stored 0.99, not the default 0.6"


def test_call_interactions_survives_h5ad(tmp_path):
    cells = _tiny_log_cells()
    tl.call_interactions(cells)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert back.uns["genetic_interactions"]["table"]["call"].tolist() == ["epistasis"]


def test_decoder_gene_scores_writes_two_var_columns(tiny_scvi):
    model, adata = tiny_scvi
    cells = ad.AnnData(adata.X.copy(), obs=adata.obs.copy(), var=adata.var.copy())
    cells.obs = cells.obs[["batch", "state"]]
    before = _snapshot(cells)
    kwargs = {"n_cells": 60, "seed": 1, "progress_bar": False}
    assert tl.decoder_gene_scores(model, cells, "state", "control", "stimulated", **kwargs) is None
    _assert_wrote_only(before, cells, var={"probe_alignment", "probe_alignment_baseline"})
    table = axis_alignment_scores(model, cells.copy(), "state", "control", "stimulated", **kwargs)
    np.testing.assert_allclose(cells.var["probe_alignment"],
                               table.loc[cells.var_names, "probe_alignment"], rtol=1e-6)
    np.testing.assert_allclose(cells.var["probe_alignment_baseline"],
                               table.loc[cells.var_names, "mean_expression_baseline"], rtol=1e-6)
    # the response block (genes 0-9) is up in the stimulated state
    assert cells.var["probe_alignment"].iloc[:10].mean() > cells.var["probe_alignment"].iloc[10:].mean()
    copied = tl.decoder_gene_scores(model, cells, "state", "control", "stimulated",
                                    key_added="probe_ifn", copy=True, **kwargs)
    assert "probe_ifn" not in cells.var
    assert {"probe_ifn", "probe_ifn_baseline"} <= set(copied.var)


def test_the_package_logger_follows_scvi_verbosity(caplog):
    import logging

    import scvi

    from perturbscope._logging import logger, quiet_lightning

    cells = ad.AnnData(np.array([[1.0], [3.0]]), obs=pd.DataFrame(
        {"perturbation": ["control", "A"]}, index=["a", "b"]))
    saved = scvi.settings.verbosity
    try:
        scvi.settings.verbosity = logging.INFO
        with caplog.at_level(logging.NOTSET):
            tl.perturbation_effects(cells)
        assert [r.getMessage() for r in caplog.records if r.name == "perturbscope"] == [
            "added uns['perturbation_effects'] (1 perturbation shifts x 1 genes)"]
        caplog.clear()
        scvi.settings.verbosity = logging.WARNING
        assert logger.getEffectiveLevel() == logging.WARNING
        tl.perturbation_effects(cells)
        assert [r for r in caplog.records if r.name == "perturbscope"] == []
    finally:
        scvi.settings.verbosity = saved
    lightning = logging.getLogger("lightning.pytorch")
    level = lightning.level
    seen = []

    def fail_inside():
        with quiet_lightning():
            seen.append(lightning.level)
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="^inside$"):
        fail_inside()
    assert seen == [logging.WARNING]
    assert lightning.level == level
