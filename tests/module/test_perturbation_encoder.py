import torch

from perturbscope.module import PerturbationEncoder


def test_empty_set_is_zero_and_singles_have_no_interaction():
    torch.manual_seed(0)
    encoder = PerturbationEncoder(torch.randn(6, 5), n_output=4)
    out = encoder(torch.tensor([[-1, -1], [2, -1]]))
    assert torch.equal(out[0], torch.zeros(4))
    torch.testing.assert_close(out[1], encoder.gene_vectors(torch.tensor([[2]]))[0, 0])


def test_pairs_are_order_invariant_and_non_additive():
    torch.manual_seed(0)
    encoder = PerturbationEncoder(torch.randn(6, 5), n_output=4)
    with torch.no_grad():
        for p in encoder.interaction.parameters():
            p.normal_()
    ab, ba, a, b = encoder(torch.tensor([[1, 3], [3, 1], [1, -1], [3, -1]]))
    torch.testing.assert_close(ab, ba)
    h = encoder.gene_vectors(torch.tensor([[1, 3]]))[0]
    torch.testing.assert_close(ab - a - b, encoder.interaction(h[0] * h[1]))
    assert (ab - a - b).abs().max() > 1e-4
