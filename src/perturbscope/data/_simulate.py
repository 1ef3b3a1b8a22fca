"""A Perturb-seq simulator with known ground truth.

Design
------
* **Regulatory network.** ``n_programs`` latent gene programmes load sparsely on the measured
  genes (matrix ``programs``, programmes x genes). Each perturbable regulator ``g`` acts on the
  programmes through a ground-truth effect vector ``e_g``; a knock-down also lowers ``g``'s own
  expression (the first ``n_perturbed_genes`` measured genes are the regulators).
* **Cell types** rescale every programme (``program_gain``), so the same perturbation moves
  different genes by different amounts in different cell types.
* **Combinations** ``A+B`` follow Norman et al. 2019's model: ``delta_AB = c (delta_A + delta_B)``
  with ``c = 1 + interaction_strength * cos(e_A, e_B)``: regulators acting on the same
  programmes synergise (``c > 1``), opposing ones buffer each other (``c < 1``).
* **Gene embeddings** are a random linear map of ``e_g`` plus noise, so a model that learns the
  map from embedding to effect can predict regulators it never saw perturbed.
* **Counts** are negative binomial around ``library * softmax(log-mean)``, with a per-cell basal
  state (``n_basal`` factors) that perturbations do not change: the heterogeneity that a control
  anchor has to carry.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse


def _gene_names(n: int, prefix: str) -> list[str]:
    width = len(str(n))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _sample_doubles(rng: np.random.Generator, regulators: list[str], n_combinations: int) -> list[tuple[str, str]]:
    n_possible = len(regulators) * (len(regulators) - 1) // 2
    if n_combinations > n_possible:
        raise ValueError(
            f"n_combinations={n_combinations} exceeds the {n_possible} distinct pairs of "
            f"{len(regulators)} perturbed genes."
        )
    chosen: set[tuple[str, str]] = set()
    while len(chosen) < n_combinations:
        a, b = sorted(rng.choice(len(regulators), size=2, replace=False))
        chosen.add((regulators[a], regulators[b]))
    return sorted(chosen)


def _negative_binomial(rng: np.random.Generator, mean: np.ndarray, dispersion: np.ndarray) -> np.ndarray:
    """Gamma-Poisson draws with mean ``mean`` and inverse dispersion ``dispersion`` (per gene)."""
    rate = rng.gamma(shape=dispersion, scale=mean / dispersion)
    return rng.poisson(rate)


def simulate_perturbseq(
    n_genes: int = 200,
    n_perturbed_genes: int = 40,
    n_combinations: int = 20,
    n_cell_types: int = 2,
    n_cells_per_condition: int = 50,
    n_control_cells: int | None = None,
    embedding_dim: int = 32,
    n_programs: int = 8,
    n_basal: int = 3,
    effect_size: float = 1.0,
    interaction_strength: float = 0.6,
    embedding_noise: float = 0.1,
    mean_library_size: float = 3000.0,
    seed: int = 0,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Simulate a Perturb-seq screen with single and double perturbations and known effects.

    Parameters
    ----------
    n_genes
        Number of measured genes.
    n_perturbed_genes
        Number of regulators that are perturbed (the first measured genes).
    n_combinations
        Number of distinct two-gene perturbations.
    n_cell_types
        Number of cell types; effects differ between them.
    n_cells_per_condition
        Cells per perturbation and cell type.
    n_control_cells
        Control cells per cell type; defaults to ``4 * n_cells_per_condition``.
    embedding_dim
        Dimension of the returned gene embeddings.
    n_programs
        Number of latent regulatory programmes.
    n_basal
        Number of basal (perturbation-independent) cell-state factors.
    effect_size
        Scale of the ground-truth effect vectors.
    interaction_strength
        How strongly the cosine similarity of two regulators sets the interaction coefficient.
    embedding_noise
        Standard deviation of the noise added to the embeddings, relative to their signal.
    mean_library_size
        Mean total count per cell.
    seed
        Random seed.

    Returns
    -------
    adata
        Counts in ``X`` (CSR, float32) with ``obs["perturbation"]`` (``"control"``, ``"A"``,
        ``"A+B"``), ``obs["cell_type"]`` and ``obs["n_counts"]``, and the ground truth in
        ``uns["simulation"]``:

        * ``"log_fold_change"``: ``{cell_type: DataFrame}`` of true shifts in log mean expression
          (perturbations x genes);
        * ``"interactions"``: one row per double with its coefficient and type
          (``"synergy"``, ``"buffering"`` or ``"additive"``);
        * ``"effect_vectors"``: the regulators' true effect vectors (genes x programmes).
    embeddings
        Gene embeddings for the perturbed genes (genes x ``embedding_dim``), informative of their
        effects.

    Examples
    --------
    >>> adata, embeddings = simulate_perturbseq(n_genes=50, n_perturbed_genes=10, n_combinations=5)
    >>> adata.obs["perturbation"].iloc[0]
    'control'
    """
    adata, embeddings, _ = simulate_screen(
        n_genes, n_perturbed_genes, n_combinations, n_cell_types, n_cells_per_condition, n_control_cells,
        embedding_dim, n_programs, n_basal, effect_size, interaction_strength, embedding_noise,
        mean_library_size, seed,
    )
    return adata, embeddings


