"""The package's import contract: layers point one way and no module imports itself back.

Every import counts, those inside functions too (they are how cycles hide). The layers, lowest
first; a module may import its own layer's package and any lower layer:

    errors, resources <- engine <- models <- data <- config <- store <- analysis
        <- pipeline | zoo <- cli

`pipeline` and `zoo` are siblings: neither imports the other. `rl_circuits/__init__.py` only
names modules for its lazy exports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rl_circuits"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "resources"),
    ("engine",),
    ("models",),
    ("data",),
    ("config",),
    ("store",),
    ("analysis",),
    ("pipeline", "zoo"),
    ("cli",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import module` imports the module; `from module import name` the module
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = targets or [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("rl_circuits") and target not in ("rl_circuits", name):
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in _graph() if m != "rl_circuits" and _layer(m) not in RANK)
    assert not unplaced, f"modules outside the declared layers: {unplaced}"


def test_imports_point_down_the_layers():
    wrong = [
        f"{module} imports {target} ({_layer(module)} may not use {_layer(target)})"
        for module, targets in _graph().items()
        if module != "rl_circuits"
        for target in sorted(targets)
        if _layer(target) != _layer(module) and RANK[_layer(target)] >= RANK[_layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)
