"""MultimodalScopeVAE: ScopeVAE with surface protein and ATAC decoders over one latent space.

Design
------
* **One latent space.** Each measured modality has an encoder ``q_m(z | x_m, p)``; a cell's
  posterior averages the means and variances of the modalities it has (MultiVI's ``"equal"``
  mixing). A cell without protein (or ATAC) counts, an all-zero row (MultiVI's convention),
  is encoded from what it has and its missing modality's likelihood is masked out of the loss.
* **Anchoring.** The conditional prior is anchored on the control cell's RNA encoding (RNA is
  required, so every anchor has it): prediction for every modality starts from the same
  anchored latent state.
* **Decoders.** RNA as in :class:`~perturbscope.module.ScopeVAE`. Protein: totalVI's
  background/foreground negative-binomial mixture
  (:class:`scvi.distributions.NegativeBinomialMixture`): the background is an ambient profile
  per protein at the cell's protein library size, the foreground that background times
  ``1 + softplus(alpha(z, p))``, mixed by ``pi(z, p)``. ATAC: a Poisson peak likelihood
  (PoissonVI) at the cell's ATAC library size through scvi's ``DecoderSCVI``. The perturbation
  vector enters every decoder (dense effects) or reaches them through ``z`` (sparse).
"""

from __future__ import annotations

import math

import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.distributions import NegativeBinomialMixture
from scvi.module.base import LossOutput, auto_move_data
from scvi.nn import DecoderSCVI, Encoder, FCLayers
from torch import nn
from torch.distributions import Normal, Poisson

from .._constants import TARGET_SUM
from ._scopevae import Combination, DecodedExpression, ScopeVAE

#: Registry keys of the extra modalities: scvi-tools' own (totalVI's proteins, MultiVI's ATAC).
PROTEIN_KEY = SCVI_KEYS.PROTEIN_EXP_KEY
ATAC_KEY = SCVI_KEYS.ATAC_X_KEY
MODALITY_KEYS = (PROTEIN_KEY, ATAC_KEY)


def modality_features(key: str | None) -> str:
    """What a modality's features are called in messages, by its registry key.

    Examples
    --------
    >>> modality_features(SCVI_KEYS.X_KEY), modality_features(PROTEIN_KEY), modality_features(ATAC_KEY)
    ('genes', 'proteins', 'peaks')
    """
    return {SCVI_KEYS.X_KEY: "genes", PROTEIN_KEY: "proteins", ATAC_KEY: "peaks"}.get(key, "features")


class ProteinDecoder(nn.Module):
    """totalVI's protein likelihood: background/foreground negative-binomial mixture.

    Parameters
    ----------
    n_input
        Decoder input width (latent, plus perturbation vector for dense effects).
    n_proteins
        Number of proteins.
    n_cat_list
        Categorical covariates, as for :class:`scvi.nn.FCLayers`.
    n_layers, n_hidden
        Hidden layers and width.
    """

    def __init__(self, n_input: int, n_proteins: int, n_cat_list, n_layers: int, n_hidden: int):
        super().__init__()
        self.body = FCLayers(n_in=n_input, n_out=n_hidden, n_cat_list=n_cat_list, n_layers=n_layers,
                             n_hidden=n_hidden, dropout_rate=0.0, use_batch_norm=False, use_layer_norm=True)
        self.foreground = nn.Linear(n_hidden, n_proteins)
        self.mixing = nn.Linear(n_hidden, n_proteins)
        self.background_logits = nn.Parameter(torch.zeros(n_proteins))
        self.log_theta = nn.Parameter(torch.full((n_proteins,), 2.0))

    def forward(self, decoder_input: torch.Tensor, library: torch.Tensor, *cat_list) -> NegativeBinomialMixture:
        """The mixture at log library ``library``; component 1 is the background."""
        hidden = self.body(decoder_input, *cat_list)
        background = library.exp() * torch.softmax(self.background_logits, dim=-1).expand(*hidden.shape[:-1], -1)
        foreground = background * (1.0 + nn.functional.softplus(self.foreground(hidden)))
        return NegativeBinomialMixture(mu1=background, mu2=foreground, theta1=self.log_theta.exp(),
                                       mixture_logits=self.mixing(hidden))


def mixture_mean(distribution: NegativeBinomialMixture) -> torch.Tensor:
    """Expected counts of a :class:`~scvi.distributions.NegativeBinomialMixture`."""
    weight = torch.sigmoid(distribution.mixture_logits)
    return weight * distribution.mu1 + (1.0 - weight) * distribution.mu2


