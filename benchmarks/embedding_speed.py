"""Sequences per second of ``esm2_embeddings`` for a tiny random ESM2 on CPU.

The model (2 layers, 32 wide, ESM-1b alphabet) is saved in the checkpoint layout of a real ESM2
download and loaded by path, so the timing covers the whole path a user takes except the weights'
size. Sequences are random proteins of 100-600 residues (human median is about 400).

Run: ``python benchmarks/embedding_speed.py [n_sequences] [threads]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from perturbscope.embeddings import esm2_embeddings

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def save_tiny_checkpoint(directory: Path) -> Path:
    import esm

    torch.manual_seed(0)
    model = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet="ESM-1b")
    state, regression = {}, {}
    for key, value in model.state_dict().items():
        if key.startswith("contact_head."):
            regression[key] = value
        elif key.startswith("lm_head."):
            state[f"encoder.{key}"] = value
        else:
            state[f"encoder.sentence_encoder.{key}"] = value
    cfg = argparse.Namespace(
        encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True
    )
    path = directory / "esm2_t2_tiny.pt"
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    torch.save({"model": regression}, directory / "esm2_t2_tiny-contact-regression.pt")
    return path


def main() -> None:
    n_sequences = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    rng = np.random.default_rng(0)
    sequences = {
        f"GENE{i}": "".join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(100, 600))))
        for i in range(n_sequences)
    }
    with tempfile.TemporaryDirectory() as folder:
        path = save_tiny_checkpoint(Path(folder))
        esm2_embeddings(
            dict(list(sequences.items())[:4]), model=path, progress_bar=False
        )  # warm-up
        start = time.perf_counter()
        emb = esm2_embeddings(sequences, model=path, device="cpu", progress_bar=False)
        seconds = time.perf_counter() - start
    residues = sum(len(s) for s in sequences.values())
    print(
        f"tiny ESM2 (2 layers, 32 dims) on CPU, {torch.get_num_threads()} torch threads: "
        f"{n_sequences / seconds:.1f} sequences/s ({residues / seconds:.0f} residues/s; "
        f"{n_sequences} sequences, {seconds:.2f} s, output {emb.shape})"
    )


if __name__ == "__main__":
    main()
