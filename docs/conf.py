"""Sphinx configuration: furo, MyST (+ myst-nb for the tutorials), autodoc with napoleon.

Offline by design: no intersphinx inventories, and the tutorials are rendered from the outputs
committed in ``tutorials/*.ipynb`` (``nb_execution_mode = "off"``), so building the docs never
trains anything. Build with ``make docs`` (warnings are errors).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))  # document the checkout, installed or not

import pyro_flows_ext  # noqa: E402


def copy_tutorials() -> None:
    """Mirror ``tutorials/*.ipynb`` into ``docs/tutorials/`` (git-ignored copies).

    Sphinx only reads sources under ``docs/``; copying (rather than a symlink) works on every
    file system. Unchanged notebooks are left alone so incremental builds stay incremental,
    and copies of deleted notebooks are removed.
    """
    src, dst = ROOT / "tutorials", DOCS / "tutorials"
    wanted = {p.name: p for p in src.glob("*.ipynb")}
    for old in dst.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for name, path in wanted.items():
        target = dst / name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copy2(path, target)


copy_tutorials()

project = "pyro_flows_ext"
author = "pyro_flows_ext contributors"
copyright = "the pyro_flows_ext contributors"
release = version = pyro_flows_ext.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "public_api",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "jupyter_execute"]
templates_path: list[str] = []

# -- autodoc / napoleon --------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # no torch boilerplate (forward, extra_repr, ...)
autosummary_generate = False  # tables only; the entries come from the public-api directive
python_maximum_signature_line_length = 88
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_param = False  # keep grouped "train, valid:" arguments together
napoleon_attr_annotations = True

# -- MyST / notebooks ----------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the committed outputs; never execute
nb_merge_streams = True

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro_flows_ext {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
