"""Tools that write their results into the user's AnnData, the way ``scanpy.tl`` does.

Each function takes the AnnData, writes the keys its docstring lists and returns ``None``; with
``copy=True`` it leaves the input alone and returns a modified copy. Nothing else in the AnnData
changes: models are given a *scratch* AnnData (:func:`_scratch`) that shares the user's matrices
but has its own ``obs``, ``var``, ``uns``, ``obsm`` and ``layers`` containers, so scvi-tools'
registration keys (``obs["_scvi_batch"]``, ``uns["_scvi_uuid"]``...) land there, not in the
user's object. Each write is reported through the ``"perturbscope"`` logger.

=====================================  ==============================================
function                               writes
=====================================  ==============================================
:func:`scopevi_latent`                 ``obsm["X_scopevi"]``
:func:`predict_response`               ``layers[f"scopevi_{perturbation}"]``
:func:`perturbation_effects`           ``uns["perturbation_effects"]``
:func:`call_interactions`              ``uns["genetic_interactions"]``
:func:`decoder_gene_scores`            ``var["probe_alignment"]``,
                                       ``var["probe_alignment_baseline"]``
=====================================  ==============================================

:func:`perturbscope.probe.gradient_field` writes ``obsm[f"X_grad_{gene}"]`` and its projection.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import OUTPUT_KEYS, REGISTRY_KEYS
from .._logging import SCVI_SETUP_LOGGER, logger, quiet_loggers
from ..data import check_log_normalized, is_control, perturbation_shifts
from ..probe import axis_alignment_scores
from ._genetic_interactions import Method, genetic_interactions

#: Default keys written by the tools of this module.
LATENT_KEY = "X_scopevi"
EFFECTS_KEY = "perturbation_effects"
INTERACTIONS_KEY = "genetic_interactions"
SCORES_KEY = "probe_alignment"


def _warn_replacing(adata, attribute: str, key: str) -> None:
    """Warn that a tool replaces an existing entry (scanpy replaces silently; raw counts were lost)."""
    if key in getattr(adata, attribute):
        warnings.warn(f"adata.{attribute}[{key!r}] exists and is replaced; pass key_added= to keep it.",
                      UserWarning, stacklevel=3)


def _scratch(adata: ad.AnnData) -> ad.AnnData:
    """An AnnData over the same matrices whose containers are separate from ``adata``'s."""
    return ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        layers=dict(adata.layers),
    )


def _target(adata: ad.AnnData, copy: bool) -> ad.AnnData:
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    return adata.copy() if copy else adata


def _check_key(name: str, key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name} must be a non-empty string, got {key!r}.")
    return key