def simulate_screen(
    n_genes: int, n_perturbed_genes: int, n_combinations: int, n_cell_types: int, n_cells_per_condition: int,
    n_control_cells: int | None, embedding_dim: int, n_programs: int, n_basal: int, effect_size: float,
    interaction_strength: float, embedding_noise: float, mean_library_size: float, seed: int,
) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """:func:`simulate_perturbseq` plus its internals, for simulators of further modalities.

    The third value holds ``"programs"`` (programmes x genes), ``"program_gain"`` (cell types x
    programmes), ``"effect_vectors"`` (regulators x programmes), ``"interactions"`` and
    ``"log_mean"``: every cell's log mean expression before the softmax (cells x genes), the
    quantity other modalities of the same cell are drawn from.
    """
    if n_perturbed_genes > n_genes:
        raise ValueError(f"n_perturbed_genes={n_perturbed_genes} exceeds n_genes={n_genes}.")
    rng = np.random.default_rng(seed)
    genes = _gene_names(n_genes, "G")
    regulators = genes[:n_perturbed_genes]
    cell_types = [f"type_{i}" for i in range(n_cell_types)]
    n_control_cells = 4 * n_cells_per_condition if n_control_cells is None else n_control_cells

    programs = rng.normal(0, 1, (n_programs, n_genes)) * (rng.random((n_programs, n_genes)) < 0.15)
    effect_vectors = rng.normal(0, effect_size, (n_perturbed_genes, n_programs))
    program_gain = rng.uniform(0.4, 1.6, (n_cell_types, n_programs))
    base_log_mean = rng.normal(0, 1.0, n_genes)
    type_shift = rng.normal(0, 0.5, (n_cell_types, n_genes))
    basal_loadings = rng.normal(0, 0.35, (n_basal, n_genes))
    dispersion = rng.uniform(2.0, 10.0, n_genes)

    mixing = rng.normal(0, 1 / np.sqrt(n_programs), (n_programs, embedding_dim))
    signal = effect_vectors @ mixing
    noise = rng.normal(0, embedding_noise * signal.std(), signal.shape)
    embeddings = pd.DataFrame(
        signal + noise, index=pd.Index(regulators, name="gene"),
        columns=[f"dim_{i}" for i in range(embedding_dim)],
    )
    embeddings.attrs = {"source": "simulate_perturbseq", "seed": seed}

    def single_shift(reg_index: int, type_index: int) -> np.ndarray:
        shift = (effect_vectors[reg_index] * program_gain[type_index]) @ programs
        shift[reg_index] -= 1.5  # the knock-down lowers the regulator itself
        return shift

    doubles = _sample_doubles(rng, regulators, n_combinations)
    interactions = []
    for a, b in doubles:
        ea, eb = effect_vectors[regulators.index(a)], effect_vectors[regulators.index(b)]
        cosine = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
        coefficient = 1.0 + interaction_strength * cosine
        kind = "synergy" if coefficient > 1.2 else "buffering" if coefficient < 0.8 else "additive"
        interactions.append((f"{a}+{b}", a, b, coefficient, kind))
    interaction_table = pd.DataFrame(
        interactions, columns=["perturbation", "gene_a", "gene_b", "coefficient", "type"]
    ).set_index("perturbation")

    conditions = ["control", *regulators, *interaction_table.index]
    log_fold_change: dict[str, pd.DataFrame] = {}
    counts, obs_rows, log_means = [], [], []
    for t, cell_type in enumerate(cell_types):
        shifts = {"control": np.zeros(n_genes)}
        for r, reg in enumerate(regulators):
            shifts[reg] = single_shift(r, t)
        for name, row in interaction_table.iterrows():
            shifts[name] = row["coefficient"] * (shifts[row["gene_a"]] + shifts[row["gene_b"]])
        log_fold_change[cell_type] = pd.DataFrame(
            np.stack([shifts[c] for c in conditions]), index=conditions, columns=genes
        )
        for condition in conditions:
            n = n_control_cells if condition == "control" else n_cells_per_condition
            basal = rng.normal(0, 1, (n, n_basal)) @ basal_loadings
            log_mean = base_log_mean + type_shift[t] + shifts[condition] + basal
            log_means.append(log_mean)
            proportions = np.exp(log_mean - log_mean.max(axis=1, keepdims=True))
            proportions /= proportions.sum(axis=1, keepdims=True)
            library = rng.lognormal(np.log(mean_library_size), 0.3, n)
            counts.append(_negative_binomial(rng, proportions * library[:, None], dispersion))
            obs_rows.extend([(condition, cell_type)] * n)

    X = sparse.csr_matrix(np.vstack(counts).astype(np.float32))
    obs = pd.DataFrame(obs_rows, columns=["perturbation", "cell_type"])
    obs.index = [f"cell_{i}" for i in range(len(obs))]
    obs["perturbation"] = pd.Categorical(obs["perturbation"], categories=conditions)
    obs["cell_type"] = pd.Categorical(obs["cell_type"], categories=cell_types)
    obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel()
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    adata.var["perturbed_regulator"] = adata.var_names.isin(regulators)
    adata.uns["simulation"] = {
        "log_fold_change": log_fold_change,
        "interactions": interaction_table,
        "effect_vectors": pd.DataFrame(effect_vectors, index=regulators,
                                       columns=[f"program_{k}" for k in range(n_programs)]),
        "seed": seed,
    }
    internals = {"programs": programs, "program_gain": program_gain, "effect_vectors": effect_vectors,
                 "interactions": interaction_table, "log_mean": np.vstack(log_means)}
    return adata, embeddings, internals
