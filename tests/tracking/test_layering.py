"""`tracking` is the bottom layer: it imports nothing from alignkit but errors and itself."""

from __future__ import annotations

import ast
from pathlib import Path

import alignkit.tracking

TRACKING = Path(alignkit.tracking.__file__).parent


def _alignkit_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "alignkit"}


def test_tracking_imports_only_errors_and_itself():
    modules = sorted(TRACKING.glob("*.py"))
    assert {p.name for p in modules} >= {"io.py", "checkpoint.py", "run_dir.py", "sinks.py"}
    above = {
        p.name: sorted(
            name
            for name in _alignkit_imports(p)
            if name != "alignkit.errors" and not name.startswith("alignkit.tracking")
        )
        for p in modules
    }
    assert above == {p.name: [] for p in modules}
    assert _alignkit_imports(TRACKING / "io.py") == set()
