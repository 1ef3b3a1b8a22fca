"""Plots, one function per result type."""

__all__: list[str] = []
