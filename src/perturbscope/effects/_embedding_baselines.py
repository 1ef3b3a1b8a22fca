"""Baselines that map perturbations through gene embeddings: neighbours and the linear model."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..data import check_gene_embeddings
from ._baselines import Baseline


class EmbeddingNeighborsBaseline(Baseline):
    """Predict an unseen gene by a similarity-weighted mean of the training singles' shifts.

    The weights are a softmax over the cosine similarity of the gene embeddings divided by
    ``temperature``. A combination is the sum over its genes (the seen shift of a gene seen
    as a single, else its neighbour prediction). Genes without an embedding are not
    zero-filled: they fall back to the perturbed mean, with a warning, and are listed in the
    prediction's ``uns["perturbscope"]["fallback_to_perturbed_mean"]``.

    Parameters
    ----------
    gene_embeddings
        Genes (index: symbols) x dimensions, e.g. GO-derived embeddings.
    temperature
        Softmax temperature on cosine similarity; small values approach the nearest neighbour.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, emb = simulate_perturbseq(n_genes=30, n_perturbed_genes=4, n_combinations=1,
    ...                                  n_cell_types=1, n_cells_per_condition=5)
    >>> train = adata[adata.obs["perturbation"].isin(["control", "G00", "G01", "G02"])]
    >>> model = EmbeddingNeighborsBaseline(emb, temperature=0.1).fit(train, "perturbation")
    >>> model.predict_shifts(["G03"]).shape
    (1, 30)
    """

    name = "embedding_nn"

    def __init__(self, gene_embeddings: pd.DataFrame, temperature: float = 0.1):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.gene_embeddings = check_gene_embeddings(gene_embeddings, name="gene_embeddings")
        self.temperature = temperature

    def neighbor_weights(self, gene: str) -> pd.Series | None:
        """Softmax weights of the training singles for ``gene`` (``None`` without embedding).

        Parameters
        ----------
        gene
            A gene symbol.

        Returns
        -------
        Weights indexed by training single-gene perturbations, summing to 1.
        """
        self._check_fitted()
        if gene not in self.gene_embeddings.index or not self._reference:
            return None
        reference = self.gene_embeddings.loc[self._reference].to_numpy()
        query = self.gene_embeddings.loc[gene].to_numpy()
        norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(query)
        cosine = reference @ query / np.where(norms > 0, norms, 1.0)
        logits = cosine / self.temperature
        weights = np.exp(logits - logits.max())
        return pd.Series(weights / weights.sum(), index=self._reference)

    def _fit_extra(self, means: pd.DataFrame) -> None:
        singles = sorted(p for p in self.seen_ if len(self._genes(p)) == 1)
        self._reference = [p for p in singles if p in self.gene_embeddings.index]

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        own = self._seen_shift(perturbation, context)
        if own is not None:
            return own
        total = np.zeros(len(self.var_names_))
        for gene in self._genes(perturbation):
            part = self._seen_shift(gene, context)
            if part is None:
                weights = self.neighbor_weights(gene)
                if weights is None:
                    warnings.warn(
                        f"{gene!r} has no gene embedding; {self.name} predicts it by the "
                        "perturbed mean.",
                        stacklevel=3,
                    )
                    self.fallbacks_.add(perturbation)
                    part = self._perturbed_mean(context)
                else:
                    part = sum(w * self._seen_shift(q, context) for q, w in weights.items())
            total += part
        return total


class LinearBaseline(Baseline):
    """Ahlmann-Eltze et al.'s linear model ``Y ~ G W P^T + b`` on pseudobulk shifts.

    ``Y`` (genes x training perturbations) holds the training shifts from control and ``b``
    their row means. ``G`` (genes x ``n_components``) comes from a PCA of the training
    pseudobulk expression with genes as observations. ``P`` (perturbations x dimensions) is the
    row of ``G`` of the perturbed gene (only possible where that gene is measured), or the row
    of ``gene_embeddings`` when given; a combination sums its genes' rows. ``W`` is the ridge
    solution in closed form::

        W = (G^T G + lambda I)^-1 G^T (Y - b) P (P^T P + lambda I)^-1

    A perturbation whose genes have no row in ``P`` gets ``b``, the perturbed mean (with a
    warning and listed as a fallback), not a zero-filled embedding in disguise.

    With contexts, the (perturbation, context) shifts are the columns of ``Y``, pooled: one ``W``
    and one ``b`` for every context, so the prediction is the same in each (as in the paper,
    which has one cell line). A context-specific answer comes from the effect prior's other
    estimators (the observed shift, the transfer), not from this one.

    Parameters
    ----------
    gene_embeddings
        Optional perturbation embeddings (genes x dimensions), e.g. GO-derived.
    n_components
        ``K``, the number of principal components in ``G`` (capped at the number of training
        groups).
    ridge
        ``lambda``, the ridge penalty.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> adata, _ = simulate_perturbseq(n_genes=40, n_perturbed_genes=12, n_combinations=1,
    ...                                n_cell_types=1, n_cells_per_condition=10)
    >>> train = adata[~adata.obs["perturbation"].isin(["G00", "G00+G01"])]
    >>> LinearBaseline().fit(train, "perturbation").predict_shifts(["G00"]).shape
    (1, 40)
    """

    name = "linear"

    def __init__(
        self,
        gene_embeddings: pd.DataFrame | None = None,
        n_components: int = 10,
        ridge: float = 0.1,
    ):
        self.gene_embeddings = (
            None if gene_embeddings is None else check_gene_embeddings(gene_embeddings, name="gene_embeddings")
        )
        if isinstance(n_components, bool) or not isinstance(n_components, int | np.integer) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}.")
        if not np.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}.")
        self.n_components = n_components
        self.ridge = ridge

    def _fit_extra(self, means: pd.DataFrame) -> None:
        from sklearn.decomposition import PCA

        n_components = min(self.n_components, *means.shape)
        self.G_ = PCA(n_components=n_components).fit_transform(means.to_numpy().T)
        table = (
            pd.DataFrame(self.G_, index=self.var_names_)
            if self.gene_embeddings is None
            else self.gene_embeddings
        )
        self._table = table
        rows = [p for p in self.shifts_.index.get_level_values("perturbation")]
        P = [self._embed(p) for p in rows]
        usable = np.array([e is not None for e in P])
        if not usable.any():
            raise ValueError(
                "No training perturbation has an embedding row; the linear baseline cannot be "
                f"fitted (training perturbations: {sorted(self.seen_)[:10]})."
            )
        dropped = sorted({p for p, u in zip(rows, usable) if not u})
        if dropped:
            warnings.warn(
                f"linear baseline: training perturbations without an embedding row are left "
                f"out of the fit: {dropped}.",
                stacklevel=3,
            )
        Y = self.shifts_.to_numpy()[usable].T  # genes x perturbations
        P_train = np.vstack([e for e in P if e is not None])
        self.b_ = Y.mean(axis=1)
        G, lam = self.G_, self.ridge
        left = np.linalg.solve(G.T @ G + lam * np.eye(G.shape[1]), G.T @ (Y - self.b_[:, None]))
        self.W_ = np.linalg.solve(
            (P_train.T @ P_train + lam * np.eye(P_train.shape[1])).T, (left @ P_train).T
        ).T

    def _embed(self, perturbation: str) -> np.ndarray | None:
        """The sum of the genes' embedding rows; ``None`` when any gene has none (no partial sum)."""
        genes = self._genes(perturbation)
        if not genes or any(g not in self._table.index for g in genes):
            return None
        return self._table.loc[list(genes)].to_numpy().sum(axis=0)

    def _shift(self, perturbation: str, context: str) -> np.ndarray:
        embedding = self._embed(perturbation)
        if embedding is None:
            warnings.warn(
                f"{perturbation!r} has no embedding row; the linear baseline predicts the "
                "perturbed mean for it.",
                stacklevel=3,
            )
            self.fallbacks_.add(perturbation)
            return self.b_.copy()
        return self.G_ @ self.W_ @ embedding + self.b_
