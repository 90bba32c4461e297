"""Issue 26: the layout has no circles and nothing runs back up. Every import is read, the ones inside
functions too (the circles of old were function-level imports), straight from the source."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("loftq", "search_spaces", "planner")  # loftq <- search_spaces <- planner
# planner's parts from the bottom up (README "Code map"); a part imports only parts of a lower rank
RANK = {"errors": 0, "options": 0.1, "files": 1, "progress": 1, "devices": 1, "budget": 1,
        "settings": 2, "overheads": 2.1, "memory": 2.2, "artifact": 3, "sources": 4, "runtime": 5, "train": 6,
        "scoring": 7, "search": 8, "build": 8, "verify": 9, "cli": 10, "__main__": 11, "__init__": 11}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # "from planner import progress" imports the module planner.progress, not planner's __init__
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "planner.files.atomic.atomic_write" -> the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "planner":
        return None
    return "__init__" if len(parts) == 1 else parts[1]


def test_imports_point_down() -> None:
    graph = _graph()
    order = {p: i for i, p in enumerate(PACKAGES)}
    wrong = []
    for mod, targets in graph.items():
        for t in targets:
            top_m, top_t = mod.split(".")[0], t.split(".")[0]
            if order[top_t] > order[top_m]:
                wrong.append(f"{mod} -> {t}")
                continue
            pm, pt = _part(mod), _part(t)
            if pm is None or pt is None or pm == pt or pm == "__init__":
                continue
            assert pm in RANK and pt in RANK, f"{mod} or {t}: a part of planner without a rank (add it to README)"
            if RANK[pt] >= RANK[pm]:
                wrong.append(f"{mod} ({pm}) -> {t} ({pt})")
    assert wrong == [], "\n".join(wrong)


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own submodules (re-exports, registration) is no circle of the layout
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert cycles == [], "\n".join(cycles)


def test_the_planner_top_level_is_small() -> None:
    """Issue 26 counted 24 entries (16 modules, 8 folders)."""
    entries = [p.name for p in (ROOT / "planner").iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 21, sorted(entries)
