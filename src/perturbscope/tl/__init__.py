"""Analyses on AnnData: genetic-interaction calls and related tools."""

__all__: list[str] = []
