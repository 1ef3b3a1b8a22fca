import warnings

import numpy as np
import pytest
import scvi
import torch

import perturbscope as ps
from perturbscope.model import ScopeTrainingPlan


def _train(adata, embeddings, **plan_kwargs):
    """Two epochs of a dropout-free ScopeVI with the plan; the per-epoch ELBO and the plan."""
    scvi.settings.seed = 0
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings, context_key="cell_type")
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=8, effect_prior=False, dropout_rate=0.0)
    model._training_plan_cls = ScopeTrainingPlan
    model.train(max_epochs=2, batch_size=256, train_size=1.0, accelerator="cpu", enable_progress_bar=False,
                plan_kwargs=plan_kwargs)
    return model.history["elbo_train"].to_numpy(dtype=float).ravel(), model


@pytest.fixture
def screen(small_screen):
    adata, embeddings = small_screen
    return adata.copy(), embeddings


def test_default_and_auto_stay_eager_on_cpu(screen):
    _, model = _train(*screen, compile="auto")
    plan = ScopeTrainingPlan(model.module, compile="auto")
    plan._compile(torch.device("cpu"))
    assert plan._compiled_forward is None
    assert ScopeTrainingPlan(model.module).compile_forward is False


def test_compiled_forward_trains_like_the_eager_module(screen):
    adata, embeddings = screen
    eager, _ = _train(adata.copy(), embeddings, compile=False)
    compiled, model = _train(adata.copy(), embeddings, compile=True, compile_backend="aot_eager")
    # The same maths; compiled random draws may differ in order, so equal to sampling noise.
    np.testing.assert_allclose(compiled, eager, rtol=2e-3)


def test_compilation_failure_falls_back_to_eager_with_a_warning(screen):
    adata, embeddings = screen

    def broken_backend(graph, inputs):
        raise RuntimeError("no compiler on this machine")

    eager, _ = _train(adata.copy(), embeddings, compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback, _ = _train(adata.copy(), embeddings, compile=True, compile_backend=broken_backend)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("torch.compile is unavailable or failed (BackendCompilerFailed: ")
    assert messages[0].endswith("training continues with the eager module.")
    np.testing.assert_array_equal(fallback, eager)


def test_bad_compile_value(screen):
    adata, embeddings = screen
    ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=embeddings)
    model = ps.ScopeVI(adata, n_latent=3, n_hidden=8, effect_prior=False)
    with pytest.raises(ValueError, match=r"^compile must be True, False or 'auto', got 'yes'.$"):
        ScopeTrainingPlan(model.module, compile="yes")
