import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.benchmark import (
    AdditiveBaseline,
    EmbeddingNeighborsBaseline,
    LinearBaseline,
    MatchingMeanBaseline,
    NoChangeBaseline,
    PerturbedMeanBaseline,
)
from perturbscope.data import log1p_expression, pseudobulk
from perturbscope.effects import EffectPrior


def _toy():
    """Log-scale toy screen with exact group means: control 1, A +1 on g0, B +2 on g1."""
    genes = ["g0", "g1", "g2"]
    rows, labels, contexts = [], [], []
    for context, offset in (("x", 0.0), ("y", 1.0)):
        for label, shift in (
            ("control", [0, 0, 0]),
            ("A", [1, 0, 0]),
            ("B", [0, 2, 0]),
            ("A+B", [1, 2, 5]),
        ):
            for noise in (-0.1, 0.1):
                rows.append(np.array([1.0, 1, 1]) + offset + shift + noise)
                labels.append(label)
                contexts.append(context)
    obs = pd.DataFrame({"p": labels, "ctx": contexts}, index=[f"c{i}" for i in range(len(rows))])
    return ad.AnnData(np.vstack(rows), obs=obs, var=pd.DataFrame(index=genes))


def _fit(model, adata, **kwargs):
    return model.fit(adata, "p", data_scale="log1p_norm", **kwargs)


def test_no_change_perturbed_mean_and_matching_mean():
    adata = _toy()
    train = adata[adata.obs["p"] != "A+B"]
    assert np.allclose(_fit(NoChangeBaseline(), train).predict_shifts(["A+B"]), 0)
    pm = _fit(PerturbedMeanBaseline(), train).predict_shifts(["A+B", "C"])
    assert np.allclose(pm.to_numpy(), [[0.5, 1, 0], [0.5, 1, 0]])
    mm = _fit(MatchingMeanBaseline(), train).predict_shifts(["A+B", "A", "C"])
    assert np.allclose(mm.to_numpy(), [[0.5, 1, 0], [1, 0, 0], [0.5, 1, 0]])


def test_additive_sums_single_shifts_and_ignores_unseen_genes():
    adata = _toy()
    train = adata[adata.obs["p"] != "A+B"]
    model = _fit(AdditiveBaseline(), train)
    assert np.allclose(
        model.predict_shifts(["A+B", "A+C", "C"]).to_numpy(), [[1, 2, 0], [1, 0, 0], [0, 0, 0]]
    )
    # a seen combination is predicted by its own shift
    full = _fit(AdditiveBaseline(), adata)
    assert np.allclose(full.predict_shifts(["A+B"]).to_numpy(), [[1, 2, 5]])


def test_context_transfer_uses_other_contexts_when_context_is_unseen():
    adata = _toy()
    held = (adata.obs["ctx"] == "y") & (adata.obs["p"] != "control")
    model = _fit(MatchingMeanBaseline(), adata[~held.to_numpy()], context_key="ctx")
    assert np.allclose(model.predict_shifts(["A"], context="y").to_numpy(), [[1, 0, 0]])
    pm = _fit(PerturbedMeanBaseline(), adata[~held.to_numpy()], context_key="ctx")
    assert np.allclose(pm.predict_shifts(["Z"], context="y").to_numpy(), [[2 / 3, 4 / 3, 5 / 3]])
    with pytest.raises(ValueError, match="fitted with context_key='ctx'; pass the context"):
        pm.predict_shifts(["A"])


def test_predict_layout_means_and_input_untouched():
    adata = _toy()
    train = adata[adata.obs["p"] != "A+B"].copy()
    before = train.copy()
    model = _fit(AdditiveBaseline(), train, context_key="ctx")
    control = adata[adata.obs["p"] == "control"]
    cells = model.predict(control, ["A+B", "A"])
    assert cells.shape == (8, 3)  # 4 control cells x 2 perturbations
    assert list(cells.obs.columns) == ["perturbation", "control_cell", "sample", "ctx"]
    assert cells.obs["control_cell"].iloc[0] == control.obs_names[0]
    assert np.allclose(cells.X, cells.layers["log1p_norm"])
    means = model.predict(control, ["A+B", "A"], aggregate="mean")
    assert means.obs["perturbation"].astype(str).tolist() == ["A+B", "A+B", "A", "A"]
    assert means.obs["n_cells"].tolist() == [2, 2, 2, 2]
    x_row = means[
        (means.obs["perturbation"] == "A+B").to_numpy() & (means.obs["ctx"] == "y").to_numpy()
    ]
    assert np.allclose(x_row.layers["log1p_norm"], [[3, 4, 2]])  # control y (2, 2, 2) + (1, 2, 0)
    assert means.uns["perturbscope"]["model"] == "additive"
    assert train.obs.equals(before.obs)
    assert np.array_equal(train.X, before.X)


