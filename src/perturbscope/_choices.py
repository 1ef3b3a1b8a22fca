"""Names the command line offers, importable without torch or scvi-tools.

:mod:`perturbscope.cli` lists these in ``--help`` and checks its arguments against them before it
imports anything heavy. The model names are defined here only: :data:`perturbscope.benchmark.MODELS`
and :data:`perturbscope.benchmark.BASELINES` are these tuples, and ``tests/test_cli.py`` checks
that :func:`perturbscope.benchmark.make_model` builds every one of them and that
:data:`TASK_NAMES` equals the keys of :data:`perturbscope.benchmark.TASKS`.
"""

from __future__ import annotations

#: The benchmark's tasks (keys of :data:`perturbscope.benchmark.TASKS`).
TASK_NAMES: tuple[str, ...] = (
    "norman_unseen_single",
    "norman_combo",
    "mcfaline_unseen_line",
    "kang_unseen_cell_type",
    "papalexi_unseen_single",
    "simulated",
)

#: The baselines (:data:`perturbscope.benchmark.BASELINES`), each a ``make_model`` name.
BASELINE_NAMES: tuple[str, ...] = (
    "no_change", "perturbed_mean", "matching_mean", "additive", "embedding_nn", "linear",
)

#: Every benchmark model (:data:`perturbscope.benchmark.MODELS`).
MODEL_NAMES: tuple[str, ...] = ("scopevi", "scopevi_vae", *BASELINE_NAMES)

#: Lightning accelerators the command line passes to ScopeVI's training.
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "gpu", "cuda", "mps")
