"""Readers, control-cell anchoring, perturbation-label parsing and a Perturb-seq simulator."""

from ._pairing import AnchoredAnnDataLoader, AnchoredDataSplitter, ControlAnchorSampler
from ._perturbations import check_control_present, parse_perturbation, perturbation_gene_sets
from ._simulate import simulate_perturbseq

__all__ = [
    "AnchoredAnnDataLoader",
    "AnchoredDataSplitter",
    "ControlAnchorSampler",
    "check_control_present",
    "parse_perturbation",
    "perturbation_gene_sets",
    "simulate_perturbseq",
]
