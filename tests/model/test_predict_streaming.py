"""Streaming prediction: chunked running means, per-cell stores on disk, same numbers as in memory."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import perturbscope as ps
from perturbscope.data import (
    PredictionMeans,
    PredictionStore,
    aggregate_prediction,
    prediction_anndata,
)


def _controls(adata, n=40):
    """``n`` control cells of both cell types (few, to keep the tests fast)."""
    cells = np.flatnonzero((adata.obs["perturbation"] == "control").to_numpy())
    return adata[np.sort(np.random.default_rng(0).choice(cells, n, replace=False))].copy()


def _model(small_screen, **kwargs):
    scvi.settings.seed = 0
    adata, embeddings = small_screen
    adata = adata.copy()
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=32, **kwargs)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model, adata


@pytest.fixture(scope="module")
def prior_model(small_screen):
    """ScopeVI with the effect prior; every kind keeps the VAE's cell term, so the draws matter."""
    model, adata = _model(small_screen)
    model.cell_term_weights_ = dict.fromkeys(model.cell_term_weights_, 1.0)
    model.correction_weights_ = dict.fromkeys(model.correction_weights_, 0.5)
    return model, adata


@pytest.fixture(scope="module")
def vae_model(small_screen):
    return _model(small_screen, effect_prior=False)


PERTURBATIONS = ["G00", "G03", "G00+G03"]


