"""The repository's layout (docs/design.md, "Where things live" and "Conventions", rule 8).

The import graph is read from the source with ast, not by importing: every `import` and `from ...
import` counts, at module level and inside functions alike (a lazy import still ties two modules
together). `from P import x` is an edge to the module P.x when that module exists, else to P.
A package's __init__ is the node P; importing a submodule is not counted as importing its parent
package (Python runs the parent's __init__ first, but the parent does not depend on the child).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scanner"
# The model may import these and its own modules, nothing else of the scanner.
MODEL_MAY_IMPORT = ("scanner.model", "scanner.config", "scanner.errors")
MAX_TOP_LEVEL_MODULES = 12


def _modules() -> dict[str, Path]:
    """Every module of the scanner package, by dotted name (scanner/kernels is the link to kernels/)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    kernels = PACKAGE / "kernels"
    if kernels.is_symlink():  # rglob does not follow links on every Python version
        for path in sorted(kernels.glob("*.py")):
            name = "scanner.kernels" if path.stem == "__init__" else f"scanner.kernels.{path.stem}"
            found[name] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules) if target.split(".")[0] == "scanner" else None
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_lazy_imports_and_cycles():
    graph = import_graph()
    # A lazy import inside a function is an edge (scanner.model.weights loads the Detector lazily).
    assert "scanner.model.detector" in graph["scanner.model.weights"]
    assert "scanner.kernels.build" in graph["scanner.kernels"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_model_does_not_import_the_pipeline():
    graph = import_graph()
    model = [name for name in graph if name == "scanner.model" or name.startswith("scanner.model.")]
    assert "scanner.model.detector" in model
    for name in model:
        outside = {m for m in reachable(graph, name) if not any(m == p or m.startswith(p + ".") for p in MODEL_MAY_IMPORT)}
        assert not outside, f"{name} imports {sorted(outside)} (directly or through others)"


def test_packages_have_a_docstring_and_few_modules_stay_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    packages = [p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    assert {p.name for p in packages} >= {"model", "scan", "sources", "decoding", "backends", "kernels", "training",
                                          "reports", "bench", "distributed"}
    for package in packages + [PACKAGE]:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc) > 60, f"{package} has no docstring worth the name"


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]


# Notes that lived beside the repository, never in it: nothing may point at them.
OUTSIDE = re.compile(r"shared/|DESIGN\.md|FACTS\.md|GPU\.md")


def test_nothing_points_outside_the_repository():
    bad = []
    for path in _tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tests/test_layout.py" or path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (weights)
        bad += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_references_to_docs_design_name_its_sections():
    headings = set(re.findall(r"^## \d+\. (.+)$", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited = set()
    for path in _tracked_files():
        if path.suffix in (".py", ".md", ".sh", ".yaml", ".cu") and not path.is_symlink():
            cited |= set(re.findall(r'docs/design\.md,\s+"([^"]+)"', path.read_text(encoding="utf-8")))
    assert cited and cited <= headings, sorted(cited - headings)


def test_docs_design_shows_every_package():
    design = (ROOT / "docs" / "design.md").read_text()
    for package in PACKAGE.iterdir():
        if package.is_dir() and (package / "__init__.py").is_file():
            assert re.search(rf"^\s+{package.name}/? ", design, re.M) or f"{package.name} ->" in design, package.name


@pytest.mark.parametrize("command", [["-m", "scanner", "--help"], ["cli.py", "--help"]])
def test_the_command_runs_as_a_module_and_from_the_checkout(command):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and " run " in result.stdout


def test_the_version_comes_from_the_distribution():
    # The distribution is glff-scanner (`scanner` on PyPI is another project); the package is scanner.
    result = subprocess.run([sys.executable, "-m", "scanner", "--version"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("scanner, version ")
