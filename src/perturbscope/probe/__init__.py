"""Gradient probes of trained scVI-family decoders (CELLxGENE Census models included).

Differentiate a trained decoder with respect to its latent variables (Bjerregaard, Das, Krogh
& Prada-Luengo, Genes 2025) to read what it has learnt about perturbations without labels:
per-cell Jacobians, gene vector fields and flows, axis-alignment gene scores, and pathway
rankings of those scores.
"""

from .._safe_load import load_model_file
from ._alignment import axis_alignment_scores, mean_expression_baseline
from ._census import load_census_scvi, load_scvi_model
from ._flow import gradient_field, gradient_flow, gradient_key
from ._jacobian import decoder_jacobian
from ._pathways import gene_set_table, rank_pathways
from ._scvi_files import SIZE_CAPS, SUPPORTED_MODELS

__all__ = [
    "gene_set_table",
    "SIZE_CAPS",
    "SUPPORTED_MODELS",
    "axis_alignment_scores",
    "decoder_jacobian",
    "gradient_field",
    "gradient_flow",
    "gradient_key",
    "load_census_scvi",
    "load_model_file",
    "load_scvi_model",
    "mean_expression_baseline",
    "rank_pathways",
]
