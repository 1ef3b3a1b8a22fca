"""A multimodal Perturb-seq simulator (RNA + surface protein, optionally + ATAC peaks) with known truth.

Design
------
The RNA is :func:`perturbscope.data.simulate_perturbseq`'s, draw for draw. Every other modality
of a cell is drawn from the same cell's log mean expression (``log_mean``, which carries its
cell type, basal state and perturbation), so all modalities share one cell state:

* **Proteins** are products of genes (``var["source_gene"]``). A protein's log mean is its
  source gene's log mean plus a protein offset, plus, where it applies,

  - ``"own"``: the protein of a perturbed regulator; a knock-down lowers it beyond its mRNA
    (``own_protein_drop``, e.g. a degron or destabilised complex), so the knocked-out gene's own
    protein falls;
  - ``"post_transcriptional"``: proteins whose source gene no programme loads (its RNA never
    changes) but whose level the regulators move through protein programmes (stability,
    translation): ``(e_g * gain_t) @ protein_programs``. Their change has no RNA counterpart,
    which is what a protein decoder can add to RNA;
  - ``"downstream"``: proteins of genes the programmes load; they follow their mRNA.

  Combinations follow the RNA's rule: the same coefficient times the sum of the singles' shifts.
  Counts are a totalVI-like mixture: negative binomial foreground at the cell's protein library
  size plus Poisson ambient background per protein.
* **Peaks** (``n_peaks > 0``) are each linked to a gene; a peak's log rate is half its gene's
  log mean plus an offset; counts are Poisson at the cell's ATAC library size.
* A share of cells (``missing_protein_fraction``) has no protein measurement: all-zero rows, the
  MultiVI convention for a missing modality, flagged in ``obs["has_protein"]``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from ._simulate import _gene_names, _negative_binomial, simulate_screen

#: Extra log-fold drop of a knocked-out regulator's own protein, beyond its mRNA's.
OWN_PROTEIN_DROP = 1.0


def _protein_sources(rng, programs: np.ndarray, n_perturbed: int, n_proteins: int, post_fraction: float):
    """Source gene and kind of every protein: own regulators, post-transcriptional, downstream."""
    n_genes = programs.shape[1]
    n_post = int(round(post_fraction * n_proteins))
    n_own = min(n_perturbed, (n_proteins - n_post) // 2)
    n_down = n_proteins - n_post - n_own
    unloaded = np.flatnonzero((programs == 0).all(axis=0))
    unloaded = unloaded[unloaded >= n_perturbed]
    loaded = np.flatnonzero((programs != 0).any(axis=0))
    loaded = loaded[loaded >= n_perturbed]
    if len(unloaded) < n_post or len(loaded) < n_down:
        raise ValueError(
            f"n_proteins={n_proteins} needs {n_post} genes that no programme loads and {n_down} that "
            f"some programme loads among the {n_genes - n_perturbed} unperturbed genes; there are "
            f"{len(unloaded)} and {len(loaded)}. Raise n_genes or lower n_proteins."
        )
    sources = np.concatenate([
        np.arange(n_own),
        np.sort(rng.choice(unloaded, n_post, replace=False)),
        np.sort(rng.choice(loaded, n_down, replace=False)),
    ]).astype(int)
    kinds = ["own"] * n_own + ["post_transcriptional"] * n_post + ["downstream"] * n_down
    return sources, np.array(kinds, dtype=object)


def simulate_multimodal_perturbseq(
    n_genes: int = 200,
    n_perturbed_genes: int = 40,
    n_combinations: int = 20,
    n_proteins: int = 30,
    n_peaks: int = 0,
    n_cell_types: int = 2,
    n_cells_per_condition: int = 50,
    n_control_cells: int | None = None,
    embedding_dim: int = 32,
    n_programs: int = 8,
    effect_size: float = 1.0,
    post_transcriptional_fraction: float = 0.25,
    protein_effect_size: float = 1.0,
    missing_protein_fraction: float = 0.0,
    mean_library_size: float = 3000.0,
    mean_protein_library_size: float = 2000.0,
    mean_peak_library_size: float = 1000.0,
    seed: int = 0,
):
    """Simulate an ECCITE-seq / Perturb-CITE-seq screen (and optionally multiome peaks) in a MuData.

    See the module docstring for the model. The RNA modality equals
    ``simulate_perturbseq(n_genes, n_perturbed_genes, n_combinations, n_cell_types,
    n_cells_per_condition, n_control_cells, embedding_dim, n_programs, effect_size=effect_size,
    mean_library_size=mean_library_size, seed=seed)``.

    Parameters
    ----------
    n_genes, n_perturbed_genes, n_combinations, n_cell_types, n_cells_per_condition, \
