"""Sphinx configuration for the "Attention, Annotated" site.

Build it from the repository root with

    python -m sphinx -W --keep-going -b html docs docs/_build/html

``-W`` turns every warning into an error, so a page that drifts from the code (a missing
``:pyobject:``, a broken link, a duplicate equation label) fails the build instead of rendering wrong.
"""
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# autodoc imports `transformer_implementation` from the repository root; the file is not an
# installed package, so the root goes on the import path.
sys.path.insert(0, str(ROOT))

# -- Project -----------------------------------------------------------------------------------
project = "Attention, Annotated"
author = "the Attention, Annotated contributors"
copyright = "the Attention, Annotated contributors"
html_title = "Attention, Annotated"
html_short_title = "Attention, Annotated"

# -- Extensions --------------------------------------------------------------------------------
extensions = [
    "myst_parser",  # the pages are MyST Markdown
    "sphinx.ext.mathjax",  # display math rendered in the browser
    # Serves MathJax 3 from the build output (_static/mathjax/) instead of a public CDN, so the math
    # typesets on a machine with no network; it comes from the `sphinx-mathjax-offline` package.
    "sphinx-mathjax-offline",
    "sphinx.ext.autodoc",  # docs/api.md: the core's docstrings
    "sphinx.ext.napoleon",  # Google/NumPy "Args:" / "Returns:" sections in those docstrings
    "sphinx.ext.viewcode",  # "[source]" links from the API page to highlighted code
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"

# Files under docs/ that are not pages of the site.
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "mechanisms/_template.md",  # the skeleton new mechanism pages copy; not a page itself
]

# -- MyST --------------------------------------------------------------------------------------
myst_enable_extensions = [
    # `$x$` inline and `$$ ... $$ (label)` display math; a label makes the equation numbered and
    # referable with {eq}`label`. This is how every page numbers the equations the code cites.
    "dollarmath",
    # top-level \begin{aligned}-style LaTeX environments without a surrounding `$$`
    "amsmath",
]
# Headings get HTML anchors down to level 3, so pages can link to `page.md#a-section`.
myst_heading_anchors = 3

# -- Math --------------------------------------------------------------------------------------
# numfig stays off (the default): Sphinx then numbers the labelled equations of each page (1), (2),
# ... restarting on every page, which is exactly the number the code's `# eq. (N)` comments cite.
numfig = False

# -- autodoc -----------------------------------------------------------------------------------
autodoc_member_order = "bysource"  # the API page reads in the file's own order
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# Type hints appear in the parameter descriptions rather than in very long signatures.
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# -- HTML --------------------------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_theme_options = {
    "navigation_depth": 3,
    "collapse_navigation": False,
}
html_show_sourcelink = True
# docs/_static/custom.css: a wider text column for the code, and table cells that wrap.
html_static_path = ["_static"]
html_css_files = ["custom.css"]
