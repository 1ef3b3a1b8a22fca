"""ScopeVAE's decoder pieces: the Gaussian decoder and the one-hot widths of its covariates."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from scvi.nn import FCLayers
from torch import nn
from torch.distributions import Normal


def covariate_widths(n_batch: int, n_cats_per_cov: Iterable[int] | None) -> list[int]:
    """One-hot widths of the decoder covariates: the batch, then each extra categorical covariate.

    ``0`` where a covariate has one category (FCLayers does not one-hot encode it).

    Examples
    --------
    >>> covariate_widths(3, [1, 4])
    [3, 0, 4]
    >>> covariate_widths(1, None)
    [0]
    """
    return [n if n > 1 else 0 for n in (n_batch, *(n_cats_per_cov or ()))]


class NormalDecoder(nn.Module):
    """Gaussian decoder for log-normalised input: an MLP mean and a learned per-gene variance."""

    def __init__(self, n_input: int, n_output: int, n_cat_list: Iterable[int], n_layers: int, n_hidden: int):
        super().__init__()
        self.body = FCLayers(
            n_in=n_input, n_out=n_hidden, n_cat_list=n_cat_list, n_layers=n_layers,
            n_hidden=n_hidden, dropout_rate=0.0, use_batch_norm=False, use_layer_norm=True,
        )
        self.mean = nn.Linear(n_hidden, n_output)
        self.log_scale = nn.Parameter(torch.full((n_output,), -1.0))

    def forward(self, decoder_input: torch.Tensor, *cat_list: torch.Tensor) -> Normal:
        mean = self.mean(self.body(decoder_input, *cat_list))
        return Normal(mean, self.log_scale.exp().clamp(min=1e-3).expand_as(mean))
