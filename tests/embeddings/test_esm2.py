from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from perturbscope.embeddings import esm2_embeddings, read_protein_fasta

SEQUENCES = {
    "KLF1": "MATAETALPSISTLTALGPFPDTQDDFLKWWRSEEAQDMGPGPPDPTEPPLHVKSEDQPGEEEDDERGADATWDLDLLLTNFSG",
    "SET": "MSAPAAKVSKKELNSNHDGADETSEKEQQEAIEHIDEVQNEIDRLNEQASEEILKVEQKYNKLRQPFFQKRSELIAKIPNFWV",
    "MIDN": "MEQRGQ",
}


def direct_mean(model, sequence: str, layer: int = 2) -> np.ndarray:
    """Mean over residues (BOS/EOS dropped) of one unpadded forward pass."""
    _, _, tokens = model.alphabet.get_batch_converter()([("x", sequence)])
    with torch.no_grad():
        hidden = model(tokens, repr_layers=[layer])["representations"][layer][0]
    return hidden[1 : len(sequence) + 1].mean(0).double().numpy()


def test_local_checkpoint_equals_direct_forward(tiny_esm2):
    path, model = tiny_esm2
    emb = esm2_embeddings(SEQUENCES, model=path, progress_bar=False)
    assert list(emb.index) == list(SEQUENCES)
    assert list(emb.columns) == [f"esm2_{i}" for i in range(32)]
    for gene, sequence in SEQUENCES.items():
        np.testing.assert_allclose(
            emb.loc[gene].to_numpy(), direct_mean(model, sequence), atol=1e-5
        )
    assert emb.attrs == {
        "source": "esm2",
        "model": str(path),
        "layer": 2,
        "pooling": "mean",
        "window": 1022,
        "stride": 511,
    }


def test_checkpoint_needs_the_allow_list(tiny_esm2):
    # The trap the loader avoids: a weights-only load refuses the Namespace in cfg.
    path, _ = tiny_esm2
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)


def test_deterministic_and_batching_invariant(tiny_esm2):
    path, _ = tiny_esm2
    first = esm2_embeddings(SEQUENCES, model=path, progress_bar=False)
    again = esm2_embeddings(SEQUENCES, model=path, progress_bar=False)
    np.testing.assert_array_equal(first.to_numpy(), again.to_numpy())
    # A budget of one sequence per batch removes padding altogether; results must not change.
    one_by_one = esm2_embeddings(
        SEQUENCES, model=path, max_tokens=100, window=98, progress_bar=False
    )
    np.testing.assert_allclose(one_by_one.to_numpy(), first.to_numpy(), atol=1e-5)


def test_loaded_pair_and_bos_pooling_and_layer(tiny_esm2):
    path, model = tiny_esm2
    from_path = esm2_embeddings(SEQUENCES, model=path, progress_bar=False)
    model.train()
    from_pair = esm2_embeddings(SEQUENCES, model=(model, model.alphabet), progress_bar=False)
    np.testing.assert_allclose(from_pair.to_numpy(), from_path.to_numpy(), atol=1e-6)
    assert model.training  # the caller's model is handed back as it came (mode and device)
    model.eval()
    assert from_pair.attrs["model"] == "ESM2"

    bos = esm2_embeddings(
        {"MIDN": "MEQRGQ"}, model=path, pooling="bos", repr_layer=1, progress_bar=False
    )
    _, _, tokens = model.alphabet.get_batch_converter()([("x", "MEQRGQ")])
    with torch.no_grad():
        expected = model(tokens, repr_layers=[1])["representations"][1][0, 0].double().numpy()
    np.testing.assert_allclose(bos.loc["MIDN"].to_numpy(), expected, atol=1e-5)
    assert (bos.attrs["layer"], bos.attrs["pooling"]) == (1, "bos")


def test_long_sequences_are_windowed_and_averaged(tiny_esm2):
    path, model = tiny_esm2
    sequence = "MSAPAAKVSKKELNSNHDGADET"  # 23 residues
    emb = esm2_embeddings(
        {"SET": sequence}, model=path, window=10, stride=4, max_tokens=40, progress_bar=False
    )
    # Starts 0, 4, 8, 12, then 13 so that the last window ends at the last residue.
    windows = [sequence[s : s + 10] for s in (0, 4, 8, 12, 13)]
    expected = np.mean([direct_mean(model, w) for w in windows], axis=0)
    np.testing.assert_allclose(emb.loc["SET"].to_numpy(), expected, atol=1e-5)
    # Not the same as one pass over the whole protein.
    assert not np.allclose(emb.loc["SET"].to_numpy(), direct_mean(model, sequence), atol=1e-3)


