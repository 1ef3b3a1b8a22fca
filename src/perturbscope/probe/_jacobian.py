"""Decoder Jacobians ``d output / d z`` for every cell, vectorised and chunked.

Which output is differentiated
------------------------------
``modality`` chooses the decoder (``"rna"``, ``"protein"``, ``"atac"``); for each,
``"log_scale"`` (default) is the log of the decoder's normalised expression ``px_scale``; its
gradient is the relative change ``d y / y`` and is what the vector-field, flow and alignment
probes use. ``"scale"`` is ``px_scale`` itself (it sums to one over genes, so when all genes are
included its Jacobian's columns sum to zero over genes). ``"rate"`` is the NB mean at a fixed
library size ``library_size * px_scale``; the library is held constant, so it is not a
function of ``z``.

How it is vectorised
--------------------
In eval mode the decoder treats cells independently, so for a chunk of cells ``Z`` the map
``v -> f(Z + v)`` (one latent shift ``v`` shared by every cell) has Jacobian
``d f_n / d v = d f_n / d z_n``: one :func:`torch.func.jacfwd` call (a ``vmap`` of
``n_latent`` forward-mode products) yields the whole ``(cells, genes, latent)`` block. When
fewer genes than latent dimensions are asked for, :func:`torch.func.jacrev` of the per-gene sum
over cells is cheaper (one reverse pass per gene). Memory is bounded by
``batch_size * n_genes * n_latent`` numbers per chunk.

scvi-tools' public getters run under ``torch.inference_mode``, which forbids differentiation,
so the probes call the decoder themselves, outside inference mode, through the small adapter
:func:`~perturbscope.probe._decoders.decoder_fn`, the only place that knows how a module decodes
each modality: a :class:`~perturbscope.module.ScopeVAE` through its public
:meth:`~perturbscope.module.ScopeVAE.decode` (a multimodal one's protein and ATAC through
``decode_modality_expression``), scVI's ``VAE`` and totalVI's ``TOTALVAE`` through their
``generative``. The
``torch.func`` transforms run under ``no_grad`` (they differentiate with respect to their own
inputs whatever the grad mode), so no graph through the decoder's parameters is recorded and
memory stays that of one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.utils import track
from torch.func import jacfwd, jacrev

from .._constants import TARGET_SUM
from ._census import PLACEHOLDER_ATTR
from ._decoders import (
    FEATURE_NOUNS,
    Decoder,
    check_modality,
    decoder_fn,
    feature_names,
    model_kind,
    registered_location,
)

Output = Literal["log_scale", "scale", "rate"]
OUTPUTS: tuple[str, ...] = ("log_scale", "scale", "rate")

@dataclass
class _Probe:
    """Everything a probe needs for one model and one set of cells."""

    decode: Decoder
    z: torch.Tensor  # (n_cells, n_latent), posterior means unless given
    gene_names: np.ndarray  # the decoder's features (genes, proteins, peaks), in output order
    randomness: str = "error"  # torch.func's vmap mode: "same" where the decoder draws (totalVI)

    @property
    def n_latent(self) -> int:
        return self.z.shape[1]


def _preview(values: Sequence[Any], n: int = 5) -> str:
    shown = [str(v) for v in list(values)[:n]]
    return repr(shown)[:-1] + (", ...]" if len(values) > n else "]")


def _check_var_names(model: Any, adata: Any, modality: str = "rna") -> None:
    """Raise unless ``adata`` has exactly the model's features in the model's order.

    scvi-tools only compares the number of features, so a query with the same count in another
    order would be decoded feature by feature against the wrong columns. RNA is always checked
    (the latent is read from it); another ``modality`` is checked too. For a MuData the
    features are those of the modality the model registered.

    Raises
    ------
    ValueError
        Naming how many model features are missing, how many are extra, or where the order
        first differs, and how to select the model's features.
    """
    for name in dict.fromkeys(("rna", modality)):
        holder, where = registered_location(model, adata, name)
        if holder is not None:
            _check_features(feature_names(model, name), pd.Index(holder.var_names).astype(str),
                            where.removesuffix(".var_names"), FEATURE_NOUNS[name])


def _check_features(expected: pd.Index, got: pd.Index, label: str, noun: str) -> None:
    if got.equals(expected):
        return
    if label == "adata":
        fix = "select them in the model's order with adata[:, model.adata.var_names]"
    else:
        fix = f"select them in the model's order with {label}[:, names], names the model's {noun}"
    where = f"{label}.var_names"
    missing, extra = expected.difference(got, sort=False), got.difference(expected, sort=False)
    if len(missing) or len(extra):
        parts = []
        if len(missing):
            parts.append(f"{len(missing)} of the model's {len(expected)} {noun} are missing from "
                         f"{where} ({_preview(missing)})")
        if len(extra):
            parts.append(f"{len(extra)} of {label}'s {len(got)} {noun} are not the model's "
                         f"({_preview(extra)})")
        hint = (
            f"; the probes need every model {noun[:-1]}: add the missing ones (e.g. as zero counts) "
            "and " if len(missing) else "; "
        )
        raise ValueError(f"{label}'s {noun} are not the model's: {' and '.join(parts)}{hint}{fix}")
    if got.has_duplicates:
        raise ValueError(f"{where} has duplicates ({_preview(got[got.duplicated()])}); {fix}")
    first = int(np.flatnonzero(got.to_numpy() != expected.to_numpy())[0])
    raise ValueError(
        f"{label} has the model's {len(expected)} {noun} in another order (position {first} holds "
        f"{got[first]!r} where the model has {expected[first]!r}); {fix}"
    )


def _check_cells(adata: ad.AnnData, minimum: int = 1, why: str = "") -> None:
    if adata.n_obs < minimum:
        need = "no cells" if minimum == 1 else f"{adata.n_obs} cells; at least {minimum} are needed{why}"
        raise ValueError(f"adata has {need}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _select(
    scale: torch.Tensor | None, rate: torch.Tensor, output: str, genes: torch.Tensor | None
) -> torch.Tensor:
    if output == "rate":
        y = rate
    elif scale is None:
        raise ValueError(
            f"output={output!r} needs a normalised expression (px_scale); this model's likelihood "
            "has none, use output='rate'"
        )
    else:
        y = torch.log(scale) if output == "log_scale" else scale
    return y if genes is None else y.index_select(-1, genes)


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")


def _gene_list(genes: str | Sequence[str]) -> list:
    """``genes`` as a list: one name or a sequence of names, never a number."""
    if isinstance(genes, str):
        return [genes]
    if np.isscalar(genes) or not hasattr(genes, "__iter__"):
        raise ValueError(f"genes must be a gene name or a list of gene names, got {genes!r}")
    return list(genes)


def _gene_indices(
    gene_names: np.ndarray, genes: str | Sequence[str] | None, noun: str = "genes"
) -> np.ndarray | None:
    if genes is None:
        return None
    wanted = _gene_list(genes)
    if not wanted:
        raise ValueError("genes is empty; pass at least one gene name, or None for all genes")
    lookup = {g: i for i, g in enumerate(gene_names)}
    missing = [g for g in wanted if g not in lookup]
    if missing:
        raise ValueError(
            f"genes {missing[:10]!r}{' ...' if len(missing) > 10 else ''} are not decoded by the "
            f"model ({len(gene_names)} {noun}, e.g. {[str(g) for g in gene_names[:5]]})"
        )
    return np.array([lookup[g] for g in wanted], dtype=np.int64)


def _latent(model: Any, adata: ad.AnnData, batch_size: int) -> np.ndarray:
    return np.asarray(model.get_latent_representation(adata, batch_size=batch_size))


def _make_probe(
    model: Any,
    adata: ad.AnnData | None,
    z: np.ndarray | torch.Tensor | None,
    transform_batch: str | Sequence[str] | None,
    library_size: float,
    batch_size: int,
    modality: str = "rna",
) -> tuple[_Probe, ad.AnnData | None]:
    check_modality(model, modality)
    if adata is None and z is None:
        adata = model.adata
        if adata is None:
            raise ValueError("the model holds no AnnData: pass adata or z")
        if getattr(model, PLACEHOLDER_ATTR, False):
            raise ValueError("the model was loaded without cells (its one cell is an all-zero placeholder): "
                             "pass adata or z")
    param = next(model.module.parameters())
    if adata is not None:
        _check_cells(adata)
    if z is None:
        z_array = _latent(model, adata, batch_size)
    else:
        z_array = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
        n_latent = model.module.n_latent
        if z_array.ndim != 2 or z_array.shape[1] != n_latent:
            raise ValueError(
                f"z must have shape (n_cells, n_latent={n_latent}), got {z_array.shape}"
            )
        if z_array.shape[0] == 0:
            raise ValueError("z has no rows; pass at least one latent point")
        if not np.isfinite(z_array).all():
            raise ValueError(f"z has NaN or infinite values in {int((~np.isfinite(z_array)).any(axis=1).sum())} "
                             "rows; every latent point must be finite")
        if adata is not None and adata.n_obs != z_array.shape[0]:
            raise ValueError(
                f"z has {z_array.shape[0]} rows but adata has {adata.n_obs} cells; they must match"
            )
    decode = decoder_fn(model, adata, transform_batch, library_size, modality)
    gene_names = feature_names(model, modality).to_numpy()
    z_tensor = torch.as_tensor(z_array, dtype=param.dtype, device=param.device)
    randomness = "same" if model_kind(model) == "totalvi" else "error"
    return _Probe(decode=decode, z=z_tensor, gene_names=gene_names.astype(str),
                  randomness=randomness), adata


class _eval_mode:
    """Put the module in eval mode (independent cells, no dropout) and restore it after."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)


