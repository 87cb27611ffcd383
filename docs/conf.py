"""Sphinx configuration: ``pip install -e ".[docs]"`` then ``sphinx-build -W docs docs/_build``.

The configuration reference is generated from ``dask_rawvm/rawvm.yaml`` at build time
(``_ext/rawvm_config.py``), the CLI reference from the click group (sphinx-click), the
API from the docstrings (autodoc + numpydoc): none of them is written twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dask_rawvm

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "dask_rawvm"
copyright = "dask_rawvm developers"
release = version = dask_rawvm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_click",
    "rawvm_config",
]
exclude_patterns = ["_build"]

# numpydoc: no autosummary tables of every member (the pages pick what they show), and
# no cross-reference check of the free text in "Parameters" types.
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
autodoc_typehints = "none"  # the signature says the types; numpydoc's sections say the rest
autodoc_member_order = "bysource"

# No network at build time (CI has none but the package registries): no intersphinx
# inventories are fetched; references to distributed stay plain text.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# The look of the Dask ecosystem's docs: pydata-sphinx-theme, which dask-sphinx-theme 4 is
# built on. Not dask-sphinx-theme itself: its layout embeds Dask's Google Tag Manager id
# and a navigation bar of dask.org's sites, neither of which belongs to this project.
html_theme = "pydata_sphinx_theme"
html_title = "dask_rawvm"
html_static_path = ["_static"]
html_css_files = ["rawvm.css"]
# The pages are one level deep: the top bar lists them all, the left sidebar would be empty.
html_sidebars: dict[str, list[str]] = {"**": []}
html_theme_options = {
    "logo": {"text": "dask_rawvm"},
    "navigation_with_keys": False,
    "show_prev_next": True,
    "secondary_sidebar_items": ["page-toc"],
}

# Classes of dask-rawvm derive from distributed's and Python's; their docstrings link to
# names Sphinx has no inventory for. Those are the only references left unresolved.
nitpicky = False