def scopevi_latent(
    model: Any,
    adata: ad.AnnData,
    key_added: str = LATENT_KEY,
    batch_size: int | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Store the ScopeVI (or any scvi-tools model's) latent representation in ``obsm``.

    Parameters
    ----------
    model
        A trained :class:`~perturbscope.ScopeVI` (or scvi-tools model with
        ``get_latent_representation``).
    adata
        Cells set up like the model's training data (same genes, in order).
    key_added
        The ``obsm`` key written.
    batch_size
        Cells per forward pass; ``None`` uses ``scvi.settings.batch_size``.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``.

    Notes
    -----
    Writes ``adata.obsm[key_added]`` (default ``"X_scopevi"``): ``(n_cells, n_latent)``, the mean
    of each cell's posterior ``q(z | x, p)``, encoded with its own registered perturbation ``p``
    (a control cell's is its basal state). Use it like ``X_pca``:
    ``sc.pp.neighbors(adata, use_rep="X_scopevi")``.

    Raises
    ------
    ValueError
        If ``adata`` is empty or ``key_added`` is not a non-empty string.

    Examples
    --------
    >>> import perturbscope as ps
    >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=4,
    ...                                          n_combinations=0, n_cells_per_condition=10)
    >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb)
    >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16)
    >>> model.train(max_epochs=1, enable_progress_bar=False)
    >>> cells = adata.copy()
    >>> ps.tl.scopevi_latent(model, cells)
    >>> cells.obsm["X_scopevi"].shape == (cells.n_obs, 4)
    True
    """
    _check_key("key_added", key_added)
    target = _target(adata, copy)
    with quiet_loggers((SCVI_SETUP_LOGGER,)):  # the scratch copy is ours, not the user's
        latent = np.asarray(model.get_latent_representation(_scratch(target), batch_size=batch_size))
    _warn_replacing(target, "obsm", key_added)
    target.obsm[key_added] = latent
    logger.info("added obsm[%r] (%d cells x %d latent dimensions)", key_added, *latent.shape)
    return target if copy else None


def predict_response(
    model: Any,
    adata: ad.AnnData,
    perturbation: str,
    key_added: str | None = None,
    output: Literal["log1p_norm", "X"] = "log1p_norm",
    seed: int | None = None,
    batch_size: int | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Predict each control cell's response to one perturbation and store it as a layer.

    Every control cell of ``adata`` is an anchor of ``model.predict(controls, [perturbation],
    n_samples=1)``; its predicted cell is written in the cell's own row.

    Parameters
    ----------
    model
        A trained :class:`~perturbscope.ScopeVI`.
    adata
        Cells with the model's genes in its order; the perturbation column the model was set up
        with must be in ``obs`` and mark at least one control cell.
    perturbation
        The perturbation label (``"KLF1"``, ``"SET+KLF1"``; genes need only be embedded).
    key_added
        The layer written; ``f"scopevi_{perturbation}"`` when ``None``.
    output
        ``"log1p_norm"``: log1p of expression normalised to 1e4 counts (the prediction's
        ``layers["log1p_norm"]``: the cell's value plus the predicted change, not clamped, so
        it can be negative where the cell measured 0); ``"X"``: the model's training scale
        (clipped at 0 for count likelihoods).
    seed
        Seed of the prior draws (``scvi.settings.seed`` when ``None``).
    batch_size
        Control cells per forward pass.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``.

    Notes
    -----
    Writes ``adata.layers[key_added]``: a dense ``float32`` ``(n_cells, n_genes)`` array holding
    each control cell's predicted expression under ``perturbation``, and ``NaN`` in the rows of
    non-control cells (they are not anchors; nothing is predicted for them).

    Raises
    ------
    TypeError
        If ``perturbation`` is not a string.
    KeyError
        If the model's perturbation column is not in ``adata.obs``.
    ValueError
        If ``adata`` is empty, has no control cells or duplicate ``obs_names``, ``output`` is
        unknown, or for bad labels or genes as in :meth:`~perturbscope.ScopeVI.predict`.

    Examples
    --------
    >>> import numpy as np, perturbscope as ps
    >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=4,
    ...                                          n_combinations=0, n_cells_per_condition=10)
    >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb)
    >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16)
    >>> model.train(max_epochs=1, enable_progress_bar=False)
    >>> cells = adata.copy()
    >>> ps.tl.predict_response(model, cells, "G00")
    >>> response = cells.layers["scopevi_G00"]
    >>> is_control = (cells.obs["perturbation"] == "control").to_numpy()
    >>> bool(np.isfinite(response[is_control]).all()), bool(np.isnan(response[~is_control]).all())
    (True, True)
    """
    if not isinstance(perturbation, str):
        raise TypeError(f"perturbation must be one label (a string), got {perturbation!r}.")
    if output not in ("log1p_norm", "X"):
        raise ValueError(f"output must be 'log1p_norm' or 'X', got {output!r}.")
    key = _check_key("key_added", f"scopevi_{perturbation}" if key_added is None else key_added)
    target = _target(adata, copy)
    state = model.adata_manager.get_state_registry(REGISTRY_KEYS.PERTURBATION_KEY)
    column, control_value = state["perturbation_key"], state["control_value"]
    if column not in target.obs:
        raise KeyError(
            f"adata.obs has no {column!r}, the perturbation column the model was set up with; "
            f"columns are {list(target.obs.columns)}."
        )
    if not target.obs_names.is_unique:
        raise ValueError("adata.obs_names has duplicates; call adata.obs_names_make_unique().")
    controls = is_control(target.obs[column], control_value)
    if not controls.any():
        raise ValueError(
            f"adata has no control cells ({column!r} == {control_value!r}) to anchor predictions."
        )
    anchors = target[controls].copy()  # the model registers this copy, not the user's cells
    with quiet_loggers((SCVI_SETUP_LOGGER,)):
        prediction = model.predict(
            anchors, [perturbation], n_samples=1, seed=seed, batch_size=batch_size
        )
    values = prediction.layers[OUTPUT_KEYS.LOG1P_NORM_LAYER] if output == "log1p_norm" else prediction.X
    values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
    rows = target.obs_names.get_indexer(prediction.obs[OUTPUT_KEYS.CONTROL_CELL].astype(str))
    layer = np.full(target.shape, np.nan, dtype=np.float32)
    layer[rows] = values
    _warn_replacing(target, "layers", key)
    target.layers[key] = layer
    logger.info(
        "added layers[%r] (%s response to %r on %d control cells)",
        key, output, perturbation, int(controls.sum()),
    )
    return target if copy else None