def test_cache_computes_only_new_genes(tiny_esm2, tmp_path, monkeypatch):
    import esm

    path, _ = tiny_esm2
    seen: list[int] = []
    forward = esm.model.esm2.ESM2.forward

    def counting(self, tokens, *args, **kwargs):
        seen.append(tokens.shape[0])
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(esm.model.esm2.ESM2, "forward", counting)
    cache = tmp_path / "cache"
    two = {g: SEQUENCES[g] for g in ("KLF1", "SET")}
    first = esm2_embeddings(two, model=path, cache_dir=cache, progress_bar=False)
    assert sum(seen) == 2
    assert len(list(cache.rglob("*.npy"))) == 2

    again = esm2_embeddings(two, model=path, cache_dir=cache, progress_bar=False)
    assert sum(seen) == 2  # nothing recomputed
    np.testing.assert_array_equal(again.to_numpy(), first.to_numpy())
    assert again.attrs == first.attrs

    three = esm2_embeddings(SEQUENCES, model=path, cache_dir=cache, progress_bar=False)
    assert sum(seen) == 3  # only MIDN was computed
    np.testing.assert_array_equal(three.loc[["KLF1", "SET"]].to_numpy(), first.to_numpy())

    # A different layer is a different cache entry.
    esm2_embeddings(two, model=path, cache_dir=cache, repr_layer=1, progress_bar=False)
    assert sum(seen) == 5


def test_fasta_input(tiny_esm2, tmp_path):
    path, _ = tiny_esm2
    fasta = tmp_path / "human.fasta"
    fasta.write_text(
        ">sp|P1|KLF1_HUMAN Krueppel-like factor 1 OS=Homo sapiens OX=9606 GN=KLF1 PE=1 SV=2\n"
        f"{SEQUENCES['KLF1'][:40]}\n{SEQUENCES['KLF1'][40:]}\n"
        f">SET protein SET\n{SEQUENCES['SET']}*\n"
    )
    assert read_protein_fasta(fasta) == {"KLF1": SEQUENCES["KLF1"], "SET": SEQUENCES["SET"]}
    from_fasta = esm2_embeddings(fasta, model=path, progress_bar=False)
    from_dict = esm2_embeddings(
        {g: SEQUENCES[g] for g in ("KLF1", "SET")}, model=path, progress_bar=False
    )
    np.testing.assert_array_equal(from_fasta.to_numpy(), from_dict.to_numpy())


