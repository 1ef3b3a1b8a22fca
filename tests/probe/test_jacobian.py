import copy
import re

import numpy as np
import pytest
import torch

from perturbscope.probe import (
    axis_alignment_scores,
    decoder_jacobian,
    gradient_field,
    gradient_flow,
)
from perturbscope.probe._jacobian import _make_probe, _select


@pytest.fixture(scope="module")
def double_model(tiny_scvi):
    model, adata = tiny_scvi
    z = model.get_latent_representation(adata[:8].copy()).astype(np.float64)
    model64 = copy.copy(model)
    model64.module = copy.deepcopy(model.module).double()
    return model64, adata[:8].copy(), z


def _decoded(model, adata, z, output):
    probe, _ = _make_probe(model, adata, z, None, 1e4, 64)
    with torch.no_grad():
        return _select(*probe.decode(probe.z, np.arange(len(z))), output, None).numpy()


@pytest.mark.parametrize("output", ["log_scale", "scale", "rate"])
@pytest.mark.parametrize("genes", [None, ["gene0", "gene5", "gene33"]])
def test_matches_finite_differences(double_model, output, genes):
    model, adata, z = double_model
    jac = decoder_jacobian(model, adata, z=z, genes=genes, output=output, progress_bar=False)
    eps = 1e-6
    columns = [
        (_decoded(model, adata, z + eps * e, output) - _decoded(model, adata, z - eps * e, output))
        / (2 * eps)
        for e in np.eye(z.shape[1])
    ]
    fd = np.stack(columns, axis=-1)
    if genes is not None:  # fewer genes than latent dims: the reverse-mode path
        fd = fd[:, [int(g.removeprefix("gene")) for g in genes]]
    assert jac.dtype == np.float64
    assert jac.shape == fd.shape
    assert np.abs(jac - fd).max() / np.abs(fd).max() < 1e-3