def test_counts_scale_predicts_counts_at_the_control_library_size(small_screen):
    adata, _ = small_screen
    model = PerturbedMeanBaseline().fit(adata, "perturbation", context_key="cell_type")
    control = adata[adata.obs["perturbation"] == "control"][:5]
    cells = model.predict(control, ["G00"])
    log_control = log1p_expression(control)
    shift = model.predict_shifts(["G00"], context=control.obs["cell_type"].iloc[0]).to_numpy()
    assert np.allclose(cells.layers["log1p_norm"][0], log_control[0] + shift[0], atol=1e-5)
    library = float(control.X[0].sum())
    expected = np.clip(np.expm1(log_control[0] + shift[0]), 0, None) * library / 1e4
    assert np.allclose(cells.X[0], expected, rtol=1e-4)


def test_embedding_neighbours_hand_computed_weights():
    adata = _toy()
    adata = adata[(adata.obs["ctx"] == "x").to_numpy()]
    embeddings = pd.DataFrame({"d0": [1.0, 0.0, 1.0], "d1": [0.0, 1.0, 1.0]}, index=["A", "B", "C"])
    train = adata[adata.obs["p"].isin(["control", "A", "B"]).to_numpy()]
    model = _fit(EmbeddingNeighborsBaseline(embeddings, temperature=0.5), train)
    # C is equally similar to A and B (cosine 1/sqrt(2) each): weights 1/2, 1/2
    assert np.allclose(model.neighbor_weights("C").to_numpy(), [0.5, 0.5])
    assert np.allclose(model.predict_shifts(["C"]).to_numpy(), [[0.5, 1, 0]])
    tilted = embeddings.copy()
    tilted.loc["C"] = [1.0, 0.5]
    model = _fit(EmbeddingNeighborsBaseline(tilted, temperature=0.5), train)
    cos_a, cos_b = 1 / np.sqrt(1.25), 0.5 / np.sqrt(1.25)
    w_a = np.exp(cos_a / 0.5) / (np.exp(cos_a / 0.5) + np.exp(cos_b / 0.5))
    assert model.neighbor_weights("C")["A"] == pytest.approx(w_a)
    with pytest.warns(UserWarning, match="'D' has no gene embedding"):
        out = model.predict(train[train.obs["p"] == "control"], ["D"])
    assert out.uns["perturbscope"]["fallback_to_perturbed_mean"] == ["D"]
    with pytest.raises(ValueError, match="temperature must be positive"):
        EmbeddingNeighborsBaseline(embeddings, temperature=0)
    with pytest.raises(TypeError, match="gene_embeddings must be a pandas DataFrame"):
        EmbeddingNeighborsBaseline(embeddings.to_numpy())


def test_linear_closed_form_matches_hand_solution():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(8)]
    perts = ["A", "B", "C", "D"]
    shifts = rng.normal(0, 1, (4, 8))
    rows, labels = [], []
    for label, shift in zip(["control", *perts], [np.zeros(8), *shifts]):
        for noise in (-0.1, 0.1):
            rows.append(3 + shift + noise)
            labels.append(label)
    adata = ad.AnnData(
        np.vstack(rows),
        obs=pd.DataFrame({"p": labels}, index=[f"c{i}" for i in range(10)]),
        var=pd.DataFrame(index=genes),
    )
    embeddings = pd.DataFrame(rng.normal(0, 1, (5, 3)), index=[*perts, "E"])
    model = _fit(LinearBaseline(embeddings, n_components=3, ridge=0.1), adata)
    G = model.G_
    Y = shifts.T
    b = Y.mean(axis=1)
    P = embeddings.loc[perts].to_numpy()
    W = (
        np.linalg.inv(G.T @ G + 0.1 * np.eye(3))
        @ G.T
        @ (Y - b[:, None])
        @ P
        @ np.linalg.inv(P.T @ P + 0.1 * np.eye(3))
    )
    expected = G @ W @ embeddings.loc["E"].to_numpy() + b
    assert np.allclose(model.predict_shifts(["E"]).to_numpy()[0], expected)
    # G: PCA of the training pseudobulk, genes as observations
    from sklearn.decomposition import PCA

    pb = pseudobulk(ad.AnnData(adata.X, obs=adata.obs, var=adata.var), "p")
    assert np.allclose(np.abs(G), np.abs(PCA(n_components=3).fit_transform(pb.to_numpy().T)))
    with pytest.warns(UserWarning, match="'F' has no embedding row"):
        fallback = model.predict_shifts(["F"]).to_numpy()[0]
    assert np.allclose(fallback, b)


