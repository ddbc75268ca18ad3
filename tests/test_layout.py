"""The package's layout keeps its promises: each is a rule read from the code itself.

These are the properties that let a new endpoint, store or backend land in a module of
its own: the engine names no kind, no module imports itself round a circle, imports
sit at the top (but for optional heavy dependencies chosen at run time), and a
function reads on one screen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchrun
from batchrun.endpoints import ENDPOINTS

PACKAGE = Path(batchrun.__file__).resolve().parent
MAX_FUNCTION_LINES = 60
# Imported where chosen, so that neither the base install nor start-up carries them.
OPTIONAL = {"ray", "tokenizers", "tiktoken", "fsspec"}
# `python -m batchrun` loads the command inside `main`, where a Ctrl-C while pyarrow and
# the HTTP stack load can end it quietly (see batchrun/__main__.py).
# aiohttp (0.1 s to import) carries requests only through a proxy, jsonschema (50 ms)
# checks answers only for a schema, Jinja2 (20 ms) renders only templates: each loads then.
# httpx (80 ms) serves an httpx transport (tests, `mock://`), a URL out of the ordinary and
# the batch backend, never the live path's requests. urllib.request (12 ms) reads NO_PROXY
# only where a proxy is set; tqdm (14 ms) draws a bar only on a terminal.
LATE_ON_PURPOSE = {("__main__.py", "batchrun._cli"), ("client.py", "batchrun.http.aio"), ("schema.py", "jsonschema"),
                   ("template.py", "jinja2"), ("template.py", "jinja2.sandbox"), ("template.py", "jinja2.nodes"),
                   ("client.py", "batchrun.http.bounded"), ("client.py", "httpx"),
                   ("preflight.py", "batchrun.http.mock"), ("__init__.py", "batchrun.backends.batch.backend"),
                   ("network.py", "urllib.request"), ("progress.py", "tqdm")}


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def test_the_rules_read_the_whole_package() -> None:
    names = {name for name, _, _ in modules()}
    assert {"batchrun", "batchrun.endpoints", "batchrun.engine.run", "batchrun._cli"} <= names


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The batchrun modules (or third-party roots) an import statement loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module or ""]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = ".".join(package[: len(package) - node.level + 1])
    target = f"{base}.{node.module}" if node.module else base
    # `from . import x` loads the module x when x is one
    return [f"{target}.{alias.name}" if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(
        ".py").exists() else target for alias in node.names]


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"  # type: ignore[attr-defined]


def test_no_module_outside_endpoints_names_an_endpoint() -> None:
    names = set(ENDPOINTS)
    found = []
    for _, path, tree in modules():
        if "endpoints" in path.relative_to(PACKAGE).parts:
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        found += [where(path, n) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in names and id(n) not in docstrings]
    assert found == [], "an endpoint's rules belong on its kind in batchrun/endpoints/"


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {}
    for name, path, tree in modules():
        graph[name] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in imported(name, path, node) if target.startswith("batchrun")}
    circles = []
    for start in graph:  # a circle is a path from a module back to itself
        seen, todo = set(), [(start, (start,))]
        while todo:
            at, trail = todo.pop()
            for nxt in graph.get(at, ()):
                if nxt == start:
                    circles.append(" -> ".join((*trail, start)))
                elif nxt not in seen and nxt in graph:
                    seen.add(nxt)
                    todo.append((nxt, (*trail, nxt)))
    assert circles == []


def test_imports_are_at_the_top_but_optional_heavy_ones() -> None:
    late = []
    for name, path, tree in modules():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in imported(name, path, node):
                        if target.split(".")[0] not in OPTIONAL and (path.name, target) not in LATE_ON_PURPOSE:
                            late.append(f"{where(path, node)} {target}")
    assert late == []


def test_every_function_reads_on_one_screen() -> None:
    long = [f"{where(path, node)} {node.name}: {node.end_lineno - node.lineno + 1} lines"  # type: ignore[operator]
            for _, path, tree in modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # type: ignore[operator]
    assert long == []


@pytest.mark.parametrize("folder, unknown", [
    ("engine", ("batchrun.backends", "batchrun.tools", "batchrun._cli")),
    ("storage", ("batchrun.engine", "batchrun.backends", "batchrun.tools")),
    ("spec", ("batchrun.storage", "batchrun.engine", "batchrun.http", "batchrun.backends", "batchrun.tools")),
    ("inputs", ("batchrun.storage", "batchrun.engine", "batchrun.http", "batchrun.backends", "batchrun.tools")),
    ("policy", ("batchrun.engine", "batchrun.http", "batchrun.storage", "batchrun.backends")),
    ("endpoints", ("batchrun.engine", "batchrun.http", "batchrun.storage", "batchrun.backends")),
])
def test_a_layer_knows_nothing_of_those_built_on_it(folder: str, unknown: tuple[str, ...]) -> None:
    wrong = [f"{where(path, node)} {target}" for name, path, tree in modules() if name.startswith(f"batchrun.{folder}")
             for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for target in imported(name, path, node) if target.startswith(unknown)]
    assert wrong == []


def test_only_the_store_asks_where_the_output_lives() -> None:
    asked = [where(path, node) for name, path, tree in modules()
             if not name.startswith(("batchrun.storage", "batchrun.spec"))
             for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "output_url"]
    assert asked == [], "the store is chosen once, by storage.open_store"