def perturbation_effects(
    adata: ad.AnnData,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    context_key: str | None = None,
    layer: str | None = None,
    key_added: str = EFFECTS_KEY,
    copy: bool = False,
    delimiter: str = "+",
) -> ad.AnnData | None:
    """Store each perturbation's mean shift from its context's controls in ``uns``.

    The shifts are those of :func:`perturbscope.data.perturbation_shifts`, the package's one
    definition of a perturbation's effect.

    Parameters
    ----------
    adata
        Cells, log1p-normalised in ``X`` or ``layer``.
    perturbation_key
        ``obs`` column of perturbation labels.
    control_value
        The control label.
    context_key
        ``obs`` column of contexts (cell type, line); ``None`` for one context.
    layer
        Layer to average; ``X`` when ``None``.
    key_added
        The ``uns`` key written.
    copy
        Return a modified copy instead of writing into ``adata``.
    delimiter
        Separator of the genes of a combination: ``"A+B"`` and ``"B+A"`` are refused as one
        perturbation written two ways.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``.

    Notes
    -----
    Writes ``adata.uns[key_added]`` (default ``"perturbation_effects"``), a dict with

    - ``"shifts"``: a DataFrame, one row per measured perturbation (and context), rows named
      ``"perturbation"`` or ``"perturbation|context"``, genes as columns;
    - ``"control_means"``: a DataFrame, one row per context, genes as columns;
    - ``"params"``: ``perturbation_key``, ``control_value``, ``context_key``, ``layer``.

    Raises
    ------
    KeyError
        If a key is not in ``adata.obs`` or ``layer`` is not in ``adata.layers``.
    ValueError
        If ``adata`` is empty, its values look like raw counts (integers above 30), the control
        label is absent, a perturbation or context label contains ``"|"`` (with ``context_key``),
        or as :func:`perturbscope.data.perturbation_shifts`.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> cells = ad.AnnData(np.array([[1.0, 2], [3, 2], [4, 6]]),
    ...     obs=pd.DataFrame({"perturbation": ["control", "control", "A"]}))
    >>> perturbation_effects(cells)
    >>> cells.uns["perturbation_effects"]["shifts"].to_numpy().tolist()
    [[2.0, 4.0]]
    """
    _check_key("key_added", key_added)
    target = _target(adata, copy)
    if layer is None or layer in target.layers:  # a missing layer: perturbation_shifts names it
        check_log_normalized(target.X if layer is None else target.layers[layer], layer,
                             expects="tl.perturbation_effects averages log1p-normalised expression")
    shifts, controls = perturbation_shifts(target, perturbation_key, control_value, context_key, layer, delimiter)
    if context_key is None:
        names = shifts.index.get_level_values(0).astype(str)
    else:
        with_bar = sorted({str(v) for pair in shifts.index for v in pair if "|" in str(v)})
        if with_bar:
            raise ValueError(f"labels {with_bar[:5]} contain '|', which separates perturbation and context in the "
                             "row names of uns[key_added]['shifts']; rename them.")
        names = [f"{p}|{c}" for p, c in shifts.index]
    shifts = pd.DataFrame(shifts.to_numpy(), index=pd.Index(names, name="perturbation"),
                          columns=shifts.columns.astype(str))
    _warn_replacing(target, "uns", key_added)
    target.uns[key_added] = {
        "shifts": shifts,
        "control_means": controls,
        "params": {"perturbation_key": perturbation_key, "control_value": control_value,
                   "context_key": context_key, "layer": layer},
    }
    logger.info("added uns[%r] (%d perturbation shifts x %d genes)", key_added, *shifts.shape)
    return target if copy else None


