"""ScopeVAE: DeSCOPE's anchored conditional VAE as an scvi-tools module.

Design
------
A perturbed cell ``x`` with perturbation set ``S`` is modelled as

* perturbation vector ``p = PerturbationEncoder(S)`` (empty set -> 0);
* posterior ``q(z | x, p)``;
* **conditional prior** ``p(z | x_c, p) = N(b + shift(b, p), sigma(b, p))``, where ``x_c`` is a
  *control* cell drawn from the same context (cell type / batch) and ``b`` its basal state, the
  posterior mean of ``x_c`` encoded as unperturbed. This is the anchor: at prediction time ``z``
  is drawn from the prior of a real control cell, so each prediction inherits that cell's state,
  including a context never seen in training;
* decoder ``p(x | z, p, covariates)`` with an scVI likelihood (``nb``, ``zinb``, ``poisson`` at
  the observed library size, or ``normal`` for log-normalised input, DeSCOPE's MSE).

With ``perturbation_effect="sparse"`` the latent state is split (PerturbedVAE's split) into the
anchor's basal state ``b``, shared with the control cell, and a perturbation shift
``delta(b, p) = shift(b, p) - shift(b, 0)`` (exactly 0 for controls) with an L1 penalty
``sparsity_weight * |delta|_1``, the MAP form of a Laplace prior: the prior is
``N(b + delta, sigma)``. The decoder sees ``z`` alone, so a perturbation reaches expression only
through the few latent dimensions its shift moves, which are its programme. (A decoder that also
saw ``p`` would let effects bypass the sparse shift.)

The loss is ``-log p(x | z, p) + kl_weight * KL(q || prior)`` (plus the L1 term of the sparse
model); the KL warm-up comes from
scvi-tools' ``TrainingPlan``. Pairs ``(x, x_c)`` are drawn by
:class:`perturbscope.data.AnchoredAnnDataLoader`, which adds ``anchor_X`` to every minibatch and
resamples it on every pass. When no anchor is present (e.g. ``get_latent_representation``,
``get_elbo``) the prior falls back to ``N(0, I)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, NamedTuple

import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import DecoderSCVI, Encoder, FCLayers
from torch import nn
from torch.distributions import Normal, Poisson, kl_divergence

from .._constants import REGISTRY_KEYS, TARGET_SUM
from ._decoder import NormalDecoder, covariate_widths
from ._perturbation_encoder import PerturbationEncoder

GeneLikelihood = Literal["nb", "zinb", "poisson", "normal"]
COUNT_LIKELIHOODS = ("nb", "zinb", "poisson")
PerturbationEffect = Literal["dense", "sparse"]
Combination = Literal["additive", "joint"]


class DecodedExpression(NamedTuple):
    """What :meth:`ScopeVAE.decode` returns; every field has shape ``(..., n_cells, n_genes)``.

    Attributes
    ----------
    scale
        Normalised expression ``px_scale`` (each row sums to one), or ``None`` for the
        ``"normal"`` likelihood, whose decoder has no such quantity.
    mean
        Expression on the input's scale: for count likelihoods the rate ``library * scale``,
        expected counts at the given library size (for ``"zinb"``, of its negative-binomial
        component, before zero inflation); log-normalised values for ``"normal"``.
    log1p_norm
        ``log1p`` of expression normalised to 1e4 counts, ``log1p(scale * 1e4)`` (``mean``
        itself for ``"normal"``).
    """

    scale: torch.Tensor | None
    mean: torch.Tensor
    log1p_norm: torch.Tensor


class ScopeVAE(BaseModuleClass):
    """Anchored conditional VAE over gene-embedding perturbations.

    Parameters
    ----------
    n_input
        Number of genes.
    gene_embeddings
        ``(n_embedded_genes, embedding_dim)`` table that perturbation indices point into.
    n_batch
        Number of batches (decoder covariate); 0 or 1 means none.
    n_cats_per_cov
        Categories of each extra categorical covariate (decoder covariates).
    n_latent
        Latent dimension.
    n_hidden
        Hidden width of encoders and decoder.
    n_layers
        Hidden layers of encoders and decoder.
    n_perturbation
        Dimension of the perturbation vector.
    dropout_rate
        Dropout in the encoders.
    gene_likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"`` (counts) or ``"normal"`` (log-normalised input).
    free_bits
        Per-dimension KL floor (nats); keeps the latent informative. 0 disables it.
    reference_genes
        Rows of ``gene_embeddings`` perturbed in training; given, genes are encoded by the
        similarity kernel over them (see :class:`PerturbationEncoder`), else linearly.
    kernel_temperature
        Temperature of that kernel.
    unseen_genes
        Encoding of genes not perturbed in training under the kernel: ``"kernel"`` or
        ``"ridge"`` (see :class:`PerturbationEncoder`).
    perturbation_effect
        ``"dense"``: the decoder sees ``[z, p]`` and the prior shift is unpenalised.
        ``"sparse"``: the decoder sees ``z`` only and the perturbation's latent shift ``delta``
        carries an L1 penalty (see the module docstring).
    sparsity_weight
        Weight of that L1 penalty, per cell and summed over latent dimensions.
    anchor_gradient
        Back-propagate through the encoding of the anchor. Off by default: the anchor's basal
        state is then a fixed target (as a target network), which costs one forward pass
        instead of a forward and a backward pass.

    Examples
    --------
    >>> module = ScopeVAE(n_input=20, gene_embeddings=torch.randn(6, 4), n_latent=3)
    >>> tensors = {"X": torch.poisson(torch.full((5, 20), 3.0)),
    ...            "perturbation_genes": torch.tensor([[-1.0], [0.0], [1.0], [2.0], [-1.0]]),
    ...            "anchor_X": torch.poisson(torch.full((5, 20), 3.0))}
    >>> _, _, loss = module(tensors)
    >>> loss.loss.ndim
    0
    """

    def __init__(
        self,
        n_input: int,
        gene_embeddings: torch.Tensor,
        n_batch: int = 0,
        n_cats_per_cov: Iterable[int] | None = None,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_perturbation: int = 64,
        dropout_rate: float = 0.1,
        gene_likelihood: GeneLikelihood = "nb",
        free_bits: float = 0.0,
        anchor_gradient: bool = False,
        reference_genes: torch.Tensor | None = None,
        kernel_temperature: float = 0.1,
        unseen_genes: Literal["kernel", "ridge"] = "kernel",
        perturbation_effect: PerturbationEffect = "dense",
        sparsity_weight: float = 0.01,
    ):
        super().__init__()
        if gene_likelihood not in (*COUNT_LIKELIHOODS, "normal"):
            raise ValueError(f"gene_likelihood must be one of {(*COUNT_LIKELIHOODS, 'normal')}, got {gene_likelihood!r}.")
        if perturbation_effect not in ("dense", "sparse"):
            raise ValueError(f"perturbation_effect must be 'dense' or 'sparse', got {perturbation_effect!r}.")
        if sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight}.")
        self.perturbation_effect = perturbation_effect
        self.sparsity_weight = sparsity_weight
        self.n_input = n_input
        self.n_latent = n_latent
        self.n_batch = n_batch
        self.gene_likelihood = gene_likelihood
        self.free_bits = free_bits
        self.perturbation_encoder = PerturbationEncoder(
            gene_embeddings, n_output=n_perturbation, reference_genes=reference_genes,
            temperature=kernel_temperature, unseen=unseen_genes,
        )

        encoder_kwargs = {
            "n_input": n_input + n_perturbation, "n_output": n_latent, "n_layers": n_layers,
            "n_hidden": n_hidden, "dropout_rate": dropout_rate, "return_dist": True,
        }
        self.z_encoder = Encoder(**encoder_kwargs)
        self.anchor_gradient = anchor_gradient
        self.prior_body = FCLayers(
            n_in=n_latent + n_perturbation, n_out=n_hidden, n_layers=n_layers, n_hidden=n_hidden,
            dropout_rate=0.0, use_batch_norm=False, use_layer_norm=True,
        )
        self.prior_shift = nn.Linear(n_hidden, n_latent)
        self.prior_scale = nn.Linear(n_hidden, n_latent)

        cat_list = covariate_widths(n_batch, n_cats_per_cov)
        #: One-hot widths of the decoder covariates (0 = not one-hot encoded), as FCLayers sees them.
        self.covariate_sizes = cat_list
        self._use_batch = n_batch > 1
        decoder_input = n_latent + (n_perturbation if perturbation_effect == "dense" else 0)
        if gene_likelihood == "normal":
            self.decoder = NormalDecoder(decoder_input, n_input, cat_list, n_layers, n_hidden)
        else:
            self.decoder = DecoderSCVI(decoder_input, n_input, n_cat_list=cat_list,
                                       n_layers=n_layers, n_hidden=n_hidden)
            self.px_r = nn.Parameter(torch.randn(n_input))

    # ------------------------------------------------------------------ helpers
    def _encoder_input(self, x: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        expression = torch.log1p(x) if self.gene_likelihood in COUNT_LIKELIHOODS else x
        return torch.cat([expression, perturbation], dim=-1)

    def _covariates(self, batch_index: torch.Tensor | None, cat_covs: torch.Tensor | None) -> list[torch.Tensor]:
        # FCLayers expects one entry per declared covariate; the batch slot is ignored (None)
        # when there is a single batch.
        covariates = [batch_index if self._use_batch else None]
        if cat_covs is not None:
            covariates.extend(torch.split(cat_covs, 1, dim=1))
        return covariates

    def prior(self, anchor_x: torch.Tensor | None, perturbation: torch.Tensor) -> Normal:
        """The conditional prior ``p(z | x_c, p)``, or ``N(0, I)`` without an anchor.

        The anchor is encoded by the posterior encoder as an unperturbed cell; its mean ``b``
        (the basal state) is shifted by a network of ``(b, p)``, so the prior is
        ``N(b + shift(b, p), sigma(b, p))``: effects may depend on the cell's state and context.
        The sparse model's prior is ``N(b + delta(b, p), sigma(b, 0))`` (see
        :meth:`prior_from_basal`).
        """
        if anchor_x is None:
            zeros = torch.zeros(perturbation.shape[0], self.n_latent, device=perturbation.device)
            return Normal(zeros, torch.ones_like(zeros))
        return self.prior_from_basal(self._anchor_basal_state(anchor_x), perturbation)[0]

    def _anchor_basal_state(self, anchor_x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.anchor_gradient and torch.is_grad_enabled()):
            return self.basal_state(anchor_x)

    def prior_from_basal(self, basal: torch.Tensor, perturbation: torch.Tensor) -> tuple[Normal, torch.Tensor]:
        """The conditional prior given the anchor's basal state, and the perturbation's shift.

        Dense: ``N(b + shift(b, p), sigma(b, p))`` and ``shift(b, p)``. Sparse:
        ``N(b + delta, sigma(b, 0))`` and ``delta = shift(b, p) - shift(b, 0)`` (0 for controls).
        """
        hidden = self.prior_body(torch.cat([basal, perturbation], dim=-1))
        shift = self.prior_shift(hidden)
        if self.perturbation_effect == "sparse":
            # the scale comes from the unperturbed state, so that a perturbation can act only
            # through its (penalised) shift, not by widening the prior on other dimensions
            hidden = self.prior_body(torch.cat([basal, torch.zeros_like(perturbation)], dim=-1))
            shift = shift - self.prior_shift(hidden)
        scale = torch.nn.functional.softplus(self.prior_scale(hidden)) + 1e-4
        return Normal(basal + shift, scale), shift

    def decoder_hidden_layers(self) -> nn.Module:
        """The decoder's shared hidden layers (all but its gene-wise output layers)."""
        return self.decoder.body if self.gene_likelihood == "normal" else self.decoder.px_decoder

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {
            "x": tensors[SCVI_KEYS.X_KEY],
            "perturbation_genes": tensors[REGISTRY_KEYS.PERTURBATION_KEY],
            "anchor_x": tensors.get(REGISTRY_KEYS.ANCHOR_X_KEY),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        perturbation_genes: torch.Tensor,
        anchor_x: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor | Normal]:
        """Posterior ``q(z | x, p)``, the conditional prior and the observed log library size."""
        perturbation = self.perturbation_encoder(perturbation_genes)
        qz, z = self.z_encoder(self._encoder_input(x, perturbation))
        if n_samples > 1:
            z = qz.sample((n_samples,))
        library = torch.log(x.sum(dim=1, keepdim=True).clamp(min=1.0))
        if anchor_x is None:
            pz, shift = self.prior(None, perturbation), None
        else:
            pz, shift = self.prior_from_basal(self._anchor_basal_state(anchor_x), perturbation)
        return {"z": z, "qz": qz, "pz": pz, "latent_shift": shift,
                "perturbation": perturbation, "library": library}

    def _get_generative_input(self, tensors, inference_outputs) -> dict[str, torch.Tensor | None]:
        cat_covs = tensors.get(SCVI_KEYS.CAT_COVS_KEY)
        return {
            "z": inference_outputs["z"],
            "perturbation": inference_outputs["perturbation"],
            "library": inference_outputs["library"],
            "batch_index": tensors.get(SCVI_KEYS.BATCH_KEY) if self._use_batch else None,
            "cat_covs": cat_covs,
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        perturbation: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> dict[str, torch.distributions.Distribution]:
        """The likelihood ``p(x | z, p, covariates)``; ``px.mean`` is on the input's scale.

        The sparse model's decoder sees ``z`` only and ignores ``perturbation``.
        """
        if self.perturbation_effect == "sparse":
            decoder_input = z
        else:
            if z.dim() == 3:  # several samples of z share the perturbation and covariates
                perturbation = perturbation.expand(z.shape[0], *perturbation.shape)
            decoder_input = torch.cat([z, perturbation], dim=-1)
        covariates = self._covariates(batch_index, cat_covs)
        if self.gene_likelihood == "normal":
            return {"px": self.decoder(decoder_input, *covariates), "px_scale": None}
        px_scale, _, px_rate, px_dropout = self.decoder("gene", decoder_input, library, *covariates)
        theta = self.px_r.exp()
        if self.gene_likelihood == "nb":
            px = NegativeBinomial(mu=px_rate, theta=theta, scale=px_scale)
        elif self.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(mu=px_rate, theta=theta, zi_logits=px_dropout, scale=px_scale)
        else:
            px = Poisson(px_rate)
        return {"px": px, "px_scale": px_scale}

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0) -> LossOutput:
        """Reconstruction plus ``kl_weight`` times ``KL(q(z | x, p) || p(z | x_c, p))``."""
        x = tensors[SCVI_KEYS.X_KEY]
        reconstruction = -generative_outputs["px"].log_prob(x).sum(dim=-1)
        kl_per_dim = kl_divergence(inference_outputs["qz"], inference_outputs["pz"])
        kl = kl_per_dim.sum(dim=-1)
        kl_for_loss = kl_per_dim.clamp(min=self.free_bits).sum(dim=-1) if self.free_bits > 0 else kl
        loss = torch.mean(reconstruction + kl_weight * kl_for_loss)
        extra = {}
        shift = inference_outputs.get("latent_shift")
        if self.perturbation_effect == "sparse" and shift is not None:
            l1 = shift.abs().sum(dim=-1).mean()
            loss = loss + self.sparsity_weight * l1
            extra["latent_shift_l1"] = l1.detach()
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl, extra_metrics=extra)

    # ------------------------------------------------------------------ prediction
    def basal_state(self, anchor_x: torch.Tensor) -> torch.Tensor:
        """Posterior mean of control cells encoded as unperturbed: the anchor's basal state."""
        zeros = torch.zeros(anchor_x.shape[0], self.perturbation_encoder.n_output, device=anchor_x.device)
        return self.z_encoder(self._encoder_input(anchor_x, zeros))[0].loc

    def decode(
        self,
        z: torch.Tensor,
        perturbation_genes: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ) -> DecodedExpression:
        """Decode latent points into expression, differentiably.

        The public entry to the decoder, for callers that need expression as a function of
        ``z`` (e.g. :mod:`perturbscope.probe`, which differentiates it). Unlike scvi-tools'
        getters it runs in the caller's grad mode and does not move data between devices.

        Parameters
        ----------
        z
            Latent points, ``(n_cells, n_latent)`` or ``(n_samples, n_cells, n_latent)``.
        perturbation_genes
            ``(n_cells, max_genes)`` rows of the gene-embedding table perturbed in each cell,
            ``-1``-padded (the registry's ``perturbation_genes``); ``None`` decodes every cell as
            a control. The sparse model's decoder ignores it (its effects live in ``z``).
        batch_index
            ``(n_cells, 1)`` batch codes; ignored when the model has a single batch.
        cat_covs
            ``(n_cells, n_covariates)`` codes of the extra categorical covariates, if any.
        library
            ``(n_cells, 1)`` *log* library sizes at which ``mean`` is expressed for count
            likelihoods; ``None`` uses ``log(1e4)``, so ``mean`` is counts per 10,000. Ignored by
            the ``"normal"`` likelihood.

        Returns
        -------
        :class:`DecodedExpression` ``(scale, mean, log1p_norm)``.

        Raises
        ------
        ValueError
            If ``z``'s last dimension is not ``n_latent``, or ``perturbation_genes``,
            ``batch_index``, ``cat_covs`` or ``library`` has a different number of cells.

        Examples
        --------
        >>> module = ScopeVAE(n_input=20, gene_embeddings=torch.randn(6, 4), n_latent=3)
        >>> out = module.decode(torch.zeros(5, 3), torch.tensor([[-1], [0], [1], [2], [-1]]))
        >>> out.scale.shape, out.mean.shape
        (torch.Size([5, 20]), torch.Size([5, 20]))
        >>> bool(torch.allclose(out.scale.sum(-1), torch.ones(5)))
        True
        >>> bool(torch.allclose(out.mean, out.scale * 1e4))
        True
        """
        perturbation = self._checked_perturbation(z, perturbation_genes, batch_index, cat_covs, library)
        if library is None:
            library = torch.full((z.shape[-2], 1), math.log(TARGET_SUM), device=z.device, dtype=z.dtype)
        return self._decode(z, perturbation, library, batch_index, cat_covs)

    def _checked_perturbation(self, z, perturbation_genes, batch_index, cat_covs, library) -> torch.Tensor:
        """Check a decoder call's inputs against ``z`` and encode its perturbation vector."""
        if z.dim() not in (2, 3) or z.shape[-1] != self.n_latent:
            raise ValueError(
                f"z must have shape (n_cells, n_latent={self.n_latent}) or (n_samples, n_cells, "
                f"n_latent={self.n_latent}), got {tuple(z.shape)}."
            )
        n_cells = z.shape[-2]
        for name, value in (("perturbation_genes", perturbation_genes), ("batch_index", batch_index),
                            ("cat_covs", cat_covs), ("library", library)):
            if value is not None and value.shape[0] != n_cells:
                raise ValueError(f"{name} has {value.shape[0]} rows but z has {n_cells} cells.")
        if perturbation_genes is None:
            return torch.zeros(n_cells, self.perturbation_encoder.n_output, device=z.device, dtype=z.dtype)
        return self.perturbation_encoder(perturbation_genes.to(z.device)).to(z.dtype)

    def _decode(self, z, perturbation, library, batch_index, cat_covs) -> DecodedExpression:
        """:meth:`decode` from an encoded perturbation vector (``(n_cells, n_perturbation)``)."""
        outputs = self.generative(z, perturbation, library, batch_index, cat_covs)
        if self.gene_likelihood == "normal":
            mean = outputs["px"].mean
            return DecodedExpression(None, mean, mean)
        scale = outputs["px_scale"]
        return DecodedExpression(scale, library.exp() * scale, torch.log1p(scale * TARGET_SUM))

    @torch.inference_mode()
    def predicted_change(
        self,
        anchor_x: torch.Tensor,
        perturbation_genes: torch.Tensor,
        noise: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        combination: Combination = "additive",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Change ``decode(z_p, p) - decode(z_0, 0)`` in log1p-normalised space, and ``decode(z_0, 0)``.

        ``z_p`` and ``z_0`` are the same prior draw (``noise``, shape ``(n_samples, n_cells,
        n_latent)``) under the perturbation and under none. For a combination ``S``,
        ``"additive"`` composes the change from its genes,
        ``sum_g [decode(z_g, h_g) - decode(z_0, 0)] + [decode(z_S, p_S) - decode(z_+, sum_g h_g)]``:
        the sum of single-gene changes plus the change due to the learned interaction term alone
        (0 until combinations are trained on), so an untrained interaction predicts additivity
        in expression space, as Norman et al.'s model does, rather than whatever a nonlinear
        decoder makes of a summed latent input. ``"joint"`` decodes ``p_S`` directly. Singles are
        the same under both.
        """
        basal = self.basal_state(anchor_x)
        library = torch.log(anchor_x.sum(dim=1, keepdim=True).clamp(min=1.0))

        def decode(perturbation: torch.Tensor) -> torch.Tensor:
            pz, _ = self.prior_from_basal(basal, perturbation)
            return self._decode(pz.loc + pz.scale * noise, perturbation, library, batch_index, cat_covs).log1p_norm

        return self.compose_change(decode, perturbation_genes, combination)

    def compose_change(self, decode, perturbation_genes: torch.Tensor, combination: Combination = "additive"):
        """``(change, unperturbed)`` of ``decode`` (perturbation vector -> log1p-normalised output).

        The composition rule of :meth:`predicted_change`, shared by every decoded modality.
        """
        if combination not in ("additive", "joint"):
            raise ValueError(f"combination must be 'additive' or 'joint', got {combination!r}.")
        gene_vectors, interaction = self.perturbation_encoder.components(perturbation_genes)
        summed = gene_vectors.sum(dim=1)
        unperturbed = decode(torch.zeros_like(summed))
        perturbed = decode(summed + interaction)
        is_combination = (perturbation_genes >= 0).sum(dim=1) > 1
        if combination == "joint" or not bool(is_combination.any()):
            return perturbed - unperturbed, unperturbed
        change = perturbed - decode(summed)  # the interaction's own change
        for slot in range(gene_vectors.shape[1]):
            change = change + decode(gene_vectors[:, slot]) - unperturbed
        return change, unperturbed

    @torch.inference_mode()
    def latent_shift(self, anchor_x: torch.Tensor, perturbation_genes: torch.Tensor) -> torch.Tensor:
        """Latent shift of each anchor under a perturbation, relative to none.

        Dense: ``E[z | x_c, p] - E[z | x_c, none]``. Sparse: ``delta(b, p)``, the perturbation part.
        """
        basal = self.basal_state(anchor_x)
        perturbation = self.perturbation_encoder(perturbation_genes)
        shifted = self.prior_from_basal(basal, perturbation)[1]
        return shifted - self.prior_from_basal(basal, torch.zeros_like(perturbation))[1]

    @torch.inference_mode()
    def predict_from_anchor(
        self,
        anchor_x: torch.Tensor,
        perturbation_genes: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
        use_prior_mean: bool = False,
        residual: bool = True,
        generator: torch.Generator | None = None,
        combination: Combination = "additive",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expression of perturbed cells anchored on control cells.

        ``z`` is drawn from the conditional prior of each anchor and decoded under the
        perturbation; the prediction is a starting expression plus the predicted change
        ``decode(z_p, p) - decode(z_0, 0)`` in log1p-normalised space
        (:meth:`predicted_change`), in which the model's errors in placing the anchor are common
        to both terms and cancel.

        With ``residual=True`` the start is the anchor itself, so each prediction keeps its
        anchor's cell state, including a context unlike those seen in training:

        * ``"normal"`` likelihood (log-normalised input): the anchor's *observed* values;
        * count likelihoods: the anchor's *expected* expression, ``decode`` of the mean of its
          unperturbed conditional prior (``b + shift(b, 0)``, ``b`` itself for the sparse model,
          with ``b`` its basal state) at its observed library size. The observed counts are not used as the start because in
          sparse data most of them are 0: adding a change to a zero and clamping at 0 keeps
          every increase and drops every decrease (and the negative half of the sampling
          noise), which biases every prediction upwards, even that of a perturbation with no
          effect. The expected expression is positive wherever the model expects any, so the
          change composes symmetrically; the final clamp at 0 only guards against a decrease
          larger than the whole expected expression.

        With ``residual=False`` the start is ``decode(z_0, 0)``, so a single's prediction is
        ``decode(z_p, p)``.

        Parameters
        ----------
        anchor_x
            ``(n_cells, n_genes)`` control cells on the input's scale (counts or log-normalised).
        perturbation_genes
            ``(n_cells, max_genes)`` perturbed rows of the gene-embedding table, ``-1``-padded.
        batch_index
            ``(n_cells, 1)`` batch codes of the anchors, or ``None``.
        cat_covs
            ``(n_cells, n_covariates)`` categorical covariate codes of the anchors, or ``None``.
        n_samples
            Prior draws of ``z`` per anchor.
        use_prior_mean
            Decode the prior mean instead of draws (all samples are then equal).
        residual
            Start from the anchor (see above) rather than from ``decode(z_0, 0)``.
        generator
            Generator of the prior draws (on the CPU).
        combination
            ``"additive"`` or ``"joint"`` composition of multi-gene perturbations; see
            :meth:`predicted_change`.

        Returns
        -------
        ``(X, log1p_norm)`` of shape ``(n_samples, n_cells, n_genes)``: ``X`` on the input's
        scale (expected counts at the anchor's library size, or log-normalised values) and
        ``log1p_norm`` the log1p of expression normalised to 1e4 counts (``X`` itself for the
        normal likelihood). For count likelihoods both are expected values, so compare their
        pseudobulk with observed data on the linear scale (mean counts or mean normalised
        expression): the mean of log1p of sparse observed counts is lower than the log1p of
        their mean.

        Examples
        --------
        >>> module = ScopeVAE(n_input=20, gene_embeddings=torch.randn(6, 4), n_latent=3).eval()
        >>> anchors = torch.poisson(torch.full((4, 20), 0.5))
        >>> X, log1p_norm = module.predict_from_anchor(anchors, torch.tensor([[1]] * 4), n_samples=2)
        >>> X.shape
        torch.Size([2, 4, 20])
        >>> bool((X >= 0).all())
        True
        """
        shape = (n_samples, anchor_x.shape[0], self.n_latent)
        noise = torch.zeros(shape) if use_prior_mean else torch.randn(shape, generator=generator, device="cpu")
        change, unperturbed = self.predicted_change(
            anchor_x, perturbation_genes, noise.to(anchor_x.device), batch_index, cat_covs, combination
        )
        if self.gene_likelihood == "normal":
            mean = (anchor_x if residual else unperturbed) + change
            return mean, mean
        library = torch.log(anchor_x.sum(dim=1, keepdim=True).clamp(min=1.0))
        if residual:
            no_perturbation = torch.zeros(anchor_x.shape[0], self.perturbation_encoder.n_output,
                                          device=anchor_x.device)
            prior, _ = self.prior_from_basal(self.basal_state(anchor_x), no_perturbation)
            start = self._decode(prior.loc, no_perturbation, library, batch_index, cat_covs).log1p_norm
        else:
            start = unperturbed
        log1p_norm = (start + change).clamp(min=0.0)
        return torch.expm1(log1p_norm) / TARGET_SUM * library.exp(), log1p_norm
