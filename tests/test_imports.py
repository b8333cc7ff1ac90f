"""No import cycles among vivace's modules: every `import` of a vivace module, at module level or inside a function
(not the ones under `if TYPE_CHECKING:`, which never run), is an edge; the graph must have no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"vivace": ROOT / "engine", "vivace.kernels": ROOT / "kernels", "vivace.export": ROOT / "export"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    found["vivace"] = ROOT / "engine" / "api.py"  # the package's generated __init__ re-exports vivace.api
    return found


EXTENSIONS = {"vivace._C"}  # compiled: imports nothing of vivace


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name in ("__init__.py", "api.py") and name == "vivace" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in targets if target in known and target != name}


def test_vivace_modules_import_no_cycle() -> None:
    found = modules()
    known = set(found) | EXTENSIONS
    graph = {name: imports(name, path, known) for name, path in found.items()} | {name: set() for name in EXTENSIONS}
    assert graph["vivace.engine"], "the analysis found no import at all"
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def _graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found) | EXTENSIONS
    return {name: imports(name, path, known) for name, path in found.items()}


def test_kernels_import_nothing_of_the_engine() -> None:
    """vivace.kernels stands alone: the engine calls it, never the other way round (vivace._C is a leaf)."""
    outside = {
        name: sorted(target for target in targets if not target.startswith("vivace.kernels") and target != "vivace._C")
        for name, targets in _graph().items() if name.startswith("vivace.kernels")
    }
    assert len(outside) > 5 and not any(outside.values()), outside


def test_shared_code_imports_no_family() -> None:
    """Only the families themselves, their converters (vivace.export) and the CLI's front end name a family; the
    core, model, codecs, packs and the engine reach families through vivace.packs.registry by name."""
    allowed = ("vivace.families", "vivace.export", "vivace.cli")
    offenders = {
        name: sorted(target for target in targets if target.startswith("vivace.families"))
        for name, targets in _graph().items() if not name.startswith(allowed)
    }
    assert "vivace.core.engine_core" in offenders and not any(offenders.values()), offenders
