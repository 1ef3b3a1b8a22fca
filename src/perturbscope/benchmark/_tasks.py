"""The real-data benchmark tasks, plus a tiny simulated one for smoke tests.

A :class:`BenchmarkTask` knows which file it reads, how to cut the screen out of it, which
``obs`` columns hold the perturbation and context, and which splits to score for a seed:

* ``norman_unseen_single``: Norman 2019 K562 CRISPRa singles, 3 folds of unseen singles
  (the fold assignment changes with the seed);
* ``norman_combo``: all 15 Norman doubles, trained on control and singles, labelled
  ``seen0``/``seen1``/``seen2``;
* ``mcfaline_unseen_line``: McFaline-Figueroa 2023, each of the 3 glioblastoma lines held out,
  zero-shot and 10-shot;
* ``kang_unseen_cell_type``: Kang 2018 PBMC, the interferon-stimulated state of each of the 7
  cell types held out (scGen's task);
* ``simulated``: a small simulated screen (counts), for tests and the CI smoke run.

Real files hold log1p-normalised values (``data_scale="log1p_norm"``). Perturbations whose
genes have no GO annotation (Norman's ``IER5L``) are left out of the Norman tasks, so that every
model, embedding-based or not, is scored on the same perturbations.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..data import parse_perturbation, simulate_perturbseq
from ..embeddings import go_embeddings
from ._splits import Split, combo_split, unseen_context_split, unseen_single_split

PERTURBENCH_FILE = "perturbench_devel.h5ad"
KANG_FILE = "kang2018_scgen_valid.h5ad"
PAPALEXI_FILE = "papalexi2021_eccite_rna.h5ad"
#: Papalexi cells whose top guide holds less than this share of their guide UMIs are left out.
MIN_GUIDE_FRACTION = 0.5
GO_ANNOTATIONS = Path("annotations") / "human_go_annotations.tsv.gz"


@dataclass(frozen=True)
class BenchmarkTask:
    """A benchmark task: data, keys and splits.

    Parameters
    ----------
    name
        Short name, as given to :func:`~perturbscope.benchmark.run_benchmark`.
    description
        One line for reports.
    file
        File name in the shared data folder.
    perturbation_key, control_value, context_key
        Where the labels are.
    data_scale
        ``"log1p_norm"`` or ``"counts"``.
    load
        Turns the file's AnnData into the task's cells.
    make_splits
        ``(adata, seed) -> list of Split``.
    not_applicable
        ``{model name: reason}`` for models the task cannot run.

    Examples
    --------
    >>> TASKS["norman_combo"].perturbation_key
    'condition'
    """

    name: str
    description: str
    file: str | None
    perturbation_key: str
    control_value: str
    context_key: str | None
    data_scale: str
    load: Callable[[ad.AnnData], ad.AnnData] = field(repr=False)
    make_splits: Callable[[ad.AnnData, int], list[Split]] = field(repr=False)
    not_applicable: dict[str, str] = field(default_factory=dict)


def _norman(adata: ad.AnnData, doubles: bool) -> ad.AnnData:
    cells = adata[adata.obs["dataset"].astype(str) == "norman19"]
    labels = cells.obs["condition"].astype(str)
    n_genes = labels.map(lambda p: len(parse_perturbation(p)))
    keep = (n_genes <= 1) if not doubles else (n_genes <= 2)
    # IER5L has no GO annotation: an embedding-conditioned model cannot be given it.
    keep &= ~labels.map(lambda p: "IER5L" in parse_perturbation(p))
    return cells[keep.to_numpy()].copy()


def _mcfaline(adata: ad.AnnData) -> ad.AnnData:
    return adata[adata.obs["dataset"].astype(str) == "mcfaline23"].copy()


def _papalexi(adata: ad.AnnData) -> ad.AnnData:
    return adata[(adata.obs["guide_frac"] >= MIN_GUIDE_FRACTION).to_numpy()].copy()


def _papalexi_splits(adata: ad.AnnData, seed: int) -> list[Split]:
    return [
        unseen_single_split(adata, "target", control_value="non-targeting", n_folds=5, fold=f, seed=seed)
        for f in range(5)
    ]


def _norman_single_splits(adata: ad.AnnData, seed: int) -> list[Split]:
    return [unseen_single_split(adata, "condition", n_folds=3, fold=f, seed=seed) for f in range(3)]


def _norman_combo_splits(adata: ad.AnnData, seed: int) -> list[Split]:
    return [combo_split(adata, "condition", seed=seed)]


def _context_splits(
    perturbation_key: str, context_key: str, shots: tuple[int, ...]
) -> Callable[[ad.AnnData, int], list[Split]]:
    def make(adata: ad.AnnData, seed: int) -> list[Split]:
        contexts = sorted(pd.unique(adata.obs[context_key].astype(str)))
        return [
            unseen_context_split(adata, perturbation_key, context_key, c, k=k, seed=seed)
            for c in contexts
            for k in shots
        ]

    return make


def simulated_screen(seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame]:
    """The small simulated screen of the ``simulated`` task and its gene embeddings.

    Parameters
    ----------
    seed
        Simulation seed.

    Returns
    -------
    Counts (``obs["perturbation"]``) and gene embeddings, from
    :func:`~perturbscope.data.simulate_perturbseq`.

    Examples
    --------
    >>> adata, embeddings = simulated_screen()
    >>> adata.n_vars, embeddings.shape[1]
    (60, 8)
    """
    return simulate_perturbseq(
        n_genes=60,
        n_perturbed_genes=9,
        n_combinations=3,
        n_cell_types=1,
        n_cells_per_condition=20,
        embedding_dim=8,
        seed=seed,
    )


TASKS: dict[str, BenchmarkTask] = {
    "norman_unseen_single": BenchmarkTask(
        name="norman_unseen_single",
        description="Norman 2019 K562: 17 single genes, 3 folds of unseen singles",
        file=PERTURBENCH_FILE,
        perturbation_key="condition",
        control_value="control",
        context_key=None,
        data_scale="log1p_norm",
        load=lambda a: _norman(a, doubles=False),
        make_splits=_norman_single_splits,
    ),
    "norman_combo": BenchmarkTask(
        name="norman_combo",
        description="Norman 2019 K562: 15 doubles, trained on control and singles",
        file=PERTURBENCH_FILE,
        perturbation_key="condition",
        control_value="control",
        context_key=None,
        data_scale="log1p_norm",
        load=lambda a: _norman(a, doubles=True),
        make_splits=_norman_combo_splits,
    ),
    "mcfaline_unseen_line": BenchmarkTask(
        name="mcfaline_unseen_line",
        description="McFaline-Figueroa 2023: one of 3 glioblastoma lines held out, 0- and 10-shot",
        file=PERTURBENCH_FILE,
        perturbation_key="condition",
        control_value="control",
        context_key="cell_type",
        data_scale="log1p_norm",
        load=_mcfaline,
        make_splits=_context_splits("condition", "cell_type", (0, 10)),
    ),
    "kang_unseen_cell_type": BenchmarkTask(
        name="kang_unseen_cell_type",
        description="Kang 2018 PBMC: interferon-stimulated state of one of 7 cell types held out",
        file=KANG_FILE,
        perturbation_key="condition",
        control_value="control",
        context_key="cell_type",
        data_scale="log1p_norm",
        load=lambda a: a.copy(),
        make_splits=_context_splits("condition", "cell_type", (0,)),
        not_applicable={
            "linear": "the perturbation (interferon) is not a gene: no embedding row",
            "embedding_nn": "the perturbation (interferon) is not a gene: no embedding row",
        },
    ),
    "papalexi_unseen_single": BenchmarkTask(
        name="papalexi_unseen_single",
        description="Papalexi 2021 THP-1 ECCITE-seq: knocked-out genes with GO terms, 5 folds of unseen genes",
        file=PAPALEXI_FILE,
        perturbation_key="target",
        control_value="non-targeting",
        context_key=None,
        data_scale="counts",
        load=_papalexi,
        make_splits=_papalexi_splits,
    ),
    "simulated": BenchmarkTask(
        name="simulated",
        description="simulated screen (60 genes, 9 singles, 3 doubles), 2 folds of unseen singles",
        file=None,
        perturbation_key="perturbation",
        control_value="control",
        context_key=None,
        data_scale="counts",
        load=lambda a: a[a.obs["perturbation"].astype(str).str.count(r"\+") == 0].copy(),
        make_splits=lambda a, seed: [
            unseen_single_split(a, "perturbation", n_folds=2, fold=f, seed=seed) for f in range(2)
        ],
    ),
}


def _check_task(task: str) -> BenchmarkTask:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}.")
    return TASKS[task]


def load_task(
    task: str, data: str | os.PathLike | ad.AnnData | None = None
) -> tuple[ad.AnnData, pd.DataFrame | None]:
    """The cells of a task, and its gene embeddings when it needs GO-derived ones.

    Parameters
    ----------
    task
        A name in :data:`TASKS`.
    data
        The task's h5ad file, the shared data folder holding it, or an AnnData. Ignored (may be
        ``None``) for ``"simulated"``.

    Returns
    -------
    The task's cells (a new AnnData) and gene embeddings: GO-derived (128 SVD dimensions of
    tf-idf-weighted direct annotations, from ``annotations/human_go_annotations.tsv.gz`` beside
    the data) for the Norman, McFaline and Papalexi tasks (perturbations of genes without GO
    terms are left out, with a warning), the simulator's for ``"simulated"``, ``None``
    for Kang.

    Raises
    ------
    ValueError
        For an unknown task.
    FileNotFoundError
        If the data or the GO annotations are missing.

    Examples
    --------
    >>> adata, embeddings = load_task("simulated")
    >>> sorted(adata.obs["perturbation"].unique())[:2]
    ['G00', 'G01']
    """
    spec = _check_task(task)
    if spec.file is None:
        adata, embeddings = simulated_screen()
        return spec.load(adata), embeddings
    folder = None
    if isinstance(data, ad.AnnData):
        raw = data
    else:
        if data is None:
            raise ValueError(f"task {task!r} needs data: the path of {spec.file} or its folder.")
        path = Path(data)
        if path.is_dir():
            folder, path = path, path / spec.file
        else:
            folder = path.parent
        if not path.exists():
            raise FileNotFoundError(f"data file {str(path)!r} for task {task!r} does not exist.")
        raw = ad.read_h5ad(path)
    adata = spec.load(raw)
    embeddings = None
    if task != "kang_unseen_cell_type":
        if folder is None:
            raise ValueError(
                f"task {task!r} needs GO annotations; pass the data as a path so that "
                f"{GO_ANNOTATIONS} can be found beside it."
            )
        genes = sorted(
            {
                g
                for p in pd.unique(adata.obs[spec.perturbation_key].astype(str))
                for g in parse_perturbation(p, spec.control_value)
            }
        )
        embeddings = go_gene_embeddings(str(folder / GO_ANNOTATIONS), tuple(genes))
        adata = _drop_unembedded(adata, spec, embeddings)
    return adata, embeddings


def _drop_unembedded(adata: ad.AnnData, spec: BenchmarkTask, embeddings: pd.DataFrame) -> ad.AnnData:
    """Leave out perturbations of genes without GO terms, which no embedding model can be given."""
    labels = adata.obs[spec.perturbation_key].astype(str)
    lacking = sorted({
        p for p in pd.unique(labels)
        if any(g not in embeddings.index for g in parse_perturbation(p, spec.control_value))
    })
    if not lacking:
        return adata
    warnings.warn(
        f"task {spec.name!r}: perturbations of genes without GO annotation are left out: {lacking}.",
        stacklevel=3,
    )
    return adata[~labels.isin(lacking).to_numpy()].copy()


@lru_cache(maxsize=8)
def go_gene_embeddings(annotations: str, genes: tuple[str, ...]) -> pd.DataFrame:
    """GO-derived gene embeddings of the issue's protocol: 128 SVD dimensions, direct terms.

    Cached per process: the SVD over all annotated genes takes several seconds.

    Parameters
    ----------
    annotations
        Path of ``human_go_annotations.tsv.gz``.
    genes
        Genes to return (those without annotation are left out, with a warning).

    Returns
    -------
    Genes x 128 DataFrame.

    Raises
    ------
    FileNotFoundError
        If ``annotations`` does not exist.
    """
    if not os.path.exists(annotations):
        raise FileNotFoundError(f"GO annotation file {annotations!r} does not exist.")
    table = go_embeddings(annotations, propagate=False, n_components=128, genes=list(genes))
    return table.astype(np.float64)
