"""Heatmap of the perturbation programmes of :meth:`perturbscope.ScopeVI.get_perturbation_programs`."""

from __future__ import annotations

from ..model import PerturbationPrograms


def perturbation_programs(programs, max_perturbations: int = 40, ax=None):
    """Standardised latent shift of each perturbation, active dimensions marked.

    Parameters
    ----------
    programs
        A :class:`~perturbscope.model.PerturbationPrograms`.
    max_perturbations
        Show at most this many perturbations, those with the most active dimensions first.
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes: perturbations as rows, latent dimensions as columns, a diverging colour scale
    centred at 0 and a dot on every active dimension.

    Raises
    ------
    TypeError
        If ``programs`` is not a :class:`~perturbscope.model.PerturbationPrograms`.

    Examples
    --------
    >>> import pandas as pd
    >>> from perturbscope.model import PerturbationPrograms
    >>> shift = pd.DataFrame({"z0": [2.0, 0.0], "z1": [0.1, -1.0]}, index=["A", "B"])
    >>> programs = PerturbationPrograms(shift, shift, shift.abs() >= 0.5, shift, 0.5)
    >>> perturbation_programs(programs).get_xlabel()
    'latent dimension'
    """
    import matplotlib.pyplot as plt
    import numpy as np


    if not isinstance(programs, PerturbationPrograms):
        raise TypeError(
            f"programs must be a PerturbationPrograms (model.get_perturbation_programs()), "
            f"got {type(programs).__name__}."
        )
    order = programs.n_active.sort_values(ascending=False, kind="stable").index[:max_perturbations]
    shift = programs.standardized_shift.loc[order]
    active = programs.active.loc[order]
    if ax is None:
        _, ax = plt.subplots(figsize=(0.35 * shift.shape[1] + 2.5, 0.25 * len(order) + 1.5))
    limit = float(np.nanmax(np.abs(shift.to_numpy()))) or 1.0
    image = ax.imshow(shift.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    rows, cols = np.nonzero(active.to_numpy())
    ax.scatter(cols, rows, s=6, c="black", marker="o")
    ax.set_xticks(range(shift.shape[1]), shift.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.set_xlabel("latent dimension")
    ax.set_title(f"standardised latent shift (dots: |shift| >= {programs.threshold:g} sd)", fontsize=8)
    ax.figure.colorbar(image, ax=ax, shrink=0.7)
    return ax
