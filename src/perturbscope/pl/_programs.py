"""Heatmap of the perturbation programmes of :meth:`perturbscope.ScopeVI.get_perturbation_programs`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from ..model import PerturbationPrograms
from ._figure import check_show_save, finish, new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def perturbation_programs(
    programs: PerturbationPrograms,
    max_perturbations: int = 40,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Standardised latent shift of each perturbation, active dimensions marked.

    Parameters
    ----------
    programs
        A :class:`~perturbscope.model.PerturbationPrograms`.
    max_perturbations
        Show at most this many perturbations, those with the most active dimensions first.
    ax
        Matplotlib axes; a new figure when ``None``.
    show
        Show the figure; ``None`` shows it in interactive sessions when nothing is saved.
    save
        File to save the figure to (format from the extension).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (the Figure with ``return_fig=True``): perturbations as rows, latent dimensions as
    columns, a diverging colour scale centred at 0 whose colour bar is in standard deviations
    of the control cells' basal states, and a dot on every active dimension.

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
    >>> ax = perturbation_programs(programs, show=False)
    >>> ax.get_xlabel(), ax.images[0].colorbar.ax.get_ylabel()
    ('latent dimension', 'latent shift (sd of control basal states)')
    """
    check_show_save(show, save, return_fig)
    if not isinstance(programs, PerturbationPrograms):
        raise TypeError(
            f"programs must be a PerturbationPrograms (model.get_perturbation_programs()), "
            f"got {type(programs).__name__}."
        )
    order = programs.n_active.sort_values(ascending=False, kind="stable").index[:max_perturbations]
    shift = programs.standardized_shift.loc[order]
    active = programs.active.loc[order]
    ax = new_axes(ax, (0.35 * shift.shape[1] + 3.0, 0.25 * len(order) + 1.8))
    limit = float(np.nanmax(np.abs(shift.to_numpy()))) or 1.0
    image = ax.imshow(shift.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    rows, cols = np.nonzero(active.to_numpy())
    ax.scatter(cols, rows, s=6, c="black", marker="o")
    ax.set_xticks(range(shift.shape[1]), shift.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("perturbation")
    ax.set_title(f"standardised latent shift (dots: active, |shift| >= {programs.threshold:g} sd)",
                 fontsize=8)
    ax.figure.colorbar(image, ax=ax, shrink=0.7, label="latent shift (sd of control basal states)")
    return finish(ax.figure, ax, show, save, return_fig)