def call_interactions(
    adata: ad.AnnData,
    singles: Sequence[str] | None = None,
    doubles: Sequence[str] | None = None,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    delimiter: str = "+",
    layer: str | None = None,
    context_key: str | None = None,
    method: Method = "ols",
    min_mean: float = 0.0,
    key_added: str = INTERACTIONS_KEY,
    copy: bool = False,
    **thresholds: float,
) -> ad.AnnData | None:
    """Fit and call genetic interactions, and store the table in ``uns``.

    The AnnData-writing form of :func:`perturbscope.tl.genetic_interactions`, which returns the
    same table instead.

    Parameters
    ----------
    adata
        Log1p-normalised cells holding controls, singles and doubles.
    singles, doubles, perturbation_key, control_value, delimiter, layer, context_key, method, min_mean
        As in :func:`perturbscope.tl.genetic_interactions`.
    key_added
        The ``uns`` key written.
    copy
        Return a modified copy instead of writing into ``adata``.
    **thresholds
        Overrides of :data:`perturbscope.tl.THRESHOLDS`.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``.

    Notes
    -----
    Writes ``adata.uns[key_added]`` (default ``"genetic_interactions"``), a dict with

    - ``"table"``: the DataFrame of :func:`~perturbscope.tl.genetic_interactions`, one row per
      double (and context) with the coefficients, statistics and ``call``;
    - ``"params"``: ``method``, ``min_mean`` and the ``thresholds`` used.

    Raises
    ------
    KeyError, ValueError
        As :func:`perturbscope.tl.genetic_interactions`; ValueError also for an empty ``adata``.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=40), rng.normal(size=40)
    >>> means = {"control": 0 * a, "A": a, "B": b, "A+B": a + b}
    >>> X = np.vstack([np.tile(m, (3, 1)) for m in means.values()]) + 5
    >>> cells = ad.AnnData(X, obs=pd.DataFrame({"perturbation": np.repeat(list(means), 3)}))
    >>> call_interactions(cells)
    >>> cells.uns["genetic_interactions"]["table"][["double", "call"]].to_numpy().tolist()
    [['A+B', 'additive']]
    """
    _check_key("key_added", key_added)
    target = _target(adata, copy)
    table = genetic_interactions(
        target, singles=singles, doubles=doubles, perturbation_key=perturbation_key,
        control_value=control_value, delimiter=delimiter, layer=layer, context_key=context_key,
        method=method, min_mean=min_mean, **thresholds,
    )
    params = dict(table.attrs)
    table.attrs = {}  # kept under "params": h5ad cannot write DataFrame attrs
    _warn_replacing(target, "uns", key_added)
    target.uns[key_added] = {"table": table, "params": params}
    logger.info("added uns[%r] (%d doubles called)", key_added, len(table))
    return target if copy else None


def decoder_gene_scores(
    model: Any,
    adata: ad.AnnData,
    groupby: str,
    reference: str,
    target: str,
    key_added: str = SCORES_KEY,
    n_cells: int = 500,
    seed: int = 0,
    transform_batch: str | Sequence[str] | None = None,
    batch_size: int = 64,
    progress_bar: bool = True,
    copy: bool = False,
) -> ad.AnnData | None:
    """Score every gene by how its decoder gradient aligns with a reference-to-target axis.

    The scores of :func:`perturbscope.probe.axis_alignment_scores` (Bjerregaard et al. 2025),
    written to ``var`` beside the paper's mean-expression baseline.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI` or :class:`~perturbscope.ScopeVI`.
    adata
        Cells set up like the model's training data, with the model's genes in its order.
    groupby
        ``obs`` column holding the two groups.
    reference, target
        Values of ``groupby`` at the start and end of the axis.
    key_added
        Prefix of the ``var`` columns written.
    n_cells, seed, transform_batch, batch_size
        As in :func:`perturbscope.probe.axis_alignment_scores`.
    progress_bar
        Show a progress bar over Jacobian chunks.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``.

    Notes
    -----
    Writes two ``adata.var`` columns:

    - ``var[key_added]`` (default ``"probe_alignment"``): the mean cosine, in ``[-1, 1]``, of the
      gene's latent gradient with the axis ``mean z(target) - mean z(reference)``;
    - ``var[f"{key_added}_baseline"]``: ``(m1 - m0) / (0.5 (m1 + m0))`` of the mean normalised
      counts of the target (``m1``) and reference (``m0``) groups.

    Raises
    ------
    ValueError
        As :func:`perturbscope.probe.axis_alignment_scores`, and for an empty ``adata``.

    Examples
    --------
    >>> ps.tl.decoder_gene_scores(model, adata, "condition", "control", "stimulated")  # doctest: +SKIP
    >>> adata.var.sort_values("probe_alignment").tail()  # doctest: +SKIP
    """
    _check_key("key_added", key_added)
    result = _target(adata, copy)
    with quiet_loggers((SCVI_SETUP_LOGGER,)):
        table = axis_alignment_scores(
            model, _scratch(result), groupby, reference, target, n_cells=n_cells, seed=seed,
            transform_batch=transform_batch, batch_size=batch_size, progress_bar=progress_bar,
        )
    table = table.reindex(result.var_names.astype(str))
    for column in (key_added, f"{key_added}_baseline"):
        _warn_replacing(result, "var", column)
    result.var[key_added] = table["probe_alignment"].to_numpy()
    result.var[f"{key_added}_baseline"] = table["mean_expression_baseline"].to_numpy()
    logger.info("added var[%r] and var[%r]", key_added, f"{key_added}_baseline")
    return result if copy else None
