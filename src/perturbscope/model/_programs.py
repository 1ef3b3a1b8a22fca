"""Perturbation programmes: which latent dimensions and which genes each perturbation moves."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True, eq=False)
class PerturbationPrograms:
    """The programmes a trained :class:`~perturbscope.ScopeVI` assigns to perturbations.

    Returned by :meth:`ScopeVI.get_perturbation_programs`.

    Attributes
    ----------
    latent_shift
        Perturbations x latent dimensions (``z0``, ``z1``, ...): the mean over anchor control
        cells of the prior-mean shift ``E[z | x_c, p] - E[z | x_c, none]``.
    standardized_shift
        ``latent_shift`` divided by each dimension's standard deviation of the anchors' basal
        states, so shifts are in units of the control cells' own spread.
    active
        Booleans, perturbations x latent dimensions: ``|standardized_shift| >= threshold``.
    gene_effects
        Perturbations x genes: the VAE's mean change in log1p-normalised expression (prior
        mean, no sampling noise); with the effect prior, ``predict``'s mean is the prior's shift
        plus only the validated share of it.
    threshold
        The threshold that defined ``active``.

    Examples
    --------
    >>> programs = PerturbationPrograms(
    ...     latent_shift=pd.DataFrame({"z0": [1.0], "z1": [0.0]}, index=["A"]),
    ...     standardized_shift=pd.DataFrame({"z0": [2.0], "z1": [0.0]}, index=["A"]),
    ...     active=pd.DataFrame({"z0": [True], "z1": [False]}, index=["A"]),
    ...     gene_effects=pd.DataFrame({"g1": [0.5], "g2": [-1.0]}, index=["A"]),
    ...     threshold=0.5)
    >>> programs.n_active.tolist(), programs.top_genes("A", 1).index.tolist()
    ([1], ['g2'])
    """

    latent_shift: pd.DataFrame
    standardized_shift: pd.DataFrame
    active: pd.DataFrame
    gene_effects: pd.DataFrame
    threshold: float

    @property
    def n_active(self) -> pd.Series:
        """Number of active latent dimensions of each perturbation."""
        return self.active.sum(axis=1).rename("n_active")

    def active_dimensions(self, perturbation: str) -> list[str]:
        """Latent dimensions a perturbation moves, largest standardised shift first."""
        self._check_perturbation(perturbation)
        shifts = self.standardized_shift.loc[perturbation].abs()
        return shifts[self.active.loc[perturbation]].sort_values(ascending=False).index.tolist()

    def top_genes(self, perturbation: str, n: int = 20) -> pd.Series:
        """The ``n`` genes a perturbation changes most (signed log1p change, by magnitude)."""
        self._check_perturbation(perturbation)
        effects = self.gene_effects.loc[perturbation]
        return effects.loc[effects.abs().sort_values(ascending=False).index[:n]]

    def _check_perturbation(self, perturbation: str) -> None:
        if perturbation not in self.latent_shift.index:
            raise KeyError(
                f"perturbation {perturbation!r} is not in these programmes; they hold "
                f"{self.latent_shift.index.tolist()}."
            )
