"""Guard rails for the package layout: layer contracts (import-linter), code habits (ruff), no import cycles (lazy
imports included), no imports of another module's private names, and every document the code cites is in the repo."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mergeedit"


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[test]'` installs it")
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported names, line) for every import in the file, function-level ones included."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for sub in submodules:
                yield sub, [], node.lineno
            others = [n for n in names if f"{target}.{n}" not in modules]
            if others or not submodules:  # `from . import submodule` reaches the submodule, not the package's names
                yield target, others, node.lineno


def test_layer_contracts_hold():
    result = subprocess.run([_tool("lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "mergeedit", "tests", "benchmarks", "tools"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_import_cycles_lazy_imports_included():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _ in _imports(module, path, modules):
            # a package's __init__ that only holds a docstring is no edge; importing `a.b` runs `a` too, but the
            # packages here define nothing in __init__ except methods/, whose registry is a real module
            if target in modules and target != module:
                graph[module].add(target)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
    # the check can fail: a planted two-module cycle is found
    planted = {"a": {"b"}, "b": {"a"}}
    graph.update(planted)
    index.clear(), low.clear(), stack.clear(), on_stack.clear()
    cycles.clear()
    visit("a")
    assert cycles == [["a", "b"]]


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = []
    for module, path in modules.items():
        aliases: dict[str, str] = {}
        for target, names, line in _imports(module, path, modules):
            if not target.startswith("mergeedit") or target == module:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    offences.append(f"{path.relative_to(REPO)}:{line}: from {target} import {name}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") and not node.attr.startswith("__"):
                holder = node.value.id
                # a module imported by name (from .x import module) and then reached into
                if holder in aliases and any(m.endswith("." + aliases[holder]) for m in modules):
                    offences.append(f"{path.relative_to(REPO)}:{node.lineno}: {holder}.{node.attr}")
    assert not offences, "\n".join(offences)


def test_documents_the_code_cites_are_in_the_repository():
    cited = set()
    for path in PACKAGE.rglob("*.py"):
        for match in re.finditer(r"\bdocs/[\w.-]+\.md\b", path.read_text()):
            cited.add(match.group(0))
    assert cited, "the editing and evaluation modules cite docs/editing-eval.md"
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, missing


def test_top_level_is_thin():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "cli.py"], top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == ["core", "editing", "evaluation", "io", "merging", "models", "pipeline"], folders


def test_merge_options_and_cli_flags_match():
    """Every MergeOptions field with a flag is a `mergeedit merge` option, and every option of the command is either
    such a field or one of the command's own (config, output, --dry-run, --keep-intermediates, the partitioned-merge steps)."""
    import typer

    from mergeedit.cli import app
    from mergeedit.merging.merge import MergeOptions

    command = typer.main.get_command(app).commands["merge"]
    options = {opt for p in command.params for opt in p.opts if opt.startswith("--")}
    flags = MergeOptions.cli_flags()
    assert flags and set(flags.values()) <= options, set(flags.values()) - options
    assert options - set(flags.values()) == {"--dry-run", "--keep-intermediates", "--part", "--assemble", "--ray", "--workers"}, options - set(flags.values())


def test_the_environment_is_read_only_in_core_environment():
    """Every environment variable mergeedit reads is read in core/environment.py (its table lists them); elsewhere the
    code only sets defaults for libraries (setdefault) or reads a launcher's WORLD_SIZE."""
    allowed_reads = {"mergeedit/core/environment.py", "mergeedit/pipeline/distributed.py"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and isinstance(node.value, ast.Name) and node.value.id == "os":
                parent_ok = rel in allowed_reads
                found.append((rel, node.lineno, parent_ok))
    setdefaults = {
        (p.relative_to(REPO).as_posix(), n.lineno)
        for p in PACKAGE.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Attribute) and n.attr == "setdefault" and isinstance(n.value, ast.Attribute) and n.value.attr == "environ"
    }
    stray = [f"{rel}:{line}" for rel, line, ok in found if not ok and (rel, line) not in setdefaults]
    assert found, "the scan found no environment access at all: it is not looking"
    assert not stray, f"environment read outside core/environment.py: {stray}; add the variable to its table and read it there"
