"""``verify.py``: the verifier package as the one torch-free file every bundle carries.

:func:`assemble` concatenates the modules of :data:`MODULES`, in that order (each imports only the ones
before it), each one's top-level code verbatim: what it leaves out is each module's docstring (the
file's docstring is :mod:`robustedge.verifier.cli`'s, the usage that ``--help`` prints), its
``from __future__`` line (hoisted once to the top), its ``from robustedge.verifier.<module> import``
lines (in one file those names are simply defined above) and its other imports, hoisted to the top,
merged. The ``if __name__ == "__main__"`` footer ends it. So the library and the device run the same
code, and a change to a check is made once, in the package.

The assembly refuses (``RuntimeError``: a bug in the package, not the user's) what would make the one
file differ from the package: a module importing a later one or anything else of RobustEdge, an
import inside a function of another verifier module, a renamed (``as``) import from the package, a
top-level statement other than a definition, and two modules defining the same name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "robustedge.verifier"
MODULES = ("formats", "base", "flags", "gate", "schema", "runners", "replays", "tables", "cli")  # dependency order
FOLDER = Path(__file__).resolve().parent
RULE = "# " + "-" * 92
FOOTER = 'if __name__ == "__main__":\n    sys.exit(main())\n'
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def _defined(node: ast.stmt) -> list[str]:
    """The top-level names a definition binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if not all(isinstance(t, ast.Name) for t in targets):
        raise RuntimeError(f"line {node.lineno}: a top-level assignment binds plain names only")
    return [t.id for t in targets]


def _in_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


class _Parts:
    """The pieces of every module: kept code, hoisted imports, the names each module defines."""

    def __init__(self) -> None:
        self.sections: list[str] = []
        self.plain_imports: set[tuple[str, str | None]] = set()  # import x [as y]
        self.from_imports: dict[str, set[tuple[str, str | None]]] = {}  # from x import a [as b]
        self.defined: dict[str, set[str]] = {}  # module -> names
        self.docstrings: dict[str, str] = {}  # module -> its docstring's source text

    def add(self, module: str) -> None:
        path = FOLDER / f"{module}.py"
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        lines = text.splitlines(keepends=True)
        where = f"robustedge/verifier/{module}.py"
        self._refuse_inner_imports(tree, where)
        kept, previous_end, names = [], 0, set()
        for index, node in enumerate(tree.body):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                self.docstrings[module] = "".join(lines[start - 1:node.end_lineno])
            elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
                if [a.name for a in node.names] != ["annotations"]:
                    raise RuntimeError(f"{where}:{node.lineno}: only 'from __future__ import annotations' is hoisted")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self._import(node, module, where)
            elif isinstance(node, DEFINITIONS):
                for name in _defined(node):
                    if name in names or any(name in d for d in self.defined.values()):
                        raise RuntimeError(f"{where}:{node.lineno}: '{name}' is defined twice in the verifier")
                    names.add(name)
                kept.append("".join(lines[previous_end:node.end_lineno]))
            else:
                raise RuntimeError(f"{where}:{node.lineno}: a top-level statement other than a definition")
            previous_end = node.end_lineno
        self.defined[module] = names
        title = (ast.get_docstring(tree) or module).splitlines()[0]
        header = f"{RULE}\n# {where}\n# {title}\n{RULE}\n"
        self.sections.append(header + "\n" + "".join(kept).lstrip("\n"))

    def _import(self, node: ast.Import | ast.ImportFrom, module: str, where: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "robustedge":
                    raise RuntimeError(f"{where}:{node.lineno}: imports {alias.name} (use 'from {PACKAGE}.<module> "
                                       f"import name')")
                self.plain_imports.add((alias.name, alias.asname))
            return
        if node.level or not node.module:
            raise RuntimeError(f"{where}:{node.lineno}: relative import; the verifier's imports are absolute")
        if node.module.split(".")[0] == "robustedge":
            source = node.module[len(PACKAGE) + 1:] if node.module.startswith(PACKAGE + ".") else None
            if source not in MODULES[:MODULES.index(module)]:
                raise RuntimeError(f"{where}:{node.lineno}: imports {node.module}; a verifier module imports only "
                                   f"the verifier modules before it ({', '.join(MODULES)})")
            for alias in node.names:
                if alias.asname or alias.name not in self.defined[source]:
                    raise RuntimeError(f"{where}:{node.lineno}: '{alias.name}' must be imported by its own name "
                                       f"from the module defining it")
            return
        self.from_imports.setdefault(node.module, set()).update((a.name, a.asname) for a in node.names)

    @staticmethod
    def _refuse_inner_imports(tree: ast.Module, where: str) -> None:
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(name.split(".")[0] == "robustedge" for name in names):
                raise RuntimeError(f"{where}:{node.lineno}: imports RobustEdge inside a function")

    def imports(self) -> str:
        """The hoisted imports: the standard library's, then the others (numpy), as isort orders them."""
        bound: dict[str, str] = {}
        for name, asname in self.plain_imports:
            bound[asname or name.split(".")[0]] = name
        for source, names in self.from_imports.items():
            for name, asname in names:
                target = f"{source}.{name}"
                if bound.setdefault(asname or name, target) != target:
                    raise RuntimeError(f"two verifier modules import different things as '{asname or name}'")
        clash = sorted(set(bound) & set().union(*self.defined.values()))
        if clash:
            raise RuntimeError(f"a verifier module defines {', '.join(clash)}, a name another one imports")
        groups = []
        for stdlib in (True, False):
            plain = sorted((n, a) for n, a in self.plain_imports if _in_stdlib(n) == stdlib)
            lines = [f"import {n}" + (f" as {a}" if a else "") for n, a in plain]
            for source in sorted(s for s in self.from_imports if _in_stdlib(s) == stdlib):
                names = sorted(self.from_imports[source])
                lines.append(f"from {source} import " + ", ".join(n + (f" as {a}" if a else "") for n, a in names))
            if lines:
                groups.append("\n".join(lines) + "\n")
        return "\n".join(groups)


def assemble() -> str:
    """The text of the ``verify.py`` every bundle carries (see the module docstring)."""
    parts = _Parts()
    for module in MODULES:
        parts.add(module)
    if "main" not in parts.defined[MODULES[-1]] or "cli" not in parts.docstrings:
        raise RuntimeError("the verifier's last module must be cli, with its usage docstring and main()")
    note = ("# Assembled by robustedge.verifier.assemble from the modules of robustedge/verifier/, each one's code\n"
            "# verbatim in the order they import each other: change the package, never this file.\n")
    return ("#!/usr/bin/env python3\n" + parts.docstrings["cli"] + "\nfrom __future__ import annotations\n\n" + note
            + "\n" + parts.imports() + "\n\n" + "\n\n".join(parts.sections) + "\n\n" + FOOTER)
