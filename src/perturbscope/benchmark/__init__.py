"""Honest benchmarking: splits, baselines, metrics and the split-half noise ceiling."""

from ._pseudobulk import log1p_normalized, pseudobulk

__all__ = ["log1p_normalized", "pseudobulk"]