# ---------------------------------------------------------------- the data-layer pieces
def test_prediction_means_equal_aggregate_prediction_in_any_chunking():
    rng = np.random.default_rng(0)
    n_cells, n_samples, n_genes = 11, 2, 4
    obs = pd.DataFrame({"cell_type": rng.choice(["b", "a", "c"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    X = rng.gamma(2.0, size=(2, n_samples, n_cells, n_genes))
    log1p_norm = np.log1p(X)
    cells = prediction_anndata(["P", "O"], obs, X.reshape(-1, n_genes), log1p_norm.reshape(-1, n_genes),
                               pd.Index(list("wxyz")), n_samples, {"model": "m"})
    expected = aggregate_prediction(cells, "cell_type")
    sums = PredictionMeans(["P", "O"], obs["cell_type"].to_numpy(), "cell_type", n_samples, n_genes)
    for start, stop in [(0, 3), (3, 4), (4, 11)]:
        for p in (1, 0):
            sums.add(p, slice(start, stop), X[p, :, start:stop], log1p_norm[p, :, start:stop])
    mean = sums.to_anndata(pd.Index(list("wxyz")), {"model": "m"})
    assert mean.obs_names.tolist() == ["P|a", "P|b", "P|c", "O|a", "O|b", "O|c"] == expected.obs_names.tolist()
    pd.testing.assert_frame_equal(mean.obs, expected.obs)
    np.testing.assert_allclose(mean.X, expected.X, rtol=1e-6)
    np.testing.assert_allclose(mean.layers["log1p_norm"], expected.layers["log1p_norm"], rtol=1e-6)
    # hand-computed: the mean of P's cells of type "a" over both samples
    a = (obs["cell_type"] == "a").to_numpy()
    np.testing.assert_allclose(mean.X[0], X[0][:, a].mean(axis=(0, 1)), rtol=1e-6)
    assert mean.obs["n_cells"].tolist()[:3] == [n_samples * a.sum(), *(n_samples * (obs["cell_type"] == t).sum()
                                                                      for t in ("b", "c"))]
    assert mean.uns["perturbscope"] == {"model": "m"}


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_prediction_store_round_trips(tmp_path, suffix):
    rng = np.random.default_rng(1)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["t", "u", "t"])}, index=["c0", "c1", "c2"])
    X = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
    expected = prediction_anndata(["A", "B"], obs, X.reshape(-1, 5), 2 * X.reshape(-1, 5), pd.Index(list("vwxyz")),
                                  n_samples=2, provenance={"model": "m", "table": pd.DataFrame({"v": [1.0]})})
    path = tmp_path / f"pred{suffix}"
    with PredictionStore(path, ["A", "B"], obs, pd.Index(list("vwxyz")), 2, expected.uns["perturbscope"],
                         rows_per_chunk=2) as store:
        for start, stop in [(1, 3), (0, 1)]:  # out of order: rows land where the layout puts them
            for p in (1, 0):
                store.write(p, slice(start, stop), X[p, :, start:stop], 2 * X[p, :, start:stop])
    written = ad.read_h5ad(path) if suffix == ".h5ad" else ad.read_zarr(path)
    pd.testing.assert_frame_equal(written.obs, expected.obs)
    np.testing.assert_array_equal(written.X, expected.X)
    np.testing.assert_array_equal(written.layers["log1p_norm"], expected.layers["log1p_norm"])
    assert written.var_names.tolist() == list("vwxyz")
    pd.testing.assert_frame_equal(written.uns["perturbscope"]["table"], expected.uns["perturbscope"]["table"])


# ---------------------------------------------------------------- ScopeVI.predict streams
@pytest.mark.parametrize("fixture", ["prior_model", "vae_model"])
def test_chunked_prediction_equals_one_chunk(fixture, request):
    model, adata = request.getfixturevalue(fixture)
    controls = _controls(adata)
    for aggregate in (None, "mean"):
        one = model.predict(controls, PERTURBATIONS, aggregate=aggregate, use_prior_mean=True,
                            batch_size=controls.n_obs)
        chunked = model.predict(controls, PERTURBATIONS, aggregate=aggregate, use_prior_mean=True, batch_size=7)
        pd.testing.assert_frame_equal(chunked.obs, one.obs)
        assert list(chunked.layers) == list(one.layers)
        np.testing.assert_allclose(chunked.X, one.X, rtol=1e-5, atol=1e-6)
        for layer in one.layers:
            np.testing.assert_allclose(chunked.layers[layer], one.layers[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["prior_model", "vae_model"])
def test_mean_prediction_is_the_mean_of_the_predicted_cells(fixture, request):
    model, adata = request.getfixturevalue(fixture)
    controls = _controls(adata)
    cells = model.predict(controls, PERTURBATIONS, n_samples=2, seed=5, batch_size=9)
    mean = model.predict(controls, PERTURBATIONS, n_samples=2, seed=5, batch_size=9, aggregate="mean")
    expected = aggregate_prediction(cells, "cell_type")
    pd.testing.assert_frame_equal(mean.obs, expected.obs)
    np.testing.assert_allclose(mean.X, expected.X, rtol=1e-5)
    np.testing.assert_allclose(mean.layers["log1p_norm"], expected.layers["log1p_norm"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(cells.X, model.predict(controls, PERTURBATIONS, n_samples=2, seed=6, batch_size=9).X)
    if fixture == "prior_model":
        pd.testing.assert_frame_equal(mean.uns["perturbscope"]["mean_correction"],
                                      cells.uns["perturbscope"]["mean_correction"])
        model.add_prediction_intervals(expected, (0.8, 0.95))
        assert sorted(mean.layers) == sorted(expected.layers) == [
            "log1p_norm", "log1p_norm_lower_80", "log1p_norm_lower_95", "log1p_norm_upper_80", "log1p_norm_upper_95"
        ]
        for layer in expected.layers:
            np.testing.assert_allclose(mean.layers[layer], expected.layers[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_out_store_holds_the_in_memory_prediction(prior_model, tmp_path, suffix):
    model, adata = prior_model
    controls = _controls(adata)
    cells = model.predict(controls, PERTURBATIONS, n_samples=2, seed=3, batch_size=8)
    path = model.predict(controls, PERTURBATIONS, n_samples=2, seed=3, batch_size=8, out=tmp_path / f"c{suffix}")
    assert path == tmp_path / f"c{suffix}"
    written = ad.read_h5ad(path) if suffix == ".h5ad" else ad.read_zarr(path)
    pd.testing.assert_frame_equal(written.obs, cells.obs)
    np.testing.assert_array_equal(written.X, cells.X)
    np.testing.assert_array_equal(written.layers["log1p_norm"], cells.layers["log1p_norm"])
    # h5ad and zarr keep a DataFrame's values and labels, not the name of its columns index
    pd.testing.assert_frame_equal(written.uns["perturbscope"]["mean_correction"],
                                  cells.uns["perturbscope"]["mean_correction"], check_names=False)
    # with aggregate="mean" the cells still go to out and the mean comes back
    mean = model.predict(controls, PERTURBATIONS, n_samples=2, seed=3, batch_size=8, aggregate="mean",
                         out=tmp_path / f"m{suffix}")
    assert mean.n_obs == 6
    assert set(mean.obs["cell_type"]) == {"type_0", "type_1"}
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "m.h5ad").X if suffix == ".h5ad"
                                  else ad.read_zarr(tmp_path / "m.zarr").X, cells.X)


def test_predict_bad_streaming_inputs(vae_model, tmp_path):
    model, adata = vae_model
    controls = _controls(adata)
    with pytest.raises(ValueError, match=r"^out='.*pred\.csv' must end in '\.h5ad' or '\.zarr' \(the anndata formats"):
        model.predict(controls, ["G00"], out=tmp_path / "pred.csv")
    (tmp_path / "taken.h5ad").write_text("")
    with pytest.raises(ValueError, match=r"^out='.*taken\.h5ad' exists; predictions are never written over a file"):
        model.predict(controls, ["G00"], out=tmp_path / "taken.h5ad")
    with pytest.raises(ValueError, match=r"^out='.*missing/p\.zarr': the folder '.*missing' does not exist\.$"):
        model.predict(controls, ["G00"], out=tmp_path / "missing" / "p.zarr")
    with pytest.raises(ValueError, match=r"^adata_control has no cells; pass at least one control cell"):
        model.predict(controls[:0], ["G00"], aggregate="mean")
    with pytest.raises(ValueError, match=r"^perturbations is empty; pass at least one perturbation label\.$"):
        model.predict(controls, [], out=tmp_path / "p.h5ad")
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer or None, got 0\.$"):
        model.predict(controls, ["G00"], batch_size=0, out=tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


def test_context_column_required_with_the_effect_prior(prior_model):
    model, adata = prior_model
    controls = _controls(adata)
    del controls.obs["cell_type"]
    with pytest.raises(KeyError, match=r"adata_control.obs has no column 'cell_type', the context the model"):
        model.predict(controls, ["G00"], aggregate="mean")


def test_failed_prediction_leaves_no_store(vae_model, tmp_path, monkeypatch):
    model, adata = vae_model
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("decoder failed")
        return original(*args, **kwargs)

    original = model.module.predict_from_anchor
    monkeypatch.setattr(model.module, "predict_from_anchor", failing)
    with pytest.raises(RuntimeError, match="^decoder failed$"):
        model.predict(_controls(adata), ["G00", "G03"], out=tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


def test_a_store_that_fails_while_being_created_leaves_nothing_behind(tmp_path):
    # an object column holding a number and a string: h5py cannot write it
    obs = pd.DataFrame({"cell_type": pd.Series(["t", 3], dtype=object)}, index=["c0", "c1"])
    path = tmp_path / "pred.h5ad"
    with pytest.raises(TypeError, match="Can't implicitly convert non-string objects to strings"):
        PredictionStore(path, ["A"], obs, pd.Index(list("xy")))
    assert not path.exists()  # a retry is not blocked by a half-made file


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_an_error_inside_the_with_block_discards_the_store(tmp_path, suffix):
    path = tmp_path / f"pred{suffix}"
    with pytest.raises(RuntimeError, match="^stop$"), PredictionStore(path, ["A"], pd.DataFrame(index=["c0"]),
                                                                      pd.Index(list("xy"))):
        raise RuntimeError("stop")
    assert not path.exists()
