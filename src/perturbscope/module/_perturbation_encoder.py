r"""From a set of perturbed genes to one perturbation vector.

Each perturbed gene's embedding (ESM2, GO, ... : a fixed, non-trainable table) is mapped through
``Linear + LayerNorm`` to ``h_g``. A set ``S`` is aggregated as

.. math::

    p(S) = \sum_{g \in S} h_g + f\Big(\sum_{g < g' \in S} h_g \odot h_{g'}\Big),

where ``f`` is a bias-free MLP, so ``f(0) = 0``. The sum makes single perturbations additive
building blocks; the pairwise term is zero for the empty set (controls) and for singles, and
lets combinations be non-additive (synergy, buffering). The pairwise sum is computed in
``O(|S|)`` as ``((sum h)^2 - sum h^2) / 2``.
"""

from __future__ import annotations

import torch
from torch import nn


class PerturbationEncoder(nn.Module):
    """Encode padded gene-index sets into perturbation vectors.

    Parameters
    ----------
    gene_embeddings
        ``(n_embedded_genes, embedding_dim)`` table; stored as a non-persistent buffer because the
        model's registry already carries it.
    n_output
        Dimension of the perturbation vector.
    n_hidden_interaction
        Hidden width of the interaction MLP.

    Examples
    --------
    >>> encoder = PerturbationEncoder(torch.randn(5, 3), n_output=4)
    >>> encoder(torch.tensor([[-1, -1], [2, -1], [2, 4]])).shape
    torch.Size([3, 4])
    """

    def __init__(self, gene_embeddings: torch.Tensor, n_output: int = 64, n_hidden_interaction: int = 64):
        super().__init__()
        self.register_buffer("gene_embeddings", gene_embeddings.float(), persistent=False)
        self.project = nn.Sequential(nn.Linear(gene_embeddings.shape[1], n_output), nn.LayerNorm(n_output))
        self.interaction = nn.Sequential(
            nn.Linear(n_output, n_hidden_interaction, bias=False),
            nn.ReLU(),
            nn.Linear(n_hidden_interaction, n_output, bias=False),
        )
        self.n_output = n_output

    def gene_vectors(self, gene_index: torch.Tensor) -> torch.Tensor:
        """Projected embeddings ``h_g`` of a padded index tensor, zero at padding (``-1``)."""
        gene_index = gene_index.long()
        mask = (gene_index >= 0).unsqueeze(-1)
        h = self.project(self.gene_embeddings[gene_index.clamp(min=0)])
        return h * mask

    def forward(self, gene_index: torch.Tensor) -> torch.Tensor:
        """Perturbation vectors for ``(n_cells, max_genes)`` indices padded with ``-1``."""
        h = self.gene_vectors(gene_index)
        total = h.sum(dim=1)
        pairwise = 0.5 * (total.pow(2) - h.pow(2).sum(dim=1))
        return total + self.interaction(pairwise)
