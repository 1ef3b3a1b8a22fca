from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from perturbscope.embeddings import (
    check_gene_embeddings,
    read_gene_embeddings,
    write_gene_embeddings,
)


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(  # "NA" and "0123" are read by pandas as missing and as a number unless told not to
        rng.normal(size=(6, 3)), index=["KLF1", "SET", "MIDN", "HK2", "NA", "0123"], columns=["d0", "d1", "d2"]
    )
    df.attrs = {"source": "test", "model": "none", "layer": 1}
    return df


@pytest.mark.parametrize(
    "name", ["e.csv", "e.tsv", "e.tsv.gz", "e.txt", "e.parquet", "e.npz", "e.pt", "E.NPZ", "E.CSV"]
)
def test_round_trip(table, tmp_path, name):
    path = tmp_path / name
    write_gene_embeddings(table, path)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # written where asked ("E.NPZ" became "E.NPZ.npz")
    back = read_gene_embeddings(path)
    assert list(back.index) == list(table.index)
    np.testing.assert_array_equal(back.to_numpy(), table.to_numpy())
    if name.lower() != "e.pt":  # the DeSCOPE dict has no column names
        assert list(back.columns) == list(table.columns)
    else:
        assert list(back.columns) == ["dim_0", "dim_1", "dim_2"]
    assert back.attrs["path"] == str(path)
    if name.lower() in ("e.parquet", "e.npz"):
        assert {k: back.attrs[k] for k in table.attrs} == table.attrs


def test_pt_is_descope_dict(table, tmp_path):
    path = tmp_path / "e.pt"
    write_gene_embeddings(table, path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(table.index)
    assert raw["SET"].shape == (3,)
    # A file written by DeSCOPE-style code: float32 tensors.
    torch.save({"A": torch.tensor([1.0, 2.0]), "B": torch.tensor([3.0, 4.5])}, tmp_path / "d.pt")
    assert read_gene_embeddings(tmp_path / "d.pt").to_numpy().tolist() == [[1.0, 2.0], [3.0, 4.5]]


class Arbitrary:
    pass


def test_pt_errors(tmp_path):
    torch.save({"A": torch.zeros(3), "B": torch.zeros(3), "C": torch.zeros(2)}, tmp_path / "r.pt")
    with pytest.raises(
        ValueError,
        match=r"ragged embeddings: most genes have 3 dimensions but 1 differ: \{'C': 2\}",
    ):
        read_gene_embeddings(tmp_path / "r.pt")
    torch.save({"A": torch.zeros(1, 3)}, tmp_path / "m.pt")
    with pytest.raises(
        ValueError, match=r"genes \['A'\] do not hold 1-D tensors \(shapes \{'A': \(1, 3\)\}\)"
    ):
        read_gene_embeddings(tmp_path / "m.pt")
    torch.save([torch.zeros(3)], tmp_path / "l.pt")
    with pytest.raises(ValueError, match="holds a list; expected a dict"):
        read_gene_embeddings(tmp_path / "l.pt")
    torch.save({"A": Arbitrary()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="Could not read .* as a torch file holding"):
        read_gene_embeddings(tmp_path / "code.pt")
    torch.save({"A": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"NaN or infinite values for genes \['A'\]"):
        read_gene_embeddings(tmp_path / "nan.pt")


def test_text_and_npz_errors(tmp_path):
    (tmp_path / "dup.csv").write_text("gene,d0\nA,1\nB,2\nA,3\n")
    with pytest.raises(ValueError, match=r"duplicated genes \['A'\]; each gene must appear once"):
        read_gene_embeddings(tmp_path / "dup.csv")
    (tmp_path / "str.tsv").write_text("gene\td0\tnote\nA\t1\tx\n")
    with pytest.raises(TypeError, match=r"non-numeric columns \['note'\]"):
        read_gene_embeddings(tmp_path / "str.tsv")
    (tmp_path / "inf.csv").write_text("gene,d0\nA,1\nB,inf\n")
    with pytest.raises(ValueError, match=r"NaN or infinite values for genes \['B'\]"):
        read_gene_embeddings(tmp_path / "inf.csv")
    np.savez(tmp_path / "x.npz", values=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"lacks arrays \['embeddings', 'genes'\]"):
        read_gene_embeddings(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", genes=np.array(["A"]), embeddings=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) but there are 1 genes"):
        read_gene_embeddings(tmp_path / "y.npz")
    with pytest.raises(ValueError, match="Cannot tell the format of .*e.h5"):
        read_gene_embeddings(tmp_path / "e.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gene_embeddings(tmp_path / "absent.csv")


def test_write_checks_the_table(table, tmp_path):
    bad = table.copy()
    bad.iloc[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values for genes \['SET'\]"):
        write_gene_embeddings(bad, tmp_path / "e.csv")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        write_gene_embeddings(table, tmp_path / "e.xlsx")


def test_check_gene_embeddings():
    with pytest.raises(TypeError, match="must be a pandas DataFrame"):
        check_gene_embeddings(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"is empty: shape \(0, 2\)"):
        check_gene_embeddings(pd.DataFrame(columns=["a", "b"]))
    out = check_gene_embeddings(pd.DataFrame({0: [1, 2]}, index=["A", "B"]))
    assert out.dtypes.tolist() == [np.float64]
    assert list(out.columns) == ["0"]


def test_crafted_files_are_refused_with_value_errors(tmp_path):
    """An expanded (stride-0) tensor of a 2 KB file asked for gigabytes when stacked; malformed
    .npz arrays raised TypeErrors."""
    base = torch.zeros(1)
    torch.save({f"G{i}": base.expand(2**27) for i in range(4)}, tmp_path / "expand.pt")
    with pytest.raises(ValueError, match=r"the file holds a tensor of 134217728 elements over 1 stored ones \(an "
                                         r"expanded view\); model files store every element"):
        read_gene_embeddings(tmp_path / "expand.pt")
    np.savez(tmp_path / "zero_d.npz", genes=np.array("A"), embeddings=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="'genes' and 'columns' must be 1-D arrays of names"):
        read_gene_embeddings(tmp_path / "zero_d.npz")
    np.savez(tmp_path / "attrs.npz", genes=np.array(["A"]), embeddings=np.zeros((1, 2)), attrs=np.array("[1, 2]"))
    with pytest.raises(ValueError, match="'attrs' must be a JSON object, got list"):
        read_gene_embeddings(tmp_path / "attrs.npz")
    rows = torch.randn(3, 4)  # slices of one stored tensor are fine
    torch.save({f"G{i}": rows[i] for i in range(3)}, tmp_path / "slices.pt")
    assert read_gene_embeddings(tmp_path / "slices.pt").shape == (3, 4)
