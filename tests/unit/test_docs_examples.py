"""Docs examples run (STYLE 15): every python block in docs/ is an example file, verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
_BLOCK = re.compile(r"<!-- example: (?P<path>[^ ]+) -->\n```python\n(?P<code>.*?)```", re.S)


def test_every_python_block_is_a_verbatim_example_file() -> None:
    for md in DOCS.glob("*.md"):
        text = md.read_text()
        blocks = list(_BLOCK.finditer(text))
        assert text.count("```python") == len(blocks), f"{md.name}: python block without an example marker"
        for b in blocks:
            path = REPO / b.group("path")
            assert path.is_file(), f"{md.name} refers to missing {path}"
            assert path.read_text() == b.group("code"), f"{md.name}: block differs from {b.group('path')}"


def test_imaging_example_runs() -> None:
    r = subprocess.run([sys.executable, str(DOCS / "examples" / "imaging.py")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "letterbox (64, 96, 3)" in r.stdout and "refused:" in r.stdout
