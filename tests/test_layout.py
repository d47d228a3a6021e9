"""The dependency direction of docs/design.md §4, read from the source (ast, nothing executed).

Every import counts, also those inside functions (a lazy import is still a dependency). Fails on
an import cycle, on any module but the CLI importing the trainer, and on the ops layer (bridge,
models, ext, kernels) importing config.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ("agm_fast.bridge", "agm_fast.models", "agm_fast.ext")


def _module_files() -> dict[str, Path]:
    files = {f"agm_fast.{p.stem}": p for p in (ROOT / "agm_fast").glob("*.py") if p.stem != "__init__"}
    files.update({f"agm_fast.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"})
    files["agm_fast"] = ROOT / "agm_fast" / "__init__.py"
    files["agm_fast.kernels"] = ROOT / "kernels" / "__init__.py"
    return files


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` (a dotted import target) lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    known = set(files)
    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from pkg import mod` names a module; `from mod import name` a name in it
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                dep = _resolve(target, known)
                if dep is None or dep == mod or dep == "agm_fast":  # the package itself: its version string
                    continue
                if dep == "agm_fast.kernels" and mod.startswith("agm_fast.kernels."):
                    continue  # `from . import philox` inside the kernels package
                deps.add(dep)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_real_imports():
    # guards the walker itself: a walk that found nothing would pass every test below
    g = import_graph()
    assert "agm_fast.checkpoint" in g["agm_fast.trainer"] and "agm_fast.step" in g["agm_fast.trainer"]
    assert "agm_fast.rng" in g["agm_fast.kernels.philox"] and "agm_fast.kernels.utils" in g["agm_fast.kernels.philox"]
    assert "agm_fast.kernels" in g["agm_fast.dispatch"]  # a lazy import inside a function counts
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_only_the_cli_imports_the_trainer():
    importers = sorted(m for m, deps in import_graph().items() if "agm_fast.trainer" in deps)
    assert importers == ["agm_fast.cli"], importers


def test_the_ops_layer_does_not_import_config():
    g = import_graph()
    ops = [m for m in g if m in OPS or m.startswith("agm_fast.kernels")]
    assert len(ops) >= 7, ops
    offenders = sorted(m for m in ops if "agm_fast.config" in g[m])
    assert not offenders, f"these ops modules import agm_fast.config: {offenders}"
