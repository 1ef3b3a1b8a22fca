"""Sphinx configuration (cookiecutter-scverse style, myst-nb for pages and notebooks)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

project = "perturbscope"
author = "perturbscope developers"
copyright = f"{datetime.now():%Y}, {author}"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
# The tutorials run in every build; jupyter-cache re-runs a notebook only when its code changed
# (the cache lives in _build/.jupyter_cache). A failing cell fails the build.
nb_execution_mode = "cache"
nb_execution_raise_on_error = True
nb_execution_timeout = 600  # seconds per cell
nb_execution_show_tb = True
nb_merge_streams = True  # one stdout block per cell, not one per print
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
intersphinx_mapping = {}  # no network at build time
nitpicky = False
suppress_warnings = ["myst.header", "config.cache"]

html_theme = "sphinx_book_theme"
html_title = "perturbscope"
html_theme_options = {"repository_url": "https://github.com/perturbscope/perturbscope", "use_repository_button": False}
