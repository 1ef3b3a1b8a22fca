"""Shared fixtures: the real data folder (skipped when absent) and a small simulated screen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$PERTURBSCOPE_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("PERTURBSCOPE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; tests that use it skip with a reason when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set PERTURBSCOPE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def small_screen():
    """A small simulated screen and its gene embeddings (read-only: copy before mutating)."""
    from perturbscope.data import simulate_perturbseq

    return simulate_perturbseq(
        n_genes=60, n_perturbed_genes=12, n_combinations=6, n_cell_types=2,
        n_cells_per_condition=20, embedding_dim=8, seed=0,
    )
