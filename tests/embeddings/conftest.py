"""A tiny random ESM2 saved in the checkpoint layout fair-esm's local loader reads."""

from __future__ import annotations

import argparse

import pytest


def save_tiny_esm2(directory, seed: int = 0, name: str = "esm2_t2_tiny"):
    """Save a 2-layer, 32-wide random ESM2 as ``<name>.pt`` plus ``<name>-contact-regression.pt``.

    The layout is a real ESM2 download's: ``{"cfg": {"model": Namespace}, "model": state_dict}``
    with fairseq key prefixes, and the contact-regression weights in a file beside it.
    """
    import esm
    import torch

    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet="ESM-1b")
    model.eval()
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
    path = directory / f"{name}.pt"
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    torch.save({"model": regression}, directory / f"{name}-contact-regression.pt")
    return path, model


@pytest.fixture
def tiny_esm2(tmp_path):
    """``(checkpoint path, the same model in memory)``."""
    return save_tiny_esm2(tmp_path)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models and the GO SVD run faster on one thread on a busy 2-core runner.

    With two BLAS/OpenMP threads competing with other processes, spinning makes small torch ops
    about 100x and LAPACK calls about 3x slower. Module scope so that module-scoped fixtures
    (the real GO embedding) run under the limit too; restored afterwards.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)
