"""The whole package keeps its layers and has no import circles.

Layers, bottom first (README "Layout"): a module may import its own package and any package on a
lower floor, never one on its own floor or above. This is DESIGN's list with the packages it does
not name placed where the code keeps them (``config``, ``runloop``, ``serving``, ``pipeline``,
``recommend``, ``quickstart``); ``eval`` and ``runloop`` share a floor below ``trainers``.
The root ``alignkit`` (``__version__`` and the public names, loaded on first use through
``importlib``) imports nothing itself and may be imported from anywhere.

Which import statements count:

- layers: every one, at module level, inside functions and under ``if TYPE_CHECKING:`` alike (a
  type named in an annotation is a dependency a reader follows too);
- circles: those that run when a module is imported (module level, outside ``if TYPE_CHECKING:``);
  a second check adds the function-level ones, so that a lazy import is never the way around a
  circle (move the code instead).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import alignkit
from alignkit.data.augment import _components as strongly_connected

SRC = Path(alignkit.__file__).parent
BENCH = Path(__file__).resolve().parents[1] / "bench"

FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("ops", "tracking"),
    ("config",),
    ("data",),
    ("models",),
    ("rollout",),
    ("eval", "runloop"),
    ("trainers",),
    ("annotate", "serving"),
    ("pipeline", "recommend"),
    ("quickstart",),  # a pipeline of the pipeline runner
    ("cli",),
    ("__main__",),
)
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}

#: name -> (source, is a package's __init__)
Sources = Mapping[str, tuple[str, bool]]


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    where: str  # "module", "function" or "type-checking"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def parse_imports(name: str, source: str, is_package: bool, known: Iterable[str]) -> list[Import]:
    """The import statements of module `name` that name a module of `known` (``from p import m``
    names the submodule ``p.m`` when it is one, else ``p``)."""
    known = set(known)
    found: list[Import] = []

    def add(target: str, node: ast.stmt, where: str) -> None:
        if target in known and target != name:
            found.append(Import(name, target, node.lineno, where))

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, where)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package of `name`
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*parts, *([module] if module else [])])
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else module, node, where)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, "type-checking")
            for child in node.orelse:
                visit(child, where)
        else:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                where = "function" if where == "module" else where
            for child in ast.iter_child_nodes(node):
                visit(child, where)

    visit(ast.parse(source), "module")
    return found


@functools.cache
def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def all_imports(sources: Sources) -> list[Import]:
    return [
        imp
        for name, (text, is_package) in sources.items()
        for imp in parse_imports(name, text, is_package, sources)
    ]


@functools.cache
def package_imports() -> tuple[Import, ...]:
    return tuple(all_imports(package_sources()))


def _room(module: str) -> str | None:
    """The package (or top-level module) under ``alignkit`` that `module` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(imports: Iterable[Import]) -> list[str]:
    """Imports into the importer's own floor or above (another package), as readable lines."""
    bad = []
    for imp in imports:
        here, there = _room(imp.source), _room(imp.target)
        if there is None or here == there:
            continue  # the root facade, or inside one package
        if here is None or FLOOR[there] >= FLOOR[here]:
            bad.append(
                f"{imp.source}:{imp.line} imports {imp.target} ({imp.where}): "
                f"{there} (floor {FLOOR[there]}) is not below {here} "
                f"(floor {FLOOR.get(here, '-')})"
            )
    return bad


def circles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan's, as
    ``data.augment`` finds preference cycles)."""
    graph = {node: set(targets) for node, targets in edges.items()}
    for targets in list(graph.values()):
        for target in targets:
            graph.setdefault(target, set())
    components = strongly_connected(sorted(graph), graph)
    return sorted(sorted(component) for component in components if len(component) > 1)


def import_graph(imports: Iterable[Import], kinds: set[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.where in kinds:
            graph.setdefault(imp.source, set()).add(imp.target)
    return graph


# --------------------------------------------------------------------------------------


def test_every_package_and_top_level_module_has_a_floor():
    rooms = {_room(name) for name in package_sources()} - {None}
    assert rooms == set(FLOOR), "place a new package in FLOORS (and in README's layout)"


def test_no_import_runs_up_a_layer():
    assert upward_imports(package_imports()) == []


def test_tracking_io_imports_nothing_of_alignkit():
    """config, tracking and the CLI share io.py's atomic writes; it stands below them all."""
    sources = package_sources()
    text, is_package = sources["alignkit.tracking.io"]
    assert parse_imports("alignkit.tracking.io", text, is_package, sources) == []
    assert "import" in text  # it does import (the standard library): the parse had work to do


def test_the_root_facade_imports_nothing_of_alignkit():
    sources = package_sources()
    text, is_package = sources["alignkit"]
    assert parse_imports("alignkit", text, is_package, sources) == []


def test_no_circle_between_modules_at_module_level():
    imports = package_imports()
    assert circles(import_graph(imports, {"module"})) == []


def test_no_circle_even_through_function_level_imports():
    imports = package_imports()
    assert circles(import_graph(imports, {"module", "function"})) == []


def test_the_bench_scripts_have_no_circle():
    sources = {path.stem: (path.read_text(encoding="utf-8"), False) for path in BENCH.glob("*.py")}
    assert len(sources) > 5
    imports = [
        imp
        for name, (text, _) in sources.items()
        for imp in parse_imports(name, text, False, sources)
    ]
    assert any(imp.target == "_harness" for imp in imports)  # the parse sees bench's imports
    assert circles(import_graph(imports, {"module", "function"})) == []


def test_the_checks_find_a_planted_circle_and_upward_imports():
    fake = {
        "alignkit.ops": ("", True),
        "alignkit.ops.a": ("from alignkit.ops.b import f\n", False),
        "alignkit.ops.b": ("import alignkit.ops.c as c\n", False),
        "alignkit.ops.c": ("from . import a\n", False),  # relative: closes a -> b -> c -> a
        "alignkit.data.d": ("def f():\n    from alignkit.trainers.pg import x\n", False),
        "alignkit.data.e": (
            "from typing import TYPE_CHECKING\n"
            "from alignkit.data.g import h\n"
            "if TYPE_CHECKING:\n    from alignkit.models import m\n",
            False,
        ),
        "alignkit.data.g": ("def h():\n    from alignkit.data.e import z\n", False),
        "alignkit.trainers.pg": ("from alignkit.ops import a\n", False),
        "alignkit.models": ("", True),
    }
    imports = all_imports(fake)
    assert circles(import_graph(imports, {"module"})) == [
        ["alignkit.ops.a", "alignkit.ops.b", "alignkit.ops.c"]
    ]
    assert circles(import_graph(imports, {"module", "function"})) == [
        ["alignkit.data.e", "alignkit.data.g"],
        ["alignkit.ops.a", "alignkit.ops.b", "alignkit.ops.c"],
    ]
    upward = upward_imports(imports)
    assert [line.split(" (")[0] for line in upward] == [
        "alignkit.data.d:2 imports alignkit.trainers.pg",
        "alignkit.data.e:4 imports alignkit.models",
    ]
    assert "(function)" in upward[0] and "(type-checking)" in upward[1]
    # a package on the same floor is not "below" either
    same_floor = all_imports(
        {"alignkit.ops.x": ("import alignkit.tracking\n", False)}
        | {"alignkit.tracking": ("", True)}
    )
    assert len(upward_imports(same_floor)) == 1
