"""MultimodalScopeVAE: the posterior mixes the modalities a cell has; a missing one costs nothing."""

from __future__ import annotations

import pytest
import torch
from scvi.distributions import NegativeBinomialMixture

from perturbscope.module import MultimodalScopeVAE, ScopeVAE
from perturbscope.module._multimodal import mixture_mean


def _module(**kwargs):
    torch.manual_seed(0)
    return MultimodalScopeVAE(n_input=12, gene_embeddings=torch.randn(5, 4), n_latent=3, n_hidden=8, **kwargs)


def _tensors(n_proteins=6, n_peaks=0):
    torch.manual_seed(1)
    tensors = {"X": torch.poisson(torch.full((4, 12), 4.0)), "anchor_X": torch.poisson(torch.full((4, 12), 4.0)),
               "perturbation_genes": torch.tensor([[-1.0], [0.0], [1.0], [2.0]])}
    if n_proteins:
        tensors["proteins"] = torch.poisson(torch.full((4, n_proteins), 30.0))
        tensors["proteins"][2] = 0
    if n_peaks:
        tensors["atac"] = torch.poisson(torch.full((4, n_peaks), 2.0))
    return tensors


def test_missing_protein_is_masked_and_the_posterior_is_rna_only():
    module = _module(n_proteins=6).eval()
    tensors = _tensors()
    inference, generative, loss = module(tensors)
    assert loss.reconstruction_loss["proteins"][2].item() == 0.0
    assert (loss.reconstruction_loss["proteins"][[0, 1, 3]] > 0).all()
    rna_only = ScopeVAE.inference(module, tensors["X"], tensors["perturbation_genes"], tensors["anchor_X"])["qz"]
    torch.testing.assert_close(inference["qz"].loc[2], rna_only.loc[2])
    torch.testing.assert_close(inference["qz"].scale[2], rna_only.scale[2])
    assert not torch.allclose(inference["qz"].loc[0], rna_only.loc[0])
    # the loss is the RNA loss plus the mean of the (masked) protein terms
    total = loss.reconstruction_loss["proteins"].mean()
    assert loss.loss.item() > total.item()


def test_protein_likelihood_is_totalvi_mixture_with_foreground_above_background():
    module = _module(n_proteins=6).eval()
    _, generative, _ = module(_tensors())
    distribution = generative["p_proteins"]
    assert isinstance(distribution, NegativeBinomialMixture)
    assert (distribution.mu2 >= distribution.mu1).all()
    weight = torch.sigmoid(distribution.mixture_logits)
    torch.testing.assert_close(mixture_mean(distribution), weight * distribution.mu1 + (1 - weight) * distribution.mu2)


def test_atac_is_poisson_at_its_library_size():
    module = _module(n_peaks=7).eval()
    tensors = _tensors(n_proteins=0, n_peaks=7)
    _, generative, loss = module(tensors)
    rate = generative["p_atac"].rate
    torch.testing.assert_close(rate.sum(dim=-1), tensors["atac"].sum(dim=-1).clamp(min=1.0))
    assert set(loss.reconstruction_loss) == {"reconstruction_loss", "atac"}


def test_perturbation_enters_the_protein_decoder():
    module = _module(n_proteins=6).eval()
    anchors = torch.poisson(torch.full((3, 12), 4.0))
    noise = torch.zeros(1, 3, 3)
    change, _ = module.predicted_modality_change("proteins", anchors, torch.tensor([[0]] * 3), noise)
    control, _ = module.predicted_modality_change("proteins", anchors, torch.tensor([[-1]] * 3), noise)
    assert change.shape == (1, 3, 6)
    assert change.abs().max() > 0
    assert control.abs().max() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"^need n_proteins > 0 or n_peaks > 0, got 0 and 0\.$"):
        _module()
    module = _module(n_proteins=6)
    with pytest.raises(KeyError, match=r"modality 'atac' is not decoded by this module; it decodes \['proteins'\]"):
        module.predicted_modality_change("atac", torch.ones(1, 12), torch.tensor([[0]]), torch.zeros(1, 1, 3))
