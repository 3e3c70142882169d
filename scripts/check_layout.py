#!/usr/bin/env python
"""Check that the package reads as its architecture (CONTRIBUTING.md, "Layering" and "Module size").

Reports, for `src/adainfer_hf/`:
- import cycles between our modules;
- function-level imports of our own modules (third-party imports inside functions are fine: optional deps);
- imports that go *up* the layer order (`LAYERS`: a folder imports only folders below it or its own);
- imports of another module's underscore name (`from .codec import _probe`, `from . import _module`,
  `core._helper` on an imported module): a helper that another module needs is public, with a docstring;
- modules over `MAX_MODULE_LINES` lines (`MAX_CLASS_MODULE_LINES` for a module that defines one public class and
  nothing else public: a class is one seam, and splitting it to fit a cap makes satellites, not seams) and
  functions over `MAX_FUNCTION_LINES` lines.

Standard library only (`ast`). Exit status 1 on any finding. Usage: `python scripts/check_layout.py [package_dir]`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "adainfer_hf"
MAX_MODULE_LINES = 400
MAX_CLASS_MODULE_LINES = 600  # a module whose only public name is one class (see the docstring)
MAX_FUNCTION_LINES = 80
# Required dependencies: imported at the top like our own modules. Optional ones (matplotlib, datasets, gguf,
# sklearn_crfsuite, lm_eval, ...) may be imported inside the function that needs them.
REQUIRED = frozenset({"torch", "numpy", "sklearn", "scipy", "huggingface_hub", "transformers", "tqdm", "safetensors",
                      "joblib", "accelerate"})

# Bottom to top; names on one rank may not import each other's folders either way except as listed in order.
# A module imports only modules of its own rank or below. The package root (`__init__`, `__main__`) is on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("compat", "utils"),
    ("estimators",),
    ("artifact",),
    ("architectures",),
    ("policy",),
    ("cache",),
    ("runtime",),
    ("models",),
    ("data",),
    ("training",),
    ("evaluation",),
    ("doctor", "integrations"),
    ("cli",),
    ("__init__", "__main__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of `path` (a file under `root`, the package folder)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join([PACKAGE, *parts]) if parts != ["__init__"] else PACKAGE


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _resolve(node: ast.ImportFrom | ast.Import, current: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """Our modules that an import statement names (empty for third-party imports)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = current.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from .pkg import module` names a module; `from .module import name` names the module itself.
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name not in found:
            found.append(name)
    return found


def _is_private(name: str) -> bool:
    """An underscore name that is not a dunder (`__version__`, `__all__` are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _import_prefix(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute dotted module an `ImportFrom` reads from."""
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(tree: ast.Module, current: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """`lineno: what` for each use of another of our modules' underscore names: imported by name (a function, a
    class, a module) or read as an attribute of a module imported under a name (`arch._head_rows`)."""
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            prefix = _import_prefix(node, current, is_package)
            if not prefix.startswith(PACKAGE):
                continue
            for alias in node.names:
                target = f"{prefix}.{alias.name}"
                if target in modules:
                    module_aliases[alias.asname or alias.name] = target
                if _is_private(alias.name):
                    found.append(f"{node.lineno}: imports {alias.name} from {prefix}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE):
                    private = [part for part in alias.name.split(".") if _is_private(part)]
                    if private:
                        found.append(f"{node.lineno}: imports {alias.name}")
                    if alias.asname and alias.name in modules:
                        module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr)
                and node.value.id in module_aliases and module_aliases[node.value.id] != current):
            found.append(f"{node.lineno}: reads {module_aliases[node.value.id]}.{node.attr}")
    return sorted(set(found), key=lambda item: (int(item.split(":")[0]), item))


def public_classes_only(tree: ast.Module) -> bool:
    """Whether the module defines exactly one public top-level class and no other public function or class (its
    private helpers, constants and re-exports aside): the modules `MAX_CLASS_MODULE_LINES` applies to."""
    defined = [stmt for stmt in tree.body if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    public = [stmt for stmt in defined if not _is_private(stmt.name)]
    return len(public) == 1 and isinstance(public[0], ast.ClassDef)


def _third_party(node: ast.Import | ast.ImportFrom) -> set[str]:
    """Top-level names of the absolute imports of a statement that are not our package."""
    if isinstance(node, ast.Import):
        roots = {alias.name.split(".")[0] for alias in node.names}
    else:
        roots = set() if node.level else {(node.module or "").split(".")[0]}
    return roots - {PACKAGE}


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements run at import time (module body, including `if`/`try` blocks; not `TYPE_CHECKING`)."""
    found: list[ast.stmt] = []

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                found.append(stmt)
            elif isinstance(stmt, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(stmt.test):
                    visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                visit(stmt.body)
                for handler in stmt.handlers:
                    visit(handler.body)
                visit(stmt.orelse)
                visit(stmt.finalbody)

    visit(tree.body)
    return found


def layer_of(module: str) -> str:
    """The layer (folder or top-level module) a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def analyse(root: Path) -> dict[str, list[str]]:
    """Findings by kind: `cycles`, `function_imports`, `upward_imports`, `private_imports`, `long_modules`,
    `long_functions`."""
    modules = package_modules(root)
    kinds = ("cycles", "function_imports", "upward_imports", "private_imports", "long_modules", "long_functions")
    findings: dict[str, list[str]] = {k: [] for k in kinds}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        rel = path.relative_to(root.parent)
        is_package = path.name == "__init__.py"
        top = _top_level_imports(tree)
        graph[name] = {target for stmt in top for target in _resolve(stmt, name, is_package, modules)}
        top_ids = {id(stmt) for stmt in top}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_ids:
                if _in_type_checking(tree, node):
                    continue
                targets = _resolve(node, name, is_package, modules)
                # A deferred import still couples the modules: it counts for cycles and the layer order.
                graph[name].update(targets)
                required = sorted(_third_party(node) & REQUIRED)
                if targets or required:
                    what = ", ".join(targets + required)
                    findings["function_imports"].append(f"{rel}:{node.lineno}: imports {what}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    findings["long_functions"].append(f"{rel}:{node.lineno}: {node.name} has {length} lines")
        graph[name].discard(name)
        findings["private_imports"] += [f"{rel}:{item}" for item in private_imports(tree, name, is_package, modules)]
        lines = source.count("\n")
        cap = MAX_CLASS_MODULE_LINES if public_classes_only(tree) else MAX_MODULE_LINES
        if lines > cap:
            findings["long_modules"].append(f"{rel}: {lines} lines (cap {cap})")
        here = layer_of(name)
        for target in sorted(graph[name]):
            there = layer_of(target)
            if here != there and RANK.get(there, -1) > RANK.get(here, len(LAYERS)):
                findings["upward_imports"].append(f"{rel}: {here} imports {target} (layer {there} is above)")
    findings["cycles"] = [" -> ".join(cycle) for cycle in find_cycles(graph)]
    return findings


def _in_type_checking(tree: ast.Module, target: ast.stmt) -> bool:
    """Whether `target` sits in an `if TYPE_CHECKING:` block (never run)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(child is target for stmt in node.body for child in ast.walk(stmt)):
                return True
    return False


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_path(graph, set(component)) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ()) & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return sorted(component)


def main(argv: list[str] | None = None) -> int:
    """Print every finding; return 1 if there is any."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "src" / PACKAGE
    findings = analyse(root)
    total = 0
    for kind, items in findings.items():
        for item in items:
            print(f"{kind}: {item}")
        total += len(items)
    print(f"{total} finding(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
