import pytest
import torch

from perturbscope.module import ScopeVAE


def _module(**kwargs):
    torch.manual_seed(0)
    return ScopeVAE(n_input=12, gene_embeddings=torch.randn(5, 3), n_latent=3, n_hidden=8,
                    n_perturbation=4, gene_likelihood="normal", **kwargs)


def _tensors(n=6):
    return {"X": torch.randn(n, 12), "anchor_X": torch.randn(n, 12),
            "perturbation_genes": torch.tensor([[-1.0, -1.0], [0.0, -1.0], [1.0, 2.0]] * (n // 3))}


def test_sparse_shift_is_zero_for_controls_and_penalised():
    module = _module(perturbation_effect="sparse", sparsity_weight=0.5)
    tensors = _tensors()
    inference, generative, loss = module(tensors)
    shift = inference["latent_shift"]
    assert torch.equal(shift[0], torch.zeros(3))
    assert torch.equal(shift[3], torch.zeros(3))
    assert shift[1].abs().sum() > 0
    # the penalty is in the loss: dense part plus 0.5 * mean |shift|_1
    l1 = shift.abs().sum(-1).mean()
    torch.testing.assert_close(loss.extra_metrics["latent_shift_l1"], l1.detach())
    dense_part = torch.mean(loss.reconstruction_loss["reconstruction_loss"] + loss.kl_local["kl_local"])
    torch.testing.assert_close(loss.loss, dense_part + 0.5 * l1)


def test_sparse_decoder_sees_only_z():
    module = _module(perturbation_effect="sparse")
    assert module.decoder.body.fc_layers[0][0].in_features == 3
    dense = _module()
    assert dense.decoder.body.fc_layers[0][0].in_features == 3 + 4


def test_bad_effect_and_weight():
    with pytest.raises(ValueError, match="perturbation_effect must be 'dense' or 'sparse', got 'lasso'"):
        _module(perturbation_effect="lasso")
    with pytest.raises(ValueError, match="sparsity_weight must be >= 0, got -1"):
        _module(perturbation_effect="sparse", sparsity_weight=-1)


@pytest.mark.parametrize("effect", ["dense", "sparse"])
def test_additive_combination_is_sum_of_single_changes_without_interaction(effect):
    module = _module(perturbation_effect=effect).eval()
    anchor = torch.randn(4, 12)
    noise = torch.randn(2, 4, 3)
    change = {}
    for name, genes in {"a": [0, -1], "b": [2, -1], "ab": [0, 2]}.items():
        change[name] = module.predicted_change(anchor, torch.tensor([genes] * 4), noise)[0]
    # the interaction MLP starts at zero: additive composition is the sum of the singles
    torch.testing.assert_close(change["ab"], change["a"] + change["b"])
    joint = module.predicted_change(anchor, torch.tensor([[0, 2]] * 4), noise, combination="joint")[0]
    assert (joint - change["ab"]).abs().max() > 1e-4  # a nonlinear decoder is not additive
    single_joint = module.predicted_change(anchor, torch.tensor([[0, -1]] * 4), noise, combination="joint")[0]
    torch.testing.assert_close(single_joint, change["a"])
    with pytest.raises(ValueError, match="combination must be 'additive' or 'joint', got 'sum'"):
        module.predicted_change(anchor, torch.tensor([[0, 2]] * 4), noise, combination="sum")


def test_additive_combination_adds_the_learned_interaction():
    module = _module().eval()
    with torch.no_grad():
        for p in module.perturbation_encoder.interaction.parameters():
            p.normal_()
    anchor, noise = torch.randn(4, 12), torch.zeros(1, 4, 3)
    change = {name: module.predicted_change(anchor, torch.tensor([genes] * 4), noise)[0]
              for name, genes in {"a": [0, -1], "b": [2, -1], "ab": [0, 2]}.items()}
    h, interaction = module.perturbation_encoder.components(torch.tensor([[0, 2]] * 4))
    with torch.inference_mode():
        library = torch.log(anchor.sum(1, keepdim=True).clamp(min=1.0))
        basal = module.basal_state(anchor)

        def decode(p):
            pz, _ = module.prior_from_basal(basal, p)
            return module.generative(pz.loc + pz.scale * noise, p, library)["px"].mean

    expected = change["a"] + change["b"] + decode(h.sum(1) + interaction) - decode(h.sum(1))
    torch.testing.assert_close(change["ab"], expected)


@pytest.mark.parametrize("anchor_gradient", [False, True])
def test_anchor_gradient_reaches_the_encoder_only_when_asked(anchor_gradient):
    module = _module(anchor_gradient=anchor_gradient)
    perturbation = module.perturbation_encoder(torch.tensor([[0, -1]] * 3))
    module.prior(torch.randn(3, 12), perturbation).loc.sum().backward()
    grad = module.z_encoder.mean_encoder.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == anchor_gradient