n_control_cells, embedding_dim, n_programs, effect_size, mean_library_size, seed
        As for :func:`perturbscope.data.simulate_perturbseq`.
    n_proteins
        Surface proteins (antibody tags).
    n_peaks
        ATAC peaks; 0 leaves the modality out.
    post_transcriptional_fraction
        Share of proteins that respond to perturbations without any change of their mRNA.
    protein_effect_size
        Scale of the post-transcriptional protein programmes.
    missing_protein_fraction
        Share of cells without a protein measurement (all-zero protein rows).
    mean_protein_library_size, mean_peak_library_size
        Mean total protein and peak counts per cell.

    Returns
    -------
    mdata
        A :class:`mudata.MuData` with modalities ``"rna"``, ``"adt"`` (and ``"atac"`` when
        ``n_peaks > 0``), counts in each ``X``, and global ``obs["perturbation"]``,
        ``obs["cell_type"]`` and ``obs["has_protein"]``. ``mdata["rna"]`` is the RNA simulation
        (with its ``uns["simulation"]``). ``mdata["adt"].var`` has ``"source_gene"`` and
        ``"kind"`` (``"own"``, ``"post_transcriptional"``, ``"downstream"``), and
        ``mdata["adt"].uns["simulation"]["log_fold_change"]`` the true shifts of log mean protein
        (``{cell_type: DataFrame}``, perturbations x proteins); ``mdata["atac"]`` has
        ``var["linked_gene"]`` and the same ground truth for peaks.
    embeddings
        Gene embeddings of the perturbed genes, as from :func:`simulate_perturbseq`.

    Raises
    ------
    ValueError
        If ``n_proteins`` is not positive, a fraction lies outside ``[0, 1)``, or there are too
        few genes to draw the proteins' sources from.

    Examples
    --------
    >>> mdata, emb = simulate_multimodal_perturbseq(n_genes=60, n_perturbed_genes=6, n_combinations=2,
    ...                                             n_proteins=12, n_cells_per_condition=5)
    >>> list(mdata.mod), mdata["adt"].shape
    (['rna', 'adt'], (120, 12))
    >>> mdata["adt"].var["kind"].value_counts().sort_index().to_dict()
    {'downstream': 5, 'own': 4, 'post_transcriptional': 3}
    """
    import mudata as md

    if not isinstance(n_proteins, int | np.integer) or n_proteins < 1:
        raise ValueError(f"n_proteins must be a positive integer, got {n_proteins!r}.")
    if not isinstance(n_peaks, int | np.integer) or n_peaks < 0:
        raise ValueError(f"n_peaks must be a non-negative integer, got {n_peaks!r}.")
    for name, value in (("post_transcriptional_fraction", post_transcriptional_fraction),
                        ("missing_protein_fraction", missing_protein_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")
    rna, embeddings, internals = simulate_screen(
        n_genes, n_perturbed_genes, n_combinations, n_cell_types, n_cells_per_condition, n_control_cells,
        embedding_dim, n_programs, 3, effect_size, 0.6, 0.1, mean_library_size, seed,
    )
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the RNA stays simulate_perturbseq's
    programs, gain = internals["programs"], internals["program_gain"]
    effects, interactions = internals["effect_vectors"], internals["interactions"]
    log_mean = internals["log_mean"]
    sources, kinds = _protein_sources(rng, programs, n_perturbed_genes, n_proteins, post_transcriptional_fraction)
    post = kinds == "post_transcriptional"
    protein_programs = rng.normal(0, protein_effect_size, (n_programs, n_proteins)) * post
    protein_offset = rng.normal(1.0, 0.5, n_proteins)
    background = rng.lognormal(np.log(3.0), 0.3, n_proteins)
    dispersion = rng.uniform(5.0, 20.0, n_proteins)

    regulators = list(rna.var_names[:n_perturbed_genes])
    cell_types = list(rna.obs["cell_type"].cat.categories)
    conditions = list(rna.obs["perturbation"].cat.categories)
    lfc_rna = rna.uns["simulation"]["log_fold_change"]
    extra, protein_lfc = {}, {}
    for t, cell_type in enumerate(cell_types):
        singles = {"control": np.zeros(n_proteins)}
        for r, regulator in enumerate(regulators):
            shift = (effects[r] * gain[t]) @ protein_programs
            shift[(kinds == "own") & (sources == r)] -= OWN_PROTEIN_DROP
            singles[regulator] = shift
        for name, row in interactions.iterrows():
            singles[name] = row["coefficient"] * (singles[row["gene_a"]] + singles[row["gene_b"]])
        extra[cell_type] = np.stack([singles[c] for c in conditions])
        protein_lfc[cell_type] = pd.DataFrame(
            lfc_rna[cell_type].to_numpy()[:, sources] + extra[cell_type], index=conditions,
            columns=_gene_names(n_proteins, "P"),
        )
    type_of = rna.obs["cell_type"].cat.codes.to_numpy()
    condition_of = rna.obs["perturbation"].cat.codes.to_numpy()
    cell_extra = np.stack([extra[cell_types[t]][c] for t, c in zip(type_of, condition_of)])
    protein_log_mean = log_mean[:, sources] + protein_offset + cell_extra
    foreground = _softmax_counts(rng, protein_log_mean, mean_protein_library_size, dispersion)
    library = foreground.sum(axis=1, keepdims=True)
    ambient = rng.poisson(background * library / mean_protein_library_size)
    protein_counts = (foreground + ambient).astype(np.float32)
    has_protein = rng.random(rna.n_obs) >= missing_protein_fraction
    protein_counts[~has_protein] = 0

    names = _gene_names(n_proteins, "P")
    protein = ad.AnnData(
        X=sparse.csr_matrix(protein_counts), obs=pd.DataFrame(index=rna.obs_names.copy()),
        var=pd.DataFrame({"source_gene": rna.var_names[sources].to_numpy(), "kind": kinds},
                         index=pd.Index(names, name="protein")),
    )
    protein.uns["simulation"] = {"log_fold_change": protein_lfc, "own_protein_drop": OWN_PROTEIN_DROP}
    modalities = {"rna": rna, "adt": protein}
    if n_peaks:
        modalities["atac"] = _peaks(rng, rna, log_mean, lfc_rna, n_peaks, mean_peak_library_size)
    mdata = md.MuData(modalities)
    mdata.obs["perturbation"] = rna.obs["perturbation"].to_numpy()
    mdata.obs["cell_type"] = rna.obs["cell_type"].to_numpy()
    mdata.obs["has_protein"] = has_protein
    return mdata, embeddings


def _softmax_counts(rng, log_mean: np.ndarray, mean_library: float, dispersion: np.ndarray | None) -> np.ndarray:
    """Counts around ``library * softmax(log_mean)``: negative binomial, or Poisson without a dispersion."""
    proportions = np.exp(log_mean - log_mean.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(mean_library), 0.3, len(log_mean))
    mean = proportions * library[:, None]
    return rng.poisson(mean) if dispersion is None else _negative_binomial(rng, mean, dispersion)


def _peaks(rng, rna: ad.AnnData, log_mean: np.ndarray, lfc_rna: dict, n_peaks: int, mean_library: float):
    """Peak counts linked to genes: log rate = half the gene's log mean plus a peak offset."""
    linked = rng.integers(0, rna.n_vars, n_peaks)
    offset = rng.normal(0, 0.5, n_peaks)
    counts = _softmax_counts(rng, 0.5 * log_mean[:, linked] + offset, mean_library, None)
    names = _gene_names(n_peaks, "peak")
    atac = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)), obs=pd.DataFrame(index=rna.obs_names.copy()),
        var=pd.DataFrame({"linked_gene": rna.var_names[linked].to_numpy()}, index=pd.Index(names, name="peak")),
    )
    atac.uns["simulation"] = {"log_fold_change": {
        t: pd.DataFrame(0.5 * frame.to_numpy()[:, linked], index=frame.index, columns=names)
        for t, frame in lfc_rna.items()
    }}
    return atac
