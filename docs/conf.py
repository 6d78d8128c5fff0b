"""
Sphinx configuration for the cohortsync documentation.

Built with warnings as errors (``nox -s docs``); the machine that builds it
may have no network, so nothing here fetches anything (no intersphinx
inventories).
"""

from __future__ import annotations

from importlib.metadata import version as _version
from pathlib import Path

project = "cohortsync"
author = "The cohortsync developers"
copyright = "the cohortsync developers"
release = _version("cohortsync")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- MyST ----------------------------------------------------------------------

# Anchors for "page.md#section" links, down to ### headings.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# -- autodoc -------------------------------------------------------------------

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
# The docs session installs cohortsync without the postgres extra: the module
# documents fine against a stand-in for the driver.
autodoc_mock_imports = ["psycopg", "psycopg_pool"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Unresolvable references (types from the standard library, attrs internals)
# are not errors: there is no intersphinx without a network.
nitpicky = False

# -- doctest -------------------------------------------------------------------

# DOCS lets a hidden check read the pages themselves (the API page checks
# that it documents every public name).
doctest_global_setup = f"""
from pathlib import Path
import cohortsync
DOCS = Path({str(Path(__file__).resolve().parent)!r})
"""

# -- HTML ----------------------------------------------------------------------

html_theme = "furo"
html_title = f"cohortsync {release}"
