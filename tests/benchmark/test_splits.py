import numpy as np
import pytest

from perturbscope.benchmark import combo_split, unseen_context_split, unseen_single_split
from perturbscope.data import parse_perturbation


def _genes(labels):
    return {g for p in labels for g in parse_perturbation(p)}


def test_unseen_single_folds_cover_every_single_once_and_never_leak(small_screen):
    adata, _ = small_screen
    labels = adata.obs["perturbation"].astype(str)
    held = []
    for fold in range(3):
        split = unseen_single_split(adata, "perturbation", n_folds=3, fold=fold, seed=1)
        train_labels = set(labels[split.train])
        test_genes = _genes(split.perturbations)
        # no training cell saw a held-out gene, alone or in a combination
        assert not (_genes(train_labels) & test_genes)
        assert set(labels[split.test]) == set(split.perturbations)
        assert set(split.control) <= set(split.train)
        assert set(labels[split.control]) == {"control"}
        assert not set(split.test) & set(split.train)
        held += split.perturbations
    singles = sorted(p for p in labels.unique() if p != "control" and "+" not in p)
    assert sorted(held) == singles


def test_unseen_single_is_seeded(small_screen):
    adata, _ = small_screen
    a = unseen_single_split(adata, "perturbation", seed=3)
    b = unseen_single_split(adata, "perturbation", seed=3)
    c = unseen_single_split(adata, "perturbation", seed=4)
    assert a.perturbations == b.perturbations
    assert np.array_equal(a.train, b.train)
    assert a.perturbations != c.perturbations


def test_unseen_single_errors(small_screen):
    adata, _ = small_screen
    with pytest.raises(ValueError, match="fold=3 is out of range for n_folds=3"):
        unseen_single_split(adata, "perturbation", n_folds=3, fold=3)
    with pytest.raises(ValueError, match="n_folds=50 exceeds the 12 single-gene"):
        unseen_single_split(adata, "perturbation", n_folds=50)
    with pytest.raises(KeyError, match="perturbation_key 'guide' not in adata.obs"):
        unseen_single_split(adata, "guide")
    with pytest.raises(ValueError, match="control_value 'ctrl' not found"):
        unseen_single_split(adata, "perturbation", control_value="ctrl")


def test_combo_split_labels_by_seen_singles_and_does_not_leak(small_screen):
    adata, _ = small_screen
    labels = adata.obs["perturbation"].astype(str)
    combos = sorted(p for p in labels.unique() if "+" in p)
    a, b = parse_perturbation(combos[0])
    c = parse_perturbation(combos[1])[0]
    # drop the singles of a and b (combo 0 becomes seen0) and of c (combo 1 seen1 or seen0)
    keep = ~labels.isin([a, b, c]).to_numpy()
    split = combo_split(adata[keep], "perturbation")
    assert split.labels[combos[0]] == "seen0"
    assert split.labels[combos[1]] in {"seen0", "seen1"}
    train_labels = set(labels[split.train])
    assert not train_labels & set(split.perturbations)
    assert set(labels[split.test]) == set(split.perturbations) == set(combos)
    full = combo_split(adata, "perturbation")
    assert set(full.labels) == {"seen2"}


def test_combo_split_fraction_is_seeded(small_screen):
    adata, _ = small_screen
    a = combo_split(adata, "perturbation", test_fraction=0.5, seed=0)
    assert len(a.perturbations) == 3
    labels = adata.obs["perturbation"].astype(str)
    train_combos = {p for p in labels[a.train] if "+" in p}
    assert len(train_combos) == 3
    assert not train_combos & set(a.perturbations)
    assert (
        a.perturbations
        == combo_split(adata, "perturbation", test_fraction=0.5, seed=0).perturbations
    )
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\], got 0"):
        combo_split(adata, "perturbation", test_fraction=0)
    singles = adata[~labels.str.contains(r"\+").to_numpy()]
    with pytest.raises(ValueError, match="has no combinations"):
        combo_split(singles, "perturbation")


def test_unseen_context_zero_shot_sees_only_controls_of_the_context(small_screen):
    adata, _ = small_screen
    split = unseen_context_split(adata, "perturbation", "cell_type", "type_1")
    obs = adata.obs
    train = obs.loc[split.train]
    in_context = train[train["cell_type"] == "type_1"]
    assert set(in_context["perturbation"].astype(str)) == {"control"}
    assert (
        len(in_context)
        == ((obs["cell_type"] == "type_1") & (obs["perturbation"] == "control")).sum()
    )
    test = obs.loc[split.test]
    assert set(test["cell_type"]) == {"type_1"}
    assert "control" not in set(test["perturbation"])
    assert set(obs.loc[split.control, "cell_type"]) == {"type_1"}
    assert set(split.labels) == {"zero-shot"}
    assert split.context == "type_1"


