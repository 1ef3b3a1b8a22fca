"""Expression-derived gene embeddings (Ahlmann-Eltze, Huber & Anders, 2025).

Design
------
The training data's pseudobulk profiles (:func:`perturbscope.data.pseudobulk`, the one group
mean) minus the control profile form a genes x perturbations matrix ``Y``. Each gene's row is
centred, and the gene embedding is that gene's row of the PCA: ``U_K S_K`` of the SVD of the
centred ``Y``. A gene measured in the data gets an embedding whether or not it was ever
perturbed, which is what lets the linear baseline of that paper (and ScopeVI) reach unseen
perturbations of measured genes. Pass only the training perturbations to avoid leaking held-out
profiles into the embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..data import check_control_present, perturbation_shifts
from ..data._checks import check_gene_embeddings
from ..data._checks import preview as _preview
from ..data._shifts import check_obs_keys


def expression_embeddings(
    adata: ad.AnnData,
    perturbation_key: str,
    control_value: str = "control",
    n_components: int = 10,
    layer: str | None = None,
    perturbations: Sequence[str] | None = None,
    context_key: str | None = None,
    delimiter: str = "+",
) -> pd.DataFrame:
    """Gene embeddings from the PCA of pseudobulk perturbation effects (Ahlmann-Eltze et al. 2025).

    Parameters
    ----------
    adata
        Cells with expression on the scale to average (log1p-normalised) in ``X`` or ``layer``.
    perturbation_key
        ``adata.obs`` column with the perturbation labels.
    control_value
        The label of control cells.
    n_components
        Embedding dimensions ``K``; at most the number of perturbation profiles.
    layer
        Layer to average; ``X`` when ``None``.
    perturbations
        The perturbation labels to use (the training set); ``None`` uses every non-control label.
    context_key
        Optional ``adata.obs`` column (e.g. cell type): each perturbation is then compared with the
        control cells of its own context, and every (perturbation, context) pair is a column of
        ``Y``.
    delimiter
        Separator of the genes of a combination (``"A+B"`` and ``"B+A"`` are refused as one
        perturbation written two ways).

    Returns
    -------
    A DataFrame, genes (``adata.var_names``) x ``n_components`` (``expression_0``, ...), with
    ``.attrs`` ``{"source": "expression_pca", "perturbation_key", "n_perturbations",
    "n_components", "layer"}``.

    Raises
    ------
    KeyError
        If a key is not in ``adata.obs`` or a requested perturbation is absent (named).
    ValueError
        If the control is missing (in some context), there are no perturbations, or
        ``n_components`` exceeds the number of profiles or genes.

    Examples
    --------
    >>> from perturbscope.data import simulate_perturbseq
    >>> from perturbscope.data import log1p_normalized
    >>> adata, _ = simulate_perturbseq(n_genes=30, n_perturbed_genes=6, n_combinations=2, seed=0)
    >>> adata.layers["log1p_norm"] = log1p_normalized(adata)
    >>> emb = expression_embeddings(adata, "perturbation", "control", n_components=4,
    ...                             layer="log1p_norm")
    >>> emb.shape
    (30, 4)
    """
    from sklearn.decomposition import PCA

    check_obs_keys(adata.obs, perturbation_key=perturbation_key, context_key=context_key)
    labels = adata.obs[perturbation_key].astype(str)
    check_control_present(labels, perturbation_key, control_value)
    if perturbations is None:
        chosen = [p for p in pd.unique(labels) if p != control_value]
    else:
        chosen = [str(p) for p in perturbations if str(p) != control_value]
        absent = sorted(set(chosen) - set(labels))
        if absent:
            raise KeyError(
                f"perturbations {_preview(absent)} are not in adata.obs[{perturbation_key!r}]."
            )
    if not chosen:
        raise ValueError(
            f"adata.obs[{perturbation_key!r}] has no perturbation besides the control {control_value!r}."
        )
    subset = adata[labels.isin([*chosen, control_value]).to_numpy()]
    effects, _ = perturbation_shifts(subset, perturbation_key, control_value, context_key, layer, delimiter)
    n_profiles, n_genes = effects.shape
    if not isinstance(n_components, int | np.integer) or not 1 <= n_components <= min(
        n_profiles, n_genes
    ):
        raise ValueError(
            f"n_components={n_components!r} must be between 1 and min(perturbation profiles, genes) = "
            f"min({n_profiles}, {n_genes})."
        )
    # PCA of the profiles x genes matrix centres each gene's column (= each row of Y); the
    # components are the genes' loadings, scaled by the singular values: rows of U_K S_K of Y.
    pca = PCA(n_components=int(n_components), svd_solver="full").fit(effects.to_numpy())
    values = pca.components_.T * pca.singular_values_
    df = pd.DataFrame(
        values,
        index=pd.Index(adata.var_names.astype(str), name="gene"),
        columns=[f"expression_{i}" for i in range(values.shape[1])],
    )
    df = check_gene_embeddings(df, name="expression embeddings")
    df.attrs = {
        "source": "expression_pca",
        "perturbation_key": perturbation_key,
        "n_perturbations": int(n_profiles),
        "n_components": int(n_components),
        "layer": layer,
    }
    return df
