"""Every Python example in README.md and docs/ runs, as written, in this test.

The conventions (also in docs/contributing.md):

- A page's ```python blocks run top to bottom in one namespace, under asyncio, with top-level
  ``await`` allowed, as in ``python -m asyncio``.
- A block right after the line ``<!-- fragment -->`` is illustrative and is not run.
- A block right after the line ``<!-- pytest -->`` is a test module: it is written to a file and
  run by pytest in a subprocess, which must pass at least one test and fail none.
- A page that needs servers starts with ``<!-- docs-setup: NAME[, NAME] -->``; the setups in
  ``tests/_docs_setups.py`` start them and inject names into the namespace.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _docs_setups import SETUPS

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")],
    key=lambda p: p.relative_to(ROOT).as_posix(),
)

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
_SETUP = re.compile(r"<!--\s*docs-setup:\s*(?P<names>[\w ,]+?)\s*-->")
_MARK = re.compile(r"^\s*<!--\s*(?P<mark>fragment|pytest)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    mark: str | None  # "fragment", "pytest" or None
    source: str


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, with the marker comment (if any) on the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = len(opening["indent"])
        j = i + 1
        while j < len(lines) and not re.match(r"^ *```\s*$", lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.name}:{i + 1}: a code block is never closed")
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marked = _MARK.match(previous)
        body = "\n".join(line[indent:] for line in lines[i + 1 : j])
        found.append(
            Block(page, i + 1, opening["lang"], marked["mark"] if marked else None, body + "\n")
        )
        i = j + 1
    return found


def setups_of(page: Path) -> list[str]:
    """The setup names a page asks for with ``<!-- docs-setup: ... -->``."""
    names: list[str] = []
    for match in _SETUP.finditer(page.read_text(encoding="utf-8")):
        names.extend(name.strip() for name in match["names"].split(",") if name.strip())
    return names


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


async def _run_blocks(code_blocks: list[Block], namespace: dict[str, Any]) -> None:
    for block in code_blocks:
        filename = f"{_id(block.page)}:{block.line}"
        code = compile(block.source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            await result


def test_pages_are_found() -> None:
    """The test sees the README and the documentation pages, and their Python examples."""
    names = {_id(p) for p in PAGES}
    assert "README.md" in names
    assert "docs/index.md" in names
    assert sum(b.lang == "python" for p in PAGES for b in blocks(p)) > 50


def test_marker_parsing(tmp_path: Path) -> None:
    """Fragments and pytest modules are told apart from plain examples; setups are read."""
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-setup: postgres, redis -->\n\n"
        "```python\nx = 1\n```\n\n"
        "<!-- fragment -->\n```python\nnot run\n```\n\n"
        "<!-- pytest -->\n\n```python\ndef test_a(): pass\n```\n"
        "- item\n\n  ```python\n  y = 2\n  ```\n",
        encoding="utf-8",
    )
    found = blocks(page)
    assert [(b.mark, b.source) for b in found] == [
        (None, "x = 1\n"),
        ("fragment", "not run\n"),
        ("pytest", "def test_a(): pass\n"),
        (None, "y = 2\n"),
    ]
    assert setups_of(page) == ["postgres", "redis"]


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_examples_run(page: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The page's Python examples run without error, in order, in one namespace."""
    python = [b for b in blocks(page) if b.lang in ("python", "py")]
    runnable = [b for b in python if b.mark is None]
    modules = [b for b in python if b.mark == "pytest"]
    if not runnable and not modules:
        return
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for name in setups_of(page):
        assert name in SETUPS, f"{_id(page)} asks for an unknown docs setup {name!r}"
        namespace.update(SETUPS[name](request))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples that write files write them here
    try:
        asyncio.run(_run_blocks(runnable, namespace))
    finally:
        os.chdir(cwd)
    for index, block in enumerate(modules):
        test_file = tmp_path / f"test_docs_example_{index}.py"
        test_file.write_text(block.source, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        where = f"{_id(page)}:{block.line}"
        assert done.returncode == 0, f"{where} failed under pytest:\n{done.stdout}{done.stderr}"
        assert re.search(r"\b\d+ passed\b", done.stdout), f"{where} ran no test:\n{done.stdout}"


def test_connections_leave_no_loopback() -> None:
    """The suite's guard fails any connection from the test process to a non-loopback address."""
    import socket

    with socket.socket() as sock, pytest.raises(OSError, match="loopback"):
        sock.connect(("10.0.0.1", 26379))

    async def open_remote() -> None:
        await asyncio.open_connection("192.0.2.1", 5432)

    with pytest.raises(OSError, match="loopback"):
        asyncio.run(open_remote())
