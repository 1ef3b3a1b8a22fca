"""Readers, perturbation-label parsing and a Perturb-seq simulator with known ground truth."""

from ._perturbations import check_control_present, parse_perturbation, perturbation_gene_sets
from ._simulate import simulate_perturbseq

__all__ = [
    "check_control_present",
    "parse_perturbation",
    "perturbation_gene_sets",
    "simulate_perturbseq",
]
