"""Sphinx configuration of the monai-ckpt user guide (MONAI's convention: pydata-sphinx-theme, MyST, myst-nb).

Build it from the repository root:

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The notebooks in ``notebooks/`` (linked here as ``docs/notebooks``) are rendered with the outputs committed in
them; nothing is executed at build time (``docs/scripts/execute_notebooks.py`` refreshes the outputs).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy
os.environ.setdefault("MPLBACKEND", "Agg")

import monai_ckpt  # noqa: E402

project = "monai-ckpt"
author = "monai-ckpt contributors"
copyright = "monai-ckpt contributors"
version = release = monai_ckpt.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks (it loads myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "scripts", "notebooks/.ipynb_checkpoints", "**/.ipynb_checkpoints"]

# MyST: slugs for headings up to ### so that "page.md#a-heading" links resolve (and are checked with -W)
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]

# notebooks: render the committed outputs, never execute at build time
nb_execution_mode = "off"
nb_merge_streams = True

# API reference from the Google-style docstrings (Args:/Returns:/Raises:)
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False  # the API pages list their members by hand: nothing is written into docs/
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "pydata_sphinx_theme"
html_title = f"monai-ckpt {release}"
html_theme_options = {
    "navigation_depth": 3,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = True


# Docstrings are written to read well as plain text (``help()``, an editor). Two plain-text habits are not valid
# reStructuredText, and are escaped here rather than in the source: a shape written (B, C, *spatial) outside a
# literal (the star would open an emphasis that never closes), and a suffix glued to a literal (``torch.compile``d).
_STAR = re.compile(r"(?<![\\\w*])\*(?=spatial\b)")


def _escape_plain_text_habits(app, what, name, obj, options, lines: list[str]) -> None:
    for i, line in enumerate(lines):
        parts = line.split("``")  # odd parts are inside a literal
        for k in range(0, len(parts), 2):
            parts[k] = _STAR.sub(r"\\*", parts[k])
            if k and parts[k][:1].isalpha():
                parts[k] = "\\ " + parts[k]  # a suffix glued to the literal before it
        lines[i] = "``".join(parts)


def setup(app):
    app.connect("autodoc-process-docstring", _escape_plain_text_habits)
