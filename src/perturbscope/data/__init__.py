"""Data layer: perturbation labels, pseudobulks, per-context shifts, checks, pairing and simulation.

Everything the model, baselines, embeddings and analyses share sits here, at the bottom of the
package, so that no higher layer needs to import a sibling.
"""

from ._checks import (
    check_backing,
    check_cells_have_counts,
    check_controls_per_context,
    check_count_data,
    check_finite,
    check_gene_embeddings,
    check_labels,
    check_log_normalized,
    check_no_missing_labels,
    check_perturbation_labels,
    check_unique_names,
    check_var_names,
)
from ._control_bank import StreamedControlBank, bounded_control_sample
from ._device import DeviceDataSplitter
from ._distances import energy_distance
from ._pairing import (
    AnchoredAnnDataLoader,
    AnchoredDataSplitter,
    ControlAnchorSampler,
    ControlBank,
    control_mask,
)
from ._perturbations import (
    canonical_labels,
    canonical_means,
    check_control_present,
    check_one_label_per_perturbation,
    is_control,
    parse_perturbation,
    perturbation_gene_sets,
)
from ._prediction import (
    PredictionMeans,
    PredictionStore,
    aggregate_prediction,
    check_store_path,
    prediction_anndata,
    prediction_obs,
)
from ._pseudobulk import log1p_expression, log1p_normalized, pseudobulk
from ._rows import is_out_of_core, iter_row_chunks, out_of_core_source, take_rows
from ._shifts import ALL_CONTEXTS, perturbation_shifts, shifts_from_means
from ._simulate import simulate_perturbseq
from ._simulate_multimodal import simulate_multimodal_perturbseq
from ._soma import SomaCSRMatrix, read_soma
from ._streaming import StreamedAnnDataLoader, StreamedDataSplitter, streamed_pseudobulk

__all__ = [
    "SomaCSRMatrix",
    "StreamedAnnDataLoader",
    "StreamedControlBank",
    "StreamedDataSplitter",
    "bounded_control_sample",
    "is_out_of_core",
    "out_of_core_source",
    "iter_row_chunks",
    "read_soma",
    "streamed_pseudobulk",
    "take_rows",
    "ALL_CONTEXTS",
    "AnchoredAnnDataLoader",
    "AnchoredDataSplitter",
    "ControlAnchorSampler",
    "ControlBank",
    "DeviceDataSplitter",
    "aggregate_prediction",
    "check_control_present",
    "check_controls_per_context",
    "check_cells_have_counts",
    "check_count_data",
    "check_finite",
    "check_labels",
    "check_log_normalized",
    "check_no_missing_labels",
    "check_perturbation_labels",
    "check_backing",
    "check_unique_names",
    "check_gene_embeddings",
    "check_var_names",
    "control_mask",
    "energy_distance",
    "is_control",
    "log1p_expression",
    "log1p_normalized",
    "canonical_labels",
    "canonical_means",
    "check_one_label_per_perturbation",
    "parse_perturbation",
    "perturbation_gene_sets",
    "perturbation_shifts",
    "prediction_anndata",
    "prediction_obs",
    "PredictionMeans",
    "PredictionStore",
    "check_store_path",
    "simulate_multimodal_perturbseq",
    "shifts_from_means",
    "pseudobulk",
    "simulate_perturbseq",
]