def _iter_jacobian(
    probe: _Probe,
    rows: np.ndarray,
    genes: np.ndarray | None,
    output: str,
    batch_size: int,
    progress_bar: bool,
    desc: str = "decoder Jacobian",
    z: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(positions in rows, J)`` with ``J`` of shape ``(chunk, genes, latent)``."""
    z_all = probe.z if z is None else z
    gene_tensor = None if genes is None else torch.as_tensor(genes, device=z_all.device)
    n_out = len(probe.gene_names) if genes is None else len(genes)
    use_forward = n_out >= probe.n_latent
    starts = range(0, len(rows), batch_size)
    for start in track(starts, description=desc, disable=not progress_bar or len(starts) < 2):
        part = slice(start, min(start + batch_size, len(rows)))
        chunk_rows = rows[part]
        z_chunk = z_all[torch.as_tensor(chunk_rows, device=z_all.device)].detach()

        def f(zc: torch.Tensor, chunk_rows: np.ndarray = chunk_rows) -> torch.Tensor:
            return _select(*probe.decode(zc, chunk_rows), output, gene_tensor)

        # The torch.func transforms differentiate w.r.t. their inputs in any grad mode; no_grad
        # keeps autograd from also recording a graph through the decoder's parameters, which
        # would hold every intermediate of the chunk alive. inference_mode(False) undoes an
        # enclosing inference_mode, under which no tensor can be differentiated.
        with torch.inference_mode(False), torch.no_grad():
            if use_forward:
                shift = torch.zeros(probe.n_latent, dtype=z_chunk.dtype, device=z_chunk.device)
                jac = jacfwd(lambda v, zc=z_chunk, f=f: f(zc + v), randomness=probe.randomness)(shift)
            else:
                jac = jacrev(lambda zc, f=f: f(zc).sum(0))(z_chunk).permute(1, 0, 2)
        yield part, jac.detach()


def decoder_jacobian(
    model: Any,
    adata: Any = None,
    z: np.ndarray | torch.Tensor | None = None,
    genes: str | Sequence[str] | None = None,
    output: Output = "log_scale",
    transform_batch: str | Sequence[str] | None = None,
    batch_size: int = 64,
    library_size: float = TARGET_SUM,
    progress_bar: bool = True,
    modality: str = "rna",
) -> np.ndarray:
    """Jacobian of the decoder output with respect to the latent variables, per cell.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI` (Census models from :func:`load_census_scvi`
        included), :class:`scvi.model.TOTALVI` or :class:`perturbscope.ScopeVI` (multimodal
        included).
    adata
        Cells to probe, set up like the model's training data (a MuData for models set up with
        ``setup_mudata``). ``None`` uses ``model.adata`` (unless ``z`` is given, in which case
        the decoder's covariates default to the average over all batches). Like scvi-tools' getters, the model registers an ``adata`` it was not trained on
        (adding ``obs["_scvi_batch"]``, ``uns["_scvi_uuid"]``...); nothing else in it is changed.
    z
        Latent points ``(n_cells, n_latent)`` to differentiate at. ``None`` uses the posterior
        means of ``adata``'s cells.
    genes
        Names of the modality's features (genes; proteins or peaks for those modalities) to
        return, in this order; ``None`` returns all.
    output
        ``"log_scale"``: log normalised expression. ``"scale"``: normalised expression
        ``px_scale``; it sums to one over features, so with all of them the Jacobian's columns
        sum to zero. ``"rate"``: expected counts at the fixed ``library_size``.
    transform_batch
        Batch name, or list of names to average decoded expression over; ``None`` uses each
        cell's own batch; for a model from :func:`load_scvi_model` or :func:`load_census_scvi`
        it uses ``model.probe_reference_batches_`` (their ``reference_batch``; by default every
        training batch, averaged) and ignores the cells' registered batch.
    batch_size
        Cells per chunk; peak memory grows as ``batch_size * n_features * n_latent``.
    library_size
        Library size for ``output="rate"`` (of the modality; totalVI's protein decoder has none,
        so it is not used there).
    progress_bar
        Show a progress bar over chunks (``scvi.settings.progress_bar_style``).
    modality
        The decoder to differentiate: ``"rna"`` (every model), ``"protein"`` (a multimodal
        ScopeVI set up with protein, and TOTALVI) or ``"atac"`` (a multimodal ScopeVI set up
        with ATAC). See :mod:`perturbscope.probe._decoders` for what each model's protein output
        is (for TOTALVI: the foreground, with the background at its median).

    Returns
    -------
    Array of shape ``(n_cells, n_features, n_latent)``: ``J[c, g, k] = d output_g / d z_k`` at
    cell ``c``, features in the order of ``genes`` (or the model's registered features of the
    modality, e.g. ``mdata["adt"].var_names``).

    Raises
    ------
    ValueError
        For an unknown ``output``; a ``modality`` the model does not decode (the message lists
        those it does); ``genes`` empty or holding features the model does not decode; ``adata``
        without cells or whose RNA (or the modality's) features are not the model's in the
        model's order; a batch the model does not have or an empty ``transform_batch`` list;
        ``z`` of the wrong shape, without rows or with a row count other than ``adata``'s;
        ``batch_size < 1`` or ``library_size <= 0``.

    Examples
    --------
    >>> import perturbscope as ps
    >>> jac = ps.probe.decoder_jacobian(model, adata, genes=["ISG15", "IFI6"])  # doctest: +SKIP
    >>> jac.shape  # doctest: +SKIP
    (1975, 2, 10)
    >>> ps.probe.decoder_jacobian(model, mdata, modality="protein").shape  # doctest: +SKIP
    (1975, 24, 10)
    """
    _check_output(output)
    _check_positive_int("batch_size", batch_size)
    _check_positive("library_size", library_size)
    check_modality(model, modality)
    if adata is not None:
        _check_var_names(model, adata, modality)
    probe, _ = _make_probe(model, adata, z, transform_batch, library_size, batch_size, modality)
    gene_idx = _gene_indices(probe.gene_names, genes, FEATURE_NOUNS[modality])
    n_genes = len(probe.gene_names) if gene_idx is None else len(gene_idx)
    rows = np.arange(probe.z.shape[0])
    result = np.empty((len(rows), n_genes, probe.n_latent), dtype=np.float64)
    with _eval_mode(model.module):
        for part, jac in _iter_jacobian(probe, rows, gene_idx, output, batch_size, progress_bar):
            result[part] = jac.cpu().numpy()
    return result.astype(probe.z.cpu().numpy().dtype, copy=False)
