"""The import rules of crawler/ (docs: DESIGN.md "Rules"): no import cycle among its modules, and no
module imports another module's private (``_name``) definitions.

Every import counts, wherever it is written: at module level, inside a function, under
``if TYPE_CHECKING:``. Relative imports are resolved to module names, and ``from . import x``
where ``x`` is a module counts as importing that module. Importing a module does not count as
importing the packages above it (Python runs their ``__init__`` first, but a package being
initialised is not waited for, so that is no cycle); importing a name from a package's
``__init__`` does. A private name reached through an imported module (``from . import sync``
then ``sync._Run``) counts as taking it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "crawler"


@dataclass(frozen=True)
class Import:
    importer: str
    module: str
    line: int
    name: str | None = None
    """The definition taken from ``module`` (``from module import name``, or ``module.name`` for
    a private name), None for the module itself."""


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under ``root`` (the folder of ``package``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _base(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a ``from`` import names (PEP 328)."""
    if level == 0:
        return module or ""
    parts = importer.split(".")
    if not is_package:
        parts.pop()
    if level > 1:
        if level - 1 > len(parts) - 1:
            raise ValueError(f"{importer}: relative import beyond the top-level package")
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def iter_imports(modules: dict[str, Path], package: str) -> Iterator[Import]:
    """Every import of a module of ``package`` by a module of ``package``, and every private name
    taken through an imported module's name."""
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}
        """A name this module binds to a module of ``package`` (scopes are not told apart)."""
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        yield Import(importer, alias.name, node.lineno)
                        bound[alias.asname or alias.name.partition(".")[0]] = alias.name if alias.asname else alias.name.partition(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = _base(importer, is_package, node.level, node.module)
                if base != package and not base.startswith(package + "."):
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        yield Import(importer, f"{base}.{alias.name}", node.lineno)
                        bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                    elif base in modules:
                        yield Import(importer, base, node.lineno, None if alias.name == "*" else alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                module = _module_named(node.value, bound, modules)
                if module is not None:
                    yield Import(importer, module, node.lineno, node.attr)


def _module_named(expr: ast.expr, bound: dict[str, str], modules: dict[str, Path]) -> str | None:
    """The module that ``expr`` (``name`` or ``name.sub...``) stands for, if it is one of ``modules``."""
    if isinstance(expr, ast.Name):
        return bound.get(expr.id)
    if isinstance(expr, ast.Attribute):
        parent = _module_named(expr.value, bound, modules)
        if parent is not None and f"{parent}.{expr.attr}" in modules:
            return f"{parent}.{expr.attr}"
    return None


def private_imports(imports: list[Import]) -> list[str]:
    """``importer:line takes name from module`` for every ``_name`` (not ``__dunder__``) taken
    from another module."""
    return sorted(
        f"{i.importer}:{i.line} takes {i.name} from {i.module}"
        for i in imports
        if i.name is not None and i.name.startswith("_") and not (i.name.startswith("__") and i.name.endswith("__"))
        and i.module != i.importer
    )


def cycles(imports: list[Import]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for each group of modules that import each other (Tarjan's
    strongly connected components; a module importing itself is a group of one)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.importer, set()).add(i.module)
        graph.setdefault(i.module, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(_one_cycle(graph, group) for group in groups)


def _one_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest way from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def crawler_imports() -> list[Import]:
    return list(iter_imports(modules_of(PACKAGE_DIR, "crawler"), "crawler"))


def test_no_module_of_crawler_is_in_an_import_cycle():
    imports = crawler_imports()
    assert len({i.importer for i in imports}) > 20, "the walk found too few crawler modules importing others"
    found = cycles(imports)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_no_module_of_crawler_imports_another_modules_private_names():
    found = private_imports(crawler_imports())
    assert not found, "private names imported across modules:\n" + "\n".join(found)


# --- the walker itself, on a small package written for the purpose --------------------------


def _package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return modules_of(root / "pkg", "pkg")


def test_the_walker_finds_cycles_and_private_imports(tmp_path):
    modules = _package(tmp_path, {
        "__init__.py": "from .a import run\n__version__ = '1'\n",
        "a.py": "from .b import _hidden, shown\n\ndef run():\n    from .sub import deep\n",
        "b.py": "from . import a\n_hidden = shown = 1\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\n",
        "d.py": "import pkg.c\nfrom . import __version__\nimport os\nfrom os import _exit\n",
        "e.py": "from .e import _self_private\nfrom . import e\n",
        "sub/__init__.py": "from .. import b\n",
        "sub/deep.py": "from ..sub import deep\n",
        "lone.py": "from .a import run\nfrom .sub.deep import *\n",
        "f.py": "import pkg.b\nfrom . import b as bee\nfrom pkg import sub\nx = bee._hidden + pkg.b._hidden + sub.deep._x + bee.shown\n",
    })
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.sub", "pkg.sub.deep", "pkg.lone", "pkg.f"}
    imports = list(iter_imports(modules, "pkg"))
    assert Import("pkg.a", "pkg.sub.deep", 4) in imports              # inside a function, `from .sub import deep`
    assert Import("pkg.b", "pkg.a", 1) in imports                     # `from . import a`: the module
    assert Import("pkg.sub", "pkg.b", 1) in imports                   # `..` from a package's __init__
    assert Import("pkg.c", "pkg.d", 3, "D") in imports                # under `if TYPE_CHECKING:`, absolute
    assert not any(i.module.startswith("os") for i in imports)
    assert cycles(imports) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"], ["pkg.e", "pkg.e"], ["pkg.sub.deep", "pkg.sub.deep"]]
    assert private_imports(imports) == [   # not __version__, not os._exit, not e's own
        "pkg.a:1 takes _hidden from pkg.b", "pkg.f:4 takes _hidden from pkg.b", "pkg.f:4 takes _hidden from pkg.b",
        "pkg.f:4 takes _x from pkg.sub.deep"]


def test_the_walker_passes_a_package_that_keeps_the_rules(tmp_path):
    modules = _package(tmp_path, {
        "__init__.py": "from .top import main\n__all__ = ['main']\n",
        "top.py": "from .low import helper\nfrom . import low\n\ndef main():\n    from .low import __doc__\n",
        "low.py": "def helper():\n    pass\n",
    })
    imports = list(iter_imports(modules, "pkg"))
    assert {(i.importer, i.module) for i in imports} == {("pkg", "pkg.top"), ("pkg.top", "pkg.low")}
    assert cycles(imports) == [] and private_imports(imports) == []