def test_linear_without_embeddings_uses_measured_genes():
    rng = np.random.default_rng(1)
    genes = ["A", "B", "C", "g3", "g4", "g5"]
    rows, labels = [], []
    for label in ["control", "A", "B", "C"]:
        shift = np.zeros(6)
        if label != "control":
            shift[genes.index(label)] = 2
        for _ in range(3):
            rows.append(2 + shift + rng.normal(0, 0.05, 6))
            labels.append(label)
    adata = ad.AnnData(
        np.vstack(rows),
        obs=pd.DataFrame({"p": labels}, index=[f"c{i}" for i in range(12)]),
        var=pd.DataFrame(index=genes),
    )
    model = _fit(LinearBaseline(n_components=3), adata[adata.obs["p"] != "C"])
    assert model.predict_shifts(["C"]).shape == (1, 6)
    with pytest.raises(ValueError, match="No training perturbation has an embedding row"):
        _fit(LinearBaseline(pd.DataFrame([[1.0]], index=["Z"])), adata)


def test_fit_and_predict_errors():
    adata = _toy()
    with pytest.raises(KeyError, match="context_key 'line' not in adata.obs"):
        _fit(NoChangeBaseline(), adata, context_key="line")
    with pytest.raises(ValueError, match="data_scale must be 'counts' or 'log1p_norm'"):
        NoChangeBaseline().fit(adata, "p", data_scale="log")
    negative = adata.copy()
    negative.X = np.asarray(negative.X, dtype=float)
    negative.X[0, 0] = -3.0  # log1p of a negative normalised count: NaN shifts
    with pytest.raises(ValueError, match=r"^adata\.X has negative values, but data_scale='counts' normalises counts "
                                         r"per cell; pass counts, or data_scale='log1p_norm'"):
        NoChangeBaseline().fit(negative, "p")
    with pytest.raises(ValueError, match=r"^adata\.X has negative values"):
        EffectPrior().fit(negative, "p")
    no_control_y = adata[~((adata.obs["ctx"] == "y") & (adata.obs["p"] == "control")).to_numpy()]
    with pytest.raises(
        ValueError, match=r"contexts \['y'\] in adata.obs\['ctx'\] have no 'control'"
    ):
        _fit(NoChangeBaseline(), no_control_y, context_key="ctx")
    with pytest.raises(RuntimeError, match="NoChangeBaseline is not fitted"):
        NoChangeBaseline().predict(adata, ["A"])
    model = _fit(NoChangeBaseline(), adata)
    with pytest.raises(ValueError, match=r"adata_control.var_names differ from the model's 3 genes \(1 missing, 0 extra"):
        model.predict(adata[:, :2], ["A"])
    with pytest.raises(ValueError, match="aggregate must be None or 'mean', got 'median'"):
        model.predict(adata, ["A"], aggregate="median")
    with pytest.raises(ValueError, match=r"^perturbations is empty; pass at least one perturbation label\.$"):
        model.predict(adata, [])
    with pytest.raises(ValueError, match=r"^perturbations holds labels more than once: \['A'\]; give each label once\.$"):
        model.predict(adata, ["A", "B", "A"])
    with pytest.raises(ValueError, match=r"^perturbations writes one perturbation in more than one way: "
                                         r"\[\['A', 'A\+control'\]\]; give each perturbation once\.$"):
        model.predict(adata, ["A", "A+control"])
    twins = adata.copy()
    twins.obs_names = [twins.obs_names[0]] * twins.n_obs
    with pytest.raises(ValueError, match=r"^adata_control\.obs_names has duplicates"):
        model.predict(twins, ["A"])
    assert model.predict(twins, ["A"], aggregate="mean").n_obs == 1
