import pytest
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


def _ridge_encoder(embeddings, reference, n_components=10):
    torch.manual_seed(0)
    return PerturbationEncoder(embeddings, n_output=4, reference_genes=torch.tensor(reference),
                               unseen="ridge", n_ridge_components=n_components)


def test_ridge_weights_match_closed_form_and_leave_seen_genes_alone():
    torch.manual_seed(1)
    embeddings = torch.randn(12, 6)
    reference = list(range(9))
    encoder = _ridge_encoder(embeddings, reference, n_components=3)
    kernel = PerturbationEncoder(embeddings, n_output=4, reference_genes=torch.tensor(reference))
    kernel.load_state_dict(encoder.state_dict())
    seen = torch.tensor([[0, -1], [4, 7]])
    torch.testing.assert_close(encoder(seen), kernel(seen))  # training genes keep their kernel vectors
    with torch.no_grad():
        H = encoder.project(embeddings[reference]).double()
    W = encoder.ridge_weights(H.float()).double()
    torch.testing.assert_close(W.sum(dim=1), torch.ones(12, dtype=torch.float64), atol=1e-5, rtol=0)
    # hand-computed: principal coordinates of the reference, ridge with the chosen penalty
    E = embeddings.double()
    centre = E[reference].mean(0)
    _, _, V = torch.linalg.svd(E[reference] - centre, full_matrices=False)
    X_all = (E - centre) @ V[:3].T
    X = X_all[reference]
    errors = {}
    for lam in (X**2).sum() / 9 * torch.logspace(-3, 3, 13, dtype=torch.float64):
        A = torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=torch.float64), X.T)
        S = X @ A
        Hc = H - H.mean(0)
        errors[float(lam)] = (float((((Hc - S @ Hc) / (1 - S.diagonal()).unsqueeze(1)) ** 2).sum()), A)
    A = min(errors.values(), key=lambda e: e[0])[1]
    expected = H.mean(0) + X_all[10] @ A @ (H - H.mean(0))
    torch.testing.assert_close((W[10] @ H), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(encoder(torch.tensor([[10, -1]]))[0], expected.float(), atol=1e-4, rtol=1e-4)


def test_ridge_shrinks_to_the_average_when_embeddings_carry_no_signal():
    torch.manual_seed(2)
    embeddings = torch.randn(30, 8)
    encoder = _ridge_encoder(embeddings, list(range(25)))
    vectors = torch.randn(25, 4)  # unrelated to the embeddings
    weights = encoder.ridge_weights(vectors)
    prediction = weights[25:] @ vectors
    assert (prediction - vectors.mean(0)).norm(dim=1).max() < 0.5 * vectors.std(0).norm()
    # and follows them when vectors are a linear function of the embeddings
    linear = embeddings[:25] @ torch.randn(8, 4)
    prediction = encoder.ridge_weights(linear)[25:] @ linear
    truth = embeddings[25:] @ torch.linalg.lstsq(embeddings[:25], linear).solution
    assert torch.corrcoef(torch.stack([prediction.flatten(), truth.flatten()]))[0, 1] > 0.95


def test_unknown_unseen_mode():
    with pytest.raises(ValueError, match="unseen must be 'kernel' or 'ridge', got 'nearest'"):
        PerturbationEncoder(torch.randn(4, 3), reference_genes=torch.tensor([0, 1]), unseen="nearest")