def test_unseen_context_few_shot_sees_exactly_k_cells(small_screen):
    adata, _ = small_screen
    split = unseen_context_split(adata, "perturbation", "cell_type", "type_0", k=3, seed=2)
    obs = adata.obs
    train = obs.loc[split.train]
    shots = train[(train["cell_type"] == "type_0") & (train["perturbation"] != "control")]
    counts = shots["perturbation"].astype(str).value_counts()
    assert set(counts) == {3}
    assert set(counts.index) == set(split.perturbations)
    assert not set(split.test) & set(split.train)
    test_counts = obs.loc[split.test, "perturbation"].astype(str).value_counts()
    assert set(test_counts) == {17}  # 20 cells per condition minus 3 shots
    again = unseen_context_split(adata, "perturbation", "cell_type", "type_0", k=3, seed=2)
    assert np.array_equal(split.train, again.train)


def test_unseen_context_errors(small_screen):
    adata, _ = small_screen
    with pytest.raises(ValueError, match=r"k=20 shot cells leave no test cells.*use k below 20"):
        unseen_context_split(adata, "perturbation", "cell_type", "type_0", k=20)
    with pytest.raises(
        ValueError, match="context 'type_9' not found in adata.obs\\['cell_type'\\]"
    ):
        unseen_context_split(adata, "perturbation", "cell_type", "type_9")
    with pytest.raises(KeyError, match="context_key 'line' not in adata.obs"):
        unseen_context_split(adata, "perturbation", "line", "type_0")
    with pytest.raises(ValueError, match="k must be >= 0"):
        unseen_context_split(adata, "perturbation", "cell_type", "type_0", k=-1)


def test_integer_labels_and_an_integer_control_value():
    import anndata as ad
    import pandas as pd

    from perturbscope.benchmark import unseen_single_split

    labels = [0] * 6 + [1] * 3 + [2] * 3 + [3] * 3
    adata = ad.AnnData(np.ones((15, 5)), obs=pd.DataFrame({"p": labels}, index=[f"c{i}" for i in range(15)]))
    # the check compared 0 with the labels' strings and refused a control that is there
    split = unseen_single_split(adata, "p", control_value=0, n_folds=3)
    assert set(adata.obs.loc[split.control, "p"]) == {0}
    assert 0 not in set(adata.obs.loc[split.test, "p"])


def test_splits_refuse_missing_labels_and_duplicated_cell_names(small_screen):
    """A missing label became a held-out "unseen single" named "nan"; duplicated names broke adata[split.test]."""
    adata, _ = small_screen
    missing = adata.copy()
    missing.obs["perturbation"] = missing.obs["perturbation"].astype(object)
    missing.obs.iloc[-2:, missing.obs.columns.get_loc("perturbation")] = np.nan
    message = (r"^adata.obs\['perturbation'\] \(perturbation_key\) has 2 missing labels "
               rf"\(first cells: \['{missing.obs_names[-2]}', '{missing.obs_names[-1]}'\]\); label every cell.$")
    for split in (lambda a: unseen_single_split(a, "perturbation"), lambda a: combo_split(a, "perturbation"),
                  lambda a: unseen_context_split(a, "perturbation", "cell_type", "type_0")):
        with pytest.raises(ValueError, match=message):
            split(missing)
    no_context = adata.copy()
    no_context.obs["cell_type"] = no_context.obs["cell_type"].astype(object)
    no_context.obs.iloc[0, no_context.obs.columns.get_loc("cell_type")] = None
    with pytest.raises(ValueError, match=r"^adata.obs\['cell_type'\] \(context_key\) has 1 missing labels"):
        unseen_context_split(no_context, "perturbation", "cell_type", "type_0")
    lanes = adata.copy()
    lanes.obs_names = [f"bc{i % (lanes.n_obs // 2)}" for i in range(lanes.n_obs)]  # two lanes, same barcodes
    with pytest.raises(ValueError, match=r"^adata.obs_names has duplicates \['bc0', "):
        unseen_single_split(lanes, "perturbation")
    symbols = adata.copy()  # duplicated gene symbols are common in raw data; a split does not read genes
    symbols.var_names = [symbols.var_names[0], *symbols.var_names[:-1]]
    assert unseen_single_split(symbols, "perturbation").perturbations
