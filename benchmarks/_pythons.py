"""Every supported CPython installed here, each with a venv of its own for the benchmarks."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def find_pythons() -> list[str]:
    """A CPython 3.10 ... 3.14 each, from ~/.pyenv/versions or PATH (as tests/other_pythons.sh)."""
    found = []
    for minor in range(10, 15):
        candidates = sorted(
            glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python"))
        )
        candidates.append(shutil.which(f"python3.{minor}") or "")
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                found.append(candidate)
                break
    return found


def bench_venv(python: str) -> tuple[str, Path]:
    """The version of ``python`` and the interpreter of its venv with the ``benchmarks`` extra.

    The venv lives in .venvs/bench-pyX.Y and is reinstalled when pyproject.toml changed.
    """
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    venv = ROOT / ".venvs" / f"bench-py{version}"
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    stamp = venv / ".installed"
    wanted = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if not stamp.exists() or stamp.read_text(encoding="utf-8") != wanted:
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", f"{ROOT}[benchmarks]"], check=True)
        stamp.write_text(wanted, encoding="utf-8")
    return version, venv / "bin" / "python"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "unknown"


def run_on_each(module: str, json_option: str, quick: bool) -> Iterator[tuple[dict[str, Any], str]]:
    """Run ``python -m MODULE JSON_OPTION FILE`` on every CPython found, one after another.

    Yields each run's numbers (what it wrote to FILE) and a line with the load averages before
    and after it.
    """
    for python in find_pythons():
        version, interpreter = bench_venv(python)
        print(f"== CPython {version}: {python}", flush=True)
        before = load_average()
        out = ROOT / ".venvs" / f"{module.rsplit('.', 1)[-1]}-py{version}.json"
        subprocess.run(
            [str(interpreter), "-m", module, json_option, str(out)]
            + (["--quick"] if quick else []),
            cwd=ROOT,
            check=True,
        )
        numbers = json.loads(out.read_text(encoding="utf-8"))
        yield numbers, f"Load average (1, 5, 15 min) before: {before}; after: {load_average()}."