class MultimodalScopeVAE(ScopeVAE):
    """:class:`ScopeVAE` over RNA plus surface protein and/or ATAC peaks.

    Parameters
    ----------
    n_input
        Number of genes.
    gene_embeddings
        As for :class:`ScopeVAE`.
    n_proteins
        Number of proteins (0: none).
    n_peaks
        Number of peaks (0: none).
    **kwargs
        Passed to :class:`ScopeVAE`.

    Examples
    --------
    >>> module = MultimodalScopeVAE(n_input=20, gene_embeddings=torch.randn(6, 4), n_proteins=5,
    ...                             n_latent=3)
    >>> counts = torch.poisson(torch.full((4, 20), 3.0))
    >>> proteins = torch.poisson(torch.full((4, 5), 20.0))
    >>> proteins[1] = 0  # a cell without protein data
    >>> tensors = {"X": counts, "proteins": proteins, "anchor_X": counts,
    ...            "perturbation_genes": torch.tensor([[-1.0], [0.0], [1.0], [-1.0]])}
    >>> _, _, loss = module(tensors)
    >>> loss.reconstruction_loss["proteins"][1].item()
    0.0
    """

    def __init__(self, n_input: int, gene_embeddings: torch.Tensor, n_proteins: int = 0, n_peaks: int = 0,
                 **kwargs):
        super().__init__(n_input, gene_embeddings, **kwargs)
        if n_proteins < 0 or n_peaks < 0 or n_proteins + n_peaks == 0:
            raise ValueError(f"need n_proteins > 0 or n_peaks > 0, got {n_proteins} and {n_peaks}.")
        self.n_proteins, self.n_peaks = n_proteins, n_peaks
        n_perturbation = self.perturbation_encoder.n_output
        n_layers, n_hidden = kwargs.get("n_layers", 2), kwargs.get("n_hidden", 128)
        decoder_input = self.n_latent + (n_perturbation if self.perturbation_effect == "dense" else 0)
        cat_list = self.covariate_sizes  # the RNA decoder's one-hot widths
        encoder_kwargs = {"n_output": self.n_latent, "n_layers": n_layers, "n_hidden": n_hidden,
                          "dropout_rate": kwargs.get("dropout_rate", 0.1), "return_dist": True}
        self.modality_encoders = nn.ModuleDict()
        if n_proteins:
            self.modality_encoders[PROTEIN_KEY] = Encoder(n_input=n_proteins + n_perturbation, **encoder_kwargs)
            self.protein_decoder = ProteinDecoder(decoder_input, n_proteins, cat_list, n_layers, n_hidden)
        if n_peaks:
            self.modality_encoders[ATAC_KEY] = Encoder(n_input=n_peaks + n_perturbation, **encoder_kwargs)
            self.atac_decoder = DecoderSCVI(decoder_input, n_peaks, n_cat_list=cat_list, n_layers=n_layers,
                                            n_hidden=n_hidden)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Registry keys of the extra modalities this module decodes."""
        return tuple(self.modality_encoders)

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors):
        inputs = super()._get_inference_input(tensors)
        inputs["modalities"] = {key: tensors[key] for key in self.modalities}
        return inputs

    @auto_move_data
    def inference(self, x, perturbation_genes, anchor_x=None, modalities=None, n_samples: int = 1):
        """RNA inference, with the posterior mixed over the modalities each cell has."""
        outputs = super().inference(x, perturbation_genes, anchor_x, n_samples=1)
        qz = outputs["qz"]
        loc, variance, present = qz.loc, qz.scale**2, torch.ones_like(qz.loc[:, :1])
        for key, counts in (modalities or {}).items():
            mask = (counts.sum(dim=1, keepdim=True) > 0).to(loc.dtype)
            q_m = self.modality_encoders[key](torch.cat([torch.log1p(counts), outputs["perturbation"]], dim=-1))[0]
            loc, variance, present = loc + mask * q_m.loc, variance + mask * q_m.scale**2, present + mask
            outputs[f"library_{key}"] = torch.log(counts.sum(dim=1, keepdim=True).clamp(min=1.0))
            outputs[f"mask_{key}"] = mask[:, 0]
        qz = Normal(loc / present, (variance / present).sqrt())
        outputs["qz"] = qz
        outputs["z"] = qz.rsample((n_samples,)) if n_samples > 1 else qz.rsample()
        return outputs

    def _get_generative_input(self, tensors, inference_outputs):
        inputs = super()._get_generative_input(tensors, inference_outputs)
        inputs["modality_libraries"] = {key: inference_outputs[f"library_{key}"] for key in self.modalities
                                        if f"library_{key}" in inference_outputs}
        return inputs

    @auto_move_data
    def generative(self, z, perturbation, library, batch_index=None, cat_covs=None, modality_libraries=None):
        """RNA likelihood plus the protein and ATAC likelihoods at their library sizes."""
        outputs = super().generative(z, perturbation, library, batch_index, cat_covs)
        for key, modality_library in (modality_libraries or {}).items():
            outputs[f"p_{key}"] = self.decode_modality(key, z, perturbation, modality_library, batch_index, cat_covs)
        return outputs

    def decode_modality(self, key: str, z, perturbation, library, batch_index=None, cat_covs=None):
        """The likelihood of modality ``key`` (a registry key) given ``z`` and the perturbation vector."""
        if self.perturbation_effect == "sparse":
            decoder_input = z
        else:
            if z.dim() == 3:
                perturbation = perturbation.expand(z.shape[0], *perturbation.shape)
            decoder_input = torch.cat([z, perturbation], dim=-1)
        covariates = self._covariates(batch_index, cat_covs)
        if key == PROTEIN_KEY:
            return self.protein_decoder(decoder_input, library, *covariates)
        _, _, rate, _ = self.atac_decoder("gene", decoder_input, library, *covariates)
        return Poisson(rate)

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0) -> LossOutput:
        """ScopeVAE's loss plus each extra modality's reconstruction where the cell has it."""
        base = super().loss(tensors, inference_outputs, generative_outputs, kl_weight)
        reconstruction = {"reconstruction_loss": base.reconstruction_loss["reconstruction_loss"]}
        loss = base.loss
        for key in self.modalities:
            if f"p_{key}" not in generative_outputs:
                continue
            log_prob = generative_outputs[f"p_{key}"].log_prob(tensors[key]).sum(dim=-1)
            reconstruction[key] = -log_prob * inference_outputs[f"mask_{key}"]
            loss = loss + reconstruction[key].mean()
        kl = base.kl_local["kl_local"] if isinstance(base.kl_local, dict) else base.kl_local
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl,
                          extra_metrics=base.extra_metrics)

    def decode_modality_expression(
        self,
        key: str,
        z: torch.Tensor,
        perturbation_genes: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ) -> DecodedExpression:
        """Decode latent points into an extra modality's expected profile, differentiably.

        :meth:`ScopeVAE.decode` for protein (``key="proteins"``) or ATAC (``key="atac"``): the
        entry :mod:`perturbscope.probe` differentiates. It runs in the caller's grad mode.

        Parameters
        ----------
        key
            Registry key of the modality, one of :attr:`modalities`.
        z, perturbation_genes, batch_index, cat_covs
            As for :meth:`ScopeVAE.decode`.
        library
            ``(n_cells, 1)`` *log* library sizes of the modality; ``None`` uses ``log(1e4)``.

        Returns
        -------
        ``DecodedExpression(scale, mean, log1p_norm)`` as for :meth:`ScopeVAE.decode`: ``mean`` the expected counts at
        ``library`` (protein: the mean of the background/foreground mixture; ATAC: the Poisson
        rate), ``scale`` that mean normalised to sum to one over features, ``log1p_norm``
        ``log1p(scale * 1e4)`` (the scale of the modality's predictions and effect prior).

        Raises
        ------
        ValueError
            If ``key`` is not a modality of the module, ``z``'s last dimension is not
            ``n_latent``, or another input has a different number of cells.

        Examples
        --------
        >>> module = MultimodalScopeVAE(n_input=20, gene_embeddings=torch.randn(6, 4), n_proteins=5,
        ...                             n_latent=3)
        >>> out = module.decode_modality_expression("proteins", torch.zeros(2, 3), torch.tensor([[0], [-1]]))
        >>> out.mean.shape, bool(torch.allclose(out.scale.sum(-1), torch.ones(2)))
        (torch.Size([2, 5]), True)
        """
        if key not in self.modalities:
            raise ValueError(f"modality {key!r} is not decoded by this module; it decodes {list(self.modalities)}.")
        perturbation = self._checked_perturbation(z, perturbation_genes, batch_index, cat_covs, library)
        return self._decode_modality_expression(key, z, perturbation, library, batch_index, cat_covs)

    def _decode_modality_expression(self, key, z, perturbation, library, batch_index, cat_covs) -> DecodedExpression:
        if library is None:
            library = torch.full((z.shape[-2], 1), math.log(TARGET_SUM), device=z.device, dtype=z.dtype)
        distribution = self.decode_modality(key, z, perturbation, library, batch_index, cat_covs)
        mean = mixture_mean(distribution) if key == PROTEIN_KEY else distribution.mean
        scale = mean / mean.sum(dim=-1, keepdim=True)
        return DecodedExpression(scale, mean, torch.log1p(scale * TARGET_SUM))

    # ------------------------------------------------------------------ prediction
    def _modality_log1p(self, key: str, z, perturbation, batch_index, cat_covs) -> torch.Tensor:
        """log1p of the decoded expected profile normalised to 1e4 counts."""
        return self._decode_modality_expression(key, z, perturbation, None, batch_index, cat_covs).log1p_norm

    @torch.inference_mode()
    def predicted_modality_change(
        self,
        key: str,
        anchor_x: torch.Tensor,
        perturbation_genes: torch.Tensor,
        noise: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        combination: Combination = "additive",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predicted_change` of modality ``key``: ``(change, unperturbed)`` in log1p-normalised space.

        The latent draws come from the anchor's RNA-anchored prior, as for RNA, so every
        modality is predicted from the same anchored cell state.
        """
        if key not in self.modalities:
            raise KeyError(f"modality {key!r} is not decoded by this module; it decodes {list(self.modalities)}.")
        basal = self.basal_state(anchor_x)

        def decode(perturbation: torch.Tensor) -> torch.Tensor:
            pz, _ = self.prior_from_basal(basal, perturbation)
            return self._modality_log1p(key, pz.loc + pz.scale * noise, perturbation, batch_index, cat_covs)

        return self.compose_change(decode, perturbation_genes, combination)
