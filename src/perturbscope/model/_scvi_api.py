"""scvi-tools' expression API for ScopeVI: normalised expression, posterior predictive samples, DE.

The methods follow :class:`scvi.model.base.RNASeqMixin` (same names, arguments and return
shapes) with one addition, ``perturbation``: a cell's expression *under a perturbation* is
decoded from ScopeVI's conditional prior ``p(z | cell as anchor, perturbation)``, the
distribution :meth:`~perturbscope.ScopeVI.predict` draws from, instead of the posterior
``q(z | cell, its own perturbation)`` used without it.

Differential expression between a predicted perturbation and its controls runs scvi-tools' own
:class:`scvi.model.base.DifferentialComputation` (its ``"change"`` or ``"vanilla"`` mode, its
pseudocount and LFC statistics) on two groups that share the same anchor cells: group 1 decoded
under the perturbation, group 2 under none. scvi-tools' ``RNASeqMixin.differential_expression``
selects cells by label and cannot take such a condition, so the groups are handed to
``DifferentialComputation`` through a two-copy AnnData of the anchors (scvi's public
``AnnDataManager``) and a ``model_fn`` that decodes each copy under its condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField
from scvi.model.base import DifferentialComputation

from .._constants import REGISTRY_KEYS
from ..data import check_var_names, is_control
from ..module._scopevae import COUNT_LIKELIHOODS


class ScviApiMixin:
    """``get_normalized_expression``, ``posterior_predictive_sample`` and ``differential_expression``."""

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """scvi-tools' validation, for every method that takes an AnnData, plus a check of gene order.

        The genes must be the model's, in its order: scvi-tools compares only their number, so
        reordered genes gave ``get_latent_representation`` another latent without an error. The
        same holds for a MuData's other modalities (proteins, peaks). As in
        scvi-tools, an AnnData not yet set up is registered in place (``_scvi_*`` keys in its
        ``obs`` and ``uns``); this class's own methods register a copy instead (``_registered_adata``).
        """
        if adata is not None and getattr(self, "_adata_manager", None) is not None:  # None: loaded without cells
            check_var_names(self._expression_modality(adata).var_names, self.var_names, "adata")
            if hasattr(adata, "mod"):  # the encoder reads the other modalities too
                for key, name in self._extra_modalities().items():
                    if name in adata.mod:  # a missing modality is scvi-tools' error to raise
                        self._check_modality_order(key, adata.mod[name], name)
        return super()._validate_anndata(adata, copy_if_view)

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        perturbation: str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded, normalised expression of each cell, optionally under a perturbation.

        As :meth:`scvi.model.base.RNASeqMixin.get_normalized_expression`: ``px_scale`` (each
        cell's expression frequencies, summing to 1) times ``library_size``.

        Parameters
        ----------
        adata
            Cells with the training genes; defaults to the training AnnData. An AnnData not yet
            registered is registered on a copy (the model's setup is transferred), so it is left
            untouched.
        indices
            Cells of ``adata`` to use; all when ``None``.
        perturbation
            ``None``: ``z`` from the posterior ``q(z | cell, its registered perturbation)``,
            decoded under that perturbation (scvi-tools' meaning). A label (``"KLF1"``,
            ``"SET+KLF1"``, or the control value for none): every cell is an anchor; ``z`` is
            drawn from the conditional prior ``p(z | cell, perturbation)`` and decoded under the
            perturbation (a combination's summed perturbation vector is decoded jointly).
            Meant for control cells, as in :meth:`~perturbscope.ScopeVI.predict`.
        gene_list
            Genes to return; all when ``None``.
        library_size
            Scale of the frequencies, or ``"latent"`` for expected counts at each cell's
            observed library size.
        n_samples
            Draws of ``z`` per cell.
        return_mean
            Average the draws.
        return_numpy
            Return an array instead of a DataFrame (genes as columns, cells as index); an array
            whenever ``n_samples > 1`` and ``return_mean=False``.
        batch_size
            Cells per forward pass; ``None`` uses ``scvi.settings.batch_size``.
        seed
            Seed of the draws; defaults to ``scvi.settings.seed``.

        Returns
        -------
        ``(cells, genes)`` DataFrame or array, or ``(n_samples, cells, genes)`` array with
        ``return_mean=False`` and ``n_samples > 1``.

        Raises
        ------
        ValueError
            For the ``"normal"`` likelihood (no normalised expression), a gene of ``gene_list``
            not in the model, ``n_samples`` below 1 or a ``library_size`` that is neither positive
            nor ``"latent"``.
        KeyError
            If a perturbed gene is not in the embedding table.

        Examples
        --------
        >>> import perturbscope as ps
        >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=4,
        ...                                          n_combinations=0, n_cells_per_condition=10)
        >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb)
        >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, effect_prior=False)
        >>> model.train(max_epochs=1, enable_progress_bar=False)
        >>> rho = model.get_normalized_expression(perturbation="G00")
        >>> rho.shape, bool(np.allclose(rho.sum(axis=1), 1, atol=1e-5))
        ((160, 30), True)
        """
        _check_scale_likelihood(self, "get_normalized_expression")
        if library_size != "latent" and not (isinstance(library_size, int | float) and library_size > 0):
            raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}.")
        adata = _registered_adata(self, adata)
        var_names = self._expression_modality(adata).var_names  # a MuData's own var_names hold every modality
        genes = _gene_mask(var_names, gene_list)
        key = "px_rate" if library_size == "latent" else "px_scale"
        draws = [out[key][..., genes].cpu().numpy()
                 for out in _generative_batches(self, adata, indices, perturbation, n_samples, batch_size, seed)]
        values = np.concatenate(draws, axis=1)
        if library_size != "latent":
            values = values * np.float32(library_size)
        if return_mean or n_samples == 1:
            values = values.mean(axis=0) if return_mean else values[0]
        else:
            return values
        if return_numpy:
            return values
        cells = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        return pd.DataFrame(values, index=cells.copy(), columns=var_names[genes].copy())

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        perturbation: str | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Counts drawn from the likelihood at each cell's ``z``, optionally under a perturbation.

        As :meth:`scvi.model.base.RNASeqMixin.posterior_predictive_sample`: ``z`` is drawn
        (from the posterior, or with ``perturbation`` from the conditional prior, see
        :meth:`get_normalized_expression`), then counts from ``p(x | z)`` (NB, ZINB or Poisson
        at the cell's observed library size; log-normalised values for ``"normal"``).

        Parameters
        ----------
        adata, indices, perturbation, gene_list, batch_size, seed
            As in :meth:`get_normalized_expression`.
        n_samples
            Draws per cell.

        Returns
        -------
        A dense array ``(cells, genes)``, or ``(cells, genes, n_samples)`` when ``n_samples > 1``
        (scvi-tools' shapes; it returns them as ``sparse.GCXS``).

        Raises
        ------
        ValueError
            As :meth:`get_normalized_expression`.
        KeyError
            If a perturbed gene is not in the embedding table.
        """
        adata = _registered_adata(self, adata)
        genes = _gene_mask(self._expression_modality(adata).var_names, gene_list)
        seed = _seed(seed)
        samples = []
        with torch.random.fork_rng(devices=[]):  # the likelihood's draws, seeded without touching the global state
            torch.manual_seed(seed)
            for out in _generative_batches(self, adata, indices, perturbation, n_samples, batch_size, seed):
                samples.append(out["px"].sample()[..., genes].cpu().numpy())
        values = np.concatenate(samples, axis=1)  # (n_samples, cells, genes)
        return values[0] if n_samples == 1 else np.moveaxis(values, 0, -1)

    def differential_expression(
        self,
        perturbation: str,
        adata_control: ad.AnnData | None = None,
        mode: Literal["change", "vanilla"] = "change",
        delta: float | None = 0.25,
        fdr_target: float = 0.05,
        n_samples_overall: int = 5000,
        batch_size: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Differential expression of a predicted perturbation against its controls.

        The anchors ``adata_control`` are decoded twice with scvi-tools' sampling scheme
        (``n_samples_overall`` draws of ``px_scale`` per group, drawn evenly over the anchors):
        group 1 under ``perturbation`` and group 2 under none, both from the conditional prior
        ``p(z | anchor, condition)`` (:meth:`get_normalized_expression` with ``perturbation``).
        scvi-tools' :meth:`scvi.model.base.DifferentialComputation.get_bayes_factors` then
        compares them: in ``"change"`` mode the log2 fold change ``LFC = log2(rho_1 + c) -
        log2(rho_2 + c)`` over random pairs of draws, ``proba_de`` the probability that
        ``LFC >= delta`` or ``LFC < -delta`` (the larger of the two), its Bayes factor and LFC
        summaries (``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``); in
        ``"vanilla"`` mode ``proba_m1 = P(rho_1 > rho_2)``. Genes are called DE at a posterior
        expected false discovery rate ``fdr_target``, scvi-tools' rule: the largest set of genes
        by ``proba_de`` whose mean ``1 - proba_de`` is at most ``fdr_target``.

        Parameters
        ----------
        perturbation
            Label to test (``"KLF1"``, ``"SET+KLF1"``); its genes need only be in the embedding
            table.
        adata_control
            Anchor control cells, registered with the model or not; defaults to the training
            control cells.
        mode
            ``"change"`` (LFC beyond ``delta``) or ``"vanilla"``.
        delta
            LFC threshold of ``"change"`` mode; ``None`` lets scvi-tools estimate it from the
            LFC distribution.
        fdr_target
            Posterior expected FDR of the ``is_de_fdr_<fdr_target>`` column (``"change"`` mode).
        n_samples_overall
            Draws of ``px_scale`` per group.
        batch_size
            Cells per forward pass.
        seed
            Seed of the draws and of scvi-tools' pairing; defaults to ``scvi.settings.seed``.
        **kwargs
            Passed to ``get_bayes_factors`` (e.g. ``pseudocounts``, ``use_permutation``,
            ``test_mode``).

        Returns
        -------
        A DataFrame with one row per gene (sorted by ``proba_de`` in ``"change"`` mode, by
        ``bayes_factor`` in ``"vanilla"`` mode), scvi-tools' columns, and ``comparison``
        (``"<perturbation> vs <control>"``), ``group1`` and ``group2``. Observed-count columns
        of scvi-tools (``raw_mean1``, ...) are absent: group 1 was never measured.

        Raises
        ------
        ValueError
            For the ``"normal"`` likelihood, a control ``perturbation``, an unknown ``mode``,
            ``adata_control`` holding non-control cells or none, or ``fdr_target`` outside (0, 1).
        KeyError
            If a perturbed gene is not in the embedding table.
        """
        _check_scale_likelihood(self, "differential_expression")
        state = self._perturbation_state
        control = state["control_value"]
        if mode not in ("change", "vanilla"):
            raise ValueError(f"mode must be 'change' or 'vanilla', got {mode!r}.")
        if not 0 < fdr_target < 1:
            raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target!r}.")
        if not isinstance(perturbation, str) or bool(np.asarray(is_control(pd.Series([perturbation]), control))[0]):
            raise ValueError(f"perturbation must be a perturbation label other than the control {control!r}, "
                             f"got {perturbation!r}.")
        self.encode_perturbations([perturbation])  # unknown genes fail here, before any sampling
        if adata_control is None:
            controls = np.asarray(is_control(self.adata.obs[state["perturbation_key"]], control))
            adata_control = _registered_adata(self, None)[controls]
        if adata_control.n_obs == 0:
            raise ValueError("adata_control has no cells; pass at least one control cell.")
        self._check_only_controls(adata_control)
        anchors = _registered_adata(self, adata_control)
        n_cells = anchors.n_obs
        seed = _seed(seed)
        rng = np.random.default_rng(seed)

        def model_fn(_, indices, transform_batch=None, n_samples_overall=n_samples_overall):
            """``n_samples_overall`` scale draws of one copy: under the perturbation or under none."""
            indices = np.asarray(indices)
            condition = perturbation if indices[0] < n_cells else control
            cells = np.sort(indices % n_cells)
            per_cell = n_samples_overall // len(cells) + 1  # scvi-tools' rule
            scales = self.get_normalized_expression(anchors, cells, condition, n_samples=per_cell,
                                                    return_mean=False, return_numpy=True,
                                                    batch_size=batch_size, seed=int(rng.integers(2**31)))
            scales = scales.reshape(-1, scales.shape[-1])
            return scales[rng.choice(len(scales), n_samples_overall, replace=True)]

        rna = self._expression_modality(anchors)
        matrix = rna.X if self._layer is None else rna.layers[self._layer]
        pair = ad.AnnData(X=sparse.vstack([sparse.csr_matrix(matrix)] * 2).tocsr(),
                          var=pd.DataFrame(index=rna.var_names.copy()))
        manager = AnnDataManager(fields=[LayerField(SCVI_KEYS.X_KEY, None, is_count_data=False)])
        manager.register_fields(pair)
        first = np.arange(2 * n_cells) < n_cells
        state_np = np.random.get_state()  # noqa: NPY002 (scvi-tools pairs draws with the global generator)
        np.random.seed(seed % 2**32)  # noqa: NPY002
        try:
            result = DifferentialComputation(model_fn, None, manager).get_bayes_factors(
                first, ~first, mode=mode, delta=delta, use_observed_batches=True,
                n_samples_overall=n_samples_overall, **kwargs,
            )
        finally:
            np.random.set_state(state_np)  # noqa: NPY002
        table = pd.DataFrame(result, index=rna.var_names.copy())
        table = table.sort_values("proba_de" if mode == "change" else "bayes_factor", ascending=False)
        if mode == "change":
            table[f"is_de_fdr_{fdr_target}"] = expected_fdr_calls(table["proba_de"], fdr_target)
        table["comparison"] = f"{perturbation} vs {control}"
        table["group1"], table["group2"] = perturbation, control
        return table


def _check_scale_likelihood(model, method: str) -> None:
    if model.module.gene_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(
            f"{method} needs a count likelihood ({list(COUNT_LIKELIHOODS)}); this model's is "
            f"{model.module.gene_likelihood!r}, whose decoder has no normalised expression. Use predict."
        )


def _seed(seed: int | None) -> int:
    return int(seed if seed is not None else (settings.seed or 0))


def _registered_adata(model, adata: ad.AnnData | None) -> ad.AnnData:
    """``adata`` registered with ``model``: itself if it already is, else a registered copy."""
    if adata is None or model.get_anndata_manager(adata) is not None:
        return model._validate_anndata(adata)
    return model._validate_anndata(adata.copy())


def _gene_mask(var_names: pd.Index, gene_list: Sequence[str] | None) -> np.ndarray | slice:
    if gene_list is None:
        return slice(None)
    missing = sorted(set(gene_list) - set(var_names))
    if missing:
        raise ValueError(f"gene_list has genes not in the model: {missing[:10]}.")
    return np.flatnonzero(var_names.isin(list(gene_list)))


def _generative_batches(model, adata, indices, perturbation, n_samples, batch_size, seed):
    """Yield the module's generative outputs per minibatch, ``(n_samples, cells, genes)``.

    ``z`` is ``loc + scale * noise`` of the posterior (``perturbation=None``) or of the
    conditional prior under ``perturbation``, the noise from one generator seeded with ``seed``.
    """
    if not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    rows = None if perturbation is None else torch.as_tensor(model.encode_perturbations([str(perturbation)]))
    generator = torch.Generator().manual_seed(_seed(seed))
    module, device = model.module, model.device
    module.eval()
    loader = model._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, shuffle=False)
    for tensors in loader:
        x = tensors[SCVI_KEYS.X_KEY].to(device)
        genes = (tensors[REGISTRY_KEYS.PERTURBATION_KEY] if rows is None else rows.expand(len(x), -1)).to(device)
        vector = module.perturbation_encoder(genes)
        latent = module.inference(x, genes)["qz"] if rows is None else module.prior(x, vector)
        noise = torch.randn((n_samples, len(x), module.n_latent), generator=generator).to(device)
        library = torch.log(x.sum(dim=1, keepdim=True).clamp(min=1.0))
        covariates = {k: None if tensors.get(key) is None else tensors[key].to(device)
                      for k, key in (("batch_index", SCVI_KEYS.BATCH_KEY), ("cat_covs", SCVI_KEYS.CAT_COVS_KEY))}
        outputs = module.generative(latent.loc + latent.scale * noise, vector, library, **covariates)
        outputs["px_rate"] = library.exp() * outputs["px_scale"]
        yield outputs


def expected_fdr_calls(proba_de: pd.Series, fdr_target: float) -> pd.Series:
    """scvi-tools' DE calls: the most probable genes whose posterior expected FDR is at most ``fdr_target``.

    Genes are sorted by ``proba_de``; the posterior expected FDR of the top ``k`` is the mean of
    their ``1 - proba_de``, and the largest ``k`` with it at most ``fdr_target`` is called.

    Examples
    --------
    >>> import pandas as pd
    >>> expected_fdr_calls(pd.Series([0.99, 0.5, 0.97], index=list("abc")), 0.05).tolist()
    [True, False, True]
    """
    ordered = proba_de.sort_values(ascending=False)
    fdr = (1.0 - ordered).cumsum().to_numpy() / np.arange(1, len(ordered) + 1)
    called = np.zeros(len(ordered), dtype=bool)
    called[: int((fdr <= fdr_target).sum())] = True
    return pd.Series(called, index=ordered.index).reindex(proba_de.index)
