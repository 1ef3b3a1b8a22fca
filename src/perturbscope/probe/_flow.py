"""Vector fields and flows of one gene's expression in latent space.

:func:`gradient_field` stores each cell's latent gradient of a gene's log normalised expression
and projects it onto a 2-D embedding the way scVelo projects RNA velocity: a cell's arrow is the
average unit displacement towards its latent neighbours, weighted by how well each displacement
agrees (cosine) with the gradient. The embedding is only used for drawing; the gradient lives in
latent space.

:func:`gradient_flow` turns the field into an in-silico knock-down or over-expression: it walks
each cell's ``z`` along the unit gradient and decodes every step, which gives any scVI model a
perturbation prediction without perturbation labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.utils import track
from sklearn.neighbors import NearestNeighbors

from .._constants import TARGET_SUM
from ._jacobian import (
    _check_cells,
    _check_positive,
    _check_positive_int,
    _check_var_names,
    _eval_mode,
    _gene_indices,
    _iter_jacobian,
    _make_probe,
    _Probe,
)


def gradient_key(gene: str, basis: str | None = None) -> str:
    """The ``obsm`` key of a gene's latent gradient, or of its projection onto ``basis``.

    Parameters
    ----------
    gene
        The gene.
    basis
        The embedding the field was projected onto (``"X_umap"`` or ``"umap"``); ``None`` for
        the latent gradient itself.

    Returns
    -------
    ``f"X_grad_{gene}"``, or ``f"X_grad_{gene}_{name}"`` with ``name`` the basis without
    its ``X_`` prefix.

    Examples
    --------
    >>> gradient_key("ISG15"), gradient_key("ISG15", "X_umap")
    ('X_grad_ISG15', 'X_grad_ISG15_umap')
    """
    key = f"X_grad_{gene}"
    return key if basis is None else f"{key}_{basis.removeprefix('X_')}"


def _check_gene(gene: Any) -> None:
    if not isinstance(gene, str) or not gene:
        raise ValueError(f"gene must be one gene name (a non-empty string), got {gene!r}")


def _latent_gradient(
    probe: _Probe, gene_index: np.ndarray, batch_size: int, progress_bar: bool, z: torch.Tensor | None
) -> torch.Tensor:
    z_all = probe.z if z is None else z
    rows = np.arange(z_all.shape[0])
    grads = torch.empty_like(z_all)
    for part, jac in _iter_jacobian(
        probe, rows, gene_index, "log_scale", batch_size, progress_bar, "gradient", z=z_all
    ):
        grads[part] = jac[:, 0, :]
    return grads


def _project_onto_embedding(
    z: np.ndarray, grad: np.ndarray, embedding: np.ndarray, n_neighbors: int, temperature: float
) -> np.ndarray:
    """scVelo-style projection of latent vectors onto an embedding through latent neighbours."""
    k = min(n_neighbors, z.shape[0] - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    # drop each cell itself, wherever it is listed: with duplicate latent points another cell
    # may come first (where it is not listed at all, the farthest neighbour goes)
    own = idx == np.arange(len(z))[:, None]
    own[~own.any(axis=1), -1] = True
    idx = idx[~own].reshape(len(z), k)
    dz = z[idx] - z[:, None, :]  # (cells, k, latent)
    cos = np.einsum("ckl,cl->ck", dz, grad)
    cos /= np.linalg.norm(dz, axis=2) * np.linalg.norm(grad, axis=1, keepdims=True) + 1e-12
    weights = np.exp((cos - cos.max(axis=1, keepdims=True)) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    de = embedding[idx] - embedding[:, None, :]
    de /= np.linalg.norm(de, axis=2, keepdims=True) + 1e-12
    # subtracting the uniform weight removes the drift that dense neighbourhoods alone cause
    return np.einsum("ck,ckd->cd", weights - 1.0 / k, de)


def gradient_field(
    model: Any,
    adata: ad.AnnData,
    gene: str,
    basis: str = "X_umap",
    n_neighbors: int = 30,
    temperature: float = 0.1,
    transform_batch: str | Sequence[str] | None = None,
    batch_size: int = 256,
    progress_bar: bool = True,
) -> None:
    """Latent gradient of one gene's log expression for every cell, and its projection.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI` or :class:`perturbscope.ScopeVI`.
    adata
        Cells to probe, set up like the model's training data, with ``obsm[basis]``.
    gene
        Gene name (one of the model's ``var_names``).
    basis
        Key of a 2-D embedding in ``adata.obsm`` to project onto.
    n_neighbors
        Latent neighbours used by the projection.
    temperature
        Softness of the projection weights ``exp(cos / temperature)``; smaller is sharper.
    transform_batch
        Batch (or batches to average) the decoder uses; see :func:`decoder_jacobian`.
    batch_size
        Cells per Jacobian chunk.
    progress_bar
        Show a progress bar over chunks (``scvi.settings.progress_bar_style``).

    Returns
    -------
    ``None``. Writes to ``adata`` (scanpy's ``X_`` prefix marks per-cell coordinates):

    - ``obsm[f"X_grad_{gene}"]``: ``(n_cells, n_latent)``, the gradient of
      ``log px_scale[gene]`` with respect to ``z`` at each cell's posterior mean;
    - ``obsm[f"X_grad_{gene}_{name}"]``: ``(n_cells, 2)``, its projection onto ``basis``
      (``name`` is ``basis`` without a leading ``X_``, e.g. ``X_grad_ISG15_umap``). Each
      cell's arrow is ``sum_j (p_ij - 1/k) (e_j - e_i) / |e_j - e_i|`` over its ``k`` latent
      neighbours ``j``, with ``p_ij`` the softmax of ``cos(grad_i, z_j - z_i) / temperature``
      (scVelo's velocity-embedding rule).

    Like scvi-tools' getters, the model registers an ``adata`` it was not trained on (adding
    ``obs["_scvi_batch"]``, ``uns["_scvi_uuid"]``...).

    Raises
    ------
    ValueError
        If ``gene`` is not one gene name decoded by the model; ``basis`` is not in
        ``adata.obsm`` or has fewer than 2 columns; ``adata`` has fewer than 3 cells or
        ``var_names`` other than the model's genes in the model's order; ``n_neighbors`` or
        ``batch_size`` is not a positive integer, or ``temperature <= 0``.

    Examples
    --------
    >>> ps.probe.gradient_field(model, adata, "ISG15", basis="X_umap")  # doctest: +SKIP
    >>> ps.pl.gradient_field(adata, "ISG15")  # doctest: +SKIP
    """
    _check_gene(gene)
    _check_positive_int("n_neighbors", n_neighbors)
    if n_neighbors < 2:  # with one neighbour every arrow is exactly zero (p_ij - 1/k = 0)
        raise ValueError(f"n_neighbors must be at least 2, got {n_neighbors}")
    _check_positive("temperature", temperature)
    _check_positive_int("batch_size", batch_size)
    if basis not in adata.obsm:
        raise ValueError(f"basis {basis!r} is not in adata.obsm; keys are {list(adata.obsm)}")
    embedding = np.asarray(adata.obsm[basis])
    if embedding.ndim != 2 or embedding.shape[1] < 2:
        raise ValueError(
            f"adata.obsm[{basis!r}] must have at least 2 columns, got shape {embedding.shape}"
        )
    embedding = embedding[:, :2].astype(np.float64)
    # two cells have one neighbour each, and every arrow would be exactly zero (p_ij - 1/k = 0)
    _check_cells(adata, 3, " to project onto the embedding through latent neighbours")
    _check_var_names(model, adata)
    probe, adata_checked = _make_probe(model, adata, None, transform_batch, TARGET_SUM, batch_size)
    gene_index = _gene_indices(probe.gene_names, [gene])
    with _eval_mode(model.module):
        grad = _latent_gradient(probe, gene_index, batch_size, progress_bar, None)
    grad_np = grad.cpu().numpy()
    z_np = probe.z.cpu().numpy()
    projected = _project_onto_embedding(
        z_np.astype(np.float64), grad_np.astype(np.float64), embedding, n_neighbors, temperature
    )
    adata.obsm[gradient_key(gene)] = grad_np.astype(np.float32)
    adata.obsm[gradient_key(gene, basis)] = projected.astype(np.float32)


def gradient_flow(
    model: Any,
    adata: ad.AnnData,
    gene: str,
    direction: int = -1,
    step_size: float = 0.1,
    n_steps: int = 10,
    transform_batch: str | Sequence[str] | None = None,
    batch_size: int = 256,
    progress_bar: bool = True,
) -> ad.AnnData:
    """In-silico knock-down or over-expression by walking ``z`` along a gene's gradient.

    At every step each cell moves by ``direction * step_size`` along the unit latent gradient of
    the gene's log normalised expression, and the decoder is read at the new point. No
    perturbation labels are needed, so any scVI model gets a perturbation prediction; the other
    genes' responses are what the decoder has learnt co-varies with the gene.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI` or :class:`perturbscope.ScopeVI`.
    adata
        Starting cells, set up like the model's training data. Like scvi-tools' getters, the model registers an ``adata`` it was not trained on
        (adding ``obs["_scvi_batch"]``, ``uns["_scvi_uuid"]``...); nothing else in it is changed.
    gene
        Gene to knock down or over-express.
    direction
        ``-1`` knock-down, ``+1`` over-expression.
    step_size
        Latent distance per step (the prior has unit variance per dimension).
    n_steps
        Number of steps.
    transform_batch
        Batch (or batches to average) the decoder uses; see :func:`decoder_jacobian`.
    batch_size
        Cells per chunk.
    progress_bar
        Show a progress bar over steps (``scvi.settings.progress_bar_style``).

    Returns
    -------
    A new AnnData with ``adata``'s cells and the model's genes:

    - ``layers[f"step_{t}"]`` for ``t = 0 .. n_steps``: decoded normalised expression (counts per
      10,000) after ``t`` steps; ``X`` is the last step;
    - ``var["probe_flow_log2fc"]``: mean over cells of ``log2(x_last / x_start)``;
    - ``var["probe_flow_delta"]``: mean over cells of ``x_last - x_start`` (per 10,000);
    - ``obsm["probe_flow_latent"]``: each cell's ``z`` after the last step;
    - ``uns["probe_flow"]``: ``gene``, ``direction``, ``step_size``, ``n_steps``.

    Raises
    ------
    ValueError
        If ``direction`` is not ``-1`` or ``+1``; ``step_size`` is not a finite number > 0;
        ``n_steps`` or ``batch_size`` is not a positive integer; ``gene`` is not one gene name
        decoded by the model; or ``adata`` has no cells or ``var_names`` other than the model's
        genes in the model's order.

    Examples
    --------
    >>> flow = ps.probe.gradient_flow(model, adata, "ISG15", direction=-1)  # doctest: +SKIP
    >>> flow.var["probe_flow_log2fc"].sort_values().head()  # doctest: +SKIP
    """
    if direction not in (-1, 1):
        raise ValueError(
            f"direction must be -1 (knock-down) or +1 (over-expression), got {direction!r}"
        )
    _check_positive("step_size", step_size)
    _check_positive_int("n_steps", n_steps)
    _check_gene(gene)
    _check_positive_int("batch_size", batch_size)
    _check_cells(adata)
    _check_var_names(model, adata)
    probe, checked = _make_probe(model, adata, None, transform_batch, TARGET_SUM, batch_size)
    gene_index = _gene_indices(probe.gene_names, [gene])
    rows = np.arange(probe.z.shape[0])

    def decode(z: torch.Tensor) -> np.ndarray:
        out = np.empty((len(rows), len(probe.gene_names)), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                part = slice(start, start + batch_size)
                scale, rate = probe.decode(z[part], rows[part])
                values = scale * TARGET_SUM if scale is not None else rate
                out[part] = values.cpu().numpy()
        return out

    z = probe.z.clone()
    layers = {}
    with _eval_mode(model.module):
        layers["step_0"] = decode(z)
        for step in track(range(1, n_steps + 1), description="gradient flow", disable=not progress_bar):
            grad = _latent_gradient(probe, gene_index, batch_size, False, z)
            unit = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            z = z + direction * step_size * unit
            layers[f"step_{step}"] = decode(z)
    start, last = layers["step_0"], layers[f"step_{n_steps}"]
    with np.errstate(divide="ignore", invalid="ignore"):
        log2fc = np.log2(last.astype(np.float64) / start.astype(np.float64)).mean(axis=0)
    var = pd.DataFrame(
        {"probe_flow_log2fc": log2fc, "probe_flow_delta": (last - start).mean(axis=0)},
        index=pd.Index(probe.gene_names),
    )
    return ad.AnnData(
        X=last.copy(),
        obs=checked.obs.loc[:, ~checked.obs.columns.str.startswith("_scvi")].copy(),
        var=var,
        layers=layers,
        obsm={"probe_flow_latent": z.cpu().numpy()},
        uns={
            "probe_flow": {
                "gene": gene,
                "direction": int(direction),
                "step_size": float(step_size),
                "n_steps": int(n_steps),
            }
        },
    )
