"""``.. public-api:: package``: document every name in a package's ``__all__``.

For one package the directive writes, as reStructuredText parsed in place:

* the package's docstring (``automodule`` without members);
* a summary table (``autosummary``) of every name in ``__all__``;
* one section per submodule that defines public names (the submodule's docstring, its first
  paragraph as the title), then an ``autoclass``/``autoexception``/``autofunction``/
  ``autodata`` entry for each of those names in source order. Names are documented under the
  package's path (``pyro_flows_ext.transforms.Coupling``), which is how users import them.

So a name added to ``__all__`` appears in the docs without editing them, and a name in
``__all__`` that the package lacks, or a package that does not import, fails the build. A
``missing-reference`` handler makes docstring references that name the defining submodule
(``pyro_flows_ext.infer.vector.laplace.laplace_approximation``) or a bare unique name (``Flow``)
point to the public entry.

Options:

``:order: coupling masks ...``
    Submodules (short names) to put first; the rest follow alphabetically.
``:optional:``
    Render a note instead of failing when the package does not exist (yet).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from types import ModuleType
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer, PycodeError
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode

_ROLE = re.compile(r":[\w:]+:`~?([^`<]*?)\s*(?:<([^>]*)>)?`")
_MAX_TITLE = 110


def _plain_title(paragraph: str) -> str:
    """One line of title text: roles become literals of the object's last name."""
    text = " ".join(paragraph.split()).rstrip(".")

    def literal(m: re.Match[str]) -> str:
        target = m.group(2) or m.group(1)
        return f"``{target.rsplit('.', 1)[-1]}``"

    return _ROLE.sub(literal, text)


def _source_line(obj: Any) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 1 << 30


def _data_doc(module: str, name: str) -> list[str]:
    """The ``#:`` comment or string literal documenting a module-level variable, if any."""
    try:
        docs = ModuleAnalyzer.for_module(module).find_attr_docs()
    except PycodeError:
        return []
    return list(docs.get(("", name), []))


def _directive(pkg: str, name: str, obj: Any) -> list[str]:
    full_name = f"{pkg}.{name}"
    if inspect.isclass(obj):
        kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
        options = [":members:", ":show-inheritance:", ":special-members: __call__"]
        return [f".. {kind}:: {full_name}", *(f"   {o}" for o in options), ""]
    if inspect.isroutine(obj):
        return [f".. autofunction:: {full_name}", ""]
    # A variable: its own doc comment, never the docstring of its type (``dict.__doc__``).
    doc = _data_doc(pkg, name) or [f"A ``{type(obj).__name__}``."]
    return (
        [f".. py:data:: {full_name}", f"   :type: {type(obj).__name__}", ""]
        + [f"   {line}" for line in doc]
        + [""]
    )


class PublicAPI(SphinxDirective):
    required_arguments = 1
    option_spec = {"order": directives.unchanged, "optional": directives.flag}

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if "optional" in self.options and importlib.util.find_spec(name) is None:
            return self.parse_text_to_nodes(f".. note:: ``{name}`` is not part of this build yet.")
        try:
            package = importlib.import_module(name)
        except Exception as err:  # any import failure must fail the docs build loudly
            raise self.error(f"public-api: cannot import {name}: {err!r}") from err
        public = getattr(package, "__all__", None)
        if not public:
            raise self.error(f"public-api: {name} has no __all__")
        missing = [n for n in public if not hasattr(package, n)]
        if missing:
            raise self.error(f"public-api: {name}.__all__ names missing attributes: {missing}")
        return self.parse_text_to_nodes(
            "\n".join(self._rst(package, list(public))), allow_section_headings=True
        )

    def _rst(self, package: ModuleType, public: list[str]) -> list[str]:
        pkg = package.__name__
        lines = [f".. automodule:: {pkg}", "", ".. rubric:: Summary", ""]
        lines += [".. autosummary::", "   :nosignatures:", ""]
        # (variables stay out of the table: autosummary would show their type's docstring)
        lines += [f"   {n}" for n in public if callable(getattr(package, n))] + [""]

        groups: dict[str, list[tuple[int, str, Any]]] = {}
        for n in public:
            obj = getattr(package, n)
            home = getattr(obj, "__module__", None) if callable(obj) else None
            if not (isinstance(home, str) and home.startswith(pkg + ".")):
                home = pkg
            groups.setdefault(home, []).append((_source_line(obj), n, obj))

        first = [f"{pkg}.{m}" for m in self.options.get("order", "").split()]
        unknown = [m for m in first if m not in groups]
        if unknown:
            raise self.error(f"public-api: :order: names modules without public names: {unknown}")
        rest = sorted(m for m in groups if m not in first and m != pkg)
        for module in ([pkg] if pkg in groups else []) + first + rest:
            if module != pkg:
                lines += self._section(module, pkg, public)
            lines += [f".. currentmodule:: {pkg}", ""]
            for _, n, obj in sorted(groups[module], key=lambda t: (t[0], t[1])):
                lines += _directive(pkg, n, obj)
        return lines

    def _section(self, module: str, pkg: str, public: list[str]) -> list[str]:
        doc = inspect.getdoc(importlib.import_module(module)) or ""
        head, _, body = doc.partition("\n\n")
        title = _plain_title(head)
        if not title or len(title) > _MAX_TITLE:
            title, body = f"``{module.rsplit('.', 1)[-1]}``", doc
        lines = [title, "-" * len(title), ""]
        if module.rsplit(".", 1)[-1] not in public:  # ``flows.glow`` is a function, not a module
            lines += [f".. py:module:: {module}", ""]
        # The body's cross-references resolve against the package, where the names live.
        lines += [f".. currentmodule:: {pkg}", ""]
        return lines + body.splitlines() + [""]


def resolve_public_name(
    app: Sphinx, env: Any, node: addnodes.pending_xref, contnode: nodes.TextElement
) -> nodes.reference | None:
    """Resolve a Python cross-reference that Sphinx could not resolve by itself to the public
    name it means: ``pyro_flows_ext.infer.vector.laplace.laplace_approximation`` (a docstring naming
    the defining module) to ``pyro_flows_ext.infer.laplace_approximation``, and a bare ``Flow``
    to the one documented object whose name ends in ``.Flow``. Ambiguous names stay
    unresolved (plain text), as Sphinx would leave them."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    objects = env.get_domain("py").objects
    parts = target.split(".")
    candidates = [".".join(parts[:i] + parts[-1:]) for i in range(len(parts) - 2, 0, -1)]
    found = [c for c in candidates if c in objects]
    if not found and len(parts) == 1:
        found = [n for n, e in objects.items() if n.endswith("." + target) and not e.aliased]
    if len(found) != 1 and not (found and found[0] in candidates):
        return None
    entry = objects[found[0]]
    return make_refnode(
        app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, found[0]
    )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("public-api", PublicAPI)
    app.connect("missing-reference", resolve_public_name)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
