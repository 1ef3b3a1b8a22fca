"""The benchmark's models by name: the baselines and ScopeVI behind one ``fit`` / ``predict``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import pandas as pd
import scvi

from .._choices import BASELINE_NAMES, MODEL_NAMES
from ..data import aggregate_prediction
from ..effects import (
    AdditiveBaseline,
    EmbeddingNeighborsBaseline,
    LinearBaseline,
    MatchingMeanBaseline,
    NoChangeBaseline,
    PerturbedMeanBaseline,
)
from ..model import ScopeVI

#: The baselines by name (defined once, in :data:`perturbscope._choices.BASELINE_NAMES`).
BASELINES = BASELINE_NAMES
#: Every model by name (defined once, in :data:`perturbscope._choices.MODEL_NAMES`):
#: ``scopevi``, the default model (effect prior plus validated correction); ``scopevi_vae``, the
#: earlier design, the VAE alone (``effect_prior=False``), kept for comparison; the baselines.
MODELS = MODEL_NAMES
#: ScopeVI settings of the benchmark (chosen before looking at any test split).
SCOPEVI_DEFAULTS: dict[str, Any] = {"model": {}, "train": {}}
#: ScopeVI runs at its own defaults (``ScopeVI()`` and ``ScopeVI.train()``); only the likelihood
#: follows the data's scale ("normal" for log-normalised tasks, "nb" for counts).


class ScopeVIModel:
    """ScopeVI behind the baselines' ``fit`` / ``predict`` interface.

    Parameters
    ----------
    gene_embeddings
        Genes x dimensions; ``None`` gives ScopeVI's one-hot embeddings (seen perturbations
        only, e.g. Kang's interferon).
    model_kwargs
        Passed to ``ScopeVI(...)``; defaults in :data:`SCOPEVI_DEFAULTS`.
    train_kwargs
        Passed to ``ScopeVI.train``; defaults in :data:`SCOPEVI_DEFAULTS`.
    predict_kwargs
        Passed to ``ScopeVI.predict`` (e.g. ``{"combination": "joint"}``, ``{"n_samples": 3}``).
    seed
        ``scvi.settings.seed`` for training and prediction, and the effect prior's
        cross-fitting folds (``prior_seed``) unless ``model_kwargs`` sets them.

    Examples
    --------
    >>> from perturbscope.benchmark._tasks import simulated_screen
    >>> adata, embeddings = simulated_screen()
    >>> model = ScopeVIModel(embeddings, train_kwargs={"max_epochs": 1})
    >>> model = model.fit(adata, "perturbation")
    >>> control = adata[adata.obs["perturbation"] == "control"]
    >>> model.predict(control, ["G00"], aggregate="mean").n_obs
    1
    """

    name = "scopevi"

    def __init__(
        self,
        gene_embeddings: pd.DataFrame | None = None,
        model_kwargs: dict[str, Any] | None = None,
        train_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        predict_kwargs: dict[str, Any] | None = None,
    ):
        self.gene_embeddings = gene_embeddings
        self.model_kwargs = {**SCOPEVI_DEFAULTS["model"], **(model_kwargs or {})}
        self.train_kwargs = {**SCOPEVI_DEFAULTS["train"], **(train_kwargs or {})}
        self.predict_kwargs = dict(predict_kwargs or {})
        self.seed = seed

    def fit(
        self,
        adata_train: ad.AnnData,
        perturbation_key: str,
        control_value: str = "control",
        context_key: str | None = None,
        layer: str | None = None,
        data_scale: str = "counts",
        delimiter: str = "+",
    ) -> ScopeVIModel:
        """Set up a copy of ``adata_train`` and train ScopeVI on it.

        Parameters
        ----------
        adata_train
            Training cells (not modified).
        perturbation_key, control_value, context_key, layer, delimiter
            As for ``ScopeVI.setup_anndata``.
        data_scale
            ``"log1p_norm"`` trains the ``"normal"`` likelihood, ``"counts"`` the ``"nb"`` one
            (unless ``model_kwargs`` names one).

        Returns
        -------
        ``self``, trained.
        """
        scvi.settings.seed = self.seed
        adata = adata_train.copy()
        ScopeVI.setup_anndata(
            adata,
            perturbation_key,
            control_value=control_value,
            gene_embeddings=self.gene_embeddings,
            layer=layer,
            context_key=context_key,
            combination_delimiter=delimiter,
        )
        likelihood = "normal" if data_scale == "log1p_norm" else "nb"
        kwargs = {"gene_likelihood": likelihood, "prior_seed": self.seed, **self.model_kwargs}
        self.model_ = ScopeVI(adata, **kwargs)
        lightning_logger = logging.getLogger("lightning.pytorch")
        level = lightning_logger.level
        lightning_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model_.train(**{"enable_progress_bar": False, "enable_model_summary": False,
                                     **self.train_kwargs})
        finally:
            lightning_logger.setLevel(level)
        return self

    def predict(
        self, adata_control: ad.AnnData, perturbations: Sequence[str], aggregate: str | None = None
    ) -> ad.AnnData:
        """Predict with ``ScopeVI.predict`` (one sample per control cell).

        Parameters
        ----------
        adata_control
            Control cells on the training scale.
        perturbations
            Labels to predict.
        aggregate
            ``None`` or ``"mean"``.

        Returns
        -------
        ScopeVI's prediction AnnData. With the effect prior, the mean prediction with its
        interval layers is kept as ``intervals_``.
        """
        cells = self.model_.predict(
            adata_control, list(perturbations), seed=self.seed, **self.predict_kwargs
        )
        context = self.model_._context_column
        mean = aggregate_prediction(cells, context)
        if self.model_.effect_prior is not None:
            self.model_.add_prediction_intervals(mean)
            self.intervals_ = mean
        return mean if aggregate == "mean" else cells


def make_model(
    name: str,
    gene_embeddings: pd.DataFrame | None = None,
    seed: int = 0,
    scopevi_kwargs: dict[str, Any] | None = None,
):
    """Build a benchmark model by name.

    Parameters
    ----------
    name
        One of :data:`MODELS`.
    gene_embeddings
        Gene embeddings for ``"embedding_nn"``, ``"linear"`` (``None``: the PCA rows of
        measured genes) and ``"scopevi"``.
    seed
        Training seed (ScopeVI).
    scopevi_kwargs
        ``{"model": {...}, "train": {...}, "predict": {...}}`` overriding
        :data:`SCOPEVI_DEFAULTS` and ``ScopeVI.predict``'s defaults.

    Returns
    -------
    An unfitted model with ``fit`` and ``predict``.

    Raises
    ------
    ValueError
        For an unknown name, ``"embedding_nn"`` without embeddings, or ``scopevi_kwargs`` with
        a section other than ``model``, ``train`` and ``predict`` (or a predict ``seed``).

    Examples
    --------
    >>> make_model("additive").name
    'additive'
    """
    simple = {
        "no_change": NoChangeBaseline,
        "perturbed_mean": PerturbedMeanBaseline,
        "matching_mean": MatchingMeanBaseline,
        "additive": AdditiveBaseline,
    }
    if name in simple:
        return simple[name]()
    if name == "embedding_nn":
        if gene_embeddings is None:
            raise ValueError("model 'embedding_nn' needs gene_embeddings.")
        return EmbeddingNeighborsBaseline(gene_embeddings, temperature=0.1)
    if name == "linear":
        return LinearBaseline(gene_embeddings, n_components=10, ridge=0.1)
    if name in ("scopevi", "scopevi_vae"):
        kwargs = scopevi_kwargs or {}
        unknown = sorted(set(kwargs) - {"model", "train", "predict"})
        if unknown:  # a misspelt section would be ignored silently
            raise ValueError(f"scopevi_kwargs has unknown sections {unknown}; use 'model', 'train' and 'predict'.")
        if "seed" in (kwargs.get("predict") or {}):
            raise ValueError("scopevi_kwargs['predict'] cannot set 'seed'; the benchmark's seed is used.")
        model_kwargs = dict(kwargs.get("model") or {})
        if name == "scopevi_vae":
            model_kwargs["effect_prior"] = False
        model = ScopeVIModel(
            gene_embeddings, model_kwargs, kwargs.get("train"), seed=seed,
            predict_kwargs=kwargs.get("predict"),
        )
        model.name = name
        return model
    raise ValueError(f"Unknown model {name!r}; choose from {list(MODELS)}.")
