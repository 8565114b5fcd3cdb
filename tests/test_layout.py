"""The package's layout rules: no import cycle (function-level imports counted), areas import only
downwards, no oversized module. These read the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdvae"

# Areas from the bottom up: a module may import its own area and the areas of lower ranks only.
RANKS = {
    "errors": 0, "atomic": 0, "seeding": 0,
    "model": 1, "images": 1, "metrics": 1,
    "codec": 2,
    "latents": 3,
    "train": 4, "eval": 4,
    "cli": 5, "__main__": 6,
}
MAX_LINES = 450


def _modules(package: Path) -> dict[str, Path]:
    mods = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body (top level or inside functions)."""
    mods = _modules(package)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.split(".")[0] == package.name and (r := resolve(t)) and r != mod:
                    graph[mod].add(r)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "sdvae"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from sdvae.a.y import f\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from sdvae.a import x\n    return x\n")
    assert find_cycle(import_graph(pkg)) is not None
    (pkg / "a" / "y.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_areas_import_only_downwards() -> None:
    wrong = []
    for mod, deps in import_graph().items():
        if mod == "sdvae":  # the public facade re-exports (lazily) from every area
            continue
        for dep in deps:
            a, b = _area(mod), _area(dep)
            if dep == "sdvae" or a == b:
                continue
            if RANKS[b] >= RANKS[a]:
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, "imports sideways or upwards: " + ", ".join(sorted(wrong))


def test_every_area_has_a_rank() -> None:
    areas = {_area(m) for m in import_graph()} - {""}
    assert areas <= set(RANKS), f"areas without a rank: {sorted(areas - set(RANKS))}"


def test_no_module_over_the_size_limit() -> None:
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
