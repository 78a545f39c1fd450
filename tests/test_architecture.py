"""The shape docs/ARCHITECTURE.md promises, checked on the source: imports go one way,
no package has an import circle, no module reaches into another's private members, and
modules stay a size a reader can hold in their head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "providers", "policies", "tracking")
# What providers, policies and tracking may import of each other: the shared types.
SHARED = {"providers.schemas", "providers.errors"}
MAX_LINES = 400
# Known to be over MAX_LINES, each with its reason.
LONG = {
    "providers/local/engine.py": "the batching engine",
    "providers/local/llama_cpp.py": "the llama.cpp engine",
}
# Private names of other libraries that have no public spelling.
FOREIGN_PRIVATE = (
    "os._Environ",  # the standard library's type of os.environ, in annotations
    "torch.ops.aten._weight_int8pack_mm",  # the int8 weight-only matmul kernel
)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, anywhere in it (function bodies too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in MODULES:
                out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
    return out


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_imports_go_one_way():
    wrong = []
    for name, targets in GRAPH.items():
        package = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other == package or package == "gateway":
                continue
            if other == "gateway" or target not in SHARED:
                wrong.append(f"{name} -> {target}")
    assert not wrong


def test_no_package_has_an_import_circle():
    circles = []

    def visit(name: str, path: list[str]) -> None:
        for target in GRAPH[name]:
            if target == path[0]:
                circles.append(" -> ".join([*path, target]))
            elif target not in path:
                visit(target, [*path, target])

    for name in GRAPH:
        visit(name, [name])
    assert not circles


def test_no_module_reaches_into_another_modules_private_members():
    reached = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                reached += [f"{name}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__")
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                reached.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert [r for r in reached if not any(name in r for name in FOREIGN_PRIVATE)] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    path = MODULES[name]
    relative = str(path.relative_to(ROOT))
    lines = len(path.read_text().splitlines())
    if relative in LONG:
        pytest.skip(f"{relative}: {LONG[relative]} ({lines} lines)")
    assert lines <= MAX_LINES, f"{relative} has {lines} lines"


def test_every_fast_path_names_a_row_of_the_benchmarks():
    import re

    benchmarks = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    rows = set(re.findall(r"^\| ([^|]+?) \| `", benchmarks, re.MULTILINE))
    named = {}
    for name, path in MODULES.items():
        for row in re.findall(r'Fast path: docs/BENCHMARKS\.md "([^"]+)"', path.read_text()):
            named.setdefault(row, name)
    assert named, "no fenced fast path found"
    assert {row: name for row, name in named.items() if row not in rows} == {}
