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


# ---------------------------------------------------------------------- decode
def _count_module(likelihood="nb", **kwargs):
    torch.manual_seed(0)
    return ScopeVAE(n_input=12, gene_embeddings=torch.randn(5, 3), n_latent=3, n_hidden=8,
                    n_perturbation=4, gene_likelihood=likelihood, **kwargs).eval()


@pytest.mark.parametrize("effect", ["dense", "sparse"])
def test_decode_matches_generative(effect):
    module = _count_module(perturbation_effect=effect)
    z, genes = torch.randn(4, 3), torch.tensor([[0, -1], [1, 2], [-1, -1], [4, -1]])
    library = torch.log(torch.tensor([[50.0], [100.0], [200.0], [400.0]]))
    out = module.decode(z, genes, library=library)
    reference = module.generative(z, module.perturbation_encoder(genes), library)
    torch.testing.assert_close(out.scale, reference["px_scale"])
    torch.testing.assert_close(out.mean, reference["px"].mu)
    torch.testing.assert_close(out.log1p_norm, torch.log1p(reference["px_scale"] * 1e4))
    # no perturbation is the empty set; the default library is 1e4 counts
    control = module.decode(z)
    torch.testing.assert_close(control.scale, module.decode(z, torch.full((4, 2), -1)).scale)
    torch.testing.assert_close(control.mean, control.scale * 1e4)


def test_decode_is_differentiable_and_handles_samples():
    module = _count_module()
    z = torch.randn(4, 3, requires_grad=True)
    module.decode(z).log1p_norm.sum().backward()
    assert z.grad is not None
    assert z.grad.abs().sum() > 0
    assert module.decode(torch.randn(2, 4, 3), torch.zeros(4, 1, dtype=torch.long)).mean.shape == (2, 4, 12)
    normal = _module().eval().decode(torch.randn(4, 3))
    assert normal.scale is None
    assert normal.mean is normal.log1p_norm


def test_decode_errors():
    module = _count_module()
    with pytest.raises(ValueError, match=r"z must have shape \(n_cells, n_latent=3\) or \(n_samples, n_cells, "
                                         r"n_latent=3\), got \(4, 5\)\."):
        module.decode(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"perturbation_genes has 3 rows but z has 4 cells\."):
        module.decode(torch.randn(4, 3), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"library has 1 rows but z has 4 cells\."):
        module.decode(torch.randn(4, 3), library=torch.zeros(1, 1))


