"""The effect-prior composition of predicted cells, shared by RNA and the other modalities.

Each predicted cell is ``anchor + s + w (m - s) + g (change - m)`` on the log1p-normalised
scale (see :mod:`perturbscope.model._effect_correction`): ``s`` is the effect prior's shift of
the (perturbation, context), ``m`` the decoder's mean change over the context's anchors, ``w``
the validated correction weight and ``g`` the cell-term weight of the query's kind. Both
the RNA prediction (:mod:`perturbscope.model._prediction`) and, for a MuData model, the other
modalities' (:mod:`perturbscope.model._multimodal`) build their terms and cells here, so the
two compose the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..data import PredictionMeans
from ..effects import EffectPrior


def composition_terms(
    prior: EffectPrior,
    labels: Sequence[str],
    contexts: np.ndarray,
    n_samples: int,
    n_features: int,
    changes: Iterable[tuple[slice, int, np.ndarray]],
    cell_term_weight: Callable[[str], float],
    correction_weights: Mapping[str, float] | None = None,
) -> dict:
    """The per-(perturbation, context) terms of the composition, from one pass of ``changes``.

    Parameters
    ----------
    prior
        The fitted effect prior of the modality.
    labels
        Perturbation labels, in the order of the perturbation index of ``changes``.
    contexts
        Each anchor's context (:data:`perturbscope.data.ALL_CONTEXTS` without a context key).
    n_samples, n_features
        Draws per anchor and features of the modality.
    changes
        ``(cells, perturbation index, change)`` with ``change`` of shape
        ``(n_samples, cells, n_features)``: the decoder's change per anchor.
    cell_term_weight
        ``g`` of a query kind.
    correction_weights
        ``w`` per query kind; ``None`` keeps no mean correction (the other modalities).

    Returns
    -------
    ``{"s", "correction", "m", "g", "sums"}``: float32 arrays indexed ``[perturbation, context]``
    (the contexts in the order of ``sums.contexts``; ``correction`` is ``None`` without
    ``correction_weights``) and the :class:`~perturbscope.data.PredictionMeans` that averaged ``m``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from perturbscope.effects import EffectPrior
    >>> from perturbscope.model._composition import composition_terms
    >>> prior = EffectPrior.__new__(EffectPrior)  # any object with predict_shifts will do
    >>> def predict_shifts(labels, context):
    ...     frame = pd.DataFrame([[1.0, 0.0]], index=labels)
    ...     frame.attrs["kinds"] = ["seen"]
    ...     return frame
    >>> prior.predict_shifts = predict_shifts
    >>> change = np.array([[[3.0, 1.0], [1.0, 1.0]]])  # 1 draw, 2 anchors, 2 genes
    >>> terms = composition_terms(prior, ["A"], np.array(["all", "all"]), 1, 2,
    ...                           [(slice(0, 2), 0, change)], lambda kind: 0.5, {"seen": 0.25})
    >>> terms["m"][0, 0], terms["s"][0, 0], terms["correction"][0, 0]
    (array([2., 1.], dtype=float32), array([1., 0.], dtype=float32), array([0.25, 0.25], dtype=float32))
    """
    sums = PredictionMeans(list(labels), contexts, None, n_samples, n_features, n_layers=1)
    for cells, p, change in changes:
        sums.add(p, cells, change)
    m = sums.means(0).astype(np.float32)
    s = np.zeros(m.shape, dtype=np.float32)  # float32 throughout: a float64 term would double each chunk
    correction = None if correction_weights is None else np.zeros(m.shape, dtype=np.float32)
    g = np.zeros(m.shape[:2], dtype=np.float32)
    for p, label in enumerate(labels):
        for c, context in enumerate(sums.contexts):
            shift = prior.predict_shifts([label], context)
            kind = shift.attrs["kinds"][0]
            s[p, c] = shift.to_numpy()[0]
            if correction is not None:
                correction[p, c] = correction_weights.get(kind, 0.0) * (m[p, c] - s[p, c])
            g[p, c] = cell_term_weight(kind)
    return {"s": s, "correction": correction, "m": m, "g": g, "sums": sums}


def compose_cells(terms: dict, p: int, cells: slice, start: np.ndarray, changes: np.ndarray) -> np.ndarray:
    """log1p-normalised cells of perturbation ``p``: ``anchor + s + correction + g (change - m)``.

    ``start`` holds the anchors ``cells`` (``(cells, features)``), ``changes`` the decoder's
    change per draw (``(n_samples, cells, features)``); returns ``(n_samples, cells, features)``.
    Nothing is clamped, so the mean over a context's anchors is the anchors' mean plus the
    predicted shift.
    """
    k = terms["sums"].context_of(cells)
    composed = start[None] + terms["s"][p, k]
    if terms["correction"] is not None:
        composed = composed + terms["correction"][p, k]
    composed = composed + terms["g"][p, k][:, None] * (changes - terms["m"][p, k])
    return composed.astype(np.float32, copy=False)
