"""Score genes by how well their decoder gradients align with an observed latent axis.

Following Bjerregaard, Das, Krogh & Prada-Luengo (Genes 2025): the axis between two groups is
``a = mean z(target) - mean z(reference)`` and a gene's score is the mean, over sampled cells, of
``cos(grad_z y_g(z), a)``. The gradient is that of the log normalised expression; because
``grad log y = grad y / y`` with ``y > 0``, the cosine is the same for ``"scale"``, ``"rate"``
and ``"log_scale"``. Jacobians are reduced chunk by chunk, so the full
``(cells, genes, latent)`` array never exists. The paper's mean-expression baseline
``(m1 - m0) / (0.5 (m1 + m0))`` on library-normalised observed counts is returned beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._constants import TARGET_SUM
from ._decoders import FEATURE_NOUNS, MODALITY_REGISTRY_KEYS, check_modality, registered_location
from ._jacobian import (
    _check_cells,
    _check_positive_int,
    _check_var_names,
    _eval_mode,
    _gene_indices,
    _gene_list,
    _iter_jacobian,
    _make_probe,
)

#: ``adata.var`` column written by :func:`axis_alignment_scores`.
ALIGNMENT_KEY = "probe_alignment"


def _group_mask(adata: ad.AnnData, groupby: str, value: str, name: str) -> np.ndarray:
    mask = (adata.obs[groupby].astype(str) == str(value)).to_numpy()
    if not mask.any():
        values = sorted(adata.obs[groupby].astype(str).unique())
        raise ValueError(
            f"{name} {value!r} is not a value of adata.obs[{groupby!r}]; values are {values}"
        )
    return mask


def _mean_normalised(counts: Any, mask: np.ndarray, measured_only: bool = False) -> np.ndarray:
    """Mean counts per 1e4 of the cells in ``mask``; ``measured_only`` skips all-zero rows.

    A cell without a protein (or ATAC) measurement is an all-zero row (MultiVI's convention):
    it is not a cell with no protein, so it stays out of that modality's means.
    """
    sub = counts.to_numpy() if hasattr(counts, "to_numpy") else counts
    sub = sub[mask]
    sub = sub.tocsr() if sp.issparse(sub) else np.asarray(sub)
    totals = np.asarray(sub.sum(axis=1)).ravel()
    if measured_only:
        sub, totals = sub[totals > 0], totals[totals > 0]
    factors = TARGET_SUM / np.maximum(totals, 1e-12)
    if sp.issparse(sub):
        normalised = sp.diags(factors) @ sub
        return np.asarray(normalised.mean(axis=0)).ravel()
    return (sub * factors[:, None]).mean(axis=0)


def mean_expression_baseline(m_reference: np.ndarray, m_target: np.ndarray) -> np.ndarray:
    """The paper's baseline ``(m1 - m0) / (0.5 (m1 + m0))``; 0 where both means are 0.

    Parameters
    ----------
    m_reference
        Mean normalised expression per gene in the reference group (``m0``).
    m_target
        Mean normalised expression per gene in the target group (``m1``).

    Returns
    -------
    The baseline score per gene, in ``[-2, 2]``.

    Raises
    ------
    ValueError
        If the two arrays differ in shape.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbscope.probe import mean_expression_baseline
    >>> mean_expression_baseline(np.array([1.0, 0.0]), np.array([3.0, 0.0]))
    array([1., 0.])
    """
    m0, m1 = np.asarray(m_reference, float), np.asarray(m_target, float)
    if m0.shape != m1.shape:
        raise ValueError(
            f"m_reference and m_target must have the same shape, got {m0.shape} and {m1.shape}"
        )
    denominator = 0.5 * (m1 + m0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denominator > 0, (m1 - m0) / denominator, 0.0)
    return out


def axis_alignment_scores(
    model: Any,
    adata: ad.AnnData,
    groupby: str,
    reference: str,
    target: str,
    at: Literal["both", "reference", "target"] = "both",
    n_cells: int = 500,
    seed: int = 0,
    genes: Sequence[str] | None = None,
    transform_batch: str | Sequence[str] | None = None,
    batch_size: int = 64,
    progress_bar: bool = True,
    modality: str = "rna",
) -> pd.DataFrame:
    """Score genes by the alignment of their latent gradients with a reference-to-target axis.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI` (Census models included), :class:`scvi.model.TOTALVI`
        or :class:`perturbscope.ScopeVI` (multimodal included).
    adata
        Cells set up like the model's training data (a MuData for ``setup_mudata`` models; its
        global ``obs`` holds ``groupby``). Like scvi-tools' getters, the model registers an ``adata`` it was not trained on
        (adding ``obs["_scvi_batch"]``, ``uns["_scvi_uuid"]``...); nothing else in it is changed.
    groupby
        Column of ``adata.obs`` holding the two groups (e.g. ``"condition"``).
    reference
        Value of ``groupby`` for the start of the axis (e.g. healthy or control).
    target
        Value of ``groupby`` for its end (e.g. disease or stimulated).
    at
        Where the gradients are taken: cells of ``"reference"``, of ``"target"``, or of
        ``"both"`` groups pooled.
    n_cells
        Cells sampled (without replacement) from that pool; all of them if fewer.
    seed
        Seed of the sampling.
    genes
        Genes to score; ``None`` scores all the model decodes.
    transform_batch
        Batch (or batches to average) the decoder uses; see :func:`decoder_jacobian`.
    batch_size
        Cells per Jacobian chunk; memory grows as ``batch_size * n_genes * n_latent``.
    progress_bar
        Show a progress bar over chunks (``scvi.settings.progress_bar_style``).
    modality
        Whose features to score: ``"rna"``, ``"protein"`` (multimodal ScopeVI, TOTALVI) or
        ``"atac"`` (multimodal ScopeVI); the gradients are those of
        :func:`decoder_jacobian` with that ``modality``. The axis is always the latent one.

    Returns
    -------
    A DataFrame indexed by feature (named ``gene``, ``protein`` or ``peak``), sorted by
    decreasing alignment, with columns ``probe_alignment`` (mean cosine, in ``[-1, 1]``),
    ``mean_expression_baseline``, ``mean_reference`` and ``mean_target`` (mean counts per 10,000
    in each group; for protein and ATAC over the cells measured in it, i.e. with any counts).
    Also writes ``var["probe_alignment"]`` (``NaN`` for features not scored) of the AnnData that
    holds the modality's features: ``adata`` itself, or the MuData's modality (e.g.
    ``mdata["adt"].var``); nothing is written for proteins kept in ``adata.obsm`` (TOTALVI on
    an AnnData).

    Raises
    ------
    ValueError
        If ``groupby`` is not in ``adata.obs``, ``reference`` or ``target`` is not one of its
        values or they are equal, ``at`` is unknown, ``n_cells`` or ``batch_size`` is not a
        positive integer, ``genes`` is empty or holds a feature the model does not decode,
        ``modality`` is not one the model decodes, a group has no cell measured in the modality,
        or ``adata`` has no cells or features other than the model's in the model's order.

    Examples
    --------
    >>> table = ps.probe.axis_alignment_scores(
    ...     model, adata, "condition", reference="control", target="stimulated"
    ... )  # doctest: +SKIP
    >>> table.head()  # doctest: +SKIP
    """
    if groupby not in adata.obs:
        raise ValueError(
            f"groupby {groupby!r} is not a column of adata.obs; columns are {list(adata.obs)}"
        )
    if str(reference) == str(target):
        raise ValueError(f"reference and target must differ, both are {reference!r}")
    if at not in ("both", "reference", "target"):
        raise ValueError(f"at must be 'both', 'reference' or 'target', got {at!r}")
    _check_positive_int("n_cells", n_cells)
    _check_positive_int("batch_size", batch_size)
    if genes is not None and len(_gene_list(genes)) == 0:
        raise ValueError("genes is empty; pass at least one gene name, or None for all genes")
    check_modality(model, modality)
    _check_cells(adata)
    _check_var_names(model, adata, modality)
    in_reference = _group_mask(adata, groupby, reference, "reference")
    in_target = _group_mask(adata, groupby, target, "target")

    probe, checked = _make_probe(
        model, adata, None, transform_batch, TARGET_SUM, batch_size, modality
    )
    gene_index = _gene_indices(probe.gene_names, genes, FEATURE_NOUNS[modality])
    z = probe.z
    axis = z[torch.as_tensor(in_target)].mean(0) - z[torch.as_tensor(in_reference)].mean(0)
    axis_unit = axis / axis.norm().clamp_min(1e-12)

    pool = {"both": in_reference | in_target, "reference": in_reference, "target": in_target}[at]
    pool_rows = np.flatnonzero(pool)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(pool_rows, size=min(n_cells, len(pool_rows)), replace=False))

    n_genes = len(probe.gene_names) if gene_index is None else len(gene_index)
    cos_sum = torch.zeros(n_genes, dtype=torch.float64)
    with _eval_mode(model.module):
        for _, jac in _iter_jacobian(
            probe, rows, gene_index, "log_scale", batch_size, progress_bar
        ):
            norms = jac.norm(dim=2).clamp_min(1e-30)
            cos_sum += ((jac @ axis_unit) / norms).sum(0).double().cpu()
    scores = (cos_sum / len(rows)).numpy()

    names = probe.gene_names if gene_index is None else probe.gene_names[gene_index]
    manager = model.get_anndata_manager(checked, required=True)
    counts = manager.get_from_registry(MODALITY_REGISTRY_KEYS[modality])
    measured_only = modality != "rna"
    if measured_only:
        _check_measured(counts, {reference: in_reference, target: in_target}, modality)
    m0 = _mean_normalised(counts, in_reference, measured_only)
    m1 = _mean_normalised(counts, in_target, measured_only)
    if gene_index is not None:
        m0, m1 = m0[gene_index], m1[gene_index]
    table = pd.DataFrame(
        {
            ALIGNMENT_KEY: scores,
            "mean_expression_baseline": mean_expression_baseline(m0, m1),
            "mean_reference": m0,
            "mean_target": m1,
        },
        index=pd.Index(names, name=FEATURE_NOUNS[modality][:-1]),
    )
    holder, _ = registered_location(model, adata, modality)
    if holder is not None:
        column = pd.Series(np.nan, index=holder.var_names, dtype=float)
        column.loc[table.index] = table[ALIGNMENT_KEY].to_numpy()
        holder.var[ALIGNMENT_KEY] = column.to_numpy()
    return table.sort_values(ALIGNMENT_KEY, ascending=False)


def _check_measured(counts: Any, groups: dict[str, np.ndarray], modality: str) -> None:
    values = counts.to_numpy() if hasattr(counts, "to_numpy") else counts
    totals = np.asarray(values.sum(axis=1)).ravel()
    for name, mask in groups.items():
        if not (totals[mask] > 0).any():
            raise ValueError(
                f"no cell of group {name!r} was measured in modality {modality!r} (every one has "
                "zero counts); its mean expression is undefined"
            )
