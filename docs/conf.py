"""Sphinx configuration (pip install -e ".[docs]"; sphinx-build docs docs/_build)."""

project = "dask_rawvm"
extensions = ["sphinx.ext.autodoc", "numpydoc"]
numpydoc_show_class_members = False
html_theme = "alabaster"