def test_fasta_duplicates(tmp_path):
    fasta = tmp_path / "dup.fasta"
    fasta.write_text(">A\nMKV\n>B\nMM\n>A isoform 2\nMKVLL\n")
    with pytest.raises(
        ValueError, match=r"several entries for genes \['A'\].*duplicates='longest'"
    ):
        read_protein_fasta(fasta)
    assert read_protein_fasta(fasta, duplicates="first") == {"A": "MKV", "B": "MM"}
    assert read_protein_fasta(fasta, duplicates="longest") == {"A": "MKVLL", "B": "MM"}
    with pytest.raises(ValueError, match="duplicates must be"):
        read_protein_fasta(fasta, duplicates="last")
    bad = tmp_path / "bad.fasta"
    bad.write_text("MKV\n>A\nMKV\n")
    with pytest.raises(ValueError, match="line 1: sequence before any '>' header"):
        read_protein_fasta(bad)
    empty = tmp_path / "empty.fasta"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no FASTA entries"):
        read_protein_fasta(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_protein_fasta(tmp_path / "absent.fasta")


def test_model_name_error_says_internet(monkeypatch):
    from perturbscope.embeddings import _esm2

    def offline(name):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(_esm2, "_download_checkpoint", offline)
    with pytest.raises(RuntimeError, match=r"'esm2_t6_8M_UR50D'.*needs internet.*local"):
        esm2_embeddings({"A": "MKV"}, model="esm2_t6_8M_UR50D", progress_bar=False)
    with pytest.raises(
        ValueError, match="neither an existing checkpoint file nor a fair-esm model name"
    ):
        esm2_embeddings({"A": "MKV"}, model="esm2_typo", progress_bar=False)


def test_model_name_is_read_through_the_safe_path(tiny_esm2, monkeypatch):
    import esm

    from perturbscope.embeddings import _esm2

    path, model = tiny_esm2
    regression = path.parent / "esm2_t2_tiny-contact-regression.pt"
    monkeypatch.setattr(_esm2, "_download_checkpoint", lambda name: (path, regression))

    def unsafe(*args, **kwargs):
        raise AssertionError("fair-esm's own torch.load must not be used")

    for loader in (
        "load_model_and_alphabet",
        "load_model_and_alphabet_local",
        "load_hub_workaround",
    ):
        monkeypatch.setattr(esm.pretrained, loader, unsafe)
    emb = esm2_embeddings({"MIDN": "MEQRGQ"}, model="esm2_t6_8M_UR50D", progress_bar=False)
    np.testing.assert_allclose(emb.loc["MIDN"].to_numpy(), direct_mean(model, "MEQRGQ"), atol=1e-5)
    assert emb.attrs["model"] == "esm2_t6_8M_UR50D"
    from_path = esm2_embeddings({"MIDN": "MEQRGQ"}, model=path, progress_bar=False)
    np.testing.assert_array_equal(emb.to_numpy(), from_path.to_numpy())


class _WriteMarker:
    """Unpickling this opens (creates) the marker file: a stand-in for any code payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("force_no_weights_only", [False, True])
@pytest.mark.parametrize("where", ["checkpoint", "regression"])
def test_checkpoint_payload_is_refused_and_never_runs(
    tiny_esm2, tmp_path, monkeypatch, force_no_weights_only, where
):
    import argparse

    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    else:
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    path, _ = tiny_esm2
    marker = tmp_path / "pwned"
    target = path if where == "checkpoint" else tmp_path / "esm2_t2_tiny-contact-regression.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(target, weights_only=True)
    data["extra"] = _WriteMarker(marker)
    torch.save(data, target)
    with pytest.raises(
        ValueError,
        match=rf"refusing to load .*{target.name}.*`io\.open`.*not on perturbscope's allow-list",
    ):
        esm2_embeddings({"A": "MKV"}, model=path, progress_bar=False)
    assert not marker.exists()


def test_checkpoint_that_is_not_an_esm_dict(tmp_path):
    path = tmp_path / "esm2_t2_bad.pt"
    torch.save([torch.ones(2)], path)
    torch.save({"model": {}}, tmp_path / "esm2_t2_bad-contact-regression.pt")
    with pytest.raises(
        ValueError, match=r"is not an ESM checkpoint: expected a dict with a 'model'"
    ):
        esm2_embeddings({"A": "MKV"}, model=path, progress_bar=False)


def test_bad_checkpoints(tiny_esm2, tmp_path):
    path, _ = tiny_esm2
    with pytest.raises(FileNotFoundError, match="ESM checkpoint .* does not exist"):
        esm2_embeddings({"A": "MKV"}, model=tmp_path / "missing.pt", progress_bar=False)
    (tmp_path / "esm2_t2_tiny-contact-regression.pt").unlink()
    with pytest.raises(FileNotFoundError, match="contact-regression weights"):
        esm2_embeddings({"A": "MKV"}, model=path, progress_bar=False)
    with pytest.raises(TypeError, match=r"\(model, alphabet\) pair"):
        esm2_embeddings({"A": "MKV"}, model=3, progress_bar=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"sequences": {"A": "MKV", "B": "MK1V"}},
            ValueError,
            r"not amino-acid letters: \{'B': \['1'\]\}",
        ),
        ({"sequences": {"A": ""}}, ValueError, r"Genes \['A'\] have empty protein sequences"),
        ({"sequences": {}}, ValueError, "sequences is empty"),
        (
            {"sequences": ["MKV"]},
            TypeError,
            "must be a \\{gene: protein sequence\\} dict or a FASTA path",
        ),
        ({"pooling": "max"}, ValueError, "pooling must be 'mean' or 'bos', got 'max'"),
        ({"repr_layer": 3}, ValueError, r"repr_layer=3 is out of range: the model has layers 0..2"),
        ({"repr_layer": -1}, ValueError, "repr_layer must be a non-negative"),
        (
            {"max_tokens": 100},
            ValueError,
            r"max_tokens=100 cannot hold one window of 1022 residues",
        ),
        (
            {"window": 10, "stride": 11},
            ValueError,
            "stride must be between 1 and window=10, got 11",
        ),
    ],
)
def test_bad_arguments(tiny_esm2, kwargs, error, match):
    path, _ = tiny_esm2
    arguments = {"sequences": {"A": "MKV"}, "model": path, "show_progress": False, **kwargs}
    with pytest.raises(error, match=match):
        esm2_embeddings(**arguments)


def test_old_show_progress_keyword_still_works_with_a_future_warning(tiny_esm2, capsys):
    path, _ = tiny_esm2
    new = esm2_embeddings(SEQUENCES, model=path, progress_bar=True)
    assert "ESM2 batches" in "".join(capsys.readouterr())
    with pytest.warns(
        FutureWarning, match=r"^esm2_embeddings's `show_progress` is deprecated; use `progress_bar`\.$"
    ):
        old = esm2_embeddings(SEQUENCES, model=path, show_progress=False)
    assert "ESM2 batches" not in "".join(capsys.readouterr())
    pd.testing.assert_frame_equal(old, new)
