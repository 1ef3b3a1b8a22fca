"""The split-half noise ceiling: DE genes from the truth half, figures by hand, no effect scores 0."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.benchmark import noise_ceiling, top_de_genes


def _screen(effect: float, seed: int = 0, n_genes: int = 200):
    rng = np.random.default_rng(seed)
    labels = [f"P{i}" for i in range(5) for _ in range(60)]
    shift = np.zeros((5, n_genes))
    shift[:, :10] = effect * rng.normal(size=(5, 10))
    values = rng.normal(1.0, 0.5, (300, n_genes)) + np.repeat(shift, 60, axis=0)
    observed = ad.AnnData(values, obs=pd.DataFrame({"p": labels}, index=[f"o{i}" for i in range(300)]))
    control = ad.AnnData(rng.normal(1.0, 0.5, (2000, n_genes)), obs=pd.DataFrame(index=[f"c{i}" for i in range(2000)]))
    return observed, control


def test_without_any_effect_the_ceiling_is_near_chance():
    # DE genes chosen from both halves were those where the halves drifted together: this null
    # screen scored a Pearson delta of 0.68 and a direction agreement of 0.97
    pearson, direction = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(3):
            observed, control = _screen(effect=0.0, seed=seed)
            table = noise_ceiling(observed, control, "p", seed=seed, distributional=False, n_pcs=2)
            pearson.append(table["pearson_delta_top_de"].mean())
            direction.append(table["direction_top_de"].mean())
    assert abs(np.mean(pearson)) < 0.15, pearson
    assert abs(np.mean(direction) - 0.5) < 0.1, direction
    # with real effects the ceiling is high
    observed, control = _screen(effect=1.0)
    assert noise_ceiling(observed, control, "p", distributional=False, n_pcs=2)["pearson_delta_top_de"].min() > 0.9


def test_ceiling_by_hand_on_the_truth_halfs_de_genes():
    observed, control = _screen(effect=0.3, seed=4, n_genes=60)
    table = noise_ceiling(observed, control, "p", seed=7, distributional=False, n_pcs=2, n_de=20)
    # the halving, as noise_ceiling documents it: half of each perturbation's cells, drawn in
    # order of the perturbations' cell counts with the seed's generator
    labels = observed.obs["p"].astype(str)
    rng = np.random.default_rng(7)
    first = np.zeros(observed.n_obs, dtype=bool)
    for p in labels.value_counts().index:
        where = np.flatnonzero((labels == p).to_numpy())
        first[rng.choice(where, len(where) // 2, replace=False)] = True
    half_a, half_b = observed[first], observed[~first]
    both = ad.AnnData(np.vstack([half_b.X, control.X]), obs=pd.DataFrame(
        {"p": [*half_b.obs["p"].astype(str), *["__control__"] * control.n_obs]},
        index=[*half_b.obs_names, *control.obs_names]), var=pd.DataFrame(index=observed.var_names))
    de = top_de_genes(both, "p", "__control__", n_genes=20)
    control_mean = control.X.mean(axis=0)
    genes = list(observed.var_names)
    for p in ["P0", "P3"]:
        columns = [genes.index(g) for g in de[p]]
        predicted = half_a[half_a.obs["p"] == p].X.mean(axis=0) - control_mean
        truth = half_b[half_b.obs["p"] == p].X.mean(axis=0) - control_mean
        expected = np.corrcoef(predicted[columns], truth[columns])[0, 1]
        assert table.loc[p, "pearson_delta_top_de"] == pytest.approx(expected, abs=1e-9), p


def test_reference_and_ceiling_refuse_missing_labels():
    """Missing labels were scored as a perturbation named "nan"."""
    from perturbscope.benchmark import prepare_reference

    rng = np.random.default_rng(0)
    labels = pd.Series(["a"] * 8 + ["b"] * 8 + [np.nan] * 8, dtype=object)
    observed = ad.AnnData(rng.random((24, 5)), obs=pd.DataFrame({"p": labels.to_numpy()},
                                                                 index=[f"c{i}" for i in range(24)]))
    control = ad.AnnData(rng.random((10, 5)))
    message = r"^adata.obs\['p'\] \(perturbation_key\) has 8 missing labels \(first cells: \['c16', "
    with pytest.raises(ValueError, match=message):
        noise_ceiling(observed, control, "p", n_de=3, n_pcs=2)
    with pytest.raises(ValueError, match=message):
        prepare_reference(observed, control, "p", n_de=3, n_pcs=2)
