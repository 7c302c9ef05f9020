"""The import table of docs/architecture.md is the law: every module's imports are checked.

The table lives between ``<!-- import-table -->`` markers in ``docs/architecture.md``;
this test parses it, parses every module of every room with ``ast`` (top-level and
function-local imports alike) and fails with ``file:line`` for each import the table
does not allow. A second test adds a forbidden import to a copy of a room and shows
the check catches it.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE = REPO / "docs" / "architecture.md"
ROOMS = ("visionfleet.cli", "visionfleet", "cluster", "serve_apps", "tune", "train", "edge_export", "edge_agent")


@dataclass(frozen=True)
class Rule:
    room: str
    may: frozenset[str]  # rooms (or room.module prefixes) this room may import
    never: frozenset[str]  # third-party top-level packages it must never import
    lazy: frozenset[str]  # packages or rooms it may import only inside functions


def _names(cell: str) -> frozenset[str]:
    return frozenset(re.findall(r"`([A-Za-z_][\w.]*)`", cell))


def parse_table(text: str) -> dict[str, Rule]:
    """The rules of the markdown table between the import-table markers."""
    m = re.search(r"<!-- import-table -->(.*?)<!-- /import-table -->", text, re.S)
    if m is None:
        raise ValueError("docs/architecture.md has no <!-- import-table --> block")
    rules: dict[str, Rule] = {}
    for line in m.group(1).strip().splitlines()[2:]:  # skip the header and the --- row
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        (room,) = _names(cells[0])
        if room in rules:
            raise ValueError(f"room {room} appears twice in the import table")
        rules[room] = Rule(room, _names(cells[1]), _names(cells[2]), _names(cells[3]))
    missing = set(ROOMS) - set(rules)
    if missing:
        raise ValueError(f"the import table has no row for {sorted(missing)}")
    return rules


def _room_of(rel: Path) -> str | None:
    dotted = ".".join(rel.with_suffix("").parts)
    return next((r for r in ROOMS if dotted == r or dotted.startswith(r + ".")), None)


def _imports(tree: ast.Module):
    """(module, line, at_top) for every absolute import; at_top: runs when the module is imported."""
    top: set[int] = set()

    def visit_top(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top.add(id(node))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []) or []:
                        visit_top(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit_top(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno, id(node) in top


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Imports under ``if TYPE_CHECKING:`` never run."""
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def check(root: Path, rules: dict[str, Rule]) -> list[str]:
    """Every import under ``root`` the table does not allow, as ``file:line: why``."""
    first_party = {r.split(".")[0] for r in ROOMS}
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        room = _room_of(rel)
        if room is None:
            continue
        rule = rules[room]
        own = room.split(".")[0]
        tree = ast.parse(path.read_text(), str(rel))
        skip = _type_checking_lines(tree)
        for module, line, at_top in _imports(tree):
            if line in skip:
                continue
            top = module.split(".")[0]
            where = f"{rel}:{line}"
            if top in first_party:
                if top == own and not (room == "visionfleet" and module.startswith("visionfleet.cli")):
                    continue
                target = _room_of(Path(*module.split(".")))
                allowed = rule.may | rule.lazy
                if not any(module == a or module.startswith(a + ".") or target == a for a in allowed):
                    out.append(f"{where}: {room} must not import {module} (docs/architecture.md, import table)")
                elif at_top and not any(module == a or module.startswith(a + ".") or target == a for a in rule.may):
                    out.append(f"{where}: {room} may import {module} only inside a function")
                continue
            if top in rule.never:
                out.append(f"{where}: {room} must never import {top}")
            elif at_top and top in rule.lazy:
                out.append(f"{where}: {room} may import {top} only inside a function (keep importing {room} light)")
    return out


@pytest.fixture(scope="module")
def rules() -> dict[str, Rule]:
    return parse_table(ARCHITECTURE.read_text())


def test_every_module_follows_the_import_table(rules: dict[str, Rule]) -> None:
    violations = check(REPO, rules)
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    "path, code, needle",
    [
        ("edge_export/bad.py", "from train.models import build_model\n", "edge_export/bad.py:1: edge_export must not import train.models"),
        ("train/bad.py", "def f():\n    from serve_apps.telemetry import TelemetrySink\n", "train/bad.py:2: train must not import serve_apps"),
        ("edge_agent/bad.py", "import os\nimport torch\n", "edge_agent/bad.py:2: edge_agent must never import torch"),
        ("visionfleet/bad.py", "import ray\n", "visionfleet/bad.py:1: visionfleet must never import ray"),
        ("visionfleet/cli/bad.py", "from serve_apps.app import build_app\n", "may import serve_apps.app only inside a function"),
        ("serve_apps/bad.py", "from edge_export.quantize import quantize\n", "serve_apps must not import edge_export.quantize"),
    ],
)
def test_a_forbidden_import_is_caught_with_file_and_line(rules, tmp_path: Path, path: str, code: str, needle: str) -> None:
    room = path.split("/")[0]
    shutil.copytree(REPO / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    assert check(tmp_path, rules) == []  # the copy is clean
    (tmp_path / path).write_text(code)
    found = check(tmp_path, rules)
    assert any(needle in v for v in found), found


def test_the_table_is_read_as_written() -> None:
    rules = parse_table(ARCHITECTURE.read_text())
    assert "train" not in rules["edge_export"].may | rules["edge_export"].lazy
    assert "serve_apps" not in rules["train"].may | rules["train"].lazy
    assert {"torch", "ray"} <= rules["edge_agent"].never and {"torch", "ray"} <= rules["visionfleet"].never
    with pytest.raises(ValueError, match="twice"):
        parse_table("<!-- import-table -->\n|a|b|c|d|\n|-|-|-|-|\n| `train` | | | |\n| `train` | | | |\n<!-- /import-table -->")
