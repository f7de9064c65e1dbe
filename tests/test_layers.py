"""The package's layers (docs/design/index.md, "The map"): every module imports only from its own layer or the
layers below it, and never in a circle. Read from the source (every import, including the ones inside
functions that keep ``import robustedge`` light), so a new upward import fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robustedge"

# lowest first; a module belongs to the first layer whose prefixes match its dotted name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("verifier (torch-free, shipped in every bundle)", ("robustedge.verifier",
                                                        "robustedge._version", "robustedge.seeds",
                                                        "robustedge.reference")),
    ("foundations", ("robustedge.errors", "robustedge.options", "robustedge.files", "robustedge.runtime",
                     "robustedge.pt2e_fast", "robustedge.registry", "robustedge.attack_table")),
    ("building blocks", ("robustedge.models", "robustedge.data", "robustedge.attacks", "robustedge.runners",
                         "robustedge.qat", "robustedge.robustbench_zoo")),
    ("model files", ("robustedge.checkpoint", "robustedge.weights", "robustedge.training_state",
                     "robustedge.loading", "robustedge.teachers")),
    ("methods and configs", ("robustedge.methods", "robustedge.config", "robustedge.qat_recipe", "robustedge.flags",
                             "robustedge.sharding")),
    ("evaluation", ("robustedge.suite", "robustedge.eval_report", "robustedge.run_measures")),
    ("training", ("robustedge.trainer", "robustedge.training_parts", "robustedge.training_log", "robustedge.dryrun")),
    ("export", ("robustedge.edge",)),
    ("products", ("robustedge.api", "robustedge.report", "robustedge.quickstart", "robustedge.app")),
    ("entry points", ("robustedge.cli", "robustedge")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to the table")


def _imports(path: Path, module: str) -> set[str]:
    """The robustedge modules ``path`` imports (``from robustedge.x import y`` counts ``robustedge.x.y``
    when that is a module, else ``robustedge.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("robustedge"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("robustedge"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(module)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = _layer(module)
    upward = sorted(m for m in GRAPH[module] if m != "robustedge" and _layer(m) > own)
    assert not upward, (f"{module} ({LAYERS[own][0]}) imports from a higher layer: "
                        + ", ".join(f"{m} ({LAYERS[_layer(m)][0]})" for m in upward))


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == "robustedge" or nxt not in GRAPH:
                continue  # the package itself only re-exports (lazily); its submodules are checked
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_only_the_entry_points_import_the_package_root():
    """``from robustedge import x`` from inside the library would run the package's ``__init__`` and
    tie every layer to the top one; modules import the leaf they need (e.g. ``robustedge._version``)."""
    offenders = sorted(name for name, deps in GRAPH.items() if "robustedge" in deps and _layer(name) < len(LAYERS) - 1)
    assert not offenders, f"import the leaf module, not the package root: {offenders}"


def test_no_source_module_is_over_500_lines():
    """A module that outgrows this holds more than one job: split it by job (docs/design/index.md, "The map")."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"split these modules by job: {long}"