def test_scale_columns_sum_to_zero_and_rate_is_library_times_scale(double_model):
    model, adata, z = double_model
    scale = decoder_jacobian(model, adata, z=z, output="scale", progress_bar=False)
    assert np.abs(scale.sum(axis=1)).max() < 1e-12 * 40 + 1e-14
    assert np.abs(scale).max() > 1e-6
    rate = decoder_jacobian(
        model, adata, z=z, output="rate", library_size=500.0, progress_bar=False
    )
    np.testing.assert_allclose(rate, 500.0 * scale, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("setup", "model_kwargs"), [
    ({}, {"gene_likelihood": "poisson"}),
    ({}, {"gene_likelihood": "normal"}),
    ({"size_factor_key": "size_factor"}, {}),
    ({"labels_key": "labels"}, {"dispersion": "gene-label"}),
])
def test_every_scvi_setup_decodes_normalised_expression(setup, model_kwargs):
    """Poisson, normal, size-factor and label-dispersion SCVI models are probed like the default:
    ``scale`` is the decoder's expression (rows sum to 1 under its softmax; for ``"normal"`` not
    the distribution's standard deviation; a size-factor model's softplus scale, as scvi-tools
    returns it, does not) and ``rate`` is the library size times it."""
    import scvi

    adata = scvi.data.synthetic_iid(batch_size=20, n_genes=12, n_batches=1)
    adata.obs["size_factor"] = np.asarray(adata.X.sum(axis=1)).ravel() / 10.0
    scvi.model.SCVI.setup_anndata(adata, **setup)
    model = scvi.model.SCVI(adata, n_latent=3, n_hidden=16, **model_kwargs)
    model.train(max_epochs=1, enable_progress_bar=False)
    z = model.get_latent_representation(adata[:5])
    scale = _decoded(model, adata[:5].copy(), z, "scale")
    if "size_factor_key" not in setup:
        np.testing.assert_allclose(scale.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(_decoded(model, adata[:5].copy(), z, "rate"), 1e4 * scale, rtol=1e-4)
    jac = decoder_jacobian(model, adata[:5].copy(), z=z, output="log_scale", progress_bar=False)
    assert jac.shape == (5, 12, 3)
    assert np.isfinite(jac).all()


def test_chunking_does_not_change_the_result(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata[:30].copy()
    one = decoder_jacobian(model, sub, batch_size=7, progress_bar=False)
    whole = decoder_jacobian(model, sub, batch_size=64, progress_bar=False)
    assert one.shape == (30, 40, 4)
    np.testing.assert_allclose(one, whole, rtol=1e-5, atol=1e-6)


def test_own_batch_versus_transform_batch(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata[:10].copy()  # alternating b1, b2
    own = decoder_jacobian(model, sub, progress_bar=False)
    b1 = decoder_jacobian(model, sub, transform_batch="b1", progress_bar=False)
    b2 = decoder_jacobian(model, sub, transform_batch="b2", progress_bar=False)
    np.testing.assert_allclose(own[0::2], b1[0::2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(own[1::2], b2[1::2], rtol=1e-5, atol=1e-7)
    assert not np.allclose(b1, b2)


def test_default_cells_are_the_models_and_state_is_restored(tiny_scvi):
    model, adata = tiny_scvi
    x_before = adata.X.copy()
    keys_before = (set(adata.obsm), set(adata.var.columns), set(adata.layers))
    model.module.train()
    jac = decoder_jacobian(model, genes="gene3", batch_size=128, progress_bar=False)
    assert model.module.training
    model.module.eval()
    assert jac.shape == (adata.n_obs, 1, 4)
    assert (x_before != adata.X).nnz == 0
    assert keys_before == (set(adata.obsm), set(adata.var.columns), set(adata.layers))


def test_bad_output(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(
        ValueError, match=r"output must be one of \['log_scale', 'scale', 'rate'\], got 'mean'"
    ):
        decoder_jacobian(model, adata, output="mean")


def test_unknown_gene(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(
        ValueError, match=r"genes \['ISG15'\] are not decoded by the model \(40 genes"
    ):
        decoder_jacobian(model, adata, genes=["gene1", "ISG15"])


def test_bad_z_shape(tiny_scvi):
    model, _ = tiny_scvi
    with pytest.raises(
        ValueError, match=r"z must have shape \(n_cells, n_latent=4\), got \(3, 5\)"
    ):
        decoder_jacobian(model, z=np.zeros((3, 5)))


def test_z_and_adata_disagree(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(ValueError, match="z has 3 rows but adata has 240 cells"):
        decoder_jacobian(model, adata, z=np.zeros((3, 4)))


def test_unknown_transform_batch(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(
        ValueError,
        match=r"transform_batch \['b9'\] is not a batch of the model; its batches are \['b1', 'b2'\]",
    ):
        decoder_jacobian(model, adata, transform_batch="b9")


def test_bad_batch_size(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        decoder_jacobian(model, adata, batch_size=0)


def test_not_an_scvi_model():
    with pytest.raises(
        TypeError,
        match=r"^probes work on scvi\.model\.SCVI, scvi\.model\.TOTALVI and perturbscope\.ScopeVI "
        r"models, not str$",
    ):
        decoder_jacobian("model", z=np.zeros((1, 4)))


# --------------------------------------------------------------- gene order and bad inputs
_ORDER = r"adata has the model's 40 genes in another order \(position 0 holds 'gene39' where the model has 'gene0'\); select them in the model's order with adata\[:, model.adata.var_names\]"


@pytest.mark.parametrize("probe", ["jacobian", "alignment", "flow", "field"])
def test_reordered_genes_are_rejected(tiny_scvi, probe):
    model, adata = tiny_scvi
    rev = adata[:, adata.var_names[::-1]].copy()
    calls = {
        "jacobian": lambda: decoder_jacobian(model, rev),
        "alignment": lambda: axis_alignment_scores(model, rev, "state", "control", "stimulated"),
        "flow": lambda: gradient_flow(model, rev, "gene1"),
        "field": lambda: gradient_field(model, rev, "gene1"),
    }
    with pytest.raises(ValueError, match=_ORDER):
        calls[probe]()


def test_missing_and_extra_genes_are_named(tiny_scvi):
    model, adata = tiny_scvi
    sub = adata[:, 2:].copy()
    with pytest.raises(ValueError, match=re.escape(
        "adata's genes are not the model's: 2 of the model's 40 genes are missing from "
        "adata.var_names (['gene0', 'gene1']); the probes need every model gene: add the missing "
        "ones (e.g. as zero counts) and select them in the model's order with "
        "adata[:, model.adata.var_names]"
    )):
        decoder_jacobian(model, sub)
    renamed = adata.copy()
    renamed.var_names = ["x0", *adata.var_names[1:]]
    with pytest.raises(ValueError, match=re.escape(
        "1 of the model's 40 genes are missing from adata.var_names (['gene0']) and 1 of adata's "
        "40 genes are not the model's (['x0'])"
    )):
        decoder_jacobian(model, renamed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"genes": []}, "genes is empty; pass at least one gene name, or None for all genes"),
        ({"library_size": 0}, "library_size must be a finite number > 0, got 0"),
        ({"transform_batch": []}, "transform_batch is an empty list; pass a batch name, a list of them, or None"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"genes": 5}, "genes must be a gene name or a list of gene names, got 5"),
        # an integer batch name is one name, looked up as such (these batches are 'b1', 'b2')
        ({"transform_batch": 0}, "transform_batch [0] is not a batch of the model; its batches are ['b1', 'b2']"),
    ],
)
def test_bad_jacobian_inputs(tiny_scvi, kwargs, message):
    model, adata = tiny_scvi
    with pytest.raises(ValueError, match=re.escape(message)):
        decoder_jacobian(model, adata[:5].copy(), **kwargs)


def test_empty_cells_and_latent_points(tiny_scvi):
    model, adata = tiny_scvi
    with pytest.raises(ValueError, match="^adata has no cells$"):
        decoder_jacobian(model, adata[:0].copy())
    with pytest.raises(ValueError, match=re.escape("z has NaN or infinite values in 1 rows; every latent point must be finite")):
        decoder_jacobian(model, z=np.array([[0.0] * 4, [np.nan] * 4]))
    with pytest.raises(ValueError, match="^z has no rows; pass at least one latent point$"):
        decoder_jacobian(model, z=np.zeros((0, 4)))
    with pytest.raises(ValueError, match="^adata has no cells$"):
        gradient_flow(model, adata[:0].copy(), "gene1")
    with pytest.raises(ValueError, match="^adata has no cells$"):
        axis_alignment_scores(model, adata[:0].copy(), "state", "control", "stimulated")
