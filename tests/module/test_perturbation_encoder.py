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


def _brute_force_ridge(X_all, reference, H, lambdas, target):
    """Refit ridge with an intercept leaving each reference gene out; pick the best penalty."""
    X = X_all[reference]

    def fit(rows, lam):
        x, h = X[rows], H[rows]
        xm, hm = x.mean(0), h.mean(0)
        xc = x - xm
        B = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (h - hm))
        return lambda z: hm + (z - xm) @ B

    def loo_error(lam):
        n = len(reference)
        return sum(float(((fit([r for r in range(n) if r != j], lam)(X[j]) - H[j]) ** 2).sum()) for j in range(n))

    best = min(lambdas, key=loo_error)
    return fit(list(range(len(reference))), best)(X_all[target])


def test_ridge_matches_a_brute_force_leave_one_out_refit():
    torch.manual_seed(1)
    embeddings = torch.randn(12, 6)
    reference = list(range(9))
    encoder = _ridge_encoder(embeddings, reference, n_components=3)
    kernel = PerturbationEncoder(embeddings, n_output=4, reference_genes=torch.tensor(reference), unseen="kernel")
    kernel.load_state_dict(encoder.state_dict())
    seen = torch.tensor([[0, -1], [4, 7]])
    torch.testing.assert_close(encoder(seen), kernel(seen))  # training genes keep their kernel vectors
    with torch.no_grad():
        # the ridge targets are the training genes' own kernel vectors
        projected = encoder.project(embeddings[reference])
        with_null = torch.cat([projected, projected.mean(0, keepdim=True)])
        H = (encoder.kernel_weights(torch.tensor(reference)) @ with_null).double()
        W = encoder.ridge_weights(H.float()).double()
        got = encoder(torch.tensor([[10, -1]]))[0]
    torch.testing.assert_close(W.sum(dim=1), torch.ones(12, dtype=torch.float64), atol=1e-5, rtol=0)
    E = embeddings.double()
    centre = E[reference].mean(0)
    _, _, V = torch.linalg.svd(E[reference] - centre, full_matrices=False)
    X_all = (E - centre) @ V[:3].T
    scale = float((X_all[reference] ** 2).sum() / 9)
    lambdas = [scale * float(x) for x in torch.logspace(-3, 3, 13, dtype=torch.float64)]
    expected = _brute_force_ridge(X_all, reference, H, lambdas, 10)
    torch.testing.assert_close(W[10] @ H, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)


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