# ------------------------------------------------------------- every likelihood
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson", "normal"])
def test_each_likelihood_trains_and_predicts(likelihood):
    torch.manual_seed(0)
    module = ScopeVAE(n_input=15, gene_embeddings=torch.randn(4, 3), n_latent=3, n_hidden=16,
                      n_perturbation=4, gene_likelihood=likelihood)
    n = 48
    counts = torch.poisson(torch.rand(n, 15) * 3)
    anchors = torch.poisson(torch.rand(n, 15) * 3)
    if likelihood == "normal":
        counts = torch.log1p(counts / counts.sum(1, keepdim=True).clamp(min=1) * 1e4)
        anchors = torch.log1p(anchors / anchors.sum(1, keepdim=True).clamp(min=1) * 1e4)
    genes = torch.tensor([[-1], [0], [1], [2]] * (n // 4))
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):  # epochs
        for start in range(0, n, 16):
            batch = slice(start, start + 16)
            _, _, loss = module({"X": counts[batch], "anchor_X": anchors[batch],
                                 "perturbation_genes": genes[batch]})
            optimiser.zero_grad()
            loss.loss.backward()
            optimiser.step()
            losses.append(float(loss.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    module.eval()
    X, log1p_norm = module.predict_from_anchor(anchors[:8], torch.tensor([[3]] * 8), n_samples=2,
                                               generator=torch.Generator().manual_seed(0))
    assert X.shape == log1p_norm.shape == (2, 8, 15)
    assert torch.isfinite(X).all()
    if likelihood == "normal":
        assert torch.equal(X, log1p_norm)
    else:
        assert (log1p_norm >= 0).all()
        library = anchors[:8].sum(1, keepdim=True)
        torch.testing.assert_close(X, torch.expm1(log1p_norm) / 1e4 * library)


def test_normal_residual_starts_from_the_observed_anchor():
    module = _module().eval()
    anchor, genes = torch.randn(4, 12), torch.tensor([[0, -1]] * 4)
    noise = torch.zeros(1, 4, 3)
    change, _ = module.predicted_change(anchor, genes, noise)
    X, log1p_norm = module.predict_from_anchor(anchor, genes, use_prior_mean=True)
    torch.testing.assert_close(X, anchor + change)
    assert torch.equal(X, log1p_norm)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_count_residual_starts_from_the_anchors_expected_expression(likelihood):
    module = _count_module(likelihood)
    anchor = torch.poisson(torch.full((6, 12), 0.3))  # sparse: most entries are 0
    anchor[:, 0] += 1  # every cell has counts
    noise = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(1))
    genes = torch.tensor([[1, -1]] * 6)
    change, _ = module.predicted_change(anchor, genes, noise)
    library = torch.log(anchor.sum(1, keepdim=True))
    with torch.inference_mode():
        prior, _ = module.prior_from_basal(module.basal_state(anchor), torch.zeros(6, 4))
        start = module.decode(prior.loc, library=library).log1p_norm
    X, log1p_norm = module.predict_from_anchor(anchor, genes, n_samples=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log1p_norm, (start + change).clamp(min=0))
    # the anchor's own (control) prediction is its expected expression, not its sparse counts
    _, control = module.predict_from_anchor(anchor, torch.full((6, 2), -1), use_prior_mean=True)
    torch.testing.assert_close(control[0], start)


def test_sparse_counts_control_like_prediction_has_no_upward_bias():
    """~100 UMI per cell: a perturbation without effect predicts the control pseudobulk.

    This is the VAE-only design (``effect_prior=False``), whose count predictions start from the
    anchor's expected expression; the effect prior's composition is tested in
    tests/model/test_effect_correction.py.
    """
    import numpy as np
    import scvi

    import perturbscope as ps
    from perturbscope.data import simulate_perturbseq

    scvi.settings.seed = 0
    adata, emb = simulate_perturbseq(
        n_genes=60, n_perturbed_genes=4, n_combinations=0, n_cell_types=1, n_cells_per_condition=40,
        n_control_cells=240, effect_size=1e-3, mean_library_size=100.0, seed=0,
    )
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb)
    model = ps.ScopeVI(adata, n_latent=4, n_hidden=32, gene_likelihood="nb", effect_prior=False, free_bits=0.0)
    model.train(max_epochs=150, batch_size=128, enable_progress_bar=False)
    control = adata[adata.obs["perturbation"] == "control"].copy()
    counts = control.X.toarray()
    assert (counts == 0).mean() > 0.4  # sparse
    normalised = counts / counts.sum(1, keepdims=True) * 1e4
    control_pb, se = normalised.mean(0), normalised.std(0) / np.sqrt(len(counts))
    regulator = str(adata.var_names[1])  # knocks down only itself (effect_size ~ 0)
    others = np.asarray(adata.var_names != regulator)
    sampled = model.predict(control, perturbations=[regulator], n_samples=4, seed=0)
    at_mean = model.predict(control, perturbations=[regulator], use_prior_mean=True)
    pb = np.expm1(sampled.layers["log1p_norm"]).mean(0)
    z_scores = ((pb - control_pb) / se)[others]
    log_bias = (np.log1p(pb) - np.log1p(control_pb))[others].mean()
    print(f"mean z {z_scores.mean():.3f}, mean log1p bias {log_bias:.4f}")  # measured 0.32, 0.0003
    assert abs(z_scores.mean()) < 1.0
    assert abs(log_bias) < 0.05
    ratio = sampled.X.mean(0)[others].sum() / counts.mean(0)[others].sum()
    assert 0.95 < ratio < 1.05  # measured 1.02
    # the sampling noise is not cut off on one side: sampling barely moves the mean
    noise_shift = (sampled.layers["log1p_norm"].mean(0) - at_mean.layers["log1p_norm"].mean(0))[others].mean()
    assert abs(noise_shift) < 0.03  # measured 0.01
