#!/usr/bin/env python
"""Check that the package reads as its architecture (STYLE.md, practices 8 and 13).

Reports, for `src/adainfer_hf/`:
- import cycles between our modules;
- function-level imports of our own modules (third-party imports inside functions are fine: optional deps);
- imports that go *up* the layer order (`LAYERS`: a folder imports only folders below it or its own);
- modules over `MAX_MODULE_LINES` lines and functions over `MAX_FUNCTION_LINES` lines.

Standard library only (`ast`). Exit status 1 on any finding. Usage: `python scripts/check_layout.py [package_dir]`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "adainfer_hf"
MAX_MODULE_LINES = 400
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
    """Findings by kind: `cycles`, `function_imports`, `upward_imports`, `long_modules`, `long_functions`."""
    modules = package_modules(root)
    findings: dict[str, list[str]] = {k: [] for k in
                                      ("cycles", "function_imports", "upward_imports", "long_modules", "long_functions")}
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
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            findings["long_modules"].append(f"{rel}: {lines} lines")
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
