"""The package's layout rules: no import cycle (function-level imports counted), areas import only
downwards, no oversized module. These read the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdvae"

# Areas from the bottom up: a module may import its own area and the areas of lower ranks only.
RANKS = {
    "errors": 0,
    "atomic": 1, "seeding": 1, "local_weights": 1, "progress": 1, "device": 1, "heap": 1,
    "storage": 1.5,  # object storage: below images and latents, above atomic
    "model": 2, "images": 2, "metrics": 2,
    "codec": 3,
    "latents": 4,
    "train": 5, "eval": 5,
    "cli": 6, "__main__": 7,
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


def test_tests_mirror_the_tree() -> None:
    """A test folder per package area or ``tools``; top-level test files are named after a top-level module
    or test the repository as a whole (layout, packaging, docs)."""
    tests = Path(__file__).resolve().parent
    areas = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders <= areas | {"tools"}, f"test folders that mirror nothing: {sorted(folders - areas - {'tools'})}"
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    loose = {p.stem.removeprefix("test_") for p in tests.glob("test_*.py")} - modules - {"layout", "packaging", "docs"}
    assert not loose, f"top-level test files that mirror no top-level module: {sorted(loose)}"
    tools = {p.stem for p in (PACKAGE.parent / "tools").glob("*.py")}
    tools |= {p.parent.name for p in (PACKAGE.parent / "tools").glob("*/__init__.py")}  # packages (benchkit)
    stray = {p.stem.removeprefix("test_") for p in (tests / "tools").glob("test_*.py")} - tools
    assert not stray, f"tests/tools files named after no tool: {sorted(stray)}"


def test_no_module_over_the_size_limit() -> None:
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_import_and_the_cli_parser_stay_light() -> None:
    """``import sdvae`` and building every subcommand's parser (``sdvae --help``) load no torch/diffusers."""
    import subprocess
    import sys

    code = ("import sys, sdvae, sdvae.cli.main as cli; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'datasets', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
